//! The broker's rules around the core, as a state machine with no I/O: it applies each
//! connection's commands to the [`Core`], logs what must be durable, and holds back what
//! may not leave before the log says it is. The core task (the shell) feeds it requests,
//! time and how far the log is durable, and sends what it puts out; a test drives it the
//! same way, in simulated time, with a log whose durability it decides.
//!
//! What it decides:
//! - **Replies**: one per answered command, to its connection, in command order. With a
//!   log, a confirm is held until the record of its publish is durable, and a
//!   connection's later replies wait behind its held ones (`held_replies`).
//! - **Deliveries**: a new message is deliverable only once its publish is durable (the
//!   core's watermark), so a consumer never sees a message a crash could erase.
//! - **Routes**: a connection that ends keeps its route until every reply held for it is
//!   released: a producer that half-closes after pipelining still gets every confirm.
//!   Its consumer's messages go back at once.
//! - **Turns**: each turn ends with whatever ack timeouts are due (however busy the
//!   turn), the deliveries those timeouts took back (so connections can drop them
//!   unwritten), the deliveries the core can make, and the log records of the turn.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use rustc_hash::FxHashMap;
use tracing::{debug, info};

use super::commands::{Command, ConnectionId, Reply, ToConnection};
use super::core::{
    AckError, Core, CoreStats, Delivery, DrainReport, NewMessage, PublishError, Published,
    Relocated,
};
use super::held_replies::HeldReplies;
use crate::protocol::{Attributes, ErrorCode, Ids, MessageId, Payload, QueueName, Role};
use crate::storage::{Journal, LiveMessage, record};

/// What the gate needs of the durable log: [`Journal`], or a test's stand-in.
pub(crate) trait Log {
    fn log_publish(&mut self, message: &LiveMessage<'_>);
    /// A live message logged again as it is now (dead-lettered, or delayed by a nack);
    /// its records took `replaced_bytes`.
    fn log_rewritten(&mut self, message: &LiveMessage<'_>, replaced_bytes: u64);
    fn log_acked(&mut self, ids: &[MessageId], record_bytes: u64);
    fn log_delivered(&mut self, ids: &[MessageId]);
    /// Marks the batch being logged as awaited and returns its sequence number.
    fn await_pending(&mut self) -> u64;
    /// Submits the batch being logged; its sequence number, if there was anything.
    fn submit(&mut self) -> Option<u64>;
    fn wants_compaction(&self) -> bool;
    /// Copies the live messages of the oldest segment forward; says how many.
    fn compact_oldest<'a>(&mut self, live: impl Iterator<Item = LiveMessage<'a>>) -> usize;
}

impl Log for Journal {
    fn log_publish(&mut self, message: &LiveMessage<'_>) {
        Journal::log_publish(self, message);
    }
    fn log_rewritten(&mut self, message: &LiveMessage<'_>, replaced_bytes: u64) {
        Journal::log_rewritten(self, message, replaced_bytes);
    }
    fn log_acked(&mut self, ids: &[MessageId], record_bytes: u64) {
        Journal::log_acked(self, ids, record_bytes);
    }
    fn log_delivered(&mut self, ids: &[MessageId]) {
        Journal::log_delivered(self, ids);
    }
    fn await_pending(&mut self) -> u64 {
        Journal::await_pending(self)
    }
    fn submit(&mut self) -> Option<u64> {
        Journal::submit(self)
    }
    fn wants_compaction(&self) -> bool {
        Journal::wants_compaction(self)
    }
    fn compact_oldest<'a>(&mut self, live: impl Iterator<Item = LiveMessage<'a>>) -> usize {
        Journal::compact_oldest(self, live)
    }
}

/// What the log needs of a new message once the core has taken it (and its id).
struct Logged {
    payload: Payload,
    priority: u8,
    attributes: Option<Arc<Attributes>>,
}

impl Logged {
    fn of(message: &NewMessage) -> Logged {
        Logged {
            payload: message.payload.clone(),
            priority: message.priority,
            attributes: message.attributes.clone(),
        }
    }

    fn log(self, log: &mut impl Log, queue: &QueueName, published: &Published) {
        log.log_publish(&LiveMessage {
            id: published.id,
            deliveries: 0,
            published_at_ms: published.published_at_ms,
            due_ms: published.due_ms,
            priority: self.priority,
            queue,
            payload: &self.payload,
            attributes: self.attributes.as_deref(),
            dead_letter: None,
        });
    }
}

/// The reply to a command of a connection the gate does not know. Not reached: `apply`
/// passes on only the commands of known connections.
fn unregistered() -> Reply {
    Reply::Refused {
        code: ErrorCode::NotRegistered,
        message: "register first".into(),
        id: None,
    }
}

/// The reply to a refused publish or publish_batch.
fn refused(conn: ConnectionId, queue: &QueueName, refusal: &PublishError) -> Reply {
    debug!(conn = %conn, queue = %queue, %refusal, "publish refused");
    Reply::Refused {
        code: refusal.code(),
        message: refusal.to_string(),
        id: None,
    }
}

/// A registered connection, as the gate knows it.
#[derive(Debug)]
struct Registered {
    role: Role,
    queue: QueueName,
    /// It has ended; it is forgotten once nothing is held for it.
    ended: bool,
}

pub(crate) struct Gate<L> {
    core: Core,
    log: Option<L>,
    connections: FxHashMap<ConnectionId, Registered>,
    held: HeldReplies,
    /// What to send, in order.
    outbound: VecDeque<(ConnectionId, ToConnection)>,
    /// Connections whose routes may go: nothing more will be sent to them.
    forgotten: Vec<ConnectionId>,
    /// Deliveries of the current turn, grouped so each consumer gets one message.
    outgoing: FxHashMap<ConnectionId, Vec<Delivery>>,
    /// Ids acked and delivered this turn, logged together at its end, and the bytes the
    /// acked messages' publish records take.
    acked: Vec<MessageId>,
    acked_record_bytes: u64,
    delivered: Vec<MessageId>,
    /// The highest id published this turn.
    newest_published: Option<MessageId>,
    /// (batch, highest id published in it): when the batch is durable, messages up to
    /// that id may be delivered.
    publish_batches: VecDeque<(u64, MessageId)>,
}

impl<L: Log> Gate<L> {
    /// A gate over `core`; with `log`, over the durable log too (the core then holds
    /// new messages back until they are durable).
    pub fn new(mut core: Core, log: Option<L>) -> Self {
        if log.is_some() {
            core.hold_new_messages();
        }
        Gate {
            core,
            log,
            connections: FxHashMap::default(),
            held: HeldReplies::default(),
            outbound: VecDeque::new(),
            forgotten: Vec::new(),
            outgoing: FxHashMap::default(),
            acked: Vec::new(),
            acked_record_bytes: 0,
            delivered: Vec::new(),
            newest_published: None,
            publish_batches: VecDeque::new(),
        }
    }

    /// Applies one connection's commands, in order. Those of a connection the gate
    /// does not know (its task was found gone, with requests still on their way) are
    /// dropped: nobody is left to answer.
    pub fn apply(&mut self, conn: ConnectionId, commands: Vec<Command>) {
        // A register comes first in its batch, if at all.
        let registers = matches!(commands.first(), Some(Command::Register { .. }));
        if !registers && !self.connections.contains_key(&conn) {
            return;
        }
        let mut replies = Vec::with_capacity(commands.len());
        for command in commands {
            match command {
                Command::Register {
                    role,
                    queue,
                    prefetch,
                    lease,
                } => {
                    if role == Role::Consumer {
                        self.core
                            .subscribe(conn.consumer(), queue.clone(), prefetch, lease);
                    }
                    self.connections.insert(
                        conn,
                        Registered {
                            role,
                            queue,
                            ended: false,
                        },
                    );
                    replies.push(Reply::Registered);
                }
                Command::Publish(message) => replies.push(self.publish(conn, message)),
                Command::PublishBatch(messages) => {
                    replies.push(self.publish_batch(conn, messages));
                }
                Command::Ack(ids) => replies.push(self.settle(&ids, |gate, id| gate.ack(conn, id))),
                Command::Nack { ids, action } => replies.push(
                    self.settle(&ids, |gate, id| gate.core.nack(conn.consumer(), id, action)),
                ),
                Command::Touch { ids, lease } => replies.push(
                    self.settle(&ids, |gate, id| gate.core.touch(conn.consumer(), id, lease)),
                ),
                Command::Pause => self.core.pause(conn.consumer()),
                Command::Resume => self.core.resume(conn.consumer()),
                Command::Disconnect => {
                    // Replies to the commands before it go first.
                    self.reply(conn, std::mem::take(&mut replies));
                    self.end(conn);
                }
            }
        }
        self.reply(conn, replies);
    }

    /// Time has come to `now`: the requests applied next happen then.
    pub fn advance_to(&mut self, now: Instant) {
        self.core.advance_to(now);
    }

    /// The connection's task is gone (its route is closed): nothing more can reach it.
    pub fn handle_gone(&mut self, conn: ConnectionId) {
        self.end(conn);
        if self.connections.remove(&conn).is_some() {
            self.forgotten.push(conn);
        }
    }

    /// The log is durable through batch `seq`: release what waited for it.
    pub fn handle_durable(&mut self, seq: u64) {
        let mut newest_durable = None;
        while let Some(&(batch, newest)) = self.publish_batches.front() {
            if batch > seq {
                break;
            }
            self.publish_batches.pop_front();
            newest_durable = Some(newest);
        }
        if let Some(newest) = newest_durable {
            self.core.make_deliverable(MessageId(newest.0 + 1));
        }
        let mut released = Vec::new();
        for (conn, replies) in self.held.release_through(seq) {
            // A connection whose task is gone has nobody to take them.
            if self.connections.contains_key(&conn) {
                self.outbound
                    .push_back((conn, ToConnection::Replies(replies)));
                released.push(conn);
            }
        }
        // Only once every reply released for it is out, and none is held any more.
        for conn in released {
            if !self.held.holds_for(conn) {
                self.forget_if_ended(conn);
            }
        }
    }

    /// Ends the turn at `now`: ack timeouts that are due, what they took back, the
    /// deliveries the core can make, and the turn's log records, submitted.
    pub fn end_turn(&mut self, now: Instant) {
        if self.core.poll_timeout().is_some_and(|due| due <= now) {
            self.core.handle_timeout(now);
        }
        let mut revoked: FxHashMap<ConnectionId, Vec<MessageId>> = FxHashMap::default();
        for (consumer, id) in self.core.take_expired() {
            revoked
                .entry(ConnectionId(consumer.0))
                .or_default()
                .push(id);
        }
        for (conn, ids) in revoked {
            self.outbound.push_back((conn, ToConnection::Revoked(ids)));
        }
        // Before this turn's deliveries, which may include the dead letters just moved:
        // a move's records go ahead of their delivery's.
        self.log_relocated();
        let logged = self.log.is_some();
        let (delivered, outgoing) = (&mut self.delivered, &mut self.outgoing);
        self.core.dispatch(now, |delivery| {
            if logged {
                delivered.push(delivery.id);
            }
            outgoing
                .entry(ConnectionId(delivery.consumer.0))
                .or_default()
                .push(delivery);
        });
        for (conn, deliveries) in self.outgoing.drain() {
            self.outbound
                .push_back((conn, ToConnection::Deliveries(deliveries)));
        }
        if let Some(log) = &mut self.log {
            log.log_acked(&self.acked, std::mem::take(&mut self.acked_record_bytes));
            log.log_delivered(&self.delivered);
            if log.wants_compaction() {
                let copied = log.compact_oldest(self.core.live_messages());
                debug!(
                    copied,
                    "compacting the log: live messages of its oldest segment copied forward"
                );
            }
            let seq = log.submit();
            if let (Some(seq), Some(newest)) = (seq, self.newest_published.take()) {
                self.publish_batches.push_back((seq, newest));
            }
        }
        self.acked.clear();
        self.delivered.clear();
    }

    /// The next message to send, in order.
    pub fn poll_outbound(&mut self) -> Option<(ConnectionId, ToConnection)> {
        self.outbound.pop_front()
    }

    /// A connection whose route may be dropped.
    pub fn poll_forgotten(&mut self) -> Option<ConnectionId> {
        self.forgotten.pop()
    }

    /// When [`Gate::end_turn`] must next run for an ack timeout.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.core.poll_timeout()
    }

    pub fn begin_drain(&mut self) {
        self.core.begin_drain();
    }

    /// Whether the drain may end: the core is drained and no reply is held.
    pub fn is_drained(&self) -> bool {
        self.core.is_drained() && self.held.is_empty()
    }

    pub fn drain_report(&self) -> DrainReport {
        self.core.drain_report()
    }

    pub fn stats(&self) -> CoreStats {
        self.core.stats()
    }

    /// The log, to close it.
    pub fn take_log(&mut self) -> Option<L> {
        self.log.take()
    }

    fn publish(&mut self, conn: ConnectionId, message: NewMessage) -> Reply {
        let Some(registered) = self.connections.get(&conn) else {
            return unregistered();
        };
        debug_assert_eq!(registered.role, Role::Producer);
        let logged = self.log.is_some().then(|| Logged::of(&message));
        match self.core.publish(&registered.queue, message) {
            Ok(published) => {
                if let (Some(log), Some(logged)) = (&mut self.log, logged) {
                    logged.log(log, &registered.queue, &published);
                    self.newest_published = Some(published.id);
                }
                Reply::Published(published.id)
            }
            Err(refusal) => refused(conn, &registered.queue, &refusal),
        }
    }

    /// A publish_batch: all or none (rule 19), each message logged, one reply.
    fn publish_batch(&mut self, conn: ConnectionId, messages: Vec<NewMessage>) -> Reply {
        let Some(registered) = self.connections.get(&conn) else {
            return unregistered();
        };
        debug_assert_eq!(registered.role, Role::Producer);
        let logged: Option<Vec<Logged>> = self
            .log
            .is_some()
            .then(|| messages.iter().map(Logged::of).collect());
        match self.core.publish_batch(&registered.queue, messages) {
            Ok(published) => {
                if let (Some(log), Some(logged)) = (&mut self.log, logged) {
                    for (published, logged) in published.iter().zip(logged) {
                        logged.log(log, &registered.queue, published);
                    }
                    self.newest_published = published.last().map(|p| p.id);
                }
                Reply::PublishedBatch(published.into_iter().map(|p| p.id).collect())
            }
            Err(refusal) => refused(conn, &registered.queue, &refusal),
        }
    }

    /// Logs the messages the core relocated (timeouts, disconnects, nacks): moved into a
    /// dead-letter queue or delayed (logged again), or dropped (logged as acked).
    fn log_relocated(&mut self) {
        for relocated in self.core.take_relocated() {
            match relocated {
                Relocated::DeadLettered {
                    id,
                    from,
                    to,
                    payload,
                    priority,
                    published_at_ms,
                    attributes,
                    replaced,
                    record: dead_letter,
                } => {
                    debug!(%id, %from, %to, reason = %dead_letter.reason, attempts = dead_letter.attempts, "dead-lettered");
                    if let Some(log) = &mut self.log {
                        let attributes = attributes.as_deref();
                        let replaced_bytes = record::live_record_bytes(
                            &from,
                            &payload,
                            attributes,
                            replaced.as_deref(),
                        );
                        let moved = LiveMessage {
                            id,
                            deliveries: 0,
                            published_at_ms,
                            due_ms: None,
                            priority,
                            queue: &to,
                            payload: &payload,
                            attributes,
                            dead_letter: Some(&dead_letter),
                        };
                        log.log_rewritten(&moved, replaced_bytes);
                    }
                }
                Relocated::Delayed {
                    id,
                    queue,
                    payload,
                    deliveries,
                    priority,
                    published_at_ms,
                    due_ms,
                    attributes,
                    dead_letter,
                } => {
                    if let Some(log) = &mut self.log {
                        let (attributes, dead_letter) =
                            (attributes.as_deref(), dead_letter.as_deref());
                        let replaced_bytes =
                            record::live_record_bytes(&queue, &payload, attributes, dead_letter);
                        let delayed = LiveMessage {
                            id,
                            deliveries,
                            published_at_ms,
                            due_ms: Some(due_ms),
                            priority,
                            queue: &queue,
                            payload: &payload,
                            attributes,
                            dead_letter,
                        };
                        log.log_rewritten(&delayed, replaced_bytes);
                    }
                }
                Relocated::Discarded {
                    id,
                    queue,
                    payload,
                    reason,
                    attributes,
                    dead_letter,
                } => {
                    debug!(%id, %queue, %reason, "dead letter discarded (no dead-letter queue, or a full one)");
                    if self.log.is_some() {
                        self.acked.push(id);
                        self.acked_record_bytes += record::live_record_bytes(
                            &queue,
                            &payload,
                            attributes.as_deref(),
                            dead_letter.as_deref(),
                        );
                    }
                }
            }
        }
    }

    /// Applies an ack, nack or touch to each id in order: the reply lists those not in
    /// flight to the consumer.
    fn settle(
        &mut self,
        ids: &Ids,
        mut apply: impl FnMut(&mut Self, MessageId) -> Result<(), AckError>,
    ) -> Reply {
        // The common frame names one id: no list to gather.
        if let Ids::One(id) = *ids {
            return match apply(self, id) {
                Ok(()) => Reply::Settled,
                Err(_) => Reply::UnknownIds(vec![id]),
            };
        }
        let mut unknown = Vec::new();
        for &id in ids.as_slice() {
            if apply(self, id).is_err() {
                unknown.push(id);
            }
        }
        if unknown.is_empty() {
            Reply::Settled
        } else {
            Reply::UnknownIds(unknown)
        }
    }

    fn ack(&mut self, conn: ConnectionId, id: MessageId) -> Result<(), AckError> {
        let acked = self.core.ack(conn.consumer(), id)?;
        if self.log.is_some()
            && let Some(registered) = self.connections.get(&conn)
        {
            self.acked.push(id);
            self.acked_record_bytes += record::live_record_bytes(
                &registered.queue,
                &acked.payload,
                acked.attributes.as_deref(),
                acked.dead_letter.as_deref(),
            );
        }
        Ok(())
    }

    /// Sends replies, or holds them: a confirm waits until its record is durable, and a
    /// connection's later replies wait behind its earlier ones. The batch is marked
    /// awaited because replies that wait only for their turn (a refusal) log nothing,
    /// and a batch with nothing in it would otherwise never be submitted, nor they
    /// released.
    fn reply(&mut self, conn: ConnectionId, replies: Vec<Reply>) {
        if replies.is_empty() {
            return;
        }
        match &mut self.log {
            Some(log)
                if self.held.holds_for(conn)
                    || replies
                        .iter()
                        .any(|r| matches!(r, Reply::Published(_) | Reply::PublishedBatch(_))) =>
            {
                self.held.hold(log.await_pending(), conn, replies);
            }
            _ => self
                .outbound
                .push_back((conn, ToConnection::Replies(replies))),
        }
    }

    /// A connection ended: its consumer's messages go back now; it is forgotten once
    /// nothing is held for it.
    fn end(&mut self, conn: ConnectionId) {
        let Some(registered) = self.connections.get_mut(&conn) else {
            return;
        };
        if registered.ended {
            return;
        }
        registered.ended = true;
        if registered.role == Role::Consumer {
            let returned = self.core.disconnect(conn.consumer());
            if returned > 0 {
                info!(conn = %conn, queue = %registered.queue, returned, "consumer gone; its in-flight messages are ready again (or dead-lettered, at their limit)");
            }
        }
        if !self.held.holds_for(conn) {
            self.forget_if_ended(conn);
        }
    }

    fn forget_if_ended(&mut self, conn: ConnectionId) {
        if self
            .connections
            .get(&conn)
            .is_some_and(|registered| registered.ended)
        {
            self.connections.remove(&conn);
            self.forgotten.push(conn);
        }
    }
}

#[cfg(test)]
mod tests;
