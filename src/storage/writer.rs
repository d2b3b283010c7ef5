//! The thread that owns the active segment: it takes every batch the core task has
//! submitted since its last write, writes them with one vectored write per segment (the
//! record buffers as they are, never copied into one), syncs once (group commit), and
//! then announces the highest batch now durable. A lone batch is written the moment it
//! arrives; batches that arrive during a sync share the next one. (Records that nothing
//! waits for are held back by the journal, not here: a batch that reaches the writer is
//! synced at once.)
//!
//! After a failed write or sync it announces the failure and stops: the log never
//! carries on over a write it cannot vouch for (redb's `PreviousIo`).
//!
//! Record buffers go back to the journal once written, so that in a steady stream the
//! log allocates nothing per turn: a fresh buffer faults in newly zeroed pages at each
//! growth step.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender};

use tokio::sync::watch;
use tracing::{error, info};

use super::FsyncPolicy;
use super::backend::{Backend, SegmentWriter};
use super::record::SegmentHeader;

/// One step for the writer, in log order.
pub(crate) enum Command {
    Append(Vec<u8>),
    /// Seal the active segment and start this one.
    Rotate(SegmentHeader),
    /// Remove every segment numbered below this one, once everything before this command
    /// is durable.
    RemoveBefore(u64),
}

/// Commands the core task submitted together, numbered in submission order.
pub(crate) struct Batch {
    pub seq: u64,
    pub commands: Vec<Command>,
}

/// How far the log is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Durability {
    /// Every batch up to and including this sequence number is durable.
    Through(u64),
    /// A write or sync failed; nothing after the last `Through` will ever be durable.
    Failed(String),
}

pub(crate) struct Writer {
    pub backend: Arc<dyn Backend>,
    pub active: Box<dyn SegmentWriter>,
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
}

/// Buffers larger than this (a compaction's, say) are dropped rather than kept for reuse,
/// so one burst does not pin its memory for the life of the broker.
const LARGEST_SPARE_BUFFER: usize = 1 << 20;

/// Spare buffers kept for the journal: more than the turns a group commonly holds.
pub(crate) const SPARE_BUFFERS: usize = 32;

impl Writer {
    /// Runs until the journal is dropped or a write fails.
    pub fn run(mut self) {
        while let Ok(first) = self.batches.recv() {
            if let Err(e) = self.commit_group(first) {
                return self.fail(&e);
            }
        }
    }

    /// Writes `first` and every batch queued behind it, and syncs them once.
    fn commit_group(&mut self, first: Batch) -> std::io::Result<()> {
        let mut group = vec![first];
        while let Ok(more) = self.batches.try_recv() {
            group.push(more);
        }
        let last_seq = group.last().map_or(0, |batch| batch.seq);
        self.write_group(group)?;
        self.sync()?;
        let _ = self.durable.send(Durability::Through(last_seq));
        Ok(())
    }

    fn fail(&self, e: &std::io::Error) {
        error!(error = %e, "the log cannot be written; no further publish will be confirmed");
        let _ = self.durable.send(Durability::Failed(e.to_string()));
    }

    /// Writes a group's commands in order; rotations and removals sync what precedes
    /// them.
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
                    let old: Vec<u64> = self
                        .backend
                        .list_segments()?
                        .into_iter()
                        .filter(|n| *n < number)
                        .collect();
                    for segment in &old {
                        self.backend.remove_segment(*segment)?;
                    }
                    if self.fsync == FsyncPolicy::Always {
                        self.backend.sync_dir()?;
                    }
                    info!(
                        removed = old.len(),
                        "log segments removed: every message in them is acked or copied forward"
                    );
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
