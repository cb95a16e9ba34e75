//! The durable queue on disk: one file per message, plus an envelope file once its
//! delivery state changes.
//!
//! The only code that touches spool files. Commit protocol (the promise behind every
//! 250): the envelope and the message are written together to `ID.msg.tmp` (a short
//! header line, the envelope as JSON, then the message), fsynced, and renamed to
//! `ID.msg` — that rename is the commit point — and the directory is fsynced.
//! Directory fsyncs are group-committed by one thread: every commit that arrives
//! while an fsync runs is covered by the next one, so under load one fsync serves
//! many messages, and a message costs one data fsync and two renames — the common
//! case (delivered at the first attempt) never writes anything else. A finished
//! `ID.msg` is not unlinked but kept in `spare/` and reused by a later commit
//! (`spare.rs`: why, and when reuse is safe); a message too large for memory arrives
//! in a draft (`draft.rs`) that the commit copies into its `ID.msg.tmp`.
//! Later delivery state goes to `ID.env` by temp → fsync → rename → dir fsync; it
//! supersedes the envelope inside `ID.msg`. Removal unlinks `ID.env` first, so a crash
//! can at worst bring back the first envelope (a repeated delivery), never lose one.
//! A corrupt `ID.env` falls back to the envelope committed in `ID.msg` (logged and
//! counted); only a message whose own file is unreadable is quarantined.
//!
//! A failed write (a full disk) removes its temp file at once, and a commit whose
//! directory fsync failed removes the renamed file: nothing half-written stays behind,
//! and the caller's 4xx is the truth. Queue ids are checked before they name a file
//! ([`valid_id`]), so no caller can reach outside the queue directory. Files are 0600
//! and directories 0700 whatever the umask. All of this is blocking I/O and runs on
//! tokio's blocking pool, never on an async worker.

mod draft;
mod envelope;
mod spare;

pub use draft::Draft;
pub use envelope::{Envelope, MessageKind, Rcpt, RcptState};

use crate::disk;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc;
use tokio::sync::oneshot;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool I/O error on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("corrupt envelope {path}: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("no such message in the queue: {0}")]
    NotFound(String),
    #[error("invalid queue id {0:?} (queue ids are hex digits, as `tenso queue list` shows them)")]
    BadId(String),
    #[error("the spool's commit thread is gone")]
    Closed,
}

impl SpoolError {
    /// The disk (or quota) is full: a temporary condition the client should retry.
    pub fn is_no_space(&self) -> bool {
        matches!(self, SpoolError::Io { source, .. } if disk::is_no_space(source))
    }
}

/// Whether `id` can be a queue id: 1 to 32 upper-case hex digits, as [`Spool::new_id`]
/// makes them. Nothing else may name a spool file (`../x`, `a/b`, `.`, empty).
pub fn valid_id(id: &str) -> bool {
    (1..=32).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What recovery found at start.
#[derive(Debug, Default)]
pub struct Recovered {
    pub envelopes: Vec<Envelope>,
    pub partial_removed: usize,
    pub quarantined: usize,
    /// Corrupt `ID.env` files set aside; their messages resumed from `ID.msg`.
    pub env_fallbacks: usize,
}

#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    quarantine: PathBuf,
    /// Finished message files kept for reuse (`spare.rs`).
    spares: Arc<spare::Spares>,
    dir_sync: mpsc::Sender<oneshot::Sender<io::Result<()>>>,
    seq: AtomicU32,
    /// Corrupt `ID.env` read, envelope taken from `ID.msg` instead.
    env_fallbacks: AtomicU64,
}

impl Spool {
    /// Opens (creating) the queue directory and its sibling `spare/` (kept, see `spare.rs`), and
    /// starts the directory-sync thread.
    pub fn open(dir: &Path, quarantine: &Path) -> Result<Spool, SpoolError> {
        disk::create_dir_durable(dir, disk::PRIVATE).map_err(io_err(dir))?;
        let spare_dir = dir.with_file_name("spare");
        let spares = Arc::new(spare::Spares::open(&spare_dir).map_err(io_err(&spare_dir))?);
        let (tx, rx) = mpsc::channel::<oneshot::Sender<io::Result<()>>>();
        let dir_file = File::open(dir).map_err(io_err(dir))?;
        let gens = spares.clone();
        std::thread::Builder::new()
            .name("spool-dirsync".into())
            .spawn(move || {
                // Group commit: take one request, then everything that queued up
                // behind it, and answer all of them with a single fsync.
                while let Ok(first) = rx.recv() {
                    let mut waiting = vec![first];
                    waiting.extend(rx.try_iter());
                    let g = gens.started.fetch_add(1, Ordering::SeqCst) + 1;
                    let res = dir_file.sync_all();
                    if res.is_ok() {
                        gens.done.store(g, Ordering::SeqCst);
                    }
                    for w in waiting {
                        let _ = w.send(match &res {
                            Ok(()) => Ok(()),
                            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                        });
                    }
                }
            })
            .map_err(io_err(dir))?;
        Ok(Spool {
            inner: Arc::new(Inner {
                dir: dir.to_owned(),
                quarantine: quarantine.to_owned(),
                spares,
                dir_sync: tx,
                seq: AtomicU32::new(rand::random::<u16>() as u32),
                env_fallbacks: AtomicU64::new(0),
            }),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Free bytes on the spool's file system (one `statvfs`, a few microseconds).
    pub fn free_space(&self) -> io::Result<u64> {
        disk::free_space(&self.inner.dir)
    }

    /// Spare files waiting for reuse (for the status output and tests).
    pub fn spares(&self) -> usize {
        self.inner.spares.len()
    }

    /// How many corrupt `ID.env` files were replaced by the envelope in `ID.msg`.
    pub fn env_fallbacks(&self) -> u64 {
        self.inner.env_fallbacks.load(Ordering::Relaxed)
    }

    /// When the message with queue id `id` arrived, in microseconds since the epoch
    /// (the id's first 13 hex digits, see [`Spool::new_id`]); None for other ids.
    pub fn id_micros(id: &str) -> Option<i64> {
        i64::from_str_radix(id.get(..13)?, 16).ok()
    }

    /// A new queue id: microseconds since the epoch and a counter, in hex. Ids sort
    /// by arrival and never repeat within a process; the random counter start keeps a
    /// restarted daemon from reusing the ids of the previous run in the same µs.
    pub fn new_id(&self) -> String {
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros())
            .unwrap_or(0);
        let n = self.inner.seq.fetch_add(1, Ordering::Relaxed) & 0xfffff;
        format!("{micros:013X}{n:05X}")
    }

    /// The file `ID.ext`; ids that are not queue ids never name a file.
    fn path(&self, id: &str, ext: &str) -> Result<PathBuf, SpoolError> {
        if !valid_id(id) {
            return Err(SpoolError::BadId(id.to_string()));
        }
        Ok(self.inner.dir.join(format!("{id}.{ext}")))
    }

    async fn sync_dir(&self) -> Result<(), SpoolError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .dir_sync
            .send(tx)
            .map_err(|_| SpoolError::Closed)?;
        rx.await
            .map_err(|_| SpoolError::Closed)?
            .map_err(io_err(&self.inner.dir))
    }

    /// Writes message and envelope durably. When this returns Ok, the message
    /// survives a crash or power loss; only then may the client get its 250.
    pub async fn commit(&self, env: &Envelope, body: Arc<Vec<u8>>) -> Result<(), SpoolError> {
        self.commit_parts(env, body, None).await
    }

    /// A new draft for a message too large to hold in memory while it arrives.
    pub async fn draft(&self) -> Result<Draft, SpoolError> {
        let path = self.path(&self.new_id(), "data.tmp")?;
        tokio::task::spawn_blocking(move || Draft::create(path))
            .await
            .map_err(|_| SpoolError::Closed)?
    }

    /// Like [`Spool::commit`] for a message whose start is `head` and whose rest is
    /// `draft`: the draft's bytes are copied after `head` into the same `ID.msg.tmp`
    /// (in the kernel), then the one commit protocol runs. The draft file is gone
    /// afterwards, committed or not.
    pub async fn commit_with_draft(
        &self,
        env: &Envelope,
        head: Arc<Vec<u8>>,
        draft: &mut Draft,
    ) -> Result<(), SpoolError> {
        let tail = draft.path().map(Path::to_owned).ok_or(SpoolError::Closed)?;
        let res = self.commit_parts(env, head, Some(tail.clone())).await;
        draft.consumed();
        let _ = tokio::task::spawn_blocking(move || fs::remove_file(&tail)).await;
        res
    }

    async fn commit_parts(
        &self,
        env: &Envelope,
        body: Arc<Vec<u8>>,
        tail: Option<PathBuf>,
    ) -> Result<(), SpoolError> {
        // Compact JSON has no line breaks, and the header line ends in CRLF: the file
        // holds no bare LF, like the message after it.
        let env_bytes = serde_json::to_vec(env).expect("envelope serializes");
        let id = env.id.clone();
        let fin = self.path(&id, "msg")?;
        let tmp = self.path(&id, "msg.tmp")?;
        let f = fin.clone();
        let spares = self.inner.spares.clone();
        tokio::task::spawn_blocking(move || -> Result<(), SpoolError> {
            let head = format!("{MAGIC} {}\r\n", env_bytes.len());
            let reuse = spares.take();
            let parts = [head.as_bytes(), &env_bytes[..], &body[..]];
            write_synced(&tmp, &parts, tail.as_deref(), reuse.as_deref())?;
            rename_or_clean(&tmp, &f)
        })
        .await
        .map_err(|_| SpoolError::Closed)??;
        if let Err(e) = self.sync_dir().await {
            // Not known durable, so not committed: the client gets a 4xx and retries;
            // a file left here would be delivered as well (a duplicate).
            let _ = tokio::task::spawn_blocking(move || fs::remove_file(&fin)).await;
            return Err(e);
        }
        Ok(())
    }

    fn write_env_blocking(&self, id: &str, bytes: &[u8]) -> Result<(), SpoolError> {
        if !self.path(id, "msg")?.exists() {
            return Err(SpoolError::NotFound(id.to_string()));
        }
        let tmp = self.path(id, "env.tmp")?;
        let fin = self.path(id, "env")?;
        write_synced(&tmp, &[bytes], None, None)?;
        rename_or_clean(&tmp, &fin)
    }

    /// Replaces the envelope of a queued message (delivery state) durably.
    pub async fn update(&self, env: &Envelope) -> Result<(), SpoolError> {
        let this = self.clone();
        let bytes = env.to_bytes();
        let id = env.id.clone();
        tokio::task::spawn_blocking(move || this.write_env_blocking(&id, &bytes))
            .await
            .map_err(|_| SpoolError::Closed)??;
        self.sync_dir().await
    }

    /// Removes a finished message: its file becomes a spare for a later commit (or
    /// is unlinked). No fsync: if the removal is lost in a crash the message is
    /// delivered again (at-least-once), never lost.
    pub async fn remove(&self, id: &str) -> Result<(), SpoolError> {
        let this = self.clone();
        let id = id.to_string();
        tokio::task::spawn_blocking(move || this.remove_blocking(&id))
            .await
            .map_err(|_| SpoolError::Closed)?
    }

    pub fn remove_blocking(&self, id: &str) -> Result<(), SpoolError> {
        let env = self.path(id, "env")?;
        // Most messages never had an `ID.env`: a lookup (no directory lock) spares
        // them an unlink (which takes it). Only the queue writes `ID.env`, and not
        // while the message is being removed, so nothing appears in between.
        let had_env = match env.symlink_metadata() {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(io_err(&env)(e)),
        };
        if had_env {
            match fs::remove_file(&env) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&env)(e)),
                _ => {}
            }
        }
        let msg = self.path(id, "msg")?;
        match self.inner.spares.put(id, &msg) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(SpoolError::NotFound(id.to_string()))
            }
            Err(e) => Err(io_err(&msg)(e)),
        }
    }

    /// Reads `ID.msg`: the embedded envelope bytes and the message.
    fn read_msg_file(&self, id: &str) -> Result<(Vec<u8>, usize, usize), SpoolError> {
        let p = self.path(id, "msg")?;
        let bytes = fs::read(&p).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                SpoolError::NotFound(id.to_string())
            } else {
                io_err(&p)(e)
            }
        })?;
        let (env_start, body_start) = split_msg(&bytes).ok_or_else(|| SpoolError::Corrupt {
            path: p.clone(),
            message: "bad spool file header".into(),
        })?;
        Ok((bytes, env_start, body_start))
    }

    /// Reads a message body (blocking; call from a blocking context or CLI).
    pub fn read_body(&self, id: &str) -> Result<Vec<u8>, SpoolError> {
        let (mut bytes, _, body_start) = self.read_msg_file(id)?;
        bytes.drain(..body_start);
        Ok(bytes)
    }

    /// For a large message: where its body lies in `ID.msg` (to stream it from
    /// there), and its first `max` bytes in memory (for the header work).
    pub fn body_span(
        &self,
        id: &str,
        max: usize,
    ) -> Result<(PathBuf, u64, u64, Vec<u8>), SpoolError> {
        use std::io::{Read, Seek};
        let p = self.path(id, "msg")?;
        let not_found = |e: io::Error| {
            if e.kind() == io::ErrorKind::NotFound {
                SpoolError::NotFound(id.to_string())
            } else {
                io_err(&p)(e)
            }
        };
        let mut f = File::open(&p).map_err(not_found)?;
        let total = f.metadata().map_err(io_err(&p))?.len();
        let mut first = vec![0u8; 64];
        let n = f.read(&mut first).map_err(io_err(&p))?;
        first.truncate(n);
        let (_, body_start) = split_head(&first).ok_or_else(|| SpoolError::Corrupt {
            path: p.clone(),
            message: "bad spool file header".into(),
        })?;
        let start = body_start as u64;
        let len = total
            .checked_sub(start)
            .ok_or_else(|| SpoolError::Corrupt {
                path: p.clone(),
                message: "spool file shorter than its header says".into(),
            })?;
        f.seek(io::SeekFrom::Start(start)).map_err(io_err(&p))?;
        let mut head = Vec::with_capacity(max.min(len as usize));
        f.take(max as u64)
            .read_to_end(&mut head)
            .map_err(io_err(&p))?;
        Ok((p, start, len, head))
    }

    pub async fn read_body_async(&self, id: &str) -> Result<Vec<u8>, SpoolError> {
        let this = self.clone();
        let id = id.to_string();
        tokio::task::spawn_blocking(move || this.read_body(&id))
            .await
            .map_err(|_| SpoolError::Closed)?
    }

    /// The current envelope: `ID.env` when delivery state was recorded, else the
    /// one committed with the message. A corrupt `ID.env` (or one naming another
    /// message) is logged and counted, and the committed envelope is used instead.
    pub fn read_envelope(&self, id: &str) -> Result<Envelope, SpoolError> {
        match self.read_env_file(id) {
            Ok(Some(env)) => return Ok(env),
            Ok(None) => {}
            Err(SpoolError::Corrupt { path, message }) => {
                self.inner.env_fallbacks.fetch_add(1, Ordering::Relaxed);
                tracing::error!(queue_id = id, path = %path.display(), reason = %message, "corrupt envelope file: using the envelope committed with the message");
            }
            Err(e) => return Err(e),
        }
        self.committed_envelope(id)
    }

    /// `ID.env` if there is one; Corrupt when it does not parse or names another id.
    fn read_env_file(&self, id: &str) -> Result<Option<Envelope>, SpoolError> {
        let p = self.path(id, "env")?;
        let bytes = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&p)(e)),
        };
        match Envelope::from_bytes(&bytes) {
            Ok(env) if env.id == id => Ok(Some(env)),
            Ok(env) => Err(SpoolError::Corrupt {
                path: p,
                message: format!("envelope of another message ({})", env.id),
            }),
            Err(message) => Err(SpoolError::Corrupt { path: p, message }),
        }
    }

    /// The envelope written into `ID.msg` at the commit.
    fn committed_envelope(&self, id: &str) -> Result<Envelope, SpoolError> {
        let m = self.path(id, "msg")?;
        let head = read_head(&m).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                SpoolError::NotFound(id.to_string())
            } else {
                io_err(&m)(e)
            }
        })?;
        Envelope::from_bytes(&head).map_err(|message| SpoolError::Corrupt { path: m, message })
    }

    /// Writes an envelope synchronously (CLI direct mode, no daemon running).
    pub fn update_blocking(&self, env: &Envelope) -> Result<(), SpoolError> {
        self.write_env_blocking(&env.id, &env.to_bytes())?;
        disk::sync_dir(&self.inner.dir).map_err(io_err(&self.inner.dir))
    }

    /// Lists committed envelopes without changing anything (for `queue list` when no
    /// daemon runs).
    pub fn list(&self) -> Result<Vec<Envelope>, SpoolError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.inner.dir).map_err(io_err(&self.inner.dir))? {
            let entry = entry.map_err(io_err(&self.inner.dir))?;
            let name = entry.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".msg"))
                .filter(|i| valid_id(i))
            else {
                continue;
            };
            if let Ok(env) = self.read_envelope(id) {
                out.push(env);
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Start-up recovery: removes temp files (never acknowledged), sets corrupt
    /// `ID.env` files aside (the message resumes from the envelope in `ID.msg`), moves
    /// unreadable messages and envelopes without message to the quarantine directory,
    /// and returns every committed message with its current envelope.
    pub fn recover(&self) -> Result<Recovered, SpoolError> {
        let dir = &self.inner.dir;
        let mut rec = Recovered::default();
        let mut names = std::collections::BTreeSet::new();
        for entry in fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            if let Some(n) = entry.file_name().to_str() {
                names.insert(n.to_string());
            }
        }
        for name in &names {
            let path = dir.join(name);
            if name.ends_with(".tmp") {
                fs::remove_file(&path).map_err(io_err(&path))?;
                rec.partial_removed += 1;
                continue;
            }
            let (id, why) = if let Some(id) = name.strip_suffix(".msg").filter(|i| valid_id(i)) {
                match self.recover_one(id, &mut rec) {
                    Ok(env) => {
                        rec.envelopes.push(env);
                        continue;
                    }
                    Err(e) => (id, e.to_string()),
                }
            } else if let Some(id) = name.strip_suffix(".env").filter(|i| valid_id(i)) {
                if names.contains(&format!("{id}.msg")) {
                    continue;
                }
                (id, "envelope without message".to_string())
            } else {
                continue;
            };
            tracing::error!(queue_id = id, reason = %why, "quarantining spool entry");
            self.quarantine(id, &["env", "msg"])?;
            rec.quarantined += 1;
        }
        if rec.partial_removed + rec.quarantined + rec.env_fallbacks > 0 {
            disk::sync_dir(dir).map_err(io_err(dir))?;
        }
        Ok(rec)
    }

    /// The envelope a committed message resumes with. A corrupt `ID.env` is moved to
    /// the quarantine as `ID.env` (evidence) and the envelope in `ID.msg` is used.
    fn recover_one(&self, id: &str, rec: &mut Recovered) -> Result<Envelope, SpoolError> {
        match self.read_env_file(id) {
            Ok(Some(env)) => return Ok(env),
            Ok(None) => {}
            Err(SpoolError::Corrupt { message, .. }) => {
                let env = self.committed_envelope(id)?;
                if env.id != id {
                    return Err(SpoolError::Corrupt {
                        path: self.path(id, "msg")?,
                        message: "envelope of another message".into(),
                    });
                }
                tracing::error!(queue_id = id, reason = %message, "corrupt envelope file set aside: the message resumes from the envelope committed with it (a delivery or report may repeat)");
                self.quarantine(id, &["env"])?;
                self.inner.env_fallbacks.fetch_add(1, Ordering::Relaxed);
                rec.env_fallbacks += 1;
                return Ok(env);
            }
            Err(e) => return Err(e),
        }
        let env = self.committed_envelope(id)?;
        if env.id != id {
            return Err(SpoolError::Corrupt {
                path: self.path(id, "msg")?,
                message: "envelope of another message".into(),
            });
        }
        Ok(env)
    }

    fn quarantine(&self, id: &str, exts: &[&str]) -> Result<(), SpoolError> {
        let q = &self.inner.quarantine;
        disk::create_dir_durable(q, disk::PRIVATE).map_err(io_err(q))?;
        for ext in exts {
            let from = self.path(id, ext)?;
            if from.exists() {
                let to = q.join(format!("{id}.{ext}"));
                fs::rename(&from, &to).map_err(io_err(&to))?;
            }
        }
        disk::sync_dir(q).map_err(io_err(q))
    }
}

/// First token of a spool file (`TENSO-SPOOL-1 <envelope length>\r\n`).
const MAGIC: &str = "TENSO-SPOOL-1";

/// Offsets of the envelope and of the message from the first line of a spool file
/// (the message may lie beyond `bytes`).
fn split_head(bytes: &[u8]) -> Option<(usize, usize)> {
    let nl = bytes.iter().take(64).position(|&b| b == b'\n')?;
    let head = std::str::from_utf8(&bytes[..nl]).ok()?;
    let len: usize = head
        .trim_end_matches('\r')
        .strip_prefix(MAGIC)?
        .trim()
        .parse()
        .ok()?;
    Some((nl + 1, (nl + 1).checked_add(len)?))
}

/// Offsets of the envelope and of the message inside a spool file.
fn split_msg(bytes: &[u8]) -> Option<(usize, usize)> {
    let (env_start, body_start) = split_head(bytes)?;
    (body_start <= bytes.len()).then_some((env_start, body_start))
}

/// Reads only the envelope of a spool file (listings must not read whole messages).
fn read_head(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 8192];
    let mut n = 0;
    loop {
        let r = f.read(&mut buf[n..])?;
        n += r;
        if r == 0 || n == buf.len() {
            break;
        }
    }
    buf.truncate(n);
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "bad spool file header");
    let nl = buf
        .iter()
        .take(64)
        .position(|&b| b == b'\n')
        .ok_or_else(bad)?;
    let len: usize = std::str::from_utf8(&buf[..nl])
        .ok()
        .and_then(|h| h.trim_end_matches('\r').strip_prefix(MAGIC))
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(bad)?;
    let need = nl + 1 + len;
    if buf.len() < need {
        let mut rest = vec![0u8; need - buf.len()];
        f.read_exact(&mut rest)?;
        buf.extend_from_slice(&rest);
    }
    Ok(buf[nl + 1..need].to_vec())
}

/// Creates `path` (0600), writes the parts and then the whole file `tail` (a draft,
/// copied by `copy_file_range` without passing through user space), fsyncs (data
/// only: the rename and the directory fsync that follow make the name durable). The
/// file did not exist before: ids are unique, and a stale temp file from a crash is
/// truncated. On any failure the file is removed at once: a full disk must not keep
/// the space it could not use.
fn write_synced(
    path: &Path,
    parts: &[&[u8]],
    tail: Option<&Path>,
    reuse: Option<&Path>,
) -> Result<(), SpoolError> {
    let res = (|| {
        let mut f = open_for_write(path, reuse)?;
        let mut len = 0;
        for p in parts {
            f.write_all(p)?;
            len += p.len() as u64;
        }
        if let Some(t) = tail {
            len += io::copy(&mut File::open(t)?, &mut f)?;
        }
        // A reused file may be longer than what was written now.
        f.set_len(len)?;
        f.sync_data()
    })();
    res.map_err(|e| {
        let _ = fs::remove_file(path);
        io_err(path)(e)
    })
}

/// A new file at `path`, or the spare file `reuse` renamed there (overwritten from
/// its start; the caller cuts it to length). A spare that cannot be taken is
/// unlinked and a new file created: reuse is only ever an optimisation.
fn open_for_write(path: &Path, reuse: Option<&Path>) -> io::Result<File> {
    if let Some(spare) = reuse {
        match fs::rename(spare, path) {
            Ok(()) => return fs::OpenOptions::new().write(true).open(path),
            Err(_) => {
                let _ = fs::remove_file(spare);
            }
        }
    }
    disk::create_file(path, disk::PRIVATE, true)
}

/// Renames a written temp file into place, removing it if the rename fails.
fn rename_or_clean(tmp: &Path, fin: &Path) -> Result<(), SpoolError> {
    fs::rename(tmp, fin).map_err(|e| {
        let _ = fs::remove_file(tmp);
        io_err(fin)(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(id: &str) -> Envelope {
        Envelope::new_for_test(id)
    }

    #[tokio::test]
    async fn commit_list_update_remove() {
        let d = tempfile::tempdir().unwrap();
        let s = Spool::open(&d.path().join("q"), &d.path().join("quar")).unwrap();
        let id = s.new_id();
        let mut e = env(&id);
        s.commit(&e, Arc::new(b"Subject: x\r\n\r\nhi\r\n".to_vec()))
            .await
            .unwrap();
        assert_eq!(s.list().unwrap().len(), 1);
        e.held = true;
        s.update(&e).await.unwrap();
        assert!(s.read_envelope(&id).unwrap().held);
        assert_eq!(s.read_body(&id).unwrap(), b"Subject: x\r\n\r\nhi\r\n");
        s.remove(&id).await.unwrap();
        assert!(s.list().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_draft_commits_after_its_head_and_leaves_no_file() {
        let d = tempfile::tempdir().unwrap();
        let q = d.path().join("q");
        let s = Spool::open(&q, &d.path().join("quar")).unwrap();
        let mut draft = s.draft().await.unwrap();
        let buf = draft.append(b"body line\r\n".to_vec()).await.unwrap();
        assert!(buf.is_empty());
        draft.append(b"caf\xc3\xa9\r\n".to_vec()).await.unwrap();
        assert_eq!((draft.len(), draft.eight_bit()), (18, true));
        let id = s.new_id();
        s.commit_with_draft(
            &env(&id),
            Arc::new(b"Subject: x\r\n\r\n".to_vec()),
            &mut draft,
        )
        .await
        .unwrap();
        drop(draft);
        assert_eq!(
            s.read_body(&id).unwrap(),
            b"Subject: x\r\n\r\nbody line\r\ncaf\xc3\xa9\r\n"
        );
        // A draft nobody commits is removed when dropped; either way, only ID.msg stays.
        let lost = s.draft().await.unwrap();
        drop(lost);
        tokio::task::yield_now().await;
        for _ in 0..100 {
            if fs::read_dir(&q).unwrap().count() == 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let left: Vec<_> = fs::read_dir(&q)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from(format!("{id}.msg"))]);
    }

    #[tokio::test]
    async fn a_finished_file_is_reused_only_after_a_directory_fsync() {
        let d = tempfile::tempdir().unwrap();
        let s = Spool::open(&d.path().join("q"), &d.path().join("quar")).unwrap();
        let long = s.new_id();
        s.commit(&env(&long), Arc::new(vec![b'x'; 5000]))
            .await
            .unwrap();
        s.remove(&long).await.unwrap();
        assert_eq!(s.spares(), 1);
        assert!(d.path().join("spare").join(&long).exists());
        // The next commit runs before any fsync covered the removal: a new file.
        let a = s.new_id();
        s.commit(&env(&a), Arc::new(b"a\r\n".to_vec()))
            .await
            .unwrap();
        assert_eq!(s.spares(), 1);
        // Its directory fsync covered the removal: the spare is taken, cut to length.
        let b = s.new_id();
        s.commit(&env(&b), Arc::new(b"short\r\n".to_vec()))
            .await
            .unwrap();
        assert_eq!(s.spares(), 0);
        assert!(!d.path().join("spare").join(&long).exists());
        assert_eq!(s.read_body(&b).unwrap(), b"short\r\n");
        assert_eq!(s.read_envelope(&b).unwrap().id, b);
        // A restart keeps the pool, every file cut to nothing.
        s.remove(&a).await.unwrap();
        let kept = d.path().join("spare").join(&a);
        assert!(fs::metadata(&kept).unwrap().len() > 0);
        drop(s);
        let s = Spool::open(&d.path().join("q"), &d.path().join("quar")).unwrap();
        assert_eq!(s.spares(), 1);
        assert_eq!(fs::metadata(&kept).unwrap().len(), 0);
        assert_eq!(fs::read_dir(d.path().join("spare")).unwrap().count(), 1);
    }

    #[tokio::test]
    async fn recovery_cleans_partials_and_quarantines_orphans() {
        let d = tempfile::tempdir().unwrap();
        let q = d.path().join("q");
        let s = Spool::open(&q, &d.path().join("quar")).unwrap();
        let ok = s.new_id();
        s.commit(&env(&ok), Arc::new(b"x\r\n".to_vec()))
            .await
            .unwrap();
        fs::write(q.join("AAA.msg.tmp"), b"partial").unwrap();
        fs::write(q.join("BBB.env.tmp"), b"{").unwrap();
        fs::write(q.join("CCC.env"), env("CCC").to_bytes()).unwrap();
        fs::write(q.join("DDD.msg"), b"garbage").unwrap();
        let rec = s.recover().unwrap();
        assert_eq!(rec.envelopes.len(), 1);
        assert_eq!(rec.envelopes[0].id, ok);
        assert_eq!(rec.partial_removed, 2);
        assert_eq!(rec.quarantined, 2);
        let left: Vec<_> = fs::read_dir(&q)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 1, "{left:?}");
        assert!(d.path().join("quar/CCC.env").exists());
        assert!(d.path().join("quar/DDD.msg").exists());
    }

    #[tokio::test]
    async fn later_state_supersedes_the_committed_envelope() {
        let d = tempfile::tempdir().unwrap();
        let s = Spool::open(&d.path().join("q"), &d.path().join("quar")).unwrap();
        let id = s.new_id();
        let mut e = env(&id);
        s.commit(&e, Arc::new(b"body\r\n".to_vec())).await.unwrap();
        assert!(!s.read_envelope(&id).unwrap().rcpts[0].reported);
        e.rcpts[0].attempts = 3;
        s.update(&e).await.unwrap();
        assert_eq!(s.recover().unwrap().envelopes[0].rcpts[0].attempts, 3);
        assert_eq!(s.read_body(&id).unwrap(), b"body\r\n");
        s.remove(&id).await.unwrap();
        assert!(matches!(s.update(&e).await, Err(SpoolError::NotFound(_))));
        assert!(s.recover().unwrap().envelopes.is_empty());
    }

    #[tokio::test]
    async fn ids_that_name_other_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let s = Spool::open(&d.path().join("q"), &d.path().join("quar")).unwrap();
        fs::write(d.path().join("x.msg"), b"victim").unwrap();
        for bad in ["../x", "..", "", "a/b", "/etc/passwd", "0123abcdef", "X"] {
            assert!(!valid_id(bad), "{bad:?}");
            assert!(
                matches!(s.remove_blocking(bad), Err(SpoolError::BadId(_))),
                "{bad:?}"
            );
            assert!(
                matches!(s.read_envelope(bad), Err(SpoolError::BadId(_))),
                "{bad:?}"
            );
        }
        assert!(d.path().join("x.msg").exists());
        assert!(valid_id(&s.new_id()));
    }

    #[tokio::test]
    async fn corrupt_env_falls_back_to_the_committed_envelope() {
        let d = tempfile::tempdir().unwrap();
        let q = d.path().join("q");
        let s = Spool::open(&q, &d.path().join("quar")).unwrap();
        let id = s.new_id();
        let mut e = env(&id);
        s.commit(&e, Arc::new(b"body\r\n".to_vec())).await.unwrap();
        e.rcpts[0].attempts = 2;
        s.update(&e).await.unwrap();
        fs::write(q.join(format!("{id}.env")), b"{\"id\": trunc").unwrap();
        assert_eq!(s.read_envelope(&id).unwrap().rcpts[0].attempts, 0);
        assert_eq!(s.env_fallbacks(), 1);
        let rec = s.recover().unwrap();
        assert_eq!(
            (rec.envelopes.len(), rec.env_fallbacks, rec.quarantined),
            (1, 1, 0)
        );
        assert!(d.path().join(format!("quar/{id}.env")).exists());
        assert!(q.join(format!("{id}.msg")).exists());
        // An envelope naming another message is corrupt as well.
        let mut other = env(&id);
        other.id = "ABC".into();
        fs::write(q.join(format!("{id}.env")), other.to_bytes()).unwrap();
        assert_eq!(s.read_envelope(&id).unwrap().id, id);
    }

    #[test]
    fn ids_are_unique_and_sorted() {
        let d = tempfile::tempdir().unwrap();
        let s = Spool::open(&d.path().join("q"), &d.path().join("quar")).unwrap();
        let ids: Vec<String> = (0..1000).map(|_| s.new_id()).collect();
        let set: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(set.len(), ids.len());
    }
}
