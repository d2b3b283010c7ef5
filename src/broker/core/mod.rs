//! The queue logic of the broker as a synchronous state machine: no I/O, no clock, no
//! tasks. Everything that happens to it is a method call, and time comes in as an
//! argument, so tests can drive it through any interleaving with simulated time.
//!
//! Inputs (`handle_*` in quinn-proto's terms): [`Core::subscribe`], [`Core::publish`],
//! [`Core::ack`], [`Core::disconnect`], [`Core::handle_timeout`], [`Core::begin_drain`].
//! Outputs: [`Core::poll_delivery`] (the next message to hand to a consumer) and
//! [`Core::poll_timeout`] (when `handle_timeout` must next be called).
//!
//! State, per queue: a FIFO of ready messages, and the queue's consumers in subscription
//! order with a round-robin cursor. Per consumer: its prefetch and its in-flight messages.
//! Globally: a FIFO of ack deadlines, which is sorted because every delivery gets the
//! same timeout and time never goes backwards; entries made stale by an ack or a
//! disconnect are skipped lazily rather than searched for.

#[cfg(test)]
mod tests;

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

// Maps keyed by ids the broker itself assigns use the fast Fx hash; a client cannot choose
// those keys, so it cannot craft collisions. Queue names, which clients choose, keep the
// standard keyed hash.
use rustc_hash::FxHashMap;

use thiserror::Error;

use crate::protocol::{ErrorCode, MessageId, Payload, QueueName};

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
    /// How long a delivered message may stay unacked before it is requeued.
    pub ack_timeout: Duration,
    /// Most payload bytes held in all queues together (ready and in flight).
    pub max_memory_bytes: u64,
}

/// Why a publish was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PublishError {
    #[error(
        "the broker holds {used_bytes} bytes of queued payloads and its limit is {limit_bytes}; \
         retry when consumers have caught up, or raise --max-memory"
    )]
    QueueFull { used_bytes: u64, limit_bytes: u64 },
    #[error("the broker is shutting down and accepts no new messages")]
    ShuttingDown,
}

impl PublishError {
    /// The contract's error code for this refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            PublishError::QueueFull { .. } => ErrorCode::QueueFull,
            PublishError::ShuttingDown => ErrorCode::ShuttingDown,
        }
    }
}

/// Why an ack changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AckError {
    #[error(
        "message {0} is not in flight to this consumer: never delivered to it, already acked, \
         or requeued after its ack timeout"
    )]
    UnknownId(MessageId),
}

/// A message to hand to a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub consumer: ConsumerId,
    pub id: MessageId,
    pub payload: Payload,
    /// 1 on the first delivery, one more on each redelivery.
    pub attempt: u32,
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
    /// Payload bytes of ready and in-flight messages.
    pub memory_bytes: u64,
    /// Publishes accepted since start.
    pub published_total: u64,
    /// Deliveries since start, redeliveries included.
    pub delivered_total: u64,
    /// Acks that took effect since start.
    pub acked_total: u64,
}

/// The broker's queues, consumers and in-flight messages.
#[derive(Debug)]
pub struct Core {
    config: CoreConfig,
    queues: HashMap<QueueName, Queue>,
    consumers: FxHashMap<ConsumerId, Consumer>,
    /// Ack deadlines in delivery order (hence in time order); may hold stale entries.
    deadlines: VecDeque<Deadline>,
    /// Queues that may be able to deliver, each at most once.
    dispatch_queue: VecDeque<QueueName>,
    next_id: u64,
    /// `queues` and `consumers` are the lengths of the maps; the rest is counted here.
    stats: CoreStats,
    /// `Some` once draining: deliveries made since.
    drained_deliveries: Option<u64>,
    /// The latest `now` seen, so that a clock that steps back cannot unsort `deadlines`.
    latest_now: Option<Instant>,
    /// Messages with ids from here on are not delivered yet (durable storage: not yet on
    /// stable storage). `u64::MAX` without storage.
    deliverable_below: u64,
    /// Queues that stopped dispatching at that line, to resume when it moves.
    held_at_watermark: Vec<QueueName>,
}

#[derive(Debug, Default)]
struct Queue {
    ready: VecDeque<ReadyMessage>,
    /// In subscription order; `next_consumer` indexes the next one to try.
    consumers: Vec<ConsumerId>,
    next_consumer: usize,
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
}

#[derive(Debug)]
struct Consumer {
    queue: QueueName,
    prefetch: usize,
    in_flight: FxHashMap<MessageId, InFlight>,
}

#[derive(Debug)]
struct InFlight {
    payload: Payload,
    attempt: u32,
}

#[derive(Debug, Clone, Copy)]
struct Deadline {
    at: Instant,
    consumer: ConsumerId,
    id: MessageId,
    /// Tells this delivery apart from a later one of the same message.
    attempt: u32,
}

impl Core {
    /// An empty broker whose first message id will be 1.
    pub fn new(config: CoreConfig) -> Self {
        Core {
            config,
            queues: HashMap::new(),
            consumers: FxHashMap::default(),
            deadlines: VecDeque::new(),
            dispatch_queue: VecDeque::new(),
            next_id: 1,
            stats: CoreStats::default(),
            drained_deliveries: None,
            latest_now: None,
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

    /// Puts a message recovered from storage at the back of its queue, ready, with the
    /// deliveries it had; ids must come in increasing order. It counts against the memory
    /// limit like any message, but is never refused: it was confirmed long ago.
    pub fn restore(&mut self, queue: &QueueName, id: MessageId, payload: Payload, deliveries: u32) {
        debug_assert!(id.0 >= self.next_id, "restored out of order");
        self.next_id = self.next_id.max(id.0 + 1);
        self.stats.memory_bytes += payload.len() as u64;
        self.stats.ready += 1;
        self.queues
            .entry(queue.clone())
            .or_default()
            .ready
            .push_back(ReadyMessage {
                id,
                payload,
                deliveries,
            });
    }

    /// The id the next publish will get.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// Makes ids go on from at least `next_id` (after recovery: past every id ever issued).
    pub fn skip_ids_below(&mut self, next_id: u64) {
        self.next_id = self.next_id.max(next_id);
    }

    /// Every message not yet acked, ready or in flight, with its deliveries so far, for
    /// log compaction. In no particular order.
    pub fn live_messages(&self) -> impl Iterator<Item = (MessageId, u32, &QueueName, &Payload)> {
        let ready = self.queues.iter().flat_map(|(name, queue)| {
            queue
                .ready
                .iter()
                .map(move |m| (m.id, m.deliveries, name, &m.payload))
        });
        let in_flight = self.consumers.values().flat_map(|consumer| {
            consumer
                .in_flight
                .iter()
                .map(move |(id, f)| (*id, f.attempt, &consumer.queue, &f.payload))
        });
        ready.chain(in_flight)
    }

    /// Adds a consumer to `queue` (created if new) as the last in its round-robin order.
    /// A consumer id already subscribed is a caller bug and is ignored.
    pub fn subscribe(&mut self, consumer: ConsumerId, queue: QueueName, prefetch: u16) {
        if self.consumers.contains_key(&consumer) {
            debug_assert!(false, "consumer {consumer} subscribed twice");
            return;
        }
        self.queues
            .entry(queue.clone())
            .or_default()
            .consumers
            .push(consumer);
        self.consumers.insert(
            consumer,
            Consumer {
                queue: queue.clone(),
                prefetch: usize::from(prefetch.max(1)),
                in_flight: FxHashMap::default(),
            },
        );
        self.schedule_dispatch(&queue);
    }

    /// Appends a message to the back of `queue` (created if new) and returns its id.
    ///
    /// # Errors
    /// [`PublishError::ShuttingDown`] once draining; [`PublishError::QueueFull`] when the
    /// payload would take the queued bytes over the memory limit.
    pub fn publish(
        &mut self,
        queue: &QueueName,
        payload: Payload,
    ) -> Result<MessageId, PublishError> {
        if self.drained_deliveries.is_some() {
            return Err(PublishError::ShuttingDown);
        }
        let payload_bytes = payload.len() as u64;
        if self.stats.memory_bytes + payload_bytes > self.config.max_memory_bytes {
            return Err(PublishError::QueueFull {
                used_bytes: self.stats.memory_bytes,
                limit_bytes: self.config.max_memory_bytes,
            });
        }
        let id = MessageId(self.next_id);
        self.next_id += 1;
        self.stats.memory_bytes += payload_bytes;
        self.stats.published_total += 1;
        self.stats.ready += 1;
        let ready_message = ReadyMessage {
            id,
            payload,
            deliveries: 0,
        };
        match self.queues.get_mut(queue) {
            Some(existing) => existing.ready.push_back(ready_message),
            None => {
                let mut created = Queue::default();
                created.ready.push_back(ready_message);
                self.queues.insert(queue.clone(), created);
            }
        }
        self.schedule_dispatch(queue);
        Ok(id)
    }

    /// Removes message `id` for good, if it is in flight to `consumer`, and returns its
    /// payload.
    ///
    /// # Errors
    /// [`AckError::UnknownId`] when it is not (never delivered to this consumer, already
    /// acked, or requeued); nothing changes then.
    pub fn ack(&mut self, consumer: ConsumerId, id: MessageId) -> Result<Payload, AckError> {
        let holder = self
            .consumers
            .get_mut(&consumer)
            .ok_or(AckError::UnknownId(id))?;
        let acked = holder
            .in_flight
            .remove(&id)
            .ok_or(AckError::UnknownId(id))?;
        self.stats.memory_bytes -= acked.payload.len() as u64;
        self.stats.in_flight -= 1;
        self.stats.acked_total += 1;
        let queue = holder.queue.clone();
        self.schedule_dispatch(&queue);
        self.discard_stale_deadlines();
        Ok(acked.payload)
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
        let returning: Vec<_> = gone
            .in_flight
            .into_iter()
            .map(|(id, f)| ReadyMessage {
                id,
                payload: f.payload,
                deliveries: f.attempt,
            })
            .collect();
        let returned = returning.len();
        self.stats.in_flight -= returned;
        self.stats.ready += returned;
        queue.requeue_at_front(returning);
        if queue.ready.is_empty() && queue.consumers.is_empty() {
            // Nothing left to remember: a queue is created again on first use.
            self.queues.remove(&gone.queue);
        } else {
            self.schedule_dispatch(&gone.queue);
        }
        self.discard_stale_deadlines();
        returned
    }

    /// Returns every message whose ack deadline is at or before `now` to the front of its
    /// queue. Messages of one queue that expire together keep their id order.
    pub fn handle_timeout(&mut self, now: Instant) {
        let now = self.observe(now);
        let mut expired: HashMap<QueueName, Vec<ReadyMessage>> = HashMap::new();
        while let Some(deadline) = self.deadlines.front().copied() {
            if deadline.at > now {
                break;
            }
            self.deadlines.pop_front();
            let Some(holder) = self.consumers.get_mut(&deadline.consumer) else {
                continue;
            };
            if let Entry::Occupied(entry) = holder.in_flight.entry(deadline.id)
                && entry.get().attempt == deadline.attempt
            {
                let f = entry.remove();
                expired
                    .entry(holder.queue.clone())
                    .or_default()
                    .push(ReadyMessage {
                        id: deadline.id,
                        payload: f.payload,
                        deliveries: f.attempt,
                    });
            }
        }
        for (name, returning) in expired {
            if let Some(queue) = self.queues.get_mut(&name) {
                self.stats.in_flight -= returning.len();
                self.stats.ready += returning.len();
                queue.requeue_at_front(returning);
                self.schedule_dispatch(&name);
            }
        }
    }

    /// When [`Core::handle_timeout`] must next be called: the earliest live ack deadline.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        self.discard_stale_deadlines();
        self.deadlines.front().map(|d| d.at)
    }

    /// The next delivery to make, if any queue has a ready message and a consumer with
    /// spare prefetch. The message moves to the in-flight set with deadline
    /// `now + ack_timeout`. Call until it returns `None`.
    pub fn poll_delivery(&mut self, now: Instant) -> Option<Delivery> {
        let now = self.observe(now);
        while let Some(name) = self.dispatch_queue.front() {
            let Some(queue) = self.queues.get_mut(name) else {
                self.dispatch_queue.pop_front();
                continue;
            };
            if queue
                .ready
                .front()
                .is_some_and(|m| m.id.0 >= self.deliverable_below)
            {
                // The front message is not durable yet; later ones are newer still.
                if !queue.at_watermark {
                    queue.at_watermark = true;
                    self.held_at_watermark.push(name.clone());
                }
                queue.dispatch_scheduled = false;
                self.dispatch_queue.pop_front();
                continue;
            }
            let delivered = queue.deliver_next(&mut self.consumers);
            match delivered {
                Some(delivery) => {
                    self.stats.ready -= 1;
                    self.stats.in_flight += 1;
                    self.stats.delivered_total += 1;
                    self.deadlines.push_back(Deadline {
                        at: now + self.config.ack_timeout,
                        consumer: delivery.consumer,
                        id: delivery.id,
                        attempt: delivery.attempt,
                    });
                    if let Some(count) = &mut self.drained_deliveries {
                        *count += 1;
                    }
                    return Some(delivery);
                }
                None => {
                    queue.dispatch_scheduled = false;
                    self.dispatch_queue.pop_front();
                }
            }
        }
        None
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
        }
    }

    pub fn stats(&self) -> CoreStats {
        CoreStats {
            queues: self.queues.len(),
            consumers: self.consumers.len(),
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

    fn observe(&mut self, now: Instant) -> Instant {
        let latest = self.latest_now.map_or(now, |latest| latest.max(now));
        self.latest_now = Some(latest);
        latest
    }

    fn schedule_dispatch(&mut self, name: &QueueName) {
        if let Some(queue) = self.queues.get_mut(name)
            && !queue.dispatch_scheduled
            && !queue.ready.is_empty()
            && !queue.consumers.is_empty()
        {
            queue.dispatch_scheduled = true;
            self.dispatch_queue.push_back(name.clone());
        }
    }

    /// Pops deadlines at the front whose delivery was since acked, requeued or orphaned,
    /// so the front is always a live deadline and the FIFO does not grow with acked ones.
    fn discard_stale_deadlines(&mut self) {
        while let Some(front) = self.deadlines.front() {
            let live = self
                .consumers
                .get(&front.consumer)
                .and_then(|c| c.in_flight.get(&front.id))
                .is_some_and(|f| f.attempt == front.attempt);
            if live {
                break;
            }
            self.deadlines.pop_front();
        }
    }
}

impl Queue {
    /// Puts messages back at the front, ahead of everything ready, in id order.
    fn requeue_at_front(&mut self, mut returning: Vec<ReadyMessage>) {
        returning.sort_unstable_by_key(|m| m.id);
        for message in returning.into_iter().rev() {
            self.ready.push_front(message);
        }
    }

    /// Hands the front message to the next consumer in round-robin order with spare
    /// prefetch, if there is a message and such a consumer.
    fn deliver_next(
        &mut self,
        consumers: &mut FxHashMap<ConsumerId, Consumer>,
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
            if consumer.in_flight.len() >= consumer.prefetch {
                continue;
            }
            let message = self.ready.pop_front()?;
            let attempt = message.deliveries.saturating_add(1);
            consumer.in_flight.insert(
                message.id,
                InFlight {
                    payload: message.payload.clone(),
                    attempt,
                },
            );
            self.next_consumer = (index + 1) % count;
            return Some(Delivery {
                consumer: consumer_id,
                id: message.id,
                payload: message.payload,
                attempt,
            });
        }
        None
    }
}
