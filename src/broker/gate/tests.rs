//! Model-based test of the gate in simulated time, with and without a log: producers and
//! consumers register, publish (one by one or in a batch), ack (known and unknown ids), pause, resume, end (also
//! in the same request as their last publishes, as a half-closing producer does) or
//! vanish; turns end at arbitrary times; a fake log becomes durable batch by batch when
//! the script says. After every step: no confirm leaves before its publish is durable,
//! no delivery of a message that is not, no reply and no delivery to a connection once it
//! is forgotten, a register's `ok` before any delivery, every lease that ran out at the
//! end of a turn taken back in it; at the end, with everything durable, every answered
//! command answered, in order.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::broker::core::{CoreConfig, NewMessage, TIMER_TICK, WallClock};
use crate::broker::policy::{Policies, QueuePolicy};
use crate::protocol::Payload;

const ACK_TIMEOUT: Duration = Duration::from_millis(100);
const CONNECTIONS: u64 = 6;

/// What the fake log saw, shared with the test.
#[derive(Debug, Default)]
struct LogState {
    next_seq: u64,
    awaited: bool,
    pending: bool,
    pending_publishes: Vec<MessageId>,
    /// The batch each published id was submitted in.
    published_in: BTreeMap<MessageId, u64>,
    submitted: u64,
    durable: u64,
}

#[derive(Clone, Default)]
struct FakeLog(Rc<RefCell<LogState>>);

impl Log for FakeLog {
    fn log_publish(&mut self, message: &LiveMessage<'_>) {
        let mut state = self.0.borrow_mut();
        state.pending = true;
        state.pending_publishes.push(message.id);
    }
    fn log_rewritten(&mut self, _: &LiveMessage<'_>, _: u64) {
        self.0.borrow_mut().pending = true;
    }
    fn log_acked(&mut self, ids: &[MessageId], _: u64) {
        self.0.borrow_mut().pending |= !ids.is_empty();
    }
    fn log_delivered(&mut self, ids: &[MessageId]) {
        self.0.borrow_mut().pending |= !ids.is_empty();
    }
    fn await_pending(&mut self) -> u64 {
        let mut state = self.0.borrow_mut();
        state.awaited = true;
        state.next_seq + 1
    }
    fn submit(&mut self) -> Option<u64> {
        let mut state = self.0.borrow_mut();
        if !state.pending && !state.awaited {
            return None;
        }
        state.next_seq += 1;
        let seq = state.next_seq;
        for id in std::mem::take(&mut state.pending_publishes) {
            state.published_in.insert(id, seq);
        }
        state.pending = false;
        state.awaited = false;
        state.submitted = seq;
        Some(seq)
    }
    fn wants_compaction(&self) -> bool {
        false
    }
    fn compact_oldest<'a>(&mut self, _: impl Iterator<Item = LiveMessage<'a>>) -> usize {
        0
    }
}

#[derive(Debug, Clone)]
enum Op {
    Register {
        conn: u64,
        consumer: bool,
        prefetch: u16,
    },
    Publish {
        conn: u64,
        count: usize,
        /// As one publish_batch.
        batched: bool,
    },
    /// Publishes, then the end of the connection, in one request.
    PublishAndEnd {
        conn: u64,
        count: usize,
    },
    Ack {
        conn: u64,
        pick: usize,
        known: bool,
    },
    Pause {
        conn: u64,
    },
    Resume {
        conn: u64,
    },
    End {
        conn: u64,
    },
    Gone {
        conn: u64,
    },
    EndTurn {
        after_ms: u64,
    },
    /// The log becomes durable through a batch between the last durable and the last
    /// submitted one.
    Durable {
        pick: u64,
    },
    Drain,
}

fn op() -> impl Strategy<Value = Op> {
    let conn = || 0..CONNECTIONS;
    prop_oneof![
        2 => (conn(), any::<bool>(), 1u16..4).prop_map(|(conn, consumer, prefetch)| Op::Register { conn, consumer, prefetch }),
        4 => (conn(), 1usize..4, any::<bool>()).prop_map(|(conn, count, batched)| Op::Publish { conn, count, batched }),
        1 => (conn(), 1usize..4).prop_map(|(conn, count)| Op::PublishAndEnd { conn, count }),
        4 => (conn(), any::<usize>(), prop::bool::weighted(0.8)).prop_map(|(conn, pick, known)| Op::Ack { conn, pick, known }),
        1 => conn().prop_map(|conn| Op::Pause { conn }),
        1 => conn().prop_map(|conn| Op::Resume { conn }),
        1 => conn().prop_map(|conn| Op::End { conn }),
        1 => conn().prop_map(|conn| Op::Gone { conn }),
        5 => (0u64..80).prop_map(|after_ms| Op::EndTurn { after_ms }),
        3 => any::<u64>().prop_map(|pick| Op::Durable { pick }),
        1 => Just(Op::Drain),
    ]
}

/// A connection, as the test sees it from outside the gate.
#[derive(Debug, Default)]
struct Conn {
    role: Option<Role>,
    /// Answered commands sent, and replies received.
    asked: usize,
    answered: usize,
    /// Ids of its publishes that were confirmed.
    confirmed: Vec<MessageId>,
    register_ok: bool,
    /// In flight to it: id -> deadline.
    in_flight: BTreeMap<MessageId, Instant>,
    ended: bool,
    gone: bool,
    forgotten: bool,
}

struct World {
    gate: Gate<FakeLog>,
    log: Option<FakeLog>,
    conns: BTreeMap<u64, Conn>,
    now: Instant,
    /// Ids ever delivered.
    delivered: BTreeSet<MessageId>,
}

impl World {
    fn new(durable: bool) -> World {
        let core = Core::new(CoreConfig {
            policies: Policies::uniform(QueuePolicy::new(ACK_TIMEOUT)),
            max_memory_bytes: u64::MAX,
            wall_clock: WallClock::now(),
        });
        let log = durable.then(FakeLog::default);
        World {
            gate: Gate::new(core, log.clone()),
            log,
            conns: BTreeMap::new(),
            now: Instant::now(),
            delivered: BTreeSet::new(),
        }
    }

    fn durable_batch_of(&self, id: MessageId) -> Option<u64> {
        let log = self.log.as_ref()?.0.borrow();
        log.published_in.get(&id).copied()
    }

    fn is_durable(&self, id: MessageId) -> bool {
        match &self.log {
            None => true,
            Some(log) => self
                .durable_batch_of(id)
                .is_some_and(|seq| seq <= log.0.borrow().durable),
        }
    }

    fn apply(&mut self, conn: u64, commands: Vec<Command>) {
        let state = self.conns.entry(conn).or_default();
        state.asked += commands.iter().filter(|c| c.is_answered()).count();
        if commands.iter().any(|c| matches!(c, Command::Disconnect)) {
            state.ended = true;
        }
        self.gate.apply(ConnectionId(conn), commands);
    }

    fn step(&mut self, op: &Op) {
        match *op {
            Op::Register {
                conn,
                consumer,
                prefetch,
            } => {
                if self
                    .conns
                    .get(&conn)
                    .is_some_and(|c| c.role.is_some() || c.ended || c.gone)
                {
                    return;
                }
                let role = if consumer {
                    Role::Consumer
                } else {
                    Role::Producer
                };
                self.conns.entry(conn).or_default().role = Some(role);
                let queue = QueueName::new("q").unwrap();
                self.apply(
                    conn,
                    vec![Command::Register {
                        role,
                        queue,
                        prefetch,
                        lease: None,
                    }],
                );
            }
            Op::Publish { conn, count, .. } | Op::PublishAndEnd { conn, count } => {
                if !self.is_live(conn, Role::Producer) {
                    return;
                }
                let messages =
                    (0..count).map(|n| NewMessage::now(Payload::from_text(&format!("m{n}"))));
                let mut commands: Vec<Command> = match op {
                    Op::Publish { batched: true, .. } => {
                        vec![Command::PublishBatch(messages.collect())]
                    }
                    _ => messages.map(Command::Publish).collect(),
                };
                if matches!(op, Op::PublishAndEnd { .. }) {
                    commands.push(Command::Disconnect);
                }
                self.apply(conn, commands);
            }
            Op::Ack { conn, pick, known } => {
                if !self.is_live(conn, Role::Consumer) {
                    return;
                }
                let held: Vec<MessageId> = self.conns[&conn].in_flight.keys().copied().collect();
                let id = match held.get(pick % held.len().max(1)) {
                    Some(id) if known => *id,
                    _ => MessageId(1 << 40),
                };
                if self
                    .conns
                    .get_mut(&conn)
                    .unwrap()
                    .in_flight
                    .remove(&id)
                    .is_some()
                {
                    // Acked in time or not, it is the consumer's to ack until taken back.
                }
                self.apply(conn, vec![Command::Ack(Ids::One(id))]);
            }
            Op::Pause { conn } | Op::Resume { conn } => {
                if self.is_live(conn, Role::Consumer) {
                    let command = if matches!(op, Op::Pause { .. }) {
                        Command::Pause
                    } else {
                        Command::Resume
                    };
                    self.apply(conn, vec![command]);
                }
            }
            Op::End { conn } => {
                if self
                    .conns
                    .get(&conn)
                    .is_some_and(|c| c.role.is_some() && !c.ended && !c.gone)
                {
                    self.apply(conn, vec![Command::Disconnect]);
                }
            }
            Op::Gone { conn } => {
                if let Some(state) = self.conns.get_mut(&conn)
                    && state.role.is_some()
                    && !state.gone
                {
                    state.gone = true;
                    state.ended = true;
                    self.gate.handle_gone(ConnectionId(conn));
                }
            }
            Op::EndTurn { after_ms } => {
                self.now += Duration::from_millis(after_ms);
                self.gate.end_turn(self.now);
            }
            Op::Durable { pick } => {
                if let Some(log) = &self.log {
                    let (durable, submitted) = {
                        let state = log.0.borrow();
                        (state.durable, state.submitted)
                    };
                    if submitted > durable {
                        let seq = durable + 1 + pick % (submitted - durable);
                        log.0.borrow_mut().durable = seq;
                        self.gate.handle_durable(seq);
                    }
                }
            }
            Op::Drain => self.gate.begin_drain(),
        }
    }

    fn is_live(&self, conn: u64, role: Role) -> bool {
        self.conns
            .get(&conn)
            .is_some_and(|c| c.role == Some(role) && !c.ended && !c.gone)
    }

    /// Takes what the gate put out and checks each message as a connection receives it.
    fn receive(&mut self) -> Result<(), TestCaseError> {
        while let Some((ConnectionId(conn), message)) = self.gate.poll_outbound() {
            let state = self.conns.get(&conn).expect("a known connection");
            prop_assert!(
                !state.forgotten,
                "{:?} sent to forgotten connection {}",
                message,
                conn
            );
            match message {
                ToConnection::Replies(replies) => {
                    for reply in replies {
                        let confirmed = match &reply {
                            Reply::Published(id) => vec![*id],
                            Reply::PublishedBatch(ids) => ids.clone(),
                            _ => Vec::new(),
                        };
                        for id in confirmed {
                            prop_assert!(
                                self.is_durable(id),
                                "confirm of {} before it is durable",
                                id
                            );
                            self.conns.get_mut(&conn).unwrap().confirmed.push(id);
                        }
                        let state = self.conns.get_mut(&conn).unwrap();
                        if reply == Reply::Registered {
                            state.register_ok = true;
                        }
                        state.answered += 1;
                        prop_assert!(
                            state.answered <= state.asked,
                            "more replies than commands on {}",
                            conn
                        );
                    }
                }
                ToConnection::Deliveries(deliveries) => {
                    for delivery in deliveries {
                        prop_assert!(
                            self.is_durable(delivery.id),
                            "delivery of {} before it is durable",
                            delivery.id
                        );
                        let state = self.conns.get_mut(&conn).unwrap();
                        prop_assert!(
                            state.register_ok,
                            "a delivery before the register's ok on {}",
                            conn
                        );
                        prop_assert!(!state.ended, "a delivery to ended connection {}", conn);
                        state.in_flight.insert(delivery.id, self.now + ACK_TIMEOUT);
                        self.delivered.insert(delivery.id);
                    }
                }
                ToConnection::Revoked(ids) => {
                    let state = self.conns.get_mut(&conn).unwrap();
                    for id in ids {
                        prop_assert!(
                            state
                                .in_flight
                                .remove(&id)
                                .is_some_and(|deadline| deadline <= self.now),
                            "{} taken back from {} before its deadline, or never delivered there",
                            id,
                            conn
                        );
                    }
                }
            }
        }
        while let Some(ConnectionId(conn)) = self.gate.poll_forgotten() {
            let state = self.conns.get_mut(&conn).expect("a known connection");
            prop_assert!(state.ended, "connection {} forgotten before it ended", conn);
            prop_assert!(
                state.gone || state.answered == state.asked,
                "connection {} forgotten with {} of {} replies sent",
                conn,
                state.answered,
                state.asked
            );
            state.forgotten = true;
        }
        Ok(())
    }

    /// After a turn ended at `now`, no live consumer holds a lease that ran out a timer
    /// tick or more before.
    fn check_leases(&self, turn_ended: bool) -> Result<(), TestCaseError> {
        if !turn_ended {
            return Ok(());
        }
        for (conn, state) in &self.conns {
            if state.ended {
                continue;
            }
            for (id, deadline) in &state.in_flight {
                prop_assert!(
                    *deadline + TIMER_TICK > self.now,
                    "{} still in flight to {} after its deadline",
                    id,
                    conn
                );
            }
        }
        Ok(())
    }
}

fn run(ops: &[Op], durable: bool) -> Result<(), TestCaseError> {
    let mut world = World::new(durable);
    for op in ops {
        world.step(op);
        world.receive()?;
        world.check_leases(matches!(op, Op::EndTurn { .. }))?;
    }
    // Everything durable, one more turn: every command answered.
    world.gate.end_turn(world.now);
    if let Some(log) = world.log.clone() {
        let submitted = log.0.borrow().submitted;
        log.0.borrow_mut().durable = submitted;
        world.gate.handle_durable(submitted);
    }
    world.receive()?;
    for (conn, state) in &world.conns {
        if !state.gone {
            prop_assert_eq!(
                state.answered,
                state.asked,
                "replies to connection {}",
                conn
            );
        }
        prop_assert!(
            state.confirmed.windows(2).all(|w| w[0] < w[1]),
            "confirms in order on {}",
            conn
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]
    #[test]
    fn the_gate_releases_nothing_early_and_answers_everything(
        ops in prop::collection::vec(op(), 1..120),
        durable in any::<bool>(),
    ) {
        run(&ops, durable)?;
    }
}

/// A connection's task can be found gone while requests of it are still on their way:
/// they are dropped, with nobody to answer (and nothing to panic about).
#[test]
fn requests_of_a_connection_found_gone_are_dropped() {
    let mut world = World::new(false);
    let conn = ConnectionId(7);
    let queue = QueueName::new("q").unwrap();
    world.gate.apply(
        conn,
        vec![Command::Register {
            role: Role::Producer,
            queue,
            prefetch: 1,
            lease: None,
        }],
    );
    world.gate.handle_gone(conn);
    world.gate.apply(
        conn,
        vec![Command::Publish(NewMessage::now(Payload::from_text(
            "late",
        )))],
    );
    world.gate.end_turn(world.now);
    assert_eq!(world.gate.stats().published_total, 0);
    let sent: Vec<_> = std::iter::from_fn(|| world.gate.poll_outbound()).collect();
    assert_eq!(
        sent,
        [(conn, ToConnection::Replies(vec![Reply::Registered]))]
    );
}
