//! What a 1.1 publish may attach to its message beyond payload, priority and delay, and
//! what travels with the message from then on (through redelivery, dead-lettering and
//! restarts) and is shown on its 1.1 message frames: its `headers` (contract §9).
//!
//! Headers are checked once, where they enter (a publish, or a log record read back),
//! and kept as the JSON object the broker renders from them: a delivery splices that text
//! into its frame as it splices a payload's literal, and the log stores it as it is.

use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::{Serialize, Serializer};

/// Most entries a message's headers may have.
pub const HEADERS_MAX: usize = 32;
/// Longest header key, in characters of `[A-Za-z0-9._-]`.
pub const HEADER_KEY_CHARS_MAX: usize = 128;
/// Longest header value, in bytes of UTF-8.
pub const HEADER_VALUE_BYTES_MAX: usize = 4096;
/// The key prefix the broker keeps for itself.
const RESERVED_KEY_PREFIX: &str = "ferry.";

/// What a message carries besides its payload, priority and times; kept beside the
/// message, since most messages carry none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributes {
    pub headers: Headers,
}

impl Attributes {
    /// Bytes it holds, as the memory limit counts them.
    pub fn byte_len(&self) -> usize {
        self.headers.as_json().len()
    }
}

/// A message's headers: 1 to [`HEADERS_MAX`] string entries, checked, kept as the JSON
/// object `{"key":"value",...}` in the order given.
#[derive(Clone, PartialEq, Eq)]
pub struct Headers(Box<[u8]>);

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

impl Headers {
    /// Headers of these entries, in order.
    ///
    /// # Errors
    /// What is wrong with them, in words a user can act on: too many, a key out of its
    /// alphabet or length or reserved, a value too long, a key given twice.
    pub fn new<K: AsRef<str>, V: AsRef<str>>(
        entries: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Headers, String> {
        let mut json = vec![b'{'];
        let mut keys: Vec<String> = Vec::new();
        for (key, value) in entries {
            let (key, value) = (key.as_ref(), value.as_ref());
            if keys.len() == HEADERS_MAX {
                return Err(format!("has more than {HEADERS_MAX} entries"));
            }
            check_key(key)?;
            if value.len() > HEADER_VALUE_BYTES_MAX {
                return Err(format!(
                    "value of `{key}` is {} bytes; at most {HEADER_VALUE_BYTES_MAX}",
                    value.len()
                ));
            }
            if keys.iter().any(|k| k == key) {
                return Err(format!("gives key `{key}` twice"));
            }
            if !keys.is_empty() {
                json.push(b',');
            }
            // Keys need no escaping: their alphabet has nothing JSON escapes.
            json.push(b'"');
            json.extend_from_slice(key.as_bytes());
            json.extend_from_slice(b"\":");
            serde_json::to_writer(&mut json, value).expect("a string always serializes");
            keys.push(key.to_owned());
        }
        if keys.is_empty() {
            return Err("is empty; leave it out instead".to_owned());
        }
        json.push(b'}');
        Ok(Headers(json.into_boxed_slice()))
    }

    /// Headers from a JSON object of string values, checked as a publish's are. `{}`
    /// is no headers.
    ///
    /// # Errors
    /// Not a JSON object of strings, or what [`Headers::new`] refuses.
    pub fn from_json(json: &str) -> Result<Option<Headers>, String> {
        let mut deserializer = serde_json::Deserializer::from_str(json);
        let entries = deserializer
            .deserialize_map(EntriesVisitor)
            .and_then(|entries| deserializer.end().map(|()| entries))
            .map_err(|e| match e.classify() {
                // Where in the headers' text is no help to someone who sent a frame.
                serde_json::error::Category::Data => {
                    let text = e.to_string();
                    match text.rsplit_once(" at line ") {
                        Some((problem, _)) => problem.to_owned(),
                        None => text,
                    }
                }
                _ => "must be a JSON object of string values".to_owned(),
            })?;
        if entries.is_empty() {
            return Ok(None);
        }
        Headers::new(entries).map(Some)
    }

    /// The JSON object, as a message frame writes it.
    pub fn as_json(&self) -> &[u8] {
        &self.0
    }

    /// The entries, in order.
    pub fn entries(&self) -> Vec<(String, String)> {
        let json = std::str::from_utf8(&self.0).expect("rendered as UTF-8");
        let mut deserializer = serde_json::Deserializer::from_str(json);
        deserializer
            .deserialize_map(EntriesVisitor)
            .expect("rendered from valid entries")
    }
}

/// As the JSON object they are.
impl Serialize for Headers {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.entries())
    }
}

fn check_key(key: &str) -> Result<(), String> {
    let shown: String = key.chars().take(HEADER_KEY_CHARS_MAX).collect();
    if let Some(bad) = key
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!("key `{shown}` has {bad:?}; use [A-Za-z0-9._-]"));
    }
    // ASCII from here: its bytes are its characters.
    if key.is_empty() || key.len() > HEADER_KEY_CHARS_MAX {
        return Err(format!(
            "key `{shown}` has {} characters; use 1 to {HEADER_KEY_CHARS_MAX}",
            key.len()
        ));
    }
    if key.starts_with(RESERVED_KEY_PREFIX) {
        return Err(format!(
            "key `{key}` starts with `{RESERVED_KEY_PREFIX}`, which the broker keeps for itself"
        ));
    }
    Ok(())
}

/// A JSON object's entries in order, each value a string. Duplicate keys are kept here
/// for [`Headers::new`] to refuse (serde_json's own maps keep the last silently).
struct EntriesVisitor;

impl<'de> Visitor<'de> for EntriesVisitor {
    type Value = Vec<(String, String)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object of string values")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        use serde::de::Error;
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if entries.len() > HEADERS_MAX {
                return Err(A::Error::custom(format!(
                    "has more than {HEADERS_MAX} entries"
                )));
            }
            let value = map.next_value::<serde_json::Value>()?;
            let serde_json::Value::String(value) = value else {
                return Err(A::Error::custom(format!(
                    "value of `{}` is not a string",
                    key.chars().take(HEADER_KEY_CHARS_MAX).collect::<String>()
                )));
            };
            entries.push((key, value));
        }
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_render_in_order_and_read_back() {
        let headers = Headers::new([("trace", "ab12"), ("tenant.id", "a \"quoted\" ✓")]).unwrap();
        assert_eq!(
            headers.as_json(),
            r#"{"trace":"ab12","tenant.id":"a \"quoted\" ✓"}"#.as_bytes()
        );
        assert_eq!(
            headers.entries(),
            [
                ("trace".to_owned(), "ab12".to_owned()),
                ("tenant.id".to_owned(), "a \"quoted\" ✓".to_owned())
            ]
        );
        let json = std::str::from_utf8(headers.as_json()).unwrap();
        assert_eq!(Headers::from_json(json), Ok(Some(headers)));
        assert_eq!(Headers::from_json(" { } "), Ok(None));
    }

    #[test]
    fn headers_out_of_the_contract_are_refused_saying_why() {
        let refusal = |json: &str| Headers::from_json(json).unwrap_err();
        assert_eq!(refusal(r#"{"a":1}"#), "value of `a` is not a string");
        assert_eq!(
            refusal("[]"),
            "invalid type: sequence, expected a JSON object of string values"
        );
        assert_eq!(
            refusal(r#""x""#),
            "invalid type: string \"x\", expected a JSON object of string values"
        );
        assert_eq!(
            refusal(&format!(r#"{{"{}":"1"}}"#, "é".repeat(100))),
            format!("key `{}` has 'é'; use [A-Za-z0-9._-]", "é".repeat(100))
        );
        assert_eq!(refusal("{"), "must be a JSON object of string values");
        assert_eq!(refusal(r#"{"a":"1","a":"2"}"#), "gives key `a` twice");
        assert_eq!(
            refusal(r#"{"a b":"1"}"#),
            "key `a b` has ' '; use [A-Za-z0-9._-]"
        );
        assert_eq!(
            refusal(r#"{"":"1"}"#),
            "key `` has 0 characters; use 1 to 128"
        );
        assert!(refusal(r#"{"ferry.x":"1"}"#).contains("starts with `ferry.`"));
        let long_key = format!(r#"{{"{}":"1"}}"#, "k".repeat(129));
        assert!(refusal(&long_key).contains("has 129 characters"));
        let at_most_key = format!(r#"{{"{}":"1"}}"#, "k".repeat(128));
        assert!(Headers::from_json(&at_most_key).unwrap().is_some());
        let long_value = format!(r#"{{"k":"{}"}}"#, "é".repeat(2049));
        assert_eq!(
            refusal(&long_value),
            "value of `k` is 4098 bytes; at most 4096"
        );
        let entries = |n: usize| {
            let fields: Vec<String> = (0..n).map(|i| format!(r#""k{i}":"v""#)).collect();
            format!("{{{}}}", fields.join(","))
        };
        assert!(Headers::from_json(&entries(32)).unwrap().is_some());
        assert!(refusal(&entries(33)).starts_with("has more than 32 entries"));
        // A flood of entries is refused as it is read, not after.
        assert!(refusal(&entries(100_000)).starts_with("has more than 32 entries"));
    }
}
