//! Tests of the log on the crash simulator: recovery from hand-made segments, group
//! commit, segment removal and compaction, a failing disk, and a model-based crash test that checks,
//! after every simulated power loss, that nothing durably confirmed was lost and nothing
//! durably acked came back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::backend::{RealFs, SimFs};
use super::record::{self, SegmentHeader};
use super::segments::{SPARE_FILES_MAX, Segments, segment_file_name};
use super::*;
use crate::protocol::{DeadLetter, DeadLetterReason, MessageId, Payload, QueueName};

fn q(name: &str) -> QueueName {
    QueueName::new(name).unwrap()
}

fn config(segment_bytes: u64, repair: bool) -> StorageConfig {
    StorageConfig {
        dir: "/simulated".into(),
        fsync: FsyncPolicy::Always,
        segment_bytes,
        repair,
    }
}

fn open(backend: &SimFs) -> Result<Storage, StorageError> {
    open_repairing(backend, false)
}

/// Opens the log on the simulated disk, as after a crash, with `--repair` or not.
fn open_repairing(backend: &SimFs, repair: bool) -> Result<Storage, StorageError> {
    Storage::open_with(Arc::new(backend.after_crash()), &config(1 << 20, repair))
}

/// Puts segment `number` with `records` after its header on the simulated disk.
fn put_segment(backend: &SimFs, number: u64, next_id: u64, records: impl FnOnce(&mut Vec<u8>)) {
    backend.put(
        &segment_file_name(number),
        &segment(number, next_id, records),
    );
}

/// Polls `done` until it holds; fails with `failure()` after 10 s.
fn poll_until(mut done: impl FnMut() -> bool, failure: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "{}", failure());
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Polls until the journal says `seq` is durable.
fn wait_durable(journal: &mut Journal, seq: u64) {
    poll_until(
        || match &*journal.durability().borrow() {
            Durability::Through(done) => *done >= seq,
            Durability::Failed(reason) => panic!("log failed: {reason}"),
        },
        || format!("batch {seq} never became durable"),
    );
}

/// The segments on the simulated disk, as the log sees them now.
fn segments(disk: &SimFs) -> Segments {
    Segments::new(Arc::new(disk.after_crash()), 1 << 20)
}

/// Bytes of the publish record of `text` on `queue`, as an ack of it frees them.
fn record_bytes(queue: &str, text: &str) -> u64 {
    record::live_record_bytes(&q(queue), &Payload::from_text(text), None, None)
}

/// A segment file's bytes: header, then records.
fn segment(number: u64, next_id: u64, records: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut bytes = SegmentHeader::new(number, next_id).encode().to_vec();
    records(&mut bytes);
    bytes
}

/// The number of the segment whose bytes, header first, these are.
fn segment_of(bytes: &[u8]) -> u64 {
    SegmentHeader::decode(bytes)
        .expect("a segment header")
        .number
}

fn publish(bytes: &mut Vec<u8>, id: u64, text: &str) {
    let segment = segment_of(bytes);
    record::encode_publish(
        bytes,
        segment,
        &LiveMessage::new(MessageId(id), 0, &q("q"), &Payload::from_text(text), None),
    );
}

/// A power loss that keeps no unsynced byte, with `storage` running; then a start.
fn lose_power_and_reopen(backend: &SimFs, storage: Storage) -> Storage {
    backend.crash(|_, _| 0);
    drop(storage);
    open(backend).unwrap()
}

fn recovered_ids(storage: &Storage) -> Vec<u64> {
    storage.recovered.messages.iter().map(|m| m.id.0).collect()
}

/// Submits what the journal has logged and waits until it is durable.
fn submit_durably(journal: &mut Journal) {
    let seq = journal.submit().expect("something to submit");
    wait_durable(journal, seq);
}

/// One broker life on `backend`: open the log, `log` records, make them durable, close.
fn run_once(backend: &SimFs, log: impl FnOnce(&mut Journal)) {
    let mut storage = open(backend).unwrap();
    log(&mut storage.journal);
    submit_durably(&mut storage.journal);
    storage.journal.close();
}

#[test]
fn an_empty_directory_starts_at_id_one() {
    let backend = SimFs::default();
    let storage = open(&backend).unwrap();
    assert!(storage.recovered.messages.is_empty());
    assert_eq!(storage.recovered.next_id, 1);
    assert_eq!(segments(&backend).list_segments().unwrap(), [1]);
}

#[test]
fn publishes_deliveries_and_acks_survive_a_clean_close() {
    let backend = SimFs::default();
    run_once(&backend, |journal| {
        for (id, queue) in [(1, "a"), (2, "b"), (3, "a"), (4, "a")] {
            journal.log_publish(&LiveMessage::new(
                MessageId(id),
                0,
                &q(queue),
                &Payload::from_text(&format!("m{id}")),
                None,
            ));
        }
        journal.log_delivered(&[MessageId(2), MessageId(3)]);
        journal.log_delivered(&[MessageId(3)]);
        journal.log_acked(&[MessageId(1)], record_bytes("a", "m1"));
    });

    let storage = open(&backend).unwrap();
    let recovered = &storage.recovered;
    let got: Vec<_> = recovered
        .messages
        .iter()
        .map(|m| (m.id.0, m.queue.as_str(), m.deliveries))
        .collect();
    assert_eq!(got, [(2, "b", 1), (3, "a", 2), (4, "a", 0)]);
    assert_eq!(recovered.messages[0].payload, Payload::from_text("m2"));
    assert_eq!(recovered.next_id, 5);
}

/// A dead-lettered message is logged as a publish of the same id in its new queue and a
/// dead-letter record: after a restart it is there, attempt counting from 0, with its
/// record; a compaction copy keeps both, and its ack takes exactly the bytes counted.
#[test]
fn a_dead_letter_survives_restarts_and_compaction_in_its_new_queue() {
    let backend = SimFs::default();
    let payload = Payload::from_text("job");
    let record = DeadLetter {
        queue: q("jobs"),
        reason: DeadLetterReason::MaxDeliveries,
        attempts: 2,
        at_ms: 1_767_225_700_000,
    };
    run_once(&backend, |journal| {
        journal.log_publish(&LiveMessage::new(
            MessageId(1),
            0,
            &q("jobs"),
            &payload,
            None,
        ));
        journal.log_publish(&LiveMessage::new(
            MessageId(2),
            0,
            &q("jobs"),
            &Payload::from_text("other"),
            None,
        ));
        journal.log_delivered(&[MessageId(1), MessageId(1)]);
        let replaced = record::live_record_bytes(&q("jobs"), &payload, None, None);
        journal.log_rewritten(
            &LiveMessage::new(MessageId(1), 0, &q("jobs.dlq"), &payload, Some(&record)),
            replaced,
        );
    });
    let recovered = |storage: &Storage| -> Vec<_> {
        storage
            .recovered
            .messages
            .iter()
            .map(|m| {
                (
                    m.id.0,
                    m.queue.as_str().to_owned(),
                    m.deliveries,
                    m.dead_letter.clone(),
                )
            })
            .collect()
    };
    let mut storage = open(&backend).unwrap();
    assert_eq!(
        recovered(&storage),
        [
            (1, "jobs.dlq".to_owned(), 0, Some(record.clone())),
            (2, "jobs".to_owned(), 0, None)
        ]
    );
    // Compaction copies it with its record.
    let live = [LiveMessage {
        published_at_ms: 0,
        due_ms: None,
        priority: 0,
        id: MessageId(1),
        deliveries: 1,
        queue: &q("jobs.dlq"),
        payload: &payload,
        attributes: None,
        dead_letter: Some(&record),
    }];
    storage.journal.compact_oldest(live.into_iter());
    submit_durably(&mut storage.journal);
    storage.journal.close();
    let mut storage = open(&backend).unwrap();
    assert_eq!(
        recovered(&storage)[0],
        (1, "jobs.dlq".to_owned(), 1, Some(record.clone()))
    );
    // Acked with the bytes its records are counted at, nothing live is left counted.
    storage.journal.log_acked(
        &[MessageId(1), MessageId(2)],
        record::live_record_bytes(&q("jobs.dlq"), &payload, None, Some(&record))
            + record::live_record_bytes(&q("jobs"), &Payload::from_text("other"), None, None),
    );
    assert_eq!(storage.journal.live_bytes(), 0);
    submit_durably(&mut storage.journal);
    storage.journal.close();
    assert!(open(&backend).unwrap().recovered.messages.is_empty());
}

/// A message copied (compaction, or a move to its dead-letter queue) twice, the first
/// copy replayed out of order and the second after a sweep emptied the ids above it: the
/// second replaces the first, and acking it leaves nothing behind.
#[test]
fn a_copy_after_a_sweep_replaces_an_out_of_order_one() {
    // Acking all of them sweeps `in_order` empty (more acked slots than SWEEP_AFTER_ACKED).
    let many = 4_097u64;
    // The log, with the second copy acked or not.
    let log = |second_copy_acked: bool| {
        let backend = SimFs::default();
        put_segment(&backend, 2, 10, |b| {
            for id in 10..10 + many {
                publish(b, id, "m");
            }
            // Id 5's first publish was in a removed segment: this copy is out of order.
            publish(b, 5, "copy one");
            let segment = segment_of(b);
            let ids: Vec<_> = (10..10 + many).map(MessageId).collect();
            record::encode_acked(b, segment, &ids);
            publish(b, 5, "copy two");
            if second_copy_acked {
                record::encode_acked(b, segment, &[MessageId(5)]);
            }
        });
        backend
    };
    let storage = open(&log(false)).unwrap();
    let messages = &storage.recovered.messages;
    assert_eq!(
        messages
            .iter()
            .map(|m| (m.id.0, m.payload.clone()))
            .collect::<Vec<_>>(),
        [(5, Payload::from_text("copy two"))]
    );
    drop(storage);
    assert!(
        open(&log(true)).unwrap().recovered.messages.is_empty(),
        "acked"
    );
}

/// A batch of acks alone is not awaited by anything, so its sync may wait for the next
/// publish; with no publish following, it must still be synced soon on its own.
#[test]
fn acks_that_nothing_waits_for_still_reach_stable_storage() {
    let backend = SimFs::default();
    let mut storage = open(&backend).unwrap();
    for (id, text) in [(1, "a"), (2, "b")] {
        storage.journal.log_publish(&LiveMessage::new(
            MessageId(id),
            0,
            &q("q"),
            &Payload::from_text(text),
            None,
        ));
    }
    submit_durably(&mut storage.journal);
    storage.journal.log_delivered(&[MessageId(1)]);
    storage
        .journal
        .log_acked(&[MessageId(1)], record_bytes("q", "a"));
    submit_durably(&mut storage.journal);
    let storage = lose_power_and_reopen(&backend, storage);
    assert_eq!(
        recovered_ids(&storage),
        [2],
        "the synced ack removed message 1"
    );
}

/// The writer appends a whole group's record buffers with one vectored write. A write
/// takes at most `IOV_MAX` (1,024 on Linux) buffers and may write less than asked, so
/// the rest must follow, in order.
#[test]
fn file_segments_append_every_chunk_in_order_however_many() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Segments::new(Arc::new(RealFs::new(dir.path())), DEFAULT_SEGMENT_BYTES);
    let chunks: Vec<Vec<u8>> = (0..3_000u32)
        .map(|i| i.to_le_bytes()[..(i % 5) as usize].to_vec())
        .collect();
    let slices: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
    let mut segment = backend.create_segment(1).unwrap();
    segment.append(&slices).unwrap();
    segment.append(&[b"end"]).unwrap();
    segment.sync_data().unwrap();
    let mut read = Vec::new();
    std::io::Read::read_to_end(&mut backend.open_segment(1).unwrap(), &mut read).unwrap();
    let mut expected = chunks.concat();
    expected.extend_from_slice(b"end");
    assert_eq!(read.len(), expected.len());
    assert!(read == expected, "the chunks came back out of order");
}

/// A large segment is renamed out of the log and cut down step by step before it goes
/// (so a concurrent sync never waits for all its blocks at once); nothing of it stays.
#[test]
fn removing_a_large_file_segment_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    // Segments of 64 MiB: a 20 MiB file is not worth keeping for reuse.
    let backend = Segments::new(Arc::new(RealFs::new(dir.path())), DEFAULT_SEGMENT_BYTES);
    let mut segment = backend.create_segment(1).unwrap();
    let chunk = vec![7u8; 1 << 20];
    for _ in 0..20 {
        segment.append(&[&chunk]).unwrap();
    }
    segment.sync_data().unwrap();
    backend.create_segment(2).unwrap();
    backend.remove_segment(1).unwrap();
    assert_eq!(backend.list_segments().unwrap(), [2]);
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(files.len(), 1, "left behind: {files:?}");
}

/// A crash in the middle of such a removal leaves the renamed file; it is not part of the
/// log, and the next start deletes it.
#[test]
fn a_removal_a_crash_interrupted_is_finished_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = StorageConfig {
        dir: dir.path().to_owned(),
        ..config(1 << 20, false)
    };
    let storage = Storage::open(&config).unwrap();
    storage.journal.close();
    let leftover = dir.path().join(format!("{:020}.seg.removing", 1));
    std::fs::write(&leftover, b"half cut, and not a segment any more").unwrap();
    let storage = Storage::open(&config).unwrap();
    assert!(
        !leftover.exists(),
        "the interrupted removal was not finished"
    );
    assert_eq!(storage.recovered.messages.len(), 0);
    storage.journal.close();
}

/// The file of a removed segment is kept and becomes the next new segment, written from
/// its start over its old contents.
#[test]
fn a_removed_segments_file_is_reused_by_the_next_new_segment() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let segment_bytes = 1 << 20;
    let backend = Segments::new(Arc::new(RealFs::new(dir.path())), segment_bytes);
    let path = |name: &str| dir.path().join(name);
    let mut first = backend.create_segment(1).unwrap();
    first.append(&[&vec![7u8; segment_bytes as usize]]).unwrap();
    first.sync_data().unwrap();
    let first_inode = std::fs::metadata(path("00000000000000000001.seg"))
        .unwrap()
        .ino();
    backend.create_segment(2).unwrap();
    backend.remove_segment(1).unwrap();
    assert_eq!(backend.list_segments().unwrap(), [2]);
    assert!(path("00000000000000000001.seg.spare").exists());

    let mut third = backend.create_segment(3).unwrap();
    let third_path = path("00000000000000000003.seg");
    assert!(!path("00000000000000000001.seg.spare").exists());
    assert_eq!(std::fs::metadata(&third_path).unwrap().ino(), first_inode);
    third.append(&[b"new records"]).unwrap();
    third.sync_data().unwrap();
    let read = std::fs::read(&third_path).unwrap();
    assert_eq!(read.len(), segment_bytes as usize, "written over, not cut");
    assert_eq!(&read[..11], b"new records");
    assert_eq!(read[11], 7, "the old contents follow");

    // A file much shorter than a segment is not worth keeping.
    backend.create_segment(4).unwrap();
    backend.remove_segment(2).unwrap();
    assert!(!path("00000000000000000002.seg.spare").exists());
    assert_eq!(backend.list_segments().unwrap(), [3, 4]);
}

/// A new log directory gets zero-filled spares of a segment's length, synced; one that
/// holds a log already gets none.
#[test]
fn a_new_log_starts_with_zero_filled_spares() {
    let dir = tempfile::tempdir().unwrap();
    let config = StorageConfig {
        dir: dir.path().to_owned(),
        ..config(300_000, false)
    };
    let storage = Storage::open(&config).unwrap();
    storage.journal.close();
    let mut files: Vec<(String, u64)> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            (name, entry.metadata().unwrap().len())
        })
        .collect();
    files.sort();
    let segment = "00000000000000000001.seg";
    let segment_len = files.iter().find(|(name, _)| name == segment).unwrap().1;
    assert_eq!(
        segment_len, 300_000,
        "the first segment wrote over a spare: {files:?}"
    );
    let spares: Vec<&(String, u64)> = files
        .iter()
        .filter(|(name, _)| name.ends_with(".seg.spare"))
        .collect();
    assert_eq!(spares.len(), SPARE_FILES_MAX - 1, "{files:?}");
    let spare = std::fs::read(dir.path().join(&spares[0].0)).unwrap();
    assert_eq!(spare.len(), 300_000);
    assert!(spare.iter().all(|&b| b == 0));

    // A restart is no new log: nothing more is prepared.
    let storage = Storage::open(&config).unwrap();
    storage.journal.close();
    let spares_after = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|entry| {
            let name = entry.as_ref().unwrap().file_name();
            name.to_str().unwrap().starts_with("prepared-")
        })
        .count();
    assert_eq!(spares_after, 0, "the restart's segment took the last one");
}

/// A broker life that fills and empties dozens of small segments on the simulated disk
/// (which keeps removed segments' files for reuse), acking every message but ids 296 to
/// 300, then stops cleanly. Returns how many files its new segments reused.
fn run_through_reused_files(backend: &SimFs) -> usize {
    let mut storage =
        Storage::open_with(Arc::new(backend.after_crash()), &config(2048, false)).unwrap();
    let payload = Payload::from_text(&"r".repeat(100));
    for id in 1..=300 {
        storage
            .journal
            .log_publish(&LiveMessage::new(MessageId(id), 0, &q("q"), &payload, None));
        if id < 296 {
            let bytes = record::live_record_bytes(&q("q"), &payload, None, None);
            storage.journal.log_acked(&[MessageId(id)], bytes);
        }
        submit_durably(&mut storage.journal);
    }
    storage.journal.close();
    backend.reused_files()
}

/// A clean stop seals the active segment: the next start finds it ending cleanly, though
/// its file is a reused one whose old contents follow, and cuts nothing.
#[test]
fn a_clean_stop_leaves_no_old_contents_after_the_last_record() {
    let backend = SimFs::default();
    let reused = run_through_reused_files(&backend);
    assert!(reused > 10, "only {reused} files reused");
    // A short life whose one segment is a reused file, much longer than what it writes.
    run_once(&backend, |journal| {
        journal.log_publish(&LiveMessage::new(
            MessageId(301),
            0,
            &q("q"),
            &Payload::from_text("one more"),
            None,
        ));
    });
    assert_eq!(backend.reused_files(), reused + 1);
    let last = *segments(&backend).list_segments().unwrap().last().unwrap();
    let file_bytes = backend.written(&segment_file_name(last)).unwrap().len() as u64;
    let storage = open(&backend).unwrap();
    assert_eq!(storage.recovered.truncated_bytes, 0);
    assert_eq!(recovered_ids(&storage), [296, 297, 298, 299, 300, 301]);
    let sealed = storage.recovered.segments.last().unwrap();
    assert_eq!(sealed.number, last);
    assert!(
        sealed.bytes < file_bytes,
        "the file of {file_bytes} bytes held no old contents after {} of records",
        sealed.bytes
    );
}

/// After a crash, a reused file's old records follow the last record written to it. They
/// are intact and checksummed, and recovery must neither replay them (their messages were
/// acked long ago) nor take them for data after damage.
#[test]
fn a_crash_in_a_reused_file_ends_the_log_at_its_old_contents() {
    let backend = SimFs::default();
    let reused_before = run_through_reused_files(&backend);
    let mut storage = open(&backend).unwrap();
    assert_eq!(
        backend.reused_files(),
        reused_before + 1,
        "the restart's segment is a reused file"
    );
    let payload = Payload::from_text("after the restart");
    for id in 301..306 {
        storage
            .journal
            .log_publish(&LiveMessage::new(MessageId(id), 0, &q("q"), &payload, None));
    }
    submit_durably(&mut storage.journal);
    let storage = lose_power_and_reopen(&backend, storage);
    assert_eq!(
        recovered_ids(&storage),
        [296, 297, 298, 299, 300, 301, 302, 303, 304, 305]
    );
    assert!(
        storage.recovered.truncated_bytes > 0,
        "no old contents were cut"
    );
}

/// A reused file whose new header the crash lost or tore holds nothing of its new
/// segment: a start removes it. A damaged header followed by records of its own segment is
/// damage, and refused.
#[test]
fn a_reused_file_without_its_new_header_is_a_torn_start_unless_records_follow() {
    // Segment 1 held ids 1 and 2, acked in segment 2; its file was taken for segment 3.
    let old = segment(1, 1, |b| {
        publish(b, 1, "one");
        publish(b, 2, "two");
    });
    let second = segment(2, 3, |b| {
        record::encode_acked(b, 2, &[MessageId(1), MessageId(2)]);
        publish(b, 3, "three");
    });
    let new_header = SegmentHeader::new(3, 4).encode();
    let mut torn = old.clone();
    torn[..20].copy_from_slice(&new_header[..20]);
    for third in [old, torn] {
        let backend = SimFs::default();
        backend.put(&segment_file_name(2), &second);
        backend.put(&segment_file_name(3), &third);
        let storage = open(&backend).unwrap();
        assert_eq!(recovered_ids(&storage), [3]);
        assert_eq!(storage.recovered.next_id, 4);
        assert!(!storage.recovered.segments.iter().any(|s| s.number == 3));
    }

    let mut damaged = segment(3, 4, |b| publish(b, 4, "four"));
    damaged[20] ^= 1;
    let backend = SimFs::default();
    backend.put(&segment_file_name(2), &second);
    backend.put(&segment_file_name(3), &damaged);
    let Err(StorageError::Recovery(RecoveryError::Header { .. })) = open(&backend) else {
        panic!("started over a damaged header with a record after it")
    };
}

/// Replay keeps live messages in id order and marks acks instead of removing: this walks
/// the paths that order does not cover by itself. Thousands of acks (so marked slots are
/// swept out mid-replay), a compaction copy that replaces its still-present original, and
/// copies whose original segment is gone, which arrive after higher ids.
#[test]
fn replay_handles_sweeps_copies_and_copies_of_removed_segments() {
    let ids = |range: std::ops::RangeInclusive<u64>| range.map(MessageId).collect::<Vec<_>>();
    let backend = SimFs::default();
    // Segment 1 (ids 1-9) is gone; segment 2 starts at id 10.
    backend.put(
        &segment_file_name(2),
        &segment(2, 10, |b| {
            for id in 10..=10_009 {
                publish(b, id, &format!("m{id}"));
            }
            record::encode_delivered(b, 2, &ids(10..=10_009));
            record::encode_acked(b, 2, &ids(10..=9_009));
            // Copies: of id 9_500 (its original is here), and of ids 3 and 7 (theirs was
            // in segment 1), the latter delivered and acked afterwards.
            record::encode_publish(
                b,
                2,
                &LiveMessage::new(
                    MessageId(9_500),
                    1,
                    &q("q"),
                    &Payload::from_text("copy"),
                    None,
                ),
            );
            record::encode_publish(
                b,
                2,
                &LiveMessage::new(
                    MessageId(3),
                    2,
                    &q("old"),
                    &Payload::from_text("three"),
                    None,
                ),
            );
            record::encode_publish(
                b,
                2,
                &LiveMessage::new(
                    MessageId(7),
                    0,
                    &q("old"),
                    &Payload::from_text("seven"),
                    None,
                ),
            );
            record::encode_delivered(b, 2, &[MessageId(3), MessageId(9_500)]);
            record::encode_acked(b, 2, &[MessageId(7), MessageId(9_010)]);
        }),
    );
    let storage = open(&backend).unwrap();
    let messages = &storage.recovered.messages;
    let got: Vec<u64> = messages.iter().map(|m| m.id.0).collect();
    let want: Vec<u64> = std::iter::once(3).chain(9_011..=10_009).collect();
    assert_eq!(got, want, "acked ones gone, the copy of 3 in id order");
    let three = &messages[0];
    assert_eq!(
        (three.queue.as_str(), three.deliveries, three.segment),
        ("old", 3, 2)
    );
    assert_eq!(three.payload, Payload::from_text("three"));
    let copied = messages.iter().find(|m| m.id.0 == 9_500).unwrap();
    assert_eq!(
        (copied.payload.clone(), copied.deliveries),
        (Payload::from_text("copy"), 2),
        "the copy replaced its original"
    );
    assert!(
        messages
            .iter()
            .filter(|m| m.id.0 > 9_010 && m.id.0 != 9_500)
            .all(|m| m.deliveries == 1)
    );
    assert_eq!(storage.recovered.next_id, 10_010);
}

/// Every start begins a new segment. One that got no record before the next start holds
/// nothing, so the start after removes it, even behind segments pinned by live messages.
#[test]
fn restarts_without_traffic_leave_no_empty_segments_behind() {
    let backend = SimFs::default();
    run_once(&backend, |journal| {
        journal.log_publish(&LiveMessage::new(
            MessageId(1),
            0,
            &q("q"),
            &Payload::from_text("pinned"),
            None,
        ));
    });
    for _ in 0..5 {
        open(&backend).unwrap().journal.close();
    }
    let storage = open(&backend).unwrap();
    assert_eq!(recovered_ids(&storage), [1]);
    assert_eq!(
        segments(&backend).list_segments().unwrap(),
        [1, 7],
        "the segment with the live message, and the active one"
    );
    assert_eq!(storage.recovered.next_id, 2);
}

#[test]
fn ids_go_on_after_the_highest_ever_issued_even_when_everything_was_acked() {
    let backend = SimFs::default();
    run_once(&backend, |journal| {
        journal.log_publish(&LiveMessage::new(
            MessageId(41),
            0,
            &q("q"),
            &Payload::from_text("x"),
            None,
        ));
        journal.log_acked(&[MessageId(41)], record_bytes("q", "x"));
    });
    // After a restart, segment 1 holds nothing live: the first submit (a batch with the
    // removal only) removes it, and with it every record of id 41.
    run_once(&backend, |_| {});
    // Segment 2 got no record, so the next start removes it too; every start's new
    // segment header carries the next id on.
    for _ in 0..2 {
        let storage = open(&backend).unwrap();
        assert!(storage.recovered.messages.is_empty());
        assert_eq!(
            storage.recovered.next_id, 42,
            "the segment header carries the next id"
        );
        storage.journal.close();
    }
    assert_eq!(segments(&backend).list_segments().unwrap(), [4]);
}

#[test]
fn a_torn_tail_is_truncated_and_everything_before_it_kept() {
    for torn in [
        &b"\x40\x00\x00"[..],
        &[0u8; 64],
        b"\xff\xff\xff\xff garbage",
    ] {
        let backend = SimFs::default();
        let mut bytes = segment(1, 1, |b| {
            publish(b, 1, "one");
            publish(b, 2, "two");
        });
        let intact = bytes.len();
        bytes.extend_from_slice(torn);
        backend.put(&segment_file_name(1), &bytes);
        assert_cut_at(&backend, &[1, 2], bytes.len(), intact);
    }
}

/// Opens the log whose segment 1 is `file_len` bytes long, and checks that recovery kept
/// the messages `kept` and cut the segment's file at `cut_at`, counting what it cut.
fn assert_cut_at(backend: &SimFs, kept: &[u64], file_len: usize, cut_at: usize) {
    let storage = open(backend).unwrap();
    assert_eq!(recovered_ids(&storage), kept);
    assert_eq!(
        storage.recovered.truncated_bytes,
        (file_len - cut_at) as u64
    );
    drop(storage);
    assert_eq!(
        backend.written(&segment_file_name(1)).unwrap().len(),
        cut_at,
        "cut at the damage"
    );
}

#[test]
fn a_record_cut_in_half_at_the_end_is_a_torn_tail() {
    let backend = SimFs::default();
    let whole = segment(1, 1, |b| publish(b, 3, "three")).split_off(record::HEADER_BYTES);
    let bytes = segment(1, 1, |b| {
        publish(b, 1, "one");
        b.extend_from_slice(&whole[..whole.len() / 2]);
    });
    backend.put(&segment_file_name(1), &bytes);
    assert_eq!(recovered_ids(&open(&backend).unwrap()), [1]);
}

#[test]
fn corruption_in_the_middle_refuses_to_start_and_repair_skips_it_loudly() {
    let backend = SimFs::default();
    let mut first_len = 0;
    let bytes = segment(1, 1, |b| {
        publish(b, 1, "one");
        first_len = b.len();
        publish(b, 2, "two");
        publish(b, 3, "three");
        // A later batch says all of this was durable: damage in it is no torn write.
        let synced = b.len() as u64;
        record::encode_synced(b, 1, synced);
    });
    backend.put(&segment_file_name(1), &bytes);
    backend.corrupt(&segment_file_name(1), first_len + 12, b"X");
    let Err(StorageError::Recovery(err)) = open(&backend) else {
        panic!("started on a corrupt log")
    };
    let message = err.to_string();
    assert!(
        message.contains(&format!("offset {first_len}")),
        "{message}"
    );
    assert!(message.contains("--repair"), "{message}");

    let repaired = open_repairing(&backend, true).unwrap();
    assert_eq!(
        recovered_ids(&repaired),
        [1, 3],
        "only the damaged record is lost"
    );
    assert!(repaired.recovered.skipped_bytes > 0);
}

#[test]
fn damage_in_a_sealed_segment_is_never_a_torn_tail() {
    let backend = SimFs::default();
    let mut bytes = segment(1, 1, |b| publish(b, 1, "one"));
    bytes.extend_from_slice(b"\x40\x00\x00");
    backend.put(&segment_file_name(1), &bytes);
    put_segment(&backend, 2, 2, |b| publish(b, 2, "two"));
    assert_refused_as_corrupt(&backend);
}

fn assert_refused_as_corrupt(backend: &SimFs) {
    assert!(matches!(
        open(backend),
        Err(StorageError::Recovery(RecoveryError::Corrupt { .. }))
    ));
}

#[test]
fn empty_segment_files() {
    // The newest, empty: created just before a crash. Emptied and reused as nothing.
    let backend = SimFs::default();
    put_segment(&backend, 1, 1, |b| publish(b, 1, "one"));
    backend.put(&segment_file_name(2), b"");
    let storage = open(&backend).unwrap();
    assert_eq!(recovered_ids(&storage), [1]);
    assert_eq!(
        segments(&backend).list_segments().unwrap(),
        [1, 3],
        "removed, and the next start's segment numbered after it"
    );
    drop(storage);
    // And the next start is not stopped by it.
    assert_eq!(recovered_ids(&open(&backend).unwrap()), [1]);

    // An older one, empty: that data is gone, and the broker will not guess.
    let backend = SimFs::default();
    backend.put(&segment_file_name(1), b"");
    put_segment(&backend, 2, 1, |b| publish(b, 1, "one"));
    let Err(StorageError::Recovery(err)) = open(&backend) else {
        panic!("started")
    };
    assert!(err.to_string().contains("segment header needs 32"), "{err}");
}

#[test]
fn a_last_segment_of_zeroes_is_a_torn_creation_with_or_without_repair() {
    for repair in [false, true] {
        // A segment created (or a zero-filled spare renamed) just before a crash, whose
        // length reached the disk but whose header did not.
        let backend = SimFs::default();
        put_segment(&backend, 1, 1, |b| publish(b, 1, "one"));
        backend.put(&segment_file_name(2), &vec![0; 4096]);
        let storage = open_repairing(&backend, repair).unwrap();
        assert_eq!(recovered_ids(&storage), [1]);
        drop(storage);
        assert_eq!(recovered_ids(&open(&backend).unwrap()), [1], "and again");

        // The only segment, all zeroes.
        let backend = SimFs::default();
        backend.put(&segment_file_name(1), &vec![0; 4096]);
        let storage = open_repairing(&backend, repair).unwrap();
        assert_eq!(recovered_ids(&storage), Vec::<u64>::new());
    }
    // Zeroes where the header belongs, but records of the segment after them: damage.
    let backend = SimFs::default();
    let mut bytes = segment(1, 1, |b| publish(b, 1, "one"));
    bytes[..record::HEADER_BYTES].fill(0);
    backend.put(&segment_file_name(1), &bytes);
    assert!(matches!(
        open(&backend),
        Err(StorageError::Recovery(RecoveryError::Header { .. }))
    ));
}

#[test]
fn repair_always_starts_even_past_a_damaged_last_segment() {
    let backend = SimFs::default();
    put_segment(&backend, 1, 1, |b| publish(b, 1, "one"));
    let mut damaged = segment(2, 2, |b| publish(b, 2, "two"));
    damaged[..8].copy_from_slice(b"NOTFERRY");
    backend.put(&segment_file_name(2), &damaged);
    assert!(matches!(
        open(&backend),
        Err(StorageError::Recovery(RecoveryError::Header { .. }))
    ));
    let repaired = open_repairing(&backend, true).unwrap();
    assert_eq!(recovered_ids(&repaired), [1]);
    assert_eq!(
        segments(&backend).list_segments().unwrap(),
        [1, 2, 3],
        "the skipped segment stays; the new one comes after it"
    );
}

/// After a power loss, the bytes written since the last sync may have reached the disk
/// in any order: damage followed by valid records of the segment is a torn tail when no
/// synced record vouches for the damaged bytes. (Format 2 refused to start on this.)
#[test]
fn damage_after_the_last_sync_is_a_torn_tail_even_with_records_after_it() {
    for vouched in [false, true] {
        let backend = SimFs::default();
        let mut damaged_at = 0;
        let mut bytes = segment(1, 1, |b| {
            publish(b, 1, "one");
            damaged_at = b.len();
            // Written after the sync of record one: a later page reached the disk, this
            // one not. Or, vouched for, synced with record one.
            publish(b, 2, "two");
            let synced = if vouched { b.len() } else { damaged_at };
            record::encode_synced(b, 1, synced as u64);
            publish(b, 3, "three");
        });
        bytes[damaged_at + 14] ^= 0xff;
        backend.put(&segment_file_name(1), &bytes);
        if vouched {
            // Damage a synced record after it vouches for: stable data altered.
            assert_refused_as_corrupt(&backend);
            continue;
        }
        assert_cut_at(&backend, &[1], bytes.len(), damaged_at);
    }
}

/// The journal writes a synced record into each batch once the log is durable further
/// than the last one said, and one alone when the log goes idle, and then no more.
#[test]
fn the_journal_records_how_far_the_log_is_durable() {
    let backend = SimFs::default();
    let mut storage = open(&backend).unwrap();
    let payload = Payload::from_text("m");
    for id in 1..=5u64 {
        storage
            .journal
            .log_publish(&LiveMessage::new(MessageId(id), 0, &q("q"), &payload, None));
        submit_durably(&mut storage.journal);
    }
    // Idle now: one batch says how far the last one is durable, and then nothing more.
    submit_durably(&mut storage.journal);
    assert_eq!(
        storage.journal.submit(),
        None,
        "an idle log is written to once"
    );
    let last = *segments(&backend).list_segments().unwrap().last().unwrap();
    let bytes = backend.written(&segment_file_name(last)).unwrap();
    let header = SegmentHeader::decode(&bytes).unwrap();
    let mut at = record::HEADER_BYTES;
    let mut synced = Vec::new();
    while let record::Decoded::Record(found, used) = record::decode_record(&bytes[at..], &header) {
        if let record::Record::Synced(offset) = found {
            assert!(
                offset as usize <= at,
                "a synced record vouches for what precedes it"
            );
            synced.push((offset, at as u64));
        }
        at += used;
    }
    // Each publish's batch after the first vouches for the one before; the idle batch,
    // alone, for everything before it.
    assert_eq!(synced.len(), 5, "{synced:?}");
    assert!(synced.windows(2).all(|w| w[0].0 < w[1].0));
    let (idle_claim, idle_at) = *synced.last().unwrap();
    assert_eq!(idle_claim, idle_at);
}

/// With `--fsync never` nothing is on stable storage for sure, and nothing is vouched for.
#[test]
fn without_syncs_nothing_is_vouched_for() {
    let backend = SimFs::default();
    let config = StorageConfig {
        fsync: FsyncPolicy::Never,
        ..config(1 << 20, false)
    };
    let mut storage = Storage::open_with(Arc::new(backend.after_crash()), &config).unwrap();
    for id in 1..=3u64 {
        storage.journal.log_publish(&LiveMessage::new(
            MessageId(id),
            0,
            &q("q"),
            &Payload::from_text("m"),
            None,
        ));
        submit_durably(&mut storage.journal);
    }
    assert_eq!(storage.journal.submit(), None);
    let last = *segments(&backend).list_segments().unwrap().last().unwrap();
    let bytes = backend.written(&segment_file_name(last)).unwrap();
    let header = SegmentHeader::decode(&bytes).unwrap();
    let mut at = record::HEADER_BYTES;
    while let record::Decoded::Record(found, used) = record::decode_record(&bytes[at..], &header) {
        assert!(!matches!(found, record::Record::Synced(_)));
        at += used;
    }
}

#[test]
fn an_unknown_format_version_is_a_clear_refusal() {
    let backend = SimFs::default();
    let mut bytes = segment(1, 1, |b| publish(b, 1, "one"));
    bytes[8..12].copy_from_slice(&9u32.to_le_bytes());
    backend.put(&segment_file_name(1), &bytes);
    let Err(StorageError::Recovery(err)) = open(&backend) else {
        panic!("started")
    };
    let message = err.to_string();
    assert!(
        message.contains("format version 9")
            && message.contains(&format!("reads versions 1 to {}", record::FORMAT_VERSION)),
        "{message}"
    );
}

#[test]
fn a_failing_disk_stops_confirming() {
    let backend = SimFs::default();
    let mut storage = open(&backend).unwrap();
    storage.journal.log_publish(&LiveMessage::new(
        MessageId(1),
        0,
        &q("q"),
        &Payload::from_text("x"),
        None,
    ));
    submit_durably(&mut storage.journal);
    backend.fail_from_now_on();
    storage.journal.log_publish(&LiveMessage::new(
        MessageId(2),
        0,
        &q("q"),
        &Payload::from_text("y"),
        None,
    ));
    storage.journal.submit();
    poll_until(
        || {
            matches!(
                &*storage.journal.durability().borrow(),
                Durability::Failed(_)
            )
        },
        || "the failure was never reported".to_owned(),
    );
    // And it stays failed: later batches are never announced durable.
    storage.journal.log_publish(&LiveMessage::new(
        MessageId(3),
        0,
        &q("q"),
        &Payload::from_text("z"),
        None,
    ));
    storage.journal.submit();
    assert!(matches!(
        &*storage.journal.durability().borrow(),
        Durability::Failed(_)
    ));
}

/// Publishes 5,000 messages of ~130 bytes (160 times a segment), acking each one 10
/// publishes later except every `keep_every`th; compacts when the journal asks. Checks
/// the log's size against `bound(live bytes, segment bytes)` every 50 messages (and that
/// the files kept for reuse are no more than [`SPARE_FILES_MAX`] segments), and
/// that a restart finds exactly the unacked messages. Returns whether it ever compacted.
fn run_log_size_test(keep_every: u64, bound: impl Fn(u64, u64) -> u64) -> bool {
    let backend = SimFs::default();
    let segment_bytes = 4096;
    let mut storage = Storage::open_with(
        Arc::new(backend.after_crash()),
        &config(segment_bytes, false),
    )
    .unwrap();
    let q_name = q("q");
    let payload = Payload::from_text(&"p".repeat(100));
    let record_bytes = record::live_record_bytes(&q_name, &payload, None, None);
    let mut live = std::collections::BTreeMap::new();
    let mut compacted = false;
    for id in 1..=5_000u64 {
        storage
            .journal
            .log_publish(&LiveMessage::new(MessageId(id), 0, &q_name, &payload, None));
        live.insert(id, ());
        if id > 10 && (id - 10) % keep_every != 0 {
            storage
                .journal
                .log_acked(&[MessageId(id - 10)], record_bytes);
            live.remove(&(id - 10));
        }
        let live_bytes = live.len() as u64 * record_bytes;
        let compacting = storage.journal.wants_compaction();
        if compacting {
            let messages = live.keys().map(|id| LiveMessage {
                published_at_ms: 0,
                due_ms: None,
                priority: 0,
                id: MessageId(*id),
                deliveries: 0,
                queue: &q_name,
                payload: &payload,
                attributes: None,
                dead_letter: None,
            });
            storage.journal.compact_oldest(messages);
            compacted = true;
            assert!(
                !storage.journal.wants_compaction(),
                "the next compaction waits for this one to be durable"
            );
        }
        let seq = storage.journal.submit();
        // A compaction waits for the previous one to be durable; a broker's turns see
        // that within a sync, so the test waits for it too.
        if compacting || id % 50 == 0 {
            wait_durable(&mut storage.journal, seq.unwrap());
        }
        if id % 50 == 0 {
            // Segments are removed on their own thread, after the batch that emptied
            // them is durable: the bound holds once that thread has caught up.
            let bound = bound(live_bytes, segment_bytes);
            let spares_bound = SPARE_FILES_MAX as u64 * segment_bytes;
            poll_until(
                || backend.bytes_in(".seg") as u64 <= bound,
                || {
                    format!(
                        "after id {id}: log of {} bytes; bound {bound} ({} live)",
                        backend.bytes_in(".seg"),
                        live.len()
                    )
                },
            );
            assert!(
                backend.bytes_in(".seg.spare") as u64 <= spares_bound,
                "after id {id}: {} bytes kept for reuse",
                backend.bytes_in(".seg.spare")
            );
        }
    }
    storage.journal.close();
    let expected: Vec<u64> = live.keys().copied().collect();
    assert_eq!(recovered_ids(&open(&backend).unwrap()), expected);
    compacted
}

#[test]
fn a_log_consumed_in_order_stays_at_its_unacked_messages_plus_two_segments() {
    let compacted = run_log_size_test(u64::MAX, |live, segment| live + 2 * segment);
    assert!(!compacted, "segments emptied by acks need no compaction");
}

#[test]
fn compaction_keeps_a_log_pinned_by_stragglers_near_twice_its_live_size() {
    // Every 100th message is never acked, so every segment keeps a few live messages.
    // Compaction starts past twice the live records and two segments; the oldest
    // segment's copies (a segment at most) are written before it goes; and the active
    // segment's file, written over a spare, is a whole segment long on disk.
    let compacted = run_log_size_test(100, |live, segment| 2 * live + 4 * segment);
    assert!(compacted);
}

/// Records that carry long queue names are as live as their bytes: the journal counts
/// them exactly, so a log with nothing to gain from compaction is left alone, and one
/// that has compacted stops once it is compact.
#[test]
fn compaction_settles_whatever_the_queue_names_take_in_the_records() {
    let backend = SimFs::default();
    let segment_bytes = 4096;
    let mut storage = Storage::open_with(
        Arc::new(backend.after_crash()),
        &config(segment_bytes, false),
    )
    .unwrap();
    let queue = q(&"n".repeat(255));
    let payload = Payload::from_text("");
    let record_bytes = record::live_record_bytes(&queue, &payload, None, None);
    for id in 1..=2_000u64 {
        storage
            .journal
            .log_publish(&LiveMessage::new(MessageId(id), 0, &queue, &payload, None));
        // Every other message is acked: half the log becomes dead.
        if id % 2 == 0 {
            storage
                .journal
                .log_acked(&[MessageId(id - 1)], record_bytes);
        }
    }
    submit_durably(&mut storage.journal);
    let live: Vec<u64> = (1..=2_000u64).filter(|id| id % 2 == 0).collect();
    let segments = segments(&backend).list_segments().unwrap().len();
    let mut compactions = 0;
    while storage.journal.wants_compaction() {
        compactions += 1;
        assert!(
            compactions <= 2 * segments,
            "still compacting after {compactions} rounds over a log of {segments} segments"
        );
        storage
            .journal
            .compact_oldest(live.iter().map(|id| LiveMessage {
                published_at_ms: 0,
                due_ms: None,
                priority: 0,
                id: MessageId(*id),
                deliveries: 0,
                queue: &queue,
                payload: &payload,
                attributes: None,
                dead_letter: None,
            }));
        submit_durably(&mut storage.journal);
    }
    assert!(compactions > 0, "half the log was dead: worth compacting");
    let storage = lose_power_and_reopen(&backend, storage);
    assert_eq!(recovered_ids(&storage), live);
}

/// One step of the crash test.
#[derive(Debug, Clone)]
enum Step {
    Publish,
    Deliver(usize),
    Ack(usize),
    /// Dead-letters a live message into `dlq`.
    Move(usize),
    Submit,
    WaitDurable,
    Compact,
    /// Power loss keeping this fraction (per mille) of each file's unsynced bytes.
    Crash(u16),
    /// Power loss keeping pages of each file's unsynced bytes picked by these bits (the
    /// page cache writes them back in any order).
    CrashWithHoles(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => Just(Step::Publish),
        2 => any::<usize>().prop_map(Step::Deliver),
        4 => any::<usize>().prop_map(Step::Ack),
        1 => any::<usize>().prop_map(Step::Move),
        4 => Just(Step::Submit),
        2 => Just(Step::WaitDurable),
        1 => Just(Step::Compact),
        1 => (0u16..=1000).prop_map(Step::Crash),
        1 => any::<u64>().prop_map(Step::CrashWithHoles),
    ]
}

/// A live message as the test logged it.
#[derive(Clone)]
struct ModelMessage {
    queue: QueueName,
    payload: Payload,
    /// Deliveries logged.
    deliveries: u32,
    dead_letter: Option<DeadLetter>,
    /// The batch of its first publish record.
    publish_batch: u64,
    /// What it was before each of its moves since the last restart, with the batch of
    /// that move: until that batch is durable, a crash may bring it back as it was.
    before_moves: Vec<(ModelMessage, u64)>,
}

/// What the test knows: every id ever logged with its record, and which batch logged
/// each publish, delivery and ack.
#[derive(Default)]
struct Model {
    next_id: u64,
    live: std::collections::BTreeMap<u64, ModelMessage>,
    /// id -> batch of its ack record
    acked: std::collections::BTreeMap<u64, u64>,
    /// Highest batch the journal announced durable.
    durable: u64,
}

fn run_crash_test(steps: &[Step]) -> Result<(), TestCaseError> {
    let backend = SimFs::default();
    let config = config(2048, false);
    let mut storage = Storage::open_with(Arc::new(backend.after_crash()), &config).unwrap();
    let mut model = Model {
        next_id: 1,
        ..Model::default()
    };
    let queues = [q("a"), q("b")];
    let dlq = q("dead-letters");
    for step in steps {
        let batch = storage.journal.pending_seq();
        match *step {
            Step::Publish => {
                let id = model.next_id;
                model.next_id += 1;
                let queue = queues[(id % 2) as usize].clone();
                let payload = Payload::from_text(&format!(
                    "payload {id} {}",
                    "z".repeat((id % 7) as usize * 30)
                ));
                storage.journal.log_publish(&LiveMessage::new(
                    MessageId(id),
                    0,
                    &queue,
                    &payload,
                    None,
                ));
                model.live.insert(
                    id,
                    ModelMessage {
                        queue,
                        payload,
                        deliveries: 0,
                        dead_letter: None,
                        publish_batch: batch,
                        before_moves: Vec::new(),
                    },
                );
            }
            Step::Deliver(pick) | Step::Ack(pick) | Step::Move(pick) if !model.live.is_empty() => {
                let id = *model.live.keys().nth(pick % model.live.len()).unwrap();
                match step {
                    Step::Deliver(_) => {
                        storage.journal.log_delivered(&[MessageId(id)]);
                        model.live.get_mut(&id).unwrap().deliveries += 1;
                    }
                    Step::Ack(_) => {
                        let m = model.live.remove(&id).unwrap();
                        let bytes = record::live_record_bytes(
                            &m.queue,
                            &m.payload,
                            None,
                            m.dead_letter.as_ref(),
                        );
                        storage.journal.log_acked(&[MessageId(id)], bytes);
                        model.acked.insert(id, batch);
                    }
                    _ => {
                        let m = model.live.get_mut(&id).unwrap();
                        let record = DeadLetter {
                            queue: m.queue.clone(),
                            reason: DeadLetterReason::MaxDeliveries,
                            attempts: m.deliveries,
                            at_ms: id,
                        };
                        let replaced = record::live_record_bytes(
                            &m.queue,
                            &m.payload,
                            None,
                            m.dead_letter.as_ref(),
                        );
                        storage.journal.log_rewritten(
                            &LiveMessage::new(MessageId(id), 0, &dlq, &m.payload, Some(&record)),
                            replaced,
                        );
                        let before = ModelMessage {
                            before_moves: Vec::new(),
                            ..m.clone()
                        };
                        m.queue = dlq.clone();
                        m.deliveries = 0;
                        m.dead_letter = Some(record);
                        m.before_moves.push((before, batch));
                    }
                }
            }
            Step::Deliver(_) | Step::Ack(_) | Step::Move(_) => {}
            Step::Submit => {
                storage.journal.submit();
            }
            Step::WaitDurable => {
                if let Some(seq) = storage.journal.submit() {
                    wait_durable(&mut storage.journal, seq);
                }
            }
            Step::Compact => {
                let live = model.live.iter().map(|(id, m)| LiveMessage {
                    published_at_ms: 0,
                    due_ms: None,
                    priority: 0,
                    id: MessageId(*id),
                    deliveries: m.deliveries,
                    queue: &m.queue,
                    payload: &m.payload,
                    attributes: None,
                    dead_letter: m.dead_letter.as_ref(),
                });
                // Copies keep the batch of the original publish in the model: the
                // original stays until the copy is durable.
                storage.journal.compact_oldest(live);
            }
            Step::Crash(_) | Step::CrashWithHoles(_) => {
                if let Durability::Through(done) = &*storage.journal.durability().borrow() {
                    model.durable = *done;
                }
                match *step {
                    Step::Crash(kept_per_mille) => {
                        backend.crash(|_, unsynced| unsynced * kept_per_mille as usize / 1000)
                    }
                    Step::CrashWithHoles(pages) => backend.crash_with_holes(|_, unsynced| {
                        // Pages of 64 bytes: small segments hold few 4 KiB pages.
                        (0..unsynced.div_ceil(64))
                            .filter(|page| pages & (1 << (page % 64)) != 0)
                            .map(|page| (page * 64, 64))
                            .collect()
                    }),
                    _ => unreachable!("a crash step"),
                }
                drop(storage);
                storage = Storage::open_with(Arc::new(backend.after_crash()), &config)
                    .map_err(|e| TestCaseError::fail(format!("recovery failed: {e}")))?;
                let recovered = &storage.recovered;
                for message in &recovered.messages {
                    let id = message.id.0;
                    prop_assert!(
                        model
                            .acked
                            .get(&id)
                            .is_none_or(|ack_batch| *ack_batch > model.durable),
                        "id {} came back although its ack was durable",
                        id
                    );
                    if let Some(logged) = model.live.get(&id) {
                        // As logged last, or, if its move was not yet durable, as before.
                        let matches = |m: &ModelMessage| {
                            message.queue == m.queue
                                && message.payload == m.payload
                                && message.dead_letter == m.dead_letter
                                && message.deliveries <= m.deliveries
                        };
                        let as_before = logged.before_moves.iter().any(|(before, move_batch)| {
                            *move_batch > model.durable && matches(before)
                        });
                        prop_assert!(
                            matches(logged) || as_before,
                            "id {} recovered as {:?}",
                            id,
                            message
                        );
                    }
                }
                let present: std::collections::BTreeSet<u64> =
                    recovered.messages.iter().map(|m| m.id.0).collect();
                for (id, m) in &model.live {
                    prop_assert!(
                        m.publish_batch > model.durable || present.contains(id),
                        "id {} was durably confirmed (batch {}, durable {}) and is gone",
                        id,
                        m.publish_batch,
                        model.durable
                    );
                }
                let highest_durable = model
                    .live
                    .iter()
                    .filter(|(_, m)| m.publish_batch <= model.durable)
                    .map(|(id, _)| *id)
                    .max();
                prop_assert!(
                    recovered.next_id > highest_durable.unwrap_or(0),
                    "ids went backwards"
                );
                prop_assert!(recovered.next_id <= model.next_id);
                // Carry on from what the disk says, as a restarted broker would.
                model.live = recovered
                    .messages
                    .iter()
                    .map(|m| {
                        let message = ModelMessage {
                            queue: m.queue.clone(),
                            payload: m.payload.clone(),
                            deliveries: m.deliveries,
                            dead_letter: m.dead_letter.clone(),
                            publish_batch: 0,
                            before_moves: Vec::new(),
                        };
                        (m.id.0, message)
                    })
                    .collect();
                // Ids from the recovered next id on were never durable: they will be
                // issued again, so what was logged about them is void.
                model
                    .acked
                    .retain(|id, _| !present.contains(id) && *id < recovered.next_id);
                for ack_batch in model.acked.values_mut() {
                    *ack_batch = 0;
                }
                model.next_id = recovered.next_id;
                model.durable = 0;
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn no_durable_publish_is_lost_and_no_durable_ack_undone_across_crashes(steps in prop::collection::vec(step(), 1..120)) {
        run_crash_test(&steps)?;
    }
}

/// One record of a hand-made log, for the chunked-reading comparison.
#[derive(Debug, Clone)]
enum LogRecord {
    Publish { id: u64, bytes: usize },
    Delivered(Vec<u64>),
    Acked(Vec<u64>),
}

fn log_record() -> impl Strategy<Value = LogRecord> {
    prop_oneof![
        3 => (1u64..60, 0usize..300).prop_map(|(id, bytes)| LogRecord::Publish { id, bytes }),
        1 => prop::collection::vec(1u64..60, 1..5).prop_map(LogRecord::Delivered),
        1 => prop::collection::vec(1u64..60, 1..5).prop_map(LogRecord::Acked),
    ]
}

/// Damage to the hand-made log: none, the last segment cut at a point, or a byte flipped.
#[derive(Debug, Clone)]
enum Damage {
    None,
    CutLast(usize),
    Flip {
        segment: usize,
        at: usize,
    },
    /// The last segment is a reused file, its old contents (the same records, of an older
    /// segment) after its own, from this far into them.
    OldContentsAfterLast(usize),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        Just(Damage::None),
        (0usize..10_000).prop_map(Damage::CutLast),
        (0usize..3, 0usize..10_000).prop_map(|(segment, at)| Damage::Flip { segment, at }),
        (0usize..10_000).prop_map(Damage::OldContentsAfterLast),
    ]
}

/// A segment holding `records`.
fn encode_segment(number: u64, records: &[LogRecord]) -> Vec<u8> {
    let mut bytes = SegmentHeader::new(number, 1).encode().to_vec();
    for record in records {
        let ids = |ids: &[u64]| ids.iter().copied().map(MessageId).collect::<Vec<_>>();
        match record {
            LogRecord::Publish { id, bytes: size } => record::encode_publish(
                &mut bytes,
                number,
                &LiveMessage::new(
                    MessageId(*id),
                    0,
                    &q("q"),
                    &Payload::from_text(&"p".repeat(*size)),
                    None,
                ),
            ),
            LogRecord::Delivered(list) => record::encode_delivered(&mut bytes, number, &ids(list)),
            LogRecord::Acked(list) => record::encode_acked(&mut bytes, number, &ids(list)),
        }
    }
    bytes
}

/// Everything recovery reports and leaves on disk, comparable across runs.
fn recovery_outcome(backend: &SimFs, repair: bool, chunk: usize) -> String {
    let result = recovery::recover_in_chunks(&segments(backend), repair, chunk);
    let files: Vec<(u64, Vec<u8>)> = segments(backend)
        .list_segments()
        .unwrap()
        .into_iter()
        .map(|n| (n, backend.written(&segment_file_name(n)).unwrap()))
        .collect();
    match result {
        Ok(r) => format!(
            "{:?} next {} segments {:?} records {} truncated {} skipped {} files {files:?}",
            r.messages, r.next_id, r.segments, r.records, r.truncated_bytes, r.skipped_bytes
        ),
        Err(e) => format!("error {e} files {files:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Recovery reads segments a chunk at a time; whatever the chunk size, records and
    /// headers that straddle chunks, torn tails and damage in the middle come out exactly
    /// as when each segment is read in one piece.
    #[test]
    fn chunked_reading_recovers_exactly_what_whole_segments_do(
        records in prop::collection::vec(log_record(), 0..80),
        split in prop::collection::vec(0usize..80, 0..3),
        damage in damage(),
        repair in any::<bool>(),
        chunk in 1usize..200,
    ) {
        // Records spread over up to three segments.
        let mut bounds: Vec<usize> = split.iter().map(|at| at % (records.len() + 1)).collect();
        bounds.sort_unstable();
        let mut segments = Vec::new();
        let mut from = 0;
        for (number, to) in bounds.into_iter().chain([records.len()]).enumerate() {
            segments.push(encode_segment(number as u64 + 1, &records[from..to]));
            from = to;
        }
        let last = segments.len() - 1;
        match damage {
            Damage::None => {}
            Damage::CutLast(at) => {
                let len = segments[last].len();
                segments[last].truncate(at % (len + 1));
            }
            Damage::OldContentsAfterLast(from) => {
                // Numbered below the log's first: 0 stands for a long-removed segment.
                let old = encode_segment(0, &records);
                segments[last].extend_from_slice(&old[from % (old.len() + 1)..]);
            }
            Damage::Flip { segment, at } => {
                let count = segments.len();
                let bytes = &mut segments[segment % count];
                if !bytes.is_empty() {
                    let at = at % bytes.len();
                    bytes[at] ^= 0x5a;
                }
            }
        }
        let fresh = || {
            let backend = SimFs::default();
            for (number, bytes) in segments.iter().enumerate() {
                backend.put(&segment_file_name(number as u64 + 1), bytes);
            }
            backend
        };
        let whole = recovery_outcome(&fresh(), repair, 1 << 20);
        let chunked = recovery_outcome(&fresh(), repair, chunk);
        prop_assert_eq!(chunked, whole);
    }
}
