//! The subcommands of the `ferry` binary, one module each, over the library.

pub mod bench;
pub mod broker;
pub mod consumer;
pub mod producer;

use ferry::broker::config::DEFAULT_ADDR;

/// The broker address flag shared by the clients.
#[derive(clap::Args, Debug)]
pub struct ClientArgs {
    /// Broker address, host:port.
    #[arg(long, env = "FERRY_ADDR", default_value = DEFAULT_ADDR)]
    pub addr: String,
    /// Queue name: 1-255 characters of [A-Za-z0-9._-].
    #[arg(long, default_value = "default")]
    pub queue: String,
    /// Token for a broker started with --auth-file.
    #[arg(long, env = "FERRY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}
