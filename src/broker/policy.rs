//! Queue policies (contract §11): the queue tables of `ferry broker --config PATH`.
//!
//! ```toml
//! [queue_defaults]          # every queue, under the tables below
//! ack_timeout = "30s"
//!
//! [queues."orders"]         # an exact name
//! ack_timeout = "2m"
//! max_deliveries = 5        # then to orders.dlq (rules 14 and 15)
//! dead_letter_queue = "orders.dlq"
//!
//! [queues."tenant-a.*"]     # a prefix: the longest matching prefix wins;
//! ack_timeout = "10s"       # an exact name beats every prefix
//! ```
//! A key a queue's table does not set comes from `[queue_defaults]`, then from the
//! broker's flags (`--ack-timeout`). A queue's policy is fixed when the broker starts.
//!
//! Keys are served as the features they govern are: a key of the contract's table that
//! this build does not act on yet is refused at start, so a policy is never silently
//! ignored. Every refusal names the file, the table and the key.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use super::queue_pattern::QueuePattern;
use crate::protocol::QueueName;

/// What one queue's policy says.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuePolicy {
    /// The lease of a delivery from this queue.
    pub ack_timeout: Duration,
    /// The most a lease may reach by `touch` (from its delivery), and the most a
    /// consumer's own lease may be.
    pub max_lease: Duration,
    /// Deliveries after which a returned message is dead-lettered; 0 is no limit.
    pub max_deliveries: u32,
    /// Where this queue's dead letters go; without one they are discarded, which
    /// `discard_dead_letters` must have opted into.
    pub dead_letter_queue: Option<QueueName>,
    pub discard_dead_letters: bool,
    /// A nack without a delay waits `backoff_initial × backoff_multiplier^(attempt − 1)`,
    /// at most `backoff_max` (rule 12); no wait when `backoff_initial` is zero.
    pub backoff_initial: Duration,
    pub backoff_multiplier: f64,
    pub backoff_max: Duration,
    /// The most a publish or a nack may delay a message.
    pub max_delay: Duration,
    /// The most messages the queue may hold, ready, delayed and in flight (rule 17); 0
    /// is no limit.
    pub max_length: u64,
    /// What a publish into a full queue does.
    pub overflow: Overflow,
}

/// What a publish into a queue at its `max_length` does (rule 17).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// The publish is refused (`queue_full`); nothing queued is touched.
    RejectPublish,
    /// The oldest ready message of the lowest priority is dead-lettered (reason
    /// `overflow`) to make room; with nothing ready to drop, the publish is refused.
    DropHead,
}

impl Overflow {
    /// Every value, as the config file names them.
    const NAMES: [(&str, Overflow); 2] = [
        ("reject-publish", Overflow::RejectPublish),
        ("drop-head", Overflow::DropHead),
    ];
}

/// The contract's default `max_lease`.
pub const MAX_LEASE_DEFAULT: Duration = Duration::from_secs(12 * 3600);
/// The contract's default `backoff_multiplier`.
pub const BACKOFF_MULTIPLIER_DEFAULT: f64 = 2.0;
/// The contract's default `backoff_max`.
pub const BACKOFF_MAX_DEFAULT: Duration = Duration::from_secs(5 * 60);
/// The contract's default `max_delay`.
pub const MAX_DELAY_DEFAULT: Duration = Duration::from_secs(7 * 24 * 3600);
/// The delays a policy may set (`backoff_initial`, `backoff_max`, `max_delay`): a
/// year, as for leases, keeps every due time computable.
pub const DELAY_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::ZERO..=Duration::from_secs(365 * 24 * 3600);

impl QueuePolicy {
    /// The contract's defaults, with this ack timeout (the broker's `--ack-timeout`).
    pub fn new(ack_timeout: Duration) -> QueuePolicy {
        QueuePolicy {
            ack_timeout,
            max_lease: MAX_LEASE_DEFAULT,
            max_deliveries: 0,
            dead_letter_queue: None,
            discard_dead_letters: false,
            backoff_initial: Duration::ZERO,
            backoff_multiplier: BACKOFF_MULTIPLIER_DEFAULT,
            backoff_max: BACKOFF_MAX_DEFAULT,
            max_delay: MAX_DELAY_DEFAULT,
            max_length: 0,
            overflow: Overflow::RejectPublish,
        }
    }

    /// How long a nack without a delay of a message delivered `attempt` times waits
    /// (rule 12).
    pub fn backoff(&self, attempt: u32) -> Duration {
        if self.backoff_initial.is_zero() {
            return Duration::ZERO;
        }
        let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let scaled = self.backoff_initial.as_secs_f64() * self.backoff_multiplier.powi(exponent);
        // A product past what a Duration holds (or infinite) is past backoff_max too.
        Duration::try_from_secs_f64(scaled)
            .unwrap_or(Duration::MAX)
            .min(self.backoff_max)
    }
}

/// The ack timeouts a queue may have: the contract counts leases in milliseconds, and a
/// year is past any job a lease could stand for (and keeps every deadline computable).
pub const ACK_TIMEOUT_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_secs(365 * 24 * 3600);

/// Checks an ack timeout against [`ACK_TIMEOUT_RANGE`]; the error says what to use.
pub fn check_ack_timeout(timeout: Duration) -> Result<Duration, String> {
    if ACK_TIMEOUT_RANGE.contains(&timeout) {
        Ok(timeout)
    } else {
        Err(format!(
            "{} is out of range; use 1ms to 365days",
            humantime::format_duration(timeout)
        ))
    }
}

/// The keys of the contract's policy table that this build does not act on yet, each
/// with what it comes with.
const KEYS_NOT_SERVED: [(&str, &str); 1] = [("dedup_window", "dedup keys (protocol 1.1, part 2)")];

/// The keys this build serves (`parse_table` reads each), as the refusal of an unknown
/// key lists them.
const KEYS_SERVED: [&str; 11] = [
    "ack_timeout",
    "max_lease",
    "max_deliveries",
    "dead_letter_queue",
    "discard_dead_letters",
    "backoff_initial",
    "backoff_multiplier",
    "backoff_max",
    "max_delay",
    "max_length",
    "overflow",
];

/// One table of the file: the keys it sets.
#[derive(Debug, Clone, Default, PartialEq)]
struct PolicyTable {
    ack_timeout: Option<Duration>,
    max_lease: Option<Duration>,
    max_deliveries: Option<u32>,
    dead_letter_queue: Option<QueueName>,
    discard_dead_letters: Option<bool>,
    backoff_initial: Option<Duration>,
    backoff_multiplier: Option<f64>,
    backoff_max: Option<Duration>,
    max_delay: Option<Duration>,
    max_length: Option<u64>,
    overflow: Option<Overflow>,
}

impl PolicyTable {
    /// This table's keys, and `base`'s where it sets none.
    fn over(&self, base: &QueuePolicy) -> QueuePolicy {
        QueuePolicy {
            ack_timeout: self.ack_timeout.unwrap_or(base.ack_timeout),
            max_lease: self.max_lease.unwrap_or(base.max_lease),
            max_deliveries: self.max_deliveries.unwrap_or(base.max_deliveries),
            dead_letter_queue: self
                .dead_letter_queue
                .clone()
                .or_else(|| base.dead_letter_queue.clone()),
            discard_dead_letters: self
                .discard_dead_letters
                .unwrap_or(base.discard_dead_letters),
            backoff_initial: self.backoff_initial.unwrap_or(base.backoff_initial),
            backoff_multiplier: self.backoff_multiplier.unwrap_or(base.backoff_multiplier),
            backoff_max: self.backoff_max.unwrap_or(base.backoff_max),
            max_delay: self.max_delay.unwrap_or(base.max_delay),
            max_length: self.max_length.unwrap_or(base.max_length),
            overflow: self.overflow.unwrap_or(base.overflow),
        }
    }
}

/// The queue tables of a config file, as written.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyFile {
    defaults: PolicyTable,
    /// Each queue table: its name as the file writes it, its pattern, its keys.
    tables: Vec<(String, QueuePattern, PolicyTable)>,
}

/// Why the config file cannot be used. The broker refuses to start on any of these.
#[derive(Debug, Error)]
pub enum ConfigFileError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {problem}")]
    Invalid { path: PathBuf, problem: Problem },
}

/// What is wrong in a config file, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The table, as the file writes it (`[queues."orders"]`); `None` for the file as a
    /// whole.
    table: Option<String>,
    key: Option<String>,
    message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.table, &self.key) {
            (Some(table), Some(key)) => write!(f, "{table} {key}: {}", self.message),
            (Some(table), None) => write!(f, "{table}: {}", self.message),
            (None, Some(key)) => write!(f, "{key}: {}", self.message),
            (None, None) => f.write_str(&self.message),
        }
    }
}

impl PolicyFile {
    /// Reads the queue tables of the TOML file at `path`.
    ///
    /// # Errors
    /// [`ConfigFileError`] when the file cannot be read or is not valid TOML, or holds an
    /// unknown table or key, a bad queue pattern, or a value of the wrong type or range.
    pub fn load(path: &Path) -> Result<PolicyFile, ConfigFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse_text(&text).map_err(|problem| ConfigFileError::Invalid {
            path: path.to_owned(),
            problem,
        })
    }

    /// Reads queue tables from TOML text (what [`PolicyFile::load`] reads from a file).
    ///
    /// # Errors
    /// The [`Problem`], naming the table and the key.
    pub fn parse_text(text: &str) -> Result<PolicyFile, Problem> {
        let document: toml::Table = toml::from_str(text).map_err(|e| Problem {
            table: None,
            key: None,
            message: format!("not valid TOML: {}", e.to_string().trim_end()),
        })?;
        let mut file = PolicyFile::default();
        for (name, value) in &document {
            match (name.as_str(), value) {
                ("queue_defaults", toml::Value::Table(table)) => {
                    file.defaults = parse_table("[queue_defaults]", table)?;
                }
                ("queues", toml::Value::Table(queues)) => {
                    for (pattern, value) in queues {
                        let table_name = format!("[queues.{}]", toml_key(pattern));
                        let problem = |key: Option<&str>, message: String| Problem {
                            table: Some(table_name.clone()),
                            key: key.map(str::to_owned),
                            message,
                        };
                        let parsed = QueuePattern::parse(pattern).map_err(|m| problem(None, m))?;
                        let toml::Value::Table(table) = value else {
                            return Err(problem(None, "must be a table of policy keys".to_owned()));
                        };
                        let keys = parse_table(&table_name, table)?;
                        file.tables.push((table_name, parsed, keys));
                    }
                }
                ("queue_defaults" | "queues", _) => {
                    return Err(Problem {
                        table: None,
                        key: Some(name.clone()),
                        message: "must be a table".to_owned(),
                    });
                }
                ("broker", toml::Value::Table(_)) => {
                    return Err(Problem {
                        table: Some("[broker]".to_owned()),
                        key: None,
                        message: "not served by this build yet (broker settings are flags for now); remove it".to_owned(),
                    });
                }
                (unknown, toml::Value::Table(_)) => {
                    return Err(Problem {
                        table: Some(format!("[{}]", toml_key(unknown))),
                        key: None,
                        message: "unknown table; use [queue_defaults] or [queues.\"NAME\"] (a trailing * in NAME makes a prefix)".to_owned(),
                    });
                }
                (unknown, _) => {
                    return Err(Problem {
                        table: None,
                        key: Some(unknown.to_owned()),
                        message: "a key outside any table; policy keys go in [queue_defaults] or [queues.\"NAME\"]".to_owned(),
                    });
                }
            }
        }
        file.check_dead_letters()?;
        Ok(file)
    }

    /// Every table's effective policy must say where its dead letters go (or opt into
    /// dropping them), and no chain of dead-letter queues may come back on itself.
    fn check_dead_letters(&self) -> Result<(), Problem> {
        // Dead-letter keys come from the file alone: any base will do.
        let base = QueuePolicy::new(Duration::from_secs(1));
        let policies = self.resolve(&base);
        let defaults = self.default_policy(&base);
        let effective = std::iter::once(("[queue_defaults]".to_owned(), defaults.clone())).chain(
            self.tables
                .iter()
                .map(|(name, _, table)| (name.clone(), table.over(&defaults))),
        );
        for (table, policy) in effective {
            let problem = |key: &str, message: String| Problem {
                table: Some(table.clone()),
                key: Some(key.to_owned()),
                message,
            };
            if policy.max_deliveries > 0
                && policy.dead_letter_queue.is_none()
                && !policy.discard_dead_letters
            {
                return Err(problem(
                    "max_deliveries",
                    format!(
                        "is {} with no dead_letter_queue: name one, or set discard_dead_letters = true to drop such messages",
                        policy.max_deliveries
                    ),
                ));
            }
            let Some(first) = policy.dead_letter_queue else {
                continue;
            };
            let mut chain = vec![first];
            while let Some(next) = policies
                .for_queue(chain.last().expect("never empty"))
                .dead_letter_queue
                .clone()
            {
                let looped = chain.contains(&next);
                chain.push(next);
                if looped {
                    let names: Vec<&str> = chain.iter().map(QueueName::as_str).collect();
                    return Err(problem(
                        "dead_letter_queue",
                        format!("dead letters would go round: {}", names.join(" -> ")),
                    ));
                }
            }
        }
        Ok(())
    }

    /// How many queue tables the file has, `[queue_defaults]` aside.
    pub fn queue_tables(&self) -> usize {
        self.tables.len()
    }

    /// The policy of a queue no table matches: `base` under `[queue_defaults]`.
    pub fn default_policy(&self, base: &QueuePolicy) -> QueuePolicy {
        self.defaults.over(base)
    }

    /// Every queue's policy: `base` (the broker's flags) under `[queue_defaults]` under
    /// the queue's own table.
    pub fn resolve(&self, base: &QueuePolicy) -> Policies {
        let defaults = self.default_policy(base);
        let mut policies = Policies::uniform(defaults.clone());
        for (_, pattern, table) in &self.tables {
            let policy = Arc::new(table.over(&defaults));
            match pattern {
                QueuePattern::Exact(name) => {
                    policies.exact.insert(name.clone(), policy);
                }
                QueuePattern::Prefix(prefix) => policies.prefixes.push((prefix.clone(), policy)),
            }
        }
        // Longest first: the first that matches is the longest.
        policies
            .prefixes
            .sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        policies
    }
}

/// A table key as TOML writes it: bare when it can be, quoted otherwise.
fn toml_key(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare {
        key.to_owned()
    } else {
        toml::Value::String(key.to_owned()).to_string()
    }
}

fn parse_table(table_name: &str, table: &toml::Table) -> Result<PolicyTable, Problem> {
    let mut parsed = PolicyTable::default();
    for (key, value) in table {
        let problem = |message: String| Problem {
            table: Some(table_name.to_owned()),
            key: Some(key.clone()),
            message,
        };
        match key.as_str() {
            "ack_timeout" => {
                let timeout = duration(value).and_then(check_ack_timeout);
                parsed.ack_timeout = Some(timeout.map_err(problem)?);
            }
            "max_lease" => {
                let lease = duration(value).and_then(check_ack_timeout);
                parsed.max_lease = Some(lease.map_err(problem)?);
            }
            "backoff_initial" => {
                parsed.backoff_initial =
                    Some(duration(value).and_then(check_delay).map_err(problem)?);
            }
            "backoff_max" => {
                parsed.backoff_max = Some(duration(value).and_then(check_delay).map_err(problem)?);
            }
            "max_delay" => {
                parsed.max_delay = Some(duration(value).and_then(check_delay).map_err(problem)?);
            }
            "backoff_multiplier" => {
                let multiplier = match value {
                    toml::Value::Float(x) => Some(*x),
                    toml::Value::Integer(n) => Some(*n as f64),
                    _ => None,
                };
                let multiplier = multiplier
                    .filter(|x| x.is_finite() && *x >= 1.0)
                    .ok_or_else(|| {
                        problem(format!(
                            "is {value}; use a number of at least 1.0, such as 2.0"
                        ))
                    })?;
                parsed.backoff_multiplier = Some(multiplier);
            }
            "max_deliveries" => {
                let count = match value {
                    toml::Value::Integer(n) => u32::try_from(*n).ok(),
                    _ => None,
                };
                let count = count.ok_or_else(|| {
                    problem(format!(
                        "is {value}; use an integer from 0 (no limit) to 4294967295"
                    ))
                })?;
                parsed.max_deliveries = Some(count);
            }
            "max_length" => {
                let length = match value {
                    toml::Value::Integer(n) => u64::try_from(*n).ok(),
                    _ => None,
                };
                let length = length.ok_or_else(|| {
                    problem(format!(
                        "is {value}; use an integer from 0 (no limit) to 9223372036854775807"
                    ))
                })?;
                parsed.max_length = Some(length);
            }
            "overflow" => {
                let overflow = match value {
                    toml::Value::String(name) => Overflow::NAMES
                        .iter()
                        .find(|(known, _)| known == name)
                        .map(|(_, overflow)| *overflow),
                    _ => None,
                };
                let overflow = overflow.ok_or_else(|| {
                    problem(format!(
                        "is {value}; use \"reject-publish\" or \"drop-head\""
                    ))
                })?;
                parsed.overflow = Some(overflow);
            }
            "dead_letter_queue" => {
                let toml::Value::String(name) = value else {
                    return Err(problem(format!("is {value}; use a queue name in quotes")));
                };
                let queue = QueueName::new(name).map_err(|e| problem(e.to_string()))?;
                parsed.dead_letter_queue = Some(queue);
            }
            "discard_dead_letters" => {
                let toml::Value::Boolean(discard) = value else {
                    return Err(problem(format!("is {value}; use true or false")));
                };
                parsed.discard_dead_letters = Some(*discard);
            }
            other => {
                let message = match KEYS_NOT_SERVED.iter().find(|(k, _)| *k == other) {
                    Some((_, comes_with)) => format!(
                        "not served by this build yet (it comes with {comes_with}); remove it"
                    ),
                    None => format!("unknown key; this build serves: {}", KEYS_SERVED.join(", ")),
                };
                return Err(problem(message));
            }
        }
    }
    Ok(parsed)
}

/// Checks a delay against [`DELAY_RANGE`]; the error says what to use.
fn check_delay(delay: Duration) -> Result<Duration, String> {
    if DELAY_RANGE.contains(&delay) {
        Ok(delay)
    } else {
        Err(format!(
            "{} is out of range; use 0s to 365days",
            humantime::format_duration(delay)
        ))
    }
}

/// A duration written as a string with units, as the flags take them.
fn duration(value: &toml::Value) -> Result<Duration, String> {
    let toml::Value::String(text) = value else {
        return Err(format!(
            "is {value}; use a duration string such as \"30s\", \"5m\" or \"12h\""
        ));
    };
    humantime::parse_duration(text).map_err(|e| {
        format!("`{text}` is not a duration ({e}); use e.g. \"30s\", \"5m\" or \"12h\"")
    })
}

/// Every queue's policy, as resolved when the broker starts.
#[derive(Debug, Clone)]
pub struct Policies {
    default: Arc<QueuePolicy>,
    exact: HashMap<QueueName, Arc<QueuePolicy>>,
    /// Longest prefix first.
    prefixes: Vec<(String, Arc<QueuePolicy>)>,
}

impl Policies {
    /// The same policy for every queue: a broker without a config file.
    pub fn uniform(policy: QueuePolicy) -> Policies {
        Policies {
            default: Arc::new(policy),
            exact: HashMap::new(),
            prefixes: Vec::new(),
        }
    }

    /// The policy of the queue named `name`: its exact table's, else its longest
    /// matching prefix's, else the defaults.
    pub fn for_queue(&self, name: &QueueName) -> Arc<QueuePolicy> {
        if let Some(policy) = self.exact.get(name) {
            return policy.clone();
        }
        self.prefixes
            .iter()
            .find(|(prefix, _)| name.as_str().starts_with(prefix.as_str()))
            .map_or_else(|| self.default.clone(), |(_, policy)| policy.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> QueuePolicy {
        QueuePolicy::new(Duration::from_secs(5))
    }

    fn ack_timeout(policies: &Policies, queue: &str) -> Duration {
        policies
            .for_queue(&QueueName::new(queue).unwrap())
            .ack_timeout
    }

    #[test]
    fn an_exact_name_beats_every_prefix_and_the_longest_prefix_wins() {
        let file = PolicyFile::parse_text(
            r#"
            [queue_defaults]
            ack_timeout = "30s"
            [queues."tenant-a.*"]
            ack_timeout = "10s"
            [queues."tenant-a.orders*"]
            ack_timeout = "20s"
            [queues."tenant-a.orders"]
            ack_timeout = "2m"
            [queues."other"]
            "#,
        )
        .unwrap();
        let policies = file.resolve(&base());
        assert_eq!(
            ack_timeout(&policies, "tenant-a.orders"),
            Duration::from_secs(120)
        );
        assert_eq!(
            ack_timeout(&policies, "tenant-a.orders-eu"),
            Duration::from_secs(20)
        );
        assert_eq!(
            ack_timeout(&policies, "tenant-a.billing"),
            Duration::from_secs(10)
        );
        // A table that does not set the key takes it from [queue_defaults].
        assert_eq!(ack_timeout(&policies, "other"), Duration::from_secs(30));
        assert_eq!(ack_timeout(&policies, "unlisted"), Duration::from_secs(30));
    }

    #[test]
    fn without_queue_defaults_the_flags_are_the_defaults() {
        let policies = PolicyFile::parse_text("[queues.\"a*\"]\nack_timeout = \"1s\"\n")
            .unwrap()
            .resolve(&base());
        assert_eq!(ack_timeout(&policies, "abc"), Duration::from_secs(1));
        assert_eq!(ack_timeout(&policies, "b"), base().ack_timeout);
        let policies = PolicyFile::parse_text("").unwrap().resolve(&base());
        assert_eq!(ack_timeout(&policies, "b"), base().ack_timeout);
    }

    #[test]
    fn dead_letter_keys_resolve_like_the_others() {
        let policies = PolicyFile::parse_text(
            r#"
            [queue_defaults]
            max_deliveries = 3
            discard_dead_letters = true
            [queues."orders"]
            dead_letter_queue = "dlq"
            [queues."dlq"]
            max_deliveries = 0
            [queues."scratch*"]
            dead_letter_queue = "scratch-dlq"
            [queues."scratch-dlq"]
            max_deliveries = 0
            [queues."lossy"]
            max_deliveries = 1
            discard_dead_letters = true
            "#,
        )
        .unwrap()
        .resolve(&base());
        let policy = |name: &str| policies.for_queue(&QueueName::new(name).unwrap());
        assert_eq!(policy("orders").max_deliveries, 3);
        assert_eq!(
            policy("orders").dead_letter_queue,
            Some(QueueName::new("dlq").unwrap())
        );
        assert_eq!(policy("dlq").max_deliveries, 0);
        assert_eq!(policy("scratch-1").max_deliveries, 3);
        assert_eq!(
            policy("scratch-1").dead_letter_queue,
            Some(QueueName::new("scratch-dlq").unwrap())
        );
        assert!(policy("lossy").discard_dead_letters);
        assert_eq!(policy("lossy").dead_letter_queue, None);
        assert_eq!(policy("other").dead_letter_queue, None);
    }

    #[test]
    fn retry_keys_resolve_like_the_others_and_backoff_grows_to_its_cap() {
        let policies = PolicyFile::parse_text(
            r#"
            [queue_defaults]
            backoff_initial = "1s"
            max_lease = "1h"
            [queues."jobs"]
            backoff_multiplier = 3
            backoff_max = "10s"
            max_delay = "1m"
            "#,
        )
        .unwrap()
        .resolve(&base());
        let jobs = policies.for_queue(&QueueName::new("jobs").unwrap());
        assert_eq!(jobs.max_lease, Duration::from_secs(3600));
        assert_eq!(jobs.max_delay, Duration::from_secs(60));
        let waits: Vec<u64> = (1..=5).map(|a| jobs.backoff(a).as_secs()).collect();
        assert_eq!(waits, [1, 3, 9, 10, 10]);
        assert_eq!(jobs.backoff(u32::MAX), Duration::from_secs(10));
        let other = policies.for_queue(&QueueName::new("other").unwrap());
        assert_eq!(other.backoff_multiplier, BACKOFF_MULTIPLIER_DEFAULT);
        assert_eq!(other.max_delay, MAX_DELAY_DEFAULT);
        let waits: Vec<u64> = (1..=4).map(|a| other.backoff(a).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8]);
        assert_eq!(other.backoff(40), BACKOFF_MAX_DEFAULT);
        assert_eq!(base().backoff(3), Duration::ZERO, "no backoff by default");
    }

    #[test]
    fn length_keys_resolve_like_the_others() {
        let policies = PolicyFile::parse_text(
            r#"
            [queue_defaults]
            max_length = 100
            [queues."bounded*"]
            overflow = "drop-head"
            [queues."bounded.big"]
            max_length = 1000000
            overflow = "reject-publish"
            "#,
        )
        .unwrap()
        .resolve(&base());
        let policy = |name: &str| policies.for_queue(&QueueName::new(name).unwrap());
        assert_eq!(policy("other").max_length, 100);
        assert_eq!(policy("other").overflow, Overflow::RejectPublish);
        assert_eq!(policy("bounded.small").max_length, 100);
        assert_eq!(policy("bounded.small").overflow, Overflow::DropHead);
        assert_eq!(policy("bounded.big").max_length, 1_000_000);
        assert_eq!(policy("bounded.big").overflow, Overflow::RejectPublish);
        assert_eq!(base().max_length, 0, "no limit by default");
    }

    #[test]
    fn dead_letters_must_have_somewhere_to_go_and_never_go_round() {
        let refusal = |text: &str| PolicyFile::parse_text(text).unwrap_err().to_string();
        assert_eq!(
            refusal("[queues.\"orders\"]\nmax_deliveries = 5\n"),
            "[queues.orders] max_deliveries: is 5 with no dead_letter_queue: name one, or set discard_dead_letters = true to drop such messages"
        );
        assert!(
            refusal("[queue_defaults]\nmax_deliveries = 2\n")
                .starts_with("[queue_defaults] max_deliveries: is 2 with no dead_letter_queue")
        );
        assert_eq!(
            refusal("[queues.\"a\"]\ndead_letter_queue = \"a\"\n"),
            "[queues.a] dead_letter_queue: dead letters would go round: a -> a"
        );
        assert_eq!(
            refusal(
                "[queues.\"a\"]\ndead_letter_queue = \"b\"\n[queues.\"b\"]\ndead_letter_queue = \"c\"\n[queues.\"c\"]\ndead_letter_queue = \"b\"\n"
            ),
            "[queues.a] dead_letter_queue: dead letters would go round: b -> c -> b"
        );
        // The defaults' queue takes the defaults too: it would be its own.
        assert_eq!(
            refusal("[queue_defaults]\ndead_letter_queue = \"dlq\"\n"),
            "[queue_defaults] dead_letter_queue: dead letters would go round: dlq -> dlq"
        );
        assert!(
            refusal("[queues.\"a\"]\nmax_deliveries = -1\n")
                .starts_with("[queues.a] max_deliveries: is -1; use an integer")
        );
        assert!(
            refusal("[queues.\"a\"]\ndead_letter_queue = \"x y\"\n")
                .starts_with("[queues.a] dead_letter_queue: queue name `x y` has a space")
        );
        assert!(
            refusal("[queues.\"a\"]\ndiscard_dead_letters = \"yes\"\n")
                .starts_with("[queues.a] discard_dead_letters: is \"yes\"; use true or false")
        );
        PolicyFile::parse_text(
            "[queue_defaults]\ndead_letter_queue = \"dlq\"\n[queues.\"dlq\"]\ndiscard_dead_letters = true\nmax_deliveries = 0\n",
        )
        .unwrap_err();
    }

    /// The key lists the refusals quote agree with what the parser reads: a served key
    /// with a value of the wrong type is refused for its value, never as unknown, and
    /// every key not served yet is refused as such.
    #[test]
    fn the_key_lists_agree_with_the_parser() {
        for key in KEYS_SERVED {
            let refusal = PolicyFile::parse_text(&format!("[queue_defaults]\n{key} = [1]\n"))
                .unwrap_err()
                .to_string();
            assert!(
                refusal.starts_with(&format!("[queue_defaults] {key}: is [1]")),
                "{refusal}"
            );
        }
        for (key, _) in KEYS_NOT_SERVED {
            let refusal = PolicyFile::parse_text(&format!("[queue_defaults]\n{key} = 1\n"))
                .unwrap_err()
                .to_string();
            assert!(
                refusal.contains("not served by this build yet"),
                "{refusal}"
            );
        }
    }

    #[test]
    fn every_refusal_names_the_table_and_the_key() {
        let refusal = |text: &str| PolicyFile::parse_text(text).unwrap_err().to_string();
        assert_eq!(
            refusal("[queue_defaults]\ncolour = \"blue\"\n"),
            "[queue_defaults] colour: unknown key; this build serves: ack_timeout, max_lease, max_deliveries, dead_letter_queue, discard_dead_letters, backoff_initial, backoff_multiplier, backoff_max, max_delay, max_length, overflow"
        );
        assert_eq!(
            refusal("[queues.\"orders\"]\nack_timeout = 30\n"),
            "[queues.orders] ack_timeout: is 30; use a duration string such as \"30s\", \"5m\" or \"12h\""
        );
        assert!(
            refusal("[queues.\"orders\"]\nack_timeout = \"soon\"\n")
                .starts_with("[queues.orders] ack_timeout: `soon` is not a duration")
        );
        for out_of_range in ["0s", "999us", "366days"] {
            let text = format!("[queues.\"o\"]\nack_timeout = \"{out_of_range}\"\n");
            let message = refusal(&text);
            assert!(
                message.starts_with("[queues.o] ack_timeout: ")
                    && message.ends_with("is out of range; use 1ms to 365days"),
                "{message}"
            );
        }
        assert!(
            refusal("[queues.\"orders\"]\ndedup_window = \"1m\"\n")
                .starts_with("[queues.orders] dedup_window: not served by this build yet")
        );
        assert_eq!(
            refusal("[queues.\"o\"]\nmax_length = -5\n"),
            "[queues.o] max_length: is -5; use an integer from 0 (no limit) to 9223372036854775807"
        );
        assert_eq!(
            refusal("[queues.\"o\"]\noverflow = \"drop-tail\"\n"),
            "[queues.o] overflow: is \"drop-tail\"; use \"reject-publish\" or \"drop-head\""
        );
        assert_eq!(
            refusal("[queues.\"o\"]\nbackoff_multiplier = 0.5\n"),
            "[queues.o] backoff_multiplier: is 0.5; use a number of at least 1.0, such as 2.0"
        );
        assert!(
            refusal("[queues.\"o\"]\nmax_delay = \"400days\"\n")
                .ends_with("is out of range; use 0s to 365days")
        );
        assert!(
            refusal("[queues.\"o\"]\nmax_lease = \"0s\"\n")
                .ends_with("is out of range; use 1ms to 365days")
        );
        assert!(
            refusal("[queues.\"x y\"]\nack_timeout = \"1s\"\n")
                .starts_with("[queues.\"x y\"]: queue pattern `x y`")
        );
        assert!(
            refusal("[broker]\naddr = \"x\"\n")
                .starts_with("[broker]: not served by this build yet")
        );
        assert!(refusal("[colours]\nred = 1\n").starts_with("[colours]: unknown table"));
        assert_eq!(
            refusal("ack_timeout = \"1s\"\n"),
            "ack_timeout: a key outside any table; policy keys go in [queue_defaults] or [queues.\"NAME\"]"
        );
        assert_eq!(refusal("queues = 3\n"), "queues: must be a table");
        assert_eq!(
            refusal("[queues]\norders = 3\n"),
            "[queues.orders]: must be a table of policy keys"
        );
        assert!(refusal("[queues\n").starts_with("not valid TOML"));
        let duplicate = refusal("[queues.\"o\"]\nack_timeout = \"1s\"\nack_timeout = \"2s\"\n");
        assert!(duplicate.contains("line 3"), "{duplicate}");
    }
}
