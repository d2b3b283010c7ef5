//! Unit tests of the core, one or more per delivery rule of contract §4, all in
//! simulated time: `t(ms)` is a fixed origin plus `ms` milliseconds.

use std::sync::OnceLock;
use std::time::Duration;

use super::*;
use crate::broker::policy::PolicyFile;

const ACK_TIMEOUT: Duration = Duration::from_millis(200);

fn t(ms: u64) -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now) + Duration::from_millis(ms)
}

/// The wall-clock time at `t(0)`, in milliseconds since the Unix epoch.
const WALL_MS: u64 = 1_767_225_600_000;

fn wall_clock() -> WallClock {
    WallClock {
        at: t(0),
        unix_ms: WALL_MS,
    }
}

fn core() -> Core {
    core_with_memory(u64::MAX)
}

fn core_with_memory(max_memory_bytes: u64) -> Core {
    Core::new(CoreConfig {
        policies: Policies::uniform(QueuePolicy::new(ACK_TIMEOUT)),
        max_memory_bytes,
        wall_clock: wall_clock(),
    })
}

fn q(name: &str) -> QueueName {
    QueueName::new(name).unwrap()
}

const C1: ConsumerId = ConsumerId(1);
const C2: ConsumerId = ConsumerId(2);
const C3: ConsumerId = ConsumerId(3);

/// A message of priority 0.
fn message(text: &str, due: Due) -> NewMessage {
    NewMessage {
        payload: Payload::from_text(text),
        priority: 0,
        due,
        attributes: None,
    }
}

fn publish(core: &mut Core, queue: &str, text: &str) -> MessageId {
    core.publish(&q(queue), message(text, Due::Now)).unwrap().id
}

/// A message as storage gives it back: not delayed, published at the wall clock's start.
fn restored(id: u64, text: &str, deliveries: u32) -> Restored {
    Restored {
        id: MessageId(id),
        payload: Payload::from_text(text),
        deliveries,
        priority: 0,
        published_at_ms: WALL_MS,
        due_ms: None,
        attributes: None,
        dead_letter: None,
    }
}

fn publish_n(core: &mut Core, queue: &str, n: usize) -> Vec<MessageId> {
    (0..n)
        .map(|i| publish(core, queue, &format!("m{i}")))
        .collect()
}

/// Every delivery the core will make at `now`, as (consumer, id, attempt).
fn drain(core: &mut Core, now: Instant) -> Vec<(ConsumerId, MessageId, u32)> {
    deliveries(core, now)
        .into_iter()
        .map(|d| (d.consumer, d.id, d.attempt))
        .collect()
}

/// Every delivery the core will make at `now`.
fn deliveries(core: &mut Core, now: Instant) -> Vec<Delivery> {
    let mut made = Vec::new();
    core.dispatch(now, |d| made.push(d));
    made
}

fn delivered_ids(deliveries: &[(ConsumerId, MessageId, u32)]) -> Vec<MessageId> {
    deliveries.iter().map(|d| d.1).collect()
}

#[test]
fn ids_start_at_one_and_increase_across_queues() {
    let mut core = core();
    assert_eq!(publish(&mut core, "a", "x"), MessageId(1));
    assert_eq!(publish(&mut core, "b", "y"), MessageId(2));
    assert_eq!(publish(&mut core, "a", "z"), MessageId(3));
}

#[test]
fn rule1_ready_messages_are_delivered_in_fifo_order_with_their_payload() {
    let mut core = core();
    let published = publish_n(&mut core, "q", 5);
    core.subscribe(C1, q("q"), 100, None);
    let delivered = deliveries(&mut core, t(0));
    assert_eq!(
        delivered.iter().map(|d| d.id).collect::<Vec<_>>(),
        published
    );
    assert_eq!(delivered[2].payload, Payload::from_text("m2"));
    assert!(delivered.iter().all(|d| d.attempt == 1 && d.consumer == C1));
}

#[test]
fn rule2_round_robin_in_subscription_order() {
    let mut core = core();
    core.subscribe(C1, q("q"), 100, None);
    core.subscribe(C2, q("q"), 100, None);
    core.subscribe(C3, q("q"), 100, None);
    publish_n(&mut core, "q", 7);
    let consumers: Vec<_> = drain(&mut core, t(0)).iter().map(|d| d.0).collect();
    assert_eq!(consumers, [C1, C2, C3, C1, C2, C3, C1]);
    // The cursor carries on where it stopped.
    publish_n(&mut core, "q", 2);
    let consumers: Vec<_> = drain(&mut core, t(0)).iter().map(|d| d.0).collect();
    assert_eq!(consumers, [C2, C3]);
}

#[test]
fn rule2_consumers_at_their_prefetch_are_skipped() {
    let mut core = core();
    core.subscribe(C1, q("q"), 1, None);
    core.subscribe(C2, q("q"), 3, None);
    let published = publish_n(&mut core, "q", 6);
    let delivered = drain(&mut core, t(0));
    let consumers: Vec<_> = delivered.iter().map(|d| d.0).collect();
    assert_eq!(consumers, [C1, C2, C2, C2]);
    assert_eq!(core.ready_ids(&q("q")), published[4..]);
    // An ack frees one slot, which the next ready message takes.
    core.ack(C1, published[0]).unwrap();
    assert_eq!(drain(&mut core, t(1)), [(C1, published[4], 1)]);
    assert!(drain(&mut core, t(1)).is_empty());
}

/// Asserts that the core's next expiry is for the deadline `at`, as the core task sees
/// it: following `poll_timeout` (which may wake it early, to move timers down the wheel,
/// but never late), the first message expires no sooner than `at` and no later than a
/// timer tick after it.
fn assert_next_timeout_for(core: &mut Core, at: Instant) {
    let in_flight = core.stats().in_flight;
    loop {
        let next = core.poll_timeout().expect("a timeout is due");
        assert!(next <= at + TIMER_TICK, "next timeout {next:?} for {at:?}");
        core.handle_timeout(next);
        if core.stats().in_flight < in_flight {
            assert!(next >= at, "expired at {next:?}, before {at:?}");
            return;
        }
    }
}

#[test]
fn rule3_delivery_sets_the_deadline_to_now_plus_ack_timeout() {
    let mut core = core();
    core.subscribe(C1, q("q"), 10, None);
    assert_eq!(core.poll_timeout(), None);
    publish_n(&mut core, "q", 1);
    drain(&mut core, t(50));
    core.handle_timeout(t(50) + ACK_TIMEOUT - Duration::from_nanos(1));
    assert_eq!(core.stats().in_flight, 1, "not a nanosecond early");
    core.handle_timeout(t(50) + ACK_TIMEOUT);
    assert_eq!(
        core.stats().in_flight,
        0,
        "due at now + ack timeout exactly"
    );
    drain(&mut core, t(260));
    publish_n(&mut core, "q", 1);
    drain(&mut core, t(280));
    assert_next_timeout_for(&mut core, t(260) + ACK_TIMEOUT);
    assert_next_timeout_for(&mut core, t(280) + ACK_TIMEOUT);
}

/// Contract §11: each queue's lease is its own policy's ack timeout, fixed when the
/// queue is created.
#[test]
fn each_queue_leases_its_deliveries_for_its_policys_ack_timeout() {
    let file = PolicyFile::parse_text("[queues.\"fast*\"]\nack_timeout = \"50ms\"\n").unwrap();
    let mut core = Core::new(CoreConfig {
        policies: file.resolve(&QueuePolicy::new(ACK_TIMEOUT)),
        max_memory_bytes: u64::MAX,
        wall_clock: wall_clock(),
    });
    core.subscribe(C1, q("fast-lane"), 10, None);
    core.subscribe(C2, q("slow"), 10, None);
    publish(&mut core, "fast-lane", "f");
    publish(&mut core, "slow", "s");
    assert_eq!(drain(&mut core, t(0)).len(), 2);
    core.handle_timeout(t(50));
    assert_eq!(
        core.take_expired(),
        [(C1, MessageId(1))],
        "fast-lane's 50 ms"
    );
    core.handle_timeout(t(0) + ACK_TIMEOUT - Duration::from_nanos(1));
    assert_eq!(core.take_expired(), []);
    core.handle_timeout(t(0) + ACK_TIMEOUT);
    assert_eq!(
        core.take_expired(),
        [(C2, MessageId(2))],
        "the default lease"
    );
}

#[test]
fn rule4_an_ack_removes_the_message_for_good() {
    let mut core = core();
    core.subscribe(C1, q("q"), 10, None);
    let id = publish(&mut core, "q", "x");
    drain(&mut core, t(0));
    core.ack(C1, id).unwrap();
    assert_eq!(core.poll_timeout(), None, "its deadline is gone");
    core.handle_timeout(t(10_000));
    assert!(drain(&mut core, t(10_000)).is_empty());
    assert_eq!(
        core.ack(C1, id),
        Err(AckError::UnknownId(id)),
        "twice is unknown"
    );
    assert_eq!(
        core.stats(),
        CoreStats {
            queues: 1,
            consumers: 1,
            published_total: 1,
            delivered_total: 1,
            acked_total: 1,
            memory_bytes: QUEUE_OVERHEAD_BYTES + 1 + READY_LEVEL_BYTES + 4 * READY_SLOT_BYTES,
            ..CoreStats::default()
        }
    );
}

#[test]
fn rule4_acks_from_another_consumer_or_for_unknown_ids_change_nothing() {
    let mut core = core();
    core.subscribe(C1, q("q"), 10, None);
    core.subscribe(C2, q("q"), 10, None);
    let id = publish(&mut core, "q", "x");
    assert_eq!(drain(&mut core, t(0)), [(C1, id, 1)]);
    assert_eq!(core.ack(C2, id), Err(AckError::UnknownId(id)));
    assert_eq!(
        core.ack(C1, MessageId(999)),
        Err(AckError::UnknownId(MessageId(999)))
    );
    assert_eq!(
        core.ack(C3, id),
        Err(AckError::UnknownId(id)),
        "not a consumer at all"
    );
    assert_eq!(core.in_flight_ids(C1), [id]);
    core.ack(C1, id).unwrap();
}

#[test]
fn rule4_an_ack_after_the_requeue_is_unknown() {
    let mut core = core();
    core.subscribe(C1, q("q"), 10, None);
    let id = publish(&mut core, "q", "x");
    drain(&mut core, t(0));
    core.handle_timeout(t(200));
    assert_eq!(core.ack(C1, id), Err(AckError::UnknownId(id)));
    assert_eq!(core.ready_ids(&q("q")), [id]);
}

#[test]
fn rule5_an_expired_message_returns_to_the_front_with_the_next_attempt() {
    let mut core = core();
    core.subscribe(C1, q("q"), 1, None);
    let first = publish(&mut core, "q", "first");
    let rest = publish_n(&mut core, "q", 2);
    assert_eq!(drain(&mut core, t(0)), [(C1, first, 1)]);

    core.handle_timeout(t(199));
    assert_eq!(core.in_flight_ids(C1), [first], "not before the deadline");
    core.handle_timeout(t(200));
    assert_eq!(
        core.ready_ids(&q("q")),
        [first, rest[0], rest[1]],
        "at the front"
    );

    let again = deliveries(&mut core, t(200));
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].id, again[0].attempt), (first, 2));
    assert_eq!(again[0].payload, Payload::from_text("first"));
    core.handle_timeout(t(400));
    assert_eq!(drain(&mut core, t(400)), [(C1, first, 3)]);
}

#[test]
fn rule5_a_redelivery_may_go_to_another_consumer() {
    let mut core = core();
    core.subscribe(C1, q("q"), 1, None);
    core.subscribe(C2, q("q"), 1, None);
    let a = publish(&mut core, "q", "a");
    assert_eq!(drain(&mut core, t(0)), [(C1, a, 1)]);
    core.handle_timeout(t(200));
    assert_eq!(
        drain(&mut core, t(200)),
        [(C2, a, 2)],
        "C2 is next in round-robin order"
    );
    assert_eq!(
        core.ack(C1, a),
        Err(AckError::UnknownId(a)),
        "C1 no longer holds it"
    );
    core.ack(C2, a).unwrap();
}

#[test]
fn rule5_poll_timeout_skips_deadlines_of_acked_messages() {
    let mut core = core();
    core.subscribe(C1, q("q"), 10, None);
    let ids = publish_n(&mut core, "q", 2);
    drain(&mut core, t(0));
    publish_n(&mut core, "q", 1);
    drain(&mut core, t(100));
    core.ack(C1, ids[0]).unwrap();
    core.ack(C1, ids[1]).unwrap();
    assert_next_timeout_for(&mut core, t(100) + ACK_TIMEOUT);
}

#[test]
fn rule6_a_disconnect_returns_all_in_flight_messages_at_once() {
    let mut core = core();
    core.subscribe(C1, q("q"), 3, None);
    let ids = publish_n(&mut core, "q", 5);
    drain(&mut core, t(0));
    assert_eq!(core.disconnect(C1), 3);
    assert_eq!(core.ready_ids(&q("q")), ids);
    assert_eq!(
        core.poll_timeout(),
        None,
        "their deadlines died with the consumer"
    );
    core.subscribe(C2, q("q"), 10, None);
    let again = drain(&mut core, t(1));
    assert_eq!(delivered_ids(&again), ids);
    let attempts: Vec<_> = again.iter().map(|d| d.2).collect();
    assert_eq!(attempts, [2, 2, 2, 1, 1]);
}

#[test]
fn rule6_disconnect_keeps_round_robin_fair_for_the_rest() {
    let mut core = core();
    for c in [C1, C2, C3] {
        core.subscribe(c, q("q"), 100, None);
    }
    publish_n(&mut core, "q", 2);
    assert_eq!(
        drain(&mut core, t(0))
            .iter()
            .map(|d| d.0)
            .collect::<Vec<_>>(),
        [C1, C2]
    );
    core.disconnect(C1);
    publish_n(&mut core, "q", 3);
    // C1's returned message first, then the three new ones; the cursor stayed on C3.
    let order: Vec<_> = drain(&mut core, t(0)).iter().map(|d| d.0).collect();
    assert_eq!(order, [C3, C2, C3, C2]);
}

#[test]
fn rule7_messages_returning_together_keep_their_relative_order() {
    let mut core = core();
    core.subscribe(C1, q("q"), 100, None);
    core.subscribe(C2, q("q"), 100, None);
    let ids = publish_n(&mut core, "q", 6);
    drain(&mut core, t(0));
    let fresh = publish_n(&mut core, "q", 1);
    // Everything expires in the same call: ids 1..6 across two consumers.
    core.handle_timeout(t(500));
    let mut expected = ids.clone();
    expected.extend(fresh);
    assert_eq!(core.ready_ids(&q("q")), expected);
}

#[test]
fn rule7_earlier_returns_stay_ahead_of_never_delivered_messages() {
    let mut core = core();
    core.subscribe(C1, q("q"), 2, None);
    let ids = publish_n(&mut core, "q", 4);
    drain(&mut core, t(0));
    core.disconnect(C1);
    let order = core.ready_ids(&q("q"));
    assert_eq!(order, ids);
}

fn publish_at(core: &mut Core, queue: &str, text: &str, priority: u8, due: Due) -> MessageId {
    let message = NewMessage {
        priority,
        ..message(text, due)
    };
    core.publish(&q(queue), message).unwrap().id
}

#[test]
fn rule10_higher_priorities_go_first_and_returns_keep_to_their_own() {
    let mut core = core();
    let low = publish_at(&mut core, "q", "low", 0, Due::Now);
    let high = publish_at(&mut core, "q", "high", 9, Due::Now);
    let mid = publish_at(&mut core, "q", "mid", 5, Due::Now);
    let high2 = publish_at(&mut core, "q", "high2", 9, Due::Now);
    assert_eq!(core.ready_ids(&q("q")), [high, high2, mid, low]);
    core.subscribe(C1, q("q"), 2, None);
    let made = deliveries(&mut core, t(0));
    assert_eq!(
        made.iter().map(|d| (d.id, d.priority)).collect::<Vec<_>>(),
        [(high, 9), (high2, 9)]
    );
    // A timeout returns them to the front of their priority, not of the queue...
    let high3 = publish_at(&mut core, "q", "high3", 9, Due::Now);
    core.handle_timeout(t(0) + ACK_TIMEOUT);
    assert_eq!(core.ready_ids(&q("q")), [high, high2, high3, mid, low]);
    // ...and a nack to the back of it, still ahead of every lower priority.
    assert_eq!(drain(&mut core, t(200)), [(C1, high, 2), (C1, high2, 2)]);
    core.nack(C1, high, NackAction::Retry(None)).unwrap();
    assert_eq!(core.ready_ids(&q("q")), [high3, high, mid, low]);
    // A delayed message joins the back of its priority when due.
    let delayed = publish_at(
        &mut core,
        "q",
        "delayed",
        5,
        Due::After(Duration::from_millis(100)),
    );
    let mid2 = publish_at(&mut core, "q", "mid2", 5, Due::Now);
    core.handle_timeout(t(300));
    assert_eq!(
        core.ready_ids(&q("q")),
        [high3, high, mid, mid2, delayed, low]
    );
    // What the log keeps of each message carries its priority.
    let logged: Vec<(MessageId, u8)> = core
        .live_messages()
        .filter(|m| [low, delayed, high2].contains(&m.id))
        .map(|m| (m.id, m.priority))
        .collect();
    assert_eq!(logged.len(), 3);
    assert!(logged.contains(&(low, 0)) && logged.contains(&(delayed, 5)));
    assert!(logged.contains(&(high2, 9)), "in flight");
}

#[test]
fn rule10_restored_and_dead_lettered_messages_keep_their_priority() {
    let mut core = core_with_policies(TWO_DELIVERIES_THEN_DLQ);
    core.restore(
        &q("jobs"),
        Restored {
            priority: 7,
            ..restored(1, "urgent", 0)
        },
    );
    core.restore(&q("jobs"), restored(2, "plain", 0));
    core.end_restore();
    let waiting = publish_at(&mut core, "jobs.dlq", "waiting", 7, Due::Now);
    let low = publish_at(&mut core, "jobs.dlq", "low", 0, Due::Now);
    core.subscribe(C1, q("jobs"), 1, None);
    assert_eq!(drain(&mut core, t(0)), [(C1, MessageId(1), 1)]);
    core.nack(C1, MessageId(1), NackAction::DeadLetter).unwrap();
    assert_eq!(
        core.ready_ids(&q("jobs.dlq")),
        [waiting, MessageId(1), low],
        "at the back of its priority in the dead-letter queue"
    );
}

#[test]
fn rule8_messages_wait_while_no_consumer_is_connected() {
    let mut core = core();
    let ids = publish_n(&mut core, "q", 3);
    assert!(drain(&mut core, t(0)).is_empty());
    assert_eq!(core.poll_timeout(), None);
    core.subscribe(C1, q("other"), 10, None);
    assert!(drain(&mut core, t(0)).is_empty(), "queues are separate");
    core.subscribe(C2, q("q"), 10, None);
    assert_eq!(delivered_ids(&drain(&mut core, t(0))), ids);
}

#[test]
fn the_memory_limit_counts_ready_and_in_flight_messages_until_acked() {
    let one = Payload::from_text("0123456789").len() as u64 + MESSAGE_OVERHEAD_BYTES;
    // The queue, and its ready queue's one level, whose first chunk has room for four.
    let queue = QUEUE_OVERHEAD_BYTES + 1 + READY_LEVEL_BYTES + 4 * READY_SLOT_BYTES;
    let mut core = core_with_memory(queue + 2 * one);
    let a = publish(&mut core, "q", "0123456789");
    publish(&mut core, "q", "abcdefghij");
    let refused = core.publish(&q("q"), message("ABCDEFGHIJ", Due::Now));
    assert_eq!(
        refused,
        Err(PublishError::QueueFull {
            used_bytes: queue + 2 * one,
            limit_bytes: queue + 2 * one
        })
    );
    assert_eq!(refused.unwrap_err().code(), ErrorCode::QueueFull);
    core.subscribe(C1, q("q"), 10, None);
    drain(&mut core, t(0));
    assert!(
        core.publish(&q("q"), message("ABCDEFGHIJ", Due::Now))
            .is_err(),
        "in flight still counts"
    );
    core.ack(C1, a).unwrap();
    assert_eq!(
        publish(&mut core, "q", "ABCDEFGHIJ"),
        MessageId(3),
        "refusals use no id"
    );
}

#[test]
fn draining_refuses_publishes_and_finishes_when_nothing_is_in_flight() {
    let mut core = core();
    core.subscribe(C1, q("q"), 1, None);
    let ids = publish_n(&mut core, "q", 2);
    core.begin_drain();
    assert!(core.is_draining());
    assert_eq!(
        core.publish(&q("q"), message("late", Due::Now)),
        Err(PublishError::ShuttingDown)
    );
    assert!(
        !core.is_drained(),
        "ready messages and a consumer to take them"
    );
    drain(&mut core, t(0));
    core.ack(C1, ids[0]).unwrap();
    drain(&mut core, t(0));
    assert!(!core.is_drained(), "one in flight");
    core.ack(C1, ids[1]).unwrap();
    assert!(core.is_drained());
    assert_eq!(
        core.drain_report(),
        DrainReport {
            delivered: 2,
            left_ready: 0,
            left_in_flight: 0,
            left_delayed: 0,
        }
    );
}

#[test]
fn draining_ends_with_ready_messages_when_no_consumer_is_left() {
    let mut core = core();
    publish_n(&mut core, "q", 3);
    core.begin_drain();
    assert!(core.is_drained());
    assert_eq!(
        core.drain_report(),
        DrainReport {
            delivered: 0,
            left_ready: 3,
            left_in_flight: 0,
            left_delayed: 0,
        }
    );
    core.subscribe(C1, q("q"), 2, None);
    assert!(!core.is_drained(), "a consumer arrived");
    drain(&mut core, t(0));
    core.disconnect(C1);
    assert!(core.is_drained());
    assert_eq!(core.drain_report().left_ready, 3);
    assert_eq!(core.drain_report().delivered, 2);
}

#[test]
fn an_empty_queue_without_consumers_is_forgotten() {
    let mut core = core();
    core.subscribe(C1, q("q"), 1, None);
    let id = publish(&mut core, "q", "x");
    drain(&mut core, t(0));
    core.ack(C1, id).unwrap();
    core.disconnect(C1);
    assert_eq!(
        (
            core.stats().queues,
            core.stats().ready,
            core.stats().in_flight
        ),
        (0, 0, 0)
    );
    // A queue with messages is kept.
    core.subscribe(C2, q("q"), 1, None);
    publish(&mut core, "q", "y");
    core.disconnect(C2);
    assert_eq!(core.stats().queues, 1);
    assert_eq!(core.stats().ready, 1);
}

#[test]
fn disconnecting_an_unknown_consumer_is_harmless() {
    let mut core = core();
    publish(&mut core, "q", "x");
    assert_eq!(core.disconnect(C1), 0);
    assert_eq!(core.stats().ready, 1);
}

#[test]
fn lease_memory_follows_what_is_in_flight_not_what_was_acked() {
    let mut core = core();
    core.subscribe(C1, q("q"), 10, None);
    // One delivery is never acked; a hundred thousand after it are.
    publish(&mut core, "q", "stuck");
    drain(&mut core, t(0));
    for i in 0..100_000 {
        let id = publish(&mut core, "q", "x");
        drain(&mut core, t(i / 1000));
        core.ack(C1, id).unwrap();
    }
    assert_eq!(core.leases.len(), 1, "one lease per message in flight");
    assert_eq!(
        core.leases.allocated(),
        core.leases.allocated().min(1024),
        "one slab chunk holds them"
    );
    core.handle_timeout(t(1000) + ACK_TIMEOUT);
    assert_eq!(core.take_expired(), [(C1, MessageId(1))]);
    assert_eq!(core.leases.len(), 0);
}

#[test]
fn a_clock_that_steps_back_cannot_reorder_deadlines() {
    let mut core = core();
    core.subscribe(C1, q("q"), 10, None);
    publish_n(&mut core, "q", 1);
    drain(&mut core, t(1000));
    publish_n(&mut core, "q", 1);
    drain(&mut core, t(10));
    core.handle_timeout(t(1000) + ACK_TIMEOUT);
    assert_eq!(
        core.stats().ready,
        2,
        "both expire: the second was stamped at t(1000)"
    );
}

#[test]
fn held_new_messages_wait_for_make_deliverable_in_id_order() {
    let mut core = core();
    let old = publish(&mut core, "q", "before");
    core.hold_new_messages();
    let new = publish_n(&mut core, "q", 3);
    core.subscribe(C1, q("q"), 10, None);
    assert_eq!(
        delivered_ids(&drain(&mut core, t(0))),
        [old],
        "only what was there before"
    );
    core.make_deliverable(MessageId(new[1].0));
    assert_eq!(delivered_ids(&drain(&mut core, t(0))), [new[0]]);
    core.make_deliverable(MessageId(new[0].0)); // never backwards
    assert!(drain(&mut core, t(0)).is_empty());
    core.make_deliverable(MessageId(u64::MAX));
    assert_eq!(delivered_ids(&drain(&mut core, t(0))), new[1..]);
    // Redeliveries are never held: they were delivered before.
    core.disconnect(C1);
    core.subscribe(C2, q("q"), 10, None);
    assert_eq!(drain(&mut core, t(0)).len(), 4);
}

#[test]
fn restored_messages_keep_their_deliveries_and_ids_go_on_after_them() {
    let mut core = core();
    core.restore(&q("q"), restored(7, "seven", 2));
    core.restore(&q("q"), restored(9, "nine", 0));
    core.skip_ids_below(12);
    core.subscribe(C1, q("q"), 10, None);
    assert_eq!(
        drain(&mut core, t(0)),
        [(C1, MessageId(7), 3), (C1, MessageId(9), 1)]
    );
    assert_eq!(publish(&mut core, "q", "next"), MessageId(12));
    let live: Vec<_> = core.live_messages().map(|m| (m.id, m.deliveries)).collect();
    assert_eq!(live.len(), 3);
    assert!(live.contains(&(MessageId(7), 3)) && live.contains(&(MessageId(12), 0)));
}

#[test]
fn a_paused_consumer_is_skipped_until_resumed() {
    let mut core = core();
    core.subscribe(C1, q("q"), 10, None);
    core.subscribe(C2, q("q"), 10, None);
    core.pause(C1);
    let ids = publish_n(&mut core, "q", 3);
    assert_eq!(
        drain(&mut core, t(0)),
        [(C2, ids[0], 1), (C2, ids[1], 1), (C2, ids[2], 1)],
        "round-robin skips the paused consumer"
    );
    core.pause(C2);
    let more = publish_n(&mut core, "q", 2);
    assert!(drain(&mut core, t(0)).is_empty(), "both paused");
    core.ack(C2, ids[0]).unwrap();
    assert!(drain(&mut core, t(0)).is_empty(), "an ack does not resume");
    core.resume(C1);
    assert_eq!(drain(&mut core, t(0)), [(C1, more[0], 1), (C1, more[1], 1)]);
    // A paused consumer's leases still run out.
    core.handle_timeout(t(0) + ACK_TIMEOUT);
    let mut expired = core.take_expired();
    expired.sort_unstable();
    assert_eq!(
        expired,
        [(C1, more[0]), (C1, more[1]), (C2, ids[1]), (C2, ids[2])]
    );
    assert!(core.take_expired().is_empty(), "taken once");
}

#[test]
fn a_queue_costs_memory_while_it_exists() {
    let mut core = core();
    core.subscribe(C1, q("a-queue"), 1, None);
    let empty_queue = QUEUE_OVERHEAD_BYTES + "a-queue".len() as u64;
    assert_eq!(core.stats().memory_bytes, empty_queue);
    let id = publish(&mut core, "a-queue", "x");
    let message = Payload::from_text("x").len() as u64 + MESSAGE_OVERHEAD_BYTES;
    assert_eq!(
        core.stats().memory_bytes,
        empty_queue + message + READY_LEVEL_BYTES + 4 * READY_SLOT_BYTES
    );
    drain(&mut core, t(0));
    core.ack(C1, id).unwrap();
    core.disconnect(C1);
    assert_eq!(core.stats().queues, 0);
    assert_eq!(core.stats().memory_bytes, 0, "everything given back");
}

/// A core whose queues take their policies from this config text, over `ACK_TIMEOUT`.
fn core_with_policies(text: &str) -> Core {
    let file = PolicyFile::parse_text(text).unwrap();
    Core::new(CoreConfig {
        policies: file.resolve(&QueuePolicy::new(ACK_TIMEOUT)),
        max_memory_bytes: u64::MAX,
        wall_clock: wall_clock(),
    })
}

const TWO_DELIVERIES_THEN_DLQ: &str =
    "[queues.\"jobs\"]\nmax_deliveries = 2\ndead_letter_queue = \"jobs.dlq\"\n";

/// Rules 14 and 15: with `max_deliveries = 2`, a message returned after its second
/// delivery goes to the back of the dead-letter queue, attempt counting from 1 again,
/// with a record of where it came from, why, after how many deliveries, and when.
#[test]
fn rule14_a_message_returned_after_max_deliveries_is_dead_lettered() {
    let mut core = core_with_policies(TWO_DELIVERIES_THEN_DLQ);
    core.subscribe(C1, q("jobs"), 10, None);
    let id = publish(&mut core, "jobs", "job");
    let waiting = publish(&mut core, "jobs.dlq", "already there");
    assert_eq!(drain(&mut core, t(0)), [(C1, id, 1)]);
    core.handle_timeout(t(0) + ACK_TIMEOUT);
    assert_eq!(
        drain(&mut core, t(300)),
        [(C1, id, 2)],
        "returned: under the limit"
    );
    assert!(core.take_relocated().is_empty());
    core.handle_timeout(t(300) + ACK_TIMEOUT);
    assert_eq!(core.ready_ids(&q("jobs")), []);
    assert_eq!(core.ready_ids(&q("jobs.dlq")), [waiting, id], "at the back");
    let record = Arc::new(DeadLetter {
        queue: q("jobs"),
        reason: DeadLetterReason::MaxDeliveries,
        attempts: 2,
        at_ms: WALL_MS + 500,
    });
    assert_eq!(
        core.take_relocated(),
        [Relocated::DeadLettered {
            id,
            from: q("jobs"),
            to: q("jobs.dlq"),
            payload: Payload::from_text("job"),
            priority: 0,
            published_at_ms: WALL_MS,
            attributes: None,
            replaced: None,
            record: record.clone(),
        }]
    );
    core.subscribe(C2, q("jobs.dlq"), 10, None);
    assert_eq!(drain(&mut core, t(600)), [(C2, waiting, 1), (C2, id, 1)]);
    let stats = core.stats();
    assert_eq!(
        (stats.dead_lettered_total, stats.in_flight, stats.ready),
        (1, 2, 0)
    );
    // The record stays with the message, for the log to keep.
    let unacked: Vec<_> = core
        .live_messages()
        .filter(|m| m.id == id)
        .map(|m| (m.queue.clone(), m.dead_letter.cloned()))
        .collect();
    assert_eq!(unacked, [(q("jobs.dlq"), Some((*record).clone()))]);
    assert_eq!(core.ack(C2, id).unwrap().dead_letter, Some(record));
}

/// A consumer that vanishes returns its messages the same way: those at the limit are
/// dead-lettered, the others go back to the front.
#[test]
fn rule14_a_disconnect_dead_letters_the_messages_at_their_limit() {
    let mut core = core_with_policies(TWO_DELIVERIES_THEN_DLQ);
    core.subscribe(C1, q("jobs"), 10, None);
    let first = publish(&mut core, "jobs", "first");
    drain(&mut core, t(0));
    core.handle_timeout(t(0) + ACK_TIMEOUT);
    let second = publish(&mut core, "jobs", "second");
    assert_eq!(drain(&mut core, t(300)), [(C1, first, 2), (C1, second, 1)]);
    core.advance_to(t(900));
    assert_eq!(core.disconnect(C1), 2);
    assert_eq!(core.ready_ids(&q("jobs")), [second]);
    assert_eq!(core.ready_ids(&q("jobs.dlq")), [first]);
    assert_eq!(core.stats().ready, 2);
    let Relocated::DeadLettered { record, .. } = &core.take_relocated()[0] else {
        panic!("a move")
    };
    assert_eq!(record.at_ms, WALL_MS + 900, "stamped when it happened");
}

/// Without a dead-letter queue, a policy that opted in drops the message, and counts it.
#[test]
fn rule15_without_a_dead_letter_queue_an_opted_in_policy_discards() {
    let mut core =
        core_with_policies("[queues.\"lossy\"]\nmax_deliveries = 1\ndiscard_dead_letters = true\n");
    core.subscribe(C1, q("lossy"), 10, None);
    let id = publish(&mut core, "lossy", "x");
    let before = core.stats().memory_bytes;
    drain(&mut core, t(0));
    core.handle_timeout(t(0) + ACK_TIMEOUT);
    let stats = core.stats();
    assert_eq!(
        (stats.ready, stats.in_flight, stats.discarded_total),
        (0, 0, 1)
    );
    let message = Payload::from_text("x").len() as u64 + MESSAGE_OVERHEAD_BYTES;
    assert_eq!(stats.memory_bytes, before - message);
    assert!(matches!(
        &core.take_relocated()[..],
        [Relocated::Discarded { id: gone, dead_letter: None, .. }] if *gone == id
    ));
}

/// A dead letter's own queue applies its own policy: dead-lettered again, the message
/// carries the new record, and the log is told which one it replaces.
#[test]
fn a_dead_letter_queue_applies_its_own_policy() {
    let mut core = core_with_policies(
        "[queues.\"a\"]\nmax_deliveries = 1\ndead_letter_queue = \"b\"\n[queues.\"b\"]\nmax_deliveries = 1\ndead_letter_queue = \"c\"\n",
    );
    core.subscribe(C1, q("a"), 10, None);
    core.subscribe(C2, q("b"), 10, None);
    let id = publish(&mut core, "a", "m");
    drain(&mut core, t(0));
    core.handle_timeout(t(0) + ACK_TIMEOUT);
    assert_eq!(drain(&mut core, t(200)), [(C2, id, 1)]);
    core.handle_timeout(t(200) + ACK_TIMEOUT);
    assert_eq!(core.ready_ids(&q("c")), [id]);
    let relocated = core.take_relocated();
    let Relocated::DeadLettered {
        replaced, record, ..
    } = &relocated[1]
    else {
        panic!("{relocated:?}")
    };
    assert_eq!(replaced.as_ref().map(|r| r.queue.clone()), Some(q("a")));
    assert_eq!((record.queue.clone(), record.attempts), (q("b"), 1));
}

/// A message restored with its last allowed delivery already counted (the crash came
/// before its return was logged) is dead-lettered at once, not delivered once more.
#[test]
fn a_restored_message_at_its_limit_is_dead_lettered_at_once() {
    let mut core = core_with_policies(TWO_DELIVERIES_THEN_DLQ);
    core.restore(&q("jobs"), restored(4, "m", 2));
    core.restore(&q("jobs"), restored(5, "n", 1));
    // Dead-lettered earlier, so at the front of its dead-letter queue.
    core.restore(&q("jobs.dlq"), restored(6, "o", 0));
    core.end_restore();
    assert_eq!(core.ready_ids(&q("jobs")), [MessageId(5)]);
    assert_eq!(
        core.ready_ids(&q("jobs.dlq")),
        [MessageId(6), MessageId(4)],
        "at the back"
    );
    assert_eq!(core.take_relocated().len(), 1);
    assert_eq!(core.stats().ready, 3);
}

// Version 1.1: nack, touch, consumer leases, delays (rules 11 to 16).

/// Runs the core's timers at `now`: what is due fires.
fn tick(core: &mut Core, now: Instant) {
    core.advance_to(now);
    core.handle_timeout(now);
}

fn delayed_publish(core: &mut Core, queue: &str, text: &str, due: Due) -> Published {
    core.publish(&q(queue), message(text, due)).unwrap()
}

/// Rule 12: a nack without a delay (and no backoff) frees the prefetch slot at once and
/// puts the message at the back of its queue, behind what was waiting.
#[test]
fn rule12_a_nack_returns_the_message_to_the_back_and_frees_its_slot() {
    let mut core = core();
    core.subscribe(C1, q("q"), 1, None);
    let ids = publish_n(&mut core, "q", 3);
    assert_eq!(drain(&mut core, t(0)), [(C1, ids[0], 1)]);
    core.nack(C1, ids[0], NackAction::Retry(None)).unwrap();
    assert_eq!(core.ready_ids(&q("q")), [ids[1], ids[2], ids[0]]);
    assert_eq!(
        drain(&mut core, t(1)),
        [(C1, ids[1], 1)],
        "the slot is free"
    );
    core.ack(C1, ids[1]).unwrap();
    core.ack(C1, ids[2]).unwrap_err();
    assert_eq!(drain(&mut core, t(2)), [(C1, ids[2], 1)]);
    core.ack(C1, ids[2]).unwrap();
    assert_eq!(
        drain(&mut core, t(3)),
        [(C1, ids[0], 2)],
        "attempt counts the nack"
    );
    assert_eq!(core.stats().nacked_total, 1);
    assert_eq!(
        core.nack(C1, MessageId(99), NackAction::Retry(None)),
        Err(AckError::UnknownId(MessageId(99)))
    );
    assert_eq!(core.take_relocated(), [], "nothing to log again");
}

/// Rules 12 and 13: a nack with a delay holds the message (no prefetch slot, no ready
/// place) until its due time, then puts it at the back; the log gets it again with its
/// due time.
#[test]
fn rule13_a_nack_with_a_delay_holds_the_message_until_it_is_due() {
    let mut core = core();
    core.subscribe(C1, q("q"), 1, None);
    let id = publish(&mut core, "q", "later");
    let other = publish(&mut core, "q", "now");
    drain(&mut core, t(0));
    core.advance_to(t(10));
    core.nack(C1, id, NackAction::Retry(Some(Duration::from_millis(500))))
        .unwrap();
    let stats = core.stats();
    assert_eq!((stats.ready, stats.delayed, stats.in_flight), (1, 1, 0));
    assert_eq!(
        core.take_relocated(),
        [Relocated::Delayed {
            id,
            queue: q("q"),
            payload: Payload::from_text("later"),
            deliveries: 1,
            priority: 0,
            published_at_ms: WALL_MS,
            due_ms: WALL_MS + 510,
            attributes: None,
            dead_letter: None,
        }]
    );
    assert_eq!(drain(&mut core, t(11)), [(C1, other, 1)]);
    core.ack(C1, other).unwrap();
    tick(&mut core, t(509));
    assert_eq!(drain(&mut core, t(509)), [], "not before its due time");
    let due = core.poll_timeout().unwrap();
    assert!(due >= t(510) && due <= t(510) + TIMER_TICK, "{due:?}");
    tick(&mut core, t(510) + TIMER_TICK);
    assert_eq!(drain(&mut core, t(511)), [(C1, id, 2)]);
    assert_eq!(core.stats().delayed, 0);
}

/// Rule 12's backoff: a nack without a delay waits `backoff_initial ×
/// backoff_multiplier^(attempt − 1)`, capped by `backoff_max`; a nack's own delay (even
/// 0) takes its place.
#[test]
fn rule12_a_nack_without_a_delay_waits_the_queues_backoff() {
    let mut core = core_with_policies(
        "[queues.\"q\"]\nbackoff_initial = \"100ms\"\nbackoff_multiplier = 3.0\nbackoff_max = \"250ms\"\n",
    );
    core.subscribe(C1, q("q"), 10, None);
    let id = publish(&mut core, "q", "m");
    let mut now = 0;
    for expected_wait in [100, 250, 250] {
        assert_eq!(drain(&mut core, t(now)).len(), 1);
        core.advance_to(t(now));
        core.nack(C1, id, NackAction::Retry(None)).unwrap();
        tick(&mut core, t(now + expected_wait - 1));
        assert_eq!(
            core.stats().delayed,
            1,
            "still waiting at {now} + {expected_wait} - 1"
        );
        now += expected_wait;
        tick(&mut core, t(now));
        assert_eq!(core.stats().ready, 1, "due at {now}");
    }
    assert_eq!(drain(&mut core, t(now + 1)), [(C1, id, 4)]);
    core.nack(C1, id, NackAction::Retry(Some(Duration::ZERO)))
        .unwrap();
    assert_eq!(core.stats().ready, 1, "an explicit 0 skips the backoff");
}

/// Rules 12, 14 and 15: a nack asking for it dead-letters with reason `rejected`
/// (discarded without a dead-letter queue: the consumer asked); a nack at
/// `max_deliveries` dead-letters with reason `max_deliveries` whatever its delay.
#[test]
fn rule12_nacks_dead_letter_when_asked_and_at_the_limit() {
    let mut core = core_with_policies(TWO_DELIVERIES_THEN_DLQ);
    core.subscribe(C1, q("jobs"), 10, None);
    core.subscribe(C2, q("scratch"), 10, None);
    let rejected = publish(&mut core, "jobs", "bad");
    let limited = publish(&mut core, "jobs", "flaky");
    let dropped = publish(&mut core, "scratch", "junk");
    drain(&mut core, t(0));
    core.advance_to(t(5));
    core.nack(C1, rejected, NackAction::DeadLetter).unwrap();
    core.nack(C1, limited, NackAction::Retry(Some(Duration::ZERO)))
        .unwrap();
    drain(&mut core, t(6));
    core.nack(
        C1,
        limited,
        NackAction::Retry(Some(Duration::from_secs(60))),
    )
    .unwrap();
    core.nack(C2, dropped, NackAction::DeadLetter).unwrap();
    assert_eq!(core.ready_ids(&q("jobs.dlq")), [rejected, limited]);
    let records: Vec<_> = core
        .take_relocated()
        .into_iter()
        .map(|relocated| match relocated {
            Relocated::DeadLettered { id, record, .. } => {
                (id, Some(record.reason), record.attempts)
            }
            Relocated::Discarded { id, .. } => (id, None, 0),
            Relocated::Delayed { id, .. } => panic!("{id} delayed"),
        })
        .collect();
    assert_eq!(
        records,
        [
            (rejected, Some(DeadLetterReason::Rejected), 1),
            (limited, Some(DeadLetterReason::MaxDeliveries), 2),
            (dropped, None, 0),
        ]
    );
    let stats = core.stats();
    assert_eq!(
        (
            stats.dead_lettered_total,
            stats.discarded_total,
            stats.delayed
        ),
        (2, 1, 0)
    );
    core.subscribe(C3, q("jobs.dlq"), 10, None);
    let shown = deliveries(&mut core, t(7));
    assert_eq!(
        shown[0]
            .dead_letter
            .as_deref()
            .map(|r| (r.reason, r.attempts, r.at_ms)),
        Some((DeadLetterReason::Rejected, 1, WALL_MS + 5))
    );
}

/// Rule 16: touch restarts the lease from now (never adds to what was left), for the
/// consumer's lease or the touch's own, and never past `max_lease` from the delivery.
#[test]
fn rule16_touch_restarts_the_lease_up_to_max_lease() {
    let mut core = core_with_policies("[queues.\"q\"]\nmax_lease = \"1s\"\n");
    core.subscribe(C1, q("q"), 10, None);
    let id = publish(&mut core, "q", "long job");
    drain(&mut core, t(0));
    core.advance_to(t(150));
    core.touch(C1, id, None).unwrap();
    tick(&mut core, t(349));
    assert_eq!(core.take_expired(), [], "the lease restarted at 150");
    core.advance_to(t(349));
    core.touch(C1, id, Some(Duration::from_millis(50))).unwrap();
    tick(&mut core, t(398));
    assert_eq!(core.take_expired(), [], "leased to 399");
    tick(&mut core, t(399) + TIMER_TICK);
    assert_eq!(
        core.take_expired(),
        [(C1, id)],
        "a shorter touch shortens it"
    );
    assert_eq!(drain(&mut core, t(400)), [(C1, id, 2)]);
    core.advance_to(t(1300));
    core.touch(C1, id, Some(Duration::from_secs(5))).unwrap();
    tick(&mut core, t(1399));
    assert_eq!(
        core.take_expired(),
        [],
        "max_lease counts from the delivery at 400"
    );
    tick(&mut core, t(1400) + TIMER_TICK);
    assert_eq!(core.take_expired(), [(C1, id)]);
    assert_eq!(
        core.touch(C2, id, None),
        Err(AckError::UnknownId(id)),
        "not in flight to it"
    );
}

/// §9: a consumer's own `ack_timeout_ms` is its deliveries' lease; others have their
/// queue's.
#[test]
fn a_consumers_own_lease_times_its_deliveries() {
    let mut core = core();
    core.subscribe(C1, q("q"), 10, Some(Duration::from_millis(40)));
    core.subscribe(C2, q("q"), 10, None);
    let ids = publish_n(&mut core, "q", 2);
    let made = deliveries(&mut core, t(0));
    assert_eq!(made.len(), 2);
    assert!(made.iter().all(|d| d.published_at_ms == WALL_MS));
    tick(&mut core, t(40) + TIMER_TICK);
    assert_eq!(core.take_expired(), [(C1, ids[0])]);
    tick(&mut core, t(0) + ACK_TIMEOUT + TIMER_TICK);
    assert_eq!(core.take_expired(), [(C2, ids[1])]);
}

/// Rule 13: a delayed publish is never delivered before its due time, takes no prefetch
/// slot, and joins the back of its queue when due; messages due together become ready
/// in id order; a due time in the past is now.
#[test]
fn rule13_delayed_publishes_become_ready_at_their_due_time_in_id_order() {
    let mut core = core();
    core.subscribe(C1, q("q"), 10, None);
    core.advance_to(t(100));
    let second = delayed_publish(&mut core, "q", "b", Due::At(WALL_MS + 300));
    let first = delayed_publish(&mut core, "q", "a", Due::After(Duration::from_millis(200)));
    assert_eq!(
        (first.due_ms, second.due_ms),
        (Some(WALL_MS + 300), Some(WALL_MS + 300))
    );
    assert_eq!(first.published_at_ms, WALL_MS + 100);
    let past = delayed_publish(&mut core, "q", "c", Due::At(WALL_MS));
    assert_eq!(past.due_ms, None, "a time in the past is now");
    let now = publish(&mut core, "q", "d");
    assert_eq!(drain(&mut core, t(100)), [(C1, past.id, 1), (C1, now, 1)]);
    core.ack(C1, past.id).unwrap();
    core.ack(C1, now).unwrap();
    tick(&mut core, t(299));
    assert_eq!(drain(&mut core, t(299)), []);
    tick(&mut core, t(300) + TIMER_TICK);
    assert_eq!(
        delivered_ids(&drain(&mut core, t(301))),
        [second.id, first.id],
        "due together: in id order"
    );
}

/// §14: delayed messages neither hold a drain open nor go out early; the report counts
/// them.
#[test]
fn delayed_messages_do_not_hold_a_drain() {
    let mut core = core();
    core.subscribe(C1, q("q"), 10, None);
    delayed_publish(&mut core, "q", "later", Due::After(Duration::from_secs(60)));
    core.begin_drain();
    assert!(core.is_drained());
    assert_eq!(core.drain_report().left_delayed, 1);
    assert_eq!(drain(&mut core, t(1)), []);
}

/// §14: a restored message keeps its due time on the wall clock: one not due yet waits
/// for it, one already due is ready at once.
#[test]
fn restored_delays_keep_their_wall_clock_due_time() {
    let mut core = core();
    core.restore(
        &q("q"),
        Restored {
            due_ms: Some(WALL_MS + 500),
            ..restored(3, "later", 1)
        },
    );
    core.restore(
        &q("q"),
        Restored {
            due_ms: Some(WALL_MS - 500),
            published_at_ms: 0,
            ..restored(4, "overdue", 0)
        },
    );
    core.end_restore();
    assert_eq!(core.ready_ids(&q("q")), [MessageId(4)]);
    core.subscribe(C1, q("q"), 10, None);
    let made = deliveries(&mut core, t(0));
    assert_eq!(
        made[0].published_at_ms, WALL_MS,
        "unknown: the restore's time"
    );
    core.ack(C1, MessageId(4)).unwrap();
    tick(&mut core, t(500) + TIMER_TICK);
    assert_eq!(drain(&mut core, t(501)), [(C1, MessageId(3), 2)]);
}

/// Delayed messages count against the memory limit, and give it back.
#[test]
fn delayed_messages_cost_memory_while_they_wait() {
    let mut core = core();
    core.subscribe(C1, q("q"), 10, None);
    let empty = core.stats().memory_bytes;
    let published = delayed_publish(&mut core, "q", "x", Due::After(Duration::from_millis(5)));
    assert_eq!(
        core.stats().memory_bytes,
        empty + 3 + MESSAGE_OVERHEAD_BYTES + DELAYED_MESSAGE_BYTES,
        "the payload's literal, the message, its timer"
    );
    tick(&mut core, t(5) + TIMER_TICK);
    drain(&mut core, t(6));
    core.ack(C1, published.id).unwrap();
    assert_eq!(
        core.stats().memory_bytes,
        empty + READY_LEVEL_BYTES + 4 * READY_SLOT_BYTES,
        "all but the ready queue's level and first chunk, which it keeps"
    );
}

/// Rule 13 to the sub-millisecond: a delay counted from a time between two milliseconds
/// is counted from the later one, so the message never becomes ready early.
#[test]
fn a_delay_from_between_two_milliseconds_is_never_early() {
    let mut core = core();
    core.subscribe(C1, q("q"), 10, None);
    let half = Duration::from_micros(500);
    core.advance_to(t(0) + half);
    let published = delayed_publish(&mut core, "q", "m", Due::After(Duration::from_millis(10)));
    assert_eq!(published.due_ms, Some(WALL_MS + 11));
    tick(&mut core, t(10) + half);
    assert_eq!(
        drain(&mut core, t(10) + half),
        [],
        "10 ms after its publish at the earliest"
    );
    tick(&mut core, t(11));
    assert_eq!(drain(&mut core, t(11)), [(C1, published.id, 1)]);
}

// Length limits (rule 17).

/// Rule 17, `reject-publish`: ready, delayed and in-flight messages all count, a full
/// queue refuses a publish and changes nothing, and returns are never refused.
#[test]
fn rule17_a_full_queue_rejects_publishes_but_never_returns() {
    let mut core = core_with_policies("[queues.\"jobs\"]\nmax_length = 3\n");
    core.subscribe(C1, q("jobs"), 1, None);
    let in_flight = publish(&mut core, "jobs", "in flight");
    assert_eq!(drain(&mut core, t(0)), [(C1, in_flight, 1)]);
    delayed_publish(
        &mut core,
        "jobs",
        "later",
        Due::After(Duration::from_secs(9)),
    );
    let ready = publish(&mut core, "jobs", "ready");
    let before = core.stats();
    let refused = core.publish(&q("jobs"), message("one too many", Due::Now));
    assert_eq!(
        refused,
        Err(PublishError::QueueAtMaxLength {
            queue: q("jobs"),
            max_length: 3,
            refused: 1,
        })
    );
    assert_eq!(refused.unwrap_err().code(), ErrorCode::QueueFull);
    assert_eq!(core.stats(), before, "nothing changed");
    assert_eq!(core.ready_ids(&q("jobs")), [ready]);
    // Other queues are not limited.
    publish_n(&mut core, "other", 5);
    // A return is never refused, though the queue is full.
    core.nack(C1, in_flight, NackAction::Retry(None)).unwrap();
    assert_eq!(core.ready_ids(&q("jobs")), [ready, in_flight]);
    let delivered = drain(&mut core, t(10));
    assert_eq!(delivered, [(C1, ready, 1)]);
    core.handle_timeout(t(10) + ACK_TIMEOUT);
    assert_eq!(core.ready_ids(&q("jobs")), [ready, in_flight]);
    assert!(core.publish(&q("jobs"), message("x", Due::Now)).is_err());
    // An ack makes room.
    drain(&mut core, t(300));
    core.ack(C1, ready).unwrap();
    let fits = publish(&mut core, "jobs", "fits now");
    assert!(core.publish(&q("jobs"), message("x", Due::Now)).is_err());
    assert_eq!(core.ready_ids(&q("jobs")), [in_flight, fits]);
}

/// Rule 17, `drop-head`: a publish into a full queue dead-letters the oldest ready
/// message of the lowest priority, reason `overflow`; with nothing ready to drop the
/// publish is refused.
#[test]
fn rule17_drop_head_dead_letters_the_oldest_of_the_lowest_priority() {
    let mut core = core_with_policies(
        "[queues.\"feed\"]\nmax_length = 3\noverflow = \"drop-head\"\ndead_letter_queue = \"feed.dlq\"\n",
    );
    let high = publish_at(&mut core, "feed", "high", 5, Due::Now);
    let low_old = publish_at(&mut core, "feed", "low old", 1, Due::Now);
    let low_new = publish_at(&mut core, "feed", "low new", 1, Due::Now);
    core.advance_to(t(40));
    let newest = publish(&mut core, "feed", "newest");
    assert_eq!(core.ready_ids(&q("feed")), [high, low_new, newest]);
    assert_eq!(core.ready_ids(&q("feed.dlq")), [low_old]);
    assert_eq!(
        core.take_relocated(),
        [Relocated::DeadLettered {
            id: low_old,
            from: q("feed"),
            to: q("feed.dlq"),
            payload: Payload::from_text("low old"),
            priority: 1,
            published_at_ms: WALL_MS,
            attributes: None,
            replaced: None,
            record: Arc::new(DeadLetter {
                queue: q("feed"),
                reason: DeadLetterReason::Overflow,
                attempts: 0,
                at_ms: WALL_MS + 40,
            }),
        }]
    );
    // Nothing ready to drop: refused.
    core.subscribe(C1, q("feed"), 10, None);
    assert_eq!(drain(&mut core, t(50)).len(), 3);
    assert!(matches!(
        core.publish(&q("feed"), message("no room", Due::Now)),
        Err(PublishError::QueueAtMaxLength { .. })
    ));
    assert_eq!(core.stats().dead_lettered_total, 1);
}

/// Rule 17 with rule 15: `drop-head` without a dead-letter queue discards; a dead
/// letter that a full dead-letter queue refuses is discarded, never sent back; one
/// that a `drop-head` dead-letter queue takes pushes that queue's head out in turn.
#[test]
fn rule17_dead_letters_meet_the_limits_of_their_dead_letter_queue() {
    let mut core = core_with_policies(
        "[queues.\"a\"]\nmax_length = 1\noverflow = \"drop-head\"\n\
         [queues.\"b\"]\nmax_deliveries = 1\ndead_letter_queue = \"b.dlq\"\n\
         [queues.\"b.dlq\"]\nmax_length = 1\n\
         [queues.\"c\"]\nmax_deliveries = 1\ndead_letter_queue = \"c.dlq\"\n\
         [queues.\"c.dlq\"]\nmax_length = 1\noverflow = \"drop-head\"\n",
    );
    let first = publish(&mut core, "a", "one");
    let before = core.stats().memory_bytes;
    publish(&mut core, "a", "two");
    assert_eq!(core.stats().memory_bytes, before, "one message out, one in");
    assert!(matches!(
        &core.take_relocated()[..],
        [Relocated::Discarded { id, .. }] if *id == first
    ));
    // b.dlq is full under reject-publish: b's dead letter is dropped.
    let waiting = publish(&mut core, "b.dlq", "waiting");
    core.subscribe(C1, q("b"), 10, None);
    let rejected = publish(&mut core, "b", "rejected");
    drain(&mut core, t(0));
    core.nack(C1, rejected, NackAction::Retry(None)).unwrap();
    assert_eq!(core.ready_ids(&q("b")), []);
    assert_eq!(core.ready_ids(&q("b.dlq")), [waiting]);
    assert!(matches!(
        &core.take_relocated()[..],
        [Relocated::Discarded { id, .. }] if *id == rejected
    ));
    // c.dlq is full under drop-head: its head goes (discarded, it has no dead-letter
    // queue), the dead letter comes in.
    let old = publish(&mut core, "c.dlq", "old");
    core.subscribe(C2, q("c"), 10, None);
    let failed = publish(&mut core, "c", "failed");
    drain(&mut core, t(0));
    core.nack(C2, failed, NackAction::DeadLetter).unwrap();
    assert_eq!(core.ready_ids(&q("c.dlq")), [failed]);
    let relocated = core.take_relocated();
    assert!(
        matches!(
            &relocated[..],
            [Relocated::Discarded { id: dropped, .. }, Relocated::DeadLettered { id: moved, .. }]
                if *dropped == old && *moved == failed
        ),
        "{relocated:?}"
    );
    let stats = core.stats();
    assert_eq!((stats.discarded_total, stats.dead_lettered_total), (3, 1));
}

// Attributes (a publish's headers).

fn with_headers(text: &str, entries: &[(&str, &str)]) -> NewMessage {
    NewMessage {
        attributes: Some(Arc::new(Attributes {
            headers: crate::protocol::Headers::new(entries.iter().copied()).unwrap(),
        })),
        ..message(text, Due::Now)
    }
}

/// Headers go out with every delivery of their message, move with it when it is
/// dead-lettered or delayed, cost memory while it is held, and go with its ack.
#[test]
fn headers_travel_with_their_message_and_cost_memory_until_it_goes() {
    let mut core = core_with_policies(
        "[queues.\"jobs\"]\nmax_deliveries = 1\ndead_letter_queue = \"jobs.dlq\"\n",
    );
    let plain = publish(&mut core, "jobs", "plain");
    let before = core.stats().memory_bytes;
    let other = publish(&mut core, "jobs", "plain");
    let plain_cost = core.stats().memory_bytes - before;
    let message = with_headers("plain", &[("trace", "ab12")]);
    let attributes = message.attributes.clone().unwrap();
    let attributes_cost = ATTRIBUTES_OVERHEAD_BYTES + attributes.byte_len() as u64;
    let before = core.stats().memory_bytes;
    let tagged = core.publish(&q("jobs"), message).unwrap().id;
    assert_eq!(
        core.stats().memory_bytes - before,
        plain_cost + attributes_cost,
        "headers counted beyond the message"
    );
    core.subscribe(C1, q("jobs"), 10, None);
    let delivered = deliveries(&mut core, t(0));
    assert_eq!(delivered[1].attributes, None);
    assert_eq!(delivered[2].attributes.as_ref(), Some(&attributes));
    // Dead-lettered, it keeps them, and the move says so for the log.
    core.nack(C1, tagged, NackAction::DeadLetter).unwrap();
    let relocated = core.take_relocated();
    assert!(
        matches!(&relocated[..], [Relocated::DeadLettered { attributes: Some(a), .. }] if *a == attributes),
        "{relocated:?}"
    );
    let live: Vec<_> = core
        .live_messages()
        .filter(|m| m.id == tagged)
        .map(|m| m.attributes.cloned())
        .collect();
    assert_eq!(live, [Some((*attributes).clone())]);
    core.subscribe(C2, q("jobs.dlq"), 10, None);
    let again = deliveries(&mut core, t(1));
    assert_eq!(again[0].attributes.as_ref(), Some(&attributes));
    // The ack lets them go, with the memory they took.
    let before = core.stats().memory_bytes;
    let acked = core.ack(C2, tagged).unwrap();
    assert_eq!(acked.attributes.as_ref(), Some(&attributes));
    assert_eq!(
        before - core.stats().memory_bytes,
        plain_cost + attributes_cost + DEAD_LETTER_BYTES
    );
    assert!(core.attributes.get(tagged).is_none());
    core.ack(C1, plain).unwrap();
    core.ack(C1, other).unwrap();
}

/// Rule 17: a message whose lease runs out is still its queue's while the queues before
/// it take theirs back: a dead letter arriving from one of them at that instant finds the
/// queue full, rather than pushing it past its limit once the message is back.
#[test]
fn rule17_a_message_returning_still_counts_for_a_dead_letter_arriving_with_it() {
    let mut core = core_with_policies(
        "[queues.\"a\"]\nmax_deliveries = 1\ndead_letter_queue = \"b\"\n\
         [queues.\"b\"]\nmax_length = 1\n",
    );
    core.subscribe(C1, q("a"), 1, None);
    core.subscribe(C2, q("b"), 1, None);
    let failing = publish(&mut core, "a", "failing");
    let held = publish(&mut core, "b", "held");
    assert_eq!(drain(&mut core, t(0)).len(), 2);
    // Both leases end together; `a` comes first.
    core.handle_timeout(t(0) + ACK_TIMEOUT);
    assert_eq!(core.ready_ids(&q("b")), [held]);
    assert!(matches!(
        &core.take_relocated()[..],
        [Relocated::Discarded { id, .. }] if *id == failing
    ));
}

// Batches (rule 19).

fn batch(texts: &[&str]) -> Vec<NewMessage> {
    texts.iter().map(|text| message(text, Due::Now)).collect()
}

/// Rule 19: a batch gets consecutive ids in order, or is refused whole: by the memory
/// limit, by the queue's max_length, during a drain.
#[test]
fn rule19_a_batch_goes_in_whole_with_ids_in_order_or_not_at_all() {
    let mut core = core_with_policies("[queues.\"small\"]\nmax_length = 3\n");
    let first = publish(&mut core, "q", "before");
    let published = core
        .publish_batch(&q("q"), batch(&["a", "b", "c"]))
        .unwrap();
    let ids: Vec<u64> = published.iter().map(|p| p.id.0).collect();
    assert_eq!(ids, [first.0 + 1, first.0 + 2, first.0 + 3]);
    assert_eq!(core.ready_ids(&q("q")).len(), 4);
    // Over max_length, even in a new queue: nothing goes in.
    let before = core.stats();
    let refused = core.publish_batch(&q("small"), batch(&["1", "2", "3", "4"]));
    assert!(matches!(
        refused,
        Err(PublishError::QueueAtMaxLength { refused: 4, .. })
    ));
    assert_eq!(core.stats(), before);
    core.publish_batch(&q("small"), batch(&["1", "2"])).unwrap();
    assert!(core.publish_batch(&q("small"), batch(&["3", "4"])).is_err());
    assert_eq!(core.ready_ids(&q("small")).len(), 2);
    // Over the memory limit: nothing goes in.
    let mut tight = core_with_memory(16 * 1024);
    publish(&mut tight, "q", "x");
    let cost = {
        let before = tight.stats().memory_bytes;
        publish(&mut tight, "q", "x");
        tight.stats().memory_bytes - before
    };
    let room = (tight.config.max_memory_bytes - tight.stats().memory_bytes) / cost;
    let too_many: Vec<String> = (0..=room).map(|_| "x".to_owned()).collect();
    let texts: Vec<&str> = too_many.iter().map(String::as_str).collect();
    let before = tight.stats();
    assert!(matches!(
        tight.publish_batch(&q("q"), batch(&texts)),
        Err(PublishError::QueueFull { .. })
    ));
    assert_eq!(tight.stats(), before);
    core.begin_drain();
    assert_eq!(
        core.publish_batch(&q("q"), batch(&["late"])),
        Err(PublishError::ShuttingDown)
    );
}

/// Rules 17 and 19: under drop-head a batch drops as many heads as it needs, or, when
/// fewer are ready, is refused without dropping any.
#[test]
fn rule19_a_batch_under_drop_head_drops_what_it_needs_or_nothing() {
    let mut core = core_with_policies(
        "[queues.\"feed\"]\nmax_length = 3\noverflow = \"drop-head\"\ndiscard_dead_letters = true\n",
    );
    let old = publish_n(&mut core, "feed", 3);
    let published = core
        .publish_batch(&q("feed"), batch(&["n1", "n2"]))
        .unwrap();
    assert_eq!(
        core.ready_ids(&q("feed")),
        [old[2], published[0].id, published[1].id]
    );
    assert_eq!(core.stats().discarded_total, 2);
    core.subscribe(C1, q("feed"), 2, None);
    drain(&mut core, t(0));
    let before = core.stats();
    assert!(matches!(
        core.publish_batch(&q("feed"), batch(&["a", "b", "c"])),
        Err(PublishError::QueueAtMaxLength { refused: 3, .. })
    ));
    assert_eq!(
        core.stats(),
        before,
        "one ready, two needed: nothing dropped"
    );
}
