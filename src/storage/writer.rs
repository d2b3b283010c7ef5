//! The thread that owns the active segment: it takes every batch the core task has
//! submitted since its last write, writes them with one vectored write per segment (the
//! record buffers as they are, never copied into one), syncs once (group commit), and
//! then announces the highest batch now durable. A lone batch is written the moment it
//! arrives; batches that arrive during a sync share the next one. Batches that nothing
//! waits for (acks and deliveries only) are written but their sync waits, up to
//! [`LAZY_SYNC_DELAY`], for the next batch something does wait for. Segments the log no
//! longer needs go to the remover thread once what replaces them is durable.
//!
//! After a failed write or sync it announces the failure and stops: the log never
//! carries on over a write it cannot vouch for (redb's `PreviousIo`).
//!
//! Record buffers go back to the journal once written, so that in a steady stream the
//! log allocates nothing per turn: a fresh buffer faults in newly zeroed pages at each
//! growth step.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::error;

use super::FsyncPolicy;
use super::backend::FileWriter;
use super::record::SegmentHeader;
use super::remover::Remover;
use super::segments::Segments;

/// One step for the writer, in log order.
pub(crate) enum Command {
    Append(Vec<u8>),
    /// Seal the active segment and start this one.
    Rotate(SegmentHeader),
    /// Remove every segment numbered below this one, once everything before this command
    /// is durable (the remover thread does the removing).
    RemoveBefore(u64),
}

/// Commands the core task submitted together, numbered in submission order.
pub(crate) struct Batch {
    pub seq: u64,
    pub commands: Vec<Command>,
    /// Something waits for this batch to be durable (a confirm, a delivery, a held reply,
    /// the shutdown). A batch nothing waits for (only acks and deliveries recorded) is
    /// written at once but may wait up to [`LAZY_SYNC_DELAY`] for its sync, so that it
    /// shares the sync of the next awaited batch instead of taking one of its own.
    pub awaited: bool,
}

/// How long a written batch that nothing waits for may stay unsynced: well inside the
/// 100 ms within which acks must reach stable storage.
const LAZY_SYNC_DELAY: Duration = Duration::from_millis(20);

/// How far the log is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Durability {
    /// Every batch up to and including this sequence number is durable.
    Through(u64),
    /// A write or sync failed; nothing after the last `Through` will ever be durable.
    Failed(String),
}

pub(crate) struct Writer {
    pub backend: Arc<Segments>,
    pub active: Box<dyn FileWriter>,
    pub fsync: FsyncPolicy,
    pub batches: Receiver<Batch>,
    pub durable: watch::Sender<Durability>,
    /// Where written record buffers go back to the journal, emptied; holds at most
    /// [`SPARE_BUFFERS`], and a buffer that finds it full is dropped.
    pub spare_buffers: SyncSender<Vec<u8>>,
    /// Record buffers of consecutive appends, written together by one vectored write.
    pub pending: Vec<Vec<u8>>,
    /// Whether the active segment has writes not yet synced.
    pub dirty: bool,
    /// Deletes the segments the log no longer needs, off this thread.
    pub remover: Remover,
}

/// Buffers larger than this (a compaction's, say) are dropped rather than kept for reuse,
/// so one burst does not pin its memory for the life of the broker.
const LARGEST_SPARE_BUFFER: usize = 1 << 20;

/// Spare buffers kept for the journal: more than the turns a group commonly holds.
pub(crate) const SPARE_BUFFERS: usize = 32;

impl Writer {
    /// Runs until the journal is dropped or a write fails.
    pub fn run(mut self) {
        // The newest batch written but not yet synced, and when it must be synced.
        let mut unsynced: Option<(u64, Instant)> = None;
        loop {
            let received = match unsynced {
                None => self
                    .batches
                    .recv()
                    .map_err(|_| RecvTimeoutError::Disconnected),
                Some((_, sync_by)) => self
                    .batches
                    .recv_timeout(sync_by.saturating_duration_since(Instant::now())),
            };
            let step = match (received, unsynced) {
                (Ok(first), _) => self.take_group(first, unsynced),
                (Err(RecvTimeoutError::Timeout), Some((seq, _))) => {
                    self.make_durable(seq).map(|()| None)
                }
                // The journal is gone (a timeout needs something unsynced).
                (Err(_), _) => break,
            };
            match step {
                Ok(next) => unsynced = next,
                Err(e) => return self.fail(&e),
            }
        }
        if let Some((seq, _)) = unsynced
            && let Err(e) = self.make_durable(seq)
        {
            self.fail(&e);
        }
    }

    /// Writes `first` and every batch queued behind it; syncs them at once if anything
    /// waits for one of them, else leaves the sync for later. Returns what is left unsynced.
    fn take_group(
        &mut self,
        first: Batch,
        unsynced: Option<(u64, Instant)>,
    ) -> std::io::Result<Option<(u64, Instant)>> {
        let mut group = vec![first];
        while let Ok(more) = self.batches.try_recv() {
            group.push(more);
        }
        let last_seq = group.last().map_or(0, |batch| batch.seq);
        let awaited = group.iter().any(|batch| batch.awaited);
        self.write_group(group)?;
        if awaited || self.fsync == FsyncPolicy::Never {
            self.make_durable(last_seq)?;
            return Ok(None);
        }
        let sync_by = unsynced.map_or_else(|| Instant::now() + LAZY_SYNC_DELAY, |(_, by)| by);
        Ok(Some((last_seq, sync_by)))
    }

    /// Syncs what is written and announces everything through `seq` durable.
    fn make_durable(&mut self, seq: u64) -> std::io::Result<()> {
        self.sync()?;
        let _ = self.durable.send(Durability::Through(seq));
        Ok(())
    }

    fn fail(&self, e: &std::io::Error) {
        error!(error = %e, "the log cannot be written; no further publish will be confirmed");
        let _ = self.durable.send(Durability::Failed(e.to_string()));
    }

    /// Writes a group's commands in order; rotations and removals sync what precedes
    /// them. Removals then go to the remover thread, so the next group need not wait.
    fn write_group(&mut self, group: Vec<Batch>) -> std::io::Result<()> {
        for command in group.into_iter().flat_map(|batch| batch.commands) {
            if let Command::Append(bytes) = command {
                self.pending.push(bytes);
                continue;
            }
            self.write_pending()?;
            match command {
                Command::Append(_) => unreachable!("appends were taken above"),
                Command::Rotate(header) => {
                    // The journal ended the active segment with a sealed record; it must be
                    // durable before the next segment exists, since recovery takes a
                    // segment that is not the last and does not end cleanly for damaged.
                    self.sync()?;
                    let mut next = self.backend.create_segment(header.number)?;
                    next.append(&[&header.encode()])?;
                    if self.fsync == FsyncPolicy::Always {
                        next.sync_data()?;
                        self.backend.sync_dir()?;
                    }
                    self.active = next;
                }
                Command::RemoveBefore(number) => {
                    // What replaces the old segments must be durable before they go.
                    self.sync()?;
                    self.remover.remove_before(number);
                }
            }
        }
        self.write_pending()
    }

    /// Writes the pending record buffers, then hands them back to the journal.
    fn write_pending(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let chunks: Vec<&[u8]> = self.pending.iter().map(Vec::as_slice).collect();
        self.active.append(&chunks)?;
        self.dirty = true;
        for mut buffer in self.pending.drain(..) {
            if buffer.capacity() <= LARGEST_SPARE_BUFFER {
                buffer.clear();
                let _ = self.spare_buffers.try_send(buffer);
            }
        }
        Ok(())
    }

    fn sync(&mut self) -> std::io::Result<()> {
        if self.dirty && self.fsync == FsyncPolicy::Always {
            self.active.sync_data()?;
        }
        self.dirty = false;
        Ok(())
    }
}
