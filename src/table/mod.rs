//! The forwarding table: aliases → destinations and bounce policy, local domains.
//!
//! The only code that touches sled. Keys are `domain \0 local` (lowercase), so one
//! prefix seek answers "is this domain ours?" and lists a domain's aliases in order;
//! a catch-all `@domain` is the key with an empty local part. Every change is flushed
//! to disk before it returns, so an acknowledged admin command survives a crash.
//! sled takes an exclusive lock on its files: a second opener gets
//! [`TableError::Locked`], which is how a second daemon is refused.
//!
//! What bounces report about destinations (their health) lives in a tree of its own,
//! at most [`MAX_HEALTH`] destinations per alias, so neither a bounce storm nor its
//! updates can grow or slow the entry every RCPT reads.

pub mod fwdlog;
pub mod import;
pub mod logins;
pub mod probe;
pub mod tls;

use crate::config::{BouncePolicy, SpamPolicy};
use crate::smtp::address::{Mailbox, check_alias};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("the forwarding table in {0} is locked by another process (is `tenso serve` running?)")]
    Locked(String),
    #[error("table storage error: {0}")]
    Storage(#[from] sled::Error),
    #[error("no such alias: {0}")]
    NotFound(String),
    #[error("alias already exists: {0} (use `tenso user set`)")]
    Exists(String),
    #[error("{0}")]
    Invalid(String),
}

/// Destinations whose health is kept per alias; the least recently reported one
/// makes room for a new one.
pub const MAX_HEALTH: usize = 16;

/// Longest diagnostic kept in a health entry (a remote reply, shown to the admin).
const MAX_DIAGNOSTIC: usize = 300;

/// Health of one destination, learned from bounces: the last status, when, and how
/// many correlated bounces reported it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DestHealth {
    pub dest: String,
    pub status: String,
    pub diagnostic: String,
    pub at: i64,
    #[serde(default = "one")]
    pub count: u64,
}

fn one() -> u64 {
    1
}

/// An alias as stored. (Entries written by older versions may also hold a `health`
/// list; it is ignored: health lives in its own tree now.)
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AliasEntry {
    pub dests: Vec<String>,
    pub bounce: BouncePolicy,
    pub created: i64,
    pub updated: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dmarc_preflight: Option<String>,
    /// Own spam policy; None follows `[spam] default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spam: Option<SpamPolicy>,
    #[serde(default, skip_serializing_if = "AliasState::is_active")]
    pub state: AliasState,
}

/// Whether an alias takes mail (`tenso user set --state`). Acts at RCPT for the alias
/// named there; inside an alias chain a disabled alias's branch is dropped (see
/// `forward::expand`). A disabled alias costs no delivery attempt, no bounce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AliasState {
    #[default]
    Active,
    /// 250, then dropped (counted `alias_discarded`).
    Discard,
    /// 450 4.2.1 at RCPT.
    Defer,
    /// 550 5.2.1 at RCPT.
    Reject,
}

impl AliasState {
    pub fn is_active(&self) -> bool {
        *self == AliasState::Active
    }
}

impl std::fmt::Display for AliasState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AliasState::Active => "active",
            AliasState::Discard => "discard",
            AliasState::Defer => "defer",
            AliasState::Reject => "reject",
        })
    }
}

impl std::str::FromStr for AliasState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "active" => Ok(AliasState::Active),
            "discard" => Ok(AliasState::Discard),
            "defer" => Ok(AliasState::Defer),
            "reject" => Ok(AliasState::Reject),
            _ => Err(format!(
                "unknown alias state {s:?} (expected active, discard, defer or reject)"
            )),
        }
    }
}

/// How a recipient matched the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MatchKind {
    Exact,
    Subaddress,
    CatchAll,
}

/// The answer to a RCPT lookup.
#[derive(Debug, Clone)]
pub enum RcptLookup {
    Found(Found),
    /// A local domain, but no alias, subaddress or catch-all matches.
    UnknownLocal,
    /// Not one of our domains: relaying is denied.
    NotLocal,
}

#[derive(Debug, Clone)]
pub struct Found {
    /// The alias key that matched: `local@domain` or `@domain`.
    pub alias: String,
    pub kind: MatchKind,
    pub entry: AliasEntry,
}

/// An alias as written by an admin: `local@domain` or `@domain` (catch-all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AliasName {
    pub local: String,
    pub domain: String,
}

impl AliasName {
    pub fn parse(s: &str) -> Result<AliasName, TableError> {
        let s = s.trim();
        if let Some(d) = s.strip_prefix('@') {
            // Validate the domain through the mailbox grammar with a dummy local part.
            let m = Mailbox::parse(&format!("x@{d}"))
                .map_err(|e| TableError::Invalid(format!("invalid alias {s:?}: {e}")))?;
            return Ok(AliasName {
                local: String::new(),
                domain: m.domain_lower(),
            });
        }
        // The one alias rule, shared with RCPT (smtp::address::check_alias).
        let m = Mailbox::parse(s)
            .and_then(|m| check_alias(&m).map(|()| m))
            .map_err(|e| TableError::Invalid(format!("invalid alias {s:?}: {e}")))?;
        Ok(AliasName {
            local: m.local.to_lowercase(),
            domain: m.domain_lower(),
        })
    }

    fn key(&self) -> Vec<u8> {
        key(&self.domain, &self.local)
    }
}

impl std::fmt::Display for AliasName {
    /// The RFC 5321 form (local part quoted when needed); `@domain` for a catch-all.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&alias_text(&self.local, &self.domain))
    }
}

/// An alias key's name as written everywhere (listings, export, envelopes, MAIL
/// FROM): `@domain` for a catch-all, else the mailbox with its local part quoted when
/// it is not a Dot-string, so that the name parses back to the same key.
fn alias_text(local: &str, domain: &str) -> String {
    if local.is_empty() {
        return format!("@{domain}");
    }
    Mailbox {
        local: local.to_string(),
        domain: domain.to_string(),
    }
    .to_string()
}

fn key(domain: &str, local: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(domain.len() + local.len() + 1);
    k.extend_from_slice(domain.as_bytes());
    k.push(0);
    k.extend_from_slice(local.as_bytes());
    k
}

fn name_of(k: &[u8]) -> String {
    let s = String::from_utf8_lossy(k);
    match s.split_once('\0') {
        Some((d, l)) => alias_text(l, d),
        None => s.into_owned(),
    }
}

/// Validates one destination address.
pub fn parse_dest(s: &str) -> Result<Mailbox, TableError> {
    let m = Mailbox::parse(s.trim())
        .map_err(|e| TableError::Invalid(format!("invalid destination {s:?}: {e}")))?;
    if m.is_address_literal() {
        return Err(TableError::Invalid(format!(
            "invalid destination {s:?}: address literals are not supported"
        )));
    }
    Ok(m)
}

#[derive(Clone)]
pub struct Table {
    db: sled::Db,
    aliases: sled::Tree,
    domains: sled::Tree,
    /// alias key → its destinations' health (JSON list, at most MAX_HEALTH).
    health: sled::Tree,
    /// The reachability probe's own key (see [`probe`]).
    probe: sled::Tree,
    /// Where the store lives (the probe also writes a file here).
    dir: std::path::PathBuf,
    separator: Option<char>,
    max_depth: usize,
    /// Local domains → "has a catch-all", kept in memory: every RCPT asks, the set is
    /// small, and it changes only through this Table (sled's lock keeps other
    /// processes out). Dropped on every change and rebuilt on the next read.
    local: Arc<RwLock<DomainCache>>,
}

/// The in-memory set of local domains; `generation` counts changes, so a rebuild
/// that raced with a change is not kept.
#[derive(Default)]
struct DomainCache {
    generation: u64,
    domains: Option<Arc<HashMap<String, bool>>>,
}

/// The outcome of an import, for the admin.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ImportReport {
    pub added: usize,
    pub replaced: usize,
    pub domains: usize,
    pub bad: Vec<(usize, String)>,
}

impl Table {
    pub fn open(
        dir: &Path,
        cache_bytes: u64,
        separator: Option<char>,
        max_depth: usize,
    ) -> Result<Table, TableError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::LowSpace)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(ref io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                    TableError::Locked(dir.display().to_string())
                }
                e if e.to_string().contains("could not acquire lock") => {
                    TableError::Locked(dir.display().to_string())
                }
                e => TableError::Storage(e),
            })?;
        Ok(Table {
            aliases: db.open_tree("aliases")?,
            domains: db.open_tree("domains")?,
            health: db.open_tree("health")?,
            probe: db.open_tree("probe")?,
            dir: dir.to_path_buf(),
            db,
            separator,
            max_depth,
            local: Arc::new(RwLock::new(DomainCache::default())),
        })
    }

    /// Submission logins (same database, own tree).
    pub fn logins(&self) -> Result<logins::Logins, TableError> {
        logins::Logins::open(&self.db, &self.aliases)
    }

    /// The outbound TLS state: MTA-STS policies and TLS-RPT counts (own trees).
    pub fn tls(&self) -> Result<tls::TlsStore, TableError> {
        tls::TlsStore::open(&self.db)
    }

    /// The correlation log of forwarded copies (same database, own trees).
    pub fn fwdlog(&self) -> Result<fwdlog::FwdLog, TableError> {
        fwdlog::FwdLog::open(&self.db)
    }

    /// Records what one correlated bounce said about destinations of an alias, in one
    /// compare-and-swap: each named destination gets its latest status (and its count
    /// goes up); beyond [`MAX_HEALTH`] destinations the least recently reported go.
    /// Not flushed: health is advice, and sled's own flush follows within a second.
    pub fn record_health(&self, alias: &str, updates: &[DestHealth]) -> Result<(), TableError> {
        let name = AliasName::parse(alias)?;
        let key = name.key();
        if !self.aliases.contains_key(&key)? {
            return Err(TableError::NotFound(name.to_string()));
        }
        loop {
            let old = self.health.get(&key)?;
            let mut list = old
                .as_ref()
                .and_then(|v| serde_json::from_slice::<Vec<DestHealth>>(v).ok())
                .unwrap_or_default();
            merge_health(&mut list, updates);
            let new = serde_json::to_vec(&list).expect("health serializes");
            if self.health.compare_and_swap(&key, old, Some(new))?.is_ok() {
                return Ok(());
            }
        }
    }

    /// The destinations' health of an alias, by destination.
    pub fn health(&self, alias: &str) -> Result<Vec<DestHealth>, TableError> {
        let name = AliasName::parse(alias)?;
        Ok(match self.health.get(name.key())? {
            Some(v) => serde_json::from_slice(&v).unwrap_or_default(),
            None => Vec::new(),
        })
    }

    /// Every alias's health (few aliases have any), for listings.
    pub fn all_health(&self) -> Result<HashMap<String, Vec<DestHealth>>, TableError> {
        let mut out = HashMap::new();
        for kv in self.health.iter() {
            let (k, v) = kv?;
            out.insert(name_of(&k), serde_json::from_slice(&v).unwrap_or_default());
        }
        Ok(out)
    }

    /// Makes a change durable (and visible to the in-memory domain set, rebuilt here
    /// on the admin's thread so the scan does not land on the next RCPT).
    pub fn flush(&self) -> Result<(), TableError> {
        self.changed();
        self.db.flush()?;
        self.local_domains()?;
        Ok(())
    }

    /// Can the store still confirm a change? One write and one flush of a key of its
    /// own (the time), then one page written and fsynced in a file beside sled's. The
    /// file is needed because sled writes into log segments it allocated earlier: a
    /// full disk shows in its flush only when a segment runs out — and then sled
    /// refuses everything until restarted. The page finds a full, read-only or
    /// failing file system first.
    pub fn probe(&self) -> Result<(), TableError> {
        self.probe
            .insert(b"probe", &crate::time::unix_now().to_be_bytes())?;
        self.db.flush()?;
        let path = self.dir.join("tenso-probe.tmp");
        let written =
            crate::disk::create_file(&path, crate::disk::PRIVATE, true).and_then(|mut f| {
                std::io::Write::write_all(&mut f, &[0u8; 4096])?;
                f.sync_all()
            });
        let _ = std::fs::remove_file(&path);
        written.map_err(|e| TableError::Invalid(format!("{}: {e}", path.display())))
    }

    fn get_raw(&self, domain: &str, local: &str) -> Result<Option<AliasEntry>, TableError> {
        Ok(match self.aliases.get(key(domain, local))? {
            Some(v) => Some(decode(&v)?),
            None => None,
        })
    }

    /// Local domains with their catch-all flag, from memory (rebuilt after changes).
    fn local_domains(&self) -> Result<Arc<HashMap<String, bool>>, TableError> {
        let generation = {
            let c = self.local.read();
            if let Some(m) = &c.domains {
                return Ok(m.clone());
            }
            c.generation
        };
        let mut m = HashMap::new();
        for d in self.domains()? {
            let catch_all = self.aliases.contains_key(key(&d, ""))?;
            m.insert(d, catch_all);
        }
        let m = Arc::new(m);
        let mut c = self.local.write();
        if c.generation == generation {
            c.domains = Some(m.clone());
        }
        Ok(m)
    }

    /// Forgets the in-memory domain set after a change.
    fn changed(&self) {
        let mut c = self.local.write();
        c.generation += 1;
        c.domains = None;
    }

    /// Is `domain` (any case) one of ours?
    pub fn is_local_domain(&self, domain: &str) -> Result<bool, TableError> {
        Ok(self.local_domains()?.contains_key(&domain.to_lowercase()))
    }

    /// Finds the entry a recipient maps to: exact, then without the subaddress, then
    /// the domain's catch-all.
    pub fn resolve(&self, rcpt: &Mailbox) -> Result<Option<Found>, TableError> {
        let domain = rcpt.domain_lower();
        let local = rcpt.local.to_lowercase();
        if let Some(entry) = self.get_raw(&domain, &local)? {
            return Ok(Some(Found {
                alias: alias_text(&local, &domain),
                kind: MatchKind::Exact,
                entry,
            }));
        }
        if let Some(sep) = self.separator
            && let Some((base, _tag)) = local.split_once(sep)
            && !base.is_empty()
            && let Some(entry) = self.get_raw(&domain, base)?
        {
            return Ok(Some(Found {
                alias: alias_text(base, &domain),
                kind: MatchKind::Subaddress,
                entry,
            }));
        }
        let has_catch_all = self.local_domains()?.get(&domain).copied().unwrap_or(false);
        if has_catch_all && let Some(entry) = self.get_raw(&domain, "")? {
            return Ok(Some(Found {
                alias: format!("@{domain}"),
                kind: MatchKind::CatchAll,
                entry,
            }));
        }
        Ok(None)
    }

    /// What RCPT needs in one call: the matching entry, or whether the domain is
    /// ours at all. A match proves the domain is local, so the common case (a known
    /// alias) costs one read. Timed for `tenso_table_lookup_seconds`.
    pub fn lookup_rcpt(&self, rcpt: &Mailbox) -> Result<RcptLookup, TableError> {
        let started = std::time::Instant::now();
        let r = self.lookup_rcpt_inner(rcpt);
        crate::metrics::metrics()
            .table
            .observe(crate::metrics::since(started));
        r
    }

    fn lookup_rcpt_inner(&self, rcpt: &Mailbox) -> Result<RcptLookup, TableError> {
        if let Some(f) = self.resolve(rcpt)? {
            return Ok(RcptLookup::Found(f));
        }
        Ok(if self.is_local_domain(&rcpt.domain)? {
            RcptLookup::UnknownLocal
        } else {
            RcptLookup::NotLocal
        })
    }

    pub fn get(&self, alias: &str) -> Result<AliasEntry, TableError> {
        let name = AliasName::parse(alias)?;
        self.get_raw(&name.domain, &name.local)?
            .ok_or_else(|| TableError::NotFound(name.to_string()))
    }

    /// Checks destinations against the table (plus `pending` entries about to be
    /// written): a destination in a local domain must resolve to an alias, and
    /// following alias chains from `alias` must neither come back to it nor go deeper
    /// than the configured depth.
    fn check_dests(
        &self,
        alias: &AliasName,
        dests: &[String],
        pending: &BTreeMap<Vec<u8>, AliasEntry>,
    ) -> Result<(), TableError> {
        if dests.is_empty() {
            return Err(TableError::Invalid(format!(
                "{alias}: no destination given"
            )));
        }
        let lookup = |m: &Mailbox| -> Result<Option<(String, AliasEntry)>, TableError> {
            let d = m.domain_lower();
            let l = m.local.to_lowercase();
            let mut candidates = vec![(l.clone(), alias_text(&l, &d))];
            if let Some(sep) = self.separator
                && let Some((base, _)) = l.split_once(sep)
            {
                candidates.push((base.to_string(), alias_text(base, &d)));
            }
            candidates.push((String::new(), format!("@{d}")));
            for (local, name) in candidates {
                if let Some(e) = pending.get(&key(&d, &local)) {
                    return Ok(Some((name, e.clone())));
                }
                if let Some(e) = self.get_raw(&d, &local)? {
                    return Ok(Some((name, e)));
                }
            }
            Ok(None)
        };
        let is_local = |d: &str| -> Result<bool, TableError> {
            let k = key(d, "");
            Ok(pending
                .range(k.clone()..)
                .next()
                .is_some_and(|(pk, _)| pk.starts_with(&k))
                || self.is_local_domain(d)?)
        };
        let me = alias.to_string();
        let mut stack: Vec<(String, usize)> = dests.iter().map(|d| (d.clone(), 1)).collect();
        let mut seen = HashSet::new();
        while let Some((dest, depth)) = stack.pop() {
            let m = parse_dest(&dest)?;
            if !is_local(&m.domain_lower())? {
                continue;
            }
            let Some((name, entry)) = lookup(&m)? else {
                return Err(TableError::Invalid(format!(
                    "{alias}: destination {dest} is in a local domain but is no alias"
                )));
            };
            if name == me {
                return Err(TableError::Invalid(format!(
                    "{alias}: destination {dest} leads back to {alias} (forwarding loop)"
                )));
            }
            if depth >= self.max_depth {
                return Err(TableError::Invalid(format!(
                    "{alias}: alias chain through {dest} is deeper than {}",
                    self.max_depth
                )));
            }
            if seen.insert(name) {
                stack.extend(entry.dests.iter().map(|d| (d.clone(), depth + 1)));
            }
        }
        Ok(())
    }

    fn normalize_dests(dests: &[String]) -> Result<Vec<String>, TableError> {
        let mut out: Vec<String> = Vec::new();
        for d in dests {
            let m = parse_dest(d)?;
            // Stored in the written form: quoted when needed, so it parses back.
            let norm = Mailbox {
                domain: m.domain_lower(),
                local: m.local,
            }
            .written()
            .map_err(|e| TableError::Invalid(format!("invalid destination {d:?}: {e}")))?;
            if !out.contains(&norm) {
                out.push(norm);
            }
        }
        Ok(out)
    }

    pub fn add(
        &self,
        alias: &str,
        dests: &[String],
        bounce: BouncePolicy,
    ) -> Result<AliasEntry, TableError> {
        let name = AliasName::parse(alias)?;
        let dests = Self::normalize_dests(dests)?;
        if self.aliases.contains_key(name.key())? {
            return Err(TableError::Exists(name.to_string()));
        }
        self.check_dests(&name, &dests, &BTreeMap::new())?;
        let now = crate::time::unix_now();
        let entry = AliasEntry {
            dests,
            bounce,
            created: now,
            updated: now,
            dmarc_preflight: None,
            spam: None,
            state: AliasState::Active,
        };
        // compare_and_swap makes "add" refuse a concurrent add of the same alias.
        self.aliases
            .compare_and_swap(name.key(), None as Option<&[u8]>, Some(encode(&entry)))?
            .map_err(|_| TableError::Exists(name.to_string()))?;
        self.flush()?;
        Ok(entry)
    }

    /// Changes an existing alias with `change`, validating destinations again.
    pub fn update(
        &self,
        alias: &str,
        change: impl Fn(&mut AliasEntry),
    ) -> Result<AliasEntry, TableError> {
        let name = AliasName::parse(alias)?;
        let mut entry = self
            .get_raw(&name.domain, &name.local)?
            .ok_or_else(|| TableError::NotFound(name.to_string()))?;
        let before = entry.dests.clone();
        change(&mut entry);
        if entry.dests != before {
            entry.dests = Self::normalize_dests(&entry.dests)?;
            self.check_dests(&name, &entry.dests, &BTreeMap::new())?;
        }
        entry.updated = crate::time::unix_now();
        self.aliases.insert(name.key(), encode(&entry))?;
        self.flush()?;
        Ok(entry)
    }

    pub fn remove(&self, alias: &str) -> Result<(), TableError> {
        let name = AliasName::parse(alias)?;
        if self.aliases.remove(name.key())?.is_none() {
            return Err(TableError::NotFound(name.to_string()));
        }
        self.health.remove(name.key())?;
        // A removed alias can no longer send as itself either.
        self.logins()?.forget(&name.key())?;
        self.flush()?;
        Ok(())
    }

    /// All aliases, or those of one domain, in key order.
    pub fn list(&self, domain: Option<&str>) -> Result<Vec<(String, AliasEntry)>, TableError> {
        let iter = match domain {
            Some(d) => self.aliases.scan_prefix(key(&d.to_lowercase(), "")),
            None => self.aliases.iter(),
        };
        let mut out = Vec::new();
        for kv in iter {
            let (k, v) = kv?;
            out.push((name_of(&k), decode(&v)?));
        }
        Ok(out)
    }

    pub fn count(&self) -> usize {
        self.aliases.len()
    }

    pub fn add_domain(&self, domain: &str) -> Result<(), TableError> {
        let d = AliasName::parse(&format!("@{domain}"))?.domain;
        self.domains.insert(d.as_bytes(), &[])?;
        self.flush()
    }

    pub fn remove_domain(&self, domain: &str) -> Result<(), TableError> {
        let d = domain.to_lowercase();
        if self.domains.remove(d.as_bytes())?.is_none() {
            return Err(TableError::NotFound(format!(
                "domain {d} (added with `domain add`)"
            )));
        }
        self.flush()
    }

    /// Local domains: added explicitly, or holding at least one alias.
    pub fn domains(&self) -> Result<Vec<String>, TableError> {
        let mut set = std::collections::BTreeSet::new();
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

    /// Imports parsed entries atomically: either all valid entries are written in one
    /// batch, or (when there are bad lines and `skip_bad` is false) nothing is.
    pub fn import(
        &self,
        parsed: import::Parsed,
        skip_bad: bool,
        bounce: BouncePolicy,
    ) -> Result<ImportReport, TableError> {
        let mut report = ImportReport {
            bad: parsed
                .bad
                .iter()
                .map(|b| (b.line, b.reason.clone()))
                .collect(),
            ..Default::default()
        };
        let now = crate::time::unix_now();
        let mut pending: BTreeMap<Vec<u8>, AliasEntry> = BTreeMap::new();
        let mut names = Vec::new();
        for e in &parsed.entries {
            let checked =
                AliasName::parse(&e.alias).and_then(|n| Ok((n, Self::normalize_dests(&e.dests)?)));
            match checked {
                Ok((name, dests)) => {
                    let old = self.get_raw(&name.domain, &name.local)?;
                    let entry = AliasEntry {
                        dests,
                        bounce: old.as_ref().map_or(bounce, |o| o.bounce),
                        created: old.as_ref().map_or(now, |o| o.created),
                        updated: now,
                        dmarc_preflight: old.as_ref().and_then(|o| o.dmarc_preflight.clone()),
                        spam: old.as_ref().and_then(|o| o.spam),
                        state: old.as_ref().map_or(AliasState::Active, |o| o.state),
                    };
                    pending.insert(name.key(), entry);
                    names.push((name, e.line));
                }
                Err(err) => report.bad.push((e.line, err.to_string())),
            }
        }
        let mut domain_names = Vec::new();
        for (d, line) in &parsed.domains {
            match AliasName::parse(&format!("@{d}")) {
                Ok(n) => domain_names.push(n.domain),
                Err(err) => report.bad.push((*line, err.to_string())),
            }
        }
        // Destinations are checked against the table as it will be after the import,
        // so files may refer to aliases defined further down.
        let mut invalid = HashSet::new();
        for (name, line) in &names {
            let dests = &pending[&name.key()].dests;
            if let Err(err) = self.check_dests(name, dests, &pending) {
                report.bad.push((*line, err.to_string()));
                invalid.insert(name.key());
            }
        }
        report.bad.sort();
        if !report.bad.is_empty() && !skip_bad {
            return Ok(report);
        }
        let mut batch = sled::Batch::default();
        for (k, entry) in &pending {
            if invalid.contains(k) {
                continue;
            }
            if self.aliases.contains_key(k)? {
                report.replaced += 1;
            } else {
                report.added += 1;
            }
            batch.insert(k.as_slice(), encode(entry));
        }
        self.aliases.apply_batch(batch)?;
        for d in domain_names {
            self.domains.insert(d.as_bytes(), &[])?;
            report.domains += 1;
        }
        self.flush()?;
        Ok(report)
    }
}

/// Folds `updates` into `list`: one entry per destination (case-insensitive), the
/// latest report wins and counts; at most [`MAX_HEALTH`] entries, the least recently
/// reported dropped first; sorted by destination for display.
fn merge_health(list: &mut Vec<DestHealth>, updates: &[DestHealth]) {
    for u in updates {
        let mut u = u.clone();
        if u.diagnostic.len() > MAX_DIAGNOSTIC {
            let mut end = MAX_DIAGNOSTIC;
            while !u.diagnostic.is_char_boundary(end) {
                end -= 1;
            }
            u.diagnostic.truncate(end);
        }
        match list
            .iter_mut()
            .find(|h| h.dest.eq_ignore_ascii_case(&u.dest))
        {
            Some(h) => {
                u.count = h.count.saturating_add(1);
                *h = u;
            }
            None => {
                u.count = 1;
                list.push(u);
            }
        }
    }
    if list.len() > MAX_HEALTH {
        list.sort_by_key(|h| std::cmp::Reverse(h.at));
        list.truncate(MAX_HEALTH);
    }
    list.sort_by(|a, b| a.dest.cmp(&b.dest));
}

fn encode(e: &AliasEntry) -> Vec<u8> {
    serde_json::to_vec(e).expect("alias entry serializes")
}

fn decode(v: &[u8]) -> Result<AliasEntry, TableError> {
    serde_json::from_slice(v).map_err(|e| TableError::Invalid(format!("corrupt table entry: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> (tempfile::TempDir, Table) {
        let dir = tempfile::tempdir().unwrap();
        let t = Table::open(&dir.path().join("t"), 1 << 20, Some('+'), 8).unwrap();
        (dir, t)
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn add_resolve_and_domains() {
        let (_d, t) = table();
        t.add(
            "Alice@Alias.Example",
            &s(&["a@dest.test"]),
            BouncePolicy::Pool,
        )
        .unwrap();
        t.add("@catch.test", &s(&["c@dest.test"]), BouncePolicy::Forward)
            .unwrap();
        t.add_domain("empty.test").unwrap();
        assert!(t.is_local_domain("ALIAS.example").unwrap());
        assert!(t.is_local_domain("empty.test").unwrap());
        assert!(!t.is_local_domain("dest.test").unwrap());
        let m = |x: &str| Mailbox::parse(x).unwrap();
        let f = t.resolve(&m("alice@alias.example")).unwrap().unwrap();
        assert_eq!(
            (f.alias.as_str(), f.kind),
            ("alice@alias.example", MatchKind::Exact)
        );
        let f = t.resolve(&m("ALICE+tag@alias.example")).unwrap().unwrap();
        assert_eq!(f.kind, MatchKind::Subaddress);
        let f = t.resolve(&m("anyone@catch.test")).unwrap().unwrap();
        assert_eq!(f.kind, MatchKind::CatchAll);
        assert!(t.resolve(&m("bob@alias.example")).unwrap().is_none());
        assert_eq!(
            t.domains().unwrap(),
            vec!["alias.example", "catch.test", "empty.test"]
        );
    }

    #[test]
    fn refuses_bad_input() {
        let (_d, t) = table();
        t.add("a@x.test", &s(&["a@dest.test"]), BouncePolicy::Pool)
            .unwrap();
        assert!(matches!(
            t.add("a@x.test", &s(&["b@dest.test"]), BouncePolicy::Pool),
            Err(TableError::Exists(_))
        ));
        assert!(
            t.add("b@x.test", &s(&["not an address"]), BouncePolicy::Pool)
                .is_err()
        );
        assert!(
            t.add("b@x.test", &s(&["nobody@x.test"]), BouncePolicy::Pool)
                .is_err()
        );
        assert!(matches!(
            t.remove("zz@x.test"),
            Err(TableError::NotFound(_))
        ));
        // cycle: b -> a, then a -> b is refused
        t.add("b@x.test", &s(&["a@x.test"]), BouncePolicy::Pool)
            .unwrap();
        let err = t
            .update("a@x.test", |e| e.dests = s(&["b@x.test"]))
            .unwrap_err();
        assert!(err.to_string().contains("loop"), "{err}");
        assert_eq!(t.get("a@x.test").unwrap().dests, s(&["a@dest.test"]));
    }

    #[test]
    fn quoted_local_parts_are_written_and_export_imports_unchanged() {
        let (_d, t) = table();
        t.add(
            "\"../x\"@alias.test",
            &s(&["\"c d\"@Dest.test"]),
            BouncePolicy::Pool,
        )
        .unwrap();
        t.add(
            "\"Sales Team\"@alias.test",
            &s(&["\"../x\"@alias.test", "e@dest.test"]),
            BouncePolicy::Pool,
        )
        .unwrap();
        let m = Mailbox::parse("\"../X\"@alias.test").unwrap();
        let f = t.resolve(&m).unwrap().unwrap();
        assert_eq!(f.alias, "\"../x\"@alias.test");
        assert_eq!(f.entry.dests, s(&["\"c d\"@dest.test"]));
        let pairs: Vec<(String, Vec<String>)> = t
            .list(None)
            .unwrap()
            .into_iter()
            .map(|(n, e)| (n, e.dests))
            .collect();
        assert_eq!(pairs[0].0, "\"../x\"@alias.test");
        assert_eq!(pairs[1].0, "\"sales team\"@alias.test");
        let text = import::export_virtual(&pairs);
        let parsed = import::parse(&text, import::Format::Virtual, None);
        assert!(parsed.bad.is_empty(), "{:?}\n{text}", parsed.bad);
        let (_d2, fresh) = table();
        let report = fresh.import(parsed, false, BouncePolicy::Pool).unwrap();
        assert!(report.bad.is_empty(), "{:?}", report.bad);
        let back: Vec<(String, Vec<String>)> = fresh
            .list(None)
            .unwrap()
            .into_iter()
            .map(|(n, e)| (n, e.dests))
            .collect();
        assert_eq!(back, pairs);
        assert_eq!(import::export_virtual(&back), text);
    }

    #[test]
    fn one_alias_rule_for_add_set_and_import() {
        let (_d, t) = table();
        for bad in [
            "a%b@alias.test",
            "a!b@alias.test",
            "\"u@other\"@alias.test",
            "a@[127.0.0.1]",
            "\"tab\there\"@alias.test",
            ".a@alias.test",
        ] {
            assert!(
                t.add(bad, &s(&["x@dest.test"]), BouncePolicy::Pool)
                    .is_err(),
                "{bad}"
            );
            let parsed = import::parse(
                &format!("{bad} x@dest.test\n"),
                import::Format::Virtual,
                None,
            );
            let report = t.import(parsed, false, BouncePolicy::Pool).unwrap();
            assert!(!report.bad.is_empty(), "{bad}: {report:?}");
        }
        let long = format!("{}@alias.test", "a".repeat(65));
        assert!(
            t.add(&long, &s(&["x@dest.test"]), BouncePolicy::Pool)
                .is_err()
        );
        assert_eq!(t.count(), 0);
        // A destination is stored in its written form too.
        t.add(
            "ok@alias.test",
            &s(&["\"a b\"@dest.test"]),
            BouncePolicy::Pool,
        )
        .unwrap();
        let e = t
            .update("ok@alias.test", |e| e.dests = s(&["\"x>y\"@dest.test"]))
            .unwrap();
        assert_eq!(e.dests, s(&["\"x>y\"@dest.test"]));
    }

    #[test]
    fn health_is_bounded_and_counted() {
        let (_d, t) = table();
        t.add("h@x.test", &s(&["a@dest.test"]), BouncePolicy::Pool)
            .unwrap();
        let h = |dest: &str, at: i64| DestHealth {
            dest: dest.into(),
            status: "5.1.1".into(),
            diagnostic: "x".repeat(1000),
            at,
            count: 0,
        };
        let many: Vec<DestHealth> = (0..40)
            .map(|i| h(&format!("d{i:02}@dest.test"), i))
            .collect();
        t.record_health("h@x.test", &many).unwrap();
        t.record_health("h@x.test", &[h("D39@dest.test", 100)])
            .unwrap();
        let got = t.health("h@x.test").unwrap();
        assert_eq!(got.len(), MAX_HEALTH);
        // The most recently reported survive; the repeated one counts twice.
        assert!(got.iter().all(|g| g.at >= 24), "{got:?}");
        let d39 = got
            .iter()
            .find(|g| g.dest.eq_ignore_ascii_case("d39@dest.test"))
            .unwrap();
        assert_eq!((d39.count, d39.at), (2, 100));
        assert!(got.iter().all(|g| g.diagnostic.len() <= MAX_DIAGNOSTIC));
        // The alias entry every RCPT reads does not grow with health.
        let raw = t.aliases.get(key("x.test", "h")).unwrap().unwrap();
        assert!(raw.len() < 200, "{}", raw.len());
        assert!(
            t.record_health("nobody@x.test", &[h("a@dest.test", 1)])
                .is_err()
        );
        t.remove("h@x.test").unwrap();
        assert!(t.all_health().unwrap().is_empty());
    }

    #[test]
    fn spam_policy_and_state_default_for_old_entries() {
        // An entry written before the spam gate existed: spam follows the default,
        // the alias is active, and nothing new is written for such entries.
        let old = br#"{"dests":["a@d.test"],"bounce":"pool","created":1,"updated":1}"#;
        let e = decode(old).unwrap();
        assert_eq!((e.spam, e.state), (None, AliasState::Active));
        assert_eq!(encode(&e), old.to_vec());
        let (_d, t) = table();
        t.add("a@x.test", &s(&["a@dest.test"]), BouncePolicy::Pool)
            .unwrap();
        t.update("a@x.test", |e| {
            e.spam = Some(SpamPolicy::Off);
            e.state = AliasState::Defer;
        })
        .unwrap();
        let e = t.get("a@x.test").unwrap();
        assert_eq!(
            (e.spam, e.state),
            (Some(SpamPolicy::Off), AliasState::Defer)
        );
        for st in ["active", "discard", "defer", "reject"] {
            assert_eq!(st.parse::<AliasState>().unwrap().to_string(), st);
        }
        assert!("paused".parse::<AliasState>().is_err());
    }

    #[test]
    fn second_open_is_locked() {
        let dir = tempfile::tempdir().unwrap();
        let _t = Table::open(&dir.path().join("t"), 1 << 20, None, 8).unwrap();
        let again = Table::open(&dir.path().join("t"), 1 << 20, None, 8);
        assert!(
            matches!(again, Err(TableError::Locked(_))),
            "{:?}",
            again.err()
        );
    }
}
