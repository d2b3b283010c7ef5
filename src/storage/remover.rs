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
use super::backend::Backend;

/// Handle to the remover thread; dropping it waits for the removals asked for so far.
pub(crate) struct Remover {
    requests: Option<Sender<u64>>,
    thread: Option<JoinHandle<()>>,
}

impl Remover {
    pub fn spawn(backend: Arc<dyn Backend>, fsync: FsyncPolicy) -> std::io::Result<Remover> {
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

fn serve(backend: &dyn Backend, fsync: FsyncPolicy, requests: &Receiver<u64>) {
    while let Ok(mut below) = requests.recv() {
        // Requests that queued up meanwhile: the newest covers them all.
        while let Ok(newer) = requests.try_recv() {
            below = below.max(newer);
        }
        remove_below(backend, fsync, below);
    }
}

fn remove_below(backend: &dyn Backend, fsync: FsyncPolicy, below: u64) {
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
    use crate::storage::backend::{SegmentWriter, SimBackend};

    /// The simulated disk, except that removing one chosen segment fails.
    struct RefusesToRemove {
        disk: SimBackend,
        refused: Mutex<Option<u64>>,
    }

    impl Backend for RefusesToRemove {
        fn list_segments(&self) -> io::Result<Vec<u64>> {
            self.disk.list_segments()
        }
        fn open_segment(&self, number: u64) -> io::Result<Box<dyn io::Read + Send>> {
            self.disk.open_segment(number)
        }
        fn create_segment(&self, number: u64) -> io::Result<Box<dyn SegmentWriter>> {
            self.disk.create_segment(number)
        }
        fn truncate_segment(&self, number: u64, len: u64) -> io::Result<()> {
            self.disk.truncate_segment(number, len)
        }
        fn remove_segment(&self, number: u64) -> io::Result<()> {
            if *self.refused.lock().unwrap() == Some(number) {
                return Err(io::Error::other("refused by the test"));
            }
            self.disk.remove_segment(number)
        }
        fn sync_dir(&self) -> io::Result<()> {
            self.disk.sync_dir()
        }
        fn describe(&self, number: u64) -> String {
            self.disk.describe(number)
        }
    }

    #[test]
    fn a_failed_removal_keeps_every_newer_segment_and_is_retried_next_time() {
        let backend = RefusesToRemove {
            disk: SimBackend::default(),
            refused: Mutex::new(Some(2)),
        };
        for number in 1..=4 {
            backend.create_segment(number).unwrap();
        }
        remove_below(&backend, FsyncPolicy::Always, 4);
        assert_eq!(
            backend.list_segments().unwrap(),
            [2, 3, 4],
            "segment 3 may hold the acks of messages in segment 2"
        );
        *backend.refused.lock().unwrap() = None;
        remove_below(&backend, FsyncPolicy::Always, 4);
        assert_eq!(backend.list_segments().unwrap(), [4]);
    }
}
