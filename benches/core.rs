//! Micro-benchmarks of the queue core: publish, dispatch, ack, and requeue on timeout, in
//! simulated time. Run with `cargo bench --bench core`.

use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use ferry::MessageId;
use ferry::broker::core::{ConsumerId, Core, CoreConfig, NewMessage, WallClock};
use ferry::broker::policy::{Policies, QueuePolicy};
use ferry::protocol::{Payload, QueueName};
use std::hint::black_box;

const BATCH: u64 = 1000;

fn core() -> Core {
    Core::new(CoreConfig {
        policies: Policies::uniform(QueuePolicy::new(Duration::from_secs(5))),
        max_memory_bytes: u64::MAX,
        wall_clock: WallClock::now(),
    })
}

/// A core whose queue holds `BATCH` ready messages and one consumer with room for all.
fn loaded(queue: &QueueName, payload: &Payload) -> Core {
    let mut core = core();
    core.subscribe(ConsumerId(1), queue.clone(), u16::MAX, None);
    for _ in 0..BATCH {
        core.publish(queue, NewMessage::now(payload.clone()))
            .unwrap();
    }
    core
}

/// The same, with every message delivered and in flight.
fn delivered(queue: &QueueName, payload: &Payload, now: Instant) -> Core {
    let mut core = loaded(queue, payload);
    core.dispatch(now, drop);
    core
}

fn bench_core(c: &mut Criterion) {
    let queue = QueueName::new("bench").unwrap();
    let payload = Payload::from_text(&"x".repeat(100));
    let now = Instant::now();
    let mut group = c.benchmark_group("core");
    group.throughput(Throughput::Elements(BATCH));

    group.bench_function("publish 1000", |b| {
        b.iter_batched(
            core,
            |mut core| {
                for _ in 0..BATCH {
                    black_box(
                        core.publish(&queue, NewMessage::now(payload.clone()))
                            .unwrap(),
                    );
                }
                core
            },
            BatchSize::SmallInput,
        )
    });

    group.bench_function("dispatch 1000", |b| {
        b.iter_batched(
            || loaded(&queue, &payload),
            |mut core| {
                core.dispatch(now, |delivery| {
                    black_box(delivery);
                });
                core
            },
            BatchSize::SmallInput,
        )
    });

    group.bench_function("ack 1000", |b| {
        b.iter_batched(
            || delivered(&queue, &payload, now),
            |mut core| {
                for id in 1..=BATCH {
                    core.ack(ConsumerId(1), MessageId(id)).unwrap();
                }
                core
            },
            BatchSize::SmallInput,
        )
    });

    group.bench_function("requeue 1000 on timeout", |b| {
        b.iter_batched(
            || delivered(&queue, &payload, now),
            |mut core| {
                core.handle_timeout(now + Duration::from_secs(6));
                core
            },
            BatchSize::SmallInput,
        )
    });

    group.bench_function("publish, dispatch and ack 1000 through 10 consumers", |b| {
        b.iter_batched(
            || {
                let mut core = core();
                for consumer in 0..10 {
                    core.subscribe(ConsumerId(consumer), queue.clone(), 100, None);
                }
                core
            },
            |mut core| {
                let mut made = Vec::new();
                for _ in 0..BATCH {
                    core.publish(&queue, NewMessage::now(payload.clone()))
                        .unwrap();
                    made.clear();
                    core.dispatch(now, |delivery| made.push(delivery));
                    for delivery in made.drain(..) {
                        core.ack(delivery.consumer, delivery.id).unwrap();
                    }
                }
                core
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench_core);
criterion_main!(benches);
