//! Ferry: an at-least-once work-queue broker, its client library and its wire protocol.
//!
//! Map of the crate:
//! - [`protocol`]: framing and frames of `docs/PROTOCOL.md`; pure encode/decode.
//! - [`broker`]: the broker. [`broker::core`] is the queue logic as a synchronous state
//!   machine (no I/O, no clock); the rest of the module is the tokio shell that turns
//!   sockets into calls on it ([`broker::Server`] is the entry point).
//! - [`client`]: [`Producer`] and [`Consumer`], used by the CLI and the tests.
//! - [`storage`]: the durable log under `--data-dir`: segments, group commit, recovery.
//! - [`transport`]: plain TCP or TLS streams, for the broker and the clients.
//! - `fuzz_checks`: the properties the fuzz targets check, shared with the test that
//!   replays their corpora.
//!
//! The `ferry` binary (`src/main.rs`) is the command line over all of it.

pub mod broker;
pub mod client;
#[doc(hidden)]
pub mod fuzz_checks;
pub mod protocol;
pub mod storage;
pub mod transport;

pub use client::{
    ClientError, Consumer, ConsumerOptions, Producer, ProducerOptions, PublishOptions,
};
pub use protocol::server_frame::{BrokerError, Message};
pub use protocol::{ErrorCode, MessageId};
