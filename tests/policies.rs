//! Queue policies (contract §11) through the real binary: `ferry broker --config PATH`
//! applies each queue's table, and refuses to start on a file it cannot honour, naming
//! the file, the table and the key.

mod common;

use common::{BrokerProcess, RawClient, run_ferry};
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
            "[queues.orders] max_deliveries: not served by this build yet",
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
