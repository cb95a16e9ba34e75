//! The durable queue on disk: one file per message, plus an envelope file once its
//! delivery state changes.
//!
//! The only code that touches spool files. Commit protocol (the promise behind every
//! 250): the envelope and the message are written together to `ID.msg.tmp` (a short
//! header line, the envelope as JSON, then the message), fsynced, and renamed to
//! `ID.msg` — that rename is the commit point — and the directory is fsynced.
//! Directory fsyncs are group-committed by one thread: every commit that arrives
//! while an fsync runs is covered by the next one, so under load one fsync serves
//! many messages, and a message costs one file, one data fsync and one unlink — the
//! common case (delivered at the first attempt) never writes anything else.
//! Later delivery state goes to `ID.env` by temp → fsync → rename → dir fsync; it
//! supersedes the envelope inside `ID.msg`. Removal unlinks `ID.env` first, so a crash
//! can at worst bring back the first envelope (a repeated delivery), never lose one.
//! All of this is blocking I/O and runs on tokio's blocking pool, never on an async
//! worker.

mod envelope;

pub use envelope::{Envelope, MessageKind, Rcpt, RcptState};

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
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
    #[error("the spool's commit thread is gone")]
    Closed,
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
}

#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    quarantine: PathBuf,
    dir_sync: mpsc::Sender<oneshot::Sender<io::Result<()>>>,
    seq: AtomicU32,
}

impl Spool {
    /// Opens (creating) the queue directory and starts the directory-sync thread.
    pub fn open(dir: &Path, quarantine: &Path) -> Result<Spool, SpoolError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let (tx, rx) = mpsc::channel::<oneshot::Sender<io::Result<()>>>();
        let dir_file = File::open(dir).map_err(io_err(dir))?;
        std::thread::Builder::new()
            .name("spool-dirsync".into())
            .spawn(move || {
                // Group commit: take one request, then everything that queued up
                // behind it, and answer all of them with a single fsync.
                while let Ok(first) = rx.recv() {
                    let mut waiting = vec![first];
                    waiting.extend(rx.try_iter());
                    let res = dir_file.sync_all();
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
                dir_sync: tx,
                seq: AtomicU32::new(rand::random::<u16>() as u32),
            }),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
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

    fn path(&self, id: &str, ext: &str) -> PathBuf {
        self.inner.dir.join(format!("{id}.{ext}"))
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
        let this = self.clone();
        // Compact JSON has no line breaks, and the header line ends in CRLF: the file
        // holds no bare LF, like the message after it.
        let env_bytes = serde_json::to_vec(env).expect("envelope serializes");
        let id = env.id.clone();
        tokio::task::spawn_blocking(move || -> Result<(), SpoolError> {
            let tmp = this.path(&id, "msg.tmp");
            let fin = this.path(&id, "msg");
            let head = format!("{MAGIC} {}\r\n", env_bytes.len());
            write_synced(&tmp, &[head.as_bytes(), &env_bytes, &body])?;
            fs::rename(&tmp, &fin).map_err(io_err(&fin))
        })
        .await
        .map_err(|_| SpoolError::Closed)??;
        self.sync_dir().await
    }

    fn write_env_blocking(&self, id: &str, bytes: &[u8]) -> Result<(), SpoolError> {
        if !self.path(id, "msg").exists() {
            return Err(SpoolError::NotFound(id.to_string()));
        }
        let tmp = self.path(id, "env.tmp");
        let fin = self.path(id, "env");
        write_synced(&tmp, &[bytes])?;
        fs::rename(&tmp, &fin).map_err(io_err(&fin))
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

    /// Removes a finished message. No fsync: if the unlink is lost in a crash the
    /// message is delivered again (at-least-once), never lost.
    pub async fn remove(&self, id: &str) -> Result<(), SpoolError> {
        let this = self.clone();
        let id = id.to_string();
        tokio::task::spawn_blocking(move || this.remove_blocking(&id))
            .await
            .map_err(|_| SpoolError::Closed)?
    }

    pub fn remove_blocking(&self, id: &str) -> Result<(), SpoolError> {
        let env = self.path(id, "env");
        match fs::remove_file(&env) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&env)(e)),
            _ => {}
        }
        let msg = self.path(id, "msg");
        match fs::remove_file(&msg) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(SpoolError::NotFound(id.to_string()))
            }
            Err(e) => Err(io_err(&msg)(e)),
        }
    }

    /// Reads `ID.msg`: the embedded envelope bytes and the message.
    fn read_msg_file(&self, id: &str) -> Result<(Vec<u8>, usize, usize), SpoolError> {
        let p = self.path(id, "msg");
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

    pub async fn read_body_async(&self, id: &str) -> Result<Vec<u8>, SpoolError> {
        let this = self.clone();
        let id = id.to_string();
        tokio::task::spawn_blocking(move || this.read_body(&id))
            .await
            .map_err(|_| SpoolError::Closed)?
    }

    /// The current envelope: `ID.env` when delivery state was recorded, else the
    /// one committed with the message.
    pub fn read_envelope(&self, id: &str) -> Result<Envelope, SpoolError> {
        let p = self.path(id, "env");
        match fs::read(&p) {
            Ok(bytes) => {
                return Envelope::from_bytes(&bytes)
                    .map_err(|message| SpoolError::Corrupt { path: p, message });
            }
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&p)(e)),
            Err(_) => {}
        }
        let m = self.path(id, "msg");
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
        File::open(&self.inner.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.inner.dir))
    }

    /// Lists committed envelopes without changing anything (for `queue list` when no
    /// daemon runs).
    pub fn list(&self) -> Result<Vec<Envelope>, SpoolError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.inner.dir).map_err(io_err(&self.inner.dir))? {
            let entry = entry.map_err(io_err(&self.inner.dir))?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".msg")) else {
                continue;
            };
            if let Ok(env) = self.read_envelope(id) {
                out.push(env);
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Start-up recovery: removes temp files (never acknowledged), moves unreadable
    /// messages and envelopes without message to the quarantine directory, and
    /// returns every committed message with its current envelope.
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
            let (id, why) = if let Some(id) = name.strip_suffix(".msg") {
                match self.read_envelope(id) {
                    Ok(env) if env.id == id => {
                        rec.envelopes.push(env);
                        continue;
                    }
                    Ok(_) => (id, "envelope of another message".to_string()),
                    Err(e) => (id, e.to_string()),
                }
            } else if let Some(id) = name.strip_suffix(".env") {
                if names.contains(&format!("{id}.msg")) {
                    continue;
                }
                (id, "envelope without message".to_string())
            } else {
                continue;
            };
            tracing::error!(queue_id = id, reason = %why, "quarantining spool entry");
            self.quarantine(id)?;
            rec.quarantined += 1;
        }
        if rec.partial_removed + rec.quarantined > 0 {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(dir))?;
        }
        Ok(rec)
    }

    fn quarantine(&self, id: &str) -> Result<(), SpoolError> {
        let q = &self.inner.quarantine;
        fs::create_dir_all(q).map_err(io_err(q))?;
        for ext in ["env", "msg"] {
            let from = self.path(id, ext);
            if from.exists() {
                let to = q.join(format!("{id}.{ext}"));
                fs::rename(&from, &to).map_err(io_err(&to))?;
            }
        }
        Ok(())
    }
}

/// First token of a spool file (`TENSO-SPOOL-1 <envelope length>\r\n`).
const MAGIC: &str = "TENSO-SPOOL-1";

/// Offsets of the envelope and of the message inside a spool file.
fn split_msg(bytes: &[u8]) -> Option<(usize, usize)> {
    let nl = bytes.iter().take(64).position(|&b| b == b'\n')?;
    let head = std::str::from_utf8(&bytes[..nl]).ok()?;
    let len: usize = head
        .trim_end_matches('\r')
        .strip_prefix(MAGIC)?
        .trim()
        .parse()
        .ok()?;
    let env_start = nl + 1;
    let body_start = env_start.checked_add(len)?;
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

/// Creates `path`, writes the parts, fsyncs (data only: the rename and the
/// directory fsync that follow make the name durable). The file did not exist before:
/// ids are unique, and a stale temp file from a crash is truncated.
fn write_synced(path: &Path, parts: &[&[u8]]) -> Result<(), SpoolError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io_err(path))?;
    for p in parts {
        f.write_all(p).map_err(io_err(path))?;
    }
    f.sync_data().map_err(io_err(path))
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

    #[test]
    fn ids_are_unique_and_sorted() {
        let d = tempfile::tempdir().unwrap();
        let s = Spool::open(&d.path().join("q"), &d.path().join("quar")).unwrap();
        let ids: Vec<String> = (0..1000).map(|_| s.new_id()).collect();
        let set: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(set.len(), ids.len());
    }
}
