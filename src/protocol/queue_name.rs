//! Queue names: 1–255 characters of `[A-Za-z0-9._-]`, checked once at the edge and then
//! shared cheaply (an `Arc<str>`) by everything that refers to the queue.

use std::fmt;
use std::sync::Arc;

use thiserror::Error;

/// Longest queue name, in characters (all allowed characters are ASCII).
pub const QUEUE_NAME_MAX_LEN: usize = 255;

/// A validated queue name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueName(Arc<str>);

/// Why a string is not a queue name. The messages say what to use instead.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum InvalidQueueName {
    #[error("queue name is empty; use 1 to 255 characters of [A-Za-z0-9._-]")]
    Empty,
    #[error("queue name is {len} bytes long; use at most 255 characters of [A-Za-z0-9._-]")]
    TooLong { len: usize },
    #[error("queue name `{name}` has {found} at position {position}; use [A-Za-z0-9._-]")]
    BadCharacter {
        name: String,
        found: String,
        position: usize,
    },
}

impl QueueName {
    /// The queue a client uses when it names none.
    pub fn default_queue() -> Self {
        QueueName(Arc::from("default"))
    }

    /// Validates `name`.
    ///
    /// # Errors
    /// [`InvalidQueueName`] when `name` is empty, longer than 255 characters, or holds a
    /// character outside `[A-Za-z0-9._-]`.
    pub fn new(name: &str) -> Result<Self, InvalidQueueName> {
        if name.is_empty() {
            return Err(InvalidQueueName::Empty);
        }
        if name.len() > QUEUE_NAME_MAX_LEN {
            return Err(InvalidQueueName::TooLong { len: name.len() });
        }
        if let Some((position, bad)) = name
            .chars()
            .enumerate()
            .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            let found = match bad {
                ' ' => "a space".to_owned(),
                c if c.is_control() => format!("the control character {:?}", c),
                c => format!("`{c}`"),
            };
            return Err(InvalidQueueName::BadCharacter {
                name: name.to_owned(),
                found,
                position,
            });
        }
        Ok(QueueName(Arc::from(name)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for QueueName {
    type Err = InvalidQueueName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        QueueName::new(s)
    }
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_allowed_alphabet_up_to_255() {
        for name in [
            "default",
            "a",
            "orders.eu-west_1",
            "A-Z.0_9",
            &"x".repeat(255),
        ] {
            assert_eq!(QueueName::new(name).unwrap().as_str(), name);
        }
    }

    #[test]
    fn rejects_with_a_message_that_says_what_to_use() {
        assert_eq!(QueueName::new(""), Err(InvalidQueueName::Empty));
        assert_eq!(
            QueueName::new(&"x".repeat(256)),
            Err(InvalidQueueName::TooLong { len: 256 })
        );
        let err = QueueName::new("x y").unwrap_err();
        assert_eq!(
            err.to_string(),
            "queue name `x y` has a space at position 1; use [A-Za-z0-9._-]"
        );
        for bad in ["a/b", "é", "a\nb", "a*", "tab\t"] {
            assert!(
                matches!(
                    QueueName::new(bad),
                    Err(InvalidQueueName::BadCharacter { .. })
                ),
                "{bad:?} must be refused"
            );
        }
    }
}
