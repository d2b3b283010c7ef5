//! Memory bounds of the real binary under peers that misbehave: what `--max-memory`
//! counts, and what one connection may make the broker hold. Each test reads the broker's
//! resident memory from /proc while a client does its worst.

mod common;

use common::{BrokerProcess, rss_bytes, within};
use ferry::{ErrorCode, Producer};

const MIB: u64 = 1 << 20;

/// Publishes `payloads` on `queue` with a window of 1,000 and returns how many were
/// accepted; every refusal must be `queue_full`.
async fn publish_counting(broker: &BrokerProcess, queue: &str, payloads: &[&str]) -> usize {
    let mut producer = within(Producer::connect(broker.addr, queue)).await.unwrap();
    let outcomes = within(producer.publish_all(payloads.iter().copied(), 1000))
        .await
        .unwrap();
    within(producer.close()).await.unwrap();
    outcomes
        .iter()
        .map(|outcome| match outcome {
            Ok(_) => 1,
            Err(refusal) => {
                assert_eq!(refusal.code, ErrorCode::QueueFull, "{refusal}");
                0
            }
        })
        .sum()
}

/// Finding: with `--max-memory 1MiB`, 500,000 empty payloads were all accepted, since
/// only payload bytes were counted, and the broker grew by tens of megabytes.
#[tokio::test]
async fn the_memory_limit_counts_what_a_message_costs_not_only_its_payload() {
    let limit = 4 * MIB;
    let broker = BrokerProcess::start(&["--max-memory", "4MiB"]);
    let pid = broker.child.id();
    publish_counting(&broker, "warm-up", &[""]).await;
    let before = rss_bytes(pid);
    let payloads = vec![""; 500_000];
    let accepted = publish_counting(&broker, "empty", &payloads).await;
    let grown = rss_bytes(pid).saturating_sub(before);
    assert!(
        accepted < payloads.len(),
        "all {accepted} empty messages accepted under a {limit}-byte limit"
    );
    assert!(
        grown <= 3 * limit,
        "{accepted} messages accepted; the broker grew by {grown} bytes under a {limit}-byte limit"
    );
}

/// Every queue costs memory too: a client that spreads one tiny message over each of
/// thousands of queues meets the limit as well.
#[tokio::test]
async fn queues_count_against_the_memory_limit() {
    let limit = MIB;
    let broker = BrokerProcess::start(&["--max-memory", "1MiB"]);
    let pid = broker.child.id();
    publish_counting(&broker, "warm-up", &[""]).await;
    let before = rss_bytes(pid);
    let mut queues = 0;
    while queues < 20_000 && publish_counting(&broker, &format!("q-{queues}"), &[""]).await == 1 {
        queues += 1;
    }
    let grown = rss_bytes(pid).saturating_sub(before);
    assert!(
        queues < 20_000,
        "20,000 queues of one message each accepted under a {limit}-byte limit"
    );
    assert!(
        grown <= 3 * limit,
        "{queues} queues accepted; the broker grew by {grown} bytes under a {limit}-byte limit"
    );
}
