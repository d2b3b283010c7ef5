//! Queue patterns, as the auth file's grants and the config file's policy tables write
//! them: an exact queue name, or a prefix ending in `*` (`"billing.*"`, or `"*"` for all).

use crate::protocol::QueueName;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueuePattern {
    Exact(QueueName),
    Prefix(String),
}

impl QueuePattern {
    /// Reads a pattern; the error says what is wrong with it.
    pub fn parse(pattern: &str) -> Result<QueuePattern, String> {
        match pattern.strip_suffix('*') {
            Some(prefix) => {
                if !prefix.is_empty() {
                    // A prefix must itself be made of queue-name characters.
                    QueueName::new(prefix)
                        .map_err(|e| format!("queue pattern `{pattern}`: {e}"))?;
                }
                Ok(QueuePattern::Prefix(prefix.to_owned()))
            }
            None => QueueName::new(pattern)
                .map(QueuePattern::Exact)
                .map_err(|e| {
                    format!("queue pattern `{pattern}`: {e} (a trailing * makes a prefix)")
                }),
        }
    }

    pub fn matches(&self, queue: &QueueName) -> bool {
        match self {
            QueuePattern::Exact(name) => name == queue,
            QueuePattern::Prefix(prefix) => queue.as_str().starts_with(prefix.as_str()),
        }
    }
}
