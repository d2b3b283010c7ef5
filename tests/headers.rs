//! Headers (contract §9, §10, rule 15, §14) through the real binary: a 1.1 publish's
//! headers reach every 1.1 delivery of the message, through redelivery, dead-lettering
//! and `kill -9`; headers out of the contract are `invalid_frame` and enqueue nothing; a
//! 1.0 connection neither sends nor sees them.

mod common;

use common::{BrokerProcess, RawClient, TestBroker, recv};
use ferry::protocol::Headers;
use ferry::{ConsumerOptions, PublishOptions};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

async fn publish(producer: &mut RawClient, fields: Value) -> Value {
    producer
        .send(common::with_fields(json!({"type": "publish"}), fields))
        .await;
    producer.recv().await
}

#[tokio::test]
async fn headers_reach_1_1_consumers_only_and_bad_ones_enqueue_nothing() {
    let broker = BrokerProcess::start(&[]);
    let mut producer = RawClient::producer_1_1(broker.addr, "jobs").await;
    let headers = json!({"trace": "ab12", "tenant.id": "a \"quoted\" ✓\n"});
    let ok = publish(&mut producer, json!({"payload": "job", "headers": headers})).await;
    let id = ok["id"].as_u64().unwrap();
    for (bad, saying) in [
        (json!("text"), "JSON object"),
        (json!({"trace": 1}), "value of `trace` is not a string"),
        (json!({"ferry.trace": "x"}), "starts with `ferry.`"),
        (json!({"a b": "x"}), "use [A-Za-z0-9._-]"),
        (json!({"k": "v".repeat(4097)}), "at most 4096"),
        (json!({"k".repeat(129): "v"}), "use 1 to 128"),
        (
            Value::Object((0..33).map(|i| (format!("k{i}"), json!("v"))).collect()),
            "more than 32 entries",
        ),
    ] {
        let refused = publish(&mut producer, json!({"payload": "bad", "headers": bad})).await;
        assert_eq!(refused["code"], "invalid_frame", "{refused}");
        let message = refused["message"].as_str().unwrap();
        assert!(
            message.contains("`headers`") && message.contains(saying),
            "{message}"
        );
    }
    // null and {} are no headers.
    let plain = publish(&mut producer, json!({"payload": "plain", "headers": null})).await;
    let empty = publish(&mut producer, json!({"payload": "empty", "headers": {}})).await;
    assert_eq!(
        (plain["id"].as_u64(), empty["id"].as_u64()),
        (Some(id + 1), Some(id + 2)),
        "the refused ones enqueued nothing"
    );
    // A 1.0 producer's headers are one of the 1.1 fields it does not have: ignored.
    let mut old_producer = RawClient::producer(broker.addr, "jobs").await;
    old_producer
        .send(json!({"type": "publish", "payload": "old", "headers": {"a": "b"}}))
        .await;
    old_producer.expect_ok().await;

    let mut consumer = RawClient::consumer_1_1(broker.addr, "jobs", 10).await;
    let first = consumer.expect_message().await;
    assert_eq!(
        (first["id"].as_u64(), &first["headers"]),
        (Some(id), &headers)
    );
    for _ in 0..3 {
        let other = consumer.expect_message().await;
        assert!(other.get("headers").is_none(), "{other}");
    }
    // Redelivered, to a 1.0 consumer this time: no headers on its frame.
    drop(consumer);
    let mut old_consumer = RawClient::consumer(broker.addr, "jobs", 1).await;
    let again = old_consumer.expect_message().await;
    assert_eq!(
        again,
        json!({"type": "message", "id": id, "payload": "job", "attempt": 2})
    );
}

/// With --data-dir, headers survive dead-lettering and `kill -9`.
#[tokio::test]
async fn headers_survive_dead_lettering_and_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ferry.toml");
    std::fs::write(
        &config,
        "[queues.\"jobs\"]\nmax_deliveries = 5\ndead_letter_queue = \"jobs.dlq\"\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let args = [
        "--config",
        config.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ];
    let mut broker = BrokerProcess::start(&args);
    let mut producer = RawClient::producer_1_1(broker.addr, "jobs").await;
    let headers = json!({"trace": "ab12", "attempt-of": "x"});
    let id = publish(&mut producer, json!({"payload": "job", "headers": headers})).await["id"]
        .as_u64()
        .unwrap();
    let mut worker = RawClient::consumer_1_1(broker.addr, "jobs", 1).await;
    assert_eq!(worker.expect_message().await["id"].as_u64(), Some(id));
    worker
        .send(json!({"type": "nack", "id": id, "dead_letter": true}))
        .await;
    let mut dead_letters = RawClient::consumer_1_1(broker.addr, "jobs.dlq", 1).await;
    assert_eq!(dead_letters.expect_message().await["headers"], headers);
    // Confirmed after the move was logged (batches become durable in order), so the
    // move is on stable storage too.
    let kept = publish(
        &mut producer,
        json!({"payload": "kept", "headers": {"k": "v"}}),
    )
    .await;
    broker.signal(Signal::SIGKILL);
    broker.wait_exit(common::WAIT).await;

    let broker = BrokerProcess::start(&args);
    let mut dead_letters = RawClient::consumer_1_1(broker.addr, "jobs.dlq", 1).await;
    let dead = dead_letters.expect_message().await;
    assert_eq!(
        (dead["id"].as_u64(), &dead["headers"]),
        (Some(id), &headers)
    );
    assert_eq!(dead["dead_letter"]["reason"], "rejected");
    let mut worker = RawClient::consumer_1_1(broker.addr, "jobs", 1).await;
    let again = worker.expect_message().await;
    assert_eq!(
        (again["id"].as_u64(), &again["headers"]),
        (kept["id"].as_u64(), &json!({"k": "v"}))
    );
}

/// The client library: `PublishOptions::headers` out, `MessageDetails::headers` in.
#[tokio::test]
async fn the_client_library_sends_and_receives_headers() {
    let broker = TestBroker::start().await;
    let mut producer = broker.producer("jobs").await;
    let headers = Headers::new([("trace", "ab12"), ("tenant", "a")]).unwrap();
    let options = PublishOptions {
        headers: Some(headers),
        ..PublishOptions::default()
    };
    let id = producer.publish_with("job", &options).await.unwrap();
    let mut consumer = ferry::Consumer::connect_with(
        broker.addr,
        &ConsumerOptions {
            queue: "jobs".into(),
            ..ConsumerOptions::default()
        },
    )
    .await
    .unwrap();
    let message = recv(&mut consumer).await;
    assert_eq!(message.id, id);
    let got: Vec<(String, String)> = message.details.unwrap().headers.into_iter().collect();
    assert_eq!(
        got,
        [
            ("tenant".to_owned(), "a".to_owned()),
            ("trace".to_owned(), "ab12".to_owned())
        ]
    );
}
