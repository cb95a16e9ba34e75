//! `tenso table copy`: moves a whole table between the two stores (sled ⇄ PostgreSQL)
//! without losing a field — aliases (their stored JSON as it is: destinations, bounce
//! and spam policy, state, times), explicitly added domains, destination health and
//! the bounce correlation log and the submission logins.
//!
//! Entries already in the target with the same alias are replaced; nothing in the
//! target is removed. Node-local state (the outbound TLS cache and reports, queues)
//! is not table state and is not copied; the pool is copied by `tenso table copy`
//! beside this (a node's Maildir pool ⇄ the fleet's shared pool).

use super::{Table, TableError};
use serde::Serialize;

#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct CopyReport {
    pub aliases: usize,
    pub replaced: usize,
    pub domains: usize,
    pub health: usize,
    pub fwdlog: usize,
    /// Submission logins (their Argon2id hashes, as stored).
    pub logins: usize,
    /// Pooled bounces (copied by the caller, which owns the pools).
    pub pool: usize,
}

/// Copies everything of `from` into `to`; durable in `to` when it returns.
pub fn copy(from: &Table, to: &Table) -> Result<CopyReport, TableError> {
    let src = from.store();
    let dst = to.store();
    let entries = src.list(None)?;
    let domains = src.explicit_domains()?;
    let replaced = dst.write_batch(&entries, &domains)?;
    let mut report = CopyReport {
        aliases: entries.len(),
        replaced,
        domains: domains.len(),
        ..Default::default()
    };
    drop(entries);
    for (k, list) in src.all_health()? {
        dst.put_health(&k, &list)?;
        report.health += 1;
    }
    let logins_to = to.logins()?;
    for (k, record) in from.logins()?.all()? {
        if logins_to.put_raw(&k, &record)? {
            report.logins += 1;
        }
    }
    let log_to = to.fwdlog()?;
    for rec in from.fwdlog()?.all()? {
        log_to.record(&rec)?;
        report.fwdlog += 1;
    }
    to.flush()?;
    Ok(report)
}
