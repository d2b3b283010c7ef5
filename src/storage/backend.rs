//! The few file operations the log needs, behind a trait, so that tests can run the
//! same log on [`SimBackend`], which keeps what was written apart from what was synced
//! and can "crash" back to the synced image (the approach of redb's crash tests).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// Where segments live.
pub trait Backend: Send + Sync {
    /// Numbers of the segments present, ascending.
    fn list_segments(&self) -> io::Result<Vec<u64>>;
    /// Opens a segment for reading from its start.
    fn open_segment(&self, number: u64) -> io::Result<Box<dyn io::Read + Send>>;
    /// Creates a new, empty segment. Its name is durable only after [`Backend::sync_dir`].
    fn create_segment(&self, number: u64) -> io::Result<Box<dyn SegmentWriter>>;
    /// Cuts a segment to `len` bytes, durably.
    fn truncate_segment(&self, number: u64, len: u64) -> io::Result<()>;
    /// Removes a segment; durable only after [`Backend::sync_dir`]. A large segment may be
    /// renamed out of the log first and then cut down step by step; a crash midway leaves
    /// its file under another name, outside the log.
    fn remove_segment(&self, number: u64) -> io::Result<()>;
    fn sync_dir(&self) -> io::Result<()>;
    /// How to name a segment in messages to people.
    fn describe(&self, number: u64) -> String;
}

/// A segment open for appending.
pub trait SegmentWriter: Send {
    /// Appends the chunks in order, as one write where the platform allows: the writer
    /// hands over the record buffers of a whole group without first copying them into
    /// one.
    fn append(&mut self, chunks: &[&[u8]]) -> io::Result<()>;
    /// Makes everything appended durable (fdatasync).
    fn sync_data(&mut self) -> io::Result<()>;
}

/// Segments as files `<20-digit number>.seg` in a directory.
pub struct FileBackend {
    dir: PathBuf,
}

/// How much of a segment each truncation frees when it is removed: a sync on another
/// file waits behind the blocks being freed, and on a file system mounted with `discard`
/// (this project's VM) behind their trimming too. Unlinking a 64 MiB file at once held a
/// concurrent fdatasync for 12-17 ms; cut down 8 MiB at a time, for at most ~3 ms.
/// RocksDB's `DeleteScheduler` truncates large files in chunks for the same reason.
const REMOVAL_STEP_BYTES: u64 = 8 << 20;

/// What a segment being removed step by step is renamed to first.
const REMOVING_SUFFIX: &str = ".seg.removing";

impl FileBackend {
    pub fn new(dir: &Path) -> FileBackend {
        FileBackend {
            dir: dir.to_owned(),
        }
    }

    fn path(&self, number: u64) -> PathBuf {
        self.dir.join(format!("{number:020}.seg"))
    }

    /// Removes the files of segments that a crash interrupted halfway through their
    /// removal; returns how many. They are no longer part of the log: see
    /// [`Backend::remove_segment`].
    pub fn remove_interrupted_removals(&self) -> io::Result<usize> {
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if entry
                .file_name()
                .to_str()
                .is_some_and(|name| name.ends_with(REMOVING_SUFFIX))
            {
                std::fs::remove_file(entry.path())?;
                removed += 1;
            }
        }
        Ok(removed)
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
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(self.path(number))?;
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

/// An in-memory backend that can crash. Each segment has the bytes written and the bytes
/// synced; the directory has the names that exist and the names synced. [`SimBackend::crash`]
/// throws away everything not synced, except that a chosen number of unsynced bytes may
/// survive at the end of each file, as a torn write would leave them. A crash also kills
/// the process that was writing: every handle from before it fails from then on, and the
/// log is reopened through [`SimBackend::after_crash`].
#[derive(Clone, Default)]
pub struct SimBackend {
    state: Arc<Mutex<SimState>>,
    /// The crash epoch this handle lives in.
    epoch: u64,
}

#[derive(Default)]
struct SimState {
    files: BTreeMap<u64, SimFile>,
    /// Incremented on every crash; handles from before a crash are dead.
    epoch: u64,
    /// When set, every operation fails: a disk gone bad.
    failing: bool,
}

#[derive(Default, Clone)]
struct SimFile {
    written: Vec<u8>,
    synced: Vec<u8>,
    exists: bool,
    exists_synced: bool,
}

impl SimBackend {
    fn state(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Simulates a power loss: keeps synced bytes and names, plus up to
    /// `torn_bytes(file number, unsynced length)` unsynced bytes of each file.
    pub fn crash(&self, mut torn_bytes: impl FnMut(u64, usize) -> usize) {
        let mut state = self.state();
        state.epoch += 1;
        state.files.retain(|_, file| file.exists_synced);
        for (number, file) in state.files.iter_mut() {
            let unsynced = file.written.len().saturating_sub(file.synced.len());
            let kept = torn_bytes(*number, unsynced).min(unsynced);
            let mut image = file.synced.clone();
            if file.written.starts_with(&file.synced) {
                image.extend_from_slice(&file.written[file.synced.len()..file.synced.len() + kept]);
            }
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

    /// Total bytes written to segments that exist.
    pub fn total_bytes(&self) -> usize {
        self.state()
            .files
            .values()
            .filter(|f| f.exists)
            .map(|f| f.written.len())
            .sum()
    }

    /// Overwrites part of a segment, durably (to plant corruption in tests).
    pub fn corrupt(&self, number: u64, offset: usize, bytes: &[u8]) {
        let mut state = self.state();
        let file = state.files.get_mut(&number).expect("segment exists");
        file.written[offset..offset + bytes.len()].copy_from_slice(bytes);
        file.synced = file.written.clone();
    }

    /// Puts a segment with these bytes in place, durably.
    pub fn put_segment(&self, number: u64, bytes: &[u8]) {
        self.state().files.insert(
            number,
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
            .get(&number)
            .filter(|f| f.exists)
            .map(|f| f.written.clone())
            .ok_or_else(|| io::ErrorKind::NotFound.into())
    }

    fn with_file<T>(&self, number: u64, act: impl FnOnce(&mut SimFile) -> T) -> io::Result<T> {
        let mut state = self.state();
        self.check(&state)?;
        let file = state
            .files
            .get_mut(&number)
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
            .map(|(n, _)| *n)
            .collect())
    }

    fn open_segment(&self, number: u64) -> io::Result<Box<dyn io::Read + Send>> {
        Ok(Box::new(io::Cursor::new(self.written(number)?)))
    }

    fn create_segment(&self, number: u64) -> io::Result<Box<dyn SegmentWriter>> {
        let mut state = self.state();
        self.check(&state)?;
        if state.files.get(&number).is_some_and(|f| f.exists) {
            return Err(io::ErrorKind::AlreadyExists.into());
        }
        state.files.insert(
            number,
            SimFile {
                exists: true,
                ..SimFile::default()
            },
        );
        Ok(Box::new(SimSegment {
            backend: self.clone(),
            number,
        }))
    }

    fn truncate_segment(&self, number: u64, len: u64) -> io::Result<()> {
        self.with_file(number, |file| {
            file.written.truncate(len as usize);
            file.synced = file.written.clone();
        })
    }

    fn remove_segment(&self, number: u64) -> io::Result<()> {
        self.with_file(number, |file| file.exists = false)
    }

    fn sync_dir(&self) -> io::Result<()> {
        let mut state = self.state();
        self.check(&state)?;
        state.files.retain(|_, f| f.exists);
        for file in state.files.values_mut() {
            file.exists_synced = true;
        }
        Ok(())
    }

    fn describe(&self, number: u64) -> String {
        format!("simulated segment {number}")
    }
}

struct SimSegment {
    backend: SimBackend,
    number: u64,
}

impl SegmentWriter for SimSegment {
    fn append(&mut self, chunks: &[&[u8]]) -> io::Result<()> {
        self.backend.with_file(self.number, |file| {
            for chunk in chunks {
                file.written.extend_from_slice(chunk);
            }
        })
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.backend
            .with_file(self.number, |file| file.synced = file.written.clone())
    }
}
