//! The client library: [`Producer`] publishes and awaits confirms, [`Consumer`] receives
//! deliveries and acks them. The CLI and the tests use it; it speaks only the contract.

mod connection;
mod consumer;
mod error;
mod producer;

pub use consumer::{Consumer, ConsumerOptions};
pub use error::ClientError;
pub use producer::{Producer, ProducerOptions, PublishOptions};
