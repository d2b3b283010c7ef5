//! The broker: the queue [`core`] state machine and the tokio shell around it.
//!
//! - [`core`]: queues, round-robin, in-flight set, deadlines, drain. No I/O, no clock.
//! - `gate`: the rules around the core, no I/O either: commands applied, the log
//!   written, and replies and deliveries held until what they stand for is durable
//!   (`held_replies`).
//! - `core_task`: the single task that owns the gate and talks to connections by channel
//!   (`commands` are what they say to each other).
//! - `session`: a connection's protocol state, no I/O: reply order, fatal errors, the
//!   bounds on what a client can make the broker hold.
//! - `connection`: one task per client socket, the shell around its session.
//! - [`server`]: the listener, the connection limit, signals to shutdown and the drain.
//! - [`auth`]: the `--auth-file` grants.
//! - [`policy`]: the queue policies of `--config`.
//! - [`metrics`]: live figures, readable from any thread.
//! - [`config`]: the broker's settings and the contract's defaults.

pub mod auth;
mod commands;
pub mod config;
mod connection;
pub mod core;
mod core_task;
mod gate;
mod held_replies;
pub mod metrics;
pub mod policy;
mod queue_pattern;
pub mod server;
mod session;

pub use commands::ConnectionId;
pub use config::BrokerConfig;
pub use core_task::{ShutdownReport, StorageFailed};
pub use server::{BrokerError, Server};

/// Sleeps until `deadline`, or forever without one: a `select!` branch that is armed
/// only while there is something to wait for.
pub(crate) async fn sleep_until(deadline: Option<impl Into<tokio::time::Instant>>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
