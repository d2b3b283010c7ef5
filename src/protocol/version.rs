//! Protocol versions and their negotiation (contract §8).
//!
//! A `register` may ask for a version `"1.N"` (or `"1"`, meaning `"1.0"`); the connection
//! then speaks the highest version the broker supports that is not above the one asked,
//! and the register's `ok` says which. Without a `version` the connection speaks 1.0 and
//! the `ok` is exactly `{"type":"ok"}`.

use std::fmt;

/// A protocol version `1.minor`: there is no major version other than 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    minor: u32,
}

impl Version {
    /// Version 1.0: sections 1–7 of the contract.
    pub const V1_0: Version = Version { minor: 0 };

    /// Version 1.1: nack, touch, `ids`, delays, consumer leases, the full message frame.
    pub const V1_1: Version = Version { minor: 1 };

    /// The highest version this broker speaks. Of 1.1's publish semantics, dedup keys and
    /// publish_batch are not served yet: a publish with a `dedup_key` is refused
    /// (`invalid_frame`, saying so), and publish_batch is an unknown type. Priorities,
    /// headers and length limits are served.
    pub const SUPPORTED: Version = Version::V1_1;

    /// Reads `"1"` or `"1.N"` (N decimal digits; a minor beyond `u32` is as high as any).
    pub fn parse(text: &str) -> Option<Version> {
        let minor = match text.strip_prefix('1')? {
            "" => return Some(Version::V1_0),
            rest => rest.strip_prefix('.')?,
        };
        if minor.is_empty() || !minor.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let minor = minor.parse::<u32>().unwrap_or(u32::MAX);
        Some(Version { minor })
    }

    /// What a connection asking for `self` speaks.
    pub fn negotiate(self) -> Version {
        self.min(Version::SUPPORTED)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "1.{}", self.minor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_as_the_contract_spells_them() {
        let parsed = |text: &str| Version::parse(text).map(|v| v.to_string());
        assert_eq!(parsed("1").as_deref(), Some("1.0"));
        assert_eq!(parsed("1.0").as_deref(), Some("1.0"));
        assert_eq!(parsed("1.1").as_deref(), Some("1.1"));
        assert_eq!(parsed("1.7").as_deref(), Some("1.7"));
        assert_eq!(
            parsed("1.99999999999999999999").as_deref(),
            Some("1.4294967295")
        );
        for bad in [
            "", "2.0", "2", "abc", "1.", ".1", "1.1.0", "1.x", "1.+1", "1.-1", " 1.1", "1.1 ",
            "11", "1,1",
        ] {
            assert_eq!(Version::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_connection_speaks_the_highest_supported_version_not_above_the_one_asked() {
        let asked = |text: &str| Version::parse(text).unwrap().negotiate();
        assert_eq!(asked("1"), Version::V1_0);
        assert_eq!(asked("1.0"), Version::V1_0);
        assert_eq!(asked("1.1"), Version::V1_1);
        assert_eq!(asked("1.7"), Version::V1_1);
    }
}
