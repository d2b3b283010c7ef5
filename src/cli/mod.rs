//! The subcommands of the `ferry` binary, one module each, over the library.

pub mod bench;
pub mod broker;
pub mod consumer;
pub mod producer;

use ferry::broker::config::DEFAULT_ADDR;
use ferry::{ConsumerOptions, ProducerOptions};

/// Where the clients connect, and to which queue.
#[derive(clap::Args, Debug)]
pub struct ClientArgs {
    /// Broker address, host:port.
    #[arg(long, env = "FERRY_ADDR", default_value = DEFAULT_ADDR)]
    pub addr: String,
    /// Queue name: 1-255 characters of [A-Za-z0-9._-].
    #[arg(long, default_value = "default")]
    pub queue: String,
    #[command(flatten)]
    pub security: SecurityArgs,
}

/// How a client proves who it is and protects its connection: shared by the clients and
/// `ferry bench`.
#[derive(clap::Args, Debug)]
pub struct SecurityArgs {
    /// Token for a broker started with --auth-file.
    #[arg(long, env = "FERRY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Connect with TLS, trusting the system's root certificates.
    #[arg(long)]
    pub tls: bool,
    /// Connect with TLS, trusting the certificates in this PEM file (implies --tls).
    #[arg(long)]
    pub tls_ca: Option<std::path::PathBuf>,
}

impl ClientArgs {
    /// How `ferry producer` registers, from the flags (reading the TLS trust they name).
    pub fn producer_options(&self) -> anyhow::Result<ProducerOptions> {
        Ok(ProducerOptions {
            queue: self.queue.clone(),
            token: self.security.token.clone(),
            tls: self.security.tls()?,
            ..ProducerOptions::default()
        })
    }

    /// How `ferry consumer` registers with this prefetch, from the flags.
    pub fn consumer_options(&self, prefetch: u16) -> anyhow::Result<ConsumerOptions> {
        Ok(ConsumerOptions {
            queue: self.queue.clone(),
            prefetch,
            token: self.security.token.clone(),
            tls: self.security.tls()?,
            ..ConsumerOptions::default()
        })
    }
}

impl SecurityArgs {
    /// The TLS settings the flags ask for, if any.
    pub fn tls(&self) -> anyhow::Result<Option<ferry::transport::ClientTls>> {
        use ferry::transport::ClientTls;
        Ok(match (&self.tls_ca, self.tls) {
            (Some(ca), _) => Some(ClientTls::with_ca_file(ca)?),
            (None, true) => Some(ClientTls::with_system_roots()?),
            (None, false) => None,
        })
    }
}
