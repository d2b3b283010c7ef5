//! One client connection's task: the shell around its [`Session`]. It reads and writes
//! the socket in one poll step, gives the session what it read and what the core task
//! sent, passes the session's commands on to the core task, sleeps until the session's
//! next timeout, and closes the socket the way the session ended. Every rule (reply
//! order, fatal errors, bounds, the end) is the session's.
//!
//! Closing: after a fatal error the connection shuts its write side and reads (and
//! discards) for a moment before closing, so a client that was still sending sees the
//! error frame instead of a connection reset. Every shutdown of the write side has a
//! deadline: over TLS it first flushes what rustls buffered (the session counts bytes as
//! written once rustls took them), which a client that does not read would make wait
//! forever.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::commands::{Command, ConnectionId, REQUEST_BYTES_MAX, Request, ToConnection};
use super::metrics::BrokerMetrics;
use super::session::{Ending, SHUTDOWN_FLUSH_TIMEOUT, Session};
use super::sleep_until;
use crate::transport::{Progress, Stream, poll_io};

/// How long, and how much, to read and discard after a fatal error before closing.
const LINGER_TIMEOUT: Duration = Duration::from_secs(1);
const LINGER_BYTES_MAX: usize = 4 << 20;

pub(crate) struct Connection {
    id: ConnectionId,
    stream: Stream,
    session: Session,
    metrics: Arc<BrokerMetrics>,
    core: mpsc::Sender<Request>,
    /// Payload bytes requests on their way to the core may hold, shared by every
    /// connection ([`REQUEST_BYTES_MAX`]).
    request_bytes: Arc<Semaphore>,
    /// Where the core task sends this connection's replies and deliveries: the sender
    /// goes to the core task with the register.
    route: mpsc::UnboundedSender<ToConnection>,
    from_core: mpsc::UnboundedReceiver<ToConnection>,
    /// Whether this connection is counted in the throttled-connections figure.
    throttled: bool,
}

impl Connection {
    pub fn new(
        id: ConnectionId,
        stream: Stream,
        session: Session,
        metrics: Arc<BrokerMetrics>,
        core: mpsc::Sender<Request>,
        request_bytes: Arc<Semaphore>,
    ) -> Self {
        let (route, from_core) = mpsc::unbounded_channel();
        Connection {
            id,
            stream,
            session,
            metrics,
            core,
            request_bytes,
            route,
            from_core,
            throttled: false,
        }
    }

    /// Serves the connection until its session ends, then closes it. `close_all` ends it
    /// at the end of the broker's drain.
    pub async fn run(mut self, close_all: CancellationToken) {
        let _ = self.stream.tcp().set_nodelay(true);
        let mut shutting_down = false;
        let ending = loop {
            if !self.send_commands().await && !shutting_down {
                // The core task is gone: the broker is shutting down.
                shutting_down = true;
                self.shut_down();
            }
            let throttled = self.session.is_throttled();
            self.set_throttled(throttled);
            if let Some(ending) = self.session.poll_end() {
                break ending;
            }
            let deadline = self.session.poll_timeout();
            let (read_buf, out, read_limit) = self.session.io_buffers();
            let stream = &mut self.stream;
            tokio::select! {
                biased;
                () = close_all.cancelled(), if !shutting_down => {
                    shutting_down = true;
                    self.shut_down();
                }
                Some(message) = self.from_core.recv() => {
                    let now = Instant::now().into_std();
                    self.session.handle_core(now, message);
                    while let Ok(more) = self.from_core.try_recv() {
                        self.session.handle_core(now, more);
                    }
                }
                progress = std::future::poll_fn(|cx| poll_io(cx, stream, read_buf, out, read_limit)) => {
                    match progress {
                        Err(e) => self.session.handle_broken(e),
                        Ok(Progress { read, wrote }) => {
                            self.session.handle_io(Instant::now().into_std(), read, wrote);
                            if read.is_some_and(|n| n > 0) {
                                // One read per turn: a client that keeps its socket full
                                // would otherwise be served until tokio's budget runs out,
                                // while the consumers that drain the queues wait.
                                tokio::task::yield_now().await;
                            }
                        }
                    }
                }
                () = sleep_until(deadline) => self.session.handle_timeout(Instant::now().into_std()),
            }
        };
        self.set_throttled(false);
        self.close(ending).await;
    }

    /// Ends the session at the end of shutdown, after what the core task's last acts
    /// released to it: replies it owes come before the end.
    fn shut_down(&mut self) {
        let now = Instant::now().into_std();
        while let Ok(message) = self.from_core.try_recv() {
            self.session.handle_core(now, message);
        }
        self.session.handle_shutdown(now);
    }

    /// Passes the session's commands on to the core task; false if it is gone.
    async fn send_commands(&mut self) -> bool {
        let Some(commands) = self.session.poll_commands() else {
            return true;
        };
        let registers = commands
            .iter()
            .any(|command| matches!(command, Command::Register { .. }));
        let bytes: usize = commands.iter().map(Command::payload_bytes).sum();
        let budget = if bytes == 0 {
            None
        } else {
            let share = u32::try_from(bytes.min(REQUEST_BYTES_MAX)).unwrap_or(u32::MAX);
            match self.request_bytes.clone().acquire_many_owned(share).await {
                Ok(permit) => Some(permit),
                Err(_) => return false,
            }
        };
        let request = Request {
            conn: self.id,
            commands,
            route: registers.then(|| self.route.clone()),
            budget,
        };
        self.core.send(request).await.is_ok()
    }

    fn set_throttled(&mut self, throttled: bool) {
        if self.throttled != throttled {
            self.throttled = throttled;
            self.metrics.set_throttled(throttled);
            debug!(
                throttled,
                output_bytes = self.session.output_len(),
                "backpressure"
            );
        }
    }

    async fn close(mut self, ending: Ending) {
        match ending {
            Ending::Fatal => close_after_fatal_error(&mut self.stream).await,
            Ending::Shutdown => {
                shut_write_side(&mut self.stream).await;
                debug!("closed at the end of shutdown");
            }
            Ending::Broken(e) => debug!(error = %e, "connection failed"),
            Ending::PeerClosed => {
                shut_write_side(&mut self.stream).await;
                debug!("closed by the client");
            }
        }
    }
}

/// Shuts the write side of `stream`, giving up after [`SHUTDOWN_FLUSH_TIMEOUT`]; says
/// whether it was shut.
async fn shut_write_side(stream: &mut Stream) -> bool {
    matches!(
        tokio::time::timeout(SHUTDOWN_FLUSH_TIMEOUT, stream.shutdown()).await,
        Ok(Ok(()))
    )
}

/// Closes gracefully after a fatal error frame was written: shut the write side, then
/// read and discard briefly, so unread client bytes do not turn the close into a reset
/// that could destroy the error frame before the client reads it.
pub(crate) async fn close_after_fatal_error(stream: &mut Stream) {
    if !shut_write_side(stream).await {
        return;
    }
    let mut discarded = 0;
    let mut scratch = vec![0u8; 16 * 1024];
    let deadline = Instant::now() + LINGER_TIMEOUT;
    while discarded < LINGER_BYTES_MAX {
        match tokio::time::timeout_at(deadline, stream.read(&mut scratch)).await {
            Ok(Ok(n)) if n > 0 => discarded += n,
            _ => break,
        }
    }
    if discarded > 0 {
        debug!(discarded, "discarded client bytes after a fatal error");
    }
}
