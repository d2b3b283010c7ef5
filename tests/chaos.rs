//! Chaos: producers publish while consumers misbehave at random, from one seed: some are
//! killed mid-batch without acking (dropped with deliveries unread, so the broker sees a
//! reset), some stall past the ack timeout and ack late, some close and reconnect. At the
//! end the broker has taken an ack for every message it confirmed and holds none, every
//! confirmed message was delivered, no id named two messages, and the duplicate
//! deliveries are counted and printed. (A late ack can legitimately succeed: while its
//! consumer was silent the message may have been requeued and redelivered to that same
//! consumer, so only the broker knows which acks took.)

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{TestBroker, test_config, within};
use ferry::broker::BrokerConfig;
use ferry::{Consumer, ConsumerOptions, MessageId};
use proptest::prelude::{Rng, RngExt};
use proptest::test_runner::{RngAlgorithm, TestRng};

const ACK_TIMEOUT: Duration = Duration::from_millis(300);
const MESSAGES_PER_PRODUCER: u64 = 1500;

#[derive(Default)]
struct Tally {
    confirmed: HashMap<u64, MessageId>,
    delivered: HashSet<u64>,
    id_names: HashMap<MessageId, u64>,
    deliveries: u64,
    producers_done: usize,
}

#[derive(Debug, Clone, Copy)]
enum Behaviour {
    /// Take a few messages, ack some, vanish.
    Killed,
    /// Take a few, go silent past the ack timeout, then ack them late.
    Stalls,
    /// Work properly for a while, then close cleanly.
    Steady,
}

async fn consumer_session(
    addr: std::net::SocketAddr,
    behaviour: Behaviour,
    seed: u64,
    tally: Arc<Mutex<Tally>>,
) {
    let mut rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed.to_le_bytes().repeat(4));
    let options = ConsumerOptions {
        queue: "chaos".into(),
        prefetch: 1 + rng.random_range(0..20),
        token: None,
        tls: None,
        ..ConsumerOptions::default()
    };
    let Ok(mut consumer) = Consumer::connect_with(addr, &options).await else {
        return;
    };
    let take = rng.random_range(1..60);
    let mut held = Vec::new();
    for _ in 0..take {
        let Ok(Ok(message)) =
            tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await
        else {
            break;
        };
        let index: u64 = message.payload.parse().expect("a chaos payload");
        {
            let mut tally = tally.lock().unwrap();
            tally.deliveries += 1;
            tally.delivered.insert(index);
            if let Some(named) = tally.id_names.insert(message.id, index) {
                assert_eq!(named, index, "id {} named two messages", message.id);
            }
        }
        match behaviour {
            Behaviour::Killed if rng.random_bool(0.5) => held.push(message.id),
            Behaviour::Stalls => held.push(message.id),
            // Queued, sent with the next read; a killed consumer's never leave.
            _ => consumer.queue_ack(message.id),
        }
    }
    match behaviour {
        // Dropped with whatever is unread and unacked: the broker must take it all back.
        Behaviour::Killed => drop(consumer),
        Behaviour::Stalls => {
            // The fault under test: silence past the ack timeout.
            tokio::time::sleep(ACK_TIMEOUT * 2).await;
            for id in &held {
                consumer.queue_ack(*id);
            }
            // Late acks are refused (unknown_id) and change nothing; the messages were
            // requeued and count only when acked again.
            let _ = consumer.close().await;
        }
        Behaviour::Steady => {
            let _ = consumer.close().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_killed_stalled_and_reconnecting_lose_nothing() {
    let started = Instant::now();
    let broker = TestBroker::start_with(BrokerConfig {
        ack_timeout: ACK_TIMEOUT,
        ..test_config()
    })
    .await;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let producers = 3;
    for p in 0..producers {
        let mut producer = broker.producer("chaos").await;
        let tally = tally.clone();
        tokio::spawn(async move {
            for chunk in (0..MESSAGES_PER_PRODUCER).collect::<Vec<_>>().chunks(100) {
                let payloads: Vec<String> = chunk
                    .iter()
                    .map(|i| (p * MESSAGES_PER_PRODUCER + i).to_string())
                    .collect();
                let outcomes = producer
                    .publish_all(payloads.iter().map(String::as_str), 50)
                    .await
                    .unwrap();
                let mut tally = tally.lock().unwrap();
                for (payload, outcome) in payloads.iter().zip(outcomes) {
                    tally
                        .confirmed
                        .insert(payload.parse().unwrap(), outcome.unwrap());
                }
            }
            tally.lock().unwrap().producers_done += 1;
        });
    }

    let mut rng = TestRng::deterministic_rng(RngAlgorithm::ChaCha);
    let mut sessions = tokio::task::JoinSet::new();
    let deadline = Instant::now() + Duration::from_secs(45);
    let mut by_behaviour: HashMap<&str, usize> = HashMap::new();
    let settled = || {
        let producing = tally.lock().unwrap().producers_done < producers as usize;
        let core = broker.metrics().core;
        !producing
            && core.acked_total == core.published_total
            && core.ready == 0
            && core.in_flight == 0
    };
    while !settled() {
        if Instant::now() >= deadline {
            panic!(
                "the broker did not settle within 45 s: {:?}",
                broker.metrics()
            );
        }
        // Keep about six consumers going at once.
        while sessions.len() < 6 {
            let behaviour = match rng.random_range(0..10) {
                0..=2 => Behaviour::Killed,
                3..=4 => Behaviour::Stalls,
                _ => Behaviour::Steady,
            };
            *by_behaviour
                .entry(format!("{behaviour:?}").leak())
                .or_default() += 1;
            sessions.spawn(consumer_session(
                broker.addr,
                behaviour,
                rng.next_u64(),
                tally.clone(),
            ));
        }
        within(sessions.join_next()).await.unwrap().unwrap();
    }
    sessions.shutdown().await;

    let tally = tally.lock().unwrap();
    let confirmed = tally.confirmed.len() as u64;
    assert_eq!(confirmed, producers * MESSAGES_PER_PRODUCER);
    assert_eq!(
        broker.metrics().core.acked_total,
        confirmed,
        "one ack taken per confirmed message"
    );
    let undelivered: Vec<_> = tally
        .confirmed
        .keys()
        .filter(|i| !tally.delivered.contains(i))
        .collect();
    assert!(
        undelivered.is_empty(),
        "confirmed and never delivered: {undelivered:?}"
    );
    println!(
        "chaos: {confirmed} confirmed, all acked; {} deliveries, {} duplicates; sessions {by_behaviour:?}; {:.1} s",
        tally.deliveries,
        tally.deliveries - confirmed,
        started.elapsed().as_secs_f64()
    );
}
