//! Model-based test of the session in simulated time: a scripted client writes frames of
//! every kind (valid, malformed, of the wrong role, oversized, pipelined by the hundred)
//! and reads at a pace the script sets, from nothing to everything; a fake core answers
//! commands whenever the script says, delivers while not paused, and takes deliveries
//! back. A consumer may register with version 1.1 and ack many ids in one frame, each
//! unknown one owed its own `unknown_id` in order. After every step the session must
//! keep its bounds, and the client must have read exactly a prefix of the replies the
//! contract owes it, in order; at the end, all of them, unless the connection ended
//! early.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::protocol::Ids;
use crate::protocol::codec::write_frame;

/// The broker's frame limit in this test: small, so that oversized frames are cheap.
const MAX_FRAME_BYTES: usize = 64 * 1024;
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// Unknown ids are taken from here on; delivered ones are below.
const UNKNOWN_IDS: u64 = 1 << 40;
/// Most ids the script puts in one `ids` frame (it must fit `MAX_FRAME_BYTES`).
const LARGEST_IDS: usize = 2000;

fn settings() -> Arc<ConnectionSettings> {
    Arc::new(ConnectionSettings {
        max_frame_bytes: MAX_FRAME_BYTES,
        register_timeout: REGISTER_TIMEOUT,
        access: Access::Open,
        policies: Policies::uniform(QueuePolicy::new(Duration::from_secs(5))),
        wall_clock: WallClock::now(),
    })
}

#[derive(Debug, Clone)]
enum ClientOp {
    Register {
        consumer: bool,
        valid: bool,
        /// Asks for version 1.1.
        v1_1: bool,
    },
    Publishes(usize),
    /// Acks of messages the client has read, or of ids never delivered.
    Acks {
        count: usize,
        known: bool,
    },
    /// One ack frame of many ids (1.1): read ones, or never delivered ones, or both.
    AckIds {
        count: usize,
        known: bool,
        unknown: bool,
    },
    /// An ack of a message delivered but not read yet: its id guessed.
    AckUnread,
    /// Frames each answered with `invalid_frame`.
    Garbage(usize),
    WrongRole,
    SecondRegister,
    /// A length over the limit: fatal.
    Oversize,
    /// The client closes its side.
    Close,
}

#[derive(Debug, Clone)]
enum Step {
    Client(ClientOp),
    /// The fake core delivers up to this many messages of this payload size.
    Deliver {
        count: usize,
        payload_bytes: usize,
    },
    /// The fake core takes back the in-flight deliveries picked by these bits.
    Revoke(u64),
    /// The fake core answers up to this many commands.
    Answer(usize),
    /// The socket moves up to `read` bytes from the client and up to `write` to it.
    Transfer {
        read: usize,
        write: usize,
    },
    Advance(Duration),
    Shutdown,
}

fn client_op() -> impl Strategy<Value = ClientOp> {
    prop_oneof![
        3 => (any::<bool>(), prop::bool::weighted(0.9), any::<bool>())
            .prop_map(|(consumer, valid, v1_1)| ClientOp::Register { consumer, valid, v1_1 }),
        3 => prop_oneof![1usize..5, 100usize..2000].prop_map(ClientOp::Publishes),
        3 => (prop_oneof![1usize..5, 100usize..2000], any::<bool>())
            .prop_map(|(count, known)| ClientOp::Acks { count, known }),
        1 => Just(ClientOp::AckUnread),
        2 => (prop_oneof![1usize..5, 100usize..LARGEST_IDS], any::<bool>(), any::<bool>())
            .prop_map(|(count, known, unknown)| ClientOp::AckIds { count, known, unknown }),
        2 => prop_oneof![1usize..5, 500usize..5000].prop_map(ClientOp::Garbage),
        1 => Just(ClientOp::WrongRole),
        1 => Just(ClientOp::SecondRegister),
        1 => Just(ClientOp::Oversize),
        1 => Just(ClientOp::Close),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => client_op().prop_map(Step::Client),
        3 => (1usize..200, prop_oneof![0usize..64, 1000usize..20_000])
            .prop_map(|(count, payload_bytes)| Step::Deliver { count, payload_bytes }),
        1 => any::<u64>().prop_map(Step::Revoke),
        3 => prop_oneof![1usize..10, 100usize..5000].prop_map(Step::Answer),
        6 => (prop_oneof![0usize..100, 1000usize..200_000], prop_oneof![Just(0usize), 0usize..1000, 10_000usize..1_000_000])
            .prop_map(|(read, write)| Step::Transfer { read, write }),
        1 => prop_oneof![0u64..2000, 4000u64..12_000].prop_map(|ms| Step::Advance(Duration::from_millis(ms))),
        1 => Just(Step::Shutdown),
    ]
}

/// A reply the client is owed, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Owed {
    /// An error made by the session itself.
    Local(ErrorCode),
    /// The core's answer to the n-th command sent to it.
    Core(usize),
}

/// What the client reads: a reply, or a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Read {
    Ok(Option<u64>),
    Error { code: String, id: Option<u64> },
}

/// The test's side of the connection: the client and the fake core.
#[derive(Default)]
struct World {
    /// Bytes the client has written and the session not read yet.
    to_session: VecDeque<u8>,
    client_closed: bool,
    /// Bytes the session wrote and the client not decoded yet.
    from_session: BytesMut,
    decoder: Option<FrameDecoder>,
    /// The replies, read so far, in order.
    replies: Vec<Read>,
    /// Deliveries read, as (id, attempt).
    messages: Vec<(u64, u32)>,
    /// Whether the client has read the register's `ok`: no delivery may come before.
    register_ok_read: bool,
    /// Whether the client sent a first frame, and what it registered as.
    first_sent: bool,
    registered: Option<Role>,
    /// The register asked for 1.1.
    v1_1: bool,
    /// What the client is owed, in the order of its frames.
    owed: Vec<Owed>,
    /// A fatal refusal is owed: frames after it get nothing.
    fatal_owed: bool,

    // The fake core.
    /// Commands waiting for an answer, numbered in arrival order.
    commands: VecDeque<(usize, Command)>,
    commands_seen: usize,
    /// Answers given, by command number, as the client must read them.
    answers: BTreeMap<usize, Vec<Read>>,
    next_id: u64,
    prefetch: usize,
    core_role: Option<Role>,
    paused: bool,
    disconnected: bool,
    /// Delivered to this consumer, not acked or taken back: id -> attempt.
    in_flight: BTreeMap<u64, u32>,
    /// Deliveries taken back while still unwritten: never to be read.
    dropped: BTreeSet<(u64, u32)>,
    /// Every delivery made, by (id, attempt).
    delivered: BTreeSet<(u64, u32)>,
}

impl World {
    fn new() -> World {
        World {
            decoder: Some(FrameDecoder::new(usize::MAX >> 1)),
            next_id: 1,
            ..World::default()
        }
    }

    fn send(&mut self, value: Value) {
        self.send_body(value.to_string().as_bytes());
    }

    fn send_body(&mut self, body: &[u8]) {
        let mut framed = BytesMut::new();
        write_frame(&mut framed, |dst| dst.extend_from_slice(body));
        self.to_session.extend(framed.iter());
    }

    /// The client writes `op`'s frames, and the test notes what each is owed.
    fn client(&mut self, op: &ClientOp, session: &Session) {
        if self.client_closed {
            return;
        }
        let first = !self.first_sent;
        self.first_sent = true;
        // Frames after a fatal one are never read, so nothing is owed to them.
        let mut owe = |world: &mut World, owed: Owed| {
            if !world.fatal_owed {
                if let Owed::Local(code) = &owed
                    && code.is_fatal()
                {
                    world.fatal_owed = true;
                }
                world.owed.push(owed);
            }
        };
        match *op {
            ClientOp::Register {
                consumer,
                valid,
                v1_1,
            } => {
                let role = if consumer { "consumer" } else { "producer" };
                let prefetch = if valid { 1000 } else { 0 };
                let version = if v1_1 { json!("1.1") } else { json!(null) };
                self.send(json!({"type": "register", "role": role, "queue": "q",
                    "prefetch": prefetch, "version": version}));
                if !first {
                    if self.registered.is_some() {
                        owe(self, Owed::Local(ErrorCode::AlreadyRegistered));
                    }
                } else if valid || !consumer {
                    let role = if consumer {
                        Role::Consumer
                    } else {
                        Role::Producer
                    };
                    self.registered = Some(role);
                    self.v1_1 = v1_1;
                    owe(self, Owed::Core(self.owed_core_count()));
                } else {
                    owe(self, Owed::Local(ErrorCode::NotRegistered));
                }
            }
            ClientOp::AckIds {
                count,
                known,
                unknown,
            } => {
                let read: Vec<u64> = self.messages.iter().map(|(id, _)| *id).collect();
                let ids: Vec<u64> = (0..count)
                    .filter_map(|n| match read.get(n) {
                        Some(id) if known && (!unknown || n % 2 == 0) => Some(*id),
                        _ if unknown || !known => Some(UNKNOWN_IDS + n as u64),
                        _ => None,
                    })
                    .collect();
                if ids.is_empty() {
                    // Nothing sent: not a first frame either.
                    self.first_sent = !first;
                    return;
                }
                self.send(json!({"type": "ack", "ids": ids}));
                match self.registered {
                    // On 1.0, `ids` is not a field: the ack has no `id`.
                    Some(Role::Consumer) if !self.v1_1 => {
                        owe(self, Owed::Local(ErrorCode::InvalidFrame));
                    }
                    _ => self.owe_after_register(Role::Consumer, &mut owe),
                }
            }
            ClientOp::Publishes(count) => {
                for n in 0..count {
                    self.send(json!({"type": "publish", "payload": format!("p{n}")}));
                    self.owe_after_register(Role::Producer, &mut owe);
                }
            }
            ClientOp::Acks { count, known } => {
                let read: Vec<u64> = self.messages.iter().map(|(id, _)| *id).collect();
                for n in 0..count {
                    let id = match read.get(n) {
                        Some(id) if known => *id,
                        _ => UNKNOWN_IDS + n as u64,
                    };
                    self.send(json!({"type": "ack", "id": id}));
                    self.owe_after_register(Role::Consumer, &mut owe);
                }
            }
            ClientOp::AckUnread => {
                // Preferably one the session has not even encoded yet.
                let read: BTreeSet<u64> = self.messages.iter().map(|(id, _)| *id).collect();
                let unwritten = session.pending.by_id.keys().map(|id| id.0).min();
                let unread = self.in_flight.keys().find(|id| !read.contains(id)).copied();
                let id = unwritten.or(unread).unwrap_or(UNKNOWN_IDS - 1);
                self.send(json!({"type": "ack", "id": id}));
                self.owe_after_register(Role::Consumer, &mut owe);
            }
            ClientOp::Garbage(count) => {
                for _ in 0..count {
                    self.send_body(b"x");
                    if self.registered.is_some() {
                        owe(self, Owed::Local(ErrorCode::InvalidFrame));
                    } else {
                        owe(self, Owed::Local(ErrorCode::NotRegistered));
                    }
                }
            }
            ClientOp::WrongRole => {
                let frame = match self.registered {
                    Some(Role::Producer) => json!({"type": "ack", "id": 1}),
                    _ => json!({"type": "publish", "payload": "wrong"}),
                };
                self.send(frame);
                match self.registered {
                    Some(_) => owe(self, Owed::Local(ErrorCode::WrongRole)),
                    None => owe(self, Owed::Local(ErrorCode::NotRegistered)),
                }
            }
            ClientOp::SecondRegister => {
                self.send(json!({"type": "register", "role": "producer"}));
                match self.registered {
                    Some(_) => owe(self, Owed::Local(ErrorCode::AlreadyRegistered)),
                    None => {
                        self.registered = Some(Role::Producer);
                        owe(self, Owed::Core(self.owed_core_count()));
                    }
                }
            }
            ClientOp::Oversize => {
                self.to_session
                    .extend(((MAX_FRAME_BYTES + 1) as u32).to_be_bytes());
                owe(self, Owed::Local(ErrorCode::FrameTooLarge));
            }
            ClientOp::Close => self.client_closed = true,
        }
    }

    /// Notes what a publish or an ack is owed: the core's answer when the connection is
    /// registered in the role that may send it.
    fn owe_after_register(&mut self, role: Role, owe: &mut impl FnMut(&mut World, Owed)) {
        match self.registered {
            None => owe(self, Owed::Local(ErrorCode::NotRegistered)),
            Some(registered) if registered == role => {
                let core = Owed::Core(self.owed_core_count());
                owe(self, core);
            }
            Some(_) => owe(self, Owed::Local(ErrorCode::WrongRole)),
        }
    }

    fn owed_core_count(&self) -> usize {
        self.owed
            .iter()
            .filter(|o| matches!(o, Owed::Core(_)))
            .count()
    }

    /// The fake core takes the session's commands.
    fn take_commands(&mut self, session: &mut Session) {
        while let Some(commands) = session.poll_commands() {
            for command in commands {
                match &command {
                    Command::Register { prefetch, .. } => self.prefetch = usize::from(*prefetch),
                    Command::Pause => self.paused = true,
                    Command::Resume => self.paused = false,
                    Command::Disconnect => self.disconnected = true,
                    Command::Publish { .. }
                    | Command::PublishBatch(_)
                    | Command::Ack(_)
                    | Command::Nack { .. }
                    | Command::Touch { .. } => {}
                }
                if command.is_answered() {
                    self.commands.push_back((self.commands_seen, command));
                    self.commands_seen += 1;
                }
            }
        }
    }

    fn answer(&mut self, session: &mut Session, now: Instant, count: usize) {
        if session.ending.is_some() && matches!(session.ending, Some(Ending::Shutdown)) {
            // At shutdown the core task is gone: nothing more comes.
            return;
        }
        let mut replies = Vec::new();
        for _ in 0..count {
            let Some((n, command)) = self.commands.pop_front() else {
                break;
            };
            let (reply, read) = match command {
                Command::Register { role, .. } => {
                    // As the gate does, deliveries come only after the register's answer.
                    self.core_role = Some(role);
                    (Reply::Registered, Some(Read::Ok(None)))
                }
                Command::Ack(Ids::Many(ids)) => {
                    let unknown: Vec<MessageId> = ids
                        .iter()
                        .copied()
                        .filter(|id| self.in_flight.remove(&id.0).is_none())
                        .collect();
                    let reads = unknown
                        .iter()
                        .map(|id| Read::Error {
                            code: "unknown_id".into(),
                            id: Some(id.0),
                        })
                        .collect();
                    self.answers.insert(n, reads);
                    replies.push(if unknown.is_empty() {
                        Reply::Settled
                    } else {
                        Reply::UnknownIds(unknown)
                    });
                    continue;
                }
                Command::Publish { .. } if n % 7 == 6 => (
                    Reply::Refused {
                        code: ErrorCode::QueueFull,
                        message: "full ".repeat(100),
                        id: None,
                    },
                    Some(Read::Error {
                        code: "queue_full".into(),
                        id: None,
                    }),
                ),
                Command::Publish { .. } => {
                    let id = self.next_id;
                    self.next_id += 1;
                    (Reply::Published(MessageId(id)), Some(Read::Ok(Some(id))))
                }
                Command::Ack(Ids::One(id)) => {
                    if self.in_flight.remove(&id.0).is_some() {
                        (Reply::Settled, None)
                    } else {
                        (
                            Reply::UnknownIds(vec![id]),
                            Some(Read::Error {
                                code: "unknown_id".into(),
                                id: Some(id.0),
                            }),
                        )
                    }
                }
                other => unreachable!("{other:?} is not answered"),
            };
            self.answers.insert(n, read.into_iter().collect());
            replies.push(reply);
        }
        if !replies.is_empty() {
            session.handle_core(now, ToConnection::Replies(replies));
        }
    }

    fn deliver(&mut self, session: &mut Session, now: Instant, count: usize, payload_bytes: usize) {
        if self.core_role != Some(Role::Consumer) || self.paused || self.disconnected {
            return;
        }
        let room = self.prefetch.saturating_sub(self.in_flight.len());
        let payload = Payload::from_text(&"d".repeat(payload_bytes));
        let deliveries: Vec<Delivery> = (0..count.min(room))
            .map(|_| {
                let id = self.next_id;
                self.next_id += 1;
                self.in_flight.insert(id, 1);
                self.delivered.insert((id, 1));
                Delivery {
                    consumer: crate::broker::core::ConsumerId(1),
                    id: MessageId(id),
                    payload: payload.clone(),
                    attempt: 1,
                    priority: 0,
                    published_at_ms: 1,
                    attributes: None,
                    dead_letter: None,
                }
            })
            .collect();
        if !deliveries.is_empty() {
            session.handle_core(now, ToConnection::Deliveries(deliveries));
        }
    }

    fn revoke(&mut self, session: &mut Session, now: Instant, bits: u64) {
        let picked: Vec<u64> = self
            .in_flight
            .keys()
            .enumerate()
            .filter(|(n, _)| bits & (1 << (n % 64)) != 0)
            .map(|(_, id)| *id)
            .collect();
        if picked.is_empty() {
            return;
        }
        for id in &picked {
            let attempt = self.in_flight.remove(id).expect("in flight");
            if session.pending.by_id.contains_key(&MessageId(*id)) {
                self.dropped.insert((*id, attempt));
            }
        }
        let ids = picked.into_iter().map(MessageId).collect();
        session.handle_core(now, ToConnection::Revoked(ids));
    }

    /// One I/O step, as `poll_io` would make it.
    fn transfer(
        &mut self,
        session: &mut Session,
        now: Instant,
        read_limit: usize,
        write_limit: usize,
    ) {
        let (read_buf, out, allowed) = session.io_buffers();
        let written = out.len().min(write_limit);
        let chunk = out.split_to(written);
        self.from_session.extend_from_slice(&chunk);
        let mut got = None;
        if allowed > 0 {
            let room = read_buf.capacity() - read_buf.len();
            let n = room.min(allowed).min(read_limit).min(self.to_session.len());
            if n > 0 {
                read_buf.extend(self.to_session.drain(..n));
                got = Some(n);
            } else if self.client_closed && self.to_session.is_empty() {
                got = Some(0);
            }
        }
        self.read_frames();
        if written > 0 || got.is_some() {
            session.handle_io(now, got, written > 0);
        }
    }

    fn read_frames(&mut self) {
        let decoder = self.decoder.as_mut().expect("a decoder");
        while let Some(body) = decoder
            .decode(&mut self.from_session)
            .expect("valid framing")
        {
            let frame: Value = serde_json::from_slice(&body).expect("JSON from the broker");
            if frame["type"] != "message" {
                // What the session reserves for each reply is enough for any.
                assert!(
                    body.len() + 4 <= REPLY_RESERVE_BYTES,
                    "a {}-byte reply: {frame}",
                    body.len() + 4
                );
            }
            match frame["type"].as_str() {
                Some("message") => {
                    assert!(self.register_ok_read, "a delivery before the register's ok");
                    let attempt = u32::try_from(frame["attempt"].as_u64().unwrap()).unwrap();
                    self.messages.push((frame["id"].as_u64().unwrap(), attempt));
                }
                Some("ok") => {
                    self.register_ok_read |= frame["id"].is_null();
                    self.replies.push(Read::Ok(frame["id"].as_u64()));
                }
                Some("error") => self.replies.push(Read::Error {
                    code: frame["code"].as_str().unwrap().to_owned(),
                    id: frame["id"].as_u64(),
                }),
                other => panic!("unexpected frame type {other:?}: {frame}"),
            }
        }
    }

    /// The replies owed, as the client must read them, as far as they are known: a
    /// core answer not given yet ends what is known.
    fn owed_reads(&self) -> (Vec<Read>, bool) {
        let mut reads = Vec::new();
        for owed in &self.owed {
            match owed {
                Owed::Local(code) => reads.push(Read::Error {
                    code: code.as_str().to_owned(),
                    id: None,
                }),
                Owed::Core(n) => match self.answers.get(n) {
                    Some(answer) => reads.extend(answer.iter().cloned()),
                    None => return (reads, false),
                },
            }
        }
        (reads, true)
    }
}

/// The session's bounds, and what the client has read so far.
fn check(session: &Session, world: &World) -> Result<(), TestCaseError> {
    let largest_delivery = 20_000 + 100;
    prop_assert!(
        session.out.len() <= 2 * OUTPUT_BYTES_MAX + REPLY_RESERVE_BYTES + largest_delivery,
        "{} bytes of output queued",
        session.out.len()
    );
    // An `ids` frame reserves a reply per id.
    prop_assert!(
        session.local_bytes + session.owed_bytes
            <= OUTPUT_BYTES_MAX + LARGEST_IDS * REPLY_RESERVE_BYTES,
        "{} bytes reserved for replies owed by the core and {} bytes of refusals waiting",
        session.owed_bytes,
        session.local_bytes
    );
    let input_bound = if session.role.is_some() {
        MAX_FRAME_BYTES + 4 + READ_CHUNK_BYTES
    } else {
        REGISTER_FRAME_BYTES_MAX + 4 + QUIET_READ_BYTES
    };
    prop_assert!(
        session.read_buf.len() <= input_bound,
        "{} bytes of input held",
        session.read_buf.len()
    );
    for id in session.pending.by_id.keys() {
        prop_assert!(
            world.in_flight.contains_key(&id.0),
            "pending {} is not in flight",
            id
        );
    }
    prop_assert!(
        session.pending.order.len() <= 2 * 1000 + 200,
        "{} ids in order",
        session.pending.order.len()
    );
    if session.role == Some(Role::Consumer) && session.ending.is_none() {
        let backlogged = session.out.len() >= OUTPUT_BYTES_MAX || !session.pending.is_empty();
        prop_assert!(!backlogged || world.paused, "backlogged but not paused");
    }
    let (owed, _) = world.owed_reads();
    prop_assert!(
        world.replies.len() <= owed.len() && world.replies[..] == owed[..world.replies.len()],
        "read {:?}\nowed {:?}",
        world.replies,
        owed
    );
    for delivery in &world.messages {
        prop_assert!(
            world.delivered.contains(delivery),
            "{:?} never delivered",
            delivery
        );
        prop_assert!(
            !world.dropped.contains(delivery),
            "{:?} written after it was taken back or acked",
            delivery
        );
    }
    if let Some(Read::Error { code, .. }) = world.replies.last()
        && ErrorCode::ALL
            .iter()
            .any(|c| c.is_fatal() && c.as_str() == code)
    {
        prop_assert!(world.from_session.is_empty(), "a frame after a fatal error");
    }
    Ok(())
}

fn run(steps: &[Step]) -> Result<(), TestCaseError> {
    let start = Instant::now();
    let mut now = start;
    let mut session = Session::new(settings(), start + REGISTER_TIMEOUT);
    let mut world = World::new();
    let mut ended = None;
    for step in steps {
        match step {
            Step::Client(op) => world.client(op, &session),
            Step::Deliver {
                count,
                payload_bytes,
            } => world.deliver(&mut session, now, *count, *payload_bytes),
            Step::Revoke(bits) => world.revoke(&mut session, now, *bits),
            Step::Answer(count) => world.answer(&mut session, now, *count),
            Step::Transfer { read, write } => world.transfer(&mut session, now, *read, *write),
            Step::Advance(by) => {
                now += *by;
                if session.poll_timeout().is_some_and(|at| at <= now) {
                    if session.role.is_none() && session.ending.is_none() {
                        // Nothing the client sent was read in time: all it gets is the
                        // timeout.
                        world.owed = vec![Owed::Local(ErrorCode::RegisterTimeout)];
                        world.fatal_owed = true;
                        world.registered = None;
                    }
                    session.handle_timeout(now);
                }
            }
            Step::Shutdown => session.handle_shutdown(now),
        }
        world.take_commands(&mut session);
        check(&session, &world)?;
        if let Some(ending) = session.poll_end() {
            ended = Some(ending);
            break;
        }
    }
    // Let everything run its course: the core answers all, the client reads all.
    for _ in 0..10_000 {
        if ended.is_some() {
            break;
        }
        world.answer(&mut session, now, usize::MAX);
        world.transfer(&mut session, now, usize::MAX, usize::MAX);
        world.take_commands(&mut session);
        check(&session, &world)?;
        ended = session.poll_end();
        if ended.is_none()
            && world.to_session.is_empty()
            && world.commands.is_empty()
            && session.out.is_empty()
            && !session.frames_left
        {
            break;
        }
    }
    let (owed, known) = world.owed_reads();
    match ended {
        Some(Ending::Shutdown | Ending::Broken(_)) => {}
        _ => {
            prop_assert!(known, "every command was answered");
            prop_assert_eq!(&world.replies, &owed, "every reply owed was read, in order");
        }
    }
    // At shutdown the core task is gone; any other end gives a consumer's messages back.
    if !matches!(ended, None | Some(Ending::Shutdown)) && world.core_role == Some(Role::Consumer) {
        prop_assert!(world.disconnected, "an ended consumer's messages go back");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]
    #[test]
    fn the_session_keeps_reply_order_and_its_bounds(steps in prop::collection::vec(step(), 1..60)) {
        run(&steps)?;
    }
}

/// Feeds `bytes` to the session as one read.
fn feed(session: &mut Session, now: Instant, bytes: &[u8]) {
    let (read_buf, _, limit) = session.io_buffers();
    assert!(limit >= bytes.len(), "the session reads {limit} bytes now");
    read_buf.extend_from_slice(bytes);
    session.handle_io(now, Some(bytes.len()), false);
}

/// The frames the session has encoded, as text.
fn written(session: &mut Session) -> Vec<String> {
    let mut out = std::mem::take(&mut session.out);
    let mut decoder = FrameDecoder::new(usize::MAX >> 1);
    std::iter::from_fn(|| decoder.decode(&mut out).unwrap())
        .map(|body| String::from_utf8_lossy(&body).into_owned())
        .collect()
}

/// At shutdown the replies still owed are dropped; a reply the core task released later
/// must not be written in the place of another (a pipelining client would pair it with
/// the wrong frame).
#[test]
fn replies_that_come_after_shutdown_are_not_written() {
    let now = Instant::now();
    let mut session = Session::new(settings(), now + REGISTER_TIMEOUT);
    let mut bytes = BytesMut::new();
    for body in [
        &br#"{"type":"register","role":"producer"}"#[..],
        br#"{"type":"publish","payload":"a"}"#,
        b"not json",
        br#"{"type":"publish","payload":"b"}"#,
    ] {
        write_frame(&mut bytes, |dst| dst.extend_from_slice(body));
    }
    feed(&mut session, now, &bytes);
    session.poll_commands();
    session.handle_core(now, ToConnection::Replies(vec![Reply::Registered]));
    assert_eq!(written(&mut session), [r#"{"type":"ok"}"#]);
    session.handle_shutdown(now);
    session.handle_core(
        now,
        ToConnection::Replies(vec![
            Reply::Published(MessageId(1)),
            Reply::Published(MessageId(2)),
        ]),
    );
    assert!(written(&mut session).is_empty());
}

/// The longest register a grant allows (its longest token, the longest queue name, every
/// field) fits the first frame's limit.
#[test]
fn the_longest_register_fits_a_first_frame() {
    let now = Instant::now();
    let mut session = Session::new(settings(), now + REGISTER_TIMEOUT);
    let register = json!({
        "type": "register", "role": "consumer", "queue": "q".repeat(255), "prefetch": 65535,
        "token": "t".repeat(crate::broker::auth::TOKEN_BYTES_MAX), "version": "1.1",
    });
    let mut bytes = BytesMut::new();
    write_frame(&mut bytes, |dst| {
        dst.extend_from_slice(register.to_string().as_bytes())
    });
    assert!(bytes.len() <= REGISTER_FRAME_BYTES_MAX + 4);
    // A quiet connection reads 2 KiB at a time.
    for piece in bytes.chunks(QUIET_READ_BYTES) {
        feed(&mut session, now, piece);
    }
    let commands = session.poll_commands().expect("a register for the core");
    assert!(matches!(commands[..], [Command::Register { .. }]));
}

/// An `ids` frame can earn an `unknown_id` error per id: it reserves the output for all
/// of them, so a consumer that pipelines such frames without reading is not read from
/// again until they are written, and they are written as the output has room, never
/// all at once (65,535 of them take megabytes).
#[test]
fn a_frame_of_many_ids_reserves_a_reply_per_id_and_is_answered_as_room_allows() {
    let now = Instant::now();
    let mut session = Session::new(settings(), now + REGISTER_TIMEOUT);
    let mut bytes = BytesMut::new();
    let register = json!({"type": "register", "role": "consumer", "version": "1.1"});
    let ids: Vec<u64> = (UNKNOWN_IDS..UNKNOWN_IDS + 4_000).collect();
    let ack = json!({"type": "ack", "ids": ids});
    for body in [register.to_string(), ack.to_string(), ack.to_string()] {
        write_frame(&mut bytes, |dst| dst.extend_from_slice(body.as_bytes()));
    }
    let (read_buf, _, _) = session.io_buffers();
    read_buf.extend_from_slice(&bytes);
    session.handle_io(now, Some(bytes.len()), false);
    let commands = session.poll_commands().unwrap();
    assert_eq!(commands.len(), 2, "the register and one ack: {commands:?}");
    assert!(session.is_throttled(), "4,000 errors' worth reserved");
    session.handle_core(
        now,
        ToConnection::Replies(vec![
            Reply::Registered,
            Reply::UnknownIds(ids.iter().map(|&id| MessageId(id)).collect()),
        ]),
    );
    let mut frames = Vec::new();
    while frames.len() < 4_001 {
        assert!(
            session.out.len() <= OUTPUT_BYTES_MAX + REPLY_RESERVE_BYTES,
            "{} bytes of output at once",
            session.out.len()
        );
        let taken = written(&mut session);
        assert!(!taken.is_empty(), "stuck after {} frames", frames.len());
        frames.extend(taken);
        session.handle_io(now, None, true);
    }
    assert_eq!(frames.len(), 4_001);
    assert!(frames[1..].iter().all(|f| f.len() <= REPLY_RESERVE_BYTES));
    let in_order: Vec<u64> = frames[1..]
        .iter()
        .map(|f| {
            serde_json::from_str::<Value>(f).unwrap()["id"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(in_order, ids, "one error per id, in array order");
    let acks = session
        .poll_commands()
        .unwrap_or_default()
        .into_iter()
        .filter(|c| matches!(c, Command::Ack(_)))
        .count();
    assert_eq!(acks, 1, "the next ack, read once the errors are out");
}
