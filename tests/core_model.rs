//! Model-based test of the queue core: random sequences of publish (now or delayed, of
//! one priority or of many, with headers or without) / publish_batch (all or none) /
//! subscribe (with the queue's lease or its own) / dispatch / ack / wrong ack / nack (to
//! the back, delayed, after the queue's backoff, or dead-lettered) / touch / pause /
//! resume / time passing / disconnect / drain, under per-queue policies (dead letters,
//! backoff, leases, length limits under both overflow rules), applied both to
//! the core and to a deliberately naive reference model of contract §4 and §12
//! (vectors and linear scans). After every step the two must agree exactly (deliveries,
//! refusals, what expired and for whom, what memory is counted), and these invariants
//! must hold: each published id is in exactly one of ready, delayed, in flight, acked,
//! discarded; no consumer
//! is over its prefetch or gets anything while paused; an acked id never comes back; no
//! queue holds more than its `max_length`;
//! within a priority, redelivered ids stand before never delivered ones, which keep their
//! publish order (those sent to the back aside); the next timeout is never later than a timer tick
//! after the earliest deadline or due time. On failure
//! proptest prints the shrunk sequence of operations, which replays deterministically
//! (time is simulated).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ferry::MessageId;
use ferry::broker::core::{
    ATTRIBUTES_OVERHEAD_BYTES, AckError, ConsumerId, Core, CoreConfig, DEAD_LETTER_BYTES,
    DELAYED_MESSAGE_BYTES, MESSAGE_OVERHEAD_BYTES, NackAction, NewMessage, PublishError,
    QUEUE_OVERHEAD_BYTES, READY_CHUNK_LEN, READY_LEVEL_BYTES, READY_SLOT_BYTES, TIMER_TICK,
    WallClock,
};
use ferry::broker::policy::{PolicyFile, QueuePolicy};
use ferry::protocol::{Attributes, Due, Headers, Payload, QueueName};
use proptest::prelude::*;

const QUEUES: usize = 3;
const CONSUMERS: u64 = 4;
const ACK_TIMEOUT_MS: u64 = 100;
/// Room for two queues and about ten messages: refusals happen, of messages and of queues.
const MAX_MEMORY_BYTES: u64 =
    2 * (QUEUE_OVERHEAD_BYTES + 2 + 8 * READY_SLOT_BYTES) + 10 * (MESSAGE_OVERHEAD_BYTES + 30);

fn t(ms: u64) -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now) + Duration::from_millis(ms)
}

/// Each queue's lease, as the policies in `run` set it: `q0` takes the base, `q1` its
/// exact table, `q2` a prefix table.
fn ack_timeout_ms(queue: usize) -> u64 {
    ACK_TIMEOUT_MS * (queue as u64 + 1)
}

/// Each queue's `max_deliveries` (0: none) and dead-letter queue: `q0` discards its dead
/// letters, `q1` sends them to `q2`, which has no limit (and discards what a nack
/// rejects).
fn dead_letter_policy(queue: usize) -> (u32, Option<usize>) {
    match queue {
        0 => (3, None),
        1 => (2, Some(2)),
        _ => (0, None),
    }
}

const POLICIES: &str = "[queues.\"q0\"]\nmax_deliveries = 3\ndiscard_dead_letters = true\n\
    max_length = 3\noverflow = \"drop-head\"\n\
    [queues.\"q1\"]\nack_timeout = \"200ms\"\nmax_deliveries = 2\ndead_letter_queue = \"q2\"\n\
    max_lease = \"250ms\"\nmax_length = 2\noverflow = \"drop-head\"\n\
    [queues.\"q2*\"]\nack_timeout = \"300ms\"\nbackoff_initial = \"20ms\"\nbackoff_max = \"50ms\"\n\
    max_length = 3\n";

/// Each queue's `max_length` and whether it drops its head when full (rule 17), as
/// `POLICIES` sets them: `q0` drops (discarding), `q1` drops into `q2`, and `q2` rejects,
/// so that dead letters find it full.
fn length_policy(queue: usize) -> (usize, bool) {
    match queue {
        0 => (3, true),
        1 => (2, true),
        _ => (3, false),
    }
}

/// Each queue's `max_lease` in ms, as `POLICIES` sets it (the default is 12 hours).
fn max_lease_ms(queue: usize) -> u64 {
    if queue == 1 { 250 } else { 12 * 3600 * 1000 }
}

/// What a nack without a delay waits on each queue (rule 12), as `POLICIES` sets it.
fn backoff_ms(queue: usize, attempt: u32) -> u64 {
    if queue == 2 {
        (20u64 << (attempt - 1).min(8)).min(50)
    } else {
        0
    }
}

/// The wall clock's reading at `t(0)`.
const WALL_MS: u64 = 1_000_000;

fn queue_name(index: usize) -> QueueName {
    QueueName::new(&format!("q{index}")).unwrap()
}

#[derive(Debug, Clone)]
enum Op {
    Publish {
        queue: usize,
        text_len: usize,
        /// 0: ready now.
        delay_ms: u64,
        priority: u8,
        /// With headers, which cost memory until the message goes.
        headers: bool,
    },
    /// Messages of these payload lengths, of priorities counting down from `priority`.
    PublishBatch {
        queue: usize,
        text_lens: Vec<usize>,
        priority: u8,
    },
    Subscribe {
        consumer: u64,
        queue: usize,
        prefetch: u16,
        /// Its own lease, or the queue's.
        lease_ms: Option<u64>,
    },
    Nack {
        consumer: u64,
        pick: usize,
        /// `None`: dead-letter it.
        retry: Option<Option<u64>>,
    },
    Touch {
        consumer: u64,
        pick: usize,
        lease_ms: Option<u64>,
    },
    Dispatch,
    Ack {
        consumer: u64,
        pick: usize,
    },
    WrongAck {
        consumer: u64,
        id: u64,
    },
    Advance {
        ms: u64,
    },
    Disconnect {
        consumer: u64,
    },
    Pause {
        consumer: u64,
    },
    Resume {
        consumer: u64,
    },
    BeginDrain,
    /// Lets ids below `watermark + 1 + step % (unreleased + 1)` be delivered.
    Release {
        step: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..QUEUES, 0usize..60, prop_oneof![3 => Just(0u64), 1 => 1u64..300], prop_oneof![2 => Just(0u8), 1 => 0u8..=9], prop::bool::weighted(0.2))
            .prop_map(|(queue, text_len, delay_ms, priority, headers)| Op::Publish { queue, text_len, delay_ms, priority, headers }),
        2 => (0..QUEUES, prop::collection::vec(0usize..40, 1..5), 0u8..=9)
            .prop_map(|(queue, text_lens, priority)| Op::PublishBatch { queue, text_lens, priority }),
        2 => (0..CONSUMERS, 0..QUEUES, 1u16..4, prop::option::of(20u64..400))
            .prop_map(|(consumer, queue, prefetch, lease_ms)| Op::Subscribe { consumer, queue, prefetch, lease_ms }),
        3 => (0..CONSUMERS, 0usize..8, prop::option::weighted(0.8, prop::option::of(0u64..200)))
            .prop_map(|(consumer, pick, retry)| Op::Nack { consumer, pick, retry }),
        2 => (0..CONSUMERS, 0usize..8, prop::option::of(1u64..300))
            .prop_map(|(consumer, pick, lease_ms)| Op::Touch { consumer, pick, lease_ms }),
        5 => Just(Op::Dispatch),
        5 => (0..CONSUMERS, 0usize..8).prop_map(|(consumer, pick)| Op::Ack { consumer, pick }),
        1 => (0..CONSUMERS, 0u64..40).prop_map(|(consumer, id)| Op::WrongAck { consumer, id }),
        3 => (0u64..150).prop_map(|ms| Op::Advance { ms }),
        1 => (0..CONSUMERS).prop_map(|consumer| Op::Disconnect { consumer }),
        1 => (0..CONSUMERS).prop_map(|consumer| Op::Pause { consumer }),
        1 => (0..CONSUMERS).prop_map(|consumer| Op::Resume { consumer }),
        1 => Just(Op::BeginDrain),
        2 => any::<u64>().prop_map(|step| Op::Release { step }),
    ]
}

#[derive(Debug, Default)]
struct ModelQueue {
    /// (id, deliveries so far), a FIFO per priority: delivery takes from the highest
    /// that holds any (rule 10).
    ready: [VecDeque<(u64, u32)>; 10],
    /// The priorities ever used in this queue: the core keeps a FIFO for each.
    levels: BTreeSet<u8>,
    ring: Vec<u64>,
    /// The consumer to try first.
    next: Option<u64>,
}

impl ModelQueue {
    fn push_back(&mut self, priority: u8, message: (u64, u32)) {
        self.levels.insert(priority);
        self.ready[usize::from(priority)].push_back(message);
    }

    fn push_front(&mut self, priority: u8, message: (u64, u32)) {
        self.levels.insert(priority);
        self.ready[usize::from(priority)].push_front(message);
    }

    fn front(&self) -> Option<&(u64, u32)> {
        self.ready.iter().rev().find_map(|fifo| fifo.front())
    }

    fn pop_front(&mut self) -> Option<(u64, u32)> {
        self.ready
            .iter_mut()
            .rev()
            .find_map(|fifo| fifo.pop_front())
    }

    fn ready_len(&self) -> usize {
        self.ready.iter().map(VecDeque::len).sum()
    }

    /// Ready ids in delivery order.
    fn ready_ids(&self) -> Vec<u64> {
        self.ready
            .iter()
            .rev()
            .flatten()
            .map(|(id, _)| *id)
            .collect()
    }
}

#[derive(Debug)]
struct ModelConsumer {
    queue: usize,
    prefetch: usize,
    lease_ms: u64,
    paused: bool,
    /// id -> (attempt, deadline in ms, delivered at in ms)
    in_flight: BTreeMap<u64, (u32, u64, u64)>,
}

/// A message waiting for its due time.
#[derive(Debug, Clone, Copy)]
struct ModelDelayed {
    due_ms: u64,
    id: u64,
    queue: usize,
    deliveries: u32,
}

#[derive(Debug, Default)]
struct Model {
    now_ms: u64,
    next_id: u64,
    /// Memory counted for messages and queues, beyond the chunks of the ready queues
    /// (whose size depends on their history; `check` bounds it).
    memory: u64,
    draining: bool,
    queues: BTreeMap<usize, ModelQueue>,
    consumers: BTreeMap<u64, ModelConsumer>,
    /// What each message costs beyond its overhead: its payload, and its headers'.
    sizes: BTreeMap<u64, u64>,
    priorities: HashMap<u64, u8>,
    published: Vec<u64>,
    acked: HashSet<u64>,
    ever_delivered: HashSet<u64>,
    /// With a dead-letter record (moved to a dead-letter queue at least once).
    dead_lettered: HashSet<u64>,
    dead_lettered_total: u64,
    /// Sent to the back of a queue (dead-lettered, nacked, delayed): outside the order of
    /// the others.
    sent_back: HashSet<u64>,
    delayed: Vec<ModelDelayed>,
    nacked_total: u64,
    /// Dead letters dropped.
    discarded: HashSet<u64>,
    /// Ids from here on are not deliverable (durable storage's watermark).
    deliverable_below: u64,
    /// Messages whose lease just ran out, by queue, while the queues before theirs take
    /// theirs back: still their queue's, as its `max_length` counts.
    returning: BTreeMap<usize, usize>,
}

impl Model {
    /// A publish, the core counting `counted` bytes before it.
    /// A publish of a message costing `size` beyond its overhead (payload and headers).
    fn publish(
        &mut self,
        queue: usize,
        size: u64,
        delay_ms: u64,
        priority: u8,
        counted: u64,
    ) -> Result<u64, &'static str> {
        if self.draining {
            return Err("shutting_down");
        }
        let cost = size
            + MESSAGE_OVERHEAD_BYTES
            + if self.queues.contains_key(&queue) {
                0
            } else {
                queue_cost(queue)
            }
            + if delay_ms > 0 {
                DELAYED_MESSAGE_BYTES
            } else {
                0
            };
        if counted + cost > MAX_MEMORY_BYTES {
            return Err("queue_full");
        }
        self.make_room(queue, 1)?;
        self.next_id += 1;
        let id = self.next_id;
        self.memory += cost;
        self.sizes.insert(id, size);
        self.priorities.insert(id, priority);
        self.published.push(id);
        let q = self.queues.entry(queue).or_default();
        if delay_ms > 0 {
            self.delay(queue, id, 0, delay_ms);
            self.memory -= DELAYED_MESSAGE_BYTES;
        } else {
            q.push_back(priority, (id, 0));
        }
        Ok(id)
    }

    /// Holds a message until `delay_ms` from now.
    fn delay(&mut self, queue: usize, id: u64, deliveries: u32, delay_ms: u64) {
        self.memory += DELAYED_MESSAGE_BYTES;
        self.sent_back.insert(id);
        self.delayed.push(ModelDelayed {
            due_ms: self.now_ms + delay_ms,
            id,
            queue,
            deliveries,
        });
    }

    fn subscribe(&mut self, consumer: u64, queue: usize, prefetch: u16, lease_ms: Option<u64>) {
        if !self.queues.contains_key(&queue) {
            self.memory += queue_cost(queue);
        }
        let q = self.queues.entry(queue).or_default();
        q.ring.push(consumer);
        q.next.get_or_insert(consumer);
        self.consumers.insert(
            consumer,
            ModelConsumer {
                queue,
                prefetch: prefetch.into(),
                lease_ms: lease_ms.unwrap_or(ack_timeout_ms(queue)),
                paused: false,
                in_flight: BTreeMap::new(),
            },
        );
    }

    /// Every delivery possible now, as (queue, consumer, id, attempt), queue by queue.
    fn dispatch(&mut self) -> Vec<(usize, u64, u64, u32)> {
        let mut out = Vec::new();
        for (&queue_index, q) in self.queues.iter_mut() {
            while q
                .front()
                .is_some_and(|(id, _)| *id < self.deliverable_below)
                && !q.ring.is_empty()
            {
                let start = q.ring.iter().position(|c| Some(*c) == q.next).unwrap();
                let n = q.ring.len();
                let Some(pos) = (0..n).map(|step| (start + step) % n).find(|&pos| {
                    let c = &self.consumers[&q.ring[pos]];
                    !c.paused && c.in_flight.len() < c.prefetch
                }) else {
                    break;
                };
                let consumer = q.ring[pos];
                let (id, deliveries) = q.pop_front().unwrap();
                let attempt = deliveries + 1;
                let c = self.consumers.get_mut(&consumer).unwrap();
                let deadline = self.now_ms + c.lease_ms;
                c.in_flight.insert(id, (attempt, deadline, self.now_ms));
                self.ever_delivered.insert(id);
                q.next = Some(q.ring[(pos + 1) % n]);
                out.push((queue_index, consumer, id, attempt));
            }
        }
        out
    }

    fn ack(&mut self, consumer: u64, id: u64) -> bool {
        let Some(c) = self.consumers.get_mut(&consumer) else {
            return false;
        };
        if c.in_flight.remove(&id).is_none() {
            return false;
        }
        self.memory -= self.sizes[&id] + MESSAGE_OVERHEAD_BYTES;
        if self.dead_lettered.contains(&id) {
            self.memory -= DEAD_LETTER_BYTES;
        }
        self.acked.insert(id);
        true
    }

    /// Rules 5, 14 and 15: back to the front, or, at the limit, dead-lettered.
    fn return_messages(&mut self, queue: usize, mut returning: Vec<(u64, u32)>) {
        returning.sort();
        let (limit, _) = dead_letter_policy(queue);
        let (dead, back): (Vec<_>, Vec<_>) = returning
            .into_iter()
            .partition(|(_, deliveries)| limit > 0 && *deliveries >= limit);
        let q = self.queues.get_mut(&queue).unwrap();
        for message in back.into_iter().rev() {
            q.push_front(self.priorities[&message.0], message);
        }
        for (id, _) in dead {
            self.dead_letter(queue, id);
        }
    }

    /// Messages `queue` holds, as its `max_length` counts them: ready, delayed, in flight.
    fn length(&self, queue: usize) -> usize {
        let ready = self.queues.get(&queue).map_or(0, ModelQueue::ready_len);
        let in_flight: usize = self
            .consumers
            .values()
            .filter(|c| c.queue == queue)
            .map(|c| c.in_flight.len())
            .sum();
        let delayed = self.delayed.iter().filter(|d| d.queue == queue).count();
        let returning = self.returning.get(&queue).copied().unwrap_or(0);
        ready + in_flight + delayed + returning
    }

    /// Rule 19: (size, priority) messages, all or none, after the memory limit and the
    /// queue's length; the core counted `counted` bytes before.
    fn publish_batch(
        &mut self,
        queue: usize,
        messages: &[(u64, u8)],
        counted: u64,
    ) -> Result<Vec<u64>, &'static str> {
        if self.draining {
            return Err("shutting_down");
        }
        let new_queue = if self.queues.contains_key(&queue) {
            0
        } else {
            queue_cost(queue)
        };
        let cost: u64 = messages
            .iter()
            .map(|(size, _)| size + MESSAGE_OVERHEAD_BYTES)
            .sum();
        if counted + cost + new_queue > MAX_MEMORY_BYTES {
            return Err("queue_full");
        }
        self.make_room(queue, messages.len())?;
        if !self.queues.contains_key(&queue) {
            self.memory += queue_cost(queue);
        }
        self.memory += cost;
        let mut ids = Vec::new();
        for &(size, priority) in messages {
            self.next_id += 1;
            let id = self.next_id;
            self.sizes.insert(id, size);
            self.priorities.insert(id, priority);
            self.published.push(id);
            self.queues
                .entry(queue)
                .or_default()
                .push_back(priority, (id, 0));
            ids.push(id);
        }
        Ok(ids)
    }

    /// Rule 17: room for `incoming` more messages in `queue`, dropping its oldest ready
    /// messages of the lowest priority if it is full and its policy says so, or none.
    fn make_room(&mut self, queue: usize, incoming: usize) -> Result<(), &'static str> {
        let (max_length, drop_head) = length_policy(queue);
        let excess = (self.length(queue) + incoming).saturating_sub(max_length);
        if excess == 0 {
            return Ok(());
        }
        let ready = self.queues.get(&queue).map_or(0, ModelQueue::ready_len);
        if !drop_head || excess > ready {
            return Err("queue_full");
        }
        for _ in 0..excess {
            let q = self.queues.get_mut(&queue).unwrap();
            let (id, _) = q.ready.iter_mut().find_map(VecDeque::pop_front).unwrap();
            self.dead_letter(queue, id);
        }
        Ok(())
    }

    /// Rule 15: to the back of the queue's dead-letter queue, or dropped, as it is when
    /// that queue is full (rule 17).
    fn dead_letter(&mut self, queue: usize, id: u64) {
        let target = dead_letter_policy(queue)
            .1
            .filter(|&target| self.make_room(target, 1).is_ok());
        match target {
            Some(target) => {
                if !self.queues.contains_key(&target) {
                    self.memory += queue_cost(target);
                }
                self.queues
                    .entry(target)
                    .or_default()
                    .push_back(self.priorities[&id], (id, 0));
                if self.dead_lettered.insert(id) {
                    self.memory += DEAD_LETTER_BYTES;
                }
                self.sent_back.insert(id);
                self.dead_lettered_total += 1;
            }
            None => {
                self.memory -= self.sizes[&id] + MESSAGE_OVERHEAD_BYTES;
                if self.dead_lettered.remove(&id) {
                    self.memory -= DEAD_LETTER_BYTES;
                }
                self.discarded.insert(id);
            }
        }
    }

    /// Rule 12; `retry` `None` is `"dead_letter":true`. Says whether it was in flight.
    fn nack(&mut self, consumer: u64, id: u64, retry: Option<Option<u64>>) -> bool {
        let Some(c) = self.consumers.get_mut(&consumer) else {
            return false;
        };
        let Some((attempt, _, _)) = c.in_flight.remove(&id) else {
            return false;
        };
        let queue = c.queue;
        self.nacked_total += 1;
        let (limit, _) = dead_letter_policy(queue);
        let delay = match retry {
            None => {
                return {
                    self.dead_letter(queue, id);
                    true
                };
            }
            Some(_) if limit > 0 && attempt >= limit => {
                self.dead_letter(queue, id);
                return true;
            }
            Some(delay) => delay.unwrap_or_else(|| backoff_ms(queue, attempt)),
        };
        if delay == 0 {
            self.queues
                .get_mut(&queue)
                .unwrap()
                .push_back(self.priorities[&id], (id, attempt));
            self.sent_back.insert(id);
        } else {
            self.delay(queue, id, attempt, delay);
        }
        true
    }

    /// Rule 16. Says whether it was in flight.
    fn touch(&mut self, consumer: u64, id: u64, lease_ms: Option<u64>) -> bool {
        let now = self.now_ms;
        let Some(c) = self.consumers.get_mut(&consumer) else {
            return false;
        };
        let (lease, queue) = (lease_ms.unwrap_or(c.lease_ms), c.queue);
        let Some((_, deadline, delivered_at)) = c.in_flight.get_mut(&id) else {
            return false;
        };
        *deadline = (now + lease)
            .min(*delivered_at + max_lease_ms(queue))
            .max(now);
        true
    }

    fn disconnect(&mut self, consumer: u64) {
        let Some(gone) = self.consumers.remove(&consumer) else {
            return;
        };
        let q = self.queues.get_mut(&gone.queue).unwrap();
        let pos = q.ring.iter().position(|c| *c == consumer).unwrap();
        if q.next == Some(consumer) {
            let after = q.ring[(pos + 1) % q.ring.len()];
            q.next = (after != consumer).then_some(after);
        }
        q.ring.remove(pos);
        let returning = gone
            .in_flight
            .into_iter()
            .map(|(id, (attempt, _, _))| (id, attempt))
            .collect();
        self.return_messages(gone.queue, returning);
        let q = &self.queues[&gone.queue];
        let delayed = self.delayed.iter().any(|d| d.queue == gone.queue);
        if q.ready_len() == 0 && q.ring.is_empty() && !delayed {
            self.queues.remove(&gone.queue);
            self.memory -= queue_cost(gone.queue);
        }
    }

    /// Moves time on; returns what expired, as (consumer, id), in order.
    fn advance(&mut self, ms: u64) -> Vec<(u64, u64)> {
        self.now_ms += ms;
        let mut expired: BTreeMap<usize, Vec<(u64, u32)>> = BTreeMap::new();
        let mut taken_back = Vec::new();
        for (&consumer, c) in self.consumers.iter_mut() {
            let due: Vec<u64> = c
                .in_flight
                .iter()
                .filter(|(_, (_, at, _))| *at <= self.now_ms)
                .map(|(id, _)| *id)
                .collect();
            for id in due {
                let (attempt, _, _) = c.in_flight.remove(&id).unwrap();
                expired.entry(c.queue).or_default().push((id, attempt));
                taken_back.push((consumer, id));
            }
        }
        self.returning = expired.iter().map(|(q, r)| (*q, r.len())).collect();
        for (queue, returning) in expired {
            self.returning.remove(&queue);
            self.return_messages(queue, returning);
        }
        // Then the delayed messages that are due, together in id order (rule 13).
        let (mut due, waiting): (Vec<_>, Vec<_>) =
            self.delayed.iter().partition(|d| d.due_ms <= self.now_ms);
        self.delayed = waiting;
        due.sort_by_key(|d| (d.due_ms, d.id));
        for d in due {
            self.memory -= DELAYED_MESSAGE_BYTES;
            self.queues
                .entry(d.queue)
                .or_default()
                .push_back(self.priorities[&d.id], (d.id, d.deliveries));
        }
        taken_back
    }

    fn earliest_deadline(&self) -> Option<u64> {
        self.consumers
            .values()
            .flat_map(|c| c.in_flight.values().map(|(_, at, _)| *at))
            .chain(self.delayed.iter().map(|d| d.due_ms))
            .min()
    }

    /// One of the ids in flight to `consumer`, chosen by `pick`, if it has any.
    fn pick(&self, consumer: u64, pick: usize) -> Option<u64> {
        let held = self.consumers.get(&consumer)?;
        held.in_flight
            .keys()
            .nth(pick % held.in_flight.len().max(1))
            .copied()
    }

    fn is_drained(&self) -> bool {
        self.consumers.values().all(|c| c.in_flight.is_empty())
            && self
                .queues
                .values()
                .all(|q| q.ready_len() == 0 || q.ring.is_empty())
    }
}

/// What a queue costs against the memory limit (names are `q0`, `q1`, ...).
fn queue_cost(index: usize) -> u64 {
    QUEUE_OVERHEAD_BYTES + queue_name(index).as_str().len() as u64
}

fn check(core: &mut Core, model: &Model) -> Result<(), TestCaseError> {
    let mut placed: BTreeMap<u64, &'static str> = BTreeMap::new();
    for (&index, q) in &model.queues {
        let core_ready: Vec<u64> = core
            .ready_ids(&queue_name(index))
            .iter()
            .map(|id| id.0)
            .collect();
        prop_assert_eq!(&core_ready, &q.ready_ids(), "ready queue q{}", index);
        for id in &core_ready {
            prop_assert!(placed.insert(*id, "ready").is_none(), "id {} twice", id);
        }
        // Within each priority (whose FIFO the core's order was just found to match):
        // redelivered before never-delivered; never-delivered in publish order (what was
        // sent to the back aside).
        for (priority, fifo) in q.ready.iter().enumerate() {
            let ids: Vec<u64> = fifo
                .iter()
                .map(|(id, _)| *id)
                .filter(|id| !model.sent_back.contains(id))
                .collect();
            let first_fresh = ids
                .iter()
                .position(|id| !model.ever_delivered.contains(id))
                .unwrap_or(ids.len());
            prop_assert!(
                ids[first_fresh..]
                    .iter()
                    .all(|id| !model.ever_delivered.contains(id)),
                "q{} priority {}: {:?}",
                index,
                priority,
                ids
            );
            prop_assert!(ids[first_fresh..].windows(2).all(|w| w[0] < w[1]));
        }
    }
    for consumer in 0..CONSUMERS {
        let core_in_flight: Vec<u64> = core
            .in_flight_ids(ConsumerId(consumer))
            .iter()
            .map(|id| id.0)
            .collect();
        let model_in_flight: Vec<u64> = model
            .consumers
            .get(&consumer)
            .map(|c| c.in_flight.keys().copied().collect())
            .unwrap_or_default();
        prop_assert_eq!(
            &core_in_flight,
            &model_in_flight,
            "in flight to consumer {}",
            consumer
        );
        if let Some(c) = model.consumers.get(&consumer) {
            prop_assert!(
                core_in_flight.len() <= c.prefetch,
                "consumer {} over its prefetch",
                consumer
            );
        }
        for id in core_in_flight {
            prop_assert!(placed.insert(id, "in flight").is_none(), "id {} twice", id);
        }
    }
    for d in &model.delayed {
        prop_assert!(
            placed.insert(d.id, "delayed").is_none(),
            "id {} twice",
            d.id
        );
    }
    for id in &model.acked {
        prop_assert!(
            placed.insert(*id, "acked").is_none(),
            "acked id {} is still held",
            id
        );
    }
    for id in &model.discarded {
        prop_assert!(
            placed.insert(*id, "discarded").is_none(),
            "discarded id {} is still held",
            id
        );
    }
    prop_assert_eq!(
        placed.len(),
        model.published.len(),
        "every published id is in exactly one place"
    );
    let stats = core.stats();
    prop_assert_eq!(
        stats.ready,
        model
            .queues
            .values()
            .map(ModelQueue::ready_len)
            .sum::<usize>()
    );
    prop_assert_eq!(
        stats.in_flight,
        model
            .consumers
            .values()
            .map(|c| c.in_flight.len())
            .sum::<usize>()
    );
    // Beyond messages and queues, what is counted is the ready queues' levels, one per
    // priority a queue has used, and their chunks: room for at least every ready message,
    // and at most two partly used chunks more per level.
    let levels: u64 = model.queues.values().map(|q| q.levels.len() as u64).sum();
    let chunks = stats
        .memory_bytes
        .checked_sub(model.memory + levels * READY_LEVEL_BYTES);
    let ready_slots: u64 = model.queues.values().map(|q| q.ready_len() as u64).sum();
    let most_slots = ready_slots + levels * 2 * READY_CHUNK_LEN as u64;
    prop_assert!(
        chunks.is_some_and(|chunks| {
            (ready_slots * READY_SLOT_BYTES..=most_slots * READY_SLOT_BYTES).contains(&chunks)
        }),
        "memory {} for messages and queues taking {}, with {} ready",
        stats.memory_bytes,
        model.memory,
        ready_slots
    );
    prop_assert_eq!(stats.acked_total, model.acked.len() as u64);
    prop_assert_eq!(stats.discarded_total, model.discarded.len() as u64);
    prop_assert_eq!(stats.dead_lettered_total, model.dead_lettered_total);
    prop_assert_eq!(stats.nacked_total, model.nacked_total);
    prop_assert_eq!(stats.delayed, model.delayed.len());
    match (core.poll_timeout(), model.earliest_deadline()) {
        (None, None) => {}
        (Some(next), Some(earliest)) => prop_assert!(
            next <= t(earliest) + TIMER_TICK,
            "next timeout more than a tick after the earliest deadline, {} ms",
            earliest
        ),
        (next, earliest) => prop_assert!(
            false,
            "next timeout {:?}, earliest deadline {:?}",
            next,
            earliest
        ),
    }
    prop_assert_eq!(stats.queues, model.queues.len());
    for &queue in model.queues.keys() {
        prop_assert!(
            model.length(queue) <= length_policy(queue).0,
            "q{} over its max_length",
            queue
        );
    }
    if model.draining {
        prop_assert_eq!(core.is_drained(), model.is_drained());
    }
    Ok(())
}

/// A refused publish's error code.
fn refusal_code(refusal: PublishError) -> &'static str {
    match refusal {
        PublishError::QueueFull { .. } | PublishError::QueueAtMaxLength { .. } => "queue_full",
        PublishError::ShuttingDown => "shutting_down",
    }
}

fn run(ops: &[Op], hold_new: bool) -> Result<(), TestCaseError> {
    let mut core = Core::new(CoreConfig {
        policies: PolicyFile::parse_text(POLICIES)
            .unwrap()
            .resolve(&QueuePolicy::new(Duration::from_millis(ACK_TIMEOUT_MS))),
        max_memory_bytes: MAX_MEMORY_BYTES,
        wall_clock: WallClock {
            at: t(0),
            unix_ms: WALL_MS,
        },
    });
    let mut model = Model {
        deliverable_below: u64::MAX,
        ..Model::default()
    };
    if hold_new {
        core.hold_new_messages();
        model.deliverable_below = 1;
    }
    for op in ops {
        match *op {
            Op::Publish {
                queue,
                text_len,
                delay_ms,
                priority,
                headers,
            } => {
                let payload = Payload::from_text(&"x".repeat(text_len));
                let attributes = headers.then(|| {
                    Arc::new(Attributes {
                        headers: Headers::new([("k", "x".repeat(text_len))]).unwrap(),
                    })
                });
                let size = payload.len() as u64
                    + attributes
                        .as_ref()
                        .map_or(0, |a| ATTRIBUTES_OVERHEAD_BYTES + a.byte_len() as u64);
                let counted = core.stats().memory_bytes;
                // Either spelling of a delay: the same due time.
                let due = match (delay_ms, text_len % 2) {
                    (0, _) => Due::Now,
                    (ms, 0) => Due::After(Duration::from_millis(ms)),
                    (ms, _) => Due::At(WALL_MS + model.now_ms + ms),
                };
                let message = NewMessage {
                    payload,
                    priority,
                    due,
                    attributes,
                };
                let got = core
                    .publish(&queue_name(queue), message)
                    .map(|published| published.id.0)
                    .map_err(refusal_code);
                prop_assert_eq!(got, model.publish(queue, size, delay_ms, priority, counted));
            }
            Op::PublishBatch {
                queue,
                ref text_lens,
                priority,
            } => {
                let counted = core.stats().memory_bytes;
                let payloads: Vec<Payload> = text_lens
                    .iter()
                    .map(|&len| Payload::from_text(&"x".repeat(len)))
                    .collect();
                let messages: Vec<(u64, u8)> = payloads
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (p.len() as u64, priority.saturating_sub(i as u8)))
                    .collect();
                let batch = payloads
                    .into_iter()
                    .zip(&messages)
                    .map(|(payload, &(_, priority))| NewMessage {
                        payload,
                        priority,
                        due: Due::Now,
                        attributes: None,
                    })
                    .collect();
                let got = core
                    .publish_batch(&queue_name(queue), batch)
                    .map(|published| published.iter().map(|p| p.id.0).collect())
                    .map_err(refusal_code);
                prop_assert_eq!(got, model.publish_batch(queue, &messages, counted));
            }
            Op::Subscribe {
                consumer,
                queue,
                prefetch,
                lease_ms,
            } => {
                if !model.consumers.contains_key(&consumer) {
                    // Within the queue's max_lease, as the session checks.
                    let lease_ms = lease_ms.map(|ms| ms.min(max_lease_ms(queue)));
                    let lease = lease_ms.map(Duration::from_millis);
                    core.subscribe(ConsumerId(consumer), queue_name(queue), prefetch, lease);
                    model.subscribe(consumer, queue, prefetch, lease_ms);
                }
            }
            Op::Nack {
                consumer,
                pick,
                retry,
            } => {
                // One in flight to it, or else an id it does not hold.
                let id = model.pick(consumer, pick).unwrap_or(pick as u64);
                let action = match retry {
                    None => NackAction::DeadLetter,
                    Some(delay) => NackAction::Retry(delay.map(Duration::from_millis)),
                };
                let got = core.nack(ConsumerId(consumer), MessageId(id), action);
                prop_assert_eq!(
                    got.is_ok(),
                    model.nack(consumer, id, retry),
                    "nack of {}",
                    id
                );
            }
            Op::Touch {
                consumer,
                pick,
                lease_ms,
            } => {
                // One in flight to it, or else an id it does not hold.
                let id = model.pick(consumer, pick).unwrap_or(pick as u64);
                let got = core.touch(
                    ConsumerId(consumer),
                    MessageId(id),
                    lease_ms.map(Duration::from_millis),
                );
                prop_assert_eq!(
                    got.is_ok(),
                    model.touch(consumer, id, lease_ms),
                    "touch of {}",
                    id
                );
            }
            Op::Dispatch => {
                let mut got: BTreeMap<usize, Vec<(u64, u64, u32)>> = BTreeMap::new();
                let mut made = Vec::new();
                core.dispatch(t(model.now_ms), |d| made.push(d));
                for d in made {
                    prop_assert!(
                        !model.acked.contains(&d.id.0) && !model.discarded.contains(&d.id.0),
                        "acked or discarded id {} delivered again",
                        d.id
                    );
                    let queue = model.consumers[&d.consumer.0].queue;
                    got.entry(queue)
                        .or_default()
                        .push((d.consumer.0, d.id.0, d.attempt));
                }
                let mut expected: BTreeMap<usize, Vec<(u64, u64, u32)>> = BTreeMap::new();
                for (queue, consumer, id, attempt) in model.dispatch() {
                    expected
                        .entry(queue)
                        .or_default()
                        .push((consumer, id, attempt));
                }
                prop_assert_eq!(got, expected);
            }
            Op::Ack { consumer, pick } => {
                if let Some(id) = model.pick(consumer, pick) {
                    prop_assert!(core.ack(ConsumerId(consumer), MessageId(id)).is_ok());
                    prop_assert!(model.ack(consumer, id));
                }
            }
            Op::WrongAck { consumer, id } => {
                let expected_ok = model
                    .consumers
                    .get(&consumer)
                    .is_some_and(|c| c.in_flight.contains_key(&id));
                let got = core.ack(ConsumerId(consumer), MessageId(id)).map(|_| ());
                prop_assert_eq!(got.is_ok(), expected_ok);
                if expected_ok {
                    model.ack(consumer, id);
                } else {
                    prop_assert_eq!(got, Err(AckError::UnknownId(MessageId(id))));
                }
            }
            Op::Advance { ms } => {
                let mut expected = model.advance(ms);
                core.handle_timeout(t(model.now_ms));
                let mut got: Vec<(u64, u64)> = core
                    .take_expired()
                    .into_iter()
                    .map(|(consumer, id)| (consumer.0, id.0))
                    .collect();
                got.sort_unstable();
                expected.sort_unstable();
                prop_assert_eq!(got, expected, "expired at {} ms", model.now_ms);
            }
            Op::Pause { consumer } => {
                core.pause(ConsumerId(consumer));
                if let Some(c) = model.consumers.get_mut(&consumer) {
                    c.paused = true;
                }
            }
            Op::Resume { consumer } => {
                core.resume(ConsumerId(consumer));
                if let Some(c) = model.consumers.get_mut(&consumer) {
                    c.paused = false;
                }
            }
            Op::Disconnect { consumer } => {
                let expected = model
                    .consumers
                    .get(&consumer)
                    .map_or(0, |c| c.in_flight.len());
                prop_assert_eq!(core.disconnect(ConsumerId(consumer)), expected);
                model.disconnect(consumer);
            }
            Op::BeginDrain => {
                core.begin_drain();
                model.draining = true;
            }
            Op::Release { step } => {
                if model.deliverable_below != u64::MAX {
                    let unreleased = (model.next_id + 1).saturating_sub(model.deliverable_below);
                    let below = model.deliverable_below + 1 + step % (unreleased + 1);
                    core.make_deliverable(MessageId(below));
                    model.deliverable_below = model.deliverable_below.max(below);
                }
            }
        }
        check(&mut core, &model)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn core_agrees_with_the_model_and_keeps_its_invariants(ops in prop::collection::vec(op(), 1..250), hold_new in any::<bool>()) {
        run(&ops, hold_new)?;
    }
}
