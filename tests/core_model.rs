//! Model-based test of the queue core: random sequences of publish / subscribe /
//! dispatch / ack / wrong ack / time passing / disconnect / drain, applied both to the
//! core and to a deliberately naive reference model of contract §4 (vectors and linear
//! scans). After every step the two must agree exactly, and these invariants must hold:
//! each published id is in exactly one of ready, in flight, acked; no consumer is over
//! its prefetch; an acked id never comes back; redelivered ids stand before never
//! delivered ones, which keep their publish order. On failure proptest prints the
//! shrunk sequence of operations, which replays deterministically (time is simulated).

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ferry::MessageId;
use ferry::broker::core::{AckError, ConsumerId, Core, CoreConfig, PublishError};
use ferry::protocol::{Payload, QueueName};
use proptest::prelude::*;

const QUEUES: usize = 3;
const CONSUMERS: u64 = 4;
const ACK_TIMEOUT_MS: u64 = 100;
const MAX_MEMORY_BYTES: u64 = 400;

fn t(ms: u64) -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now) + Duration::from_millis(ms)
}

fn queue_name(index: usize) -> QueueName {
    QueueName::new(&format!("q{index}")).unwrap()
}

#[derive(Debug, Clone)]
enum Op {
    Publish {
        queue: usize,
        text_len: usize,
    },
    Subscribe {
        consumer: u64,
        queue: usize,
        prefetch: u16,
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
    BeginDrain,
    /// Lets ids below `watermark + 1 + step % (unreleased + 1)` be delivered.
    Release {
        step: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..QUEUES, 0usize..60).prop_map(|(queue, text_len)| Op::Publish { queue, text_len }),
        2 => (0..CONSUMERS, 0..QUEUES, 1u16..4).prop_map(|(consumer, queue, prefetch)| Op::Subscribe { consumer, queue, prefetch }),
        5 => Just(Op::Dispatch),
        5 => (0..CONSUMERS, 0usize..8).prop_map(|(consumer, pick)| Op::Ack { consumer, pick }),
        1 => (0..CONSUMERS, 0u64..40).prop_map(|(consumer, id)| Op::WrongAck { consumer, id }),
        3 => (0u64..150).prop_map(|ms| Op::Advance { ms }),
        1 => (0..CONSUMERS).prop_map(|consumer| Op::Disconnect { consumer }),
        1 => Just(Op::BeginDrain),
        2 => any::<u64>().prop_map(|step| Op::Release { step }),
    ]
}

#[derive(Debug, Default)]
struct ModelQueue {
    /// (id, deliveries so far)
    ready: VecDeque<(u64, u32)>,
    ring: Vec<u64>,
    /// The consumer to try first.
    next: Option<u64>,
}

#[derive(Debug)]
struct ModelConsumer {
    queue: usize,
    prefetch: usize,
    /// id -> (attempt, deadline in ms)
    in_flight: BTreeMap<u64, (u32, u64)>,
}

#[derive(Debug, Default)]
struct Model {
    now_ms: u64,
    next_id: u64,
    memory: u64,
    draining: bool,
    queues: BTreeMap<usize, ModelQueue>,
    consumers: BTreeMap<u64, ModelConsumer>,
    sizes: BTreeMap<u64, u64>,
    published: Vec<u64>,
    acked: HashSet<u64>,
    ever_delivered: HashSet<u64>,
    /// Ids from here on are not deliverable (durable storage's watermark).
    deliverable_below: u64,
}

impl Model {
    fn publish(&mut self, queue: usize, size: u64) -> Result<u64, &'static str> {
        if self.draining {
            return Err("shutting_down");
        }
        if self.memory + size > MAX_MEMORY_BYTES {
            return Err("queue_full");
        }
        self.next_id += 1;
        let id = self.next_id;
        self.memory += size;
        self.sizes.insert(id, size);
        self.published.push(id);
        self.queues
            .entry(queue)
            .or_default()
            .ready
            .push_back((id, 0));
        Ok(id)
    }

    fn subscribe(&mut self, consumer: u64, queue: usize, prefetch: u16) {
        let q = self.queues.entry(queue).or_default();
        q.ring.push(consumer);
        q.next.get_or_insert(consumer);
        self.consumers.insert(
            consumer,
            ModelConsumer {
                queue,
                prefetch: prefetch.into(),
                in_flight: BTreeMap::new(),
            },
        );
    }

    /// Every delivery possible now, as (queue, consumer, id, attempt), queue by queue.
    fn dispatch(&mut self) -> Vec<(usize, u64, u64, u32)> {
        let mut out = Vec::new();
        for (&queue_index, q) in self.queues.iter_mut() {
            while q
                .ready
                .front()
                .is_some_and(|(id, _)| *id < self.deliverable_below)
                && !q.ring.is_empty()
            {
                let start = q.ring.iter().position(|c| Some(*c) == q.next).unwrap();
                let n = q.ring.len();
                let Some(pos) = (0..n).map(|step| (start + step) % n).find(|&pos| {
                    let c = &self.consumers[&q.ring[pos]];
                    c.in_flight.len() < c.prefetch
                }) else {
                    break;
                };
                let consumer = q.ring[pos];
                let (id, deliveries) = q.ready.pop_front().unwrap();
                let attempt = deliveries + 1;
                self.consumers
                    .get_mut(&consumer)
                    .unwrap()
                    .in_flight
                    .insert(id, (attempt, self.now_ms + ACK_TIMEOUT_MS));
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
        self.memory -= self.sizes[&id];
        self.acked.insert(id);
        true
    }

    fn requeue(&mut self, queue: usize, mut returning: Vec<(u64, u32)>) {
        returning.sort();
        let q = self.queues.get_mut(&queue).unwrap();
        for message in returning.into_iter().rev() {
            q.ready.push_front(message);
        }
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
            .map(|(id, (attempt, _))| (id, attempt))
            .collect();
        self.requeue(gone.queue, returning);
    }

    fn advance(&mut self, ms: u64) {
        self.now_ms += ms;
        let mut expired: BTreeMap<usize, Vec<(u64, u32)>> = BTreeMap::new();
        for c in self.consumers.values_mut() {
            let due: Vec<u64> = c
                .in_flight
                .iter()
                .filter(|(_, (_, at))| *at <= self.now_ms)
                .map(|(id, _)| *id)
                .collect();
            for id in due {
                let (attempt, _) = c.in_flight.remove(&id).unwrap();
                expired.entry(c.queue).or_default().push((id, attempt));
            }
        }
        for (queue, returning) in expired {
            self.requeue(queue, returning);
        }
    }

    fn earliest_deadline(&self) -> Option<u64> {
        self.consumers
            .values()
            .flat_map(|c| c.in_flight.values().map(|(_, at)| *at))
            .min()
    }

    fn is_drained(&self) -> bool {
        self.consumers.values().all(|c| c.in_flight.is_empty())
            && self
                .queues
                .values()
                .all(|q| q.ready.is_empty() || q.ring.is_empty())
    }
}

fn check(core: &mut Core, model: &Model) -> Result<(), TestCaseError> {
    let mut placed: BTreeMap<u64, &'static str> = BTreeMap::new();
    for (&index, q) in &model.queues {
        let core_ready: Vec<u64> = core
            .ready_ids(&queue_name(index))
            .iter()
            .map(|id| id.0)
            .collect();
        let model_ready: Vec<u64> = q.ready.iter().map(|(id, _)| *id).collect();
        prop_assert_eq!(&core_ready, &model_ready, "ready queue q{}", index);
        // Redelivered before never-delivered; never-delivered in publish order.
        let first_fresh = core_ready
            .iter()
            .position(|id| !model.ever_delivered.contains(id))
            .unwrap_or(core_ready.len());
        prop_assert!(
            core_ready[first_fresh..]
                .iter()
                .all(|id| !model.ever_delivered.contains(id)),
            "q{}: {:?}",
            index,
            core_ready
        );
        prop_assert!(core_ready[first_fresh..].windows(2).all(|w| w[0] < w[1]));
        for id in core_ready {
            prop_assert!(placed.insert(id, "ready").is_none(), "id {} twice", id);
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
    for id in &model.acked {
        prop_assert!(
            placed.insert(*id, "acked").is_none(),
            "acked id {} is still held",
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
        model.queues.values().map(|q| q.ready.len()).sum::<usize>()
    );
    prop_assert_eq!(
        stats.in_flight,
        model
            .consumers
            .values()
            .map(|c| c.in_flight.len())
            .sum::<usize>()
    );
    prop_assert_eq!(stats.memory_bytes, model.memory);
    prop_assert_eq!(stats.acked_total, model.acked.len() as u64);
    prop_assert_eq!(core.poll_timeout(), model.earliest_deadline().map(t));
    if model.draining {
        prop_assert_eq!(core.is_drained(), model.is_drained());
    }
    Ok(())
}

fn run(ops: &[Op], hold_new: bool) -> Result<(), TestCaseError> {
    let mut core = Core::new(CoreConfig {
        ack_timeout: Duration::from_millis(ACK_TIMEOUT_MS),
        max_memory_bytes: MAX_MEMORY_BYTES,
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
            Op::Publish { queue, text_len } => {
                let payload = Payload::from_text(&"x".repeat(text_len));
                let size = payload.len() as u64;
                let got = core
                    .publish(&queue_name(queue), payload)
                    .map(|id| id.0)
                    .map_err(|e| match e {
                        PublishError::QueueFull { .. } => "queue_full",
                        PublishError::ShuttingDown => "shutting_down",
                    });
                prop_assert_eq!(got, model.publish(queue, size));
            }
            Op::Subscribe {
                consumer,
                queue,
                prefetch,
            } => {
                if !model.consumers.contains_key(&consumer) {
                    core.subscribe(ConsumerId(consumer), queue_name(queue), prefetch);
                    model.subscribe(consumer, queue, prefetch);
                }
            }
            Op::Dispatch => {
                let mut got: BTreeMap<usize, Vec<(u64, u64, u32)>> = BTreeMap::new();
                while let Some(d) = core.poll_delivery(t(model.now_ms)) {
                    prop_assert!(
                        !model.acked.contains(&d.id.0),
                        "acked id {} delivered again",
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
                let held: Vec<u64> = model
                    .consumers
                    .get(&consumer)
                    .map(|c| c.in_flight.keys().copied().collect())
                    .unwrap_or_default();
                if let Some(&id) = held.get(pick % held.len().max(1)) {
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
                model.advance(ms);
                core.handle_timeout(t(model.now_ms));
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
