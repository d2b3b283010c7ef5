//! The listener: accepts connections up to `--max-connections`, gives each its task, and
//! runs the graceful shutdown of contract §6 when the shutdown token is cancelled: stop
//! accepting, let the core task drain, then close every connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, field, info, info_span, warn};

use super::commands::{ConnectionId, REQUEST_BYTES_MAX, Request};
use super::config::BrokerConfig;
use super::connection::{Connection, close_after_fatal_error};
use super::core::WallClock;
use super::core_task::{CoreTask, ShutdownReport, StorageFailed};
use super::metrics::BrokerMetrics;
use super::policy::Policies;
use super::session::{ConnectionSettings, Session};
use crate::protocol::ErrorCode;
use crate::protocol::server_frame::ServerFrame;
use crate::storage::{Storage, StorageError};
use crate::transport::{AcceptError, ServerTls, Stream};

/// Pending connections the kernel may queue for accept (it caps this at somaxconn).
const LISTEN_BACKLOG: u32 = 8192;
/// Capacity, in batches, of the channel from connections to the core task.
const CORE_CHANNEL_BATCHES: usize = 1024;
/// How long to wait before accepting again after accept fails (out of file descriptors,
/// say), so the failure does not spin a core.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);
/// How long a refused connection may take to receive its error frame.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// Most refusals being written at once; in a flood beyond it, excess connections are
/// closed without an error frame rather than each holding a task and a descriptor.
const REFUSALS_MAX: usize = 256;

/// Why a broker could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the queue core task failed: {0}")]
    CoreTask(#[from] tokio::task::JoinError),
    #[error(transparent)]
    OpenStorage(#[from] StorageError),
    #[error(transparent)]
    Storage(#[from] StorageFailed),
}

/// A bound, not yet running, broker: its log recovered into its core, its socket bound.
pub struct Server {
    listener: TcpListener,
    config: BrokerConfig,
    metrics: Arc<BrokerMetrics>,
    core_task: CoreTask,
    core_tx: mpsc::Sender<Request>,
    /// The core's queue policies and wall clock, which sessions check frames against.
    policies: Policies,
    wall_clock: WallClock,
}

impl Server {
    /// Opens and recovers the durable log, if configured, restores its messages into the
    /// core, then binds the listening socket: a broker listens only once it holds every
    /// message. Whatever recovery allocated on the way is freed when this returns.
    ///
    /// # Errors
    /// [`BrokerError::OpenStorage`] when the log cannot be opened or is damaged;
    /// [`BrokerError::Bind`] when the address cannot be bound.
    pub async fn bind(config: BrokerConfig) -> Result<Server, BrokerError> {
        let storage = match &config.storage {
            Some(storage_config) => {
                let storage_config = storage_config.clone();
                let opened =
                    tokio::task::spawn_blocking(move || Storage::open(&storage_config)).await??;
                let recovered = &opened.recovered;
                info!(
                    messages = recovered.messages.len(),
                    segments = recovered.segments.len(),
                    records = recovered.records,
                    next_id = recovered.next_id,
                    truncated_bytes = recovered.truncated_bytes,
                    skipped_bytes = recovered.skipped_bytes,
                    ms = opened.recovery_time.as_millis() as u64,
                    "recovered the log"
                );
                Some(opened)
            }
            None => None,
        };
        let metrics = Arc::<BrokerMetrics>::default();
        let (core_tx, core_rx) = mpsc::channel(CORE_CHANNEL_BATCHES);
        let core_config = config.core();
        let (policies, wall_clock) = (core_config.policies.clone(), core_config.wall_clock);
        let core_task = CoreTask::new(
            core_config,
            config.drain_timeout,
            core_rx,
            metrics.clone(),
            storage,
        );
        let listener = listen(config.addr).map_err(|source| BrokerError::Bind {
            addr: config.addr,
            source,
        })?;
        Ok(Server {
            listener,
            config,
            metrics,
            core_task,
            core_tx,
            policies,
            wall_clock,
        })
    }

    /// Live figures of this broker, valid before, during and after [`Server::run`].
    pub fn metrics(&self) -> Arc<BrokerMetrics> {
        self.metrics.clone()
    }

    /// The address actually bound (the port is chosen by the OS for port 0).
    ///
    /// # Errors
    /// The OS error, which does not happen for a bound TCP listener.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` is cancelled, then drains and closes every connection.
    ///
    /// # Errors
    /// [`BrokerError::CoreTask`] if the core task panicked.
    pub async fn run(self, shutdown: CancellationToken) -> Result<ShutdownReport, BrokerError> {
        let Server {
            listener,
            config,
            metrics,
            core_task,
            core_tx,
            policies,
            wall_clock,
        } = self;
        let mut core_task = tokio::spawn(core_task.run(shutdown.clone()));
        let settings = Arc::new(ConnectionSettings {
            max_frame_bytes: config.max_frame_bytes,
            register_timeout: config.register_timeout,
            access: config.access.clone(),
            policies,
            wall_clock,
        });
        let slots = Arc::new(Semaphore::new(config.max_connections));
        let request_bytes = Arc::new(Semaphore::new(REQUEST_BYTES_MAX));
        let refusal_slots = Arc::new(Semaphore::new(REFUSALS_MAX));
        let close_all = CancellationToken::new();
        let connections = TaskTracker::new();
        let mut next_id = 0u64;

        // The core task ends early only when the log fails: the broker must then stop,
        // loudly, rather than take connections it can confirm nothing on.
        let mut ended_early = None;
        loop {
            let (tcp, peer) = tokio::select! {
                () = shutdown.cancelled() => break,
                outcome = &mut core_task => {
                    ended_early = Some(outcome);
                    break;
                }
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        warn!(error = %e, "accept failed; retrying shortly");
                        tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                        continue;
                    }
                },
            };
            next_id += 1;
            let id = ConnectionId(next_id);
            let span =
                info_span!("conn", id = %id, %peer, role = field::Empty, queue = field::Empty);
            let tls = config.tls.clone();
            match slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    // "Within 10 s of connecting": one deadline for the TLS handshake and
                    // the register both, not a fresh timeout for each.
                    let register_deadline = Instant::now() + settings.register_timeout;
                    let settings = settings.clone();
                    let core_tx = core_tx.clone();
                    let close_all = close_all.clone();
                    let metrics = metrics.clone();
                    let request_bytes = request_bytes.clone();
                    metrics.connection_opened();
                    connections.spawn(
                        async move {
                            if let Some(stream) =
                                open_stream(tcp, tls.as_ref(), register_deadline).await
                            {
                                let session = Session::new(settings, register_deadline.into_std());
                                Connection::new(
                                    id,
                                    stream,
                                    session,
                                    metrics.clone(),
                                    core_tx,
                                    request_bytes,
                                )
                                .run(close_all)
                                .await;
                            }
                            metrics.connection_closed();
                            drop(slot);
                        }
                        .instrument(span),
                    );
                }
                Err(_) => {
                    let max = config.max_connections;
                    if let Ok(refusal_slot) = refusal_slots.clone().try_acquire_owned() {
                        connections.spawn(
                            async move {
                                warn!(max_connections = max, "refused: too many connections");
                                if let Some(mut stream) = open_stream(tcp, tls.as_ref(), Instant::now() + REFUSAL_WRITE_TIMEOUT).await {
                                    let message = format!(
                                        "the broker already holds its maximum of {max} connections; retry later"
                                    );
                                    send_fatal(&mut stream, ErrorCode::TooManyConnections, &message).await;
                                }
                                drop(refusal_slot);
                            }
                            .instrument(span),
                        );
                    }
                }
            }
        }

        drop(listener);
        drop(core_tx);
        info!("stopped accepting connections");
        let outcome = match ended_early {
            Some(outcome) => outcome?,
            None => core_task.await?,
        };
        close_all.cancel();
        connections.close();
        connections.wait().await;
        let report = outcome?;
        let drain = report.drain;
        if report.completed {
            info!(
                delivered = drain.delivered,
                left_ready = drain.left_ready,
                left_delayed = drain.left_delayed,
                "drain complete"
            );
        } else {
            error!(
                delivered = drain.delivered,
                left_ready = drain.left_ready,
                left_in_flight = drain.left_in_flight,
                left_delayed = drain.left_delayed,
                "drain cut short"
            );
        }
        Ok(report)
    }
}

/// Binds a listening socket with a deep accept queue: a burst of connects larger than
/// tokio's default backlog (1,024) overflowed it, and every dropped connect waited a
/// second for its SYN to be retried.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The connection's stream: the socket itself, or TLS over it once the handshake is done.
/// A plaintext client on a TLS port is told so, in plaintext, and closed.
async fn open_stream(
    tcp: TcpStream,
    tls: Option<&ServerTls>,
    handshake_deadline: Instant,
) -> Option<Stream> {
    let Some(tls) = tls else {
        return Some(Stream::Plain(tcp));
    };
    match tokio::time::timeout_at(handshake_deadline, tls.accept(tcp)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(AcceptError::NotTls(tcp))) => {
            info!("refused: a plaintext client on a TLS port");
            let message = "this broker accepts TLS connections only; connect with TLS (ferry clients: --tls or --tls-ca)";
            send_fatal(&mut Stream::Plain(tcp), ErrorCode::NotRegistered, message).await;
            None
        }
        Ok(Err(AcceptError::Handshake(e))) => {
            info!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            info!("TLS handshake timed out");
            None
        }
    }
}

/// Sends a fatal error frame, then closes the connection gracefully.
async fn send_fatal(stream: &mut Stream, code: ErrorCode, message: &str) {
    let mut frame = BytesMut::new();
    ServerFrame::Error {
        code,
        message,
        id: None,
    }
    .encode(&mut frame);
    let written = async {
        stream.write_all(&frame).await?;
        stream.flush().await
    };
    if let Ok(Ok(())) = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, written).await {
        close_after_fatal_error(stream).await;
    }
}
