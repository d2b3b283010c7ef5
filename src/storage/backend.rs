//! The few file operations the log needs, behind a trait, so that tests can run the
//! same log on [`SimBackend`], which keeps what was written apart from what was synced
//! and can "crash" back to the synced image (the approach of redb's crash tests).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// Where segments live.
pub trait Backend: Send + Sync {
    /// Numbers of the segments present, ascending.
    fn list_segments(&self) -> io::Result<Vec<u64>>;
    /// Opens a segment for reading from its start.
    fn open_segment(&self, number: u64) -> io::Result<Box<dyn io::Read + Send>>;
    /// Creates a new segment, written from its start. It may be the file of a removed
    /// segment, reused: then its old contents follow whatever is written (the records
    /// carry their segment's number, and a sealed record ends a segment, so that they are
    /// never taken for the new segment's). The new name is durable only after
    /// [`Backend::sync_dir`], except that a reused file's is durable before this returns
    /// (so that no crash can leave the new segment's records under the old name).
    fn create_segment(&self, number: u64) -> io::Result<Box<dyn SegmentWriter>>;
    /// Cuts a segment to `len` bytes, durably.
    fn truncate_segment(&self, number: u64, len: u64) -> io::Result<()>;
    /// Takes a segment out of the log; durable only after [`Backend::sync_dir`]. Its file
    /// may be kept, under another name, for [`Backend::create_segment`] to reuse; or a
    /// large one renamed out of the log first and then cut down step by step, in which
    /// case a crash midway leaves its file under another name, outside the log.
    fn remove_segment(&self, number: u64) -> io::Result<()>;
    fn sync_dir(&self) -> io::Result<()>;
    /// How to name a segment in messages to people.
    fn describe(&self, number: u64) -> String;
}

/// A segment open for writing, from its start on.
pub trait SegmentWriter: Send {
    /// Writes the chunks in order after what was written before, as one write where the
    /// platform allows: the writer hands over the record buffers of a whole group without
    /// first copying them into one.
    fn append(&mut self, chunks: &[&[u8]]) -> io::Result<()>;
    /// Makes everything appended durable (fdatasync).
    fn sync_data(&mut self) -> io::Result<()>;
}

/// Permissions of every file in the data dir: readable and writable by the broker's user
/// only, whatever the umask.
pub const FILE_MODE: u32 = 0o600;

/// How many files of removed segments are kept for reuse. Writing into blocks a file
/// already has is what makes reuse pay: on this project's VM (ext4 without a journal),
/// an fdatasync after appending 45 KB took 355-438 us, after overwriting as much
/// 167-271 us, because it need not also write the allocation and the file's size.
/// PostgreSQL recycles WAL segments for the same reason. A broker whose consumers keep
/// up frees a segment for about every one it fills, so two cover its rotations.
pub const SPARE_FILES_MAX: usize = 2;

/// Segments as files `<20-digit number>.seg` in a directory; files kept for reuse as
/// `<number they had>.seg.spare`, or `prepared-<n>.seg.spare` for a new log's.
pub struct FileBackend {
    dir: PathBuf,
    segment_bytes: u64,
}

/// How much of a segment each truncation frees when it is removed: a sync on another
/// file waits behind the blocks being freed, and on a file system mounted with `discard`
/// (this project's VM) behind their trimming too. Unlinking a 64 MiB file at once held a
/// concurrent fdatasync for 12-17 ms; cut down 8 MiB at a time, for at most ~3 ms.
/// RocksDB's `DeleteScheduler` truncates large files in chunks for the same reason.
const REMOVAL_STEP_BYTES: u64 = 8 << 20;

/// What a segment being removed step by step is renamed to first.
const REMOVING_SUFFIX: &str = ".seg.removing";

/// What the file of a removed segment is renamed to while it waits for reuse.
const SPARE_SUFFIX: &str = ".seg.spare";

impl FileBackend {
    /// Segments in `dir`, the log's segments being `segment_bytes` long.
    pub fn new(dir: &Path, segment_bytes: u64) -> FileBackend {
        FileBackend {
            dir: dir.to_owned(),
            segment_bytes,
        }
    }

    /// Removed segments' files at least this long are kept for reuse: a short one (a
    /// segment a restart began and barely wrote) would take a place and save little.
    fn spare_bytes_min(&self) -> u64 {
        self.segment_bytes / 2
    }

    /// Gives a new log (a directory with no segment and no spare) its spares: files of a
    /// segment's length of zeroes, synced, so that its first segments are written over
    /// blocks their files already have, as later ones are. PostgreSQL zero-fills new WAL
    /// segments for the same reason (`wal_init_zero`). 128 MiB took ~0.1 s on this
    /// project's VM. Returns how many it made.
    pub fn prepare_new_log(&self) -> io::Result<usize> {
        if !self.list_segments()?.is_empty() || !self.spares()?.is_empty() {
            return Ok(0);
        }
        let zeroes = vec![0u8; 1 << 20];
        for spare in 1..=SPARE_FILES_MAX {
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(FILE_MODE)
                .open(self.dir.join(format!("prepared-{spare}{SPARE_SUFFIX}")))?;
            let mut left = self.segment_bytes;
            while left > 0 {
                let step = left.min(zeroes.len() as u64);
                file.write_all(&zeroes[..step as usize])?;
                left -= step;
            }
            file.sync_all()?;
        }
        self.sync_dir()?;
        Ok(SPARE_FILES_MAX)
    }

    fn path(&self, number: u64) -> PathBuf {
        self.dir.join(format!("{number:020}.seg"))
    }

    /// The files in the directory whose names end with `suffix`, in name order.
    fn files_ending_with(&self, suffix: &str) -> io::Result<Vec<PathBuf>> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if entry
                .file_name()
                .to_str()
                .is_some_and(|name| name.ends_with(suffix))
            {
                files.push(entry.path());
            }
        }
        files.sort_unstable();
        Ok(files)
    }

    /// The files kept for reuse, oldest first.
    fn spares(&self) -> io::Result<Vec<PathBuf>> {
        self.files_ending_with(SPARE_SUFFIX)
    }

    /// Removes the files of segments that a crash interrupted halfway through their
    /// removal; returns how many. They are no longer part of the log: see
    /// [`Backend::remove_segment`].
    pub fn remove_interrupted_removals(&self) -> io::Result<usize> {
        let interrupted = self.files_ending_with(REMOVING_SUFFIX)?;
        for path in &interrupted {
            std::fs::remove_file(path)?;
        }
        Ok(interrupted.len())
    }
}

impl Backend for FileBackend {
    fn list_segments(&self) -> io::Result<Vec<u64>> {
        let mut numbers = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(number) = name.strip_suffix(".seg").and_then(|n| n.parse().ok()) {
                numbers.push(number);
            }
        }
        numbers.sort_unstable();
        Ok(numbers)
    }

    fn open_segment(&self, number: u64) -> io::Result<Box<dyn io::Read + Send>> {
        Ok(Box::new(File::open(self.path(number))?))
    }

    fn create_segment(&self, number: u64) -> io::Result<Box<dyn SegmentWriter>> {
        let path = self.path(number);
        let Some(spare) = self.spares()?.into_iter().next() else {
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(FILE_MODE)
                .open(path)?;
            return Ok(Box::new(FileSegment { file }));
        };
        if path.try_exists()? {
            return Err(io::ErrorKind::AlreadyExists.into());
        }
        std::fs::rename(&spare, &path)?;
        self.sync_dir()?;
        let file = OpenOptions::new().write(true).open(&path)?;
        Ok(Box::new(FileSegment { file }))
    }

    fn truncate_segment(&self, number: u64, len: u64) -> io::Result<()> {
        let file = OpenOptions::new().write(true).open(self.path(number))?;
        file.set_len(len)?;
        file.sync_all()
    }

    fn remove_segment(&self, number: u64) -> io::Result<()> {
        let path = self.path(number);
        let mut len = std::fs::metadata(&path)?.len();
        if len >= self.spare_bytes_min() && self.spares()?.len() < SPARE_FILES_MAX {
            let spare = self.dir.join(format!("{number:020}{SPARE_SUFFIX}"));
            return std::fs::rename(path, spare);
        }
        if len <= REMOVAL_STEP_BYTES {
            return std::fs::remove_file(path);
        }
        // Out of the log first, durably, so that a crash midway cannot leave a cut-short
        // segment that recovery would take for damage.
        let removing = self.dir.join(format!("{number:020}{REMOVING_SUFFIX}"));
        std::fs::rename(&path, &removing)?;
        self.sync_dir()?;
        let file = OpenOptions::new().write(true).open(&removing)?;
        while len > 0 {
            len = len.saturating_sub(REMOVAL_STEP_BYTES);
            file.set_len(len)?;
        }
        std::fs::remove_file(removing)
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }

    fn describe(&self, number: u64) -> String {
        self.path(number).display().to_string()
    }
}

struct FileSegment {
    file: File,
}

impl SegmentWriter for FileSegment {
    fn append(&mut self, chunks: &[&[u8]]) -> io::Result<()> {
        // `Write::write_all_vectored` is not stable yet: the same loop, by hand.
        let mut slices: Vec<IoSlice<'_>> = chunks.iter().map(|c| IoSlice::new(c)).collect();
        let mut remaining = &mut slices[..];
        while !remaining.is_empty() {
            match self.file.write_vectored(remaining) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => IoSlice::advance_slices(&mut remaining, written),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// An in-memory backend that can crash. Each file has the bytes written and the bytes
/// synced; the directory has the names that exist and the names synced. [`SimBackend::crash`]
/// throws away everything not synced, except that a chosen number of unsynced bytes may
/// survive after the synced ones, as a torn write would leave them. A crash also kills
/// the process that was writing: every handle from before it fails from then on, and the
/// log is reopened through [`SimBackend::after_crash`].
///
/// Removed segments' files are kept for reuse (up to [`SPARE_FILES_MAX`], whatever their
/// size, so that tests with small segments reuse files all the time). A rename is
/// modelled as a new name holding the file, with the old name gone only once the
/// directory is synced; both backends sync the directory before writing to a file under
/// its new name, which is what makes this model faithful.
#[derive(Clone, Default)]
pub struct SimBackend {
    state: Arc<Mutex<SimState>>,
    /// The crash epoch this handle lives in.
    epoch: u64,
}

/// A name in the simulated directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum SimName {
    Segment(u64),
    /// A removed segment's file, kept for reuse under the number it had.
    Spare(u64),
}

#[derive(Default)]
struct SimState {
    files: BTreeMap<SimName, SimFile>,
    /// Incremented on every crash; handles from before a crash are dead.
    epoch: u64,
    /// When set, every operation fails: a disk gone bad.
    failing: bool,
    /// New segments that took the file of a removed one.
    reused: usize,
}

impl SimState {
    fn spares(&self) -> impl Iterator<Item = SimName> + '_ {
        self.files
            .iter()
            .filter(|(name, file)| file.exists && matches!(name, SimName::Spare(_)))
            .map(|(name, _)| *name)
    }

    /// Renames `from` to `to`: `to` exists at once, `from` stays on disk until the
    /// directory is synced.
    fn rename(&mut self, from: SimName, to: SimName) {
        let file = self
            .files
            .get_mut(&from)
            .expect("renaming a file that exists");
        file.exists = false;
        let moved = SimFile {
            exists: true,
            exists_synced: false,
            ..file.clone()
        };
        self.files.insert(to, moved);
    }

    fn sync_dir(&mut self) {
        self.files.retain(|_, f| f.exists);
        for file in self.files.values_mut() {
            file.exists_synced = true;
        }
    }
}

#[derive(Default, Clone)]
struct SimFile {
    written: Vec<u8>,
    synced: Vec<u8>,
    exists: bool,
    exists_synced: bool,
}

impl SimFile {
    /// Where the bytes written since the last sync start: writes are sequential, so
    /// everything from the first difference on may not have reached the disk.
    fn unsynced_from(&self) -> usize {
        self.written
            .iter()
            .zip(&self.synced)
            .position(|(written, synced)| written != synced)
            .unwrap_or(self.synced.len().min(self.written.len()))
    }
}

impl SimBackend {
    fn state(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Simulates a power loss: keeps synced bytes and names, plus up to
    /// `torn_bytes(file number, unsynced length)` of each file's unsynced bytes.
    pub fn crash(&self, mut torn_bytes: impl FnMut(u64, usize) -> usize) {
        let mut state = self.state();
        state.epoch += 1;
        state.files.retain(|_, file| file.exists_synced);
        for (name, file) in state.files.iter_mut() {
            let (SimName::Segment(number) | SimName::Spare(number)) = *name;
            let from = file.unsynced_from();
            let unsynced = file.written.len().saturating_sub(from);
            let kept = torn_bytes(number, unsynced).min(unsynced);
            let mut image = file.synced.clone();
            if image.len() < from + kept {
                image.resize(from + kept, 0);
            }
            image[from..from + kept].copy_from_slice(&file.written[from..from + kept]);
            file.written = image.clone();
            file.synced = image;
            file.exists = true;
        }
    }

    /// A handle for the process that starts after the latest crash.
    pub fn after_crash(&self) -> SimBackend {
        SimBackend {
            state: self.state.clone(),
            epoch: self.state().epoch,
        }
    }

    /// Makes every later operation fail, as a dying disk would.
    pub fn fail_from_now_on(&self) {
        self.state().failing = true;
    }

    /// Bytes in the log's segments.
    pub fn log_bytes(&self) -> usize {
        self.bytes_in(|name| matches!(name, SimName::Segment(_)))
    }

    /// Bytes in the removed segments' files kept for reuse.
    pub fn spare_bytes(&self) -> usize {
        self.bytes_in(|name| matches!(name, SimName::Spare(_)))
    }

    /// How many new segments took the file of a removed one.
    pub fn reused_files(&self) -> usize {
        self.state().reused
    }

    fn bytes_in(&self, counted: impl Fn(&SimName) -> bool) -> usize {
        self.state()
            .files
            .iter()
            .filter(|(name, file)| file.exists && counted(name))
            .map(|(_, file)| file.written.len())
            .sum()
    }

    /// Overwrites part of a segment, durably (to plant corruption in tests).
    pub fn corrupt(&self, number: u64, offset: usize, bytes: &[u8]) {
        let mut state = self.state();
        let file = state
            .files
            .get_mut(&SimName::Segment(number))
            .expect("segment exists");
        file.written[offset..offset + bytes.len()].copy_from_slice(bytes);
        file.synced = file.written.clone();
    }

    /// Puts a segment with these bytes in place, durably.
    pub fn put_segment(&self, number: u64, bytes: &[u8]) {
        self.state().files.insert(
            SimName::Segment(number),
            SimFile {
                written: bytes.to_vec(),
                synced: bytes.to_vec(),
                exists: true,
                exists_synced: true,
            },
        );
    }

    /// The bytes written to a segment, synced or not.
    pub fn written(&self, number: u64) -> io::Result<Vec<u8>> {
        let state = self.state();
        self.check(&state)?;
        state
            .files
            .get(&SimName::Segment(number))
            .filter(|f| f.exists)
            .map(|f| f.written.clone())
            .ok_or_else(|| io::ErrorKind::NotFound.into())
    }

    fn with_file<T>(&self, number: u64, act: impl FnOnce(&mut SimFile) -> T) -> io::Result<T> {
        let mut state = self.state();
        self.check(&state)?;
        let file = state
            .files
            .get_mut(&SimName::Segment(number))
            .filter(|f| f.exists)
            .ok_or(io::ErrorKind::NotFound)?;
        Ok(act(file))
    }

    fn check(&self, state: &SimState) -> io::Result<()> {
        if state.failing {
            Err(io::Error::other("simulated disk failure"))
        } else if state.epoch != self.epoch {
            Err(io::Error::other("handle from before a simulated crash"))
        } else {
            Ok(())
        }
    }
}

impl Backend for SimBackend {
    fn list_segments(&self) -> io::Result<Vec<u64>> {
        let state = self.state();
        self.check(&state)?;
        Ok(state
            .files
            .iter()
            .filter(|(_, f)| f.exists)
            .filter_map(|(name, _)| match name {
                SimName::Segment(number) => Some(*number),
                SimName::Spare(_) => None,
            })
            .collect())
    }

    fn open_segment(&self, number: u64) -> io::Result<Box<dyn io::Read + Send>> {
        Ok(Box::new(io::Cursor::new(self.written(number)?)))
    }

    fn create_segment(&self, number: u64) -> io::Result<Box<dyn SegmentWriter>> {
        let mut state = self.state();
        self.check(&state)?;
        let name = SimName::Segment(number);
        if state.files.get(&name).is_some_and(|f| f.exists) {
            return Err(io::ErrorKind::AlreadyExists.into());
        }
        let spare = state.spares().next();
        if let Some(spare) = spare {
            state.rename(spare, name);
            state.sync_dir();
            state.reused += 1;
        } else {
            state.files.insert(
                name,
                SimFile {
                    exists: true,
                    ..SimFile::default()
                },
            );
        }
        Ok(Box::new(SimSegment {
            backend: self.clone(),
            number,
            written: 0,
        }))
    }

    fn truncate_segment(&self, number: u64, len: u64) -> io::Result<()> {
        self.with_file(number, |file| {
            file.written.truncate(len as usize);
            file.synced = file.written.clone();
        })
    }

    fn remove_segment(&self, number: u64) -> io::Result<()> {
        let mut state = self.state();
        self.check(&state)?;
        let name = SimName::Segment(number);
        if !state.files.get(&name).is_some_and(|f| f.exists) {
            return Err(io::ErrorKind::NotFound.into());
        }
        if state.spares().count() < SPARE_FILES_MAX {
            state.rename(name, SimName::Spare(number));
        } else if let Some(file) = state.files.get_mut(&name) {
            file.exists = false;
        }
        Ok(())
    }

    fn sync_dir(&self) -> io::Result<()> {
        let mut state = self.state();
        self.check(&state)?;
        state.sync_dir();
        Ok(())
    }

    fn describe(&self, number: u64) -> String {
        format!("simulated segment {number}")
    }
}

struct SimSegment {
    backend: SimBackend,
    number: u64,
    /// Bytes written from the start.
    written: usize,
}

impl SegmentWriter for SimSegment {
    fn append(&mut self, chunks: &[&[u8]]) -> io::Result<()> {
        let at = self.written;
        let len: usize = chunks.iter().map(|chunk| chunk.len()).sum();
        self.backend.with_file(self.number, |file| {
            if file.written.len() < at + len {
                file.written.resize(at + len, 0);
            }
            let mut to = at;
            for chunk in chunks {
                file.written[to..to + chunk.len()].copy_from_slice(chunk);
                to += chunk.len();
            }
        })?;
        self.written += len;
        Ok(())
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.backend
            .with_file(self.number, |file| file.synced = file.written.clone())
    }
}
