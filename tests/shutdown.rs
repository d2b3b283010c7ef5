//! Graceful shutdown (contract §6), driving the real `ferry broker` binary with real
//! signals: drain then exit 0, the drain timeout, a prompt exit with nothing to wait for,
//! SIGTERM, and a second SIGINT.

mod common;

use std::time::{Duration, Instant};

use common::{BrokerProcess, recv, within};
use ferry::{Consumer, ErrorCode, Producer};
use nix::sys::signal::Signal;

async fn consumer(broker: &BrokerProcess, queue: &str, prefetch: u16) -> Consumer {
    common::connect_consumer(broker.addr, queue, prefetch).await
}

/// Waits until the listener is closed, which the broker does first on a signal.
async fn until_connections_are_refused(broker: &BrokerProcess) {
    let deadline = Instant::now() + common::WAIT;
    while tokio::net::TcpStream::connect(broker.addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the broker still accepts connections"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn sigint_drains_in_flight_and_ready_work_then_exits_0() {
    let mut broker = BrokerProcess::start(&["--ack-timeout", "60s", "--drain-timeout", "30s"]);
    let mut producer = within(Producer::connect(broker.addr, "jobs"))
        .await
        .unwrap();
    let ids = common::publish_ids(&mut producer, &["1", "2", "3", "4", "5"]).await;
    let mut worker = consumer(&broker, "jobs", 2).await;
    let held = [recv(&mut worker).await, recv(&mut worker).await];

    broker.signal(Signal::SIGINT);
    until_connections_are_refused(&broker).await;
    let refusal = within(producer.publish("too late")).await.unwrap_err();
    assert_eq!(refusal.code(), Some(ErrorCode::ShuttingDown));

    // The drain goes on delivering: ack what is held, take and ack the rest.
    for message in &held {
        within(worker.ack(message.id)).await.unwrap();
    }
    for expected in &ids[2..] {
        let message = recv(&mut worker).await;
        assert_eq!(message.id, *expected);
        within(worker.ack(message.id)).await.unwrap();
    }
    let status = broker.wait_exit(common::WAIT).await;
    assert!(
        status.success(),
        "exit status {status:?}: {}",
        broker.log_text()
    );
    let line = broker.wait_for_log("broker stopped").await;
    assert!(
        line.contains("3 messages delivered during the drain, 0 left"),
        "{line}"
    );
    // And every connection was closed.
    assert!(within(worker.recv()).await.is_err());
}

#[tokio::test]
async fn the_drain_timeout_ends_a_drain_that_a_silent_consumer_holds_up() {
    let mut broker = BrokerProcess::start(&["--ack-timeout", "60s", "--drain-timeout", "1s"]);
    let mut producer = within(Producer::connect(broker.addr, "stuck"))
        .await
        .unwrap();
    within(producer.publish("never acked")).await.unwrap();
    let mut silent = consumer(&broker, "stuck", 1).await;
    recv(&mut silent).await;

    let signalled = Instant::now();
    broker.signal(Signal::SIGINT);
    let status = broker.wait_exit(common::WAIT).await;
    assert!(
        status.success(),
        "exit status {status:?}: {}",
        broker.log_text()
    );
    assert!(
        signalled.elapsed() >= Duration::from_secs(1),
        "exited before the drain timeout"
    );
    let line = broker.wait_for_log("broker stopped").await;
    assert!(
        line.contains(
            "0 messages delivered during the drain, 1 left (0 ready, 1 in flight), and 0 delayed"
        ),
        "{line}"
    );
}

#[tokio::test]
async fn with_no_consumer_the_broker_exits_promptly_leaving_ready_messages() {
    // A drain timeout far beyond the test's patience: only a prompt exit passes.
    let mut broker = BrokerProcess::start(&["--drain-timeout", "10m"]);
    let mut producer = within(Producer::connect(broker.addr, "orphans"))
        .await
        .unwrap();
    within(producer.publish_all(["a", "b", "c"], 3))
        .await
        .unwrap();
    broker.signal(Signal::SIGINT);
    let status = broker.wait_exit(common::WAIT).await;
    assert!(status.success(), "exit status {status:?}");
    let line = broker.wait_for_log("broker stopped").await;
    assert!(
        line.contains(
            "0 messages delivered during the drain, 3 left (3 ready, 0 in flight), and 0 delayed"
        ),
        "{line}"
    );
}

#[tokio::test]
async fn sigterm_drains_like_sigint() {
    let mut broker = BrokerProcess::start(&["--drain-timeout", "10m"]);
    let mut idle = consumer(&broker, "quiet", 5).await;
    broker.signal(Signal::SIGTERM);
    let status = broker.wait_exit(common::WAIT).await;
    assert!(status.success(), "exit status {status:?}");
    broker.wait_for_log("SIGTERM").await;
    assert!(
        within(idle.recv()).await.is_err(),
        "the idle consumer was disconnected"
    );
}

#[tokio::test]
async fn a_second_sigint_exits_at_once_with_a_failure_status() {
    let mut broker = BrokerProcess::start(&["--ack-timeout", "60s", "--drain-timeout", "10m"]);
    let mut producer = within(Producer::connect(broker.addr, "held"))
        .await
        .unwrap();
    within(producer.publish("held")).await.unwrap();
    let mut holder = consumer(&broker, "held", 1).await;
    recv(&mut holder).await;

    broker.signal(Signal::SIGINT);
    broker.wait_for_log("draining").await;
    broker.signal(Signal::SIGINT);
    let status = broker.wait_exit(common::WAIT).await;
    assert!(!status.success(), "a second SIGINT must not report success");
    assert_eq!(status.code(), Some(130));
    broker.wait_for_log("second SIGINT").await;
}
