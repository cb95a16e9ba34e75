//! The correlation log: one record per forwarded copy, so a bounce that comes back to
//! an alias can be tied to the forward that caused it — without SRS. Looked up by the
//! ENVID tenso sent (its queue id), else by the original Message-ID. Bounded by time:
//! [`FwdLog::expire`] drops records older than `[bounce] log_retention`.
//!
//! Kept where the table is: in the node's sled database, or in PostgreSQL, where a
//! bounce arriving at any node of a fleet finds the copy another node forwarded.

use super::TableError;
use super::pg::PgStore;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FwdRecord {
    pub queue_id: String,
    pub alias: String,
    pub dests: Vec<String>,
    pub message_id: Option<String>,
    pub at: i64,
}

#[derive(Clone)]
pub enum FwdLog {
    Sled(SledLog),
    Pg(PgStore),
}

#[derive(Clone)]
pub struct SledLog {
    by_id: sled::Tree,
    by_mid: sled::Tree,
}

fn k2(a: &str, b: &str) -> Vec<u8> {
    let mut k = a.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(b.as_bytes());
    k
}

impl FwdLog {
    pub(super) fn open(db: &sled::Db) -> Result<FwdLog, TableError> {
        Ok(FwdLog::Sled(SledLog {
            by_id: db.open_tree("fwdlog")?,
            by_mid: db.open_tree("fwdlog_mid")?,
        }))
    }

    /// Records (or extends) the copy of `queue_id` forwarded for `alias`. Not flushed:
    /// losing the last records in a crash only weakens correlation, never mail.
    pub fn record(&self, rec: &FwdRecord) -> Result<(), TableError> {
        match self {
            FwdLog::Sled(s) => s.record(rec),
            FwdLog::Pg(p) => p.fwd_record(rec),
        }
    }

    /// The copy whose ENVID (our queue id) a DSN quotes, forwarded for `alias`.
    pub fn by_envid(&self, envid: &str, alias: &str) -> Result<Option<FwdRecord>, TableError> {
        match self {
            FwdLog::Sled(s) => s.get(envid.trim(), alias),
            FwdLog::Pg(p) => p.fwd_get(envid.trim(), alias),
        }
    }

    /// The copy of the message with this Message-ID forwarded for `alias`.
    pub fn by_message_id(&self, mid: &str, alias: &str) -> Result<Option<FwdRecord>, TableError> {
        match self {
            FwdLog::Sled(s) => s.by_message_id(mid, alias),
            FwdLog::Pg(p) => p.fwd_by_mid(&norm_mid(mid), alias),
        }
    }

    /// Drops records older than `cutoff` (unix seconds); returns how many.
    pub fn expire(&self, cutoff: i64) -> Result<usize, TableError> {
        match self {
            FwdLog::Sled(s) => s.expire(cutoff),
            FwdLog::Pg(p) => p.fwd_expire(cutoff),
        }
    }

    /// Every record, oldest queue id first (table copy).
    pub fn all(&self) -> Result<Vec<FwdRecord>, TableError> {
        match self {
            FwdLog::Sled(s) => {
                let mut out = Vec::new();
                for kv in s.by_id.iter() {
                    if let Ok(r) = serde_json::from_slice(&kv?.1) {
                        out.push(r);
                    }
                }
                Ok(out)
            }
            FwdLog::Pg(p) => p.fwd_all(),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            FwdLog::Sled(s) => s.by_id.len(),
            FwdLog::Pg(p) => p.fwd_len().unwrap_or(0),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The Message-ID as a key: without its angle brackets.
pub(super) fn norm_mid(mid: &str) -> String {
    mid.trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_string()
}

/// Merges the destinations of an earlier record of the same copy into `rec`.
pub(super) fn extend_dests(rec: &mut FwdRecord, old: &FwdRecord) {
    for d in &old.dests {
        if !rec.dests.contains(d) {
            rec.dests.push(d.clone());
        }
    }
}

impl SledLog {
    fn record(&self, rec: &FwdRecord) -> Result<(), TableError> {
        let key = k2(&rec.queue_id, &rec.alias);
        let mut rec = rec.clone();
        if let Some(old) = self.by_id.get(&key)?
            && let Ok(old) = serde_json::from_slice::<FwdRecord>(&old)
        {
            extend_dests(&mut rec, &old);
        }
        self.by_id
            .insert(key, serde_json::to_vec(&rec).expect("record serializes"))?;
        if let Some(mid) = &rec.message_id {
            self.by_mid
                .insert(k2(&norm_mid(mid), &rec.alias), rec.queue_id.as_bytes())?;
        }
        Ok(())
    }

    fn get(&self, queue_id: &str, alias: &str) -> Result<Option<FwdRecord>, TableError> {
        Ok(match self.by_id.get(k2(queue_id, alias))? {
            Some(v) => serde_json::from_slice(&v).ok(),
            None => None,
        })
    }

    fn by_message_id(&self, mid: &str, alias: &str) -> Result<Option<FwdRecord>, TableError> {
        match self.by_mid.get(k2(&norm_mid(mid), alias))? {
            Some(qid) => self.get(&String::from_utf8_lossy(&qid), alias),
            None => Ok(None),
        }
    }

    fn expire(&self, cutoff: i64) -> Result<usize, TableError> {
        let mut n = 0;
        // Queue ids start with their arrival time, so the oldest come first.
        for kv in self.by_id.iter() {
            let (k, v) = kv?;
            let rec: Option<FwdRecord> = serde_json::from_slice(&v).ok();
            if let Some(r) = &rec
                && r.at >= cutoff
            {
                break;
            }
            self.by_id.remove(&k)?;
            if let Some(r) = rec
                && let Some(mid) = r.message_id
            {
                self.by_mid.remove(k2(&norm_mid(&mid), &r.alias))?;
            }
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_lookup_expire() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let log = FwdLog::open(&db).unwrap();
        let rec = |q: &str, at| FwdRecord {
            queue_id: q.into(),
            alias: "a@x.test".into(),
            dests: vec!["a@d.test".into()],
            message_id: Some(format!("<{q}@origin>")),
            at,
        };
        log.record(&rec("0001", 100)).unwrap();
        log.record(&rec("0002", 200)).unwrap();
        assert_eq!(log.by_envid("0001", "a@x.test").unwrap().unwrap().at, 100);
        assert!(log.by_envid("0001", "b@x.test").unwrap().is_none());
        assert_eq!(
            log.by_message_id("0002@origin", "a@x.test")
                .unwrap()
                .unwrap()
                .queue_id,
            "0002"
        );
        assert_eq!(log.expire(150).unwrap(), 1);
        assert!(log.by_envid("0001", "a@x.test").unwrap().is_none());
        assert!(
            log.by_message_id("<0001@origin>", "a@x.test")
                .unwrap()
                .is_none()
        );
        assert_eq!(log.len(), 1);
    }
}
