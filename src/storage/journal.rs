//! The core task's side of the log: it encodes records as the core changes, submits
//! them once per turn as a numbered batch to the writer, and watches how far the log is
//! durable. It also keeps the log's size in check. Segments roll over at
//! `segment_bytes`, each ended by a sealed record. The journal counts, per segment, the
//! live messages whose latest publish record is in it; once the oldest segments hold
//! none (every publish in them acked, or copied forward), they are removed, so a queue
//! consumed in order keeps the log at its unacked messages plus about two segments, with
//! nothing rewritten. When long-lived messages pin old segments and the log grows past
//! twice its live bytes plus two segments, compaction copies the live messages of the
//! oldest segment forward: one segment at a time, each once the previous one is durable,
//! so the stall it causes is bounded by a segment rather than by everything live. Only
//! whole prefixes of the log are removed, which keeps recovery a plain replay: an ack
//! record never goes while the publish it cancels remains.
//!
//! With `--fsync always`, each batch also says, in a synced record, how far the active
//! segment was durable when it was logged (the end of the latest batch announced
//! durable), whenever that has moved on; and when the log goes idle, one batch of a
//! synced record alone says it of the last batch (a batch of a synced record alone
//! never calls for another, so an idle log is written to once). After a power loss,
//! recovery cuts damage in the last segment that no synced record vouches for as a torn
//! write, valid records after it or not; damage a synced record vouches for is stable
//! data altered, and refused. With `--fsync never` nothing is ever vouched for.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, Sender};
use std::thread::JoinHandle;

use rustc_hash::FxHashMap;
use tokio::sync::watch;

use super::record::{self, SegmentHeader};
use super::recovery::Recovered;
use super::writer::{Batch, Command, Durability};
use crate::protocol::{Attributes, DeadLetter, MessageId, Payload, QueueName};

pub struct Journal {
    /// Records of the current turn, not yet a command.
    buffer: Vec<u8>,
    /// Commands of the current turn, not yet submitted.
    commands: Vec<Command>,
    batches: Option<Sender<Batch>>,
    /// Buffers the writer has written and handed back, for the next turns' records.
    spare_buffers: Receiver<Vec<u8>>,
    writer: Option<JoinHandle<()>>,
    durable: watch::Receiver<Durability>,
    /// Sequence number the next submitted batch gets.
    next_seq: u64,
    /// Something waits for the next batch to be durable, so it is submitted even if no
    /// record is logged for it.
    next_awaited: bool,
    /// Segments in the log, oldest first; the last is the active one.
    segments: VecDeque<SegmentUsage>,
    /// The segment of each live message that compaction copied forward or a move to a
    /// dead-letter queue logged again. Every other live message is where it was first
    /// published, which the segments' id ranges tell: the index costs memory only for the
    /// messages that outlive their segment and for dead letters (whose share the core
    /// counts in `DEAD_LETTER_BYTES`).
    copied: FxHashMap<MessageId, u64>,
    /// Bytes in all segments, the active one included.
    total_bytes: u64,
    /// Bytes of the latest publish records of the live messages: what the log would hold
    /// if compacted perfectly. Counted from the records themselves (queue names included),
    /// so that compaction, once done, no longer finds itself due.
    live_bytes: u64,
    segment_bytes: u64,
    /// One more than the highest id logged, for the next segment header.
    next_id: u64,
    /// Batches submitted and not yet known durable: (sequence number, segment, its bytes
    /// after the batch, whether it held only a synced record).
    submitted_ends: VecDeque<(u64, u64, u64, bool)>,
    /// Whether synced records are written: only when syncs happen (`--fsync always`).
    vouches: bool,
    /// How far a segment is known durable: (segment, bytes), from the batches announced
    /// durable; and the same for what the last synced record said.
    durable_end: (u64, u64),
    marked_end: (u64, u64),
    /// The batch holding the latest compaction's copies. The next compaction waits until
    /// it is durable, so compaction takes turns with the rest of the traffic instead of
    /// queueing a whole backlog of copies in front of it.
    last_compaction: u64,
    /// Keeps other brokers out of the directory while the journal lives.
    _dir_lock: Option<nix::fcntl::Flock<std::fs::File>>,
}

/// The journal's ends of the channels to the writer thread, and the thread itself.
pub(crate) struct WriterLink {
    pub batches: Sender<Batch>,
    /// Buffers the writer is done with, to fill again.
    pub spare_buffers: Receiver<Vec<u8>>,
    pub writer: JoinHandle<()>,
    pub durable: watch::Receiver<Durability>,
}

/// A segment of the log and how much of it is still needed.
struct SegmentUsage {
    number: u64,
    bytes: u64,
    /// The next id when it was started: messages first published in it have ids from
    /// here up to the next segment's `first_id`.
    first_id: u64,
    /// Live messages whose latest publish record is in it.
    live: u64,
}

/// A live message, as the log records it (published, copied forward, moved or delayed).
#[derive(Debug, Clone, Copy)]
pub struct LiveMessage<'a> {
    pub id: MessageId,
    pub deliveries: u32,
    /// Milliseconds since the Unix epoch.
    pub published_at_ms: u64,
    /// When it is due, if it is delayed.
    pub due_ms: Option<u64>,
    pub priority: u8,
    pub queue: &'a QueueName,
    pub payload: &'a Payload,
    pub attributes: Option<&'a Attributes>,
    pub dead_letter: Option<&'a DeadLetter>,
}

#[cfg(test)]
impl<'a> LiveMessage<'a> {
    /// A message as tests log it: published at an unknown time (0), not delayed,
    /// priority 0.
    pub fn new(
        id: MessageId,
        deliveries: u32,
        queue: &'a QueueName,
        payload: &'a Payload,
        dead_letter: Option<&'a DeadLetter>,
    ) -> LiveMessage<'a> {
        LiveMessage {
            id,
            deliveries,
            published_at_ms: 0,
            due_ms: None,
            priority: 0,
            queue,
            payload,
            attributes: None,
            dead_letter,
        }
    }
}

impl Journal {
    /// A journal writing to `active` (already created with its header), after the log
    /// that recovery found.
    pub(crate) fn new(
        link: WriterLink,
        recovered: &Recovered,
        active: u64,
        segment_bytes: u64,
        vouches: bool,
    ) -> Journal {
        let mut segments: VecDeque<SegmentUsage> = recovered
            .segments
            .iter()
            .map(|segment| SegmentUsage {
                number: segment.number,
                bytes: segment.bytes,
                first_id: segment.first_id,
                live: 0,
            })
            .collect();
        segments.push_back(SegmentUsage {
            number: active,
            bytes: record::HEADER_BYTES as u64,
            first_id: recovered.next_id,
            live: 0,
        });
        let mut journal = Journal {
            buffer: Vec::new(),
            commands: Vec::new(),
            batches: Some(link.batches),
            spare_buffers: link.spare_buffers,
            writer: Some(link.writer),
            durable: link.durable,
            next_seq: 1,
            next_awaited: false,
            total_bytes: segments.iter().map(|s| s.bytes).sum(),
            live_bytes: recovered
                .messages
                .iter()
                .map(|m| {
                    record::live_record_bytes(
                        &m.queue,
                        &m.payload,
                        m.attributes.as_ref(),
                        m.dead_letter.as_ref(),
                    )
                })
                .sum(),
            segments,
            copied: FxHashMap::default(),
            segment_bytes,
            next_id: recovered.next_id,
            last_compaction: 0,
            submitted_ends: VecDeque::new(),
            vouches,
            durable_end: (0, 0),
            marked_end: (0, 0),
            _dir_lock: None,
        };
        for message in &recovered.messages {
            let index = journal.index_of(message.segment);
            if journal.first_published_in(message.id) != index {
                journal.copied.insert(message.id, message.segment);
            }
            if let Some(index) = index {
                journal.count_live(index, 1);
            }
        }
        journal
    }

    pub(crate) fn hold_dir_lock(&mut self, lock: nix::fcntl::Flock<std::fs::File>) {
        self._dir_lock = Some(lock);
    }

    /// Logs a message published (a new id), or copied forward (an id logged before).
    pub fn log_publish(&mut self, message: &LiveMessage<'_>) {
        let id = message.id;
        let record_bytes = record::live_record_bytes(
            message.queue,
            message.payload,
            message.attributes,
            message.dead_letter,
        ) as usize;
        let segment = self.roll_over_before(record_bytes);
        record::encode_publish(&mut self.buffer, segment, message);
        // Its confirm and its delivery, or the next compaction, wait for it.
        self.next_awaited = true;
        if id.0 >= self.next_id {
            // A new message: ids are logged in the order they are issued.
            self.next_id = id.0 + 1;
            self.live_bytes += record_bytes as u64;
        } else {
            // A live message copied forward.
            if let Some(from) = self.current_segment(id) {
                self.count_live(from, -1);
            }
            self.copied.insert(id, self.active().number);
        }
        self.count_live(self.segments.len() - 1, 1);
    }

    /// Logs a live message again as it is now: moved into another queue (dead-lettered,
    /// with its new record), or delayed by a nack (with its due time and deliveries). Its
    /// records took `replaced_bytes` before (see [`record::live_record_bytes`]).
    pub fn log_rewritten(&mut self, message: &LiveMessage<'_>, replaced_bytes: u64) {
        self.log_publish(message);
        self.forget_live_bytes(replaced_bytes);
        self.live_bytes += record::live_record_bytes(
            message.queue,
            message.payload,
            message.attributes,
            message.dead_letter,
        );
    }

    pub fn log_delivered(&mut self, ids: &[MessageId]) {
        if !ids.is_empty() {
            let segment = self.roll_over_before(record::ids_record_bytes(ids.len()));
            record::encode_delivered(&mut self.buffer, segment, ids);
        }
    }

    /// Logs acks of the messages `ids`, whose publish records took `record_bytes` in all
    /// (see [`record::live_record_bytes`]).
    pub fn log_acked(&mut self, ids: &[MessageId], record_bytes: u64) {
        self.forget_live_bytes(record_bytes);
        if !ids.is_empty() {
            let segment = self.roll_over_before(record::ids_record_bytes(ids.len()));
            record::encode_acked(&mut self.buffer, segment, ids);
            for id in ids {
                let segment = match self.copied.remove(id) {
                    Some(number) => self.index_of(number),
                    None => self.first_published_in(*id),
                };
                if let Some(segment) = segment {
                    self.count_live(segment, -1);
                }
            }
        }
    }

    /// The sequence number the records logged since the last submit will be durable as.
    pub fn pending_seq(&self) -> u64 {
        self.next_seq
    }

    /// Marks the next batch as awaited (replies wait for it) and returns its sequence
    /// number. An awaited batch is submitted at the next [`Journal::submit`] even when
    /// nothing was logged for it, so that what waits for it is released.
    pub fn await_pending(&mut self) -> u64 {
        self.next_awaited = true;
        self.next_seq
    }

    /// Hands everything logged since the last submit to the writer. Returns its sequence
    /// number, or `None` when nothing was logged and nothing awaits the batch.
    pub fn submit(&mut self) -> Option<u64> {
        let only_synced = self.buffer.is_empty() && self.commands.is_empty();
        let marked = self.mark_synced();
        self.remove_dead_prefix();
        self.seal_buffer();
        if self.commands.is_empty() && !self.next_awaited {
            return None;
        }
        let awaited = std::mem::take(&mut self.next_awaited);
        let seq = self.next_seq;
        self.next_seq += 1;
        let active = self.active();
        self.submitted_ends
            .push_back((seq, active.number, active.bytes, only_synced && marked));
        let batch = Batch {
            seq,
            commands: std::mem::take(&mut self.commands),
            awaited,
        };
        // If the writer has stopped, it has announced why on the durability channel.
        if let Some(batches) = &self.batches {
            let _ = batches.send(batch);
        }
        Some(seq)
    }

    /// How far the log is durable; changes are announced to the receiver's waiters.
    pub fn durability(&mut self) -> &mut watch::Receiver<Durability> {
        &mut self.durable
    }

    /// Whether old segments are pinned by a few live messages (the log holds more than
    /// twice what its live messages take in it, plus two segments), and the previous
    /// compaction is durable.
    /// Counts `bytes` of live records no longer live. A caller that counted differently
    /// from [`record::live_record_bytes`] is a bug; in a release build it must not wrap
    /// the count round (compaction would then never come due, and the log would grow).
    fn forget_live_bytes(&mut self, bytes: u64) {
        debug_assert!(
            bytes <= self.live_bytes,
            "more live bytes forgotten than counted"
        );
        self.live_bytes = self.live_bytes.saturating_sub(bytes);
    }

    /// Bytes the live messages' records would take compacted.
    #[cfg(test)]
    pub fn live_bytes(&self) -> u64 {
        self.live_bytes
    }

    pub fn wants_compaction(&self) -> bool {
        let previous_done = matches!(
            *self.durable.borrow(),
            Durability::Through(seq) if seq >= self.last_compaction
        );
        previous_done
            && self.segments.len() > 1
            && self.total_bytes > 2 * self.live_bytes + 2 * self.segment_bytes
    }

    /// Copies forward the live messages whose latest record is in the oldest segment, so
    /// that the next submit removes it. `live` is every live message (the journal keeps
    /// where each one is, not its contents). Returns how many were copied.
    pub fn compact_oldest<'a>(&mut self, live: impl Iterator<Item = LiveMessage<'a>>) -> usize {
        if self.segments.len() < 2 {
            return 0;
        }
        self.last_compaction = self.next_seq;
        let mut copied = 0;
        for message in live {
            // Stop as soon as the oldest segment is empty: its messages are the oldest, so
            // they tend to come first in the queues.
            if self.segments[0].live == 0 {
                break;
            }
            if self.current_segment(message.id) == Some(0) {
                self.log_publish(&message);
                copied += 1;
            }
        }
        copied
    }

    /// Ends the active segment with a sealed record, stops the writer after everything
    /// submitted is written, and waits for it. Sealed, the segment ends cleanly for the
    /// next start, even in a reused file whose old contents follow (a start would cut
    /// those, warning of a crash).
    pub fn close(mut self) {
        self.seal_active();
        self.submit();
        self.shut_down();
    }

    fn shut_down(&mut self) {
        self.batches = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }

    /// Adds a synced record to the batch about to be submitted when the active segment
    /// is known durable further than its last synced record said (by a batch that held
    /// more than a synced record) and it fits without a rotation; says whether it did.
    fn mark_synced(&mut self) -> bool {
        if let Durability::Through(durable) = *self.durable.borrow() {
            while let Some(&(seq, segment, end, only_synced)) = self.submitted_ends.front() {
                if seq > durable {
                    break;
                }
                self.submitted_ends.pop_front();
                if !only_synced {
                    self.durable_end = (segment, end);
                }
            }
        }
        let active = self.active();
        let (segment, end) = self.durable_end;
        if !self.vouches
            || segment != active.number
            || (segment, end) <= self.marked_end
            || active.bytes + (record::SYNCED_RECORD_BYTES + record::SEALED_RECORD_BYTES) as u64
                > self.segment_bytes
        {
            return false;
        }
        let number = self.grow_active(record::SYNCED_RECORD_BYTES);
        record::encode_synced(&mut self.buffer, number, end);
        self.marked_end = (segment, end);
        true
    }

    /// Counts a record of `record_bytes` into the active segment, first starting the next
    /// one if the record and the sealed record after it would not fit. Returns the number
    /// of the segment the record goes in: records carry it.
    fn roll_over_before(&mut self, record_bytes: usize) -> u64 {
        let active = self.active();
        if active.bytes > record::HEADER_BYTES as u64
            && active.bytes + (record_bytes + record::SEALED_RECORD_BYTES) as u64
                > self.segment_bytes
        {
            self.start_segment();
        }
        self.grow_active(record_bytes)
    }

    /// Counts `bytes` more in the active segment; returns its number.
    fn grow_active(&mut self, bytes: usize) -> u64 {
        let active = self.segments.back_mut().expect("the active segment");
        active.bytes += bytes as u64;
        self.total_bytes += bytes as u64;
        active.number
    }

    fn seal_active(&mut self) {
        let segment = self.grow_active(record::SEALED_RECORD_BYTES);
        record::encode_sealed(&mut self.buffer, segment);
    }

    fn start_segment(&mut self) {
        self.seal_active();
        self.seal_buffer();
        let number = self.active().number + 1;
        self.commands
            .push(Command::Rotate(SegmentHeader::new(number, self.next_id)));
        self.segments.push_back(SegmentUsage {
            number,
            bytes: record::HEADER_BYTES as u64,
            first_id: self.next_id,
            live: 0,
        });
        self.total_bytes += record::HEADER_BYTES as u64;
    }

    fn active(&self) -> &SegmentUsage {
        self.segments.back().expect("the active segment")
    }

    /// Where in `segments` the segment with this number is.
    fn index_of(&self, number: u64) -> Option<usize> {
        self.segments
            .binary_search_by_key(&number, |s| s.number)
            .ok()
    }

    /// Where in `segments` the segment a message was first published in is, from the
    /// segments' id ranges.
    fn first_published_in(&self, id: MessageId) -> Option<usize> {
        let after = self.segments.partition_point(|s| s.first_id <= id.0);
        after.checked_sub(1)
    }

    /// Where in `segments` the segment holding a live message's latest publish record is.
    fn current_segment(&self, id: MessageId) -> Option<usize> {
        match self.copied.get(&id) {
            Some(&number) => self.index_of(number),
            None => self.first_published_in(id),
        }
    }

    fn count_live(&mut self, index: usize, change: i64) {
        let segment = &mut self.segments[index];
        segment.live = segment
            .live
            .checked_add_signed(change)
            .expect("live counts follow publishes and acks");
    }

    /// Removes the oldest segments while nothing live is left in them.
    fn remove_dead_prefix(&mut self) {
        let mut removed = false;
        while self.segments.len() > 1 && self.segments[0].live == 0 {
            let dead = self.segments.pop_front().expect("more than one segment");
            self.total_bytes -= dead.bytes;
            removed = true;
        }
        if removed {
            // After this turn's records: the acks that emptied the segments, and the
            // copies of what compaction moved out of them, are durable before they go.
            self.seal_buffer();
            self.commands
                .push(Command::RemoveBefore(self.segments[0].number));
        }
    }

    fn seal_buffer(&mut self) {
        if !self.buffer.is_empty() {
            // Sized like the last one when no spare is back yet: growing a buffer from
            // empty costs a page fault per step.
            let next = self
                .spare_buffers
                .try_recv()
                .unwrap_or_else(|_| Vec::with_capacity(self.buffer.capacity()));
            self.commands
                .push(Command::Append(std::mem::replace(&mut self.buffer, next)));
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.shut_down();
    }
}
