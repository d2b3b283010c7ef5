//! One client connection: turns the frames it reads into commands for the core task, and
//! the core's replies and deliveries into frames. It holds no queue state of its own.
//!
//! Ordering: contract §5 wants every publish and every unparsable frame answered in
//! order. Errors found here (bad frames, wrong role) are answered at once when nothing
//! is waiting on the core, and otherwise wait in `unanswered` behind the replies that
//! must precede them.
//!
//! Backpressure: the connection stops reading from its client while its unwritten output
//! or its unanswered commands pass a bound. A client that never reads its replies then
//! fills its own socket buffers, not the broker's memory, and slows nobody else.
//!
//! Closing: after a fatal error the connection sends the error frame, shuts its write
//! side and reads (and discards) for a moment before closing, so a client that was still
//! sending sees the error frame instead of a connection reset.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;
use tracing::{Span, debug, field, info};

use super::auth::Access;
use super::core_task::{Command, ConnectionId, Reply, Request, ToConnection};
use super::metrics::BrokerMetrics;
use super::sleep_until;
use crate::protocol::client_frame::{FrameType, InboundFrame};
use crate::protocol::codec::{FrameDecoder, FrameError};
use crate::protocol::server_frame::ServerFrame;
use crate::protocol::{ErrorCode, Payload, Role};
use crate::transport::{Progress, Stream, poll_io};

/// What every connection of a broker shares.
#[derive(Debug)]
pub(crate) struct ConnectionSettings {
    pub max_frame_bytes: usize,
    pub register_timeout: Duration,
    pub access: Access,
}

/// Unwritten output beyond which the connection stops reading from its client.
const OUTPUT_BYTES_MAX: usize = 256 * 1024;
/// Commands awaiting the core beyond which the connection stops reading.
const UNANSWERED_MAX: usize = 16_384;
/// Bytes asked of the socket per read by a busy connection.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Bytes asked per read by a connection whose reads do not fill what it asks for. Idle
/// connections are most connections; at 64 KiB each, ten thousand of them held 700 MB.
const QUIET_READ_BYTES: usize = 2 * 1024;
/// Capacity beyond which an empty buffer is given back when its connection goes quiet.
const IDLE_BUFFER_BYTES_MAX: usize = 8 * 1024;
/// How long an ending connection may take to write its last frames.
const FINAL_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to flush when the broker closes every connection at the end of shutdown.
const SHUTDOWN_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);
/// How long, and how much, to read and discard after a fatal error before closing.
const LINGER_TIMEOUT: Duration = Duration::from_secs(1);
const LINGER_BYTES_MAX: usize = 4 << 20;

/// A reply owed to the client, in the order the client is owed them.
enum Slot {
    /// The core's reply to a command sent to it.
    Core,
    /// An error frame produced here, already encoded.
    Local(Bytes),
}

/// Why a connection is ending (or has ended).
#[derive(Debug)]
enum Ending {
    /// The client closed its side; answer what it sent, then close.
    PeerClosed,
    /// A fatal error frame is queued; send it, then close.
    Fatal,
    /// The broker's drain is over.
    Shutdown,
    /// The socket failed.
    Broken(io::Error),
}

pub(crate) struct Connection {
    id: ConnectionId,
    stream: Stream,
    settings: Arc<ConnectionSettings>,
    metrics: Arc<BrokerMetrics>,
    core: mpsc::Sender<Request>,
    outbound_tx: mpsc::UnboundedSender<ToConnection>,
    outbound_rx: mpsc::UnboundedReceiver<ToConnection>,
    decoder: FrameDecoder,
    read_buf: BytesMut,
    /// Whether the last read filled the space it was given: the peer has more to send.
    reads_fill: bool,
    write_buf: BytesMut,
    role: Option<Role>,
    unanswered: VecDeque<Slot>,
    ending: Option<Ending>,
    /// Whether the core has been told this connection is gone.
    disconnected: bool,
    /// Whether reading is paused because the client is not taking its output.
    throttled: bool,
}

impl Connection {
    pub fn new(
        id: ConnectionId,
        stream: Stream,
        settings: Arc<ConnectionSettings>,
        metrics: Arc<BrokerMetrics>,
        core: mpsc::Sender<Request>,
    ) -> Self {
        let (outbound_tx, outbound_rx) = mpsc::unbounded_channel();
        let decoder = FrameDecoder::new(settings.max_frame_bytes);
        Connection {
            id,
            stream,
            settings,
            metrics,
            core,
            outbound_tx,
            outbound_rx,
            decoder,
            read_buf: BytesMut::new(),
            reads_fill: false,
            write_buf: BytesMut::new(),
            role: None,
            unanswered: VecDeque::new(),
            ending: None,
            disconnected: false,
            throttled: false,
        }
    }

    /// Serves the connection until it ends, then closes it. `close_all` ends it early,
    /// at the end of the broker's drain; a connection still unregistered at
    /// `register_deadline` gets `register_timeout`.
    pub async fn run(mut self, close_all: CancellationToken, register_deadline: Instant) {
        let _ = self.stream.tcp().set_nodelay(true);
        let mut flush_deadline = None;
        let ending = loop {
            if self.ending.is_some() {
                flush_deadline.get_or_insert_with(|| Instant::now() + FINAL_FLUSH_TIMEOUT);
                if self.unanswered.is_empty() && self.write_buf.is_empty() {
                    break self.ending.take();
                }
            }
            let backlogged =
                self.write_buf.len() >= OUTPUT_BYTES_MAX || self.unanswered.len() >= UNANSWERED_MAX;
            self.set_throttled(backlogged && self.ending.is_none());
            let accepts_input = self.ending.is_none() && !backlogged;
            if accepts_input {
                self.size_read_buffer();
            }
            tokio::select! {
                biased;
                () = close_all.cancelled() => break Some(Ending::Shutdown),
                Some(message) = self.outbound_rx.recv() => {
                    self.on_outbound(message);
                    while let Ok(more) = self.outbound_rx.try_recv() {
                        self.on_outbound(more);
                    }
                }
                progress = std::future::poll_fn(|cx| {
                    poll_io(cx, &mut self.stream, &mut self.read_buf, &mut self.write_buf, accepts_input)
                }) => {
                    match progress {
                        Err(e) => break Some(Ending::Broken(e)),
                        Ok(Progress { read: Some(0), .. }) => {
                            self.ending = Some(Ending::PeerClosed);
                            // A consumer's messages go back at once, not when the flush is done.
                            self.disconnect_from_core().await;
                        }
                        Ok(Progress { read: Some(n), .. }) => {
                            self.reads_fill = self.read_buf.capacity() == self.read_buf.len() && n > 0;
                            if let Err(ending) = self.handle_input().await {
                                break Some(ending);
                            }
                            // One read per turn: a client that keeps its socket full would
                            // otherwise be served until tokio's budget runs out, while the
                            // consumers that drain the queues wait.
                            tokio::task::yield_now().await;
                        }
                        Ok(Progress { read: None, .. }) => {}
                    }
                }
                () = tokio::time::sleep_until(register_deadline), if self.role.is_none() && self.ending.is_none() => {
                    let seconds = self.settings.register_timeout.as_secs_f64();
                    self.fatal(ErrorCode::RegisterTimeout, &format!("no register within {seconds} s of connecting"));
                }
                () = sleep_until(flush_deadline) => {
                    debug!("client did not take its last frames in time");
                    break self.ending.take();
                }
            }
        };
        self.set_throttled(false);
        self.close(ending).await;
    }

    /// Gives the next read room to match the connection's pace: a full 64 KiB chunk while
    /// its reads fill what they get, a small one otherwise; and hands back the big, empty
    /// read buffer of a connection that has gone quiet. (The write buffer is large only
    /// for connections with large output, and freeing it between their bursts cost 25%
    /// more CPU with 16 KiB payloads.)
    fn size_read_buffer(&mut self) {
        if self.reads_fill {
            self.read_buf.reserve(READ_CHUNK_BYTES);
            return;
        }
        if self.read_buf.is_empty() && self.read_buf.capacity() > IDLE_BUFFER_BYTES_MAX {
            self.read_buf = BytesMut::new();
        }
        self.read_buf.reserve(QUIET_READ_BYTES);
    }

    fn set_throttled(&mut self, throttled: bool) {
        if self.throttled != throttled {
            self.throttled = throttled;
            self.metrics.set_throttled(throttled);
            debug!(
                throttled,
                output_bytes = self.write_buf.len(),
                unanswered = self.unanswered.len(),
                "backpressure"
            );
        }
    }

    /// Handles every whole frame the last read completed.
    async fn handle_input(&mut self) -> Result<(), Ending> {
        let mut commands = Vec::new();
        while self.ending.is_none() {
            match self.decoder.decode(&mut self.read_buf) {
                Ok(Some(body)) => self.handle_frame(&body, &mut commands),
                Ok(None) => break,
                Err(FrameError::Io(e)) => return Err(Ending::Broken(e)),
                Err(refusal) => self.fatal(ErrorCode::FrameTooLarge, &refusal.to_string()),
            }
        }
        if !commands.is_empty() {
            let request = Request {
                conn: self.id,
                commands,
            };
            self.core
                .send(request)
                .await
                .map_err(|_| Ending::Shutdown)?;
        }
        Ok(())
    }

    fn handle_frame(&mut self, body: &[u8], commands: &mut Vec<Command>) {
        let Some(role) = self.role else {
            self.handle_register(body, commands);
            return;
        };
        let frame = match InboundFrame::parse(body) {
            Ok(frame) => frame,
            Err(invalid) => return self.refuse(ErrorCode::InvalidFrame, &invalid.to_string()),
        };
        let command = match (frame.frame_type(), role) {
            (FrameType::Register, _) => {
                let message = format!(
                    "this connection is already registered as a {role}; open another connection for another role or queue"
                );
                return self.refuse(ErrorCode::AlreadyRegistered, &message);
            }
            (FrameType::Publish, Role::Producer) => match frame.publish_payload() {
                Ok(literal) => Command::Publish(Payload::from_validated(literal)),
                Err(invalid) => return self.refuse(ErrorCode::InvalidFrame, &invalid.to_string()),
            },
            (FrameType::Ack, Role::Consumer) => match frame.ack_id() {
                Ok(id) => Command::Ack(id),
                Err(invalid) => return self.refuse(ErrorCode::InvalidFrame, &invalid.to_string()),
            },
            (FrameType::Publish, Role::Consumer) => {
                return self.refuse(
                    ErrorCode::WrongRole,
                    "a consumer cannot publish; open a producer connection",
                );
            }
            (FrameType::Ack, Role::Producer) => {
                return self.refuse(
                    ErrorCode::WrongRole,
                    "a producer cannot ack; acks come from the consumer the message was delivered to",
                );
            }
        };
        commands.push(command);
        self.unanswered.push_back(Slot::Core);
    }

    fn handle_register(&mut self, body: &[u8], commands: &mut Vec<Command>) {
        let register = InboundFrame::parse(body).and_then(|frame| match frame.frame_type() {
            FrameType::Register => frame.register(),
            _ => Err(crate::protocol::client_frame::InvalidFrame::BadField {
                field: "type",
                problem: "must be \"register\" on the first frame".into(),
            }),
        });
        let register = match register {
            Ok(register) => register,
            Err(invalid) => {
                let message = format!("the first frame must be a valid register: {invalid}");
                return self.fatal(ErrorCode::NotRegistered, &message);
            }
        };
        if let Err(denied) =
            self.settings
                .access
                .check(register.token.as_deref(), register.role, &register.queue)
        {
            return self.fatal(ErrorCode::Unauthorized, &denied.to_string());
        }
        let span = Span::current();
        span.record("role", field::display(register.role));
        span.record("queue", field::display(&register.queue));
        match register.role {
            Role::Consumer => info!(prefetch = register.prefetch, "registered"),
            Role::Producer => info!("registered"),
        }
        self.role = Some(register.role);
        commands.push(Command::Register {
            role: register.role,
            queue: register.queue,
            prefetch: register.prefetch,
            outbound: self.outbound_tx.clone(),
        });
        self.unanswered.push_back(Slot::Core);
    }

    fn on_outbound(&mut self, message: ToConnection) {
        match message {
            ToConnection::Replies(replies) => {
                for reply in replies {
                    let slot = self.unanswered.pop_front();
                    debug_assert!(matches!(slot, Some(Slot::Core)), "reply without a command");
                    match reply {
                        Reply::Registered => ServerFrame::Registered.encode(&mut self.write_buf),
                        Reply::Published(id) => {
                            ServerFrame::Published(id).encode(&mut self.write_buf)
                        }
                        Reply::Acked => {}
                        Reply::Refused { code, message, id } => {
                            debug!(%code, %message, "refused");
                            ServerFrame::Error {
                                code,
                                message: &message,
                                id,
                            }
                            .encode(&mut self.write_buf);
                        }
                    }
                    while let Some(Slot::Local(_)) = self.unanswered.front() {
                        if let Some(Slot::Local(frame)) = self.unanswered.pop_front() {
                            self.write_buf.extend_from_slice(&frame);
                        }
                    }
                }
            }
            ToConnection::Deliveries(deliveries) => {
                for delivery in &deliveries {
                    ServerFrame::Delivery {
                        id: delivery.id,
                        payload: &delivery.payload,
                        attempt: delivery.attempt,
                    }
                    .encode(&mut self.write_buf);
                }
            }
        }
    }

    /// Answers with a non-fatal error, in its place in the reply order.
    fn refuse(&mut self, code: ErrorCode, message: &str) {
        debug!(%code, message, "refused");
        let frame = ServerFrame::Error {
            code,
            message,
            id: None,
        };
        if self.unanswered.is_empty() {
            frame.encode(&mut self.write_buf);
        } else {
            let mut encoded = BytesMut::new();
            frame.encode(&mut encoded);
            self.unanswered.push_back(Slot::Local(encoded.freeze()));
        }
    }

    /// Answers with a fatal error and stops reading: the connection closes once it and
    /// every reply before it are written.
    fn fatal(&mut self, code: ErrorCode, message: &str) {
        info!(%code, message, "closing the connection");
        self.refuse(code, message);
        self.ending = Some(Ending::Fatal);
    }

    async fn disconnect_from_core(&mut self) {
        if self.role.is_some() && !self.disconnected {
            self.disconnected = true;
            let request = Request {
                conn: self.id,
                commands: vec![Command::Disconnect],
            };
            // If the core task is gone, the broker is shutting down and nothing is owed.
            let _ = self.core.send(request).await;
        }
    }

    async fn close(mut self, ending: Option<Ending>) {
        self.disconnect_from_core().await;
        match ending {
            Some(Ending::Fatal) => close_after_fatal_error(&mut self.stream).await,
            Some(Ending::Shutdown) => {
                // The core task's last act may have been to release confirms to us.
                while let Ok(message) = self.outbound_rx.try_recv() {
                    self.on_outbound(message);
                }
                let _ = timeout(
                    SHUTDOWN_FLUSH_TIMEOUT,
                    self.stream.write_all_buf(&mut self.write_buf),
                )
                .await;
                let _ = self.stream.shutdown().await;
                debug!("closed at the end of shutdown");
            }
            Some(Ending::Broken(e)) => debug!(error = %e, "connection failed"),
            Some(Ending::PeerClosed) | None => debug!("closed by the client"),
        }
    }
}

/// Closes gracefully after a fatal error frame was written: shut the write side, then
/// read and discard briefly, so unread client bytes do not turn the close into a reset
/// that could destroy the error frame before the client reads it.
pub(crate) async fn close_after_fatal_error(stream: &mut Stream) {
    if stream.shutdown().await.is_err() {
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
