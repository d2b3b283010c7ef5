//! Rebuilding the broker's state from the log at start: replay every segment in order.
//!
//! A segment ends at its sealed record, or at the end of its file; what follows a sealed
//! record is a reused file's old contents. Damage is judged by where it is. In the last
//! segment, damage that no later record shows to have been durable is a write torn by a
//! crash (or, in a reused file, its old contents): nothing valid follows it, or (format
//! 3) nothing that follows is a synced record vouching for the bytes where it is, since
//! a power loss may keep pages written after the last sync and lose earlier ones. It is
//! truncated away with everything after it, and logged; every intact record before it is
//! kept. Anywhere else, damage means data was lost or altered after it was written: the
//! broker refuses to start and says where, unless `--repair` tells it to skip the damaged
//! bytes (loudly, naming them).

use std::collections::HashSet;
use std::io::Read;

use rustc_hash::FxHashMap;
use thiserror::Error;
use tracing::{error, warn};

use super::record::{self, Decoded, HeaderError, Record, SegmentHeader};
use super::segments::Segments;
use crate::protocol::{Attributes, DeadLetter, MessageId, Payload, QueueName};

/// A message that was confirmed and not acked when the broker stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredMessage {
    pub id: MessageId,
    pub queue: QueueName,
    pub payload: Payload,
    /// Deliveries before the restart; the next one is attempt `deliveries + 1`.
    pub deliveries: u32,
    /// When it was published, in milliseconds since the Unix epoch; 0 if the log did
    /// not record it (format 4 and before).
    pub published_at_ms: u64,
    /// When it is due, if it was delayed.
    pub due_ms: Option<u64>,
    /// 0-9; 0 for logs of format 5 and before.
    pub priority: u8,
    /// What its publish attached (format 8 on).
    pub attributes: Option<Attributes>,
    /// Its dead-letter record, if it was dead-lettered into `queue`.
    pub dead_letter: Option<DeadLetter>,
    /// The segment holding its latest publish record: the log needs it to know when a
    /// segment holds nothing live.
    pub segment: u64,
}

/// A segment kept by recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecoveredSegment {
    pub number: u64,
    /// Its valid bytes, header included.
    pub bytes: u64,
    /// The next id when it was started (from its header): messages first published in
    /// it have ids from here up to the next segment's `first_id`.
    pub first_id: u64,
}

/// What recovery found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Unacked messages in id (publish) order.
    pub messages: Vec<RecoveredMessage>,
    /// One more than the highest id ever issued.
    pub next_id: u64,
    /// Segments present after recovery, ascending.
    pub segments: Vec<RecoveredSegment>,
    /// The highest segment number found, kept or not (a segment `--repair` skipped stays
    /// on disk): the next segment is numbered after it.
    pub highest_segment: Option<u64>,
    pub records: u64,
    /// Bytes cut from the end of the last segment as a torn write.
    pub truncated_bytes: u64,
    /// Bytes skipped as damaged under `--repair`.
    pub skipped_bytes: u64,
}

#[derive(Debug, Error)]
pub enum RecoveryError {
    #[error("cannot read the log: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "{segment}: {problem}; refusing to start. Restore the data dir from a backup, or start with --repair to skip this segment (its messages are lost)"
    )]
    Header {
        segment: String,
        problem: HeaderError,
    },
    #[error(
        "{segment}, offset {offset}: {problem}, with intact data after it; refusing to start rather than skip data. \
         Restore the data dir from a backup, or start with --repair to skip the damaged bytes (the messages in them are lost)"
    )]
    Corrupt {
        segment: String,
        offset: usize,
        problem: &'static str,
    },
}

/// The state the log describes, built record by record.
///
/// Live messages are kept in a vector in id order rather than in a map: new messages are
/// published in id order, so they append, and an ack marks its slot instead of removing
/// it (the marked slots are swept out once they outnumber the live ones). The result is
/// the sorted list recovery returns, without a map beside it: at a million live messages
/// that halves what replay holds besides the payloads.
struct Replay {
    /// Ascending ids.
    in_order: Vec<Slot>,
    acked_slots: usize,
    /// Live messages published after a higher id: compaction copies whose original
    /// segment is gone. Few, merged in at the end.
    out_of_order: FxHashMap<MessageId, Slot>,
    /// One shared name per queue: every record decodes its own, and a million live
    /// messages would otherwise hold a million copies until they are restored.
    queues: HashSet<QueueName>,
    next_id: u64,
    records: u64,
}

/// A message during replay; `acked` marks a slot to sweep.
struct Slot {
    id: MessageId,
    queue: QueueName,
    payload: Payload,
    deliveries: u32,
    published_at_ms: u64,
    due_ms: Option<u64>,
    priority: u8,
    attributes: Option<Attributes>,
    dead_letter: Option<DeadLetter>,
    acked: bool,
    segment: u64,
}

impl Slot {
    fn into_message(self) -> RecoveredMessage {
        RecoveredMessage {
            id: self.id,
            queue: self.queue,
            payload: self.payload,
            deliveries: self.deliveries,
            published_at_ms: self.published_at_ms,
            due_ms: self.due_ms,
            priority: self.priority,
            attributes: self.attributes,
            dead_letter: self.dead_letter,
            segment: self.segment,
        }
    }
}

/// Marked slots are swept once there are more of them than this and than live ones.
const SWEEP_AFTER_ACKED: usize = 4096;

impl Replay {
    /// Applies a record found in `segment`.
    fn apply(&mut self, record: Record, segment: u64) {
        self.records += 1;
        match record {
            Record::Publish {
                id,
                deliveries,
                published_at_ms,
                due_ms,
                priority,
                queue,
                payload,
                attributes,
                mut dead_letter,
            } => {
                self.next_id = self.next_id.max(id.0.saturating_add(1));
                let queue = self.shared_name(queue);
                if let Some(record) = &mut dead_letter {
                    record.queue = self.shared_name(record.queue.clone());
                }
                self.publish(Slot {
                    id,
                    queue,
                    payload,
                    deliveries,
                    published_at_ms,
                    due_ms,
                    priority,
                    attributes,
                    dead_letter,
                    acked: false,
                    segment,
                });
            }
            Record::Delivered(ids) => {
                for id in ids {
                    if let Some(slot) = self.live_mut(id) {
                        slot.deliveries = slot.deliveries.saturating_add(1);
                    }
                }
            }
            Record::Acked(ids) => {
                for id in ids {
                    self.ack(id);
                }
            }
            Record::Sealed | Record::Synced(_) => {}
        }
    }

    /// `name`, sharing one allocation with every other mention of it.
    fn shared_name(&mut self, name: QueueName) -> QueueName {
        match self.queues.get(&name) {
            Some(shared) => shared.clone(),
            None => {
                self.queues.insert(name.clone());
                name
            }
        }
    }

    /// A publish record: a new message, or a later copy of one (which replaces it).
    fn publish(&mut self, slot: Slot) {
        if self.in_order.last().is_none_or(|last| last.id < slot.id) {
            // An earlier copy may have come out of order (before later ids were swept
            // from `in_order`): this one replaces it.
            if !self.out_of_order.is_empty() {
                self.out_of_order.remove(&slot.id);
            }
            self.in_order.push(slot);
            return;
        }
        match self.find(slot.id) {
            Ok(at) => {
                if self.in_order[at].acked {
                    self.acked_slots -= 1;
                }
                self.in_order[at] = slot;
            }
            Err(_) => {
                self.out_of_order.insert(slot.id, slot);
            }
        }
    }

    /// Where `id` is in `in_order`, or where it would go.
    fn find(&self, id: MessageId) -> Result<usize, usize> {
        self.in_order.binary_search_by_key(&id, |slot| slot.id)
    }

    fn live_mut(&mut self, id: MessageId) -> Option<&mut Slot> {
        match self.find(id) {
            Ok(at) => Some(&mut self.in_order[at]).filter(|slot| !slot.acked),
            Err(_) => self.out_of_order.get_mut(&id),
        }
    }

    fn ack(&mut self, id: MessageId) {
        match self.find(id) {
            Ok(at) if !self.in_order[at].acked => {
                self.in_order[at].acked = true;
                self.acked_slots += 1;
                let live = self.in_order.len() - self.acked_slots;
                if self.acked_slots > SWEEP_AFTER_ACKED.max(live) {
                    self.in_order.retain(|slot| !slot.acked);
                    self.acked_slots = 0;
                }
            }
            Ok(_) => {}
            Err(_) => {
                self.out_of_order.remove(&id);
            }
        }
    }

    /// The live messages in id order.
    fn into_messages(self) -> Vec<RecoveredMessage> {
        // Same size as a slot: collected in place, without a second vector.
        let mut messages: Vec<RecoveredMessage> = self
            .in_order
            .into_iter()
            .filter(|slot| !slot.acked)
            .map(Slot::into_message)
            .collect();
        if !self.out_of_order.is_empty() {
            messages.extend(self.out_of_order.into_values().map(Slot::into_message));
            messages.sort_unstable_by_key(|m| m.id);
        }
        messages
    }
}

/// How much of a segment recovery reads at a time. Reading a segment whole would hold up
/// to `--segment-size` bytes beside everything replay has built.
const READ_CHUNK_BYTES: usize = 1 << 20;

/// Replays the log in `backend`, truncating a torn tail.
///
/// # Errors
/// [`RecoveryError`] when a segment cannot be read, or is damaged anywhere but at the
/// end of the log (unless `repair`).
pub fn recover(backend: &Segments, repair: bool) -> Result<Recovered, RecoveryError> {
    recover_in_chunks(backend, repair, READ_CHUNK_BYTES)
}

/// [`recover`], reading segments `chunk` bytes at a time (tests use tiny chunks, so that
/// records and headers straddle them).
pub(crate) fn recover_in_chunks(
    backend: &Segments,
    repair: bool,
    chunk: usize,
) -> Result<Recovered, RecoveryError> {
    let numbers = backend.list_segments()?;
    let mut replay = Replay {
        in_order: Vec::new(),
        acked_slots: 0,
        out_of_order: FxHashMap::default(),
        queues: HashSet::new(),
        next_id: 1,
        records: 0,
    };
    let mut recovered = Recovered {
        highest_segment: numbers.last().copied(),
        ..Recovered::default()
    };
    for (index, &number) in numbers.iter().enumerate() {
        let last = index + 1 == numbers.len();
        let mut window = SegmentWindow::open(backend, number, chunk)?;
        let segment = backend.describe(number);
        while window.end() < record::HEADER_BYTES && window.read_more(0)? {}
        let header_bytes = window.from(0);
        let header = match SegmentHeader::decode(header_bytes) {
            Ok(header) if header.number == number => header,
            Err(HeaderError::Short(len)) if last => {
                // Created, then the crash came before its header was durable: it holds
                // nothing. Removed, so that it is not left behind in the middle.
                warn!(%segment, len, "last segment has no complete header: a torn creation; removing it");
                backend.remove_segment(number)?;
                backend.sync_dir()?;
                recovered.truncated_bytes += len as u64;
                continue;
            }
            Err(HeaderError::BadMagic(_))
                if last
                    && header_bytes[..record::HEADER_BYTES].iter().all(|&b| b == 0)
                    && holds_no_record_of(&mut window, number)? =>
            {
                // The same, when the file's length reached the disk before its header
                // did (or it was a zero-filled spare): zeroes where the header belongs,
                // and no record of its own after them.
                warn!(%segment, "last segment's header is all zeroes and no record follows: a torn creation; removing it");
                backend.remove_segment(number)?;
                backend.sync_dir()?;
                continue;
            }
            decoded @ (Ok(_) | Err(HeaderError::BadChecksum))
                if last
                    && decoded.as_ref().map_or(true, |old| old.number < number)
                    && holds_no_record_of(&mut window, number)? =>
            {
                // A reused file, and the crash came before its new header was durable:
                // what is there is the old header (a segment's, so the magic and a version
                // this build reads), or a mix of the two, whose checksum fails. Its records
                // are only ever written after the header is synced, so it holds nothing,
                // and the absence of any record of its own shows this is no damaged header
                // of a segment with data. Removed, as a torn creation is.
                let found = decoded.map(|header| header.number);
                warn!(%segment, ?found, "last segment has the header of its file's previous segment, or a torn one, and no record: a torn start of a reused file; removing it");
                backend.remove_segment(number)?;
                backend.sync_dir()?;
                continue;
            }
            Ok(header) => {
                let problem = HeaderError::BadChecksum;
                error!(%segment, found = header.number, "segment header names another segment");
                if !repair {
                    return Err(RecoveryError::Header { segment, problem });
                }
                recovered.skipped_bytes += window.length()? as u64;
                continue;
            }
            Err(problem) => {
                if !repair {
                    return Err(RecoveryError::Header { segment, problem });
                }
                let bytes = window.length()?;
                error!(%segment, %problem, bytes, "--repair: skipping the whole segment");
                recovered.skipped_bytes += bytes as u64;
                continue;
            }
        };
        replay.next_id = replay.next_id.max(header.next_id);
        let mut offset = record::HEADER_BYTES;
        loop {
            if offset >= window.end() {
                if window.read_more(offset)? {
                    continue;
                }
                break;
            }
            let problem = match record::decode_record(window.from(offset), &header) {
                Decoded::Record(Record::Sealed, used) => {
                    // The segment ended cleanly; anything after is a reused file's old
                    // contents.
                    offset += used;
                    break;
                }
                Decoded::Record(record, used) => {
                    replay.apply(record, number);
                    offset += used;
                    continue;
                }
                Decoded::Incomplete if window.read_more(offset)? => continue,
                Decoded::Incomplete => "a record cut short",
                Decoded::Corrupt(problem) => problem,
            };
            // Damage is judged by what follows it, up to the end of the segment.
            let next_valid = find_valid_record(&mut window, offset + 1, &header)?;
            let torn = last
                && match next_valid {
                    None => true,
                    Some(at) => {
                        header.version >= record::SYNCED_RECORDS_VERSION
                            && !synced_past(backend, number, chunk, &header, at, offset)?
                    }
                };
            if torn {
                let length = window.length()?;
                let cut = length - offset;
                warn!(%segment, offset, cut, problem, "the log ends here; what follows is a write torn by a crash (anything after the last sync), or the old contents of a reused file: cutting it");
                backend.truncate_segment(number, offset as u64)?;
                recovered.truncated_bytes += cut as u64;
                break;
            }
            // Read to the end when nothing valid follows.
            let end = window.end();
            match next_valid {
                _ if !repair => {
                    return Err(RecoveryError::Corrupt {
                        segment,
                        offset,
                        problem,
                    });
                }
                next => {
                    let resume = next.unwrap_or(end);
                    error!(%segment, offset, skipped = resume - offset, problem, "--repair: skipping damaged bytes; the messages in them are lost");
                    recovered.skipped_bytes += (resume - offset) as u64;
                    offset = resume;
                }
            }
        }
        recovered.segments.push(RecoveredSegment {
            number,
            bytes: offset as u64,
            first_id: header.next_id,
        });
    }
    recovered.next_id = replay.next_id;
    recovered.records = replay.records;
    recovered.messages = replay.into_messages();
    Ok(recovered)
}

/// Whether a synced record at or after file offset `from` (where a valid record starts)
/// says that the bytes at `damage` were durable: then the damage is not a torn write but
/// stable data altered. Reads the segment with a window of its own, so that the caller's
/// keeps what it holds.
fn synced_past(
    backend: &Segments,
    number: u64,
    chunk: usize,
    header: &SegmentHeader,
    from: usize,
    damage: usize,
) -> std::io::Result<bool> {
    let mut window = SegmentWindow::open(backend, number, chunk)?;
    while window.end() <= from && window.read_more(window.end())? {}
    if window.end() < from {
        return Ok(false);
    }
    let mut at = from;
    while let Some(found) = find_valid_record(&mut window, at, header)? {
        match record::decode_record(window.from(found), header) {
            Decoded::Record(Record::Synced(offset), _) if offset > damage as u64 => {
                return Ok(true);
            }
            Decoded::Record(_, used) => at = found + used,
            // Not reached: what was found valid decodes the same way again.
            Decoded::Incomplete | Decoded::Corrupt(_) => at = found + 1,
        }
    }
    Ok(false)
}

/// Whether a segment, in `window` from its start, has no valid record of segment
/// `number` anywhere.
fn holds_no_record_of(window: &mut SegmentWindow, number: u64) -> std::io::Result<bool> {
    let header = SegmentHeader::new(number, 0);
    Ok(find_valid_record(window, 0, &header)?.is_none())
}

/// The file offset of the first valid record at or after `from` (which the window
/// holds), reading the segment on as needed; `None` once it is read to its end. The window
/// lets go of what lies before each candidate: in a reused file, what follows the damage
/// can be a whole segment of old contents, and holding it all cost 64 MiB of fresh memory
/// and 300-600 ms of page faults on this project's VM.
fn find_valid_record(
    window: &mut SegmentWindow,
    from: usize,
    header: &SegmentHeader,
) -> std::io::Result<Option<usize>> {
    let mut at = from;
    loop {
        let read_all = window.at_end;
        match scan_for_record(window.from(at), header, read_all) {
            Scan::Found(found) => return Ok(Some(at + found)),
            Scan::NotFound => return Ok(None),
            Scan::ReadOn(undecided) => {
                at += undecided;
                // At the end, the next round judges what is left as it is.
                window.read_more(at)?;
            }
        }
    }
}

/// What [`scan_for_record`] found in the bytes it was given.
#[derive(Debug, PartialEq, Eq)]
enum Scan {
    /// A valid record starts here.
    Found(usize),
    /// No valid record starts anywhere in the bytes, which are all there is.
    NotFound,
    /// None starts before this offset; whether one starts here or later needs the bytes
    /// after those given.
    ReadOn(usize),
}

/// Looks for the first valid record in `bytes`; `complete` when nothing follows them.
///
/// A record of a version 2 segment carries the segment's tag at a fixed place, so only
/// where the tag occurs can one start: a search for it (memchr's vectorised `memmem`)
/// skips the rest, which in a reused file is up to a whole segment of old records. Trying
/// every offset of a 64 MiB reused file took a second.
///
/// Without a tag (version 1), or with an all-zero one (segment 2^32), a valid record's
/// length is never zero, so it starts at most three bytes before a non-zero byte: runs of
/// zeroes (a tail of zeroes, as a crash can leave when a file's size reached the disk
/// before its data) are skipped at memory speed.
fn scan_for_record(bytes: &[u8], header: &SegmentHeader, complete: bool) -> Scan {
    // Judges a candidate: `Some` when that settles the scan.
    let judge = |at: usize| match record::decode_record(&bytes[at..], header) {
        Decoded::Record(..) => Some(Scan::Found(at)),
        Decoded::Incomplete if !complete => Some(Scan::ReadOn(at)),
        Decoded::Incomplete | Decoded::Corrupt(_) => None,
    };
    // Where candidates the scan could not see begin, if more bytes may follow.
    let rest_from = |unseen: usize| {
        if complete {
            Scan::NotFound
        } else {
            Scan::ReadOn(unseen)
        }
    };
    if let Some(tag) = header.record_tag().filter(|tag| *tag != [0; 4]) {
        let tag_end = record::RECORD_TAG_OFFSET + tag.len();
        let searched = bytes.get(record::RECORD_TAG_OFFSET..).unwrap_or_default();
        return memchr::memmem::find_iter(searched, &tag)
            .find_map(judge)
            .unwrap_or_else(|| rest_from(bytes.len().saturating_sub(tag_end - 1)));
    }
    let mut at = 0;
    while at < bytes.len() {
        let Some(nonzero) = bytes[at..].iter().position(|&b| b != 0) else {
            let unseen = bytes.len().saturating_sub(record::RECORD_LENGTH_BYTES - 1);
            return rest_from(unseen.max(at));
        };
        at = at.max((at + nonzero).saturating_sub(record::RECORD_LENGTH_BYTES - 1));
        if let Some(settled) = judge(at) {
            return settled;
        }
        at += 1;
    }
    rest_from(at)
}

/// A segment read a chunk at a time, holding the bytes from `start` on.
struct SegmentWindow {
    reader: Box<dyn Read + Send>,
    bytes: Vec<u8>,
    /// The file offset of `bytes[0]`.
    start: usize,
    at_end: bool,
    chunk: usize,
}

impl SegmentWindow {
    fn open(backend: &Segments, number: u64, chunk: usize) -> std::io::Result<Self> {
        Ok(SegmentWindow {
            reader: backend.open_segment(number)?,
            bytes: Vec::new(),
            start: 0,
            at_end: false,
            chunk: chunk.max(1),
        })
    }

    /// The bytes read so far from file offset `offset` (at least `start`) on.
    fn from(&self, offset: usize) -> &[u8] {
        &self.bytes[offset - self.start..]
    }

    /// The file offset one past the last byte read so far.
    fn end(&self) -> usize {
        self.start + self.bytes.len()
    }

    /// Reads up to another chunk, first letting go of the bytes before `keep_from`.
    /// Returns false when the segment has no more bytes.
    fn read_more(&mut self, keep_from: usize) -> std::io::Result<bool> {
        if self.at_end {
            return Ok(false);
        }
        self.bytes.drain(..keep_from - self.start);
        self.start = keep_from;
        // Grows the buffer only as bytes arrive: a small segment costs a small buffer.
        let read = (&mut self.reader)
            .take(self.chunk as u64)
            .read_to_end(&mut self.bytes)?;
        if read < self.chunk {
            self.at_end = true;
        }
        Ok(read > 0)
    }

    /// Reads the rest of the segment, keeping what is held, and returns its length.
    fn length(&mut self) -> std::io::Result<usize> {
        while self.read_more(self.start)? {}
        Ok(self.end())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The segment the scanned bytes are in (as version 2, version 1, or with the
    /// all-zero tag of segment `SEGMENT << 32`); the records of [`OLDER_SEGMENT`] in them
    /// are a reused file's old contents.
    const SEGMENT: u64 = 7;
    const OLDER_SEGMENT: u64 = 5;

    /// What [`scan_for_record`] and [`find_valid_record`] must find: the first offset that
    /// decodes, trying each.
    fn first_record_trying_every_offset(
        bytes: &[u8],
        from: usize,
        header: &SegmentHeader,
    ) -> Option<usize> {
        (from..bytes.len()).find(|&at| {
            matches!(
                record::decode_record(&bytes[at..], header),
                Decoded::Record(..)
            )
        })
    }

    /// Runs of zeroes, random bytes, and whole records of this segment or an older one,
    /// some of whose lengths start with a zero byte: 256 and 512 (a 239- or 495-character
    /// text is a 241- or 497-byte JSON string, after 15 bytes of kind, id, deliveries and
    /// queue name).
    fn piece() -> impl Strategy<Value = Vec<u8>> {
        let segment = || prop_oneof![Just(SEGMENT), Just(OLDER_SEGMENT), Just(SEGMENT << 32)];
        let queue = QueueName::new("q").expect("a valid name");
        prop_oneof![
            (1usize..40).prop_map(|zeroes| vec![0; zeroes]),
            prop::collection::vec(any::<u8>(), 1..12),
            (
                segment(),
                any::<u64>(),
                prop_oneof![0usize..20, Just(239usize), Just(495usize)]
            )
                .prop_map(move |(segment, id, text_len)| {
                    let mut bytes = Vec::new();
                    let payload = Payload::from_text(&"p".repeat(text_len));
                    record::encode_publish(
                        &mut bytes,
                        segment,
                        &crate::storage::LiveMessage::new(MessageId(id), 0, &queue, &payload, None),
                    );
                    bytes
                }),
            (segment(), any::<u64>()).prop_map(|(segment, id)| {
                let mut bytes = Vec::new();
                record::encode_acked(&mut bytes, segment, &[MessageId(id)]);
                bytes
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]
        #[test]
        fn scanning_finds_the_record_trying_every_offset_finds(
            pieces in prop::collection::vec(piece(), 0..16),
            from in 0usize..80,
            scanned_as in prop_oneof![
                Just(SegmentHeader::new(SEGMENT, 1)),
                // All-zero tag: the search for zero runs instead.
                Just(SegmentHeader::new(SEGMENT << 32, 1)),
                Just(SegmentHeader { version: 1, ..SegmentHeader::new(SEGMENT, 1) }),
            ],
            chunk in 1usize..64,
        ) {
            let bytes = pieces.concat();
            let from = from.min(bytes.len());
            let header = scanned_as;
            let expected = first_record_trying_every_offset(&bytes, from, &header);
            let whole = match scan_for_record(&bytes[from..], &header, true) {
                Scan::Found(at) => Some(from + at),
                Scan::NotFound => None,
                Scan::ReadOn(at) => panic!("asked to read on at {at} after the end"),
            };
            prop_assert_eq!(whole, expected);
            if let Some(at) = expected {
                prop_assert!(
                    !matches!(
                        record::decode_record(&bytes[at..], &SegmentHeader::new(OLDER_SEGMENT, 1)),
                        Decoded::Record(..)
                    ),
                    "a record of the older segment is never taken for one of this segment"
                );
            }
            // The same, read from a segment a few bytes at a time.
            let disk = super::super::backend::SimFs::default();
            disk.put(&super::super::segments::segment_file_name(1), &bytes);
            let backend = Segments::new(std::sync::Arc::new(disk), 1 << 20);
            let mut window = SegmentWindow::open(&backend, 1, chunk).unwrap();
            while window.end() < from && window.read_more(0).unwrap() {}
            let streamed = find_valid_record(&mut window, from, &header).unwrap();
            prop_assert_eq!(streamed, expected);
        }
    }
}
