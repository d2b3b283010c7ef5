//! Length limits (contract §11 `max_length` and `overflow`, rule 17) through the real
//! binary: ready, delayed and in-flight messages count; `reject-publish` refuses with
//! `queue_full` and keeps the connection; `drop-head` dead-letters the oldest ready
//! message of the lowest priority with reason `overflow`, durably; returns are never
//! refused.

mod common;

use common::{BrokerProcess, RawClient, id_and_attempt, unix_ms};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

fn write_config(dir: &tempfile::TempDir, text: &str) -> String {
    let path = dir.path().join("ferry.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Publishes `frame` (a publish's fields) and returns the broker's reply.
async fn publish(producer: &mut RawClient, fields: Value) -> Value {
    let frame = common::with_fields(json!({"type": "publish"}), fields);
    producer.send(frame).await;
    producer.recv().await
}

fn accepted_id(reply: &Value) -> u64 {
    assert_eq!(reply["type"], "ok", "{reply}");
    reply["id"].as_u64().unwrap()
}

#[tokio::test]
async fn a_full_queue_refuses_publishes_counting_delayed_and_in_flight_but_takes_returns() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir, "[queues.\"jobs\"]\nmax_length = 3\n");
    let broker = BrokerProcess::start(&["--config", &config]);
    let mut producer = RawClient::producer_1_1(broker.addr, "jobs").await;
    let mut worker = RawClient::consumer_1_1(broker.addr, "jobs", 1).await;
    let first = accepted_id(&publish(&mut producer, json!({"payload": "first"})).await);
    assert_eq!(
        id_and_attempt(&worker.expect_message().await),
        (Some(first), Some(1))
    );
    accepted_id(
        &publish(
            &mut producer,
            json!({"payload": "later", "delay_ms": 600000}),
        )
        .await,
    );
    let ready = accepted_id(&publish(&mut producer, json!({"payload": "ready"})).await);

    let refused = publish(&mut producer, json!({"payload": "one too many"})).await;
    assert_eq!(refused["code"], "queue_full", "{refused}");
    let message = refused["message"].as_str().unwrap();
    assert!(
        message.contains("queue `jobs` holds its max_length of 3"),
        "{message}"
    );
    // A 1.0 producer is held to the same limit: policies apply whatever the version.
    let mut old = RawClient::producer(broker.addr, "jobs").await;
    old.send(json!({"type": "publish", "payload": "old"})).await;
    old.expect_error("queue_full").await;
    // Other queues are not limited.
    let mut other = RawClient::producer(broker.addr, "other").await;
    for _ in 0..5 {
        other.send(json!({"type": "publish", "payload": "x"})).await;
        other.expect_ok().await;
    }

    // A nack puts the in-flight message back though the queue is full.
    worker.send(json!({"type": "nack", "id": first})).await;
    assert_eq!(
        id_and_attempt(&worker.expect_message().await),
        (Some(ready), Some(1))
    );
    worker.send(json!({"type": "ack", "id": ready})).await;
    assert_eq!(
        id_and_attempt(&worker.expect_message().await),
        (Some(first), Some(2))
    );
    // The ack made room for one, and the connection that was refused still works.
    let fits = publish(&mut producer, json!({"payload": "fits"})).await;
    assert!(accepted_id(&fits) > ready);
    let refused = publish(&mut producer, json!({"payload": "full again"})).await;
    assert_eq!(refused["code"], "queue_full", "{refused}");
}

const FEED: &str = "[queues.\"feed\"]\nmax_length = 2\noverflow = \"drop-head\"\ndead_letter_queue = \"feed.dlq\"\n";

/// Fills `feed` (max 2, drop-head) with an urgent message and then an old one of a lower
/// priority, then publishes a third: the old one, the oldest of the lowest priority
/// (not the oldest of all), is dead-lettered. Returns its id.
async fn overflow_one(broker: &BrokerProcess) -> u64 {
    let mut producer = RawClient::producer_1_1(broker.addr, "feed").await;
    accepted_id(&publish(&mut producer, json!({"payload": "urgent", "priority": 7})).await);
    let old = accepted_id(&publish(&mut producer, json!({"payload": "old"})).await);
    accepted_id(&publish(&mut producer, json!({"payload": "new"})).await);
    old
}

/// Checks that the next message on `feed.dlq` is `old`, dropped by overflow from `feed`.
async fn expect_overflow_dead_letter(broker: &BrokerProcess, old: u64, before_ms: u64) {
    let mut dead_letters = RawClient::consumer_1_1(broker.addr, "feed.dlq", 10).await;
    let dead = dead_letters.expect_message().await;
    assert_eq!(
        (
            dead["id"].as_u64(),
            dead["payload"].as_str(),
            dead["attempt"].as_u64()
        ),
        (Some(old), Some("old"), Some(1))
    );
    let record = &dead["dead_letter"];
    assert_eq!(
        (&record["queue"], &record["reason"], &record["attempts"]),
        (&json!("feed"), &json!("overflow"), &json!(0)),
        "{dead}"
    );
    assert!(record["at"].as_u64().unwrap() >= before_ms, "{dead}");
}

#[tokio::test]
async fn drop_head_dead_letters_the_oldest_message_of_the_lowest_priority() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir, FEED);
    let broker = BrokerProcess::start(&["--config", &config]);
    let before_ms = unix_ms();
    let old = overflow_one(&broker).await;
    expect_overflow_dead_letter(&broker, old, before_ms).await;
    let mut reader = RawClient::consumer_1_1(broker.addr, "feed", 10).await;
    let payloads = [reader.expect_message().await, reader.expect_message().await]
        .map(|m| m["payload"].as_str().unwrap().to_owned());
    assert_eq!(payloads, ["urgent", "new"]);
    // Nothing ready is left to drop: a publish is refused.
    let mut producer = RawClient::producer_1_1(broker.addr, "feed").await;
    let refused = publish(&mut producer, json!({"payload": "no room"})).await;
    assert_eq!(refused["code"], "queue_full", "{refused}");
}

/// With --data-dir, the overflow dead letter and its record survive `kill -9`, and the
/// dropped message never comes back to its queue.
#[tokio::test]
async fn an_overflow_dead_letter_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir, FEED);
    let data = dir.path().join("data");
    let args = ["--config", &config, "--data-dir", data.to_str().unwrap()];
    let mut broker = BrokerProcess::start(&args);
    let before_ms = unix_ms();
    let old = overflow_one(&broker).await;
    broker.signal(Signal::SIGKILL);
    broker.wait_exit(common::WAIT).await;

    let broker = BrokerProcess::start(&args);
    expect_overflow_dead_letter(&broker, old, before_ms).await;
    let mut reader = RawClient::consumer_1_1(broker.addr, "feed", 10).await;
    let payloads = [reader.expect_message().await, reader.expect_message().await]
        .map(|m| m["payload"].as_str().unwrap().to_owned());
    assert_eq!(payloads, ["urgent", "new"], "and not `old`");
}
