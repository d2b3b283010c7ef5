//! `ferry broker`: binds, logs `listening on ADDR`, serves until SIGINT or SIGTERM, drains,
//! exits 0. A second signal during the drain exits at once with status 130.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use bytesize::ByteSize;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use ferry::broker::Server;
use ferry::broker::auth::{Access, readable_by_others};
use ferry::broker::config::{
    BrokerConfig, DEFAULT_ADDR, DEFAULT_MAX_CONNECTIONS, DRAIN_TIMEOUT_MAX, REGISTER_TIMEOUT,
};
use ferry::broker::policy::{PolicyFile, QueuePolicy, check_ack_timeout};
use ferry::protocol::DEFAULT_MAX_FRAME_BYTES;
use ferry::storage::{FsyncPolicy, StorageConfig};
use ferry::transport::ServerTls;

/// Exit status after a second signal cut the drain short (128 + SIGINT).
const EXIT_INTERRUPTED: u8 = 130;

#[derive(clap::Args, Debug)]
pub struct BrokerArgs {
    /// Address to listen on; port 0 picks a free port (logged as `listening on ADDR`).
    #[arg(long, env = "FERRY_ADDR", default_value = DEFAULT_ADDR)]
    addr: SocketAddr,
    /// How long a delivered message may stay unacked before it is delivered again.
    /// 1ms to 365days.
    #[arg(long, default_value = "5s", value_parser = parse_ack_timeout)]
    ack_timeout: Duration,
    /// How long a graceful shutdown may wait for in-flight work before closing anyway
    /// (at most 365days).
    #[arg(long, default_value = "30s", value_parser = parse_drain_timeout)]
    drain_timeout: Duration,
    /// Largest frame body a client may send, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_FRAME_BYTES as u32, value_parser = clap::value_parser!(u32).range(1..))]
    max_frame_bytes: u32,
    /// Most payload bytes queued in all queues together (ready and in flight); publishes
    /// beyond it get `queue_full`. Takes units: 512MiB, 2GiB.
    #[arg(long, default_value = "1GiB")]
    max_memory: ByteSize,
    /// Most client connections at once; more get `too_many_connections`.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS as u32, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// TOML file of queue policies: [queue_defaults] and [queues."NAME"] tables (a NAME
    /// ending in * is a prefix). Keys: ack_timeout, max_deliveries, dead_letter_queue,
    /// discard_dead_letters.
    #[arg(long, env = "FERRY_CONFIG")]
    config: Option<PathBuf>,
    /// TOML file of [[grant]] entries (token, roles, queues); without it the broker is open.
    #[arg(long)]
    auth_file: Option<PathBuf>,
    /// PEM certificate chain: serve TLS only (with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Directory for the durable log: confirmed messages survive crashes and restarts.
    /// Without it, messages live in memory only.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// With --data-dir: `always` syncs the log before confirming a publish (survives power
    /// loss); `never` leaves it to the OS (survives a crash of the broker, not of the machine).
    #[arg(long, value_enum, default_value = "always", requires = "data_dir")]
    fsync: FsyncPolicy,
    /// With --data-dir: size at which the log starts a new segment file.
    #[arg(long, default_value = "64MiB", requires = "data_dir")]
    segment_size: ByteSize,
    /// With --data-dir: skip damaged bytes in the middle of the log instead of refusing to
    /// start. The messages in them are lost; every skip is logged.
    #[arg(long, requires = "data_dir")]
    repair: bool,
    /// Threads serving connections. 1 (the default) is a single event loop: the lowest
    /// latency and the most messages per CPU second. More spread connection work over
    /// cores, for machines where the broker has cores to itself.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    threads: u16,
}

impl BrokerArgs {
    pub fn threads(&self) -> usize {
        self.threads.into()
    }
}

fn describe_storage(storage: &Option<StorageConfig>) -> String {
    match storage {
        None => "in memory".into(),
        Some(storage) => format!(
            "durable in {} (fsync {})",
            storage.dir.display(),
            storage.fsync
        ),
    }
}

fn parse_ack_timeout(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| e.to_string())
        .and_then(check_ack_timeout)
}

fn parse_drain_timeout(text: &str) -> Result<Duration, String> {
    let timeout = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if timeout > DRAIN_TIMEOUT_MAX {
        return Err("is out of range; use at most 365days".into());
    }
    Ok(timeout)
}

pub async fn run(args: BrokerArgs) -> anyhow::Result<ExitCode> {
    if args.segment_size.as_u64() < 4096 {
        bail!(
            "--segment-size {} is too small; use at least 4KiB",
            args.segment_size
        );
    }
    let access = match &args.auth_file {
        Some(path) => {
            let access = Access::load(path)?;
            if readable_by_others(path) {
                warn!(path = %path.display(), "the auth file is readable by other users; chmod 600 it");
            }
            access
        }
        None => {
            info!("no --auth-file: the broker is open to every client");
            Access::Open
        }
    };
    let queue_policies = match &args.config {
        Some(path) => {
            let file = PolicyFile::load(path)?;
            info!(path = %path.display(), queue_tables = file.queue_tables(), "queue policies loaded");
            file
        }
        None => PolicyFile::default(),
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(ServerTls::from_pem_files(cert, key)?),
        _ => None,
    };
    let config = BrokerConfig {
        addr: args.addr,
        ack_timeout: args.ack_timeout,
        queue_policies,
        drain_timeout: args.drain_timeout,
        max_frame_bytes: args.max_frame_bytes as usize,
        max_memory_bytes: args.max_memory.as_u64(),
        max_connections: args.max_connections as usize,
        register_timeout: REGISTER_TIMEOUT,
        access,
        tls,
        storage: args.data_dir.clone().map(|dir| StorageConfig {
            dir,
            fsync: args.fsync,
            segment_bytes: args.segment_size.as_u64(),
            repair: args.repair,
        }),
    };

    // Signals are hooked before the broker says it is listening, so a signal sent as
    // soon as the line appears is never missed.
    let shutdown = CancellationToken::new();
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;

    let server = Server::bind(config.clone()).await?;
    if config.storage.is_some() {
        crate::release_freed_memory();
    }
    let addr = server
        .local_addr()
        .context("cannot read the bound address")?;
    let default_policy = config
        .queue_policies
        .default_policy(&QueuePolicy::new(config.ack_timeout));
    info!(
        ack_timeout = %humantime::format_duration(default_policy.ack_timeout),
        drain_timeout = %humantime::format_duration(config.drain_timeout),
        max_frame_bytes = config.max_frame_bytes,
        max_memory = %ByteSize(config.max_memory_bytes),
        max_connections = config.max_connections,
        storage = %describe_storage(&config.storage),
        tls = config.tls.is_some(),
        "broker ready"
    );
    info!("listening on {addr}");

    let mut serving = tokio::spawn(server.run(shutdown.clone()));
    tokio::select! {
        _ = interrupt.recv() => info!("SIGINT: draining; send it again to exit at once"),
        _ = terminate.recv() => info!("SIGTERM: draining; send SIGINT to exit at once"),
        // Only a failure ends the broker unasked (the log cannot be written): exit
        // non-zero at once, so that a supervisor sees it.
        ended = &mut serving => {
            ended.context("the broker task failed")??;
            bail!("the broker stopped without being asked to");
        }
    }
    shutdown.cancel();
    tokio::select! {
        report = serving => {
            let report = report.context("the broker task failed")??;
            let drain = report.drain;
            info!(
                "broker stopped: {} messages delivered during the drain, {} left ({} ready, {} in flight), and {} delayed",
                drain.delivered,
                drain.left_ready + drain.left_in_flight,
                drain.left_ready,
                drain.left_in_flight,
                drain.left_delayed
            );
            Ok(ExitCode::SUCCESS)
        }
        _ = interrupt.recv() => {
            error!("second SIGINT: exiting at once without finishing the drain");
            Ok(ExitCode::from(EXIT_INTERRUPTED))
        }
    }
}
