//! The plain file operations the log needs, on the files of one directory, behind a
//! trait (redb's `StorageBackend` is the model): [`RealFs`] for a directory on disk, and
//! [`SimFs`], which keeps what was written apart from what was synced and can "crash"
//! back to the synced image. Every policy (segment names, reuse of removed segments'
//! files, removal step by step) lives above this, in `segments`, so a test on the
//! simulator runs the same policy as the broker.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// The files of the log's directory.
pub trait FileSystem: Send + Sync {
    /// Names of the files in the directory.
    fn list(&self) -> io::Result<Vec<String>>;
    /// Opens a file for reading from its start.
    fn open(&self, name: &str) -> io::Result<Box<dyn io::Read + Send>>;
    /// Creates a file that does not exist yet, to write from its start. Its name is
    /// durable only after [`FileSystem::sync_dir`].
    fn create(&self, name: &str) -> io::Result<Box<dyn FileWriter>>;
    /// Opens an existing file to write from its start, over what it holds.
    fn overwrite(&self, name: &str) -> io::Result<Box<dyn FileWriter>>;
    fn len(&self, name: &str) -> io::Result<u64>;
    /// Cuts or extends a file; durable after [`FileSystem::sync_file`].
    fn set_len(&self, name: &str, len: u64) -> io::Result<()>;
    fn sync_file(&self, name: &str) -> io::Result<()>;
    /// Renames a file (replacing none); durable after [`FileSystem::sync_dir`].
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Removes a file; durable after [`FileSystem::sync_dir`].
    fn remove(&self, name: &str) -> io::Result<()>;
    fn sync_dir(&self) -> io::Result<()>;
    /// How to name a file in messages to people.
    fn describe(&self, name: &str) -> String;
}

/// A file open for writing, from its start on.
pub trait FileWriter: Send {
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

/// A directory on disk.
pub struct RealFs {
    dir: PathBuf,
}

impl RealFs {
    pub fn new(dir: &Path) -> RealFs {
        RealFs {
            dir: dir.to_owned(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl FileSystem for RealFs {
    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            if let Ok(name) = entry?.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn open(&self, name: &str) -> io::Result<Box<dyn io::Read + Send>> {
        Ok(Box::new(File::open(self.path(name))?))
    }

    fn create(&self, name: &str) -> io::Result<Box<dyn FileWriter>> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(self.path(name))?;
        Ok(Box::new(RealFile { file }))
    }

    fn overwrite(&self, name: &str) -> io::Result<Box<dyn FileWriter>> {
        let file = OpenOptions::new().write(true).open(self.path(name))?;
        Ok(Box::new(RealFile { file }))
    }

    fn len(&self, name: &str) -> io::Result<u64> {
        Ok(std::fs::metadata(self.path(name))?.len())
    }

    fn set_len(&self, name: &str, len: u64) -> io::Result<()> {
        OpenOptions::new()
            .write(true)
            .open(self.path(name))?
            .set_len(len)
    }

    fn sync_file(&self, name: &str) -> io::Result<()> {
        OpenOptions::new()
            .write(true)
            .open(self.path(name))?
            .sync_all()
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        if self.path(to).try_exists()? {
            return Err(io::ErrorKind::AlreadyExists.into());
        }
        std::fs::rename(self.path(from), self.path(to))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        std::fs::remove_file(self.path(name))
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }

    fn describe(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
}

struct RealFile {
    file: File,
}

impl FileWriter for RealFile {
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

/// An in-memory directory that can crash. Each file has the bytes written and the bytes
/// synced; the directory has the names that exist and the names synced.
/// [`SimFs::crash`] throws away everything not synced, except that a chosen number of a
/// file's unsynced bytes may survive after its synced ones, as a torn write would leave
/// them (or, with [`SimFs::crash_with_holes`], any of them, as a page cache flushing
/// pages out of order would). A crash also kills the process that was writing: every
/// handle from before it fails from then on, and the log is reopened through
/// [`SimFs::after_crash`].
///
/// A rename is modelled as a new name holding the file, with the old name gone only once
/// the directory is synced: the log syncs the directory before writing to a file under
/// its new name, which is what makes this model faithful.
#[derive(Clone, Default)]
pub struct SimFs {
    state: Arc<Mutex<SimState>>,
    /// The crash epoch this handle lives in.
    epoch: u64,
}

#[derive(Default)]
struct SimState {
    files: BTreeMap<String, SimFile>,
    /// Incremented on every crash; handles from before a crash are dead.
    epoch: u64,
    /// When set, every operation fails: a disk gone bad.
    failing: bool,
    /// Files renamed from a spare's name to a segment's.
    reused: usize,
}

#[derive(Default, Clone)]
struct SimFile {
    written: Vec<u8>,
    synced: Vec<u8>,
    exists: bool,
    exists_synced: bool,
}

impl SimState {
    fn sync_dir(&mut self) {
        self.files.retain(|_, f| f.exists);
        for file in self.files.values_mut() {
            file.exists_synced = true;
        }
    }

    fn file(&mut self, name: &str) -> io::Result<&mut SimFile> {
        self.files
            .get_mut(name)
            .filter(|f| f.exists)
            .ok_or_else(|| io::ErrorKind::NotFound.into())
    }
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

impl SimFs {
    fn state(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Simulates a power loss: keeps synced bytes and names, plus up to
    /// `torn_bytes(file name, unsynced length)` of each file's first unsynced bytes.
    pub fn crash(&self, mut torn_bytes: impl FnMut(&str, usize) -> usize) {
        self.crash_with_holes(|name, unsynced| {
            let kept = torn_bytes(name, unsynced).min(unsynced);
            vec![(0, kept)]
        });
    }

    /// Simulates a power loss that keeps, of each file's unsynced bytes, the ranges
    /// `kept(file name, unsynced length)` gives (offsets from the first unsynced byte);
    /// the rest of them are zeroes, or the file's old contents where it had some.
    pub fn crash_with_holes(&self, mut kept: impl FnMut(&str, usize) -> Vec<(usize, usize)>) {
        let mut state = self.state();
        state.epoch += 1;
        state.files.retain(|_, file| file.exists_synced);
        for (name, file) in state.files.iter_mut() {
            let from = file.unsynced_from();
            let unsynced = file.written.len().saturating_sub(from);
            let mut image = file.synced.clone();
            for (start, len) in kept(name, unsynced) {
                let start = start.min(unsynced);
                let end = (start + len).min(unsynced);
                if image.len() < from + end {
                    image.resize(from + end, 0);
                }
                image[from + start..from + end]
                    .copy_from_slice(&file.written[from + start..from + end]);
            }
            file.written = image.clone();
            file.synced = image;
            file.exists = true;
        }
    }

    /// A handle for the process that starts after the latest crash.
    pub fn after_crash(&self) -> SimFs {
        SimFs {
            state: self.state.clone(),
            epoch: self.state().epoch,
        }
    }

    /// Makes every later operation fail, as a dying disk would.
    pub fn fail_from_now_on(&self) {
        self.state().failing = true;
    }

    /// Bytes in the files whose names end with `suffix`.
    pub fn bytes_in(&self, suffix: &str) -> usize {
        self.state()
            .files
            .iter()
            .filter(|(name, file)| file.exists && name.ends_with(suffix))
            .map(|(_, file)| file.written.len())
            .sum()
    }

    /// How many files were renamed from a spare's name to a segment's: reused.
    pub fn reused_files(&self) -> usize {
        self.state().reused
    }

    /// Overwrites part of a file, durably (to plant corruption in tests).
    pub fn corrupt(&self, name: &str, offset: usize, bytes: &[u8]) {
        let mut state = self.state();
        let file = state.file(name).expect("the file exists");
        file.written[offset..offset + bytes.len()].copy_from_slice(bytes);
        file.synced = file.written.clone();
    }

    /// Puts a file with these bytes in place, durably.
    pub fn put(&self, name: &str, bytes: &[u8]) {
        self.state().files.insert(
            name.to_owned(),
            SimFile {
                written: bytes.to_vec(),
                synced: bytes.to_vec(),
                exists: true,
                exists_synced: true,
            },
        );
    }

    /// The bytes written to a file, synced or not.
    pub fn written(&self, name: &str) -> io::Result<Vec<u8>> {
        let mut state = self.state();
        self.check(&state)?;
        Ok(state.file(name)?.written.clone())
    }

    fn with_file<T>(&self, name: &str, act: impl FnOnce(&mut SimFile) -> T) -> io::Result<T> {
        let mut state = self.state();
        self.check(&state)?;
        Ok(act(state.file(name)?))
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

impl FileSystem for SimFs {
    fn list(&self) -> io::Result<Vec<String>> {
        let state = self.state();
        self.check(&state)?;
        Ok(state
            .files
            .iter()
            .filter(|(_, f)| f.exists)
            .map(|(name, _)| name.clone())
            .collect())
    }

    fn open(&self, name: &str) -> io::Result<Box<dyn io::Read + Send>> {
        Ok(Box::new(io::Cursor::new(self.written(name)?)))
    }

    fn create(&self, name: &str) -> io::Result<Box<dyn FileWriter>> {
        let mut state = self.state();
        self.check(&state)?;
        if state.file(name).is_ok() {
            return Err(io::ErrorKind::AlreadyExists.into());
        }
        state.files.insert(
            name.to_owned(),
            SimFile {
                exists: true,
                ..SimFile::default()
            },
        );
        Ok(Box::new(SimWriter {
            fs: self.clone(),
            name: name.to_owned(),
            written: 0,
        }))
    }

    fn overwrite(&self, name: &str) -> io::Result<Box<dyn FileWriter>> {
        self.with_file(name, |_| ())?;
        Ok(Box::new(SimWriter {
            fs: self.clone(),
            name: name.to_owned(),
            written: 0,
        }))
    }

    fn len(&self, name: &str) -> io::Result<u64> {
        self.with_file(name, |file| file.written.len() as u64)
    }

    fn set_len(&self, name: &str, len: u64) -> io::Result<()> {
        self.with_file(name, |file| file.written.resize(len as usize, 0))
    }

    fn sync_file(&self, name: &str) -> io::Result<()> {
        self.with_file(name, |file| file.synced = file.written.clone())
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut state = self.state();
        self.check(&state)?;
        if state.file(to).is_ok() {
            return Err(io::ErrorKind::AlreadyExists.into());
        }
        let file = state.file(from)?;
        file.exists = false;
        let moved = SimFile {
            exists: true,
            exists_synced: false,
            ..file.clone()
        };
        state.files.insert(to.to_owned(), moved);
        if from.ends_with(".seg.spare") && to.ends_with(".seg") {
            state.reused += 1;
        }
        Ok(())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let mut state = self.state();
        self.check(&state)?;
        state.file(name)?.exists = false;
        Ok(())
    }

    fn sync_dir(&self) -> io::Result<()> {
        let mut state = self.state();
        self.check(&state)?;
        state.sync_dir();
        Ok(())
    }

    fn describe(&self, name: &str) -> String {
        format!("simulated {name}")
    }
}

struct SimWriter {
    fs: SimFs,
    name: String,
    /// Bytes written from the start.
    written: usize,
}

impl FileWriter for SimWriter {
    fn append(&mut self, chunks: &[&[u8]]) -> io::Result<()> {
        let at = self.written;
        let len: usize = chunks.iter().map(|chunk| chunk.len()).sum();
        self.fs.with_file(&self.name, |file| {
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
        self.fs.sync_file(&self.name)
    }
}
