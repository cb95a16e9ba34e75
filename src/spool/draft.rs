//! A message still arriving, past what a session may hold in memory: its bytes go to
//! `queue/ID.data.tmp` in bounded chunks as DATA brings them, so memory does not
//! grow with message size.
//!
//! A draft is never a commitment: nothing in it is fsynced, it carries no envelope,
//! and start-up recovery removes it with every other `*.tmp`. It becomes mail only
//! through [`super::Spool::commit_with_draft`], which copies it (in the kernel,
//! `copy_file_range`) into the `ID.msg.tmp` that the usual commit protocol fsyncs and
//! renames. Dropping a draft removes its file. All file work runs on tokio's blocking
//! pool, never on an async worker.

use super::{SpoolError, io_err};
use crate::disk;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Bytes read at a time by [`Draft::scan`].
pub const SCAN_PIECE: usize = 64 * 1024;

pub struct Draft {
    /// None once the file is gone (committed or removed).
    path: Option<PathBuf>,
    /// The open file; taken while a blocking write runs.
    file: Option<File>,
    len: u64,
    eight_bit: bool,
}

impl Draft {
    /// Creates the draft file (blocking; the spool calls this on the blocking pool).
    pub(super) fn create(path: PathBuf) -> Result<Draft, SpoolError> {
        let file = disk::create_file(&path, disk::PRIVATE, true).map_err(io_err(&path))?;
        Ok(Draft {
            path: Some(path),
            file: Some(file),
            len: 0,
            eight_bit: false,
        })
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether any byte written so far is above 127 (for the envelope's `eight_bit`).
    pub fn eight_bit(&self) -> bool {
        self.eight_bit
    }

    pub(super) fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Appends `buf` and gives it back emptied (its capacity is reused by the caller).
    pub async fn append(&mut self, mut buf: Vec<u8>) -> Result<Vec<u8>, SpoolError> {
        let path = self.path.clone().ok_or(SpoolError::Closed)?;
        let mut file = self.file.take().ok_or(SpoolError::Closed)?;
        self.eight_bit |= !buf.is_ascii();
        let n = buf.len() as u64;
        let (file, buf, res) = tokio::task::spawn_blocking(move || {
            let res = file.write_all(&buf).map_err(io_err(&path));
            buf.clear();
            (file, buf, res)
        })
        .await
        .map_err(|_| SpoolError::Closed)?;
        self.file = Some(file);
        res?;
        self.len += n;
        Ok(buf)
    }

    /// The whole draft, for the checks that need the message in one piece.
    pub async fn read_all(&self) -> Result<Vec<u8>, SpoolError> {
        let path = self.path.clone().ok_or(SpoolError::Closed)?;
        let len = self.len as usize;
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::with_capacity(len);
            File::open(&path)
                .and_then(|mut f| f.read_to_end(&mut out))
                .map_err(io_err(&path))?;
            Ok(out)
        })
        .await
        .map_err(|_| SpoolError::Closed)?
    }

    /// Reads the draft in pieces of [`SCAN_PIECE`] on the blocking pool, handing each
    /// to `f` with `state`, which comes back: for checks that read a whole message
    /// without holding it (DKIM body hashes).
    pub async fn scan<T: Send + 'static>(
        &self,
        state: T,
        f: fn(&mut T, &[u8]),
    ) -> Result<T, SpoolError> {
        let path = self.path.clone().ok_or(SpoolError::Closed)?;
        tokio::task::spawn_blocking(move || {
            let mut state = state;
            let mut file = File::open(&path).map_err(io_err(&path))?;
            let mut piece = vec![0u8; SCAN_PIECE];
            loop {
                match file.read(&mut piece) {
                    Ok(0) => return Ok(state),
                    Ok(n) => f(&mut state, &piece[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io_err(&path)(e)),
                }
            }
        })
        .await
        .map_err(|_| SpoolError::Closed)?
    }

    /// The file was moved into a commit: nothing left to remove.
    pub(super) fn consumed(&mut self) {
        self.path = None;
        self.file = None;
    }
}

impl Drop for Draft {
    /// A draft nobody committed (refused, too big, connection lost) leaves nothing.
    fn drop(&mut self) {
        let Some(path) = self.path.take() else { return };
        drop(self.file.take());
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(move || fs::remove_file(&path));
            }
            Err(_) => {
                let _ = fs::remove_file(&path);
            }
        }
    }
}
