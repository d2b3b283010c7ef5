//! Queue names: 1–255 characters of `[A-Za-z0-9._-]`, checked once at the edge and then
//! shared cheaply (one pointer) by everything that refers to the queue.
//!
//! A name carries its hash, taken once with a keyed SipHash (std's `RandomState`, whose
//! random keys resist collision flooding by whoever picks the names): the broker looks
//! its queues up by name for every publish and nack, and hashing the string each time
//! would cost more than the lookup. Maps keyed by names then only mix that number
//! (`FxHashMap`, a bijection of it, so no collision is added).

use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::{Arc, LazyLock};

use thiserror::Error;

/// Longest queue name, in characters (all allowed characters are ASCII).
pub const QUEUE_NAME_MAX_LEN: usize = 255;

/// A validated queue name.
#[derive(Clone)]
pub struct QueueName(Arc<HashedName>);

struct HashedName {
    hash: u64,
    name: Box<str>,
}

/// The keys of every name's hash in this process.
static NAME_HASHER: LazyLock<RandomState> = LazyLock::new(RandomState::new);

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
        QueueName::checked("default")
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
        Ok(QueueName::checked(name))
    }

    fn checked(name: &str) -> Self {
        QueueName(Arc::new(HashedName {
            hash: NAME_HASHER.hash_one(name),
            name: name.into(),
        }))
    }

    pub fn as_str(&self) -> &str {
        &self.0.name
    }
}

impl PartialEq for QueueName {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
            || (self.0.hash == other.0.hash && self.0.name == other.0.name)
    }
}

impl Eq for QueueName {}

impl Hash for QueueName {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.0.hash);
    }
}

impl PartialOrd for QueueName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for QueueName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
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
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_made_apart_are_one_key_and_order_as_text() {
        use std::collections::HashSet;
        let name = |s| QueueName::new(s).unwrap();
        let keys: HashSet<QueueName> = ["orders", "orders", "orders2", "Orders"]
            .into_iter()
            .map(name)
            .collect();
        assert_eq!(keys.len(), 3);
        assert!(keys.contains(&name("orders")) && !keys.contains(&name("order")));
        let hash = |n: &QueueName| NAME_HASHER.hash_one(n);
        assert_eq!(hash(&name("jobs")), hash(&name("jobs")));
        let mut sorted = [name("b"), name("a.2"), name("a")];
        sorted.sort();
        assert_eq!(
            sorted.iter().map(QueueName::as_str).collect::<Vec<_>>(),
            ["a", "a.2", "b"]
        );
    }

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
