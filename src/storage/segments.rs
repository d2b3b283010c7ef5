//! The log's segments as files of a [`FileSystem`]: their names, and the policy for
//! making and removing them. The same code runs on the real directory and on the crash
//! simulator, so the tests exercise the broker's own policy.
//!
//! - A segment is `<20-digit number>.seg`.
//! - A removed segment's file is kept for reuse, renamed `<number>.seg.spare`, while
//!   fewer than [`SPARE_FILES_MAX`] spares exist and it is at least half a segment long;
//!   a new segment takes the oldest spare (renamed, the directory synced before anything
//!   is written to it, so no crash can leave its records under the old name) and is
//!   written over its old contents. A new log starts with spares of zeroes,
//!   `prepared-<n>.seg.spare`.
//! - A large file not kept is renamed `<number>.seg.removing` (durably) and cut down step
//!   by step before it is unlinked; a start removes what a crash left of such a removal.

use std::io;
use std::sync::Arc;

use super::backend::{FileSystem, FileWriter};

/// How many files of removed segments are kept for reuse. Writing into blocks a file
/// already has is what makes reuse pay: an fdatasync after overwriting blocks need not
/// also write their allocation and the file's size (docs/STORAGE.md has the figures).
/// PostgreSQL recycles WAL segments for the same reason. A broker whose consumers keep
/// up frees a segment for about every one it fills, so two cover its rotations.
pub const SPARE_FILES_MAX: usize = 2;

/// How much of a segment each truncation frees when it is removed: a sync on another
/// file waits behind the blocks being freed, and on a file system mounted with `discard`
/// behind their trimming too. RocksDB's `DeleteScheduler` truncates large files in
/// chunks for the same reason.
const REMOVAL_STEP_BYTES: u64 = 8 << 20;

const SEGMENT_SUFFIX: &str = ".seg";
/// What a segment being removed step by step is renamed to first.
const REMOVING_SUFFIX: &str = ".seg.removing";
/// What the file of a removed segment is renamed to while it waits for reuse.
const SPARE_SUFFIX: &str = ".seg.spare";

/// The name of segment `number`'s file.
pub fn segment_file_name(number: u64) -> String {
    format!("{number:020}{SEGMENT_SUFFIX}")
}

/// The segments of a log.
pub struct Segments {
    fs: Arc<dyn FileSystem>,
    segment_bytes: u64,
}

impl Segments {
    /// The segments in `fs`, `segment_bytes` long.
    pub fn new(fs: Arc<dyn FileSystem>, segment_bytes: u64) -> Segments {
        Segments { fs, segment_bytes }
    }

    /// Numbers of the segments present, ascending.
    pub fn list_segments(&self) -> io::Result<Vec<u64>> {
        let mut numbers: Vec<u64> = self
            .fs
            .list()?
            .iter()
            .filter_map(|name| name.strip_suffix(SEGMENT_SUFFIX)?.parse().ok())
            .collect();
        numbers.sort_unstable();
        Ok(numbers)
    }

    /// Opens a segment for reading from its start.
    pub fn open_segment(&self, number: u64) -> io::Result<Box<dyn io::Read + Send>> {
        self.fs.open(&segment_file_name(number))
    }

    /// Creates a new segment, written from its start. It may be the file of a removed
    /// segment, reused: then its old contents follow whatever is written (the records
    /// carry their segment's number, and a sealed record ends a segment, so that they are
    /// never taken for the new segment's). The new name is durable only after
    /// [`Segments::sync_dir`], except that a reused file's is durable before this returns.
    pub fn create_segment(&self, number: u64) -> io::Result<Box<dyn FileWriter>> {
        let name = segment_file_name(number);
        let Some(spare) = self.spares()?.into_iter().next() else {
            return self.fs.create(&name);
        };
        self.fs.rename(&spare, &name)?;
        self.fs.sync_dir()?;
        self.fs.overwrite(&name)
    }

    /// Cuts a segment to `len` bytes, durably.
    pub fn truncate_segment(&self, number: u64, len: u64) -> io::Result<()> {
        let name = segment_file_name(number);
        self.fs.set_len(&name, len)?;
        self.fs.sync_file(&name)
    }

    /// Takes a segment out of the log; durable only after [`Segments::sync_dir`]. Its
    /// file is kept as a spare, or, when large, renamed out of the log and cut down step
    /// by step (a crash midway leaves it outside the log, for the next start to remove).
    pub fn remove_segment(&self, number: u64) -> io::Result<()> {
        let name = segment_file_name(number);
        let mut len = self.fs.len(&name)?;
        if len >= self.segment_bytes / 2 && self.spares()?.len() < SPARE_FILES_MAX {
            return self
                .fs
                .rename(&name, &format!("{number:020}{SPARE_SUFFIX}"));
        }
        if len <= REMOVAL_STEP_BYTES {
            return self.fs.remove(&name);
        }
        // Out of the log first, durably, so that a crash midway cannot leave a cut-short
        // segment that recovery would take for damage.
        let removing = format!("{number:020}{REMOVING_SUFFIX}");
        self.fs.rename(&name, &removing)?;
        self.fs.sync_dir()?;
        while len > 0 {
            len = len.saturating_sub(REMOVAL_STEP_BYTES);
            self.fs.set_len(&removing, len)?;
        }
        self.fs.remove(&removing)
    }

    pub fn sync_dir(&self) -> io::Result<()> {
        self.fs.sync_dir()
    }

    /// How to name a segment in messages to people.
    pub fn describe(&self, number: u64) -> String {
        self.fs.describe(&segment_file_name(number))
    }

    /// Gives a new log (a directory with no segment and no spare) its spares: files of a
    /// segment's length of zeroes, synced, so that its first segments are written over
    /// blocks their files already have, as later ones are. PostgreSQL zero-fills new WAL
    /// segments for the same reason (`wal_init_zero`). Returns how many it made.
    pub fn prepare_new_log(&self) -> io::Result<usize> {
        if !self.list_segments()?.is_empty() || !self.spares()?.is_empty() {
            return Ok(0);
        }
        let zeroes = vec![0u8; (1 << 20).min(self.segment_bytes as usize)];
        for spare in 1..=SPARE_FILES_MAX {
            let name = format!("prepared-{spare}{SPARE_SUFFIX}");
            let mut file = self.fs.create(&name)?;
            let mut left = self.segment_bytes;
            while left > 0 {
                let step = left.min(zeroes.len() as u64);
                file.append(&[&zeroes[..step as usize]])?;
                left -= step;
            }
            file.sync_data()?;
        }
        self.fs.sync_dir()?;
        Ok(SPARE_FILES_MAX)
    }

    /// Removes the files of segments that a crash interrupted halfway through their
    /// removal; returns how many. They are no longer part of the log: see
    /// [`Segments::remove_segment`].
    pub fn remove_interrupted_removals(&self) -> io::Result<usize> {
        let interrupted = self.files_ending_with(REMOVING_SUFFIX)?;
        for name in &interrupted {
            self.fs.remove(name)?;
        }
        if !interrupted.is_empty() {
            self.fs.sync_dir()?;
        }
        Ok(interrupted.len())
    }

    /// The files kept for reuse, oldest first.
    fn spares(&self) -> io::Result<Vec<String>> {
        self.files_ending_with(SPARE_SUFFIX)
    }

    /// The files whose names end with `suffix`, in name order.
    fn files_ending_with(&self, suffix: &str) -> io::Result<Vec<String>> {
        let mut names: Vec<String> = self
            .fs
            .list()?
            .into_iter()
            .filter(|name| name.ends_with(suffix))
            .collect();
        names.sort_unstable();
        Ok(names)
    }
}
