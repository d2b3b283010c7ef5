//! The broker: the queue [`core`] state machine and the tokio shell around it.
//!
//! - [`core`]: queues, round-robin, in-flight set, deadlines, drain. No I/O, no clock.
//! - `core_task`: the single task that owns the core and talks to connections by channel;
//!   with `--data-dir` it also drives the log and holds confirms until they are durable
//!   (`held_replies`).
//! - `connection`: one task per client socket; frames in, commands out, and back.
//! - [`server`]: the listener, the connection limit, signals to shutdown and the drain.
//! - [`auth`]: the `--auth-file` grants.
//! - [`metrics`]: live figures, readable from any thread.
//! - [`config`]: the broker's settings and the contract's defaults.

pub mod auth;
pub mod config;
mod connection;
pub mod core;
mod core_task;
mod held_replies;
pub mod metrics;
pub mod server;

pub use config::BrokerConfig;
pub use core_task::{ConnectionId, ShutdownReport, StorageFailed};
pub use server::{BrokerError, Server};

/// Sleeps until `deadline`, or forever without one: a `select!` branch that is armed
/// only while there is something to wait for.
pub(crate) async fn sleep_until(deadline: Option<impl Into<tokio::time::Instant>>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
