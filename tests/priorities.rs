//! Priorities (contract §9, §10, §12 rule 10, §14), over real sockets: highest first and
//! first in, first out within a priority, returns to the front of their own priority,
//! nacks to the back of it, the `priority` of each message frame, malformed priorities,
//! what a 1.0 connection makes of the field, and priorities kept across `kill -9`.

mod common;

use std::time::Duration;

use common::{BrokerProcess, RawClient, TestBroker, test_config};
use ferry::broker::BrokerConfig;
use serde_json::json;

/// A broker whose leases outlast any test: no timeout reorders what a test holds.
async fn broker() -> TestBroker {
    TestBroker::start_with(BrokerConfig {
        ack_timeout: Duration::from_secs(600),
        ..test_config()
    })
    .await
}

/// Publishes each (payload, priority); returns their ids.
async fn publish_all(producer: &mut RawClient, messages: &[(&str, u64)]) -> Vec<u64> {
    let mut ids = Vec::new();
    for &(payload, priority) in messages {
        let frame = json!({"type": "publish", "payload": payload, "priority": priority});
        producer.send(frame).await;
        ids.push(producer.expect_ok().await["id"].as_u64().unwrap());
    }
    ids
}

/// The next `n` deliveries as (payload, priority, attempt).
async fn take(consumer: &mut RawClient, n: usize) -> Vec<(String, u64, u64)> {
    let mut taken = Vec::new();
    for _ in 0..n {
        let m = consumer.expect_message().await;
        taken.push((
            m["payload"].as_str().unwrap().to_owned(),
            m["priority"].as_u64().unwrap(),
            m["attempt"].as_u64().unwrap(),
        ));
    }
    taken
}

fn expected(rows: &[(&str, u64, u64)]) -> Vec<(String, u64, u64)> {
    rows.iter()
        .map(|&(payload, priority, attempt)| (payload.to_owned(), priority, attempt))
        .collect()
}

/// Rule 10: ready messages go out highest priority first, in publish order within a
/// priority, whichever consumer takes them.
#[tokio::test]
async fn highest_priority_first_and_fifo_within_one() {
    let broker = broker().await;
    let mut p = RawClient::producer_1_1(broker.addr, "q").await;
    publish_all(
        &mut p,
        &[
            ("low", 0),
            ("high-1", 9),
            ("mid", 4),
            ("high-2", 9),
            ("low-2", 0),
        ],
    )
    .await;
    let mut first = RawClient::consumer_1_1(broker.addr, "q", 2).await;
    assert_eq!(
        take(&mut first, 2).await,
        expected(&[("high-1", 9, 1), ("high-2", 9, 1)])
    );
    let mut second = RawClient::consumer_1_1(broker.addr, "q", 3).await;
    assert_eq!(
        take(&mut second, 3).await,
        expected(&[("mid", 4, 1), ("low", 0, 1), ("low-2", 0, 1)])
    );
}

/// Rules 10, 11 and 12: a message whose consumer vanishes returns to the front of its
/// own priority (ahead of later messages of that priority, behind higher ones), and a
/// nacked one to the back of its priority.
#[tokio::test]
async fn returns_go_to_the_front_of_their_priority_and_nacks_to_its_back() {
    let broker = broker().await;
    let mut p = RawClient::producer_1_1(broker.addr, "q").await;
    let ids = publish_all(&mut p, &[("a", 5)]).await;
    let mut vanishing = RawClient::consumer_1_1(broker.addr, "q", 1).await;
    assert_eq!(take(&mut vanishing, 1).await, expected(&[("a", 5, 1)]));
    let later = publish_all(&mut p, &[("b", 5), ("low", 1), ("top", 8)]).await;
    drop(vanishing);
    common::eventually("the vanished consumer's message is back", || {
        broker.metrics().core.in_flight == 0
    })
    .await;
    let mut c = RawClient::consumer_1_1(broker.addr, "q", 2).await;
    assert_eq!(
        take(&mut c, 2).await,
        expected(&[("top", 8, 1), ("a", 5, 2)])
    );
    c.send(json!({"type": "ack", "id": later[2]})).await;
    c.send(json!({"type": "nack", "id": ids[0]})).await;
    assert_eq!(
        take(&mut c, 2).await,
        expected(&[("b", 5, 1), ("a", 5, 3)]),
        "nacked behind b, still ahead of priority 1"
    );
}

/// §9: `priority` is an integer from 0 to 9, or `invalid_frame` and nothing enqueued
/// (`null` counts as absent, as for every optional field); a 1.0 connection's publish
/// ignores the field (§8: served as in 1.0).
#[tokio::test]
async fn bad_priorities_are_invalid_and_a_1_0_publish_ignores_the_field() {
    let broker = broker().await;
    let mut p = RawClient::producer_1_1(broker.addr, "q").await;
    for priority in [json!(10), json!(-1), json!(1.5), json!("9"), json!(256)] {
        p.send(json!({"type": "publish", "payload": "x", "priority": priority.clone()}))
            .await;
        let error = p.expect_error("invalid_frame").await;
        assert!(
            error["message"].as_str().unwrap().contains("priority"),
            "{priority}: {error}"
        );
    }
    let mut old = RawClient::producer(broker.addr, "q").await;
    old.send(json!({"type": "publish", "payload": "old", "priority": 9}))
        .await;
    old.expect_ok().await;
    publish_all(&mut p, &[("new", 9)]).await;
    let mut c = RawClient::consumer_1_1(broker.addr, "q", 10).await;
    assert_eq!(
        take(&mut c, 2).await,
        expected(&[("new", 9, 1), ("old", 0, 1)])
    );
    assert_eq!(broker.metrics().core.published_total, 2);
}

/// §14: with `--data-dir`, priorities survive `kill -9`, and so does their order; the
/// message in flight at the kill is back at the front of its priority.
#[tokio::test]
async fn priorities_survive_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let args = [
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--ack-timeout",
        "600s",
    ];
    let mut broker = BrokerProcess::start(&args);
    let mut p = RawClient::producer_1_1(broker.addr, "jobs").await;
    publish_all(
        &mut p,
        &[("low", 0), ("high", 7), ("mid", 3), ("high-2", 7)],
    )
    .await;
    let mut c = RawClient::consumer_1_1(broker.addr, "jobs", 1).await;
    assert_eq!(c.expect_message().await["payload"], json!("high"));
    broker.signal(nix::sys::signal::Signal::SIGKILL);
    broker.wait_exit(common::WAIT).await;

    let broker = BrokerProcess::start(&args);
    let mut c = RawClient::consumer_1_1(broker.addr, "jobs", 10).await;
    let after: Vec<(String, u64)> = take(&mut c, 4)
        .await
        .into_iter()
        .map(|(payload, priority, _)| (payload, priority))
        .collect();
    assert_eq!(
        after,
        [("high", 7), ("high-2", 7), ("mid", 3), ("low", 0)].map(|(p, n)| (p.to_owned(), n))
    );
}
