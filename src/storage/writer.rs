//! The thread that owns the active segment: it takes every batch the core task has
//! submitted since its last write, writes them with one write per segment, syncs once
//! (group commit), and then announces the highest batch now durable. A lone batch is
//! written the moment it arrives; batches that arrive during a sync share the next one.
//!
//! After a failed write or sync it announces the failure and stops: the log never
//! carries on over a write it cannot vouch for (redb's `PreviousIo`).

use std::sync::Arc;
use std::sync::mpsc::Receiver;

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
}

impl Writer {
    /// Runs until the journal is dropped or a write fails.
    pub fn run(mut self) {
        while let Ok(first) = self.batches.recv() {
            let mut last_seq = first.seq;
            let mut group = vec![first];
            while let Ok(more) = self.batches.try_recv() {
                last_seq = more.seq;
                group.push(more);
            }
            if let Err(e) = self.write_group(group) {
                error!(error = %e, "the log cannot be written; no further publish will be confirmed");
                let _ = self.durable.send(Durability::Failed(e.to_string()));
                return;
            }
            let _ = self.durable.send(Durability::Through(last_seq));
        }
    }

    fn write_group(&mut self, group: Vec<Batch>) -> std::io::Result<()> {
        let mut dirty = false;
        // Consecutive appends go to the file as one write.
        let mut pending: Vec<u8> = Vec::new();
        for command in group.into_iter().flat_map(|batch| batch.commands) {
            if let Command::Append(bytes) = command {
                if pending.is_empty() {
                    pending = bytes;
                } else {
                    pending.extend_from_slice(&bytes);
                }
                continue;
            }
            if !pending.is_empty() {
                self.active.append(&std::mem::take(&mut pending))?;
                dirty = true;
            }
            match command {
                Command::Append(_) => unreachable!("appends were taken above"),
                Command::Rotate(header) => {
                    self.sync(&mut dirty)?;
                    let mut next = self.backend.create_segment(header.number)?;
                    next.append(&header.encode())?;
                    if self.fsync == FsyncPolicy::Always {
                        next.sync_data()?;
                        self.backend.sync_dir()?;
                    }
                    self.active = next;
                }
                Command::RemoveBefore(number) => {
                    // What replaces the old segments must be durable before they go.
                    self.sync(&mut dirty)?;
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
        if !pending.is_empty() {
            self.active.append(&pending)?;
            dirty = true;
        }
        self.sync(&mut dirty)
    }

    fn sync(&mut self, dirty: &mut bool) -> std::io::Result<()> {
        if *dirty && self.fsync == FsyncPolicy::Always {
            self.active.sync_data()?;
        }
        *dirty = false;
        Ok(())
    }
}
