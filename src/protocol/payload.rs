//! A message payload as the broker holds it: the bytes of the JSON string literal exactly
//! as the producer sent it, quotes and escapes included. The broker only passes payloads
//! along, so it never unescapes and re-escapes them: a delivery splices these bytes into
//! the outgoing `message` frame as they are.
//!
//! The bytes live in one `Arc<[u8]>`: one allocation per message, copied out of the read
//! buffer (so a held message never pins a whole buffer), and shared by reference count
//! between the queue and a delivery in flight.

use std::sync::Arc;

use serde::Deserialize;

/// The encoded JSON string literal of a payload (for example `"hi\n"`, quotes included).
///
/// Constructed only from validated JSON, so encoding a delivery can splice it in as is.
#[derive(Clone, PartialEq, Eq)]
pub struct Payload(Arc<[u8]>);

impl Payload {
    /// Encodes `text` as a JSON string literal.
    pub fn from_text(text: &str) -> Self {
        // Serialising a str cannot fail.
        Payload(Arc::from(serde_json::to_vec(text).unwrap_or_default()))
    }

    /// Wraps bytes that must already be one valid JSON string literal.
    ///
    /// # Errors
    /// The JSON error when `literal` is not exactly one JSON string.
    pub fn from_json_literal(literal: &[u8]) -> Result<Self, serde_json::Error> {
        let mut de = serde_json::Deserializer::from_slice(literal);
        validate_json_string(&mut de)?;
        de.end()?;
        Ok(Payload(Arc::from(literal)))
    }

    /// Copies bytes the caller has just validated as one JSON string literal.
    pub(crate) fn from_validated(literal: &[u8]) -> Self {
        debug_assert!(literal.first() == Some(&b'"') && literal.last() == Some(&b'"'));
        Payload(Arc::from(literal))
    }

    /// The JSON string literal, quotes included.
    pub fn as_json(&self) -> &[u8] {
        &self.0
    }

    /// Size in bytes of the encoded literal: what the broker's memory limit counts.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True only for a payload that is not a JSON literal at all, which cannot be built.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Decodes the payload to its text.
    ///
    /// # Errors
    /// Never for a payload built by this module; the error is serde_json's.
    pub fn to_text(&self) -> Result<String, serde_json::Error> {
        serde_json::from_slice(&self.0)
    }
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

/// Checks that the next JSON value is a string with valid escapes, without allocating.
pub(crate) fn validate_json_string<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<(), D::Error> {
    struct AnyString;

    impl<'de> serde::de::Visitor<'de> for AnyString {
        type Value = ();

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string")
        }

        fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
    }

    impl<'de> Deserialize<'de> for AnyString {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_str(AnyString)?;
            Ok(AnyString)
        }
    }

    AnyString::deserialize(deserializer).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_through_the_literal() {
        for text in ["", "hello", "quote \" and \\ and \n", "ünïcødé ✓", "\u{0}"] {
            let payload = Payload::from_text(text);
            assert_eq!(payload.to_text().unwrap(), text);
            assert_eq!(
                Payload::from_json_literal(payload.as_json()).unwrap(),
                payload
            );
        }
    }

    #[test]
    fn only_a_single_string_literal_is_a_payload() {
        for bad in [
            &b"42"[..],
            b"\"unterminated",
            b"\"a\" \"b\"",
            b"null",
            b"\"\\ud800\"",
        ] {
            assert!(
                Payload::from_json_literal(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
