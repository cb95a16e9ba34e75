//! Spare files: a finished message's file is kept for the next commit instead of
//! being unlinked, so steady traffic neither allocates nor frees an inode per message.
//!
//! Why (issue 17): on ext4 every inode allocation skips the inodes deleted in the
//! last 60 s, 360 s while their inode table block is dirty (`recently_deleted()`,
//! checked when the file system has no journal), so at a few thousand messages per
//! second each create scans tens of thousands of them; the profile showed that scan and the directory lock held during it taking half of
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
//! - The pool is bounded in count (beyond it files are unlinked) and in the disk space
//!   it holds: a file past the byte budget, or larger than [`MAX_SPARE_BYTES`], keeps
//!   its inode but is cut to nothing as it enters the pool. Unlinking it instead would
//!   bring the `recently_deleted()` scan back for the next creates, and after a run of
//!   large messages that is every create of the next run. Cutting is not reusing: if
//!   a crash undid the rename, `ID.msg` would come back empty, which recovery
//!   quarantines — the message was delivered already (only finished messages are
//!   removed), so nothing is lost and nothing is sent with another message's content.
//! - Start-up keeps what a previous run left in `spare/`, cut to nothing, and reusable
//!   only after this run's first directory fsync (the previous run may have been killed
//!   before the one that covered its last renames). Emptying `spare/` by unlinking
//!   would make each of the next creates scan every file just unlinked.
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
/// Larger finished files are cut to nothing in the pool: it must not hold much disk.
const MAX_SPARE_BYTES: u64 = 256 * 1024;

/// A spare file, the fsync generation after which it may be reused, and the length
/// it counts for in the pool (0 for one that is to be cut).
type Spare = (PathBuf, u64, u64);

pub(super) struct Spares {
    dir: PathBuf,
    /// Files kept at most ([`MAX_SPARES`]).
    max: usize,
    /// Spare files with the fsync generation that makes each reusable, their lengths,
    /// and the sum of those lengths.
    free: Mutex<(VecDeque<Spare>, u64)>,
    /// Generation of the last queue directory fsync started, and of the last one
    /// completed successfully (set by the dirsync thread).
    pub started: AtomicU64,
    pub done: AtomicU64,
}

impl Spares {
    /// Opens (creating) `dir`: the files a previous run left in it are cut to nothing
    /// and kept, reusable after the first directory fsync.
    pub fn open(dir: &Path) -> std::io::Result<Spares> {
        Spares::open_bounded(dir, MAX_SPARES)
    }

    /// [`Spares::open`] holding at most `max` files.
    fn open_bounded(dir: &Path, max: usize) -> std::io::Result<Spares> {
        crate::disk::create_dir_durable(dir, crate::disk::PRIVATE)?;
        let mut list = VecDeque::new();
        for e in fs::read_dir(dir)? {
            let path = e?.path();
            if list.len() >= max {
                fs::remove_file(&path)?;
                continue;
            }
            fs::OpenOptions::new().write(true).open(&path)?.set_len(0)?;
            list.push_back((path, 1, 0));
        }
        Ok(Spares {
            dir: dir.to_owned(),
            max,
            free: Mutex::new((list, 0)),
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

    /// Moves the finished file `msg` (of message `id`) into the pool (cut to nothing
    /// first when it is large or the pool holds its byte budget), or unlinks it when
    /// the pool is full.
    pub fn put(&self, id: &str, msg: &Path) -> std::io::Result<()> {
        let len = fs::metadata(msg)?.len();
        let (room, fits) = {
            let free = self.free.lock();
            (
                free.0.len() < self.max,
                len <= MAX_SPARE_BYTES && free.1 + len <= MAX_POOL_BYTES,
            )
        };
        if !room {
            return fs::remove_file(msg);
        }
        if !fits {
            fs::OpenOptions::new().write(true).open(msg)?.set_len(0)?;
        }
        let to = self.dir.join(id);
        fs::rename(msg, &to)?;
        // Reusable after an fsync that starts from now on has completed.
        let need = self.started.load(Ordering::Acquire) + 1;
        let counted = if fits { len } else { 0 };
        let mut free = self.free.lock();
        free.0.push_back((to, need, counted));
        free.1 += counted;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.free.lock().0.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Makes every rename so far covered by a (pretend) directory fsync.
    fn synced(s: &Spares) {
        let g = s.started.fetch_add(1, Ordering::SeqCst) + 1;
        s.done.store(g, Ordering::SeqCst);
    }

    #[test]
    fn a_large_finished_file_keeps_its_inode_cut_to_nothing() {
        let d = tempfile::tempdir().unwrap();
        let s = Spares::open(&d.path().join("spare")).unwrap();
        let msg = d.path().join("BIG.msg");
        fs::write(&msg, vec![b'x'; MAX_SPARE_BYTES as usize + 1]).unwrap();
        s.put("BIG", &msg).unwrap();
        let spare = d.path().join("spare/BIG");
        assert_eq!(fs::metadata(&spare).unwrap().len(), 0);
        assert_eq!(s.free.lock().1, 0, "a cut file counts for nothing");
        // Not yet covered by an fsync: not reused.
        assert_eq!(s.take(), None);
        synced(&s);
        assert_eq!(s.take(), Some(spare));
    }

    #[test]
    fn start_up_keeps_the_pool_cut_and_bounded_in_count() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("spare");
        fs::create_dir(&dir).unwrap();
        for i in 0..8 {
            fs::write(dir.join(format!("{i:X}")), b"old").unwrap();
        }
        let s = Spares::open_bounded(&dir, 5).unwrap();
        assert_eq!(s.len(), 5);
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 5);
        // Left by an earlier run: empty, and reusable after this run's first fsync.
        assert_eq!(s.take(), None);
        synced(&s);
        let first = s.take().unwrap();
        assert_eq!(fs::metadata(&first).unwrap().len(), 0);
        let msg = d.path().join("ONE.msg");
        fs::write(&msg, b"x").unwrap();
        s.put("ONE", &msg).unwrap();
        assert!(dir.join("ONE").exists());
        let msg = d.path().join("TWO.msg");
        fs::write(&msg, b"x").unwrap();
        s.put("TWO", &msg).unwrap();
        assert!(
            !msg.exists() && !dir.join("TWO").exists(),
            "a full pool unlinks"
        );
    }
}
