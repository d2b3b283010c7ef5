//! Settings of a broker, with the contract's defaults.

use std::net::SocketAddr;
use std::time::Duration;

use super::auth::Access;
use super::core::{CoreConfig, WallClock};
use super::policy::{PolicyFile, QueuePolicy};
use crate::protocol::DEFAULT_MAX_FRAME_BYTES;
use crate::storage::StorageConfig;
use crate::transport::ServerTls;

/// Default `--addr`.
pub const DEFAULT_ADDR: &str = "127.0.0.1:7878";
/// Default `--ack-timeout`.
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `--drain-timeout`.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest `--drain-timeout`: a year, which keeps the drain's deadline computable.
pub const DRAIN_TIMEOUT_MAX: Duration = Duration::from_secs(365 * 24 * 3600);
/// Default `--max-memory`: 1 GiB of queued payload bytes.
pub const DEFAULT_MAX_MEMORY_BYTES: u64 = 1 << 30;
/// Default `--max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// How long a new connection has to register (contract §5, `register_timeout`).
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything a broker needs to know to run.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub addr: SocketAddr,
    /// The ack timeout of every queue whose policy does not set one.
    pub ack_timeout: Duration,
    /// The queue tables of `--config`.
    pub queue_policies: PolicyFile,
    pub drain_timeout: Duration,
    pub max_frame_bytes: usize,
    pub max_memory_bytes: u64,
    pub max_connections: usize,
    /// The contract fixes this at 10 s; tests of the library shorten it.
    pub register_timeout: Duration,
    pub access: Access,
    /// The durable log; `None` keeps messages in memory only.
    pub storage: Option<StorageConfig>,
    /// TLS for every connection; `None` is plain TCP.
    pub tls: Option<ServerTls>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            addr: DEFAULT_ADDR.parse().expect("the default address parses"),
            ack_timeout: DEFAULT_ACK_TIMEOUT,
            queue_policies: PolicyFile::default(),
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            max_memory_bytes: DEFAULT_MAX_MEMORY_BYTES,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            register_timeout: REGISTER_TIMEOUT,
            access: Access::Open,
            storage: None,
            tls: None,
        }
    }
}

impl BrokerConfig {
    pub(crate) fn core(&self) -> CoreConfig {
        CoreConfig {
            policies: self
                .queue_policies
                .resolve(&QueuePolicy::new(self.ack_timeout)),
            max_memory_bytes: self.max_memory_bytes,
            wall_clock: WallClock::now(),
        }
    }
}
