//! The durable broker (`--data-dir`): what survives a restart, what never comes back,
//! bounded disk use, and refusals on a damaged or busy data directory.

mod common;

use std::time::Duration;

use common::{
    BrokerProcess, RawClient, TestBroker, dir_bytes, durable_config, publish_ids, recv, run_ferry,
    unix_ms, with_fields, within,
};
use ferry::broker::BrokerConfig;
use ferry::broker::core::{
    MESSAGE_OVERHEAD_BYTES, QUEUE_OVERHEAD_BYTES, READY_LEVEL_BYTES, READY_SLOT_BYTES,
};
use ferry::storage::record::{self, Decoded, Record, SegmentHeader};
use ferry::storage::segments::SPARE_FILES_MAX;
use serde_json::{Value, json};

/// A durable config in which a delivered message stays in flight for the whole test (its
/// ack timeout never passes), and the drain gives up quickly on it.
fn patient_config(dir: &std::path::Path) -> BrokerConfig {
    BrokerConfig {
        drain_timeout: Duration::from_millis(200),
        ack_timeout: Duration::from_secs(60),
        ..durable_config(dir)
    }
}

#[tokio::test]
async fn confirmed_messages_survive_a_restart_in_order_with_their_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let config = patient_config(dir.path());
    let broker = TestBroker::start_with(config.clone()).await;
    let ids = publish_ids(&mut broker.producer("jobs").await, &["a", "b", "c", "d"]).await;
    let mut consumer = broker.consumer("jobs", 2).await;
    let first = recv(&mut consumer).await;
    let second = recv(&mut consumer).await;
    within(consumer.ack(first.id)).await.unwrap();
    common::eventually("the ack is applied", || {
        broker.metrics().core.acked_total == 1
    })
    .await;
    // The drain times out on the unacked second message.
    let report = broker.shutdown().await;
    assert!(!report.completed);
    drop(consumer);

    let broker = TestBroker::start_with(config).await;
    let mut consumer = broker.consumer("jobs", 10).await;
    let got: Vec<_> = [
        recv(&mut consumer).await,
        recv(&mut consumer).await,
        recv(&mut consumer).await,
    ]
    .iter()
    .map(|m| (m.id, m.payload.clone(), m.attempt))
    .collect();
    // "c" took the slot the ack of "a" freed, so it too was delivered once before.
    assert_eq!(
        got,
        [
            (second.id, "b".into(), 2),
            (ids[2], "c".into(), 2),
            (ids[3], "d".into(), 1)
        ],
        "in publish order, delivered ones with their next attempt, the acked one gone"
    );
    let next = publish_ids(&mut broker.producer("jobs").await, &["e"]).await;
    assert!(next[0] > ids[3], "ids go on after the highest issued");
}

#[tokio::test]
async fn acked_messages_never_come_back_after_a_clean_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = durable_config(dir.path());
    let broker = TestBroker::start_with(config.clone()).await;
    let payloads: Vec<String> = (0..300).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = payloads.iter().map(String::as_str).collect();
    publish_ids(&mut broker.producer("done").await, &refs).await;
    let mut consumer = broker.consumer("done", 50).await;
    for _ in 0..300 {
        let message = recv(&mut consumer).await;
        consumer.queue_ack(message.id);
    }
    within(consumer.close()).await.unwrap();
    common::eventually("all acks applied", || {
        broker.metrics().core.acked_total == 300
    })
    .await;
    assert!(broker.shutdown().await.completed);

    let broker = TestBroker::start_with(config).await;
    assert_eq!(broker.metrics().core.ready, 0, "nothing was recovered");
    let sentinel = publish_ids(&mut broker.producer("done").await, &["sentinel"]).await;
    let mut consumer = broker.consumer("done", 50).await;
    assert_eq!(
        recv(&mut consumer).await.id,
        sentinel[0],
        "the first delivery is the new message"
    );
}

/// Nothing waits for a delivery or an ack to be durable, so no reply drives them to the
/// log; with no other traffic following, the broker must still log them on its own.
#[tokio::test]
async fn an_ack_reaches_the_log_without_further_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start_with(patient_config(dir.path())).await;
    publish_ids(&mut broker.producer("quiet").await, &["only"]).await;
    let mut consumer = broker.consumer("quiet", 1).await;
    let message = recv(&mut consumer).await;
    within(consumer.ack(message.id)).await.unwrap();
    let expected = [
        Record::Delivered(vec![message.id]),
        Record::Acked(vec![message.id]),
    ];
    common::eventually("the delivery and the ack are in the log", || {
        logged_records(dir.path()).ends_with(&expected)
    })
    .await;
}

/// The records in the data dir's segments, in log order, up to each segment's end (the
/// files are written over reused ones, so their length says nothing), leaving out the
/// synced records, which say how far the log was durable.
fn logged_records(dir: &std::path::Path) -> Vec<Record> {
    let mut segments: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "seg"))
        .collect();
    segments.sort();
    let mut records = Vec::new();
    for path in segments {
        let bytes = std::fs::read(path).unwrap();
        let header = SegmentHeader::decode(&bytes).unwrap();
        let mut at = record::HEADER_BYTES;
        while let Decoded::Record(record, used) = record::decode_record(&bytes[at..], &header) {
            if !matches!(record, Record::Synced(_)) {
                records.push(record);
            }
            at += used;
        }
    }
    records
}

/// Publishes and acks 20,000 messages of ~230 bytes on disk (about 70 times a test
/// segment) through queue `flow`, 200 at a time; every 10 rounds, waits until the data
/// dir is within `bound` bytes. (Segments are removed on a thread of their own, shortly
/// after the acks that emptied them are durable, so a snapshot may hold one too many.)
async fn flow_through(broker: &TestBroker, dir: &std::path::Path, bound: u64) {
    let mut producer = broker.producer("flow").await;
    let mut consumer = broker.consumer("flow", 200).await;
    let payload = "p".repeat(200);
    for round in 0..100 {
        let batch: Vec<&str> = (0..200).map(|_| payload.as_str()).collect();
        publish_ids(&mut producer, &batch).await;
        for _ in 0..200 {
            let message = recv(&mut consumer).await;
            consumer.queue_ack(message.id);
        }
        within(consumer.flush()).await.unwrap();
        if round % 10 == 9 {
            let what = format!("the data dir is within {bound} bytes after round {round}");
            common::eventually(&what, || dir_bytes(dir) <= bound).await;
        }
    }
    within(consumer.close()).await.unwrap();
}

/// A refusal needs nothing logged, but it waits behind its producer's earlier confirms,
/// which wait for the log; it must be answered even when no record follows it.
#[tokio::test]
async fn refusals_behind_unsynced_confirms_are_answered_without_further_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let big = "x".repeat(500_000);
    let broker = TestBroker::start_with(BrokerConfig {
        // Room for the big payload (its JSON literal) with its queue and bookkeeping, and
        // for nothing more.
        max_memory_bytes: big.len() as u64
            + 2
            + MESSAGE_OVERHEAD_BYTES
            + QUEUE_OVERHEAD_BYTES
            + "full".len() as u64
            + READY_LEVEL_BYTES
            + 4 * READY_SLOT_BYTES,
        ..durable_config(dir.path())
    })
    .await;
    let mut producer = broker.producer("full").await;
    // Half a megabyte takes a while to sync; the refusals, one write each, reach the
    // broker in later turns while its confirm still waits for that sync.
    producer.send(&big);
    within(producer.flush()).await.unwrap();
    const REFUSED: usize = 100;
    for _ in 0..REFUSED {
        producer.send("refused");
        within(producer.flush()).await.unwrap();
    }
    within(producer.confirm())
        .await
        .expect("the big publish is confirmed");
    for _ in 0..REFUSED {
        match within(producer.confirm()).await {
            Err(ferry::ClientError::Refused(refusal)) => {
                assert_eq!(refusal.code, ferry::ErrorCode::QueueFull);
            }
            other => panic!("expected queue_full, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn disk_use_stays_bounded_however_much_flows_through() {
    let dir = tempfile::tempdir().unwrap();
    let config = durable_config(dir.path());
    let segment_bytes = config.storage.as_ref().unwrap().segment_bytes;
    let broker = TestBroker::start_with(config).await;
    // At most 200 messages are live at a time, consumed in order: each segment goes once
    // its messages are acked, so the log holds them plus the active segment and the one
    // being emptied (and one more while a removal is on its way to the writer); beside
    // the log, the files of removed segments kept for reuse.
    flow_through(
        &broker,
        dir.path(),
        200 * 300 + (3 + SPARE_FILES_MAX as u64) * segment_bytes,
    )
    .await;
    assert!(broker.shutdown().await.completed);
}

#[tokio::test]
async fn messages_that_outlive_their_segments_are_compacted_forward_with_their_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let config = patient_config(dir.path());
    let segment_bytes = config.storage.as_ref().unwrap().segment_bytes;
    let broker = TestBroker::start_with(config.clone()).await;
    // 50 messages nobody acks; the first 10 are delivered once and handed back.
    let stuck_payloads: Vec<String> = (0..50).map(|i| format!("stuck {i}")).collect();
    let refs: Vec<&str> = stuck_payloads.iter().map(String::as_str).collect();
    let stuck = publish_ids(&mut broker.producer("stuck").await, &refs).await;
    let mut taker = broker.consumer("stuck", 10).await;
    for _ in 0..10 {
        recv(&mut taker).await;
    }
    drop(taker);
    common::eventually("the taken messages are back", || {
        let core = broker.metrics().core;
        core.ready == 50 && core.in_flight == 0
    })
    .await;

    // Far more than a segment holds flows through another queue. The stuck messages pin
    // the first segment, and every later one behind it, until compaction moves them on.
    flow_through(
        &broker,
        dir.path(),
        2 * (50 + 200) * 300 + (4 + SPARE_FILES_MAX as u64) * segment_bytes,
    )
    .await;
    broker.shutdown().await;

    let broker = TestBroker::start_with(config).await;
    let mut consumer = broker.consumer("stuck", 100).await;
    let mut got = Vec::new();
    for _ in 0..50 {
        let message = recv(&mut consumer).await;
        got.push((message.id, message.payload, message.attempt));
    }
    let expected: Vec<_> = stuck
        .iter()
        .zip(&stuck_payloads)
        .enumerate()
        .map(|(n, (id, payload))| (*id, payload.clone(), if n < 10 { 2 } else { 1 }))
        .collect();
    assert_eq!(got, expected, "in publish order, with their attempts");
}

#[tokio::test]
async fn a_corrupt_log_refuses_to_start_naming_the_place_and_repair_skips_it() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let config = durable_config(dir.path());
    let broker = TestBroker::start_with(config).await;
    publish_ids(&mut broker.producer("q").await, &["one", "two", "three"]).await;
    broker.shutdown().await;
    // Damage the second record of the first segment; the third stays intact.
    let segment = dir.path().join(format!("{:020}.seg", 1));
    let mut bytes = std::fs::read(&segment).unwrap();
    let first_record_len = u32::from_le_bytes(bytes[32..36].try_into().unwrap()) as usize
        + ferry::storage::record::RECORD_PREFIX_BYTES;
    let second = 32 + first_record_len;
    bytes[second + 20] ^= 0xff;
    std::fs::write(&segment, &bytes).unwrap();

    let refused = run_ferry(
        &["broker", "--addr", "127.0.0.1:0", "--data-dir", data_dir],
        "",
        &[],
    )
    .await;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains(&format!("offset {second}")) && stderr.contains("--repair"),
        "{stderr}"
    );

    let mut repaired = BrokerProcess::start(&["--data-dir", data_dir, "--repair"]);
    let addr = repaired.addr.to_string();
    let consumed = run_ferry(
        &["consumer", "--addr", &addr, "--queue", "q", "--count", "2"],
        "",
        &[],
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&consumed.stdout),
        "one\nthree\n",
        "only the damaged message is lost"
    );
    repaired.signal(nix::sys::signal::Signal::SIGINT);
    assert!(repaired.wait_exit(common::WAIT).await.success());
}

#[tokio::test]
async fn two_brokers_cannot_share_a_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let _first = BrokerProcess::start(&["--data-dir", data_dir]);
    let second = run_ferry(
        &["broker", "--addr", "127.0.0.1:0", "--data-dir", data_dir],
        "",
        &[],
    )
    .await;
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("in use by another broker"));
}

#[tokio::test]
async fn fsync_never_still_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let args = ["--data-dir", data_dir, "--fsync", "never"];
    kept_across_a_kill(&args, &args).await;
}

/// Publishes `kept` through a broker started with `args`, kills it (SIGKILL), and checks
/// that a broker started again with `restart_args` delivers it.
async fn kept_across_a_kill(args: &[&str], restart_args: &[&str]) {
    let mut broker = BrokerProcess::start(args);
    let addr = broker.addr.to_string();
    let produced = run_ferry(&["producer", "--addr", &addr, "kept"], "", &[]).await;
    assert!(produced.status.success(), "{produced:?}");
    broker.signal(nix::sys::signal::Signal::SIGKILL);
    broker.wait_exit(common::WAIT).await;
    let broker = BrokerProcess::start(restart_args);
    let addr = broker.addr.to_string();
    let consumed = run_ferry(&["consumer", "--addr", &addr, "--count", "1"], "", &[]).await;
    assert_eq!(String::from_utf8_lossy(&consumed.stdout), "kept\n");
}

#[tokio::test]
async fn the_data_dir_and_its_files_are_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("new").join("data");
    let data_dir_arg = data_dir.to_str().unwrap();
    // A permissive umask, as a careless service manager might leave it.
    let mut broker = BrokerProcess::start_with(&["--data-dir", data_dir_arg], |command| {
        // SAFETY: umask is async-signal-safe and touches nothing else.
        unsafe {
            command.pre_exec(|| {
                nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o002));
                Ok(())
            });
        }
    });
    let addr = broker.addr.to_string();
    let produced = run_ferry(&["producer", "--addr", &addr, "q"], "", &[]).await;
    assert!(produced.status.success(), "{produced:?}");
    broker.signal(nix::sys::signal::Signal::SIGINT);
    assert!(broker.wait_exit(common::WAIT).await.success());

    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data_dir), 0o700, "the data dir");
    let files: Vec<_> = std::fs::read_dir(&data_dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    assert!(
        files.len() >= 2,
        "a segment and the lock at least: {files:?}"
    );
    for file in files {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
}

#[tokio::test]
async fn a_segment_of_zeroes_left_by_a_crash_at_its_creation_does_not_block_a_start() {
    for repair in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().to_str().unwrap();
        // What a kill between creating a segment file and writing its header leaves, or
        // a power loss on a zero-filled spare renamed to be the next segment.
        std::fs::write(
            dir.path().join(format!("{:020}.seg", 1)),
            vec![0u8; 1 << 20],
        )
        .unwrap();
        let mut args = vec!["--data-dir", data_dir];
        if repair {
            args.push("--repair");
        }
        kept_across_a_kill(&args, &["--data-dir", data_dir]).await;
    }
}

#[tokio::test]
async fn repair_starts_past_a_last_segment_with_a_damaged_header() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let broker = TestBroker::start_with(durable_config(dir.path())).await;
    publish_ids(&mut broker.producer("q").await, &["one"]).await;
    broker.shutdown().await;
    let last = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "seg"))
        .max()
        .unwrap();
    let mut bytes = std::fs::read(&last).unwrap();
    bytes[..8].copy_from_slice(b"NOTFERRY");
    std::fs::write(&last, bytes).unwrap();

    let refused = run_ferry(
        &["broker", "--addr", "127.0.0.1:0", "--data-dir", data_dir],
        "",
        &[],
    )
    .await;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--repair"));
    let mut repaired = BrokerProcess::start(&["--data-dir", data_dir, "--repair"]);
    let addr = repaired.addr.to_string();
    let produced = run_ferry(&["producer", "--addr", &addr, "after"], "", &[]).await;
    assert!(produced.status.success(), "{produced:?}");
    repaired.signal(nix::sys::signal::Signal::SIGINT);
    assert!(repaired.wait_exit(common::WAIT).await.success());
}

#[tokio::test]
async fn an_idle_broker_stops_writing_to_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let broker = BrokerProcess::start(&["--data-dir", data_dir, "--segment-size", "64KiB"]);
    // Records whose queue name is most of their bytes: 20,000 of them, ~5.5 MB.
    let queue = "n".repeat(255);
    let mut producer = within(ferry::Producer::connect(broker.addr, &queue))
        .await
        .unwrap();
    let payloads = vec![""; 20_000];
    publish_ids(&mut producer, &payloads).await;
    within(producer.close()).await.unwrap();

    // No client is connected now: once what the publishes left to do is done (the last
    // syncs, segment removals), the broker must write nothing more.
    let pid = broker.child.id();
    let deadline = std::time::Instant::now() + common::WAIT;
    let mut before = common::bytes_written_by(pid);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = common::bytes_written_by(pid);
        if now == before {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "an idle broker is still writing: {} bytes in the last second",
            now - before
        );
        before = now;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        common::bytes_written_by(pid) - before,
        0,
        "writes resumed with nothing to do"
    );
}

/// Finding: a log that cannot be written left a broker that accepted connections and
/// answered nothing. It must exit non-zero, having confirmed only what is stored.
#[tokio::test]
async fn a_log_that_cannot_be_written_stops_the_broker_with_nothing_unstored_confirmed() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let args = ["--data-dir", data_dir, "--segment-size", "4MiB"];
    // A first start lays out the log and its spare segment files.
    let mut first = BrokerProcess::start(&args);
    first.signal(nix::sys::signal::Signal::SIGINT);
    assert!(first.wait_exit(common::WAIT).await.success());

    // Files may not grow past 1 MiB now, and the signal that would kill the broker is
    // ignored: writes past it fail with EFBIG, as on a full or failing disk.
    let mut broker = BrokerProcess::start_with(&args, |command| {
        // SAFETY: setrlimit and signal are async-signal-safe and touch nothing else.
        unsafe {
            command.pre_exec(|| {
                use nix::sys::resource::{Resource, setrlimit};
                use nix::sys::signal::{SigHandler, Signal, signal};
                setrlimit(Resource::RLIMIT_FSIZE, 1 << 20, 1 << 20)?;
                signal(Signal::SIGXFSZ, SigHandler::SigIgn)?;
                Ok(())
            });
        }
    });
    let mut producer = common::RawClient::producer(broker.addr, "q").await;
    let payload = "k".repeat(1000);
    let publish = common::frame(&serde_json::json!({"type": "publish", "payload": payload}));
    // A first hundred, well within the limit, confirmed one by one (a busy machine could
    // otherwise gather all 3,000 into one batch that fails whole, confirming nothing).
    let mut confirmed = Vec::new();
    for _ in 0..100 {
        producer.send_bytes(&publish).await;
        confirmed.push(producer.expect_ok().await);
    }
    let publishes: Vec<u8> = (100..3000).flat_map(|_| publish.clone()).collect();
    producer.send_bytes_unchecked(&publishes).await;
    confirmed.extend(producer.read_until_closed().await);
    let confirmed: Vec<u64> = confirmed
        .iter()
        .map(|frame| {
            assert_eq!(
                frame["type"], "ok",
                "only confirms, then the close: {frame}"
            );
            frame["id"].as_u64().unwrap()
        })
        .collect();
    assert!(
        confirmed.len() < 3000,
        "{} confirmed past a 1 MiB file limit",
        confirmed.len()
    );
    let status = broker.wait_exit(common::WAIT).await;
    assert!(
        !status.success(),
        "a broker whose log failed exited with {status}"
    );
    assert!(broker.log_text().contains("the log cannot be written"));

    // Everything confirmed was stored.
    let broker = BrokerProcess::start(&args);
    let mut consumer = common::connect_consumer(broker.addr, "q", 1000).await;
    for id in confirmed {
        let message = recv(&mut consumer).await;
        assert_eq!(message.id.0, id, "confirmed messages come back in order");
        consumer.queue_ack(message.id);
    }
    within(consumer.flush()).await.unwrap();
}

/// Finding: with `--data-dir`, a producer that pipelines and then closes its side got
/// none of its replies (contract §5: every publish gets exactly one), not even the
/// register's `ok`: its connection was forgotten while the confirms waited for the disk.
#[tokio::test]
async fn a_producer_that_half_closes_gets_every_reply_durable_or_not() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    for args in [vec![], vec!["--data-dir", data_dir]] {
        let broker = BrokerProcess::start(&args);
        let mut client = common::RawClient::connect(broker.addr).await;
        let mut bytes = common::frame(
            &serde_json::json!({"type": "register", "role": "producer", "queue": "q"}),
        );
        // Payloads large enough that the last confirms still wait for their sync when
        // the end of the stream is read.
        let payload = "h".repeat(10_000);
        for _ in 0..500 {
            bytes.extend(common::frame(
                &serde_json::json!({"type": "publish", "payload": payload}),
            ));
        }
        client.send_bytes(&bytes).await;
        let mut stream = client.into_stream();
        tokio::io::AsyncWriteExt::shutdown(&mut stream)
            .await
            .unwrap();
        let mut client = common::RawClient::from_stream(stream);
        let replies = client.read_until_closed().await;
        assert_eq!(replies.len(), 501, "{args:?}: {replies:?}");
        assert_eq!(replies[0], serde_json::json!({"type": "ok"}));
        let ids: Vec<u64> = replies[1..]
            .iter()
            .map(|reply| reply["id"].as_u64().expect("a confirm"))
            .collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{args:?}: in order");
    }
}

/// §14: across `kill -9`, a delayed publish and a delayed nack keep their due times on
/// the wall clock (neither comes early, restart time is not added), attempts counted by
/// the nack stay counted, `published_at` is kept, and a rejected dead letter stays in its
/// dead-letter queue with its record. The nack is on stable storage without any further
/// traffic.
#[tokio::test]
async fn delays_nacks_and_dead_letters_survive_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ferry.toml");
    std::fs::write(
        &config,
        "[queues.\"jobs\"]\ndead_letter_queue = \"jobs.dlq\"\n",
    )
    .unwrap();
    let data_dir = dir.path().join("data");
    let args = [
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--ack-timeout",
        "60s",
    ];
    let mut broker = BrokerProcess::start(&args);
    let mut producer = RawClient::register_1_1(broker.addr, "producer", "jobs", json!({})).await;
    let mut worker = RawClient::register_1_1(broker.addr, "consumer", "jobs", json!({})).await;
    let publish = |payload: &str, extra: Value| {
        with_fields(json!({"type": "publish", "payload": payload}), extra)
    };
    producer.send(publish("nacked", json!({}))).await;
    let nacked = producer.expect_ok().await["id"].as_u64().unwrap();
    producer.send(publish("rejected", json!({}))).await;
    let rejected = producer.expect_ok().await["id"].as_u64().unwrap();
    let first = worker.expect_message().await;
    let published_at = first["published_at"].as_u64().unwrap();
    worker.expect_message().await;
    let due = unix_ms() + 2_000;
    producer
        .send(publish("delayed", json!({"not_before": due})))
        .await;
    let delayed = producer.expect_ok().await["id"].as_u64().unwrap();
    // The broker applies the nack after this, so its due time is no earlier.
    let nack_due = unix_ms() + 2_000;
    worker
        .send(json!({"type": "nack", "id": nacked, "delay_ms": 2_000}))
        .await;
    worker
        .send(json!({"type": "nack", "id": rejected, "dead_letter": true}))
        .await;
    worker.sync().await;
    // The nacks reach the log on their own: the delayed one logged again with its due
    // time, the rejected one in the dead-letter queue with its record.
    common::eventually("both nacks are in the log", || {
        let records = logged_records(&data_dir);
        let logged_again = |id: u64, check: &dyn Fn(&Record) -> bool| {
            records.iter().any(|r| {
                matches!(r, Record::Publish { id: logged, .. } if logged.0 == id) && check(r)
            })
        };
        logged_again(nacked, &|r| {
            matches!(
                r,
                Record::Publish {
                    due_ms: Some(_),
                    deliveries: 1,
                    ..
                }
            )
        }) && logged_again(rejected, &|r| {
            matches!(
                r,
                Record::Publish {
                    dead_letter: Some(_),
                    ..
                }
            )
        })
    })
    .await;
    broker.signal(nix::sys::signal::Signal::SIGKILL);
    broker.wait_exit(common::WAIT).await;

    let broker = BrokerProcess::start(&args);
    let mut dead_letters =
        RawClient::register_1_1(broker.addr, "consumer", "jobs.dlq", json!({})).await;
    let dead = dead_letters.expect_message().await;
    assert_eq!(dead["id"], rejected);
    assert_eq!(dead["dead_letter"]["reason"], "rejected");
    assert_eq!(dead["dead_letter"]["queue"], "jobs");
    let mut worker = RawClient::register_1_1(broker.addr, "consumer", "jobs", json!({})).await;
    let mut got = Vec::new();
    for _ in 0..2 {
        let message = worker.expect_message().await;
        got.push((
            message["id"].as_u64().unwrap(),
            message["attempt"].as_u64().unwrap(),
            unix_ms(),
            message["published_at"].as_u64().unwrap(),
        ));
    }
    got.sort();
    let (id, attempt, at, kept_published_at) = got[0];
    assert_eq!((id, attempt, kept_published_at), (nacked, 2, published_at));
    assert!(
        at >= nack_due - 1,
        "the nacked message came {} ms early",
        nack_due - at
    );
    let (id, attempt, at, _) = got[1];
    assert_eq!((id, attempt), (delayed, 1));
    assert!(at >= due, "the delayed publish came {} ms early", due - at);
    assert!(at < due + 10_000, "restart time was added to the delay");
}
