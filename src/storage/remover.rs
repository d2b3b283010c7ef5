//! The thread that takes segments the log no longer needs out of it, so that the writer
//! never waits for a deletion. Most become spares for the writer to reuse (a rename; see
//! [`super::backend::SPARE_FILES_MAX`]); the others are deleted. Unlinking a file frees
//! its blocks, and on a file system mounted with `discard` (this project's VM) it also
//! trims them: a 64 MiB segment took 15 ms to unlink, and while the writer did that,
//! every confirm waited behind it.
//!
//! The writer asks only once everything that replaces the old segments (the acks that
//! emptied them, the copies compaction made) is durable. Segments go oldest first and a
//! removal stops at the first failure, so what remains is always a suffix of the log:
//! an ack record never goes while the publish it cancels stays. A failed removal is
//! logged and retried with the next one; the segments stay on disk meanwhile.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

use tracing::{error, info};

use super::FsyncPolicy;
use super::segments::Segments;

/// Handle to the remover thread; dropping it waits for the removals asked for so far.
pub(crate) struct Remover {
    requests: Option<Sender<u64>>,
    thread: Option<JoinHandle<()>>,
}

impl Remover {
    pub fn spawn(backend: Arc<Segments>, fsync: FsyncPolicy) -> std::io::Result<Remover> {
        let (requests, received) = channel();
        let thread = std::thread::Builder::new()
            .name("ferry-log-remove".into())
            .spawn(move || serve(backend.as_ref(), fsync, &received))?;
        Ok(Remover {
            requests: Some(requests),
            thread: Some(thread),
        })
    }

    /// Asks for every segment numbered below `number` to be removed, and returns at once.
    pub fn remove_before(&self, number: u64) {
        if let Some(requests) = &self.requests {
            // The thread only stops once this handle is dropped.
            let _ = requests.send(number);
        }
    }
}

impl Drop for Remover {
    fn drop(&mut self) {
        self.requests = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(backend: &Segments, fsync: FsyncPolicy, requests: &Receiver<u64>) {
    while let Ok(mut below) = requests.recv() {
        // Requests that queued up meanwhile: the newest covers them all.
        while let Ok(newer) = requests.try_recv() {
            below = below.max(newer);
        }
        remove_below(backend, fsync, below);
    }
}

fn remove_below(backend: &Segments, fsync: FsyncPolicy, below: u64) {
    let segments = match backend.list_segments() {
        Ok(segments) => segments,
        Err(e) => {
            error!(error = %e, "cannot list the log's segments to remove old ones; retried with the next removal");
            return;
        }
    };
    let mut removed = 0;
    for number in segments.into_iter().filter(|n| *n < below) {
        if let Err(e) = backend.remove_segment(number) {
            // Stop here: removing a newer segment while this one stays could take away the
            // acks of messages it holds.
            error!(segment = %backend.describe(number), error = %e,
                "cannot remove a log segment nothing needs any more; it stays on disk until the next removal retries");
            break;
        }
        removed += 1;
    }
    if removed == 0 {
        return;
    }
    if fsync == FsyncPolicy::Always
        && let Err(e) = backend.sync_dir()
    {
        // Not a loss: a removal that does not last only brings back dead records, which
        // the next start removes again.
        error!(error = %e, "cannot sync the data directory after removing log segments");
    }
    info!(
        removed,
        "log segments removed: every message in them is acked or copied forward"
    );
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::Mutex;

    use super::*;
    use crate::storage::backend::{FileSystem, FileWriter, SimFs};
    use crate::storage::segments::segment_file_name;

    /// The simulated disk, except that taking one chosen file out of the log fails.
    struct RefusesToRemove {
        disk: SimFs,
        refused: Mutex<Option<String>>,
    }

    impl RefusesToRemove {
        fn check(&self, name: &str) -> io::Result<()> {
            match &*self.refused.lock().unwrap() {
                Some(refused) if refused == name => Err(io::Error::other("refused by the test")),
                _ => Ok(()),
            }
        }
    }

    impl FileSystem for RefusesToRemove {
        fn list(&self) -> io::Result<Vec<String>> {
            self.disk.list()
        }
        fn open(&self, name: &str) -> io::Result<Box<dyn io::Read + Send>> {
            self.disk.open(name)
        }
        fn create(&self, name: &str) -> io::Result<Box<dyn FileWriter>> {
            self.disk.create(name)
        }
        fn overwrite(&self, name: &str) -> io::Result<Box<dyn FileWriter>> {
            self.disk.overwrite(name)
        }
        fn len(&self, name: &str) -> io::Result<u64> {
            self.disk.len(name)
        }
        fn set_len(&self, name: &str, len: u64) -> io::Result<()> {
            self.disk.set_len(name, len)
        }
        fn sync_file(&self, name: &str) -> io::Result<()> {
            self.disk.sync_file(name)
        }
        fn rename(&self, from: &str, to: &str) -> io::Result<()> {
            self.check(from)?;
            self.disk.rename(from, to)
        }
        fn remove(&self, name: &str) -> io::Result<()> {
            self.check(name)?;
            self.disk.remove(name)
        }
        fn sync_dir(&self) -> io::Result<()> {
            self.disk.sync_dir()
        }
        fn describe(&self, name: &str) -> String {
            self.disk.describe(name)
        }
    }

    #[test]
    fn a_failed_removal_keeps_every_newer_segment_and_is_retried_next_time() {
        let disk = Arc::new(RefusesToRemove {
            disk: SimFs::default(),
            refused: Mutex::new(Some(segment_file_name(2))),
        });
        let segments = Segments::new(disk.clone(), 1 << 20);
        for number in 1..=4 {
            segments.create_segment(number).unwrap();
        }
        remove_below(&segments, FsyncPolicy::Always, 4);
        assert_eq!(
            segments.list_segments().unwrap(),
            [2, 3, 4],
            "segment 3 may hold the acks of messages in segment 2"
        );
        *disk.refused.lock().unwrap() = None;
        remove_below(&segments, FsyncPolicy::Always, 4);
        assert_eq!(segments.list_segments().unwrap(), [4]);
    }
}
