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

fn core() -> Core {
    core_with_memory(u64::MAX)
}

fn core_with_memory(max_memory_bytes: u64) -> Core {
    Core::new(CoreConfig {
        policies: Policies::uniform(QueuePolicy::new(ACK_TIMEOUT)),
        max_memory_bytes,
        wall_clock: WallClock::now(),
    })
}

fn q(name: &str) -> QueueName {
    QueueName::new(name).unwrap()
}

const C1: ConsumerId = ConsumerId(1);
const C2: ConsumerId = ConsumerId(2);
const C3: ConsumerId = ConsumerId(3);

fn publish(core: &mut Core, queue: &str, text: &str) -> MessageId {
    core.publish(&q(queue), Payload::from_text(text)).unwrap()
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
    core.subscribe(C1, q("q"), 100);
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
    core.subscribe(C1, q("q"), 100);
    core.subscribe(C2, q("q"), 100);
    core.subscribe(C3, q("q"), 100);
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
    core.subscribe(C1, q("q"), 1);
    core.subscribe(C2, q("q"), 3);
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
    core.subscribe(C1, q("q"), 10);
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
        wall_clock: WallClock::now(),
    });
    core.subscribe(C1, q("fast-lane"), 10);
    core.subscribe(C2, q("slow"), 10);
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
    core.subscribe(C1, q("q"), 10);
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
            memory_bytes: QUEUE_OVERHEAD_BYTES + 1 + 4 * READY_SLOT_BYTES,
            ..CoreStats::default()
        }
    );
}

#[test]
fn rule4_acks_from_another_consumer_or_for_unknown_ids_change_nothing() {
    let mut core = core();
    core.subscribe(C1, q("q"), 10);
    core.subscribe(C2, q("q"), 10);
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
    core.subscribe(C1, q("q"), 10);
    let id = publish(&mut core, "q", "x");
    drain(&mut core, t(0));
    core.handle_timeout(t(200));
    assert_eq!(core.ack(C1, id), Err(AckError::UnknownId(id)));
    assert_eq!(core.ready_ids(&q("q")), [id]);
}

#[test]
fn rule5_an_expired_message_returns_to_the_front_with_the_next_attempt() {
    let mut core = core();
    core.subscribe(C1, q("q"), 1);
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
    core.subscribe(C1, q("q"), 1);
    core.subscribe(C2, q("q"), 1);
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
    core.subscribe(C1, q("q"), 10);
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
    core.subscribe(C1, q("q"), 3);
    let ids = publish_n(&mut core, "q", 5);
    drain(&mut core, t(0));
    assert_eq!(core.disconnect(C1), 3);
    assert_eq!(core.ready_ids(&q("q")), ids);
    assert_eq!(
        core.poll_timeout(),
        None,
        "their deadlines died with the consumer"
    );
    core.subscribe(C2, q("q"), 10);
    let again = drain(&mut core, t(1));
    assert_eq!(delivered_ids(&again), ids);
    let attempts: Vec<_> = again.iter().map(|d| d.2).collect();
    assert_eq!(attempts, [2, 2, 2, 1, 1]);
}

#[test]
fn rule6_disconnect_keeps_round_robin_fair_for_the_rest() {
    let mut core = core();
    for c in [C1, C2, C3] {
        core.subscribe(c, q("q"), 100);
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
    core.subscribe(C1, q("q"), 100);
    core.subscribe(C2, q("q"), 100);
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
    core.subscribe(C1, q("q"), 2);
    let ids = publish_n(&mut core, "q", 4);
    drain(&mut core, t(0));
    core.disconnect(C1);
    let order = core.ready_ids(&q("q"));
    assert_eq!(order, ids);
}

#[test]
fn rule8_messages_wait_while_no_consumer_is_connected() {
    let mut core = core();
    let ids = publish_n(&mut core, "q", 3);
    assert!(drain(&mut core, t(0)).is_empty());
    assert_eq!(core.poll_timeout(), None);
    core.subscribe(C1, q("other"), 10);
    assert!(drain(&mut core, t(0)).is_empty(), "queues are separate");
    core.subscribe(C2, q("q"), 10);
    assert_eq!(delivered_ids(&drain(&mut core, t(0))), ids);
}

#[test]
fn the_memory_limit_counts_ready_and_in_flight_messages_until_acked() {
    let one = Payload::from_text("0123456789").len() as u64 + MESSAGE_OVERHEAD_BYTES;
    // The queue, and the first chunk of its ready queue: room for four messages.
    let queue = QUEUE_OVERHEAD_BYTES + 1 + 4 * READY_SLOT_BYTES;
    let mut core = core_with_memory(queue + 2 * one);
    let a = publish(&mut core, "q", "0123456789");
    publish(&mut core, "q", "abcdefghij");
    let refused = core.publish(&q("q"), Payload::from_text("ABCDEFGHIJ"));
    assert_eq!(
        refused,
        Err(PublishError::QueueFull {
            used_bytes: queue + 2 * one,
            limit_bytes: queue + 2 * one
        })
    );
    assert_eq!(refused.unwrap_err().code(), ErrorCode::QueueFull);
    core.subscribe(C1, q("q"), 10);
    drain(&mut core, t(0));
    assert!(
        core.publish(&q("q"), Payload::from_text("ABCDEFGHIJ"))
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
    core.subscribe(C1, q("q"), 1);
    let ids = publish_n(&mut core, "q", 2);
    core.begin_drain();
    assert!(core.is_draining());
    assert_eq!(
        core.publish(&q("q"), Payload::from_text("late")),
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
            left_in_flight: 0
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
            left_in_flight: 0
        }
    );
    core.subscribe(C1, q("q"), 2);
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
    core.subscribe(C1, q("q"), 1);
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
    core.subscribe(C2, q("q"), 1);
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
    core.subscribe(C1, q("q"), 10);
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
    core.subscribe(C1, q("q"), 10);
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
    core.subscribe(C1, q("q"), 10);
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
    core.subscribe(C2, q("q"), 10);
    assert_eq!(drain(&mut core, t(0)).len(), 4);
}

#[test]
fn restored_messages_keep_their_deliveries_and_ids_go_on_after_them() {
    let mut core = core();
    core.restore(&q("q"), MessageId(7), Payload::from_text("seven"), 2, None);
    core.restore(&q("q"), MessageId(9), Payload::from_text("nine"), 0, None);
    core.skip_ids_below(12);
    core.subscribe(C1, q("q"), 10);
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
    core.subscribe(C1, q("q"), 10);
    core.subscribe(C2, q("q"), 10);
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
    core.subscribe(C1, q("a-queue"), 1);
    let empty_queue = QUEUE_OVERHEAD_BYTES + "a-queue".len() as u64;
    assert_eq!(core.stats().memory_bytes, empty_queue);
    let id = publish(&mut core, "a-queue", "x");
    let message = Payload::from_text("x").len() as u64 + MESSAGE_OVERHEAD_BYTES;
    assert_eq!(
        core.stats().memory_bytes,
        empty_queue + message + 4 * READY_SLOT_BYTES
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
        wall_clock: WallClock {
            at: t(0),
            unix_ms: 1_767_225_600_000,
        },
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
    core.subscribe(C1, q("jobs"), 10);
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
        at_ms: 1_767_225_600_000 + 500,
    });
    assert_eq!(
        core.take_relocated(),
        [Relocated::DeadLettered {
            id,
            from: q("jobs"),
            to: q("jobs.dlq"),
            payload: Payload::from_text("job"),
            replaced: None,
            record: record.clone(),
        }]
    );
    core.subscribe(C2, q("jobs.dlq"), 10);
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
    core.subscribe(C1, q("jobs"), 10);
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
    assert_eq!(
        record.at_ms,
        1_767_225_600_000 + 900,
        "stamped when it happened"
    );
}

/// Without a dead-letter queue, a policy that opted in drops the message, and counts it.
#[test]
fn rule15_without_a_dead_letter_queue_an_opted_in_policy_discards() {
    let mut core =
        core_with_policies("[queues.\"lossy\"]\nmax_deliveries = 1\ndiscard_dead_letters = true\n");
    core.subscribe(C1, q("lossy"), 10);
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
    core.subscribe(C1, q("a"), 10);
    core.subscribe(C2, q("b"), 10);
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
    core.restore(&q("jobs"), MessageId(4), Payload::from_text("m"), 2, None);
    core.restore(&q("jobs"), MessageId(5), Payload::from_text("n"), 1, None);
    // Dead-lettered earlier, so at the front of its dead-letter queue.
    core.restore(
        &q("jobs.dlq"),
        MessageId(6),
        Payload::from_text("o"),
        0,
        None,
    );
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
