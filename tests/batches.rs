//! publish_batch (contract §9, §10, rule 19) through the real binary: one frame, one
//! reply with the ids in order; all or nothing against bad entries, `max_length` and a
//! drain; 1.1 only, producers only; durable before its `ok`.

mod common;

use common::{BrokerProcess, RawClient, TestBroker, recv};
use ferry::PublishOptions;
use nix::sys::signal::Signal;
use serde_json::{Value, json};

async fn send_batch(producer: &mut RawClient, messages: Value) -> Value {
    producer
        .send(json!({"type": "publish_batch", "messages": messages}))
        .await;
    producer.recv().await
}

fn ids_of(reply: &Value) -> Vec<u64> {
    assert_eq!(reply["type"], "ok", "{reply}");
    assert!(reply.get("duplicates").is_none(), "{reply}");
    reply["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_u64().unwrap())
        .collect()
}

/// The id the next accepted publish gets: one more than the last, so a refusal in
/// between is seen to have enqueued nothing.
async fn next_id(producer: &mut RawClient) -> u64 {
    producer
        .send(json!({"type": "publish", "payload": "probe"}))
        .await;
    producer.expect_ok().await["id"].as_u64().unwrap()
}

#[tokio::test]
async fn a_batch_is_one_frame_with_one_reply_and_its_ids_in_order() {
    let broker = BrokerProcess::start(&[]);
    let mut producer = RawClient::producer_1_1(broker.addr, "jobs").await;
    let reply = send_batch(
        &mut producer,
        json!([
            {"payload": "a"},
            {"payload": "b", "priority": 9, "headers": {"k": "v"}},
            {"payload": "c", "delay_ms": 0, "type": "ignored"},
        ]),
    )
    .await;
    let ids = ids_of(&reply);
    assert_eq!(ids, [ids[0], ids[0] + 1, ids[0] + 2]);
    let mut consumer = RawClient::consumer_1_1(broker.addr, "jobs", 10).await;
    let got: Vec<(u64, String, u64)> = [
        consumer.expect_message().await,
        consumer.expect_message().await,
        consumer.expect_message().await,
    ]
    .iter()
    .map(|m| {
        (
            m["id"].as_u64().unwrap(),
            m["payload"].as_str().unwrap().to_owned(),
            m["priority"].as_u64().unwrap(),
        )
    })
    .collect();
    assert_eq!(
        got,
        [
            (ids[1], "b".to_owned(), 9),
            (ids[0], "a".to_owned(), 0),
            (ids[2], "c".to_owned(), 0)
        ]
    );
}

#[tokio::test]
async fn a_bad_batch_is_invalid_whole_and_enqueues_nothing() {
    let broker = BrokerProcess::start(&[]);
    let mut producer = RawClient::producer_1_1(broker.addr, "jobs").await;
    let before = next_id(&mut producer).await;
    let too_many: Vec<Value> = (0..1001).map(|_| json!({"payload": "x"})).collect();
    for (messages, saying) in [
        (
            json!([{"payload": "ok"}, {"payload": "x", "priority": 10}]),
            "entry 1 of `messages`",
        ),
        (
            json!([{"payload": "ok"}, {"payload": 5}]),
            "entry 1 of `messages`",
        ),
        (json!([{"payload": "ok"}, "text"]), "entry 1 of `messages`"),
        (
            json!([{"payload": "ok"}, {"payload": "x", "headers": {"ferry.k": "v"}}]),
            "ferry.",
        ),
        (
            json!([{"payload": "x", "delay_ms": 1, "not_before": 1}]),
            "entry 0",
        ),
        (json!([]), "is empty"),
        (json!(too_many), "`messages`"),
        (json!({"payload": "x"}), "must be an array"),
    ] {
        let refused = send_batch(&mut producer, messages).await;
        assert_eq!(refused["code"], "invalid_frame", "{refused}");
        let message = refused["message"].as_str().unwrap();
        assert!(message.contains(saying), "{saying}: {message}");
    }
    producer.send(json!({"type": "publish_batch"})).await;
    producer.expect_error("invalid_frame").await;
    assert_eq!(next_id(&mut producer).await, before + 1, "nothing enqueued");
    // 1.1 only, producers only.
    let mut old = RawClient::producer(broker.addr, "jobs").await;
    let refused = send_batch(&mut old, json!([{"payload": "x"}])).await;
    assert_eq!(refused["code"], "invalid_frame");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("unknown frame type `publish_batch` on a version 1.0 connection"),
        "{refused}"
    );
    let mut consumer = RawClient::consumer_1_1(broker.addr, "empty", 1).await;
    consumer
        .send(json!({"type": "publish_batch", "messages": [{"payload": "x"}]}))
        .await;
    consumer.expect_error("wrong_role").await;
}

/// Rule 19 with rule 17: a batch that does not fit `max_length` is `queue_full` and
/// enqueues nothing, though some of it would have fit.
#[tokio::test]
async fn a_batch_past_max_length_is_queue_full_and_enqueues_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ferry.toml");
    std::fs::write(&config, "[queues.\"jobs\"]\nmax_length = 3\n").unwrap();
    let broker = BrokerProcess::start(&["--config", config.to_str().unwrap()]);
    let mut producer = RawClient::producer_1_1(broker.addr, "jobs").await;
    let first = next_id(&mut producer).await;
    let refused = send_batch(
        &mut producer,
        json!([{"payload": "a"}, {"payload": "b"}, {"payload": "c"}]),
    )
    .await;
    assert_eq!(refused["code"], "queue_full", "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("has no room for 3"),
        "{refused}"
    );
    let fits =
        ids_of(&send_batch(&mut producer, json!([{"payload": "a"}, {"payload": "b"}])).await);
    assert_eq!(
        fits,
        [first + 1, first + 2],
        "the refused batch took no ids"
    );
}

/// With --data-dir the one `ok` comes once every message is durable: all survive
/// `kill -9` right after it. During a drain a batch gets `shutting_down`.
#[tokio::test]
async fn a_confirmed_batch_survives_kill_9_and_a_drain_refuses_batches() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = ["--data-dir", data.to_str().unwrap()];
    let mut broker = BrokerProcess::start(&args);
    let mut producer = RawClient::producer_1_1(broker.addr, "jobs").await;
    let entries: Vec<Value> = (0..100)
        .map(|i| json!({"payload": format!("m{i}")}))
        .collect();
    let ids = ids_of(&send_batch(&mut producer, json!(entries)).await);
    broker.signal(Signal::SIGKILL);
    broker.wait_exit(common::WAIT).await;

    let broker = BrokerProcess::start(&args);
    let mut consumer = RawClient::consumer_1_1(broker.addr, "jobs", 1).await;
    let mut got = Vec::new();
    for _ in 0..100 {
        let message = consumer.expect_message().await;
        let id = message["id"].as_u64().unwrap();
        got.push(id);
        if got.len() < 100 {
            consumer.send(json!({"type": "ack", "id": id})).await;
        }
    }
    assert_eq!(got, ids);
    // The last one stays in flight: the drain waits for it, and refuses batches.
    let mut producer = RawClient::producer_1_1(broker.addr, "jobs").await;
    broker.signal(Signal::SIGTERM);
    broker.wait_for_log("draining").await;
    // The core may not have begun its drain yet when the log says so: batches before it
    // are accepted, and the first after it is refused.
    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        let reply = send_batch(&mut producer, json!([{"payload": "late"}])).await;
        if reply["code"] == "shutting_down" {
            break;
        }
        assert_eq!(reply["type"], "ok", "{reply}");
        assert!(std::time::Instant::now() < deadline, "never refused");
    }
}

/// The client library: `Producer::publish_batch`.
#[tokio::test]
async fn the_client_library_publishes_batches() {
    let broker = TestBroker::start().await;
    let mut producer = broker.producer("jobs").await;
    let urgent = PublishOptions {
        priority: 5,
        ..PublishOptions::default()
    };
    let plain = PublishOptions::default();
    let ids = producer
        .publish_batch(&[("one", &plain), ("two", &urgent)])
        .await
        .unwrap();
    assert_eq!(ids.len(), 2);
    assert_eq!(ids[1].0, ids[0].0 + 1);
    let mut consumer = broker.consumer("jobs", 10).await;
    assert_eq!(recv(&mut consumer).await.payload, "two");
    assert_eq!(recv(&mut consumer).await.payload, "one");
}
