//! The core task's side of the log: it encodes records as the core changes, submits
//! them once per turn as a numbered batch to the writer thread, and watches how far the
//! log is durable. It also keeps the log's size in check: segments roll over at
//! `segment_bytes`, and when the log holds more than twice what is live (plus two
//! segments), a checkpoint rewrites every live message into a fresh segment and removes
//! all older ones. Removing only whole prefixes of the log keeps recovery a plain replay:
//! an ack record is never removed while the publish it cancels remains.

use std::sync::mpsc::Sender;
use std::thread::JoinHandle;

use tokio::sync::watch;

use super::record::{self, SegmentHeader};
use super::writer::{Batch, Command, Durability};
use crate::protocol::{MessageId, Payload, QueueName};

pub struct Journal {
    /// Records of the current turn, not yet a command.
    buffer: Vec<u8>,
    /// Commands of the current turn, not yet submitted.
    commands: Vec<Command>,
    batches: Option<Sender<Batch>>,
    writer: Option<JoinHandle<()>>,
    durable: watch::Receiver<Durability>,
    /// Sequence number the next submitted batch gets.
    next_seq: u64,
    active_segment: u64,
    active_bytes: u64,
    /// Bytes in all segments, the active one included.
    total_bytes: u64,
    segment_bytes: u64,
    /// One more than the highest id logged, for the next segment header.
    next_id: u64,
    /// Keeps other brokers out of the directory while the journal lives.
    _dir_lock: Option<nix::fcntl::Flock<std::fs::File>>,
}

/// A live message, as a checkpoint rewrites it.
pub struct LiveMessage<'a> {
    pub id: MessageId,
    pub deliveries: u32,
    pub queue: &'a QueueName,
    pub payload: &'a Payload,
}

impl Journal {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        batches: Sender<Batch>,
        writer: JoinHandle<()>,
        durable: watch::Receiver<Durability>,
        active_segment: u64,
        total_bytes: u64,
        segment_bytes: u64,
        next_id: u64,
    ) -> Journal {
        Journal {
            buffer: Vec::new(),
            commands: Vec::new(),
            batches: Some(batches),
            writer: Some(writer),
            durable,
            next_seq: 1,
            active_segment,
            active_bytes: record::HEADER_BYTES as u64,
            total_bytes,
            segment_bytes,
            next_id,
            _dir_lock: None,
        }
    }

    pub(crate) fn hold_dir_lock(&mut self, lock: nix::fcntl::Flock<std::fs::File>) {
        self._dir_lock = Some(lock);
    }

    pub fn log_publish(
        &mut self,
        id: MessageId,
        deliveries: u32,
        queue: &QueueName,
        payload: &Payload,
    ) {
        self.roll_over_before(record::publish_record_bytes(queue, payload));
        record::encode_publish(&mut self.buffer, id, deliveries, queue, payload);
        self.next_id = self.next_id.max(id.0 + 1);
    }

    pub fn log_delivered(&mut self, ids: &[MessageId]) {
        if !ids.is_empty() {
            self.roll_over_before(record::RECORD_PREFIX_BYTES + 1 + ids.len() * 8);
            record::encode_delivered(&mut self.buffer, ids);
        }
    }

    pub fn log_acked(&mut self, ids: &[MessageId]) {
        if !ids.is_empty() {
            self.roll_over_before(record::RECORD_PREFIX_BYTES + 1 + ids.len() * 8);
            record::encode_acked(&mut self.buffer, ids);
        }
    }

    /// The sequence number the records logged since the last submit will be durable as.
    pub fn pending_seq(&self) -> u64 {
        self.next_seq
    }

    /// Hands everything logged since the last submit to the writer. Returns its sequence
    /// number, or `None` when nothing was logged.
    pub fn submit(&mut self) -> Option<u64> {
        self.seal_buffer();
        if self.commands.is_empty() {
            return None;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let batch = Batch {
            seq,
            commands: std::mem::take(&mut self.commands),
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

    /// Whether the log has grown to more than twice its live content plus two segments.
    pub fn needs_checkpoint(&self, live_bytes: u64) -> bool {
        self.total_bytes > 2 * live_bytes + 2 * self.segment_bytes
    }

    /// Starts a new segment holding every live message, then removes all older segments
    /// once that is durable. `next_id` is the id the core will give next.
    pub fn checkpoint<'a>(&mut self, next_id: u64, live: impl Iterator<Item = LiveMessage<'a>>) {
        self.next_id = self.next_id.max(next_id);
        self.start_segment();
        let checkpoint_segment = self.active_segment;
        // Everything before the checkpoint is about to go.
        self.total_bytes = self.active_bytes;
        for message in live {
            self.log_publish(
                message.id,
                message.deliveries,
                message.queue,
                message.payload,
            );
        }
        self.seal_buffer();
        self.commands
            .push(Command::RemoveBefore(checkpoint_segment));
    }

    /// Stops the writer after everything submitted is written, and waits for it.
    pub fn close(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        self.batches = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }

    fn roll_over_before(&mut self, record_bytes: usize) {
        let record_bytes = record_bytes as u64;
        if self.active_bytes > record::HEADER_BYTES as u64
            && self.active_bytes + record_bytes > self.segment_bytes
        {
            self.start_segment();
        }
        self.active_bytes += record_bytes;
        self.total_bytes += record_bytes;
    }

    fn start_segment(&mut self) {
        self.seal_buffer();
        self.active_segment += 1;
        self.commands.push(Command::Rotate(SegmentHeader {
            number: self.active_segment,
            next_id: self.next_id,
        }));
        self.active_bytes = record::HEADER_BYTES as u64;
        self.total_bytes += record::HEADER_BYTES as u64;
    }

    fn seal_buffer(&mut self) {
        if !self.buffer.is_empty() {
            self.commands
                .push(Command::Append(std::mem::take(&mut self.buffer)));
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.shut_down();
    }
}
