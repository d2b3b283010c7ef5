//! Crash test of the durable broker: producers and a consumer under load while the real
//! `ferry broker --data-dir` is killed with SIGKILL at random moments, and sometimes
//! stopped gracefully, over several rounds on one data dir. At the end every confirmed
//! message has been delivered and acked, no id ever named two different messages, ids
//! never went backwards, and no ack made before a graceful stop was undone. Acks lost to
//! a SIGKILL cause redeliveries, which are counted and printed. Segments are small, so
//! that segment rotation, compaction and file reuse are killed midway too.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{BrokerProcess, WAIT};
use ferry::{Consumer, ConsumerOptions, MessageId, Producer};
use nix::sys::signal::Signal;
use proptest::prelude::RngExt;
use proptest::test_runner::{RngAlgorithm, TestRng};

#[derive(Default)]
struct Observed {
    /// payload index -> id the broker confirmed it under
    confirmed: BTreeMap<u64, MessageId>,
    /// id -> payload index, for every delivery ever seen
    id_names: HashMap<MessageId, u64>,
    /// payload indices acked, and how many deliveries each took
    acked: BTreeMap<u64, u32>,
    /// acks made before a graceful stop: these must never be delivered again
    acked_before_graceful_stop: BTreeSet<MessageId>,
    acked_this_round: BTreeSet<MessageId>,
    redeliveries_after_kill: u64,
}

async fn produce(addr: String, next_index: Arc<Mutex<u64>>, observed: Arc<Mutex<Observed>>) {
    let Ok(mut producer) = Producer::connect(addr.as_str(), "crash").await else {
        return;
    };
    loop {
        let batch: Vec<(u64, String)> = {
            let mut next = next_index.lock().unwrap();
            let start = *next;
            *next += 50;
            (start..start + 50).map(|i| (i, format!("m{i}"))).collect()
        };
        let payloads: Vec<&str> = batch.iter().map(|(_, payload)| payload.as_str()).collect();
        let Ok(outcomes) = producer.publish_all(payloads, 25).await else {
            return;
        };
        let mut observed = observed.lock().unwrap();
        for ((index, _), outcome) in batch.iter().zip(outcomes) {
            if let Ok(id) = outcome {
                observed.confirmed.insert(*index, id);
            }
        }
    }
}

/// Receives and acks until `stop`, or, given `outstanding`, until every payload index in
/// it has arrived.
async fn consume(
    addr: String,
    observed: Arc<Mutex<Observed>>,
    stop: Arc<tokio::sync::Notify>,
    mut outstanding: Option<BTreeSet<u64>>,
) {
    let options = ConsumerOptions {
        queue: "crash".into(),
        prefetch: 20,
        token: None,
        tls: None,
        ..ConsumerOptions::default()
    };
    let Ok(mut consumer) = Consumer::connect_with(addr.as_str(), &options).await else {
        return;
    };
    loop {
        let message = tokio::select! {
            () = stop.notified() => break,
            message = consumer.recv() => match message { Ok(message) => message, Err(_) => return },
        };
        let index: u64 = message.payload[1..].parse().expect("a crash-test payload");
        let mut seen = observed.lock().unwrap();
        if let Some(named) = seen.id_names.insert(message.id, index) {
            assert_eq!(
                named, index,
                "id {} named two different messages",
                message.id
            );
        }
        assert!(
            !seen.acked_before_graceful_stop.contains(&message.id),
            "message {} was acked before a graceful stop and came back",
            message.id
        );
        if seen.acked.contains_key(&index) {
            seen.redeliveries_after_kill += 1;
        }
        *seen.acked.entry(index).or_default() += 1;
        seen.acked_this_round.insert(message.id);
        drop(seen);
        let done = outstanding.as_mut().is_some_and(|left| {
            left.remove(&index);
            left.is_empty()
        });
        consumer.queue_ack(message.id);
        if done {
            break;
        }
    }
    // A clean close: every ack is sent before the connection ends.
    let _ = consumer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_no_confirmed_message() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap().to_owned();

    // Small segments: kills land in rotations, compactions, removals and reuses of
    // segment files too, not only in appends.
    let args = [
        "--data-dir",
        data_dir.as_str(),
        "--segment-size",
        "16KiB",
        "--ack-timeout",
        "2s",
        "--drain-timeout",
        "5s",
    ];
    let observed = Arc::new(Mutex::new(Observed::default()));
    let next_index = Arc::new(Mutex::new(0));
    let mut rng = TestRng::deterministic_rng(RngAlgorithm::ChaCha);
    let mut highest_confirmed_id = MessageId(0);
    let rounds = 8;
    for round in 0..rounds {
        let mut broker = BrokerProcess::start(&args);
        let addr = broker.addr.to_string();
        let stop = Arc::new(tokio::sync::Notify::new());
        let producers: Vec<_> = (0..2)
            .map(|_| tokio::spawn(produce(addr.clone(), next_index.clone(), observed.clone())))
            .collect();
        let consumer = tokio::spawn(consume(addr.clone(), observed.clone(), stop.clone(), None));
        // Let the load run a random while: this is the moment of the crash, not a wait
        // for anything to happen.
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..700))).await;
        let graceful = round % 3 == 2;
        if graceful {
            // Stop the clients first, so every ack they sent is in before the drain.
            for producer in &producers {
                producer.abort();
            }
            stop.notify_one();
            let _ = consumer.await;
            broker.signal(Signal::SIGINT);
            assert!(
                broker.wait_exit(WAIT).await.success(),
                "graceful stop failed: {}",
                broker.log_text()
            );
            let mut seen = observed.lock().unwrap();
            let acked = std::mem::take(&mut seen.acked_this_round);
            seen.acked_before_graceful_stop.extend(acked);
        } else {
            broker.signal(Signal::SIGKILL);
            broker.wait_exit(WAIT).await;
            for producer in producers {
                let _ = producer.await;
            }
            let _ = consumer.await;
            observed.lock().unwrap().acked_this_round.clear();
        }
        let seen = observed.lock().unwrap();
        let this_round: Vec<MessageId> = seen
            .confirmed
            .values()
            .copied()
            .filter(|id| *id > highest_confirmed_id)
            .collect();
        assert!(
            !this_round.is_empty() || round == 0 || seen.confirmed.is_empty(),
            "round {round} confirmed nothing"
        );
        highest_confirmed_id = seen
            .confirmed
            .values()
            .copied()
            .max()
            .unwrap_or(highest_confirmed_id);
    }

    // A last, undisturbed run delivers whatever is left.
    let broker = BrokerProcess::start(&args);
    let outstanding: BTreeSet<u64> = {
        let seen = observed.lock().unwrap();
        seen.confirmed
            .keys()
            .filter(|i| !seen.acked.contains_key(i))
            .copied()
            .collect()
    };
    if !outstanding.is_empty() {
        let never_stop = Arc::new(tokio::sync::Notify::new());
        let finished = consume(
            broker.addr.to_string(),
            observed.clone(),
            never_stop,
            Some(outstanding.clone()),
        );
        if tokio::time::timeout(WAIT, finished).await.is_err() {
            let seen = observed.lock().unwrap();
            let missing: Vec<_> = outstanding
                .iter()
                .filter(|i| !seen.acked.contains_key(i))
                .take(20)
                .collect();
            panic!(
                "confirmed messages never delivered: {missing:?}\n{}",
                broker.log_text()
            );
        }
    }
    // New ids go on after every id ever confirmed.
    let mut producer = Producer::connect(broker.addr, "after").await.unwrap();
    let next = producer.publish("after").await.unwrap();
    assert!(
        next > highest_confirmed_id,
        "ids went backwards: {next} after {highest_confirmed_id}"
    );

    let seen = observed.lock().unwrap();
    let missing: Vec<_> = seen
        .confirmed
        .keys()
        .filter(|i| !seen.acked.contains_key(i))
        .collect();
    assert!(missing.is_empty(), "confirmed and never acked: {missing:?}");
    println!(
        "crash test: {rounds} rounds, {} confirmed messages all delivered and acked, {} redeliveries after kill -9, {:.1} s",
        seen.confirmed.len(),
        seen.redeliveries_after_kill,
        started.elapsed().as_secs_f64()
    );
}
