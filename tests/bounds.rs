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
    assert!(
        queues < 20_000,
        "20,000 queues of one message each accepted under a {limit}-byte limit"
    );
    // The allocator (mimalloc) gives freed memory back lazily, as later allocations come:
    // right after the last connection, pages that the connections' buffers shared with
    // the queues' allocations are still counted. More connections, refused, let it purge
    // them; the bound holds for what stays.
    let deadline = std::time::Instant::now() + common::WAIT;
    let mut grown = rss_bytes(pid).saturating_sub(before);
    while grown > 3 * limit && std::time::Instant::now() < deadline {
        publish_counting(&broker, "more", &[""]).await;
        grown = rss_bytes(pid).saturating_sub(before);
    }
    assert!(
        grown <= 3 * limit,
        "{queues} queues accepted; the broker grew by {grown} bytes under a {limit}-byte limit"
    );
}

/// A raw client connected with a 4 KiB receive buffer, so that a broker writing to a
/// client that never reads meets backpressure at once.
async fn deaf_client(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    within(socket.connect(addr)).await.unwrap()
}

/// Samples `pid`'s resident memory every 200 ms for `period` and returns the most it
/// grew above `before`.
async fn peak_growth(pid: u32, before: u64, period: std::time::Duration) -> u64 {
    let end = std::time::Instant::now() + period;
    let mut peak = 0;
    while std::time::Instant::now() < end {
        peak = peak.max(rss_bytes(pid).saturating_sub(before));
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    peak
}

/// Finding: a consumer that stops reading made every ack timeout re-encode its messages
/// into an output buffer that never drained: 2.7 GB after 30 s. Its output is bounded
/// now, the broker stops delivering to it, and what it held goes to others.
#[tokio::test]
async fn a_consumer_that_stops_reading_holds_bounded_memory_and_loses_nothing() {
    use tokio::io::AsyncWriteExt;
    let broker = BrokerProcess::start(&["--ack-timeout", "1s"]);
    let pid = broker.child.id();
    publish_counting(&broker, "warm-up", &[""]).await;
    let before = rss_bytes(pid);
    let mut stuck = deaf_client(broker.addr).await;
    let register = serde_json::json!({"type": "register", "role": "consumer", "queue": "big", "prefetch": 1000});
    stuck.write_all(&common::frame(&register)).await.unwrap();
    let payload = "p".repeat(60_000);
    let payloads = vec![payload.as_str(); 1000];
    assert_eq!(publish_counting(&broker, "big", &payloads).await, 1000);
    // Six ack timeouts pass with the messages in flight to a consumer that reads nothing.
    let payload_bytes = 1000 * 60_000;
    let grown = peak_growth(pid, before, std::time::Duration::from_secs(6)).await;
    assert!(
        grown <= 2 * payload_bytes + 32 * MIB,
        "the broker grew by {grown} bytes holding {payload_bytes} bytes of payloads"
    );
    // Every message is still there for a consumer that reads.
    let mut reader = common::connect_consumer(broker.addr, "big", 100).await;
    let mut seen = std::collections::BTreeSet::new();
    let mut redelivered = 0;
    while seen.len() < 1000 {
        let message = common::recv(&mut reader).await;
        assert_eq!(message.payload.len(), 60_000);
        redelivered += usize::from(message.attempt > 1);
        seen.insert(message.id);
        reader.queue_ack(message.id);
    }
    within(reader.flush()).await.unwrap();
    assert!(
        redelivered > 0,
        "the stuck consumer's messages came back by timeout"
    );
    drop(stuck);
}

/// Writes `frame` over and over to `connections` fresh connections (after `first`, if
/// any) that never read, as long as the broker reads them; returns them.
async fn flood(
    addr: std::net::SocketAddr,
    connections: usize,
    first: Option<serde_json::Value>,
    frame: &[u8],
) -> Vec<tokio::task::JoinHandle<()>> {
    use tokio::io::AsyncWriteExt;
    let burst: Vec<u8> = frame
        .iter()
        .copied()
        .cycle()
        .take(frame.len() * 4096)
        .collect();
    let burst = std::sync::Arc::new(burst);
    let mut writers = Vec::new();
    for _ in 0..connections {
        let mut stream = deaf_client(addr).await;
        if let Some(first) = &first {
            stream.write_all(&common::frame(first)).await.unwrap();
        }
        let burst = burst.clone();
        writers.push(tokio::spawn(async move {
            while stream.write_all(&burst).await.is_ok() {}
        }));
    }
    writers
}

/// Finding: the output bound was checked between reads, and a read takes up to 64 KiB:
/// a client that pipelines tiny frames each answered with an error (or acks of unknown
/// ids, each answered with `unknown_id`) and reads nothing queued megabytes. Now every
/// frame read must fit its reply in the connection's output bound.
#[tokio::test]
async fn replies_to_a_client_that_reads_nothing_are_bounded_per_connection() {
    let connections = 40;
    let per_connection = 512 * 1024 + 128 * 1024;
    let broker = BrokerProcess::start(&[]);
    let pid = broker.child.id();
    publish_counting(&broker, "warm-up", &[""]).await;
    let before = rss_bytes(pid);
    let producer = serde_json::json!({"type": "register", "role": "producer", "queue": "q"});
    let consumer =
        serde_json::json!({"type": "register", "role": "consumer", "queue": "q", "prefetch": 1});
    // A 1-byte body that is not JSON: invalid_frame, about 115 bytes, for 5 bytes sent.
    let tiny = common::frame_of_body(b"x");
    let ack = common::frame(&serde_json::json!({"type": "ack", "id": 7}));
    let mut writers = flood(broker.addr, connections, Some(producer), &tiny).await;
    writers.extend(flood(broker.addr, connections, Some(consumer), &ack).await);
    let grown = peak_growth(pid, before, std::time::Duration::from_secs(4)).await;
    let bound = (2 * connections * per_connection) as u64;
    assert!(
        grown <= bound,
        "{} deaf connections grew the broker by {grown} bytes (bound {bound})",
        2 * connections
    );
    let fresh = common::RawClient::producer(broker.addr, "fresh").await;
    drop(fresh);
    for writer in writers {
        writer.abort();
    }
}

/// Finding: a connection could buffer a 1 MiB partial first frame for its whole 10 s to
/// register, before any token was checked. A first frame is a register, and a register
/// needs a few KiB: a longer one is refused at its length prefix.
#[tokio::test]
async fn a_first_frame_too_long_to_be_a_register_is_refused_before_it_is_buffered() {
    let broker = BrokerProcess::start(&[]);
    let pid = broker.child.id();
    publish_counting(&broker, "warm-up", &[""]).await;
    let before = rss_bytes(pid);
    let mut clients = Vec::new();
    for _ in 0..50 {
        let mut client = common::RawClient::connect(broker.addr).await;
        let declared: u32 = 1_000_000;
        let mut bytes = declared.to_be_bytes().to_vec();
        bytes.extend(std::iter::repeat_n(b' ', 900_000));
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            client.send_bytes_unchecked(&bytes),
        )
        .await;
        clients.push(client);
    }
    let grown = rss_bytes(pid).saturating_sub(before);
    for client in &mut clients {
        let error = client.expect_error("not_registered").await;
        assert!(
            error["message"].as_str().unwrap().contains("1000000"),
            "{error}"
        );
    }
    assert!(
        grown <= 50 * 64 * 1024,
        "50 unregistered connections grew the broker by {grown} bytes"
    );
    // A frame over the broker's own limit is still frame_too_large.
    let mut client = common::RawClient::connect(broker.addr).await;
    client.send_bytes(&(2u32 << 20).to_be_bytes()).await;
    client.expect_error("frame_too_large").await;
}
