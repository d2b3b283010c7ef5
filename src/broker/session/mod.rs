//! A client connection's protocol state, as a state machine with no I/O and no clock of
//! its own (quinn-proto's `Connection` under quinn's): bytes read and messages from the
//! core go in; commands for the core, bytes to write, the next timeout and how the
//! connection ends come out. The shell (`connection`) only moves bytes and messages.
//!
//! What it decides, and where the rule is written once:
//! - **Reply order** (contract §5): every answered command and every refused frame gets
//!   its reply in the order the frames came. A refusal made here waits in `unanswered`
//!   behind the replies the core still owes.
//! - **Versions** (contract §8): what the register negotiated decides which frame types
//!   and fields exist and how deliveries are written. Every 1.1 field is checked here,
//!   against the queue's policy where it must be (`max_lease`, `max_delay`), so the core
//!   only ever sees valid requests.
//! - **Fatal errors**: [`ErrorCode::is_fatal`] is the one table; a fatal refusal stops
//!   reading, and the connection ends once it and everything before it are written.
//! - **Bounds**: output queued for the client (bytes encoded, plus a reservation of
//!   [`REPLY_RESERVE_BYTES`] for each reply the core owes, one per id of an `ids` frame)
//!   stops the reading of more frames at [`OUTPUT_BYTES_MAX`], so each frame read can
//!   add what it reserved at most; its
//!   deliveries are encoded only while the encoded output is under that bound, and the
//!   others wait, sharing their payloads with the core, while the core is told to pause
//!   deliveries; deliveries taken back by a timeout before they were written are
//!   dropped. Before register, input is limited to a register frame of at most
//!   [`REGISTER_FRAME_BYTES_MAX`]. docs/RELIABILITY.md states what this adds up to.
//! - **Ending**: a client that closes its side is answered in full before the
//!   connection closes (its consumer's messages go back at once); output that makes no
//!   progress for [`FINAL_FLUSH_TIMEOUT`] ends it anyway.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rustc_hash::FxHashMap;
use tokio_util::codec::Decoder;
use tracing::{Span, debug, field, info};

use super::auth::Access;
use super::commands::{Command, Reply, ToConnection};
use super::core::{Delivery, NackAction, NewMessage, WallClock};
use super::policy::{Policies, QueuePolicy};
use crate::protocol::client_frame::{FrameType, InboundFrame, InvalidFrame};
use crate::protocol::codec::{FrameDecoder, FrameError};
use crate::protocol::server_frame::{DeliveryDetails, LeaseField, PublishedAtField, ServerFrame};
use crate::protocol::{Due, ErrorCode, MessageId, Payload, Role, Version, whole_millis};

/// What every connection of a broker shares.
#[derive(Debug)]
pub(crate) struct ConnectionSettings {
    pub max_frame_bytes: usize,
    pub register_timeout: Duration,
    pub access: Access,
    /// The queues' policies, which 1.1 fields are checked against.
    pub policies: Policies,
    /// The core's wall clock: `not_before` is checked against it.
    pub wall_clock: WallClock,
}

/// Version 1.1: nack, touch, `ids`, delays, consumer leases, the full message frame.
const V1_1: Version = Version::V1_1;

/// Output a connection may queue for its client: encoded bytes plus what replies still
/// owed by the core reserve. Past it, no more frames are read; deliveries wait unencoded.
pub const OUTPUT_BYTES_MAX: usize = 256 * 1024;
/// What each reply the core owes reserves of [`OUTPUT_BYTES_MAX`]: no reply frame but a
/// publish_batch's is longer (error messages are cut to fit; a batch's reply reserves
/// [`BATCH_REPLY_BYTES_PER_ENTRY`] more per entry).
pub const REPLY_RESERVE_BYTES: usize = 256;

/// What each entry of a publish_batch adds to its reply, beyond [`REPLY_RESERVE_BYTES`]:
/// an id of up to 20 digits, a duplicate's index of up to 3, and their commas.
pub const BATCH_REPLY_BYTES_PER_ENTRY: usize = 26;
/// Largest first frame: a register with a 255-character queue name and a long token
/// needs far less; anything longer is refused before it is buffered.
pub const REGISTER_FRAME_BYTES_MAX: usize = 8 * 1024;
/// Bytes asked of the socket per read by a busy connection.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Bytes asked per read by a connection whose reads do not fill what it asks for. Idle
/// connections are most connections; at 64 KiB each, ten thousand of them held 700 MB.
const QUIET_READ_BYTES: usize = 2 * 1024;
/// Capacity beyond which an empty read buffer is given back when its connection goes
/// quiet.
const IDLE_BUFFER_BYTES_MAX: usize = 8 * 1024;
/// How long an ending connection's output may make no progress before it is dropped.
pub const FINAL_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to flush when the broker closes every connection at the end of shutdown.
pub const SHUTDOWN_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// A reply owed to the client, in the order the client is owed them.
#[derive(Debug)]
enum Slot {
    /// The core's reply to a command sent to it, and the output it reserves.
    Core(usize),
    /// The core's reply to an ack, nack or touch: an `unknown_id` error for each of
    /// these ids (last first), written as the output has room, so that one frame of
    /// 65,535 unknown ids never sits in the output whole. Keeps its reservation until
    /// written.
    UnknownIds {
        ids: Vec<MessageId>,
        /// More than one id came in its frame: the errors say it briefly.
        many: bool,
        reserved: usize,
    },
    /// An error frame produced here, already encoded.
    Local(Bytes),
}

/// Why a connection ends.
#[derive(Debug)]
pub(crate) enum Ending {
    /// The client closed its side; everything it was owed has been written.
    PeerClosed,
    /// A fatal error frame was written (the last frame): close gracefully, so that the
    /// client reads it rather than a reset.
    Fatal,
    /// The broker's drain is over.
    Shutdown,
    /// The socket failed, or the client stopped taking its output for too long.
    Broken(io::Error),
}

/// Deliveries not yet encoded, in arrival order. An entry can be dropped by id (taken
/// back by a timeout) before its turn: its id stays in `order` and is skipped.
#[derive(Debug, Default)]
struct PendingDeliveries {
    order: VecDeque<MessageId>,
    by_id: FxHashMap<MessageId, Delivery>,
}

impl PendingDeliveries {
    fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    fn push(&mut self, delivery: Delivery) {
        self.order.push_back(delivery.id);
        self.by_id.insert(delivery.id, delivery);
    }

    fn pop(&mut self) -> Option<Delivery> {
        while let Some(id) = self.order.pop_front() {
            if let Some(delivery) = self.by_id.remove(&id) {
                return Some(delivery);
            }
        }
        None
    }

    fn remove(&mut self, id: MessageId) {
        self.by_id.remove(&id);
        if self.by_id.is_empty() {
            self.order.clear();
        }
    }

    fn clear(&mut self) {
        self.order.clear();
        self.by_id.clear();
    }
}

pub(crate) struct Session {
    settings: Arc<ConnectionSettings>,
    decoder: FrameDecoder,
    read_buf: BytesMut,
    /// Whether the last read filled the space it was given: the peer has more to send.
    reads_fill: bool,
    /// The most the last I/O step was allowed to read.
    last_read_limit: usize,
    /// Whether complete frames may be left in `read_buf` (the last decode stopped for the
    /// output bound, not for want of bytes): no more is read until they are handled.
    frames_left: bool,
    out: BytesMut,
    role: Option<Role>,
    /// The version negotiated at register, when the register asked for one; `None` is
    /// 1.0 with the register's `ok` exactly as version 1.0 spells it.
    version: Option<Version>,
    /// The policy of the queue registered on.
    policy: Option<Arc<QueuePolicy>>,
    /// A 1.1 consumer's lease in ms, which its message frames show; `None` on 1.0
    /// connections, whose message frames have no details.
    delivery_lease: Option<LeaseField>,
    /// The `published_at` field of the last 1.1 message frame written.
    published_at: PublishedAtField,
    unanswered: VecDeque<Slot>,
    /// What the `Slot::Core` and `Slot::UnknownIds` entries in `unanswered` reserve.
    owed_bytes: usize,
    /// Bytes of the `Slot::Local` entries in `unanswered`.
    local_bytes: usize,
    pending: PendingDeliveries,
    /// Whether the core was told to pause deliveries.
    paused: bool,
    /// Commands for the core, not yet taken by the shell.
    commands: Vec<Command>,
    /// Set once the connection is ending; the end comes when `ended` is.
    ending: Option<Ending>,
    ended: bool,
    disconnect_sent: bool,
    register_deadline: Instant,
    /// When ending with output left to write: the time by which it must make progress
    /// (or, at shutdown, be written).
    flush_deadline: Option<Instant>,
}

impl Session {
    /// A session for a connection accepted at a time that makes `register_deadline` its
    /// deadline to register.
    pub fn new(settings: Arc<ConnectionSettings>, register_deadline: Instant) -> Session {
        let decoder = FrameDecoder::new(REGISTER_FRAME_BYTES_MAX.min(settings.max_frame_bytes));
        Session {
            settings,
            decoder,
            read_buf: BytesMut::new(),
            reads_fill: false,
            last_read_limit: 0,
            frames_left: false,
            out: BytesMut::new(),
            role: None,
            version: None,
            policy: None,
            delivery_lease: None,
            published_at: PublishedAtField::default(),
            unanswered: VecDeque::new(),
            owed_bytes: 0,
            local_bytes: 0,
            pending: PendingDeliveries::default(),
            paused: false,
            commands: Vec::new(),
            ending: None,
            ended: false,
            disconnect_sent: false,
            register_deadline,
            flush_deadline: None,
        }
    }

    /// The buffers of the next I/O step: where to read and how much at most (0: not
    /// now), and what to write.
    pub fn io_buffers(&mut self) -> (&mut BytesMut, &mut BytesMut, usize) {
        let read_limit = if self.wants_read() {
            self.size_read_buffer()
        } else {
            0
        };
        self.last_read_limit = read_limit;
        (&mut self.read_buf, &mut self.out, read_limit)
    }

    /// After an I/O step: `read` bytes were read (`Some(0)`: the client closed its side),
    /// and whether any output was written.
    pub fn handle_io(&mut self, now: Instant, read: Option<usize>, wrote: bool) {
        if wrote && self.flush_deadline.is_some() && !self.is_shutting_down() {
            self.flush_deadline = Some(now + FINAL_FLUSH_TIMEOUT);
        }
        match read {
            Some(0) => {
                debug!("the client closed its side");
                self.begin_ending(Ending::PeerClosed);
            }
            Some(n) => {
                self.reads_fill = n >= self.last_read_limit;
                self.frames_left = true;
            }
            None => {}
        }
        self.pump(now);
    }

    /// The socket failed: the connection ends now.
    pub fn handle_broken(&mut self, error: io::Error) {
        self.begin_ending(Ending::Broken(error));
        self.ended = true;
    }

    /// A message from the core task.
    pub fn handle_core(&mut self, now: Instant, message: ToConnection) {
        match message {
            ToConnection::Replies(replies) => {
                for reply in replies {
                    self.on_reply(reply);
                }
            }
            ToConnection::Deliveries(deliveries) => {
                // An ending connection's messages go back to their queue; writing
                // more of them helps nobody.
                if self.ending.is_none() {
                    for delivery in deliveries {
                        // Straight into the output while it has room and nothing waits
                        // before it: the common case costs no bookkeeping.
                        if self.pending.is_empty() && self.out.len() < OUTPUT_BYTES_MAX {
                            encode_delivery(
                                &mut self.out,
                                &delivery,
                                self.delivery_lease.as_ref(),
                                &mut self.published_at,
                            );
                        } else {
                            self.pending.push(delivery);
                        }
                    }
                }
            }
            ToConnection::Revoked(ids) => {
                for id in ids {
                    self.pending.remove(id);
                }
            }
        }
        self.pump(now);
    }

    /// Time has come to `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.role.is_none() && self.ending.is_none() && now >= self.register_deadline {
            let seconds = self.settings.register_timeout.as_secs_f64();
            self.refuse(
                ErrorCode::RegisterTimeout,
                &format!("no register within {seconds} s of connecting"),
            );
        }
        if self.flush_deadline.is_some_and(|deadline| now >= deadline) {
            if !self.is_shutting_down() {
                debug!("the client did not take its last frames in time");
                let gave_up = io::Error::new(io::ErrorKind::TimedOut, "output made no progress");
                self.ending = Some(Ending::Broken(gave_up));
            }
            self.ended = true;
        }
        self.pump(now);
    }

    /// The broker's drain is over (or its core task is gone): write what is encoded,
    /// briefly, then close. Replies that come after this are not written.
    pub fn handle_shutdown(&mut self, now: Instant) {
        self.unanswered.clear();
        self.owed_bytes = 0;
        self.local_bytes = 0;
        self.ending = Some(Ending::Shutdown);
        self.flush_deadline = Some(now + SHUTDOWN_FLUSH_TIMEOUT);
        self.pump(now);
    }

    /// Commands for the core, to send as one request.
    pub fn poll_commands(&mut self) -> Option<Vec<Command>> {
        (!self.commands.is_empty()).then(|| std::mem::take(&mut self.commands))
    }

    /// When [`Session::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let register =
            (self.role.is_none() && self.ending.is_none()).then_some(self.register_deadline);
        match (register, self.flush_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// How the connection ended, once it has: the shell then closes it.
    pub fn poll_end(&mut self) -> Option<Ending> {
        if self.ended {
            self.ended = false;
            return self.ending.take();
        }
        None
    }

    /// Whether reading is held back because the client does not take its output.
    pub fn is_throttled(&self) -> bool {
        self.ending.is_none() && !self.has_input_room()
    }

    /// Bytes encoded and not written yet.
    pub fn output_len(&self) -> usize {
        self.out.len()
    }

    fn is_shutting_down(&self) -> bool {
        matches!(self.ending, Some(Ending::Shutdown))
    }

    fn wants_read(&self) -> bool {
        self.ending.is_none() && !self.frames_left && self.has_input_room()
    }

    /// Whether another frame may be read: what it could add fits the output bound.
    fn has_input_room(&self) -> bool {
        self.out.len() + self.local_bytes + self.owed_bytes < OUTPUT_BYTES_MAX
    }

    /// Gives the next read room to match the connection's pace, and says how much it may
    /// read: a full chunk while its reads fill what they get (once registered), a small
    /// one otherwise; and hands back the big, empty read buffer of a connection that has
    /// gone quiet.
    fn size_read_buffer(&mut self) -> usize {
        if self.reads_fill && self.role.is_some() {
            self.read_buf.reserve(READ_CHUNK_BYTES);
            return READ_CHUNK_BYTES;
        }
        if self.read_buf.is_empty() && self.read_buf.capacity() > IDLE_BUFFER_BYTES_MAX {
            self.read_buf = BytesMut::new();
        }
        self.read_buf.reserve(QUIET_READ_BYTES);
        QUIET_READ_BYTES
    }

    /// Moves everything on as far as the bounds allow: deliveries into the output,
    /// frames out of the input, flow control to the core, and the end.
    fn pump(&mut self, now: Instant) {
        self.write_replies();
        while self.out.len() < OUTPUT_BYTES_MAX {
            let Some(delivery) = self.pending.pop() else {
                break;
            };
            encode_delivery(
                &mut self.out,
                &delivery,
                self.delivery_lease.as_ref(),
                &mut self.published_at,
            );
        }
        while self.frames_left && self.ending.is_none() && self.has_input_room() {
            match self.decoder.decode(&mut self.read_buf) {
                Ok(Some(body)) => self.handle_frame(&body, now),
                Ok(None) => self.frames_left = false,
                Err(FrameError::Io(e)) => self.handle_broken(e),
                Err(refusal) => self.refuse_framing(refusal),
            }
        }
        if self.role == Some(Role::Consumer) && self.ending.is_none() {
            let backlogged = self.out.len() >= OUTPUT_BYTES_MAX || !self.pending.is_empty();
            if backlogged && !self.paused {
                debug!(output_bytes = self.out.len(), "pausing deliveries");
                self.paused = true;
                self.commands.push(Command::Pause);
            } else if self.paused && !backlogged && self.out.len() < OUTPUT_BYTES_MAX / 2 {
                debug!("resuming deliveries");
                self.paused = false;
                self.commands.push(Command::Resume);
            }
        }
        if self.ending.is_some() && !self.is_shutting_down() {
            // Waiting for the core's replies needs no deadline (the core answers every
            // command); waiting for a client to take its output does.
            if self.out.is_empty() {
                self.flush_deadline = None;
            } else if self.flush_deadline.is_none() {
                self.flush_deadline = Some(now + FINAL_FLUSH_TIMEOUT);
            }
        }
        if self.ending.is_some() && self.unanswered.is_empty() && self.out.is_empty() {
            self.ended = true;
        }
    }

    /// Whether the connection speaks version 1.1 or later.
    fn speaks_1_1(&self) -> bool {
        self.version.is_some_and(|v| v >= V1_1)
    }

    fn handle_frame(&mut self, body: &[u8], now: Instant) {
        let Some(role) = self.role else {
            return self.handle_register(body);
        };
        let frame = match InboundFrame::parse(body) {
            Ok(frame) => frame,
            Err(invalid) => return self.refuse(ErrorCode::InvalidFrame, &invalid.to_string()),
        };
        let frame_type = frame.frame_type();
        let v1_1 = self.speaks_1_1();
        if frame_type.is_1_1() && !v1_1 {
            let message = format!(
                "unknown frame type `{}` on a version 1.0 connection; register with \"version\":\"1.1\" to use it",
                frame_type.as_str()
            );
            return self.refuse(ErrorCode::InvalidFrame, &message);
        }
        let command = match (frame_type, role) {
            (FrameType::Register, _) => {
                let message = format!(
                    "this connection is already registered as a {role}; open another connection for another role or queue"
                );
                return self.refuse(ErrorCode::AlreadyRegistered, &message);
            }
            (FrameType::Publish, Role::Producer) => {
                self.publish_message(&frame, now).map(Command::Publish)
            }
            (FrameType::PublishBatch, Role::Producer) => self.publish_batch_command(&frame, now),
            // No delivery waits unwritten here: frames are read only while the output has
            // room, and deliveries wait only while it has none.
            (FrameType::Ack, Role::Consumer) => frame.target_ids(v1_1).map(Command::Ack),
            (FrameType::Nack, Role::Consumer) => self.nack_command(&frame),
            (FrameType::Touch, Role::Consumer) => self.touch_command(&frame),
            (FrameType::Publish | FrameType::PublishBatch, Role::Consumer) => {
                return self.refuse(
                    ErrorCode::WrongRole,
                    "a consumer cannot publish; open a producer connection",
                );
            }
            (FrameType::Ack | FrameType::Nack | FrameType::Touch, Role::Producer) => {
                let message = format!(
                    "a producer cannot {}; only the consumer a message was delivered to can",
                    frame_type.as_str()
                );
                return self.refuse(ErrorCode::WrongRole, &message);
            }
        };
        match command {
            Ok(command) => self.send_to_core(command),
            Err(invalid) => self.refuse(ErrorCode::InvalidFrame, &invalid.to_string()),
        }
    }

    /// The queue's policy: set at register, before any other frame is handled.
    fn policy(&self) -> &QueuePolicy {
        self.policy
            .as_deref()
            .expect("frames after register have a queue policy")
    }

    /// A publish_batch (1.1): every entry checked as a publish is, all or none.
    fn publish_batch_command(
        &self,
        frame: &InboundFrame<'_>,
        now: Instant,
    ) -> Result<Command, InvalidFrame> {
        let messages = frame
            .publish_batch_entries()?
            .iter()
            .enumerate()
            .map(|(index, entry)| {
                self.publish_message(entry, now)
                    .map_err(|source| InvalidFrame::InEntry {
                        index,
                        source: Box::new(source),
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Command::PublishBatch(messages))
    }

    /// A publish's message, its 1.1 fields checked against the queue's policy.
    fn publish_message(
        &self,
        frame: &InboundFrame<'_>,
        now: Instant,
    ) -> Result<NewMessage, InvalidFrame> {
        let payload = Payload::from_validated(frame.publish_payload()?);
        // A 1.0 publish has no 1.1 field, and a canonical one at most a checked priority.
        if !self.speaks_1_1() {
            return Ok(NewMessage::now(payload));
        }
        if let Some(priority) = frame.canonical_publish_priority() {
            return Ok(NewMessage {
                priority,
                ..NewMessage::now(payload)
            });
        }
        let attributes = frame.publish_attributes()?.map(Arc::new);
        let priority = frame.publish_priority()?;
        let due = frame.publish_due()?;
        let max_delay = self.policy().max_delay;
        let asked = match due {
            Due::Now => Duration::ZERO,
            Due::After(delay) => delay,
            Due::At(at_ms) => {
                let now_ms = self.settings.wall_clock.unix_ms_at(now);
                Duration::from_millis(at_ms.saturating_sub(now_ms))
            }
        };
        if asked > max_delay {
            let field = if matches!(due, Due::At(_)) {
                "not_before"
            } else {
                "delay_ms"
            };
            return Err(past_limit(field, asked, "max_delay", max_delay));
        }
        Ok(NewMessage {
            payload,
            priority,
            due,
            attributes,
        })
    }

    fn nack_command(&self, frame: &InboundFrame<'_>) -> Result<Command, InvalidFrame> {
        let nack = frame.nack()?;
        let max_delay = self.policy().max_delay;
        if let Some(delay) = nack.delay.filter(|&delay| delay > max_delay) {
            return Err(past_limit("delay_ms", delay, "max_delay", max_delay));
        }
        let action = if nack.dead_letter {
            NackAction::DeadLetter
        } else {
            NackAction::Retry(nack.delay)
        };
        Ok(Command::Nack {
            ids: nack.ids,
            action,
        })
    }

    fn touch_command(&self, frame: &InboundFrame<'_>) -> Result<Command, InvalidFrame> {
        let (ids, lease) = frame.touch()?;
        let max_lease = self.policy().max_lease;
        if let Some(lease) = lease.filter(|&lease| lease > max_lease) {
            return Err(past_limit("ack_timeout_ms", lease, "max_lease", max_lease));
        }
        Ok(Command::Touch { ids, lease })
    }

    fn handle_register(&mut self, body: &[u8]) {
        let register = InboundFrame::parse(body).and_then(|frame| match frame.frame_type() {
            FrameType::Register => frame.register(),
            _ => Err(InvalidFrame::BadField {
                field: "type",
                problem: "must be \"register\" on the first frame".into(),
            }),
        });
        let register = match register {
            Ok(register) => register,
            Err(invalid) => {
                let message = format!("the first frame must be a valid register: {invalid}");
                return self.refuse(ErrorCode::NotRegistered, &message);
            }
        };
        if let Err(denied) =
            self.settings
                .access
                .check(register.token.as_deref(), register.role, &register.queue)
        {
            return self.refuse(ErrorCode::Unauthorized, &denied.to_string());
        }
        let span = Span::current();
        span.record("role", field::display(register.role));
        span.record("queue", field::display(&register.queue));
        let version = register.version.map(Version::negotiate);
        let speaks = version.unwrap_or(Version::V1_0);
        let policy = self.settings.policies.for_queue(&register.queue);
        let lease = register.lease;
        if let Some(lease) = lease.filter(|&lease| lease > policy.max_lease) {
            let problem = past_limit("ack_timeout_ms", lease, "max_lease", policy.max_lease);
            let message = format!("the first frame must be a valid register: {problem}");
            return self.refuse(ErrorCode::NotRegistered, &message);
        }
        match register.role {
            Role::Consumer => info!(prefetch = register.prefetch, version = %speaks, "registered"),
            Role::Producer => info!(version = %speaks, "registered"),
        }
        self.role = Some(register.role);
        self.version = version;
        if speaks >= V1_1 {
            let lease = lease.unwrap_or(policy.ack_timeout);
            self.delivery_lease = Some(LeaseField::new(whole_millis(lease)));
        }
        self.policy = Some(policy);
        // Frames after the register may be as large as the broker allows.
        self.decoder = FrameDecoder::new(self.settings.max_frame_bytes);
        self.send_to_core(Command::Register {
            role: register.role,
            queue: register.queue,
            prefetch: register.prefetch,
            lease,
        });
    }

    fn send_to_core(&mut self, command: Command) {
        debug_assert!(command.is_answered());
        // A reply of unknown ids has an error per id; a batch's lists its ids.
        let reserve = match &command {
            Command::Ack(ids) | Command::Nack { ids, .. } | Command::Touch { ids, .. } => {
                ids.as_slice().len() * REPLY_RESERVE_BYTES
            }
            Command::PublishBatch(messages) => {
                REPLY_RESERVE_BYTES + messages.len() * BATCH_REPLY_BYTES_PER_ENTRY
            }
            _ => REPLY_RESERVE_BYTES,
        };
        self.commands.push(command);
        self.unanswered.push_back(Slot::Core(reserve));
        self.owed_bytes += reserve;
    }

    fn on_reply(&mut self, reply: Reply) {
        // After shutdown nothing owed is written any more: a late reply would take the
        // place of one that was dropped.
        if self.is_shutting_down() {
            return;
        }
        if matches!(self.unanswered.front(), Some(Slot::Core(_)))
            && !matches!(reply, Reply::UnknownIds(_))
        {
            // The common case: the reply owed first, written at once.
            if let Some(Slot::Core(reserved)) = self.unanswered.pop_front() {
                self.owed_bytes = self.owed_bytes.saturating_sub(reserved);
            }
            match reply {
                // The replies of the hot path, without a detour.
                Reply::Published(id) => ServerFrame::Published(id).encode(&mut self.out),
                Reply::Settled => {}
                reply => self.encode_reply(reply, None),
            }
            return self.write_replies();
        }
        // The first command not answered yet; unknown-id errors still being written may
        // stand before it.
        let Some(position) = self
            .unanswered
            .iter()
            .position(|slot| matches!(slot, Slot::Core(_)))
        else {
            debug_assert!(false, "a reply to no command");
            return;
        };
        let Slot::Core(reserved) = self.unanswered[position] else {
            unreachable!("found as a core slot");
        };
        if let Reply::UnknownIds(mut ids) = reply {
            ids.reverse();
            let many = ids.len() > 1;
            self.unanswered[position] = Slot::UnknownIds {
                ids,
                many,
                reserved,
            };
        } else {
            self.owed_bytes = self.owed_bytes.saturating_sub(reserved);
            if position == 0 {
                self.unanswered.pop_front();
                self.encode_reply(reply, None);
            } else {
                let mut frame = BytesMut::new();
                self.encode_reply(reply, Some(&mut frame));
                self.local_bytes += frame.len();
                self.unanswered[position] = Slot::Local(frame.freeze());
            }
        }
        self.write_replies();
    }

    /// Encodes a reply other than unknown ids into `into`, or the output.
    fn encode_reply(&mut self, reply: Reply, into: Option<&mut BytesMut>) {
        let out = match into {
            Some(frame) => frame,
            None => &mut self.out,
        };
        match reply {
            Reply::Registered => ServerFrame::Registered {
                version: self.version,
            }
            .encode(out),
            Reply::Published(id) => ServerFrame::Published(id).encode(out),
            Reply::PublishedBatch(ids) => ServerFrame::PublishedBatch { ids: &ids }.encode(out),
            Reply::Settled => {}
            Reply::UnknownIds(_) => debug_assert!(false, "unknown ids are written as room allows"),
            Reply::Refused { code, message, id } => {
                debug!(%code, %message, "refused");
                encode_error(out, code, &message, id);
            }
        }
    }

    /// Writes the replies at the front of the order that are ready: refusals made here
    /// at once, unknown-id errors while the output has room.
    #[inline]
    fn write_replies(&mut self) {
        // Most of the time the front waits for the core (or nothing is owed).
        if matches!(
            self.unanswered.front(),
            Some(Slot::Local(_) | Slot::UnknownIds { .. })
        ) {
            self.write_ready_replies();
        }
    }

    fn write_ready_replies(&mut self) {
        loop {
            match self.unanswered.front_mut() {
                Some(Slot::Local(frame)) => {
                    self.local_bytes -= frame.len();
                    self.out.extend_from_slice(frame);
                    self.unanswered.pop_front();
                }
                Some(Slot::UnknownIds {
                    ids,
                    many,
                    reserved,
                }) => {
                    while self.out.len() < OUTPUT_BYTES_MAX {
                        let Some(id) = ids.pop() else { break };
                        // Many errors for one frame say it briefly.
                        let message = if *many {
                            std::borrow::Cow::Borrowed("not in flight to this consumer")
                        } else {
                            std::borrow::Cow::Owned(format!(
                                "message {id} is not in flight to this consumer: never delivered to it, already acked or nacked, or requeued after its lease ran out"
                            ))
                        };
                        encode_error(&mut self.out, ErrorCode::UnknownId, &message, Some(id));
                    }
                    if !ids.is_empty() {
                        return;
                    }
                    self.owed_bytes = self.owed_bytes.saturating_sub(*reserved);
                    self.unanswered.pop_front();
                }
                _ => return,
            }
        }
    }

    /// A length prefix that is not acceptable: `frame_too_large`, or, for a first frame
    /// too long to be a register but within the broker's limit, `not_registered`.
    fn refuse_framing(&mut self, refusal: FrameError) {
        match refusal {
            FrameError::TooLarge { declared, .. }
                if self.role.is_none() && declared <= self.settings.max_frame_bytes as u64 =>
            {
                let message = format!(
                    "the first frame must be a register, at most {REGISTER_FRAME_BYTES_MAX} bytes; this one declares {declared}"
                );
                self.refuse(ErrorCode::NotRegistered, &message);
            }
            refusal => self.refuse(ErrorCode::FrameTooLarge, &refusal.to_string()),
        }
    }

    /// Answers with an error, in its place in the reply order; a fatal one (the
    /// contract's table, [`ErrorCode::is_fatal`]) ends the connection after it.
    fn refuse(&mut self, code: ErrorCode, message: &str) {
        if code.is_fatal() {
            info!(%code, message, "closing the connection");
        } else {
            debug!(%code, message, "refused");
        }
        if self.unanswered.is_empty() {
            encode_error(&mut self.out, code, message, None);
        } else {
            let mut encoded = BytesMut::new();
            encode_error(&mut encoded, code, message, None);
            self.local_bytes += encoded.len();
            self.unanswered.push_back(Slot::Local(encoded.freeze()));
        }
        if code.is_fatal() {
            self.begin_ending(Ending::Fatal);
        }
    }

    /// Stops reading; a consumer's messages go back at once.
    fn begin_ending(&mut self, ending: Ending) {
        if self.ending.is_some() {
            return;
        }
        self.ending = Some(ending);
        self.pending.clear();
        if self.role.is_some() && !self.disconnect_sent {
            self.disconnect_sent = true;
            self.commands.push(Command::Disconnect);
        }
    }
}

#[cfg(test)]
mod tests;

/// Encodes a delivery; with `lease` (a 1.1 consumer's), the 1.1 frame.
fn encode_delivery(
    out: &mut BytesMut,
    delivery: &Delivery,
    lease: Option<&LeaseField>,
    published_at: &mut PublishedAtField,
) {
    ServerFrame::Delivery {
        id: delivery.id,
        payload: &delivery.payload,
        attempt: delivery.attempt,
        details: lease.map(|lease| DeliveryDetails {
            published_at: published_at.render(delivery.priority, delivery.published_at_ms),
            lease,
            attributes: delivery.attributes.as_deref(),
            dead_letter: delivery.dead_letter.as_deref(),
        }),
    }
    .encode(out);
}

/// A 1.1 field past the queue's policy: `invalid_frame`, or at register
/// `not_registered`, saying which limit and how to lift it.
fn past_limit(field: &'static str, asked: Duration, key: &str, limit: Duration) -> InvalidFrame {
    InvalidFrame::bad_field(
        field,
        format!(
            "is {} ms, past this queue's {key} of {} ({} ms); ask for less, or raise {key} in the queue's policy",
            asked.as_millis(),
            humantime::format_duration(limit),
            limit.as_millis()
        ),
    )
}

/// Appends an error frame of at most [`REPLY_RESERVE_BYTES`], cutting the message short
/// if it has to (a message may quote what the client sent).
fn encode_error(out: &mut BytesMut, code: ErrorCode, message: &str, id: Option<MessageId>) {
    let start = out.len();
    let mut message = std::borrow::Cow::Borrowed(message);
    loop {
        ServerFrame::Error {
            code,
            message: &message,
            id,
        }
        .encode(out);
        if out.len() - start <= REPLY_RESERVE_BYTES {
            return;
        }
        out.truncate(start);
        let keep = message.chars().count() / 2;
        message = std::borrow::Cow::Owned(message.chars().take(keep).chain(['…']).collect());
    }
}
