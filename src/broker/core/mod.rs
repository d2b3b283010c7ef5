//! The queue logic of the broker as a synchronous state machine: no I/O, no clock, no
//! tasks. Everything that happens to it is a method call, and time comes in as an
//! argument, so tests can drive it through any interleaving with simulated time.
//!
//! Inputs (`handle_*` in quinn-proto's terms): [`Core::subscribe`], [`Core::publish`],
//! [`Core::ack`], [`Core::nack`], [`Core::touch`], [`Core::pause`], [`Core::resume`],
//! [`Core::disconnect`], [`Core::handle_timeout`], [`Core::advance_to`],
//! [`Core::begin_drain`]. Outputs: [`Core::dispatch`] (every message it can hand to a
//! consumer now), [`Core::poll_timeout`] (when `handle_timeout` must next be called),
//! [`Core::take_expired`] (deliveries their lease took back) and [`Core::take_relocated`]
//! (messages to log again: dead-lettered into their queue's dead-letter queue, dropped,
//! or delayed by a nack).
//!
//! State, per queue: a FIFO of ready messages (in chunks, so that no publish ever copies a
//! deep backlog), and the queue's consumers in subscription order with a round-robin
//! cursor. Per consumer: its prefetch, its lease, its in-flight messages, and whether its
//! connection has asked for a pause. Globally, in two timing wheels: the leases of the
//! in-flight messages, each cancelled the moment its message is acked or returned; and
//! the delayed messages (a publish's delay, a nack's), which join the back of their
//! queue when due, those due together in id order.
//!
//! Wall-clock time: a message's `published_at`, a dead letter's `at` and a delayed
//! message's due time are milliseconds since the Unix epoch, read from the
//! [`WallClock`] the core was given and the instants it is handed since, so that a due
//! time survives a restart as the time of day it names.
//!
//! Every operation costs time independent of how many messages are queued: the longest
//! are a disconnect or an expiry, in the messages they return.
//!
//! Memory: [`CoreStats::memory_bytes`] counts what queued messages cost, not only their
//! payloads: [`MESSAGE_OVERHEAD_BYTES`] per message and [`QUEUE_OVERHEAD_BYTES`] plus its
//! name per queue, so that `--max-memory` bounds the broker's memory whatever the payload
//! sizes and however many queues.

mod chunked_deque;
mod ready_queue;
mod side_table;
#[cfg(test)]
mod tests;
mod timers;

pub use chunked_deque::CHUNK_LEN as READY_CHUNK_LEN;
pub use timers::TICK as TIMER_TICK;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

// Maps keyed by ids the broker itself assigns use the fast Fx hash; a client cannot choose
// those keys, so it cannot craft collisions. Queue names, which clients choose, keep the
// standard keyed hash.
use rustc_hash::FxHashMap;

use thiserror::Error;

use super::policy::{ACK_TIMEOUT_RANGE, Overflow, Policies, QueuePolicy};
use crate::protocol::{
    Attributes, DeadLetter, DeadLetterReason, Due, ErrorCode, MessageId, PRIORITY_MAX, Payload,
    QueueName, whole_millis,
};
use crate::storage::LiveMessage;

use ready_queue::{Prioritized, ReadyQueue};
use side_table::{Costed, SideTable};
use timers::{TimerKey, TimerWheel};

/// What a message costs the broker beyond its payload and its place in a ready queue
/// (counted with the queue's chunks), against `--max-memory`: the payload's allocation
/// header and rounding and, while it is in flight, its entry in its consumer's in-flight
/// map and its lease in the timer wheel. docs/RELIABILITY.md has the measurements.
pub const MESSAGE_OVERHEAD_BYTES: u64 = 128;

/// What a dead-letter record costs beyond its message: the record, its entry in the
/// core's table of them, and with a log the moved message's entry in the journal's map of
/// copies.
pub const DEAD_LETTER_BYTES: u64 = 96;

/// What a message's attributes (its headers) cost beyond their bytes: their allocation,
/// their entry in the core's table of them, and the allocator's rounding.
pub const ATTRIBUTES_OVERHEAD_BYTES: u64 = 96;

impl Costed for DeadLetter {
    fn cost(&self) -> u64 {
        DEAD_LETTER_BYTES
    }
}

impl Costed for Attributes {
    fn cost(&self) -> u64 {
        ATTRIBUTES_OVERHEAD_BYTES + self.byte_len() as u64
    }
}

/// What a queue costs beyond its name and the chunks of its ready queue: its entry in
/// the queue map and its state.
pub const QUEUE_OVERHEAD_BYTES: u64 = 256;

/// What one place in a ready queue's chunks costs.
pub const READY_SLOT_BYTES: u64 = std::mem::size_of::<ReadyMessage>() as u64;

/// What each priority a queue has used costs beyond its chunks' places: its entry in the
/// list of levels (which grows to room for 16), the spine of its chunk pointers, the
/// chunk's own header and the allocator's.
pub const READY_LEVEL_BYTES: u64 = 256;

/// What a delayed message costs beyond its payload and [`MESSAGE_OVERHEAD_BYTES`]: its
/// timer, and with a log a nack's delay its entry in the journal's map of copies.
pub const DELAYED_MESSAGE_BYTES: u64 = TimerWheel::<DelayedMessage>::ENTRY_BYTES as u64 + 32;

/// Identifies one consumer (one consumer connection) to the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConsumerId(pub u64);

impl std::fmt::Display for ConsumerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Settings of the core.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Each queue's policy: its ack timeout (how long a delivered message may stay
    /// unacked before it is requeued) and where its dead letters go.
    pub policies: Policies,
    /// Where the core reads wall-clock time from (a dead letter's `at`).
    pub wall_clock: WallClock,
    /// Most bytes the queued messages (ready and in flight) and their queues may cost
    /// together; see [`MESSAGE_OVERHEAD_BYTES`] and [`QUEUE_OVERHEAD_BYTES`].
    pub max_memory_bytes: u64,
}

/// Wall-clock time as the core reads it: the Unix time of one instant, from which it
/// counts on with the instants it is given. The core has no clock of its own.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    pub at: Instant,
    /// Milliseconds since the Unix epoch at `at`.
    pub unix_ms: u64,
}

impl WallClock {
    /// The real wall clock, read now.
    pub fn now() -> WallClock {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        // `at` is set back to the start of the millisecond, so that a time read from
        // the clock is the real time rounded down, as the system clock's is.
        let into_millisecond =
            Duration::from_nanos(u64::from(since_epoch.subsec_nanos() % 1_000_000));
        let now = Instant::now();
        WallClock {
            at: now.checked_sub(into_millisecond).unwrap_or(now),
            unix_ms: u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// Milliseconds since the Unix epoch at `now`, rounded down.
    pub fn unix_ms_at(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.at).as_millis();
        self.unix_ms
            .saturating_add(u64::try_from(elapsed).unwrap_or(u64::MAX))
    }

    /// Milliseconds since the Unix epoch at `now`, rounded up: a due time counted from
    /// it is never before the instant it was meant to follow.
    pub fn unix_ms_ceil_at(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.at);
        let rounded_up =
            elapsed.as_millis() + u128::from(!elapsed.subsec_nanos().is_multiple_of(1_000_000));
        self.unix_ms
            .saturating_add(u64::try_from(rounded_up).unwrap_or(u64::MAX))
    }
}

/// A message the core moved, delayed or dropped other than by an ack, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Relocated {
    /// Dead-lettered into `to`, with attempt counting from 0 again and `record`.
    DeadLettered {
        id: MessageId,
        from: QueueName,
        to: QueueName,
        payload: Payload,
        priority: u8,
        published_at_ms: u64,
        attributes: Option<Arc<Attributes>>,
        /// The record it carried before (dead-lettered once already), if any.
        replaced: Option<Arc<DeadLetter>>,
        record: Arc<DeadLetter>,
    },
    /// Delayed by a nack until `due_ms`: logged again with its due time and deliveries.
    Delayed {
        id: MessageId,
        queue: QueueName,
        payload: Payload,
        deliveries: u32,
        priority: u8,
        published_at_ms: u64,
        due_ms: u64,
        attributes: Option<Arc<Attributes>>,
        dead_letter: Option<Arc<DeadLetter>>,
    },
    /// Dead-lettered from `queue` with nowhere to go: dropped, as its policy opted into
    /// or its consumer asked (no dead-letter queue), or because its dead-letter queue
    /// was full (rule 17).
    Discarded {
        id: MessageId,
        queue: QueueName,
        payload: Payload,
        reason: DeadLetterReason,
        attributes: Option<Arc<Attributes>>,
        /// The record it carried before (dead-lettered once already), if any.
        dead_letter: Option<Arc<DeadLetter>>,
    },
}

/// An acked message, as the core lets go of it.
#[derive(Debug, PartialEq, Eq)]
pub struct Acked {
    pub payload: Payload,
    pub attributes: Option<Arc<Attributes>>,
    pub dead_letter: Option<Arc<DeadLetter>>,
}

/// Why a publish was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PublishError {
    #[error(
        "queued messages take {used_bytes} bytes (payloads and bookkeeping) and the limit \
         is {limit_bytes}; retry when consumers have caught up, or raise --max-memory"
    )]
    QueueFull { used_bytes: u64, limit_bytes: u64 },
    #[error(
        "queue `{queue}` holds its max_length of {max_length} messages (ready, delayed and in \
         flight){room}; retry when consumers have caught up, or raise its max_length",
        room = if *.refused > 1 { format!(" and has no room for {}", .refused) } else { String::new() }
    )]
    QueueAtMaxLength {
        queue: QueueName,
        max_length: u64,
        /// How many messages were refused together.
        refused: usize,
    },
    #[error("the broker is shutting down and accepts no new messages")]
    ShuttingDown,
}

impl PublishError {
    /// The contract's error code for this refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            PublishError::QueueFull { .. } | PublishError::QueueAtMaxLength { .. } => {
                ErrorCode::QueueFull
            }
            PublishError::ShuttingDown => ErrorCode::ShuttingDown,
        }
    }
}

/// An accepted publish, as the log records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub id: MessageId,
    /// When it was accepted, in milliseconds since the Unix epoch.
    pub published_at_ms: u64,
    /// When it is due, if it is delayed.
    pub due_ms: Option<u64>,
}

/// What a nack asks for (rule 12).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NackAction {
    /// Try again: after this delay, or, without one, after the queue's backoff.
    Retry(Option<Duration>),
    /// Dead-letter it now, reason `rejected`.
    DeadLetter,
}

/// Why an ack, nack or touch changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AckError {
    #[error(
        "message {0} is not in flight to this consumer: never delivered to it, already acked, \
         or requeued after its ack timeout"
    )]
    UnknownId(MessageId),
}

/// A message as a producer hands it over, for the queue its connection names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    pub payload: Payload,
    /// 0-9, higher first (rule 10); the session checked the range.
    pub priority: u8,
    /// Checked against the queue's `max_delay`.
    pub due: Due,
    /// Its headers, checked by the session.
    pub attributes: Option<Arc<Attributes>>,
}

impl NewMessage {
    /// A message of priority 0, ready at once: what every 1.0 publish is.
    pub fn now(payload: Payload) -> NewMessage {
        NewMessage {
            payload,
            priority: 0,
            due: Due::Now,
            attributes: None,
        }
    }
}

/// A message to hand to a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub consumer: ConsumerId,
    pub id: MessageId,
    pub payload: Payload,
    /// 1 on the first delivery, one more on each redelivery.
    pub attempt: u32,
    pub priority: u8,
    /// When the broker accepted its publish, in milliseconds since the Unix epoch.
    pub published_at_ms: u64,
    /// What its publish attached, if anything.
    pub attributes: Option<Arc<Attributes>>,
    /// Where it was dead-lettered from, if it was.
    pub dead_letter: Option<Arc<DeadLetter>>,
}

/// What a drain achieved, for the shutdown log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DrainReport {
    /// Deliveries made since [`Core::begin_drain`].
    pub delivered: u64,
    /// Messages still ready when the report was taken.
    pub left_ready: usize,
    /// Messages still in flight when the report was taken.
    pub left_in_flight: usize,
    /// Delayed messages, not yet due, when the report was taken.
    pub left_delayed: usize,
}

/// Totals over all queues, kept up to date as things happen so reading them is O(1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CoreStats {
    pub queues: usize,
    pub consumers: usize,
    /// Messages waiting for a consumer.
    pub ready: usize,
    /// Messages delivered and not yet acked.
    pub in_flight: usize,
    /// Messages waiting for their due time.
    pub delayed: usize,
    /// What ready and in-flight messages and their queues cost, as `--max-memory` counts
    /// it: payloads, [`MESSAGE_OVERHEAD_BYTES`] per message, and per queue
    /// [`QUEUE_OVERHEAD_BYTES`], its name and the chunks of its ready queue.
    pub memory_bytes: u64,
    /// Publishes accepted since start.
    pub published_total: u64,
    /// Deliveries since start, redeliveries included.
    pub delivered_total: u64,
    /// Acks that took effect since start.
    pub acked_total: u64,
    /// Nacks that took effect since start.
    pub nacked_total: u64,
    /// Messages moved to a dead-letter queue since start.
    pub dead_lettered_total: u64,
    /// Dead letters dropped (no dead-letter queue, as the policy opted into) since start.
    pub discarded_total: u64,
}

/// The broker's queues, consumers and in-flight messages.
#[derive(Debug)]
pub struct Core {
    config: CoreConfig,
    queues: FxHashMap<QueueName, Queue>,
    consumers: FxHashMap<ConsumerId, Consumer>,
    /// The lease of every in-flight message, and nothing else.
    leases: TimerWheel<(ConsumerId, MessageId)>,
    /// Every delayed message, due at its timer.
    delays: TimerWheel<DelayedMessage>,
    /// Deliveries whose lease ran out since [`Core::take_expired`] last took them.
    expired: Vec<(ConsumerId, MessageId)>,
    /// Queues that may be able to deliver, each at most once.
    dispatch_queue: VecDeque<QueueName>,
    next_id: u64,
    /// `queues`, `consumers` and `delayed` are the sizes of what holds them; the rest is
    /// counted here.
    stats: CoreStats,
    /// `Some` once draining: deliveries made since.
    drained_deliveries: Option<u64>,
    /// The latest `now` seen, so that a clock that steps back cannot take time back.
    latest_now: Option<Instant>,
    /// [`Core::current`] in milliseconds since the Unix epoch, rounded down and up,
    /// worked out once per instant rather than once per publish.
    current_ms: u64,
    current_ms_ceil: u64,
    /// Messages dead-lettered since [`Core::take_relocated`] last took them.
    relocated: Vec<Relocated>,
    /// The dead-letter record of each message that has one.
    dead_letters: SideTable<DeadLetter>,
    /// The attributes of each message whose publish attached any.
    attributes: SideTable<Attributes>,
    /// Restored messages at their delivery limit, for [`Core::end_restore`].
    restored_at_limit: Vec<(QueueName, ReadyMessage)>,
    /// Messages with ids from here on are not delivered yet (durable storage: not yet on
    /// stable storage). `u64::MAX` without storage.
    deliverable_below: u64,
    /// Queues that stopped dispatching at that line, to resume when it moves.
    held_at_watermark: Vec<QueueName>,
}

#[derive(Debug)]
struct Queue {
    /// Resolved when the queue is created, fixed for the broker's lifetime.
    policy: Arc<QueuePolicy>,
    ready: ReadyQueue<ReadyMessage>,
    /// In subscription order; `next_consumer` indexes the next one to try.
    consumers: Vec<ConsumerId>,
    next_consumer: usize,
    /// Its messages waiting in `Core::delays`: it is kept while it has any.
    delayed: usize,
    /// Its messages in flight, counted only when its policy has a `max_length` (the one
    /// reader): elsewhere an ack need not look its queue up.
    in_flight: usize,
    dispatch_scheduled: bool,
    /// Listed in `held_at_watermark`.
    at_watermark: bool,
}

#[derive(Debug)]
struct ReadyMessage {
    id: MessageId,
    payload: Payload,
    /// Deliveries so far; the next one is attempt `deliveries + 1`.
    deliveries: u32,
    priority: u8,
    /// When its publish was accepted, in milliseconds since the Unix epoch.
    published_at_ms: u64,
}

impl Prioritized for ReadyMessage {
    fn priority(&self) -> u8 {
        self.priority
    }
}

/// A message waiting for its due time.
#[derive(Debug)]
pub struct DelayedMessage {
    queue: QueueName,
    message: ReadyMessage,
    /// Milliseconds since the Unix epoch.
    due_ms: u64,
}

#[derive(Debug)]
struct Consumer {
    queue: QueueName,
    prefetch: usize,
    /// The lease of each delivery to it.
    lease: Duration,
    in_flight: FxHashMap<MessageId, InFlight>,
    /// Its connection holds all the output it may: nothing more is delivered to it.
    paused: bool,
    /// Its queue has a `max_length`, so its queue counts what is in flight.
    length_limited: bool,
}

#[derive(Debug)]
struct InFlight {
    payload: Payload,
    attempt: u32,
    priority: u8,
    published_at_ms: u64,
    lease: TimerKey,
    delivered_at: Instant,
}

impl InFlight {
    /// The message, ready again, with this delivery counted.
    fn returned(self, id: MessageId) -> ReadyMessage {
        ReadyMessage {
            id,
            payload: self.payload,
            deliveries: self.attempt,
            priority: self.priority,
            published_at_ms: self.published_at_ms,
        }
    }
}

/// A message recovered from storage, as [`Core::restore`] takes it back.
#[derive(Debug)]
pub struct Restored {
    pub id: MessageId,
    pub payload: Payload,
    pub deliveries: u32,
    pub priority: u8,
    /// 0 when the log did not record it (a log written before version 1.1): the time of
    /// the restore stands in.
    pub published_at_ms: u64,
    /// When it is due, if it was delayed; a time already past makes it ready at once.
    pub due_ms: Option<u64>,
    pub attributes: Option<Attributes>,
    pub dead_letter: Option<DeadLetter>,
}

/// `priority`, which the session (for a publish) and the log decoder (for a restore)
/// already refuse above 9: a ready queue has room for ten priorities, no more.
fn within_priorities(priority: u8) -> u8 {
    debug_assert!(priority <= PRIORITY_MAX, "priority {priority}");
    priority.min(PRIORITY_MAX)
}

/// What a message costs against the memory limit.
fn message_cost(payload: &Payload) -> u64 {
    payload.len() as u64 + MESSAGE_OVERHEAD_BYTES
}

/// What a new message costs against the memory limit, its queue aside.
fn publish_cost(payload: &Payload, due_ms: Option<u64>, attributes: Option<&Attributes>) -> u64 {
    message_cost(payload)
        + if due_ms.is_some() {
            DELAYED_MESSAGE_BYTES
        } else {
            0
        }
        + attributes.map_or(0, Costed::cost)
}

/// What a queue costs against the memory limit.
fn queue_cost(name: &QueueName) -> u64 {
    QUEUE_OVERHEAD_BYTES + name.as_str().len() as u64
}

impl Core {
    /// An empty broker whose first message id will be 1.
    pub fn new(config: CoreConfig) -> Self {
        // Due times count from the wall clock's reading: none is before it.
        let mut delays = TimerWheel::default();
        delays.advance(config.wall_clock.at, |_| {});
        let current_ms = config.wall_clock.unix_ms;
        Core {
            config,
            queues: FxHashMap::default(),
            consumers: FxHashMap::default(),
            leases: TimerWheel::default(),
            delays,
            expired: Vec::new(),
            dispatch_queue: VecDeque::new(),
            next_id: 1,
            stats: CoreStats::default(),
            drained_deliveries: None,
            latest_now: None,
            current_ms,
            current_ms_ceil: current_ms,
            relocated: Vec::new(),
            dead_letters: SideTable::default(),
            attributes: SideTable::default(),
            restored_at_limit: Vec::new(),
            deliverable_below: u64::MAX,
            held_at_watermark: Vec::new(),
        }
    }

    /// From now on, new messages are delivered only once [`Core::make_deliverable`] has
    /// passed their id; messages already held are unaffected. With durable storage, a
    /// consumer must never see a message that a crash could still erase (and whose id
    /// could then be given to another).
    pub fn hold_new_messages(&mut self) {
        self.deliverable_below = self.next_id;
    }

    /// Lets messages with ids below `below` be delivered.
    pub fn make_deliverable(&mut self, below: MessageId) {
        if below.0 <= self.deliverable_below {
            return;
        }
        self.deliverable_below = below.0;
        for name in std::mem::take(&mut self.held_at_watermark) {
            if let Some(queue) = self.queues.get_mut(&name) {
                queue.at_watermark = false;
            }
            self.schedule_dispatch(&name);
        }
    }

    /// Puts a message recovered from storage at the back of its queue, ready (or
    /// delayed, if it is not due yet), with the deliveries and the dead-letter record it
    /// had; ids must come in increasing order. It counts against the memory limit like
    /// any message, but is never refused: it was confirmed long ago.
    pub fn restore(&mut self, queue: &QueueName, restored: Restored) {
        let Restored {
            id,
            payload,
            deliveries,
            priority,
            published_at_ms,
            due_ms,
            attributes,
            dead_letter,
        } = restored;
        debug_assert!(id.0 >= self.next_id, "restored out of order");
        let priority = within_priorities(priority);
        self.next_id = self.next_id.max(id.0 + 1);
        let memory = &mut self.stats.memory_bytes;
        *memory += message_cost(&payload);
        if let Some(record) = dead_letter {
            self.dead_letters.insert(id, Arc::new(record), memory);
        }
        if let Some(attributes) = attributes {
            self.attributes.insert(id, Arc::new(attributes), memory);
        }
        let now_ms = self.now_ms();
        let ready = ReadyMessage {
            id,
            payload,
            deliveries,
            priority,
            published_at_ms: if published_at_ms == 0 {
                now_ms
            } else {
                published_at_ms
            },
        };
        if let Some(due_ms) = due_ms.filter(|&due| due > now_ms) {
            self.hold_until(queue, ready, due_ms);
            return;
        }
        // Its last delivery before the crash may have been its last allowed one: it goes
        // once every message is back, to the back of its dead-letter queue.
        let limit = self.config.policies.for_queue(queue).max_deliveries;
        if limit > 0 && deliveries >= limit {
            self.restored_at_limit.push((queue.clone(), ready));
            return;
        }
        self.stats.ready += 1;
        let memory = &mut self.stats.memory_bytes;
        Self::queue_entry(&mut self.queues, &self.config.policies, memory, queue)
            .push_back(ready, memory);
    }

    /// Ends a restore: the messages restored at their delivery limit are dead-lettered
    /// now, behind everything restored.
    pub fn end_restore(&mut self) {
        for (queue, message) in std::mem::take(&mut self.restored_at_limit) {
            let policy = self.config.policies.for_queue(&queue);
            self.dead_letter(&queue, &policy, message, DeadLetterReason::MaxDeliveries);
        }
    }

    /// The id the next publish will get.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// Makes ids go on from at least `next_id` (after recovery: past every id ever issued).
    pub fn skip_ids_below(&mut self, next_id: u64) {
        self.next_id = self.next_id.max(next_id);
    }

    /// Every message not yet acked, ready, in flight or delayed, with its deliveries so
    /// far, for log compaction. In no particular order.
    pub fn live_messages(&self) -> impl Iterator<Item = LiveMessage<'_>> {
        let (dead_letters, attributes) = (&self.dead_letters, &self.attributes);
        let ready = self.queues.iter().flat_map(move |(name, queue)| {
            queue.ready.iter().map(move |m| LiveMessage {
                id: m.id,
                deliveries: m.deliveries,
                priority: m.priority,
                published_at_ms: m.published_at_ms,
                due_ms: None,
                queue: name,
                payload: &m.payload,
                attributes: attributes.get_ref(m.id).map(|a| &**a),
                dead_letter: dead_letters.get_ref(m.id).map(|r| &**r),
            })
        });
        let in_flight = self.consumers.values().flat_map(move |consumer| {
            consumer.in_flight.iter().map(move |(id, f)| LiveMessage {
                id: *id,
                deliveries: f.attempt,
                priority: f.priority,
                published_at_ms: f.published_at_ms,
                due_ms: None,
                queue: &consumer.queue,
                payload: &f.payload,
                attributes: attributes.get_ref(*id).map(|a| &**a),
                dead_letter: dead_letters.get_ref(*id).map(|r| &**r),
            })
        });
        let delayed = self.delays.values().map(move |d| LiveMessage {
            id: d.message.id,
            deliveries: d.message.deliveries,
            priority: d.message.priority,
            published_at_ms: d.message.published_at_ms,
            due_ms: Some(d.due_ms),
            queue: &d.queue,
            payload: &d.message.payload,
            attributes: attributes.get_ref(d.message.id).map(|a| &**a),
            dead_letter: dead_letters.get_ref(d.message.id).map(|r| &**r),
        });
        ready.chain(in_flight).chain(delayed)
    }

    /// Adds a consumer to `queue` (created if new) as the last in its round-robin order,
    /// with its own lease (the caller checked it against the queue's `max_lease`) or the
    /// queue's `ack_timeout`. A consumer id already subscribed is a caller bug and is
    /// ignored.
    pub fn subscribe(
        &mut self,
        consumer: ConsumerId,
        queue: QueueName,
        prefetch: u16,
        lease: Option<Duration>,
    ) {
        if self.consumers.contains_key(&consumer) {
            debug_assert!(false, "consumer {consumer} subscribed twice");
            return;
        }
        let memory = &mut self.stats.memory_bytes;
        let subscribed = Self::queue_entry(&mut self.queues, &self.config.policies, memory, &queue);
        subscribed.consumers.push(consumer);
        // A lease is at most a year (ACK_TIMEOUT_RANGE); one built past that by hand
        // waits as long as a year, rather than overflow.
        let lease = lease
            .unwrap_or(subscribed.policy.ack_timeout)
            .min(*ACK_TIMEOUT_RANGE.end());
        self.consumers.insert(
            consumer,
            Consumer {
                queue: queue.clone(),
                prefetch: usize::from(prefetch.max(1)),
                lease,
                in_flight: FxHashMap::default(),
                paused: false,
                length_limited: subscribed.policy.max_length > 0,
            },
        );
        self.schedule_dispatch(&queue);
    }

    /// Appends a message to the back of `queue` (created if new), or, when it is due
    /// later, holds it until then; returns its id and times. The caller checked a delay
    /// against the queue's `max_delay`. A queue at its `max_length` under `drop-head`
    /// dead-letters its oldest ready message of the lowest priority to make room.
    ///
    /// # Errors
    /// [`PublishError::ShuttingDown`] once draining; [`PublishError::QueueFull`] when the
    /// message (and its queue, if new) would take what queued messages cost over the
    /// memory limit; [`PublishError::QueueAtMaxLength`] when the queue is full and may
    /// not (`reject-publish`) or cannot (nothing ready) drop a message. Nothing changes
    /// then.
    pub fn publish(
        &mut self,
        queue: &QueueName,
        message: NewMessage,
    ) -> Result<Published, PublishError> {
        self.publish_admitted(queue, message, false)
    }

    /// [`Core::publish`]; when `admitted`, the message was already found to fit (in a
    /// batch) and is not checked again: dropping heads for the batch may have created
    /// a dead-letter queue, and the batch must go in whole.
    #[inline]
    fn publish_admitted(
        &mut self,
        queue: &QueueName,
        message: NewMessage,
        admitted: bool,
    ) -> Result<Published, PublishError> {
        let NewMessage {
            payload,
            priority,
            due,
            attributes,
        } = message;
        let priority = within_priorities(priority);
        if self.drained_deliveries.is_some() {
            return Err(PublishError::ShuttingDown);
        }
        let now_ms = self.now_ms();
        let due_ms = self.due_ms(due);
        let mut existing = self.queues.get_mut(queue);
        let cost = publish_cost(&payload, due_ms, attributes.as_deref())
            + if existing.is_some() {
                0
            } else {
                queue_cost(queue)
            };
        if self.stats.memory_bytes + cost > self.config.max_memory_bytes && !admitted {
            return Err(PublishError::QueueFull {
                used_bytes: self.stats.memory_bytes,
                limit_bytes: self.config.max_memory_bytes,
            });
        }
        // A new queue holds nothing, and room for one message is what a limit means.
        if !admitted && existing.as_ref().is_some_and(|q| q.policy.max_length > 0) {
            self.make_room(queue, 1)?;
            existing = self.queues.get_mut(queue);
        }
        let id = MessageId(self.next_id);
        self.next_id += 1;
        self.stats.published_total += 1;
        let ready_message = ReadyMessage {
            id,
            payload,
            deliveries: 0,
            priority,
            published_at_ms: now_ms,
        };
        let published = Published {
            id,
            published_at_ms: now_ms,
            due_ms,
        };
        self.stats.memory_bytes += message_cost(&ready_message.payload);
        if let Some(attributes) = attributes {
            self.attributes
                .insert(id, attributes, &mut self.stats.memory_bytes);
        }
        if let Some(due_ms) = due_ms {
            self.hold_until(queue, ready_message, due_ms);
            return Ok(published);
        }
        self.stats.ready += 1;
        let memory = &mut self.stats.memory_bytes;
        match existing {
            Some(existing) => {
                existing.push_back(ready_message, memory);
                if existing.claim_dispatch() {
                    self.dispatch_queue.push_back(queue.clone());
                }
            }
            None => {
                *memory += queue_cost(queue);
                let mut created = Queue::new(self.config.policies.for_queue(queue));
                created.push_back(ready_message, memory);
                self.queues.insert(queue.clone(), created);
                self.schedule_dispatch(queue);
            }
        }
        Ok(published)
    }

    /// Publishes `messages` to `queue` all or none (rule 19): each as [`Core::publish`]
    /// would, with consecutive ids in order, once the whole batch is known to fit the
    /// memory limit and the queue's `max_length`.
    ///
    /// # Errors
    /// As [`Core::publish`], for the batch as a whole; nothing changes then.
    pub fn publish_batch(
        &mut self,
        queue: &QueueName,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<Published>, PublishError> {
        if self.drained_deliveries.is_some() {
            return Err(PublishError::ShuttingDown);
        }
        let new_queue = if self.queues.contains_key(queue) {
            0
        } else {
            queue_cost(queue)
        };
        let cost = messages.iter().fold(new_queue, |cost, m| {
            cost + publish_cost(&m.payload, self.due_ms(m.due), m.attributes.as_deref())
        });
        if self.stats.memory_bytes + cost > self.config.max_memory_bytes {
            return Err(PublishError::QueueFull {
                used_bytes: self.stats.memory_bytes,
                limit_bytes: self.config.max_memory_bytes,
            });
        }
        self.make_room(queue, messages.len())?;
        messages
            .into_iter()
            .map(|message| self.publish_admitted(queue, message, true))
            .collect()
    }

    /// A publish's due time, if it is later than now.
    fn due_ms(&self, due: Due) -> Option<u64> {
        match due {
            Due::Now => None,
            // Counted from now rounded up, so that it is never early (rule 13).
            Due::After(delay) => Some(self.current_ms_ceil.saturating_add(whole_millis(delay))),
            Due::At(at_ms) => Some(at_ms),
        }
        // Due now, or already past: ready at once.
        .filter(|&due_ms| due_ms > self.now_ms())
    }

    /// Holds a message (already counted in `memory_bytes` as a message) until `due_ms`,
    /// in `queue` (created if new).
    fn hold_until(&mut self, queue: &QueueName, message: ReadyMessage, due_ms: u64) {
        let memory = &mut self.stats.memory_bytes;
        Self::queue_entry(&mut self.queues, &self.config.policies, memory, queue).delayed += 1;
        *memory += DELAYED_MESSAGE_BYTES;
        let at = self.instant_at(due_ms);
        self.delays.insert(
            at,
            DelayedMessage {
                queue: queue.clone(),
                message,
                due_ms,
            },
        );
    }

    /// Removes message `id` for good, if it is in flight to `consumer`, and returns its
    /// payload.
    ///
    /// # Errors
    /// [`AckError::UnknownId`] when it is not (never delivered to this consumer, already
    /// acked, or requeued); nothing changes then.
    pub fn ack(&mut self, consumer: ConsumerId, id: MessageId) -> Result<Acked, AckError> {
        let acked = self.take_in_flight(consumer, id)?;
        self.stats.memory_bytes -= message_cost(&acked.payload);
        self.stats.acked_total += 1;
        let memory = &mut self.stats.memory_bytes;
        Ok(Acked {
            payload: acked.payload,
            attributes: self.attributes.remove(id, memory),
            dead_letter: self.dead_letters.remove(id, memory),
        })
    }

    /// Takes message `id` out of flight to `consumer` (its lease cancelled, its prefetch
    /// slot free), if it is in flight to it.
    fn take_in_flight(
        &mut self,
        consumer: ConsumerId,
        id: MessageId,
    ) -> Result<InFlight, AckError> {
        let holder = self
            .consumers
            .get_mut(&consumer)
            .ok_or(AckError::UnknownId(id))?;
        let taken = holder
            .in_flight
            .remove(&id)
            .ok_or(AckError::UnknownId(id))?;
        self.leases.remove(taken.lease);
        self.stats.in_flight -= 1;
        if holder.length_limited
            && let Some(queue) = self.queues.get_mut(&holder.queue)
        {
            queue.in_flight -= 1;
        }
        // Only a consumer that was full held its queue's dispatch back: one with room
        // to spare already had it scheduled if anything was ready.
        let was_full = holder.in_flight.len() + 1 == holder.prefetch;
        if was_full && !holder.paused {
            let queue = holder.queue.clone();
            self.schedule_dispatch(&queue);
        }
        Ok(taken)
    }

    /// Takes message `id` out of flight to `consumer` and, as rule 12 says: dead-letters
    /// it (asked to, or at its queue's `max_deliveries`), or puts it at the back of its
    /// queue, or delays it (by the nack's delay, or else the queue's backoff). The caller
    /// checked a delay against the queue's `max_delay`.
    ///
    /// # Errors
    /// [`AckError::UnknownId`] when it is not in flight to `consumer`; nothing changes.
    pub fn nack(
        &mut self,
        consumer: ConsumerId,
        id: MessageId,
        action: NackAction,
    ) -> Result<(), AckError> {
        let nacked = self.take_in_flight(consumer, id)?;
        self.stats.nacked_total += 1;
        let name = self.consumers[&consumer].queue.clone();
        let message = nacked.returned(id);
        // A consumer's queue lives while it is subscribed.
        let Some(queue) = self.queues.get_mut(&name) else {
            debug_assert!(false, "consumer {consumer} of a missing queue");
            return Ok(());
        };
        let limit = queue.policy.max_deliveries;
        let dead_letter_reason = match action {
            NackAction::DeadLetter => Some(DeadLetterReason::Rejected),
            NackAction::Retry(_) if limit > 0 && message.deliveries >= limit => {
                Some(DeadLetterReason::MaxDeliveries)
            }
            NackAction::Retry(_) => None,
        };
        if let Some(reason) = dead_letter_reason {
            let policy = queue.policy.clone();
            self.dead_letter(&name, &policy, message, reason);
            return Ok(());
        }
        let delay = match action {
            NackAction::Retry(Some(delay)) => delay,
            _ => queue.policy.backoff(message.deliveries),
        };
        if delay.is_zero() {
            // The common nack: to the back, with the queue looked up once.
            self.stats.ready += 1;
            queue.push_back(message, &mut self.stats.memory_bytes);
            if queue.claim_dispatch() {
                self.dispatch_queue.push_back(name);
            }
            return Ok(());
        }
        let queue = name;
        let due_ms = self.current_ms_ceil.saturating_add(whole_millis(delay));
        self.relocated.push(Relocated::Delayed {
            id,
            queue: queue.clone(),
            payload: message.payload.clone(),
            deliveries: message.deliveries,
            priority: message.priority,
            published_at_ms: message.published_at_ms,
            due_ms,
            attributes: self.attributes.get(id),
            dead_letter: self.dead_letters.get(id),
        });
        self.hold_until(&queue, message, due_ms);
        Ok(())
    }

    /// Restarts the lease of message `id`, in flight to `consumer`, from now (rule 16):
    /// `lease`, or else the consumer's, but never past its queue's `max_lease` from the
    /// delivery. The caller checked `lease` against `max_lease`.
    ///
    /// # Errors
    /// [`AckError::UnknownId`] when it is not in flight to `consumer`; nothing changes.
    pub fn touch(
        &mut self,
        consumer: ConsumerId,
        id: MessageId,
        lease: Option<Duration>,
    ) -> Result<(), AckError> {
        let now = self.current();
        let holder = self
            .consumers
            .get_mut(&consumer)
            .ok_or(AckError::UnknownId(id))?;
        let max_lease = match self.queues.get(&holder.queue) {
            Some(queue) => queue.policy.max_lease,
            None => *ACK_TIMEOUT_RANGE.end(),
        };
        let lease = lease.unwrap_or(holder.lease).min(*ACK_TIMEOUT_RANGE.end());
        let touched = holder
            .in_flight
            .get_mut(&id)
            .ok_or(AckError::UnknownId(id))?;
        let deadline =
            (now + lease).min(touched.delivered_at + max_lease.min(*ACK_TIMEOUT_RANGE.end()));
        self.leases.remove(touched.lease);
        touched.lease = self.leases.insert(deadline.max(now), (consumer, id));
        Ok(())
    }

    /// Stops delivering to `consumer` (its connection holds as much output as it may)
    /// until [`Core::resume`]. Its in-flight messages keep their leases. Unknown ids are
    /// ignored.
    pub fn pause(&mut self, consumer: ConsumerId) {
        if let Some(paused) = self.consumers.get_mut(&consumer) {
            paused.paused = true;
        }
    }

    /// Delivers to `consumer` again after [`Core::pause`].
    pub fn resume(&mut self, consumer: ConsumerId) {
        if let Some(resumed) = self.consumers.get_mut(&consumer)
            && resumed.paused
        {
            resumed.paused = false;
            let queue = resumed.queue.clone();
            self.schedule_dispatch(&queue);
        }
    }

    /// Forgets `consumer` and returns all its in-flight messages to the front of its
    /// queue, in id order; says how many. Unknown ids (producers, say) are ignored.
    pub fn disconnect(&mut self, consumer: ConsumerId) -> usize {
        let Some(gone) = self.consumers.remove(&consumer) else {
            return 0;
        };
        let Some(queue) = self.queues.get_mut(&gone.queue) else {
            debug_assert!(false, "consumer {consumer} of a missing queue");
            return 0;
        };
        if let Some(position) = queue.consumers.iter().position(|&c| c == consumer) {
            queue.consumers.remove(position);
            if position < queue.next_consumer {
                queue.next_consumer -= 1;
            }
            if queue.next_consumer >= queue.consumers.len() {
                queue.next_consumer = 0;
            }
        }
        let leases = &mut self.leases;
        let returning: Vec<_> = gone
            .in_flight
            .into_iter()
            .map(|(id, f)| {
                leases.remove(f.lease);
                f.returned(id)
            })
            .collect();
        let returned = returning.len();
        self.return_messages(&gone.queue, returning);
        if let Some(queue) = self.queues.get(&gone.queue)
            && queue.ready.is_empty()
            && queue.consumers.is_empty()
            && queue.delayed == 0
        {
            // Nothing left to remember: a queue is created again on first use.
            self.stats.memory_bytes -= queue_cost(&gone.queue) + queue.ready_bytes();
            self.queues.remove(&gone.queue);
        }
        returned
    }

    /// Puts messages taken out of flight back at the front of `name`, in id order, or,
    /// those whose deliveries reached the queue's `max_deliveries`, dead-letters them.
    fn return_messages(&mut self, name: &QueueName, returning: Vec<ReadyMessage>) {
        let Some(queue) = self.queues.get_mut(name) else {
            debug_assert!(false, "messages returned to a missing queue {name}");
            return;
        };
        let policy = queue.policy.clone();
        let limit = policy.max_deliveries;
        let (mut dead, back): (Vec<_>, Vec<_>) = returning
            .into_iter()
            .partition(|m| limit > 0 && m.deliveries >= limit);
        self.stats.in_flight -= dead.len() + back.len();
        if policy.max_length > 0 {
            queue.in_flight -= dead.len() + back.len();
        }
        self.stats.ready += back.len();
        queue.requeue_at_front(back, &mut self.stats.memory_bytes);
        self.schedule_dispatch(name);
        dead.sort_unstable_by_key(|m| m.id);
        for message in dead {
            self.dead_letter(name, &policy, message, DeadLetterReason::MaxDeliveries);
        }
    }

    /// Moves a message to the back of its queue's dead-letter queue, with a record of
    /// where it came from and attempt counting from 0 again; or, without a dead-letter
    /// queue, drops it (rule 15: the policy opted into that with `discard_dead_letters`
    /// or `drop-head`, or the consumer asked for it by name). A dead-letter queue at its
    /// `max_length` takes it as it takes a publish (rule 17), and when it cannot, the
    /// dead letter is dropped: it never goes back.
    fn dead_letter(
        &mut self,
        from: &QueueName,
        policy: &QueuePolicy,
        message: ReadyMessage,
        reason: DeadLetterReason,
    ) {
        let to = match &policy.dead_letter_queue {
            Some(to) if self.make_room(to, 1).is_ok() => to,
            to => {
                debug_assert!(
                    to.is_some()
                        || policy.discard_dead_letters
                        || matches!(
                            reason,
                            DeadLetterReason::Rejected | DeadLetterReason::Overflow
                        ),
                    "a dead letter with nowhere to go"
                );
                self.discard(from, message, reason);
                return;
            }
        };
        let record = Arc::new(DeadLetter {
            queue: from.clone(),
            reason,
            attempts: message.deliveries,
            at_ms: self.now_ms(),
        });
        let replaced =
            self.dead_letters
                .insert(message.id, record.clone(), &mut self.stats.memory_bytes);
        self.relocated.push(Relocated::DeadLettered {
            id: message.id,
            from: from.clone(),
            to: to.clone(),
            payload: message.payload.clone(),
            priority: message.priority,
            published_at_ms: message.published_at_ms,
            attributes: self.attributes.get(message.id),
            replaced,
            record,
        });
        let moved = ReadyMessage {
            deliveries: 0,
            ..message
        };
        self.stats.ready += 1;
        self.stats.dead_lettered_total += 1;
        let memory = &mut self.stats.memory_bytes;
        Self::queue_entry(&mut self.queues, &self.config.policies, memory, to)
            .push_back(moved, memory);
        self.schedule_dispatch(to);
    }

    /// Drops a dead letter of `from` that has nowhere to go, and counts it.
    fn discard(&mut self, from: &QueueName, message: ReadyMessage, reason: DeadLetterReason) {
        let memory = &mut self.stats.memory_bytes;
        *memory -= message_cost(&message.payload);
        self.stats.discarded_total += 1;
        self.relocated.push(Relocated::Discarded {
            id: message.id,
            queue: from.clone(),
            payload: message.payload,
            reason,
            attributes: self.attributes.remove(message.id, memory),
            dead_letter: self.dead_letters.remove(message.id, memory),
        });
    }

    /// Makes room for `incoming` more messages in queue `name` under its `max_length`
    /// (rule 17): under `drop-head`, dead-letters (reason `overflow`) as many of its
    /// oldest ready messages of the lowest priority as must go.
    ///
    /// # Errors
    /// [`PublishError::QueueAtMaxLength`] when they cannot all fit: the queue may not
    /// (`reject-publish`) or cannot (too little ready) drop enough. Nothing changes then.
    fn make_room(&mut self, name: &QueueName, incoming: usize) -> Result<(), PublishError> {
        let (policy, length, ready) = match self.queues.get(name) {
            Some(queue) => (queue.policy.clone(), queue.length(), queue.ready.len()),
            None => (self.config.policies.for_queue(name), 0, 0),
        };
        if policy.max_length == 0 {
            return Ok(());
        }
        let excess = (length + incoming as u64).saturating_sub(policy.max_length);
        if excess == 0 {
            return Ok(());
        }
        if policy.overflow == Overflow::RejectPublish || excess > ready as u64 {
            return Err(PublishError::QueueAtMaxLength {
                queue: name.clone(),
                max_length: policy.max_length,
                refused: incoming,
            });
        }
        for _ in 0..excess {
            let queue = self
                .queues
                .get_mut(name)
                .expect("a queue with ready messages");
            let dropped = queue
                .drop_head(&mut self.stats.memory_bytes)
                .expect("as many ready messages as counted");
            self.stats.ready -= 1;
            self.dead_letter(name, &policy, dropped, DeadLetterReason::Overflow);
        }
        Ok(())
    }

    /// The messages dead-lettered (moved or dropped) since the last call, in order.
    pub fn take_relocated(&mut self) -> Vec<Relocated> {
        std::mem::take(&mut self.relocated)
    }

    /// Returns every message whose lease ends at or before `now` to the front of its
    /// queue (messages of one queue that expire together keep their id order; each is
    /// also listed for [`Core::take_expired`]), and makes every delayed message due by
    /// `now` ready.
    pub fn handle_timeout(&mut self, now: Instant) {
        let now = self.observe(now);
        let mut expired: FxHashMap<QueueName, Vec<ReadyMessage>> = FxHashMap::default();
        let (consumers, taken_back) = (&mut self.consumers, &mut self.expired);
        self.leases.advance(now, |(consumer, id)| {
            let holder = consumers
                .get_mut(&consumer)
                .expect("a lease belongs to a connected consumer");
            let f = holder
                .in_flight
                .remove(&id)
                .expect("a lease belongs to a message in flight");
            taken_back.push((consumer, id));
            expired
                .entry(holder.queue.clone())
                .or_default()
                .push(f.returned(id));
        });
        // Queues in name order, so that dead letters of several reach theirs in an order
        // that does not depend on hashing.
        let mut expired: Vec<_> = expired.into_iter().collect();
        expired.sort_unstable_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        for (name, returning) in expired {
            self.return_messages(&name, returning);
        }
        let mut due = Vec::new();
        self.delays.advance(now, |delayed| due.push(delayed));
        // Those due together become ready in id order (rule 13).
        due.sort_unstable_by_key(|d| (d.due_ms, d.message.id));
        for DelayedMessage { queue, message, .. } in due {
            self.stats.ready += 1;
            let memory = &mut self.stats.memory_bytes;
            *memory -= DELAYED_MESSAGE_BYTES;
            let ready = Self::queue_entry(&mut self.queues, &self.config.policies, memory, &queue);
            ready.delayed -= 1;
            ready.push_back(message, memory);
            self.schedule_dispatch(&queue);
        }
    }

    /// When [`Core::handle_timeout`] must next be called: at most a [`TIMER_TICK`] after
    /// the earliest lease deadline or due time (sooner when a timing wheel has entries to
    /// move).
    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.leases.next_deadline(), self.delays.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The deliveries whose lease ran out since the last call, by consumer: a connection
    /// that has not written them yet need not (their messages are ready again).
    pub fn take_expired(&mut self) -> Vec<(ConsumerId, MessageId)> {
        std::mem::take(&mut self.expired)
    }

    /// Makes every delivery the core can make now, handing each to `deliver` in order:
    /// while a queue has a ready message and a consumer with spare prefetch, the message
    /// moves to the in-flight set with deadline `now +` its consumer's lease. Queues take
    /// turns in the order they became deliverable; each is looked up once per turn, not
    /// once per message.
    pub fn dispatch(&mut self, now: Instant, mut deliver: impl FnMut(Delivery)) {
        let now = self.observe(now);
        while let Some(name) = self.dispatch_queue.pop_front() {
            let Some(queue) = self.queues.get_mut(&name) else {
                continue;
            };
            queue.dispatch_scheduled = false;
            // Most consumers lease for their queue's timeout: one deadline for them all.
            let queue_lease = queue.policy.ack_timeout.min(*ACK_TIMEOUT_RANGE.end());
            let queue_deadline = (queue_lease, now + queue_lease);
            loop {
                if queue
                    .ready
                    .front()
                    .is_some_and(|m| m.id.0 >= self.deliverable_below)
                {
                    // The front message is not durable yet. What is behind it is newer
                    // still, or of a lower priority: rule 10 holds those back too until
                    // the group commit that makes the front one durable.
                    if !queue.at_watermark {
                        queue.at_watermark = true;
                        self.held_at_watermark.push(name);
                    }
                    break;
                }
                let Some(delivery) = queue.deliver_next(
                    &mut self.consumers,
                    &mut self.leases,
                    now,
                    queue_deadline,
                    (&self.dead_letters, &self.attributes),
                    &mut self.stats.memory_bytes,
                ) else {
                    break;
                };
                self.stats.ready -= 1;
                self.stats.in_flight += 1;
                self.stats.delivered_total += 1;
                if let Some(count) = &mut self.drained_deliveries {
                    *count += 1;
                }
                deliver(delivery);
            }
        }
    }

    /// Starts the graceful-shutdown drain: publishes are refused from now on, deliveries
    /// and acks go on.
    pub fn begin_drain(&mut self) {
        self.drained_deliveries.get_or_insert(0);
    }

    pub fn is_draining(&self) -> bool {
        self.drained_deliveries.is_some()
    }

    /// True when the drain can end: nothing is in flight, and every queue with ready
    /// messages has no consumer left to take them.
    pub fn is_drained(&self) -> bool {
        self.stats.in_flight == 0
            && (self.stats.ready == 0
                || self
                    .queues
                    .values()
                    .all(|q| q.ready.is_empty() || q.consumers.is_empty()))
    }

    /// Deliveries made since the drain began, and what is left.
    pub fn drain_report(&self) -> DrainReport {
        let stats = self.stats();
        DrainReport {
            delivered: self.drained_deliveries.unwrap_or(0),
            left_ready: stats.ready,
            left_in_flight: stats.in_flight,
            left_delayed: stats.delayed,
        }
    }

    pub fn stats(&self) -> CoreStats {
        debug_assert_eq!(
            self.leases.len(),
            self.stats.in_flight,
            "one lease per message in flight"
        );
        CoreStats {
            queues: self.queues.len(),
            consumers: self.consumers.len(),
            delayed: self.delays.len(),
            ..self.stats
        }
    }

    /// Ids of `queue`'s ready messages, front first.
    pub fn ready_ids(&self, queue: &QueueName) -> Vec<MessageId> {
        self.queues
            .get(queue)
            .map(|q| q.ready.iter().map(|m| m.id).collect())
            .unwrap_or_default()
    }

    /// Ids in flight to `consumer`, in id order.
    pub fn in_flight_ids(&self, consumer: ConsumerId) -> Vec<MessageId> {
        let mut ids: Vec<_> = self
            .consumers
            .get(&consumer)
            .map(|c| c.in_flight.keys().copied().collect())
            .unwrap_or_default();
        ids.sort_unstable();
        ids
    }

    /// Time has come to `now`: what happens from here on without an instant of its own (a
    /// disconnect's dead letters) is stamped with it.
    pub fn advance_to(&mut self, now: Instant) {
        self.observe(now);
    }

    fn observe(&mut self, now: Instant) -> Instant {
        let latest = self.latest_now.map_or(now, |latest| latest.max(now));
        if self.latest_now.is_none() {
            // The wheels count from the first instant seen, so nothing can come before it.
            self.leases.advance(latest, |_| {});
        }
        if self.latest_now != Some(latest) {
            self.latest_now = Some(latest);
            self.current_ms = self.config.wall_clock.unix_ms_at(self.current());
            self.current_ms_ceil = self.config.wall_clock.unix_ms_ceil_at(self.current());
        }
        latest
    }

    /// The latest instant the core was given (or its wall clock's, before any): what
    /// happens without an instant of its own happens then.
    fn current(&self) -> Instant {
        self.latest_now
            .unwrap_or(self.config.wall_clock.at)
            .max(self.config.wall_clock.at)
    }

    /// [`Core::current`] in milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64 {
        self.current_ms
    }

    /// The instant of a time in milliseconds since the Unix epoch; any time before the
    /// wall clock's reading is its instant (already past).
    fn instant_at(&self, unix_ms: u64) -> Instant {
        let clock = self.config.wall_clock;
        clock.at + Duration::from_millis(unix_ms.saturating_sub(clock.unix_ms))
    }

    /// The queue named `name`, created (and counted in `memory_bytes`) if new.
    fn queue_entry<'q>(
        queues: &'q mut FxHashMap<QueueName, Queue>,
        policies: &Policies,
        memory_bytes: &mut u64,
        name: &QueueName,
    ) -> &'q mut Queue {
        if !queues.contains_key(name) {
            *memory_bytes += queue_cost(name);
        }
        queues
            .entry(name.clone())
            .or_insert_with(|| Queue::new(policies.for_queue(name)))
    }

    fn schedule_dispatch(&mut self, name: &QueueName) {
        if let Some(queue) = self.queues.get_mut(name)
            && queue.claim_dispatch()
        {
            self.dispatch_queue.push_back(name.clone());
        }
    }
}

impl Queue {
    fn new(policy: Arc<QueuePolicy>) -> Queue {
        Queue {
            policy,
            ready: ReadyQueue::default(),
            consumers: Vec::new(),
            next_consumer: 0,
            delayed: 0,
            in_flight: 0,
            dispatch_scheduled: false,
            at_watermark: false,
        }
    }

    /// Marks the queue as waiting for dispatch if it has messages ready, consumers to
    /// take them and is not waiting already; true if the caller must put it on the
    /// dispatch queue.
    fn claim_dispatch(&mut self) -> bool {
        let claim =
            !self.dispatch_scheduled && !self.ready.is_empty() && !self.consumers.is_empty();
        self.dispatch_scheduled |= claim;
        claim
    }

    /// What its `max_length` counts (rule 17): ready, delayed and in flight. Only a queue
    /// with a `max_length` counts what is in flight.
    fn length(&self) -> u64 {
        (self.ready.len() + self.delayed + self.in_flight) as u64
    }

    /// Takes the oldest ready message of the lowest priority, to drop it (rule 17);
    /// `memory_bytes` follows the chunks.
    fn drop_head(&mut self, memory_bytes: &mut u64) -> Option<ReadyMessage> {
        let before = self.ready_bytes();
        let dropped = self.ready.pop_lowest()?;
        *memory_bytes -= before - self.ready_bytes();
        Some(dropped)
    }

    /// What its ready queue takes: the places of its chunks, and each priority's level.
    fn ready_bytes(&self) -> u64 {
        self.ready.capacity() as u64 * READY_SLOT_BYTES
            + self.ready.level_count() as u64 * READY_LEVEL_BYTES
    }

    /// Appends a ready message; `memory_bytes` follows the chunks.
    fn push_back(&mut self, message: ReadyMessage, memory_bytes: &mut u64) {
        let before = self.ready_bytes();
        self.ready.push_back(message);
        *memory_bytes += self.ready_bytes() - before;
    }

    /// Puts messages back at the front, ahead of everything ready, in id order;
    /// `memory_bytes` follows the chunks.
    fn requeue_at_front(&mut self, mut returning: Vec<ReadyMessage>, memory_bytes: &mut u64) {
        let before = self.ready_bytes();
        returning.sort_unstable_by_key(|m| m.id);
        for message in returning.into_iter().rev() {
            self.ready.push_front(message);
        }
        *memory_bytes += self.ready_bytes() - before;
    }

    /// Hands the front message to the next consumer in round-robin order with spare
    /// prefetch and no pause, if there is a message and such a consumer; its lease starts
    /// at `now` (and ends at `queue_deadline`'s instant when it is the queue's lease).
    fn deliver_next(
        &mut self,
        consumers: &mut FxHashMap<ConsumerId, Consumer>,
        leases: &mut TimerWheel<(ConsumerId, MessageId)>,
        now: Instant,
        queue_deadline: (Duration, Instant),
        (dead_letters, attributes): (&SideTable<DeadLetter>, &SideTable<Attributes>),
        memory_bytes: &mut u64,
    ) -> Option<Delivery> {
        if self.ready.is_empty() {
            return None;
        }
        let count = self.consumers.len();
        for step in 0..count {
            let index = (self.next_consumer + step) % count;
            let consumer_id = self.consumers[index];
            let Some(consumer) = consumers.get_mut(&consumer_id) else {
                debug_assert!(false, "queue lists unknown consumer {consumer_id}");
                continue;
            };
            if consumer.paused || consumer.in_flight.len() >= consumer.prefetch {
                continue;
            }
            let before = self.ready_bytes();
            let message = self.ready.pop_front()?;
            *memory_bytes -= before - self.ready_bytes();
            let attempt = message.deliveries.saturating_add(1);
            let deadline = match queue_deadline {
                (lease, deadline) if lease == consumer.lease => deadline,
                _ => now + consumer.lease,
            };
            if consumer.length_limited {
                self.in_flight += 1;
            }
            consumer.in_flight.insert(
                message.id,
                InFlight {
                    payload: message.payload.clone(),
                    attempt,
                    priority: message.priority,
                    published_at_ms: message.published_at_ms,
                    lease: leases.insert(deadline, (consumer_id, message.id)),
                    delivered_at: now,
                },
            );
            self.next_consumer = (index + 1) % count;
            return Some(Delivery {
                consumer: consumer_id,
                id: message.id,
                payload: message.payload,
                attempt,
                priority: message.priority,
                published_at_ms: message.published_at_ms,
                attributes: attributes.get(message.id),
                dead_letter: dead_letters.get(message.id),
            });
        }
        None
    }
}
