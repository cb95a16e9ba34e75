//! Outbound TLS state kept across restarts: the MTA-STS policy cache (RFC 8461 §5:
//! a policy is remembered for its `max_age`) and the day's TLS-RPT aggregates
//! (RFC 8460), one record per (UTC day, policy domain).
//!
//! Storage only: what a policy or an aggregate means is decided in `delivery/`; this
//! module keeps bytes and times, bounded (expired policies are dropped when seen,
//! aggregates are capped per day). Not flushed on every change: losing the last
//! seconds in a crash costs one policy fetch or a few counts, never mail.

use super::TableError;
use serde::{Deserialize, Serialize};

/// One cached MTA-STS policy of a destination domain.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StsCacheEntry {
    /// The `id=` of the `_mta-sts` TXT record the policy was fetched for.
    pub id: String,
    /// The policy file as fetched (parsed again on use; a few hundred bytes).
    pub text: String,
    /// Unix seconds of the fetch.
    pub fetched: i64,
    /// Unix seconds after which the policy is no longer used (`fetched + max_age`).
    pub expires: i64,
}

#[derive(Clone)]
pub struct TlsStore {
    sts: sled::Tree,
    rpt: sled::Tree,
}

fn day_key(day: &str, domain: &str) -> Vec<u8> {
    let mut k = day.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(domain.as_bytes());
    k
}

fn split_key(k: &[u8]) -> Option<(String, String)> {
    let s = std::str::from_utf8(k).ok()?;
    let (d, dom) = s.split_once('\0')?;
    Some((d.to_string(), dom.to_string()))
}

impl TlsStore {
    pub(super) fn open(db: &sled::Db) -> Result<TlsStore, TableError> {
        Ok(TlsStore {
            sts: db.open_tree("mta_sts")?,
            rpt: db.open_tree("tlsrpt")?,
        })
    }

    /// The cached policy of `domain` unless it expired before `now` (then it is dropped).
    pub fn sts_get(&self, domain: &str, now: i64) -> Result<Option<StsCacheEntry>, TableError> {
        let Some(v) = self.sts.get(domain.as_bytes())? else {
            return Ok(None);
        };
        match serde_json::from_slice::<StsCacheEntry>(&v) {
            Ok(e) if e.expires > now => Ok(Some(e)),
            _ => {
                self.sts.remove(domain.as_bytes())?;
                Ok(None)
            }
        }
    }

    pub fn sts_put(&self, domain: &str, entry: &StsCacheEntry) -> Result<(), TableError> {
        let v = serde_json::to_vec(entry).expect("cache entry serializes");
        self.sts.insert(domain.as_bytes(), v)?;
        Ok(())
    }

    /// Drops every policy expired at `now`; returns how many.
    pub fn sts_expire(&self, now: i64) -> Result<usize, TableError> {
        let mut n = 0;
        for kv in self.sts.iter() {
            let (k, v) = kv?;
            let dead =
                serde_json::from_slice::<StsCacheEntry>(&v).map_or(true, |e| e.expires <= now);
            if dead {
                self.sts.remove(k)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Read-modify-write of the aggregate of (`day`, `domain`). `f` gets the stored
    /// bytes (None for a new record) and returns the new ones. A new record is not
    /// created when `day` already holds `max` of them: Ok(false).
    pub fn rpt_update(
        &self,
        day: &str,
        domain: &str,
        max: usize,
        f: impl Fn(Option<&[u8]>) -> Vec<u8>,
    ) -> Result<bool, TableError> {
        let key = day_key(day, domain);
        if !self.rpt.contains_key(&key)? && self.rpt.scan_prefix(day_key(day, "")).count() >= max {
            return Ok(false);
        }
        self.rpt.update_and_fetch(&key, |old| Some(f(old)))?;
        Ok(true)
    }

    /// Every stored aggregate as (day, domain, bytes), in day then domain order.
    pub fn rpt_list(&self) -> Result<Vec<(String, String, Vec<u8>)>, TableError> {
        let mut out = Vec::new();
        for kv in self.rpt.iter() {
            let (k, v) = kv?;
            if let Some((day, dom)) = split_key(&k) {
                out.push((day, dom, v.to_vec()));
            }
        }
        Ok(out)
    }

    /// Replaces (or with None removes) one aggregate if it still holds exactly
    /// `seen`, so counts added while its report was being made are kept for the
    /// next one. True when replaced.
    pub fn rpt_swap(
        &self,
        day: &str,
        domain: &str,
        seen: &[u8],
        new: Option<Vec<u8>>,
    ) -> Result<bool, TableError> {
        let key = day_key(day, domain);
        Ok(self.rpt.compare_and_swap(&key, Some(seen), new)?.is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, TlsStore) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        (dir, TlsStore::open(&db).unwrap())
    }

    #[test]
    fn expired_policies_are_not_returned() {
        let (_d, s) = store();
        let e = StsCacheEntry {
            id: "1".into(),
            text: "version: STSv1".into(),
            fetched: 100,
            expires: 200,
        };
        s.sts_put("dest.test", &e).unwrap();
        assert_eq!(s.sts_get("dest.test", 150).unwrap(), Some(e.clone()));
        assert_eq!(s.sts_get("dest.test", 200).unwrap(), None);
        s.sts_put("dest.test", &e).unwrap();
        assert_eq!(s.sts_expire(250).unwrap(), 1);
    }

    #[test]
    fn aggregates_are_capped_per_day_and_taken_only_unchanged() {
        let (_d, s) = store();
        let inc = |old: Option<&[u8]>| {
            let n: u32 = old.map_or(0, |b| std::str::from_utf8(b).unwrap().parse().unwrap());
            (n + 1).to_string().into_bytes()
        };
        assert!(s.rpt_update("2026-01-01", "a.test", 2, inc).unwrap());
        assert!(s.rpt_update("2026-01-01", "a.test", 2, inc).unwrap());
        assert!(s.rpt_update("2026-01-01", "b.test", 2, inc).unwrap());
        assert!(!s.rpt_update("2026-01-01", "c.test", 2, inc).unwrap());
        assert!(s.rpt_update("2026-01-02", "c.test", 2, inc).unwrap());
        let all = s.rpt_list().unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(
            all[0],
            ("2026-01-01".into(), "a.test".into(), b"2".to_vec())
        );
        assert!(!s.rpt_swap("2026-01-01", "a.test", b"1", None).unwrap());
        assert!(s.rpt_swap("2026-01-01", "a.test", b"2", None).unwrap());
        assert_eq!(s.rpt_list().unwrap().len(), 2);
        assert!(
            s.rpt_swap("2026-01-01", "b.test", b"1", Some(b"0".to_vec()))
                .unwrap()
        );
        assert_eq!(s.rpt_list().unwrap()[0].2, b"0".to_vec());
    }
}
