//! Durable storage: the append-only log under `--data-dir` (docs/STORAGE.md).
//!
//! - [`record`]: the byte format of segments and records, with CRC32C.
//! - [`backend`]: plain file operations, on real files or a crash simulator.
//! - [`segments`]: segments as files, and the policy for making and removing them
//!   (reuse of removed segments' files, removal step by step).
//! - `writer`: the thread that writes and syncs (group commit).
//! - `remover`: the thread that deletes segments the log no longer needs.
//! - [`journal`]: what the core task calls: log records, submit a turn, watch durability.
//! - [`recovery`]: the replay at start, with torn-tail truncation and corruption checks.

pub mod backend;
pub mod journal;
pub mod record;
pub mod recovery;
mod remover;
pub mod segments;
mod writer;

#[cfg(test)]
mod tests;

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::watch;
use tracing::info;

pub use journal::{Journal, LiveMessage};
pub use recovery::{Recovered, RecoveredMessage, RecoveredSegment, RecoveryError};
pub use writer::Durability;

use backend::{FileSystem, RealFs};
use record::SegmentHeader;
use segments::Segments;

/// When the log calls fdatasync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FsyncPolicy {
    /// Before confirming a publish: confirmed messages survive a power loss.
    Always,
    /// Never: confirmed messages survive a crash of the broker process, not a power loss
    /// or an operating-system crash.
    Never,
}

impl std::fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FsyncPolicy::Always => "always",
            FsyncPolicy::Never => "never",
        })
    }
}

/// Permissions of a data dir the broker creates: messages are nobody else's business.
const DIR_MODE: u32 = 0o700;

/// Default segment size.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;

/// Where and how to keep the log.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    pub dir: PathBuf,
    pub fsync: FsyncPolicy,
    pub segment_bytes: u64,
    /// Skip damaged bytes in the middle of the log instead of refusing to start.
    pub repair: bool,
}

#[derive(Debug, Error)]
pub enum StorageError {
    #[error("data dir {dir}: {source}")]
    Dir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("data dir {0} is in use by another broker")]
    Locked(PathBuf),
    #[error(transparent)]
    Recovery(#[from] RecoveryError),
    #[error("cannot start a new segment: {0}")]
    NewSegment(std::io::Error),
}

/// An open log: the journal to write it (which holds the directory lock), and what
/// recovery found.
pub struct Storage {
    pub journal: Journal,
    pub recovered: Recovered,
    pub recovery_time: Duration,
}

impl Storage {
    /// Opens (or creates) the log in `config.dir`, recovers it and starts its writer.
    ///
    /// # Errors
    /// [`StorageError`] when the directory cannot be used, is locked by another broker,
    /// or holds a damaged log (see [`RecoveryError`]).
    pub fn open(config: &StorageConfig) -> Result<Storage, StorageError> {
        let dir_error = |source| StorageError::Dir {
            dir: config.dir.clone(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(&config.dir)
            .map_err(dir_error)?;
        let lock = lock_dir(&config.dir)?;
        let mut storage = Self::open_with(Arc::new(RealFs::new(&config.dir)), config)?;
        storage.journal.hold_dir_lock(lock);
        Ok(storage)
    }

    /// Opens the log on any file system (tests use the crash simulator).
    ///
    /// # Errors
    /// As [`Storage::open`], but for locking.
    pub fn open_with(
        fs: Arc<dyn FileSystem>,
        config: &StorageConfig,
    ) -> Result<Storage, StorageError> {
        let dir_error = |source| StorageError::Dir {
            dir: config.dir.clone(),
            source,
        };
        let backend = Arc::new(Segments::new(fs, config.segment_bytes));
        let interrupted = backend.remove_interrupted_removals().map_err(dir_error)?;
        if interrupted > 0 {
            info!(
                files = interrupted,
                "removed what was left of log segments whose removal a crash interrupted"
            );
        }
        let prepared = backend.prepare_new_log().map_err(dir_error)?;
        if prepared > 0 {
            info!(
                files = prepared,
                bytes = config.segment_bytes,
                "a new log: prepared zero-filled segment files for its first segments to write over"
            );
        }
        let started = std::time::Instant::now();
        let mut recovered = recovery::recover(&backend, config.repair)?;
        let recovery_time = started.elapsed();
        // Every start writes to a new segment, numbered after every segment file there is
        // (one that --repair skipped included); the old ones go once nothing in them is
        // live.
        let number = recovered.highest_segment.map_or(1, |highest| highest + 1);
        let header = SegmentHeader::new(number, recovered.next_id);
        let mut active = backend
            .create_segment(number)
            .map_err(StorageError::NewSegment)?;
        active
            .append(&[&header.encode()])
            .map_err(StorageError::NewSegment)?;
        if config.fsync == FsyncPolicy::Always {
            active.sync_data().map_err(StorageError::NewSegment)?;
            backend.sync_dir().map_err(StorageError::NewSegment)?;
        }
        remove_empty_segments(&backend, &mut recovered, config.fsync)
            .map_err(StorageError::NewSegment)?;
        let (batches, receiver) = std::sync::mpsc::channel();
        let (durable_tx, durable_rx) = watch::channel(writer::Durability::Through(0));
        let (spare_buffers, spare_receiver) = std::sync::mpsc::sync_channel(writer::SPARE_BUFFERS);
        let remover = remover::Remover::spawn(backend.clone(), config.fsync)
            .map_err(StorageError::NewSegment)?;
        let writer = writer::Writer {
            backend,
            active,
            fsync: config.fsync,
            batches: receiver,
            durable: durable_tx,
            spare_buffers,
            pending: Vec::new(),
            dirty: false,
            remover,
        };
        let handle = std::thread::Builder::new()
            .name("ferry-log-writer".into())
            .spawn(move || writer.run())
            .map_err(StorageError::NewSegment)?;
        let journal = Journal::new(
            journal::WriterLink {
                batches,
                spare_buffers: spare_receiver,
                writer: handle,
                durable: durable_rx,
            },
            &recovered,
            number,
            config.segment_bytes,
            config.fsync == FsyncPolicy::Always,
        );
        Ok(Storage {
            journal,
            recovered,
            recovery_time,
        })
    }
}

/// Removes recovered segments that hold no record: those that earlier starts began and
/// nothing was written to before the next. Without this, every restart behind segments
/// pinned by live messages would leave one more file. Nothing is lost with them: they
/// hold no message, and the new active segment, already durable, carries the next id.
fn remove_empty_segments(
    backend: &Segments,
    recovered: &mut Recovered,
    fsync: FsyncPolicy,
) -> std::io::Result<()> {
    // A header and perhaps a sealed record: every other record is longer than that one.
    let empty_bytes = (record::HEADER_BYTES + record::SEALED_RECORD_BYTES) as u64;
    let (empty, kept): (Vec<RecoveredSegment>, Vec<RecoveredSegment>) =
        std::mem::take(&mut recovered.segments)
            .into_iter()
            .partition(|segment| segment.bytes <= empty_bytes);
    recovered.segments = kept;
    if empty.is_empty() {
        return Ok(());
    }
    for segment in &empty {
        backend.remove_segment(segment.number)?;
    }
    if fsync == FsyncPolicy::Always {
        backend.sync_dir()?;
    }
    Ok(())
}

fn lock_dir(dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, StorageError> {
    let path = dir.join("LOCK");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(backend::FILE_MODE)
        .open(&path)
        .map_err(|source| StorageError::Dir {
            dir: dir.to_owned(),
            source,
        })?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| StorageError::Locked(dir.to_owned()))
}
