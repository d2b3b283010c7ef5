//! Queue policies (contract §11) through the real binary: `ferry broker --config PATH`
//! applies each queue's table, and refuses to start on a file it cannot honour, naming
//! the file, the table and the key.

mod common;

use common::{BrokerProcess, RawClient, id_and_attempt, run_ferry};
use nix::sys::signal::Signal;
use serde_json::json;

fn write_config(dir: &tempfile::TempDir, text: &str) -> String {
    let path = dir.path().join("ferry.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Queue `fast*` has a 300 ms lease under a broker whose `--ack-timeout` is an hour: an
/// unacked message of `fast-lane` comes back, one of `slow` does not.
#[tokio::test]
async fn each_queue_gets_the_ack_timeout_of_its_table() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir, "[queues.\"fast*\"]\nack_timeout = \"300ms\"\n");
    let broker = BrokerProcess::start(&["--config", &config, "--ack-timeout", "1h"]);
    let mut fast = RawClient::consumer(broker.addr, "fast-lane", 10).await;
    let mut slow = RawClient::consumer(broker.addr, "slow", 10).await;
    let mut producer = RawClient::producer(broker.addr, "fast-lane").await;
    producer
        .send(json!({"type": "publish", "payload": "f"}))
        .await;
    producer.expect_ok().await;
    let mut slow_producer = RawClient::producer(broker.addr, "slow").await;
    slow_producer
        .send(json!({"type": "publish", "payload": "s1"}))
        .await;
    slow_producer.expect_ok().await;

    assert_eq!(fast.expect_message().await["attempt"], 1);
    assert_eq!(slow.expect_message().await["payload"], "s1");
    let again = fast.expect_message().await;
    assert_eq!(
        (again["payload"].as_str(), again["attempt"].as_u64()),
        (Some("f"), Some(2))
    );
    // Past fast-lane's lease, slow's first message is still in flight: the next frame
    // its consumer gets is a new message, not a redelivery.
    slow_producer
        .send(json!({"type": "publish", "payload": "s2"}))
        .await;
    slow_producer.expect_ok().await;
    let next = slow.expect_message().await;
    assert_eq!(
        (next["payload"].as_str(), next["attempt"].as_u64()),
        (Some("s2"), Some(1))
    );
}

#[tokio::test]
async fn a_config_file_it_cannot_honour_stops_the_broker_naming_file_table_and_key() {
    let dir = tempfile::tempdir().unwrap();
    for (text, expected) in [
        (
            "[queue_defaults]\ncolour = \"blue\"\n",
            "[queue_defaults] colour: unknown key",
        ),
        (
            "[queues.\"orders\"]\nack_timeout = 30\n",
            "[queues.orders] ack_timeout: is 30; use a duration string",
        ),
        (
            "[queues.\"orders\"]\nack_timeout = \"soon\"\n",
            "[queues.orders] ack_timeout: `soon` is not a duration",
        ),
        (
            "[queues.\"x y\"]\nack_timeout = \"1s\"\n",
            "[queues.\"x y\"]: queue pattern `x y`",
        ),
        (
            "[queues.\"big\"]\nack_timeout = \"10000000000000000000s\"\n",
            "is out of range; use 1ms to 365days",
        ),
        (
            "[queues.\"tiny\"]\nack_timeout = \"1ns\"\n",
            "[queues.tiny] ack_timeout: 1ns is out of range; use 1ms to 365days",
        ),
        ("[tables]\n", "[tables]: unknown table"),
        (
            "ack_timeout = \"1s\"\n",
            "ack_timeout: a key outside any table",
        ),
        (
            "[queues.\"orders\"]\nmax_deliveries = 5\n",
            "[queues.orders] max_deliveries: is 5 with no dead_letter_queue",
        ),
        (
            "[queues.\"a\"]\ndead_letter_queue = \"b\"\n[queues.\"b\"]\ndead_letter_queue = \"a\"\n",
            "[queues.a] dead_letter_queue: dead letters would go round: b -> a -> b",
        ),
        (
            "[queues.\"orders\"]\ndedup_window = \"1m\"\n",
            "[queues.orders] dedup_window: not served by this build yet",
        ),
        (
            "[queues.\"orders\"]\noverflow = \"drop-oldest\"\n",
            "[queues.orders] overflow: is \"drop-oldest\"; use \"reject-publish\" or \"drop-head\"",
        ),
        (
            "[queues.\"orders\"]\nbackoff_multiplier = 0.5\n",
            "[queues.orders] backoff_multiplier: is 0.5; use a number of at least 1.0",
        ),
        (
            "[queue_defaults]\nmax_delay = \"366days\"\n",
            "[queue_defaults] max_delay: 1year 18h is out of range; use 0s to 365days",
        ),
        ("[queues\n", "not valid TOML"),
    ] {
        let config = write_config(&dir, text);
        let refused = run_ferry(
            &["broker", "--addr", "127.0.0.1:0", "--config", &config],
            "",
            &[],
        )
        .await;
        assert!(!refused.status.success(), "{text:?} was accepted");
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            stderr.contains(&config),
            "{text:?}: the file is not named: {stderr}"
        );
        assert!(stderr.contains(expected), "{text:?}: {stderr}");
        assert!(!stderr.contains("listening on"), "{stderr}");
    }
    let missing = dir.path().join("missing.toml");
    let refused = run_ferry(
        &[
            "broker",
            "--addr",
            "127.0.0.1:0",
            "--config",
            missing.to_str().unwrap(),
        ],
        "",
        &[],
    )
    .await;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("cannot read config file"));
}

const JOBS: &str = "[queues.\"jobs\"]\nack_timeout = \"200ms\"\nmax_deliveries = 2\ndead_letter_queue = \"jobs.dlq\"\n";

/// Publishes `payload` to `queue` and returns its id.
async fn publish(broker: &BrokerProcess, queue: &str, payload: &str) -> u64 {
    let mut producer = RawClient::producer(broker.addr, queue).await;
    producer
        .send(json!({"type": "publish", "payload": payload}))
        .await;
    producer.expect_ok().await["id"].as_u64().unwrap()
}

/// Rules 14 and 15 for a version 1.0 consumer: after its second unacked delivery the
/// message stops coming from `jobs` and comes from `jobs.dlq`, same id, attempt 1.
/// Returns the broker and the dead letter's id.
async fn dead_letter_one(args: &[&str]) -> (BrokerProcess, u64) {
    let broker = BrokerProcess::start(args);
    let mut worker = RawClient::consumer(broker.addr, "jobs", 10).await;
    let id = publish(&broker, "jobs", "job").await;
    for attempt in [1, 2] {
        let delivery = worker.expect_message().await;
        assert_eq!(id_and_attempt(&delivery), (Some(id), Some(attempt)));
    }
    let mut dead_letters = RawClient::consumer(broker.addr, "jobs.dlq", 10).await;
    let dead = dead_letters.expect_message().await;
    assert_eq!(
        (
            dead["id"].as_u64(),
            dead["payload"].as_str(),
            dead["attempt"].as_u64()
        ),
        (Some(id), Some("job"), Some(1))
    );
    // Past its lease on jobs.dlq (no limit there) it comes back there, not to jobs.
    let again = dead_letters.expect_message().await;
    assert_eq!(id_and_attempt(&again), (Some(id), Some(2)));
    let next = publish(&broker, "jobs", "next").await;
    let delivery = worker.expect_message().await;
    assert_eq!(id_and_attempt(&delivery), (Some(next), Some(1)));
    worker.send(json!({"type": "ack", "id": next})).await;
    worker.sync().await;
    (broker, id)
}

#[tokio::test]
async fn a_message_past_max_deliveries_moves_to_the_dead_letter_queue() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir, JOBS);
    dead_letter_one(&["--config", &config]).await;
}

/// With --data-dir, the dead letter stays in the dead-letter queue across `kill -9`.
#[tokio::test]
async fn a_dead_letter_stays_in_its_dead_letter_queue_across_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir, JOBS);
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let args = ["--config", &config, "--data-dir", data];
    let (mut broker, id) = dead_letter_one(&args).await;
    broker.signal(Signal::SIGKILL);
    broker.wait_exit(common::WAIT).await;

    let broker = BrokerProcess::start(&args);
    let mut dead_letters = RawClient::consumer(broker.addr, "jobs.dlq", 10).await;
    let dead = dead_letters.expect_message().await;
    assert_eq!(
        (dead["id"].as_u64(), dead["payload"].as_str()),
        (Some(id), Some("job"))
    );
    dead_letters.send(json!({"type": "ack", "id": id})).await;
    // Nothing of it is left on jobs. The ack of the message before the kill may not have
    // reached stable storage (acks are synced within the fsync interval), so that one
    // may come again; the dead letter never does.
    let mut worker = RawClient::consumer(broker.addr, "jobs", 10).await;
    let after = publish(&broker, "jobs", "after").await;
    loop {
        let got = worker.expect_message().await["id"].as_u64().unwrap();
        assert_ne!(got, id, "the dead letter is back on jobs");
        if got == after {
            break;
        }
    }
}

/// A queue whose policy opted into discarding drops a message past its limit.
#[tokio::test]
async fn an_opted_in_queue_discards_its_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        &dir,
        "[queues.\"lossy\"]\nack_timeout = \"200ms\"\nmax_deliveries = 1\ndiscard_dead_letters = true\n",
    );
    let broker = BrokerProcess::start_with(&["--config", &config], |command| {
        command.env("RUST_LOG", "info,ferry::broker::gate=debug");
    });
    let mut worker = RawClient::consumer(broker.addr, "lossy", 10).await;
    let id = publish(&broker, "lossy", "gone").await;
    assert_eq!(worker.expect_message().await["id"].as_u64(), Some(id));
    broker.wait_for_log("dead letter discarded").await;
    let next = publish(&broker, "lossy", "next").await;
    assert_eq!(
        worker.expect_message().await["id"].as_u64(),
        Some(next),
        "not the discarded one"
    );
}
