//! The wire protocol of `../shared/protocol.md`, as pure encode and decode: no sockets, no
//! broker state. Both the broker and the client library build on it.
//!
//! - [`codec`]: length-prefixed framing, with the frame-size limit checked before a body
//!   is buffered.
//! - [`client_frame`]: what clients send (`register`, `publish`, `ack`): encoding for the
//!   client library and the broker's lenient-but-exact decoding.
//! - [`server_frame`]: what the broker sends (`ok`, `message`, `error`): hand-tuned
//!   encoding for the broker and decoding for the client library.
//! - `canonical`: the exact byte layouts of the hot frames, recognised without a JSON
//!   parser, with serde_json as the fallback for every other spelling.
//! - [`DeadLetter`]: the record a dead-lettered message carries.
//! - [`Attributes`]: what a 1.1 publish attaches to its message (its [`Headers`]).
//! - [`Version`]: the versions a `register` may ask for, and what it gets.
//! - [`QueueName`], [`MessageId`], [`ErrorCode`], [`Payload`]: the vocabulary shared by
//!   all of them.

mod attributes;
mod canonical;
pub mod client_frame;
pub mod codec;
mod dead_letter;
mod error_code;
mod payload;
mod queue_name;
pub mod server_frame;
mod version;

pub use attributes::{
    Attributes, HEADER_KEY_CHARS_MAX, HEADER_VALUE_BYTES_MAX, HEADERS_MAX, Headers,
};
pub use dead_letter::{DeadLetter, DeadLetterReason};
pub use error_code::ErrorCode;
pub use payload::Payload;
pub use queue_name::{InvalidQueueName, QueueName};
pub use version::Version;

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default `--max-frame-bytes`: the largest frame body a client may send.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 1_048_576;

/// Default `prefetch` of a consumer that does not ask for one.
pub const DEFAULT_PREFETCH: u16 = 100;

/// A message's id: unique within a broker, increasing in publish order, never changed by
/// redelivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageId(pub u64);

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The messages an `ack`, `nack` or `touch` names: its `id`, or its `ids` (version 1.1,
/// 1 to [`IDS_MAX`] of them, applied in order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ids {
    One(MessageId),
    Many(Box<[MessageId]>),
}

/// Most ids one `ids` array may hold.
pub const IDS_MAX: usize = 65_535;

/// Most entries a `publish_batch` may carry (contract §9).
pub const PUBLISH_BATCH_MAX: usize = 1000;

impl Ids {
    pub fn as_slice(&self) -> &[MessageId] {
        match self {
            Ids::One(id) => std::slice::from_ref(id),
            Ids::Many(ids) => ids,
        }
    }
}

/// A duration in whole milliseconds, as the protocol counts them (saturating: durations
/// past `u64::MAX` ms are as long as any).
pub fn whole_millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The highest priority a message can have (rule 10); 0 is the lowest and the default.
pub const PRIORITY_MAX: u8 = 9;

/// When a published message may first be delivered (version 1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    Now,
    /// This long after the broker accepts it (`delay_ms`).
    After(Duration),
    /// Not before this time, in milliseconds since the Unix epoch (`not_before`): a time
    /// in the past means now.
    At(u64),
}

/// What a connection registered as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Producer,
    Consumer,
}

impl Role {
    /// The name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Producer => "producer",
            Role::Consumer => "consumer",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
