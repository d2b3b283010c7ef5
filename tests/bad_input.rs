//! Bad input of every class the broker handles: broken framing, bodies that are not
//! frames, garbage, floods, clients that never read, slow and vanishing peers. Each
//! test ends by showing the broker still serves a fresh producer and consumer.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{RawClient, TestBroker, eventually, recv, test_config, within};
use ferry::broker::BrokerConfig;
use ferry::broker::core::{MESSAGE_OVERHEAD_BYTES, READY_SLOT_BYTES};
use proptest::prelude::Rng;
use proptest::test_runner::{RngAlgorithm, TestRng};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpSocket;

fn publish_frame(payload: &str) -> Vec<u8> {
    common::frame(&json!({"type": "publish", "payload": payload}))
}

#[tokio::test]
async fn truncated_frames_are_dropped_with_the_connection_and_complete_ones_answered() {
    let broker = TestBroker::start().await;
    // A body cut short, then the client leaves.
    let mut cut = RawClient::producer(broker.addr, "trunc").await;
    let mut bytes = publish_frame("complete one");
    bytes.extend_from_slice(&publish_frame("complete two"));
    let third = publish_frame("never finished");
    bytes.extend_from_slice(&third[..third.len() - 5]);
    cut.send_bytes(&bytes).await;
    cut.expect_ok().await;
    cut.expect_ok().await;
    let mut stream = cut.into_stream();
    stream.shutdown().await.unwrap();
    // A length prefix cut short.
    let mut short = RawClient::connect(broker.addr).await;
    short.send_bytes(&[0, 0]).await;
    drop(short);

    eventually("the cut connections are gone", || {
        broker.metrics().connections == 0
    })
    .await;
    assert_eq!(broker.metrics().core.published_total, 2);
    let mut consumer = broker.consumer("trunc", 10).await;
    assert_eq!(recv(&mut consumer).await.payload, "complete one");
    assert_eq!(recv(&mut consumer).await.payload, "complete two");
    broker.assert_serves_a_fresh_pair().await;
}

#[tokio::test]
async fn lengths_over_the_limit_are_refused_and_the_limit_itself_accepted() {
    let max = 4096;
    let broker = TestBroker::start_with(BrokerConfig {
        max_frame_bytes: max,
        ..test_config()
    })
    .await;
    for declared in [u32::MAX, max as u32 + 1, 0] {
        let mut client = RawClient::producer(broker.addr, "limit").await;
        client.send_bytes(&declared.to_be_bytes()).await;
        // The body never comes: the broker decides on the length alone.
        client.expect_error("frame_too_large").await;
        client.expect_closed().await;
    }
    // A frame of exactly max bytes is fine, and a delivery may exceed max.
    let overhead = json!({"type": "publish", "payload": ""}).to_string().len();
    let payload = "p".repeat(max - overhead);
    let mut producer = RawClient::producer(broker.addr, "limit").await;
    producer.send_bytes(&publish_frame(&payload)).await;
    producer.expect_ok().await;
    let mut consumer = broker.consumer("limit", 1).await;
    assert_eq!(recv(&mut consumer).await.payload, payload);
    broker.assert_serves_a_fresh_pair().await;
}

#[tokio::test]
async fn bodies_that_are_not_frames_before_and_after_registering() {
    let broker = TestBroker::start().await;
    let bodies: Vec<&[u8]> = vec![
        b"\xff\xfe\x00garbage",
        b"{\"type\":",
        b"null",
        b"\"just a string\"",
        b"[{\"type\":\"publish\",\"payload\":\"x\"}]",
        b"{\"type\":\"teleport\"}",
        b"{\"type\":null}",
        b"{\"type\":\"publish\",\"payload\":[\"x\"]}",
        b"{\"type\":\"publish\",\"payload\":\"\\ud800\"}",
        b"{\"type\":\"ack\",\"id\":{\"n\":1}}",
    ];
    for body in &bodies {
        let mut unregistered = RawClient::connect(broker.addr).await;
        unregistered.send_body(body).await;
        unregistered.expect_error("not_registered").await;
        unregistered.expect_closed().await;
    }
    let mut producer = RawClient::producer(broker.addr, "junk").await;
    let mut consumer = RawClient::consumer(broker.addr, "junk-c", 5).await;
    // A frame type the role may not send is the wrong role, whatever its fields.
    let expected = |body: &[u8], forbidden_type: &[u8]| {
        if body.starts_with(forbidden_type) {
            "wrong_role"
        } else {
            "invalid_frame"
        }
    };
    for body in &bodies {
        producer.send_body(body).await;
        producer
            .expect_error(expected(body, br#"{"type":"ack""#))
            .await;
        consumer.send_body(body).await;
        consumer
            .expect_error(expected(body, br#"{"type":"publish""#))
            .await;
    }
    // A repeated field makes the frame ambiguous: refused before its type is considered.
    let repeated = br#"{"type":"publish","payload":"a","payload":"b"}"#;
    producer.send_body(repeated).await;
    producer.expect_error("invalid_frame").await;
    consumer.send_body(repeated).await;
    consumer.expect_error("invalid_frame").await;
    assert_eq!(broker.metrics().core.published_total, 0);
    broker.assert_serves_a_fresh_pair().await;
}

#[tokio::test]
async fn random_garbage_never_hurts_the_broker() {
    let broker = TestBroker::start_with(BrokerConfig {
        max_frame_bytes: 64 * 1024,
        register_timeout: Duration::from_millis(500),
        ..test_config()
    })
    .await;
    let mut rng = TestRng::deterministic_rng(RngAlgorithm::ChaCha);
    for round in 0..100 {
        let mut garbage = vec![0u8; 5 + (rng.next_u32() % 2048) as usize];
        rng.fill_bytes(&mut garbage);
        if round % 3 == 0 {
            // A plausible length, so the garbage reaches the JSON parser.
            let body_len = (garbage.len() - 4) as u32;
            garbage[..4].copy_from_slice(&body_len.to_be_bytes());
        }
        let client = if round % 2 == 0 {
            RawClient::connect(broker.addr).await
        } else {
            RawClient::producer(broker.addr, "garbage").await
        };
        // Whatever the broker answers, or however it closes, is its business; that it
        // keeps serving is ours. A write may fail once the broker has closed.
        let _ = client.into_stream().write_all(&garbage).await;
    }
    broker.assert_serves_a_fresh_pair().await;
    eventually("every garbage connection is closed or timed out", || {
        broker.metrics().connections == 0
    })
    .await;
}

#[tokio::test]
async fn a_producer_that_pipelines_50k_publishes_and_never_reads() {
    let broker = TestBroker::start().await;
    let flooder = RawClient::producer(broker.addr, "flood").await;
    let mut stream = flooder.into_stream();
    let total = 50_000u64;
    let writer = tokio::spawn(async move {
        let mut bytes = Vec::new();
        for i in 0..total {
            bytes.extend_from_slice(&publish_frame(&i.to_string()));
        }
        stream.write_all(&bytes).await.unwrap();
        stream // kept open and never read
    });
    eventually("the broker took all 50k or paused the reader", || {
        let m = broker.metrics();
        m.core.published_total == total || m.throttled_connections == 1
    })
    .await;
    // Others are served meanwhile.
    broker.assert_serves_a_fresh_pair().await;
    let accepted = broker.metrics().core.published_total;
    // What was accepted is intact and in order.
    let mut consumer = broker.consumer("flood", 1000).await;
    for i in 0..accepted.min(5_000) {
        let message = recv(&mut consumer).await;
        assert_eq!(message.payload, i.to_string());
        consumer.queue_ack(message.id);
    }
    within(consumer.flush()).await.unwrap();
    drop(writer);
}

#[tokio::test]
async fn a_client_that_never_reads_is_paused_not_buffered_without_bound() {
    let broker = TestBroker::start().await;
    let socket = TcpSocket::new_v4().unwrap();
    // A small receive buffer, so the broker meets backpressure sooner.
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(broker.addr).await.unwrap();
    let register = common::frame(&json!({"type": "register", "role": "producer", "queue": "deaf"}));
    let mut stream = stream;
    stream.write_all(&register).await.unwrap();

    let total = 1_000_000u64;
    let written = Arc::new(AtomicU64::new(0));
    let progress = written.clone();
    let writer = tokio::spawn(async move {
        let chunk: Vec<u8> = (0..1000)
            .flat_map(|_| publish_frame("0123456789"))
            .collect();
        for _ in 0..total / 1000 {
            if stream.write_all(&chunk).await.is_err() {
                break;
            }
            progress.fetch_add(1000, Ordering::Relaxed);
        }
        stream
    });
    eventually("the broker pauses the deaf connection", || {
        broker.metrics().throttled_connections == 1
    })
    .await;
    assert!(
        !writer.is_finished(),
        "all {total} publishes were accepted from a client that reads nothing"
    );
    let held = broker.metrics().core;
    assert!(held.published_total < total / 2, "{held:?}");
    let per_message = 12 + MESSAGE_OVERHEAD_BYTES + READY_SLOT_BYTES;
    assert!(held.memory_bytes < per_message * total / 2, "{held:?}");
    broker.assert_serves_a_fresh_pair().await;
    writer.abort();
    eventually("the deaf connection is gone", || {
        broker.metrics().connections == 0
    })
    .await;
    assert_eq!(broker.metrics().throttled_connections, 0);
}

#[tokio::test]
async fn five_hundred_connections_at_once() {
    // Both ends of each connection live in this process.
    assert!(
        common::raise_open_file_limit() >= 1100,
        "this test needs 1100 open files"
    );
    let broker = TestBroker::start().await;
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..500 {
        let addr = broker.addr;
        clients.spawn(async move {
            let mut producer = RawClient::producer(addr, "crowd").await;
            producer
                .send(json!({"type": "publish", "payload": format!("client {i}")}))
                .await;
            producer.expect_ok().await;
            producer
        });
    }
    let mut open = Vec::new();
    while let Some(client) = within(clients.join_next()).await {
        open.push(client.unwrap());
    }
    assert_eq!(broker.metrics().connections, 500);
    let mut consumer = broker.consumer("crowd", 1000).await;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..500 {
        let message = recv(&mut consumer).await;
        assert!(seen.insert(message.payload), "delivered twice");
        consumer.queue_ack(message.id);
    }
    within(consumer.flush()).await.unwrap();
    broker.assert_serves_a_fresh_pair().await;
    drop(open);
    eventually("the crowd has left", || broker.metrics().connections == 1).await;
}

#[tokio::test]
async fn a_client_sending_one_byte_at_a_time_slows_nobody() {
    let broker = TestBroker::start().await;
    let mut slow = RawClient::producer(broker.addr, "slow").await;
    let frame = publish_frame("patience");
    let (first_half, second_half) = frame.split_at(frame.len() / 2);
    for byte in first_half {
        slow.send_bytes(&[*byte]).await;
        tokio::task::yield_now().await;
    }
    // Mid-frame, everyone else is served.
    broker.assert_serves_a_fresh_pair().await;
    for byte in second_half {
        slow.send_bytes(&[*byte]).await;
    }
    slow.expect_ok().await;
}

#[tokio::test]
async fn a_consumer_that_vanishes_with_a_reset_returns_its_messages() {
    let broker = TestBroker::start_with(BrokerConfig {
        ack_timeout: Duration::from_secs(600),
        ..test_config()
    })
    .await;
    let mut producer = broker.producer("reset").await;
    let id = within(producer.publish("survivor")).await.unwrap();
    let mut consumer = RawClient::consumer(broker.addr, "reset", 5).await;
    consumer.expect_message().await;
    let stream = consumer.into_stream();
    stream.set_zero_linger().unwrap();
    drop(stream); // sends RST
    let mut next = broker.consumer("reset", 5).await;
    let message = recv(&mut next).await;
    assert_eq!((message.id, message.attempt), (id, 2));
    broker.assert_serves_a_fresh_pair().await;
}

/// Valid frames of every kind, mutated: bits flipped, bytes cut, inserted or repeated,
/// length prefixes changed, frames spliced together.
fn mutated_stream(rng: &mut TestRng) -> Vec<u8> {
    let valid = [
        json!({"type": "register", "role": "producer", "queue": "mutants"}),
        json!({"type": "register", "role": "consumer", "queue": "mutants", "prefetch": 5}),
        json!({"type": "publish", "payload": "a mutant payload"}),
        json!({"type": "ack", "id": 1}),
        json!({"type": "publish", "payload": "esc \"aped\" \\ \u{e9}"}),
    ];
    let mut stream = Vec::new();
    for _ in 0..(1 + rng.next_u32() % 8) {
        let mut frame = common::frame(&valid[rng.next_u32() as usize % valid.len()]);
        match rng.next_u32() % 7 {
            0 => {
                let bit = rng.next_u32() as usize % (frame.len() * 8);
                frame[bit / 8] ^= 1 << (bit % 8);
            }
            1 => frame.truncate(rng.next_u32() as usize % frame.len()),
            2 => {
                let at = rng.next_u32() as usize % frame.len();
                frame.insert(at, rng.next_u32() as u8);
            }
            3 => {
                let len = u32::from_be_bytes(frame[..4].try_into().unwrap());
                let changed = len.wrapping_add(rng.next_u32() % 9).wrapping_sub(4);
                frame[..4].copy_from_slice(&changed.to_be_bytes());
            }
            4 => {
                let from = rng.next_u32() as usize % frame.len();
                let copy = frame[from..].to_vec();
                frame.extend_from_slice(&copy);
            }
            _ => {}
        }
        stream.extend_from_slice(&frame);
    }
    stream
}

#[tokio::test]
async fn mutated_frames_never_hurt_the_broker() {
    let broker = TestBroker::start_with(BrokerConfig {
        register_timeout: Duration::from_millis(300),
        ..test_config()
    })
    .await;
    let mut rng = TestRng::deterministic_rng(RngAlgorithm::ChaCha);
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..300 {
        let bytes = mutated_stream(&mut rng);
        let addr = broker.addr;
        clients.spawn(async move {
            let mut stream = RawClient::connect(addr).await.into_stream();
            // Whatever the broker makes of it, it answers or closes; a write may fail once
            // it has closed. Then the client leaves.
            let _ = stream.write_all(&bytes).await;
        });
    }
    while let Some(joined) = within(clients.join_next()).await {
        joined.unwrap();
    }
    broker.assert_serves_a_fresh_pair().await;
    eventually("every mutant connection is gone", || {
        broker.metrics().connections == 0
    })
    .await;
}
