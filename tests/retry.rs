//! The retry lifecycle of protocol 1.1 (contract §9, §10, §12 rules 11–16, §14), over
//! real sockets: nack (to the back, delayed, after the queue's backoff, dead-lettered),
//! touch, `ids`, consumer leases, delayed publishes, the 1.1 message frame, and what a
//! 1.0 connection sees of none of it.

mod common;

use std::time::Duration;

use common::{RawClient, TestBroker, id_and_attempt, test_config, unix_ms, with_fields, within};
use ferry::broker::BrokerConfig;
use ferry::broker::policy::PolicyFile;
use serde_json::{Value, json};

/// A connection registered with version 1.1 and the register's `extra` fields.
async fn register(broker: &TestBroker, role: &str, queue: &str, extra: Value) -> RawClient {
    RawClient::register_1_1(broker.addr, role, queue, extra).await
}

/// Publishes `payload` with the publish's `extra` fields; returns its id.
async fn publish(producer: &mut RawClient, payload: &str, extra: Value) -> u64 {
    let frame = with_fields(json!({"type": "publish", "payload": payload}), extra);
    producer.send(frame).await;
    producer.expect_ok().await["id"].as_u64().unwrap()
}

/// A broker whose queue policies are this config text.
async fn broker_with_policies(text: &str) -> TestBroker {
    TestBroker::start_with(BrokerConfig {
        queue_policies: PolicyFile::parse_text(text).unwrap(),
        ..test_config()
    })
    .await
}

/// §10: every 1.1 message frame carries `priority`, `published_at` and `ack_timeout_ms`
/// (this consumer's lease) besides the 1.0 fields; a 1.0 consumer of the same queue gets
/// exactly the 1.0 fields.
#[tokio::test]
async fn a_1_1_message_frame_carries_its_details_and_a_1_0_one_does_not() {
    let broker = TestBroker::start().await;
    let mut p = RawClient::producer_1_1(broker.addr, "q").await;
    let mut c = register(&broker, "consumer", "q", json!({"ack_timeout_ms": 60_000})).await;
    let before = unix_ms();
    let id = publish(&mut p, "hello", json!({})).await;
    let after = unix_ms();
    let message = c.expect_message().await;
    let published_at = message["published_at"].as_u64().unwrap();
    assert!((before..=after).contains(&published_at), "{message}");
    assert_eq!(
        message,
        json!({"type": "message", "id": id, "payload": "hello", "attempt": 1,
            "priority": 0, "published_at": published_at, "ack_timeout_ms": 60_000})
    );
    drop(c);
    let mut old = RawClient::consumer(broker.addr, "q", 10).await;
    let message = old.expect_message().await;
    assert_eq!(
        message,
        json!({"type": "message", "id": id, "payload": "hello", "attempt": 2})
    );
}

/// §8: to a 1.0 connection, nack and touch are unknown types and 1.1 fields are ignored
/// (a delay too: the message is ready at once).
#[tokio::test]
async fn a_1_0_connection_knows_nothing_of_1_1() {
    let broker = TestBroker::start().await;
    let mut p = RawClient::producer(broker.addr, "q").await;
    let mut c = RawClient::consumer(broker.addr, "q", 10).await;
    p.send(json!({"type": "publish", "payload": "now", "delay_ms": 3_600_000, "priority": "x"}))
        .await;
    let id = p.expect_ok().await["id"].as_u64().unwrap();
    assert_eq!(c.expect_message().await["id"], id);
    for frame in [
        json!({"type": "nack", "id": id}),
        json!({"type": "touch", "id": id}),
        json!({"type": "ack", "ids": [id]}),
    ] {
        c.send(frame).await;
        c.expect_error("invalid_frame").await;
    }
    c.send(json!({"type": "ack", "id": id, "ids": "ignored"}))
        .await;
    c.sync().await;
}

/// Rule 12: a nack frees the prefetch slot at once and sends the message to the back of
/// its queue; its next delivery counts the attempt.
#[tokio::test]
async fn a_nack_sends_the_message_to_the_back_and_frees_its_slot() {
    let broker = TestBroker::start().await;
    let mut p = RawClient::producer_1_1(broker.addr, "q").await;
    let mut c = RawClient::consumer_1_1(broker.addr, "q", 1).await;
    let first = publish(&mut p, "first", json!({})).await;
    let second = publish(&mut p, "second", json!({})).await;
    assert_eq!(c.expect_message().await["id"], first);
    c.send(json!({"type": "nack", "id": first})).await;
    let next = c.expect_message().await;
    assert_eq!(id_and_attempt(&next), (Some(second), Some(1)));
    c.send(json!({"type": "ack", "id": second})).await;
    let again = c.expect_message().await;
    assert_eq!(id_and_attempt(&again), (Some(first), Some(2)));
}

/// §9: `ids` applies in order; each id not in flight to this consumer gets its own
/// `unknown_id` carrying it, and the others take effect.
#[tokio::test]
async fn ids_apply_in_order_with_one_unknown_id_each() {
    let broker = TestBroker::start().await;
    let mut p = RawClient::producer_1_1(broker.addr, "q").await;
    let mut c = RawClient::consumer_1_1(broker.addr, "q", 10).await;
    let a = publish(&mut p, "a", json!({})).await;
    let b = publish(&mut p, "b", json!({})).await;
    c.expect_message().await;
    c.expect_message().await;
    c.send(json!({"type": "ack", "ids": [a, 999_999, b, 999_998]}))
        .await;
    assert_eq!(c.expect_error("unknown_id").await["id"], 999_999);
    assert_eq!(c.expect_error("unknown_id").await["id"], 999_998);
    c.send(json!({"type": "touch", "ids": [a]})).await;
    assert_eq!(c.expect_error("unknown_id").await["id"], a, "acked already");
    c.sync().await;
    let stats = broker.metrics().core;
    assert_eq!((stats.acked_total, stats.in_flight), (2, 0));
}

/// §9: the shapes of `id`/`ids` and the 1.1 fields that are refused, each with
/// `invalid_frame` and the connection usable after it.
#[tokio::test]
async fn malformed_1_1_frames_are_invalid_and_change_nothing() {
    let broker =
        broker_with_policies("[queues.\"q\"]\nmax_delay = \"1m\"\nmax_lease = \"1h\"\n").await;
    let mut p = RawClient::producer_1_1(broker.addr, "q").await;
    let mut c = RawClient::consumer_1_1(broker.addr, "q", 10).await;
    let id = publish(&mut p, "m", json!({})).await;
    c.expect_message().await;
    let too_many: Vec<u64> = (0..65_536).collect();
    for frame in [
        json!({"type": "ack", "id": id, "ids": [id]}),
        json!({"type": "ack"}),
        json!({"type": "ack", "ids": []}),
        json!({"type": "ack", "ids": too_many}),
        json!({"type": "ack", "ids": [-1]}),
        json!({"type": "nack", "ids": [id], "delay_ms": 10, "dead_letter": true}),
        json!({"type": "nack", "id": id, "delay_ms": 60_001}),
        json!({"type": "nack", "id": id, "dead_letter": "yes"}),
        json!({"type": "touch", "id": id, "ack_timeout_ms": 0}),
        json!({"type": "touch", "id": id, "ack_timeout_ms": 3_600_001}),
    ] {
        c.send(frame.clone()).await;
        let error = c.expect_error("invalid_frame").await;
        assert!(error.get("id").is_none(), "{frame} -> {error}");
    }
    for frame in [
        json!({"type": "publish", "payload": "x", "delay_ms": 10, "not_before": 1}),
        json!({"type": "publish", "payload": "x", "delay_ms": 60_001}),
        json!({"type": "publish", "payload": "x", "delay_ms": -5}),
        json!({"type": "publish", "payload": "x", "not_before": unix_ms() + 3_600_000}),
        json!({"type": "publish", "payload": "x", "priority": 10}),
        json!({"type": "publish", "payload": "x", "headers": {"a": 1}}),
        json!({"type": "publish", "payload": "x", "dedup_key": "k"}),
    ] {
        p.send(frame).await;
        p.expect_error("invalid_frame").await;
    }
    for frame in [
        json!({"type": "nack", "id": 1}),
        json!({"type": "touch", "id": 1}),
    ] {
        p.send(frame).await;
        p.expect_error("wrong_role").await;
    }
    c.send(json!({"type": "ack", "id": id})).await;
    c.sync().await;
    let stats = broker.metrics().core;
    assert_eq!(
        (stats.published_total, stats.acked_total, stats.nacked_total),
        (1, 1, 0)
    );
}

/// §9: a consumer's `ack_timeout_ms` must be within its queue's `max_lease`, or the
/// register is refused, fatally.
#[tokio::test]
async fn a_consumer_lease_past_max_lease_is_not_registered() {
    let broker = broker_with_policies("[queues.\"q\"]\nmax_lease = \"1m\"\n").await;
    for lease in [json!(60_001), json!(0), json!("5s")] {
        let mut client = RawClient::connect(broker.addr).await;
        client
            .send(json!({"type": "register", "version": "1.1", "role": "consumer", "queue": "q", "ack_timeout_ms": lease}))
            .await;
        client.expect_error("not_registered").await;
        client.expect_closed().await;
    }
    register(&broker, "consumer", "q", json!({"ack_timeout_ms": 60_000})).await;
    // A 1.0 register ignores the field, whatever its value (§8).
    for lease in [json!(0), json!("soon"), json!(-5), json!(3_600_000)] {
        let mut client = RawClient::connect(broker.addr).await;
        client
            .send(json!({"type": "register", "role": "consumer", "queue": "q", "ack_timeout_ms": lease}))
            .await;
        assert_eq!(client.recv_body().await, br#"{"type":"ok"}"#);
    }
}

/// Rule 16: touch restarts the lease from now, so a message touched before its lease
/// runs out is not redelivered when the first lease would have ended.
#[tokio::test]
async fn touch_keeps_a_long_job_from_being_redelivered() {
    let broker = TestBroker::start().await;
    let mut p = RawClient::producer_1_1(broker.addr, "q").await;
    let mut c = register(&broker, "consumer", "q", json!({"ack_timeout_ms": 400})).await;
    let id = publish(&mut p, "long job", json!({})).await;
    c.expect_message().await;
    // Touched every 100 ms for 1.2 s, three times its lease: it stays with this
    // consumer, as the metrics say once the touches are handled.
    for _ in 0..12 {
        c.send(json!({"type": "touch", "id": id, "ack_timeout_ms": 400}))
            .await;
        c.sync().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.send(json!({"type": "ack", "id": id})).await;
    c.sync().await;
    let stats = broker.metrics().core;
    assert_eq!(
        (stats.delivered_total, stats.acked_total),
        (1, 1),
        "never redelivered"
    );
}

/// Rules 12 and 13: a nack with a delay, and a publish with `delay_ms` or `not_before`,
/// are not delivered before their due time; a `not_before` in the past is now.
#[tokio::test]
async fn delays_hold_messages_until_they_are_due() {
    let broker = TestBroker::start().await;
    let mut p = RawClient::producer_1_1(broker.addr, "q").await;
    let mut c = RawClient::consumer_1_1(broker.addr, "q", 10).await;
    let published = unix_ms();
    let delayed = publish(&mut p, "delayed", json!({"delay_ms": 300})).await;
    let past = publish(&mut p, "past", json!({"not_before": 1})).await;
    assert_eq!(c.expect_message().await["id"], past, "ready at once");
    c.send(json!({"type": "ack", "id": past})).await;
    let message = c.expect_message().await;
    assert_eq!(message["id"], delayed);
    assert!(
        unix_ms() >= published + 300,
        "delivered before its due time"
    );
    let nacked = unix_ms();
    c.send(json!({"type": "nack", "id": delayed, "delay_ms": 200}))
        .await;
    let again = c.expect_message().await;
    assert_eq!(id_and_attempt(&again), (Some(delayed), Some(2)));
    assert!(
        unix_ms() >= nacked + 200,
        "redelivered before its nack's delay"
    );
    c.send(json!({"type": "ack", "id": delayed})).await;
    let at = unix_ms() + 200;
    publish(&mut p, "at", json!({"not_before": at})).await;
    c.expect_message().await;
    assert!(unix_ms() >= at, "delivered before not_before");
}

/// Rule 12: a nack without a delay waits the queue's backoff, growing with the attempt.
#[tokio::test]
async fn a_nack_without_a_delay_waits_the_queues_backoff() {
    let broker = broker_with_policies(
        "[queues.\"q\"]\nbackoff_initial = \"150ms\"\nbackoff_multiplier = 2.0\n",
    )
    .await;
    let mut p = RawClient::producer_1_1(broker.addr, "q").await;
    let mut c = RawClient::consumer_1_1(broker.addr, "q", 10).await;
    let id = publish(&mut p, "flaky", json!({})).await;
    c.expect_message().await;
    for backoff_ms in [150, 300] {
        let nacked = unix_ms();
        c.send(json!({"type": "nack", "id": id})).await;
        c.expect_message().await;
        let waited = unix_ms() - nacked;
        assert!(
            waited >= backoff_ms,
            "waited {waited} ms, backoff {backoff_ms}"
        );
    }
}

/// Rules 12, 14 and 15: `"dead_letter":true` moves the message to the dead-letter queue
/// with reason `rejected`; a nack at `max_deliveries` with reason `max_deliveries`; the
/// dead letter's first delivery there is attempt 1 and shows its record.
#[tokio::test]
async fn nacks_dead_letter_when_asked_and_at_the_limit() {
    let broker = broker_with_policies(
        "[queues.\"jobs\"]\nmax_deliveries = 2\ndead_letter_queue = \"jobs.dlq\"\n",
    )
    .await;
    let mut p = RawClient::producer_1_1(broker.addr, "jobs").await;
    let mut c = RawClient::consumer_1_1(broker.addr, "jobs", 10).await;
    let mut dlq = RawClient::consumer_1_1(broker.addr, "jobs.dlq", 10).await;
    let rejected = publish(&mut p, "bad", json!({})).await;
    let flaky = publish(&mut p, "flaky", json!({})).await;
    c.expect_message().await;
    c.expect_message().await;
    let before = unix_ms();
    c.send(json!({"type": "nack", "id": rejected, "dead_letter": true}))
        .await;
    let dead = dlq.expect_message().await;
    assert_eq!(id_and_attempt(&dead), (Some(rejected), Some(1)));
    let record = &dead["dead_letter"];
    let at = record["at"].as_u64().unwrap();
    assert!(at >= before && at <= unix_ms(), "{dead}");
    assert_eq!(
        record,
        &json!({"queue": "jobs", "reason": "rejected", "attempts": 1, "at": at})
    );
    c.send(json!({"type": "nack", "id": flaky, "delay_ms": 0}))
        .await;
    assert_eq!(c.expect_message().await["attempt"], 2);
    c.send(json!({"type": "nack", "id": flaky, "delay_ms": 60_000}))
        .await;
    let dead = dlq.expect_message().await;
    assert_eq!(dead["id"], flaky);
    assert_eq!(dead["dead_letter"]["reason"], "max_deliveries");
    assert_eq!(dead["dead_letter"]["attempts"], 2);
    let stats = broker.metrics().core;
    assert_eq!((stats.dead_lettered_total, stats.delayed), (2, 0));
}

/// §14: delayed messages do not hold a drain open, and the drain's report counts them.
#[tokio::test]
async fn delayed_messages_do_not_hold_the_drain() {
    let broker = TestBroker::start().await;
    let mut p = RawClient::producer_1_1(broker.addr, "q").await;
    let _c = RawClient::consumer_1_1(broker.addr, "q", 10).await;
    publish(&mut p, "tomorrow", json!({"delay_ms": 86_400_000})).await;
    let report = within(broker.shutdown()).await;
    assert!(report.completed);
    assert_eq!(report.drain.left_delayed, 1);
}

/// §14: during a drain, touch and nack are taken: a nacked message is delivered again,
/// and the drain ends once it is acked.
#[tokio::test]
async fn nack_and_touch_are_taken_during_the_drain() {
    let broker = TestBroker::start().await;
    let mut p = RawClient::producer_1_1(broker.addr, "q").await;
    let mut c = RawClient::consumer_1_1(broker.addr, "q", 10).await;
    let id = publish(&mut p, "job", json!({})).await;
    c.expect_message().await;
    let mut probe = RawClient::producer_1_1(broker.addr, "probe").await;
    broker.begin_shutdown();
    // The drain has begun once a publish is refused (to a queue nobody consumes, so
    // that those accepted before do not hold the drain).
    loop {
        probe
            .send(json!({"type": "publish", "payload": "probe"}))
            .await;
        if probe.recv().await["type"] == "error" {
            break;
        }
    }
    c.send(json!({"type": "touch", "id": id})).await;
    c.send(json!({"type": "nack", "id": id})).await;
    let again = c.expect_message().await;
    assert_eq!(id_and_attempt(&again), (Some(id), Some(2)));
    c.send(json!({"type": "ack", "id": id})).await;
    let report = within(broker.shutdown()).await;
    assert!(
        report.completed,
        "the drain ends once the nacked message is acked"
    );
    assert_eq!(report.drain.delivered, 1, "the nacked message, again");
}

/// The client library's 1.1 calls: nack (to the back), nack_after, dead_letter, touch and
/// a delayed publish, with the delivery details they show.
#[tokio::test]
async fn the_client_library_nacks_touches_and_delays() {
    use ferry::{Consumer, ConsumerOptions, Producer, PublishOptions};
    let broker = broker_with_policies("[queues.\"lib\"]\ndead_letter_queue = \"lib.dlq\"\n").await;
    let mut producer = within(Producer::connect(broker.addr, "lib")).await.unwrap();
    let options = ConsumerOptions {
        queue: "lib".into(),
        ack_timeout: Some(Duration::from_secs(30)),
        ..ConsumerOptions::default()
    };
    let mut consumer = within(Consumer::connect_with(broker.addr, &options))
        .await
        .unwrap();
    let sent = unix_ms();
    let delayed = PublishOptions::delayed(Duration::from_millis(200));
    let id = within(producer.publish_with("job", &delayed))
        .await
        .unwrap();
    let message = within(consumer.recv()).await.unwrap();
    assert!(unix_ms() >= sent + 200, "delivered early");
    let details = message.details.clone().expect("a 1.1 delivery");
    assert_eq!((message.id, details.ack_timeout_ms), (id, 30_000));
    within(consumer.touch(id, Some(Duration::from_secs(60))))
        .await
        .unwrap();
    within(consumer.nack(id)).await.unwrap();
    let again = within(consumer.recv()).await.unwrap();
    assert_eq!((again.id, again.attempt), (id, 2));
    let nacked = unix_ms();
    within(consumer.nack_after(id, Duration::from_millis(150)))
        .await
        .unwrap();
    let third = within(consumer.recv()).await.unwrap();
    assert!(unix_ms() >= nacked + 150);
    assert_eq!(third.attempt, 3);
    within(consumer.dead_letter(id)).await.unwrap();
    let mut dead = within(Consumer::connect(broker.addr, "lib.dlq"))
        .await
        .unwrap();
    let record = within(dead.recv())
        .await
        .unwrap()
        .details
        .unwrap()
        .dead_letter
        .unwrap();
    assert_eq!(
        (
            record.queue.as_str(),
            record.reason.as_str(),
            record.attempts
        ),
        ("lib", "rejected", 3)
    );
}
