//! The subcommands of the `ferry` binary, one module each, over the library.

pub mod bench;
pub mod broker;
pub mod consumer;
pub mod producer;

use ferry::broker::config::DEFAULT_ADDR;

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

/// The client flags, resolved: where to connect, which queue, and as whom.
pub struct ClientTarget {
    pub addr: String,
    pub queue: String,
    pub token: Option<String>,
    pub tls: Option<ferry::transport::ClientTls>,
}

impl ClientArgs {
    /// Resolves the flags, reading the TLS trust they name.
    pub fn resolve(self) -> anyhow::Result<ClientTarget> {
        Ok(ClientTarget {
            tls: self.security.tls()?,
            token: self.security.token,
            addr: self.addr,
            queue: self.queue,
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
