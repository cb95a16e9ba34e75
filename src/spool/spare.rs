//! Spare files: a finished message's file is kept for the next commit instead of
//! being unlinked, so steady traffic neither allocates nor frees an inode per message.
//!
//! Why (issue 17): on ext4 every inode allocation skips the inodes deleted in the
//! last ~35 s (`recently_deleted()`, checked when the file system has no journal), so
//! at a few thousand messages per second each create scans tens of thousands of them;
//! the profile showed that scan and the directory lock held during it taking half of
//! tenso's CPU, and throughput falling by half within 40,000 messages. Reusing files
//! keeps that cost at zero however many messages went through.
//!
//! The rules that keep this as safe as unlinking:
//! - A finished `ID.msg` is renamed into `spare/` only after its `ID.env` is gone, and
//!   it is reused only once a directory fsync of the queue that *started after* the
//!   rename has completed ([`Spares::take`] compares fsync generations). So no crash
//!   can bring back `ID.msg` naming a file that already holds another message.
//! - A reused file is renamed to `NEW.msg.tmp`, overwritten from the start and cut to
//!   its new length before the data fsync; the usual commit protocol follows.
//! - The pool is bounded in count, in total size and in file size (larger files are
//!   unlinked), and start-up empties `spare/`: a spare file is never anybody's mail.
//!
//! Blocking I/O: callers run it on tokio's blocking pool.

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Spare files kept at most. As many as the backlog a burst can leave (messages
/// accepted faster than delivered): a pool smaller than the backlog empties, new
/// files are created for the rest, and the surplus unlinked after the burst brings
/// the `recently_deleted()` scan back (measured: 1,024 was too few at 50 sessions).
const MAX_SPARES: usize = 16 * 1024;
/// Disk space the pool may hold in all (bytes of the files' lengths).
const MAX_POOL_BYTES: u64 = 64 * 1024 * 1024;
/// Larger finished files are unlinked: the pool must not hold much disk space.
const MAX_SPARE_BYTES: u64 = 256 * 1024;

/// A spare file, the fsync generation after which it may be reused, and its length.
type Spare = (PathBuf, u64, u64);

pub(super) struct Spares {
    dir: PathBuf,
    /// Spare files with the fsync generation that makes each reusable, their lengths,
    /// and the sum of those lengths.
    free: Mutex<(VecDeque<Spare>, u64)>,
    /// Generation of the last queue directory fsync started, and of the last one
    /// completed successfully (set by the dirsync thread).
    pub started: AtomicU64,
    pub done: AtomicU64,
}

impl Spares {
    /// Opens (creating) `dir` and removes whatever a previous run left in it.
    pub fn open(dir: &Path) -> std::io::Result<Spares> {
        crate::disk::create_dir_durable(dir, crate::disk::PRIVATE)?;
        for e in fs::read_dir(dir)? {
            fs::remove_file(e?.path())?;
        }
        Ok(Spares {
            dir: dir.to_owned(),
            free: Mutex::new((VecDeque::new(), 0)),
            started: AtomicU64::new(0),
            done: AtomicU64::new(0),
        })
    }

    /// A spare file that is safe to overwrite, if there is one.
    pub fn take(&self) -> Option<PathBuf> {
        let done = self.done.load(Ordering::Acquire);
        let mut free = self.free.lock();
        let (list, bytes) = &mut *free;
        match list.front() {
            Some((_, need, _)) if *need <= done => {
                let (p, _, len) = list.pop_front()?;
                *bytes -= len;
                Some(p)
            }
            _ => None,
        }
    }

    /// Moves the finished file `msg` (of message `id`) into the pool, or unlinks it
    /// when the pool is full or the file large.
    pub fn put(&self, id: &str, msg: &Path) -> std::io::Result<()> {
        let len = fs::metadata(msg)?.len();
        let room = {
            let free = self.free.lock();
            free.0.len() < MAX_SPARES && free.1 + len <= MAX_POOL_BYTES
        };
        if !room || len > MAX_SPARE_BYTES {
            return fs::remove_file(msg);
        }
        let to = self.dir.join(id);
        fs::rename(msg, &to)?;
        // Reusable after an fsync that starts from now on has completed.
        let need = self.started.load(Ordering::Acquire) + 1;
        let mut free = self.free.lock();
        free.0.push_back((to, need, len));
        free.1 += len;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.free.lock().0.len()
    }
}
