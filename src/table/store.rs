//! The table's storage interface: a handful of key/value operations on aliases,
//! domains and destination health, with two implementations — the embedded sled
//! store (one node) and PostgreSQL (a fleet, see `pg`).
//!
//! Only storage: validation (alias syntax, destinations, loops) stays in `Table`, so
//! both stores hold exactly what the same rules let in. A key is `domain \0 local`
//! (lowercase); values are the JSON of `AliasEntry` and of the health list, the same
//! bytes in both stores, so a copy between them loses no field. Every write is
//! durable when it returns (sled: flushed by `Table`; PostgreSQL: committed).

use super::pg::PgStore;
use super::{AliasEntry, DestHealth, TableError, decode, encode};
use std::collections::{BTreeSet, HashMap};

/// An alias key with its destinations' health.
pub type KeyedHealth = (Vec<u8>, Vec<DestHealth>);

/// What a write changed, for the in-memory views of every node: an entry only, or
/// the set of local domains (or catch-alls) too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Entry,
    Membership,
}

#[derive(Clone)]
pub enum Store {
    Sled(SledStore),
    Pg(PgStore),
}

#[derive(Clone)]
pub struct SledStore {
    pub(super) db: sled::Db,
    pub(super) aliases: sled::Tree,
    domains: sled::Tree,
    /// alias key → its destinations' health (JSON list, at most MAX_HEALTH).
    health: sled::Tree,
}

pub(super) fn split_key(k: &[u8]) -> (String, String) {
    let s = String::from_utf8_lossy(k);
    match s.split_once('\0') {
        Some((d, l)) => (d.to_string(), l.to_string()),
        None => (s.into_owned(), String::new()),
    }
}

impl SledStore {
    pub fn open(db: &sled::Db) -> Result<SledStore, TableError> {
        Ok(SledStore {
            aliases: db.open_tree("aliases")?,
            domains: db.open_tree("domains")?,
            health: db.open_tree("health")?,
            db: db.clone(),
        })
    }

    fn domains(&self) -> Result<Vec<String>, TableError> {
        let mut set = BTreeSet::new();
        for kv in self.domains.iter() {
            let (k, _) = kv?;
            set.insert(String::from_utf8_lossy(&k).into_owned());
        }
        // Walk aliases domain by domain: every key of domain `d` sorts below `d\x01`,
        // so one range seek skips the whole domain instead of reading all its aliases.
        let mut next = self.aliases.first()?;
        while let Some((k, _)) = next {
            let mut bound = k.split(|&b| b == 0).next().unwrap_or(&[]).to_vec();
            set.insert(String::from_utf8_lossy(&bound).into_owned());
            bound.push(1);
            next = self.aliases.range(bound..).next().transpose()?;
        }
        Ok(set.into_iter().collect())
    }

    fn health_update(
        &self,
        key: &[u8],
        merge: &dyn Fn(&mut Vec<DestHealth>),
    ) -> Result<(), TableError> {
        loop {
            let old = self.health.get(key)?;
            let mut list = old
                .as_ref()
                .and_then(|v| serde_json::from_slice::<Vec<DestHealth>>(v).ok())
                .unwrap_or_default();
            merge(&mut list);
            let new = serde_json::to_vec(&list).expect("health serializes");
            if self.health.compare_and_swap(key, old, Some(new))?.is_ok() {
                return Ok(());
            }
        }
    }
}

impl Store {
    pub fn get(&self, key: &[u8]) -> Result<Option<AliasEntry>, TableError> {
        match self {
            Store::Sled(s) => match s.aliases.get(key)? {
                Some(v) => Ok(Some(decode(&v)?)),
                None => Ok(None),
            },
            Store::Pg(p) => p.get(key),
        }
    }

    /// Entries of many keys at once (imports), absent keys left out.
    pub fn get_many(&self, keys: &[Vec<u8>]) -> Result<HashMap<Vec<u8>, AliasEntry>, TableError> {
        match self {
            Store::Sled(_) => {
                let mut out = HashMap::new();
                for k in keys {
                    if let Some(e) = self.get(k)? {
                        out.insert(k.clone(), e);
                    }
                }
                Ok(out)
            }
            Store::Pg(p) => p.get_many(keys),
        }
    }

    /// Writes a new entry unless the key exists: false then.
    pub fn insert_new(&self, key: &[u8], entry: &AliasEntry) -> Result<bool, TableError> {
        match self {
            Store::Sled(s) => Ok(s
                .aliases
                .compare_and_swap(key, None as Option<&[u8]>, Some(encode(entry)))?
                .is_ok()),
            Store::Pg(p) => p.insert_new(key, entry),
        }
    }

    pub fn put(&self, key: &[u8], entry: &AliasEntry) -> Result<(), TableError> {
        match self {
            Store::Sled(s) => {
                s.aliases.insert(key, encode(entry))?;
                Ok(())
            }
            Store::Pg(p) => p.put(key, entry),
        }
    }

    /// Removes an alias and its health; false when there was none.
    pub fn remove(&self, key: &[u8]) -> Result<bool, TableError> {
        match self {
            Store::Sled(s) => {
                let gone = s.aliases.remove(key)?.is_some();
                s.health.remove(key)?;
                Ok(gone)
            }
            Store::Pg(p) => p.remove(key),
        }
    }

    /// Every alias, or those of one (lowercase) domain, in key order.
    pub fn list(&self, domain: Option<&str>) -> Result<Vec<(Vec<u8>, AliasEntry)>, TableError> {
        match self {
            Store::Sled(s) => {
                let iter = match domain {
                    Some(d) => s.aliases.scan_prefix(super::key(d, "")),
                    None => s.aliases.iter(),
                };
                let mut out = Vec::new();
                for kv in iter {
                    let (k, v) = kv?;
                    out.push((k.to_vec(), decode(&v)?));
                }
                Ok(out)
            }
            Store::Pg(p) => p.list(domain),
        }
    }

    pub fn count(&self) -> Result<usize, TableError> {
        match self {
            Store::Sled(s) => Ok(s.aliases.len()),
            Store::Pg(p) => p.count(),
        }
    }

    pub fn add_domain(&self, d: &str) -> Result<(), TableError> {
        match self {
            Store::Sled(s) => {
                s.domains.insert(d.as_bytes(), &[])?;
                Ok(())
            }
            Store::Pg(p) => p.add_domains(&[d.to_string()]),
        }
    }

    pub fn remove_domain(&self, d: &str) -> Result<bool, TableError> {
        match self {
            Store::Sled(s) => Ok(s.domains.remove(d.as_bytes())?.is_some()),
            Store::Pg(p) => p.remove_domain(d),
        }
    }

    /// Domains added explicitly (`domain add`), sorted.
    pub fn explicit_domains(&self) -> Result<Vec<String>, TableError> {
        match self {
            Store::Sled(s) => {
                let mut out = Vec::new();
                for kv in s.domains.iter() {
                    out.push(String::from_utf8_lossy(&kv?.0).into_owned());
                }
                Ok(out)
            }
            Store::Pg(p) => p.explicit_domains(),
        }
    }

    /// Local domains (explicit, or holding an alias), sorted.
    pub fn domains(&self) -> Result<Vec<String>, TableError> {
        match self {
            Store::Sled(s) => s.domains(),
            Store::Pg(p) => p.domains(),
        }
    }

    /// Local domains → "has a catch-all".
    pub fn local_domains(&self) -> Result<HashMap<String, bool>, TableError> {
        match self {
            Store::Sled(s) => {
                let mut m = HashMap::new();
                for d in s.domains()? {
                    let catch_all = s.aliases.contains_key(super::key(&d, ""))?;
                    m.insert(d, catch_all);
                }
                Ok(m)
            }
            Store::Pg(p) => p.local_domains(),
        }
    }

    pub fn health(&self, key: &[u8]) -> Result<Vec<DestHealth>, TableError> {
        match self {
            Store::Sled(s) => Ok(match s.health.get(key)? {
                Some(v) => serde_json::from_slice(&v).unwrap_or_default(),
                None => Vec::new(),
            }),
            Store::Pg(p) => p.health(key),
        }
    }

    /// Read-modify-write of one alias's health list, atomic against other writers.
    pub fn health_update(
        &self,
        key: &[u8],
        merge: &(dyn Fn(&mut Vec<DestHealth>) + Sync),
    ) -> Result<(), TableError> {
        match self {
            Store::Sled(s) => s.health_update(key, merge),
            Store::Pg(p) => p.health_update(key, merge),
        }
    }

    pub fn all_health(&self) -> Result<Vec<KeyedHealth>, TableError> {
        match self {
            Store::Sled(s) => {
                let mut out = Vec::new();
                for kv in s.health.iter() {
                    let (k, v) = kv?;
                    out.push((k.to_vec(), serde_json::from_slice(&v).unwrap_or_default()));
                }
                Ok(out)
            }
            Store::Pg(p) => p.all_health(),
        }
    }

    /// Replaces a health list as it is (table copy).
    pub fn put_health(&self, key: &[u8], list: &[DestHealth]) -> Result<(), TableError> {
        let list = list.to_vec();
        self.health_update(key, &move |l| *l = list.clone())
    }

    /// Writes many entries and domains in one go (imports, table copy); returns the
    /// number of entries that replaced an existing one.
    pub fn write_batch(
        &self,
        entries: &[(Vec<u8>, AliasEntry)],
        domains: &[String],
    ) -> Result<usize, TableError> {
        match self {
            Store::Sled(s) => {
                let mut batch = sled::Batch::default();
                let mut replaced = 0;
                for (k, e) in entries {
                    if s.aliases.contains_key(k)? {
                        replaced += 1;
                    }
                    batch.insert(k.as_slice(), encode(e));
                }
                s.aliases.apply_batch(batch)?;
                for d in domains {
                    s.domains.insert(d.as_bytes(), &[])?;
                }
                Ok(replaced)
            }
            Store::Pg(p) => p.write_batch(entries, domains),
        }
    }

    /// Tells every node's view about a change made here (PostgreSQL: NOTIFY; the
    /// sled store has one node, whose view `Table` already updated).
    pub fn flush(&self) -> Result<(), TableError> {
        match self {
            Store::Sled(s) => {
                s.db.flush()?;
                Ok(())
            }
            Store::Pg(_) => Ok(()),
        }
    }
}
