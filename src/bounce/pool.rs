//! The local bounce pool (the talk's proposal 2a): one Maildir per alias under
//! `DATA_DIR/pool/<alias>/{tmp,new,cur}`, so any IMAP server (Dovecot) can serve it.
//!
//! Written by the Maildir delivery protocol — unique name in `tmp/`, write, fsync,
//! rename into `new/`, fsync `new/` — so a pooled bounce survives a crash as soon as
//! `deliver` returns. New directories (`pool/`, `pool/<alias>/`, its `tmp`, `new` and
//! `cur`) are made durable (parent fsynced) before a message is written into them. A
//! failed write (a full disk) removes its `tmp/` file at once. Modes are fixed, not
//! left to the umask: owner-only, or group-readable for an IMAP server's group
//! (`[pool] group`). Per-alias limits (count, bytes) expire the oldest entries; every
//! expiry is logged and counted, never silent. Blocking file I/O: call it from the
//! blocking pool. Touches nothing outside the pool directory.
//!
//! A fleet (`[table] backend = "postgres"`) has one pool for all its nodes: pooled
//! messages are rows of the shared database (committed before `deliver` returns, the
//! same limits applied in the same transaction), so `tenso pool …` works from any
//! node. The Maildir stays available for an IMAP server on the node that exports it
//! (`[pool] maildir_export`): [`Pool::export_maildir`] writes every pooled message it
//! has not yet written into the Maildir, removes files whose message left the pool,
//! and takes a message the IMAP user deleted (a file it wrote that is gone) out of the
//! pool, and one the user read as seen.

use crate::disk::{self, Modes};
use crate::table::pg::{PgStore, PooledRow};
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub struct Pool {
    root: PathBuf,
    modes: Modes,
    hostname: String,
    max_messages: usize,
    max_bytes: u64,
    seq: AtomicU64,
    pub stored: AtomicU64,
    pub expired: AtomicU64,
    /// The fleet's shared pool, when the table is in PostgreSQL.
    shared: Option<PgStore>,
}

/// What one Maildir export pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ExportReport {
    pub written: usize,
    pub removed_files: usize,
    pub deleted_by_reader: usize,
}

fn db_err(e: crate::table::TableError) -> io::Error {
    io::Error::other(e.to_string())
}

fn not_found(id: &str) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("no pooled message {id}"))
}

/// One pooled message, for listings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Entry {
    pub id: String,
    pub alias: String,
    pub size: u64,
    pub time: i64,
    pub seen: bool,
    #[serde(skip)]
    pub path: PathBuf,
}

/// A directory name for an alias: addresses may hold `/` or start with `.`.
pub fn dir_name(alias: &str) -> String {
    let s: String = alias
        .to_lowercase()
        .chars()
        .map(|c| if c == '/' || c.is_control() { '_' } else { c })
        .collect();
    match s.strip_prefix('.') {
        Some(rest) => format!("_{rest}"),
        None => s,
    }
}

impl Pool {
    pub fn new(
        root: PathBuf,
        modes: Modes,
        hostname: &str,
        max_messages: usize,
        max_bytes: u64,
    ) -> Pool {
        Pool {
            root,
            modes,
            hostname: hostname.replace(['/', ':'], "_"),
            max_messages,
            max_bytes,
            seq: AtomicU64::new(0),
            stored: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            shared: None,
        }
    }

    /// Keeps the pool in the fleet's database instead of the local Maildir.
    pub fn shared(mut self, pg: PgStore) -> Pool {
        self.shared = Some(pg);
        self
    }

    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// A new entry id: time, microseconds, pid, sequence and host (unique across the
    /// nodes of a fleet), in Maildir's unique-name form.
    fn new_id(&self) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        format!(
            "{}.M{:06}P{}Q{}.{}",
            now.as_secs(),
            now.subsec_micros(),
            std::process::id(),
            self.seq.fetch_add(1, Ordering::Relaxed),
            self.hostname
        )
    }

    pub fn alias_dir(&self, alias: &str) -> PathBuf {
        self.root.join(dir_name(alias))
    }

    /// Stores `msg` in the alias's Maildir, durably. Returns the new entry's id.
    pub fn deliver(&self, alias: &str, msg: &[u8]) -> io::Result<String> {
        let id = self.new_id();
        if let Some(pg) = &self.shared {
            return self.deliver_shared(pg, alias, &id, msg);
        }
        self.write_maildir(&dir_name(alias), &id, msg)?;
        self.stored.fetch_add(1, Ordering::Relaxed);
        self.enforce_limits(alias)?;
        Ok(id)
    }

    fn deliver_shared(
        &self,
        pg: &PgStore,
        alias: &str,
        id: &str,
        msg: &[u8],
    ) -> io::Result<String> {
        let row = PooledRow {
            id: id.to_string(),
            alias: dir_name(alias),
            time: crate::time::unix_now(),
            size: msg.len() as u64,
            seen: false,
            exported_by: None,
        };
        let expired = pg
            .pool_put(row, msg.to_vec(), self.max_messages, self.max_bytes)
            .map_err(db_err)?;
        self.stored.fetch_add(1, Ordering::Relaxed);
        for (old, size) in expired {
            self.expired.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                alias,
                pool_id = %old,
                size,
                max_messages = self.max_messages,
                max_bytes = self.max_bytes,
                "pool full: oldest bounce expired"
            );
        }
        Ok(id.to_string())
    }

    /// Writes one message into the Maildir of pool `name` by the delivery protocol.
    fn write_maildir(&self, name_of_pool: &str, id: &str, msg: &[u8]) -> io::Result<()> {
        let dir = self.root.join(name_of_pool);
        for sub in ["tmp", "new", "cur"] {
            disk::create_dir_durable(&dir.join(sub), self.modes)?;
        }
        let name = format!("{id},S={}", msg.len());
        let tmp = dir.join("tmp").join(&name);
        let written = disk::create_file(&tmp, self.modes, false).and_then(|mut f| {
            f.write_all(msg)?;
            f.sync_all()?;
            drop(f);
            fs::rename(&tmp, dir.join("new").join(&name))
        });
        if let Err(e) = written {
            // The name is unique to this attempt: nothing else can be using it.
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        if let Err(e) = disk::sync_dir(&dir.join("new")) {
            // Not known durable, so not stored: the caller's 4xx must be the truth.
            let _ = fs::remove_file(dir.join("new").join(&name));
            return Err(e);
        }
        Ok(())
    }

    fn entries_of(&self, alias_dir: &Path, alias: &str, out: &mut Vec<Entry>) {
        for (sub, seen) in [("new", false), ("cur", true)] {
            let Ok(rd) = fs::read_dir(alias_dir.join(sub)) else {
                continue;
            };
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let id = name.split([',', ':']).next().unwrap_or("").to_string();
                let size = name
                    .split(',')
                    .find_map(|p| p.strip_prefix("S="))
                    .and_then(|s| s.split(':').next()?.parse().ok())
                    .or_else(|| e.metadata().ok().map(|m| m.len()))
                    .unwrap_or(0);
                let time = id
                    .split('.')
                    .next()
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(0);
                out.push(Entry {
                    id,
                    alias: alias.to_string(),
                    size,
                    time,
                    seen,
                    path: e.path(),
                });
            }
        }
    }

    /// Pooled messages of one alias (or all), oldest first; a shared pool whose
    /// database does not answer is an error.
    pub fn try_list(&self, alias: Option<&str>) -> io::Result<Vec<Entry>> {
        let Some(pg) = &self.shared else {
            return Ok(self.maildir_list(alias));
        };
        let rows = pg
            .pool_list(alias.map(dir_name).as_deref())
            .map_err(db_err)?;
        Ok(rows.into_iter().map(entry_of_row).collect())
    }

    /// [`Pool::try_list`] where an unreachable shared pool lists nothing (logged).
    pub fn list(&self, alias: Option<&str>) -> Vec<Entry> {
        self.try_list(alias).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot list the shared pool");
            Vec::new()
        })
    }

    /// The local Maildir's messages of one alias (or all), oldest first.
    fn maildir_list(&self, alias: Option<&str>) -> Vec<Entry> {
        let mut out = Vec::new();
        match alias {
            Some(a) => self.entries_of(&self.alias_dir(a), &dir_name(a), &mut out),
            None => {
                if let Ok(rd) = fs::read_dir(&self.root) {
                    for d in rd.flatten() {
                        let name = d.file_name().to_string_lossy().into_owned();
                        self.entries_of(&d.path(), &name, &mut out);
                    }
                }
            }
        }
        out.sort_by(|a, b| (a.time, &a.id).cmp(&(b.time, &b.id)));
        out
    }

    pub fn count(&self, alias: &str) -> usize {
        self.list(Some(alias)).len()
    }

    pub fn find(&self, id: &str) -> Option<Entry> {
        self.list(None).into_iter().find(|e| e.id == id)
    }

    pub fn read(&self, id: &str) -> io::Result<(Entry, Vec<u8>)> {
        if let Some(pg) = &self.shared {
            let (row, body) = pg
                .pool_read(id)
                .map_err(db_err)?
                .ok_or_else(|| not_found(id))?;
            return Ok((entry_of_row(row), body));
        }
        let e = self.find(id).ok_or_else(|| not_found(id))?;
        let bytes = fs::read(&e.path)?;
        Ok((e, bytes))
    }

    pub fn remove(&self, id: &str) -> io::Result<Entry> {
        if let Some(pg) = &self.shared {
            let gone = pg.pool_remove(&[id.to_string()]).map_err(db_err)?;
            return gone
                .into_iter()
                .next()
                .map(entry_of_row)
                .ok_or_else(|| not_found(id));
        }
        let e = self.find(id).ok_or_else(|| not_found(id))?;
        fs::remove_file(&e.path)?;
        Ok(e)
    }

    /// Removes entries older than `age_secs` (all when None); returns how many.
    pub fn purge(&self, alias: Option<&str>, age_secs: Option<i64>) -> io::Result<usize> {
        let now = crate::time::unix_now();
        let old: Vec<Entry> = self
            .try_list(alias)?
            .into_iter()
            .filter(|e| age_secs.is_none_or(|a| now - e.time >= a))
            .collect();
        if let Some(pg) = &self.shared {
            let ids: Vec<String> = old.into_iter().map(|e| e.id).collect();
            return Ok(pg.pool_remove(&ids).map_err(db_err)?.len());
        }
        for e in &old {
            fs::remove_file(&e.path)?;
        }
        Ok(old.len())
    }

    /// Copies every message of this pool into `to` with its id, alias, time and seen
    /// flag (`tenso table copy`: the Maildir pool of one node ⇄ a fleet's shared
    /// pool). Limits are not applied: nothing is expired by a copy.
    pub fn copy_to(&self, to: &Pool) -> io::Result<usize> {
        let entries = self.try_list(None)?;
        for e in &entries {
            let (_, body) = self.read(&e.id)?;
            match &to.shared {
                Some(pg) => {
                    let row = PooledRow {
                        id: e.id.clone(),
                        alias: e.alias.clone(),
                        time: e.time,
                        size: body.len() as u64,
                        seen: e.seen,
                        exported_by: None,
                    };
                    pg.pool_put(row, body, usize::MAX, u64::MAX)
                        .map_err(db_err)?;
                }
                None => {
                    to.write_maildir(&e.alias, &e.id, &body)?;
                    if e.seen {
                        to.mark_seen_locally(&e.alias, &e.id, body.len())?;
                    }
                }
            }
        }
        Ok(entries.len())
    }

    /// Moves a Maildir message from `new/` to `cur/` with the Seen flag.
    fn mark_seen_locally(&self, pool_name: &str, id: &str, size: usize) -> io::Result<()> {
        let dir = self.root.join(pool_name);
        let name = format!("{id},S={size}");
        fs::rename(
            dir.join("new").join(&name),
            dir.join("cur").join(format!("{name}:2,S")),
        )?;
        disk::sync_dir(&dir.join("cur"))
    }

    /// One pass of the Maildir export of a shared pool (see the module docs); the
    /// pool's database rows are the truth, the Maildir its copy for IMAP readers.
    pub fn export_maildir(&self) -> io::Result<ExportReport> {
        let Some(pg) = &self.shared else {
            return Ok(ExportReport::default());
        };
        let rows = pg.pool_list(None).map_err(db_err)?;
        let local: HashMap<String, Entry> = self
            .maildir_list(None)
            .into_iter()
            .map(|e| (e.id.clone(), e))
            .collect();
        let mut report = ExportReport::default();
        let mut in_pool = HashSet::new();
        for row in rows {
            in_pool.insert(row.id.clone());
            let mine = row.exported_by.as_deref() == Some(self.hostname.as_str());
            match local.get(&row.id) {
                Some(file) if file.seen && !row.seen => pg
                    .pool_mark(&row.id, &self.hostname, true)
                    .map_err(db_err)?,
                Some(_) => {}
                None if mine => {
                    // Written here before and gone now: the reader deleted it.
                    pg.pool_remove(std::slice::from_ref(&row.id))
                        .map_err(db_err)?;
                    report.deleted_by_reader += 1;
                }
                None => {
                    let Some((row, body)) = pg.pool_read(&row.id).map_err(db_err)? else {
                        continue;
                    };
                    self.write_maildir(&row.alias, &row.id, &body)?;
                    pg.pool_mark(&row.id, &self.hostname, false)
                        .map_err(db_err)?;
                    report.written += 1;
                }
            }
        }
        for (id, file) in local {
            if !in_pool.contains(&id) {
                fs::remove_file(&file.path)?;
                report.removed_files += 1;
            }
        }
        Ok(report)
    }

    fn enforce_limits(&self, alias: &str) -> io::Result<()> {
        let entries = self.maildir_list(Some(alias));
        let mut count = entries.len();
        let mut bytes: u64 = entries.iter().map(|e| e.size).sum();
        for e in &entries {
            if count <= self.max_messages && bytes <= self.max_bytes {
                break;
            }
            fs::remove_file(&e.path)?;
            count -= 1;
            bytes -= e.size;
            self.expired.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                alias,
                pool_id = %e.id,
                size = e.size,
                max_messages = self.max_messages,
                max_bytes = self.max_bytes,
                "pool full: oldest bounce expired"
            );
        }
        Ok(())
    }
}

fn entry_of_row(r: PooledRow) -> Entry {
    Entry {
        id: r.id,
        alias: r.alias,
        size: r.size,
        time: r.time,
        seen: r.seen,
        path: PathBuf::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maildir_delivery_and_limits() {
        let d = tempfile::tempdir().unwrap();
        let p = Pool::new(d.path().join("pool"), disk::PRIVATE, "host", 3, 1 << 20);
        let mut ids = Vec::new();
        for i in 0..5 {
            ids.push(
                p.deliver("a@x.test", format!("Subject: {i}\r\n\r\nx\r\n").as_bytes())
                    .unwrap(),
            );
        }
        let left = p.list(Some("a@x.test"));
        assert_eq!(left.len(), 3);
        assert_eq!(p.expired.load(Ordering::Relaxed), 2);
        assert_eq!(left[0].id, ids[2], "oldest expired first");
        assert!(
            d.path()
                .join("pool/a@x.test/new")
                .read_dir()
                .unwrap()
                .count()
                == 3
        );
        let (_, body) = p.read(&ids[4]).unwrap();
        assert!(body.starts_with(b"Subject: 4"));
        p.remove(&ids[4]).unwrap();
        assert_eq!(p.purge(None, None).unwrap(), 2);
        assert!(p.list(None).is_empty());
    }

    #[test]
    fn dir_names_are_safe() {
        assert_eq!(dir_name("../x@y"), "_._x@y");
        assert_eq!(dir_name("A/b@Y"), "a_b@y");
    }
}
