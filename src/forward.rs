//! The forward step: turns an accepted recipient into outgoing recipients.
//!
//! Applies the table (alias → destinations, alias chains to a bounded depth, cycle
//! guard) and proposal 2's envelope rewrite: the outgoing reverse-path is the alias
//! the mail was sent to — plain, no SRS — or stays `<>` when the original sender was
//! null. It decides nothing about transport or retries and does no I/O besides table
//! reads.

use crate::config::{BouncePolicy, Config};
use crate::smtp::address::Mailbox;
use crate::spool::{Rcpt, RcptState};
use crate::table::{Found, MatchKind, Table, TableError};
use std::collections::HashSet;

/// What a RCPT was accepted for.
#[derive(Debug, Clone)]
pub enum Target {
    /// An alias (or catch-all) entry of the table; `written` is the RCPT mailbox.
    Alias { written: Mailbox, found: Found },
    /// Postmaster of a local domain (RFC 5321 §4.5.1), routed per `postmaster`.
    Postmaster { written: String },
    /// An unknown user accepted under `unknown_recipient = "accept"`: nothing is
    /// forwarded; the sender may get a DSN (proposal 1b decides).
    Unknown { written: String },
    /// A recipient outside our domains, accepted from an authenticated submission
    /// client (the one relay tenso does): sent as is, with the login's alias as
    /// MAIL FROM, its failures reported through that alias's bounce policy.
    Submitted { written: Mailbox },
}

impl Target {
    pub fn written(&self) -> String {
        match self {
            Target::Alias { written, .. } => written.to_string(),
            Target::Postmaster { written } | Target::Unknown { written } => written.clone(),
            Target::Submitted { written } => written.to_string(),
        }
    }

    /// The identity written into `Delivered-To:` for copies made for this target
    /// (see [`crate::spool::Rcpt::trace_id`]).
    pub fn trace_id(&self) -> String {
        match self {
            Target::Alias { written, found } if found.kind == MatchKind::CatchAll => {
                written.to_string().to_lowercase()
            }
            Target::Alias { found, .. } => found.alias.clone(),
            Target::Postmaster { .. } => POSTMASTER_POOL.to_string(),
            Target::Unknown { written } => written.to_lowercase(),
            Target::Submitted { written } => written.to_string().to_lowercase(),
        }
    }
}

/// The pool name for postmaster mail when `postmaster` is not configured.
pub const POSTMASTER_POOL: &str = "postmaster";

fn rcpt(orig: &str, alias: &str, mail_from: &str, dest: &str, policy: BouncePolicy) -> Rcpt {
    Rcpt {
        orig: orig.to_string(),
        alias: alias.to_string(),
        mail_from: mail_from.to_string(),
        dest: dest.to_string(),
        pool: None,
        policy,
        state: RcptState::Pending,
        attempts: 0,
        next_attempt: 0,
        last: None,
        status: None,
        remote_mta: None,
        warned: false,
        reported: false,
        unknown: false,
    }
}

/// Expands one accepted target into outgoing recipients. `reverse_path` is the
/// original MAIL FROM ("" for `<>`): a null sender is never given a non-null one.
pub fn expand(
    table: &Table,
    cfg: &Config,
    target: &Target,
    reverse_path: &str,
) -> Result<Vec<Rcpt>, TableError> {
    match target {
        Target::Unknown { .. } => Ok(Vec::new()),
        Target::Submitted { written } => {
            // The reverse-path is the login's own alias (checked at MAIL).
            let policy = table.get(reverse_path)?.bounce;
            let dest = written.written().map_err(|e| {
                TableError::Invalid(format!("recipient {written} cannot be written: {e}"))
            })?;
            Ok(vec![rcpt(&dest, reverse_path, reverse_path, &dest, policy)])
        }
        Target::Postmaster { written } => {
            let from = if reverse_path.is_empty() {
                String::new()
            } else {
                format!("postmaster@{}", cfg.hostname)
            };
            if cfg.postmaster.is_empty() {
                let mut r = rcpt(written, POSTMASTER_POOL, &from, "", BouncePolicy::Pool);
                r.pool = Some(POSTMASTER_POOL.to_string());
                return Ok(vec![r]);
            }
            Ok(cfg
                .postmaster
                .iter()
                .map(|d| rcpt(written, POSTMASTER_POOL, &from, d, BouncePolicy::Pool))
                .collect())
        }
        Target::Alias { written, found } => {
            let orig = written.to_string();
            // Proposal 2: the alias itself is the new reverse-path. A catch-all has no
            // address of its own, so the address actually written is used.
            let mail_from = if reverse_path.is_empty() {
                String::new()
            } else if found.kind == MatchKind::CatchAll {
                // Written, not pasted: a local part such as `x>y` or `a b` is quoted, so
                // it can never end the path early on the wire.
                Mailbox {
                    local: written.local.clone(),
                    domain: written.domain_lower(),
                }
                .to_string()
            } else {
                found.alias.clone()
            };
            let policy = found.entry.bounce;
            let mut out: Vec<Rcpt> = Vec::new();
            let mut seen_aliases = HashSet::from([found.alias.clone()]);
            let mut stack: Vec<(String, usize)> = found
                .entry
                .dests
                .iter()
                .rev()
                .map(|d| (d.clone(), 1))
                .collect();
            while let Some((dest, depth)) = stack.pop() {
                let Ok(m) = Mailbox::parse(&dest) else {
                    let mut r = rcpt(&orig, &found.alias, &mail_from, &dest, policy);
                    fail(&mut r, "5.1.3", "invalid destination address in the table");
                    out.push(r);
                    continue;
                };
                if table.is_local_domain(&m.domain)? {
                    match table.resolve(&m)? {
                        // A disabled alias inside a chain: its branch is dropped. The
                        // sender already has its 250 for the alias it named, so neither
                        // a refusal nor a bounce is possible, and none is wanted.
                        Some(next) if !next.entry.state.is_active() => {
                            tracing::info!(alias = %found.alias, via = %next.alias, state = %next.entry.state, "alias chain: branch of a disabled alias dropped");
                            continue;
                        }
                        Some(next) if depth < cfg.delivery.max_alias_depth => {
                            if seen_aliases.insert(next.alias.clone()) {
                                stack.extend(
                                    next.entry
                                        .dests
                                        .iter()
                                        .rev()
                                        .map(|d| (d.clone(), depth + 1)),
                                );
                            }
                            continue;
                        }
                        Some(_) => {
                            let mut r = rcpt(&orig, &found.alias, &mail_from, &dest, policy);
                            fail(&mut r, "5.4.6", "alias chain too deep (forwarding loop?)");
                            out.push(r);
                            continue;
                        }
                        None => {
                            let mut r = rcpt(&orig, &found.alias, &mail_from, &dest, policy);
                            fail(
                                &mut r,
                                "5.1.1",
                                "destination is in a local domain but unknown",
                            );
                            out.push(r);
                            continue;
                        }
                    }
                }
                if !out.iter().any(|r| r.dest.eq_ignore_ascii_case(&dest)) {
                    out.push(rcpt(&orig, &found.alias, &mail_from, &dest, policy));
                }
            }
            Ok(out)
        }
    }
}

/// The final (remote) destinations of an alias, following alias chains exactly as
/// forwarded mail does. Used for bounces under policy `forward` and for digests.
/// Empty for an alias that is not `active` (`tenso user set --state`): it takes no mail,
/// so bounces stay in its pool and no digest is sent.
pub fn destinations(table: &Table, cfg: &Config, alias: &str) -> Result<Vec<String>, TableError> {
    if !table.get(alias)?.state.is_active() {
        return Ok(Vec::new());
    }
    let rcpts = expand_alias(table, cfg, alias, "")?;
    Ok(rcpts
        .into_iter()
        .filter(|r| r.is_pending())
        .map(|r| r.dest)
        .collect())
}

/// The outgoing recipients of mail for `alias` (by its table name) with the original
/// `reverse_path`, as if it had arrived for the alias itself: releasing a pooled
/// message, forwarding bounces and digests.
pub fn expand_alias(
    table: &Table,
    cfg: &Config,
    alias: &str,
    reverse_path: &str,
) -> Result<Vec<Rcpt>, TableError> {
    let entry = table.get(alias)?;
    let name = alias.trim().to_lowercase();
    let found = Found {
        alias: name.clone(),
        kind: if name.starts_with('@') {
            MatchKind::CatchAll
        } else {
            MatchKind::Exact
        },
        entry,
    };
    // A catch-all has no mailbox of its own; any address of its domain stands in.
    let written = Mailbox::parse(&if name.starts_with('@') {
        format!("postmaster{name}")
    } else {
        name.clone()
    })
    .map_err(|e| TableError::Invalid(format!("alias {alias}: {e}")))?;
    expand(table, cfg, &Target::Alias { written, found }, reverse_path)
}

/// An unknown recipient accepted under `unknown_recipient = "accept"` whose sender
/// gets a DSN (proposal 1b): failed from the start, for no alias, and marked so that
/// the DSN step reports it to the original sender rather than to an alias.
pub fn unknown(written: &str) -> Rcpt {
    let mut r = rcpt(written, "", "", "", BouncePolicy::Pool);
    r.unknown = true;
    fail(&mut r, "5.1.1", "550 5.1.1 user unknown");
    r
}

/// Marks a recipient failed before any attempt (the DSN step reports it).
pub fn fail(r: &mut Rcpt, status: &str, why: &str) {
    r.state = RcptState::Failed;
    r.status = Some(status.to_string());
    r.last = Some(why.to_string());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrite_rules() {
        let dir = tempfile::tempdir().unwrap();
        let t = Table::open(&dir.path().join("t"), 1 << 20, Some('+'), 8).unwrap();
        let cfg = Config::default();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        t.add(
            "list@a.test",
            &s(&["x@d.test", "alice@a.test"]),
            BouncePolicy::Forward,
        )
        .unwrap();
        t.add(
            "alice@a.test",
            &s(&["alice@d.test", "x@d.test"]),
            BouncePolicy::Pool,
        )
        .unwrap();
        t.add("@c.test", &s(&["all@d.test"]), BouncePolicy::Pool)
            .unwrap();
        let target = |a: &str| {
            let m = Mailbox::parse(a).unwrap();
            Target::Alias {
                found: t.resolve(&m).unwrap().unwrap(),
                written: m,
            }
        };
        let r = expand(&t, &cfg, &target("list@a.test"), "s@o.test").unwrap();
        let dests: Vec<_> = r.iter().map(|r| r.dest.as_str()).collect();
        assert_eq!(dests, ["x@d.test", "alice@d.test"]);
        assert!(r.iter().all(|r| r.mail_from == "list@a.test"));
        assert!(r.iter().all(|r| r.policy == BouncePolicy::Forward));
        let r = expand(&t, &cfg, &target("alice+x@a.test"), "s@o.test").unwrap();
        assert_eq!(r[0].mail_from, "alice@a.test");
        let r = expand(&t, &cfg, &target("Someone@C.test"), "s@o.test").unwrap();
        assert_eq!(r[0].mail_from, "Someone@c.test");
        // A catch-all's reverse-path is the written address, quoted as it must be.
        let r = expand(&t, &cfg, &target("\"x>y\"@C.test"), "s@o.test").unwrap();
        assert_eq!(r[0].mail_from, "\"x>y\"@c.test");
        let r = expand(&t, &cfg, &target("\"a b\"@c.test"), "s@o.test").unwrap();
        assert_eq!(r[0].mail_from, "\"a b\"@c.test");
        let r = expand(&t, &cfg, &target("alice@a.test"), "").unwrap();
        assert!(r.iter().all(|r| r.mail_from.is_empty()));
        let pm = Target::Postmaster {
            written: "postmaster".into(),
        };
        let r = expand(&t, &cfg, &pm, "s@o.test").unwrap();
        assert_eq!(r[0].pool.as_deref(), Some(POSTMASTER_POOL));

        // A disabled alias inside a chain: its branch is dropped, the rest flows; a
        // disabled alias itself has no destinations (bounces stay in its pool).
        t.update("alice@a.test", |e| {
            e.state = crate::table::AliasState::Discard
        })
        .unwrap();
        let r = expand(&t, &cfg, &target("list@a.test"), "s@o.test").unwrap();
        let dests: Vec<_> = r.iter().map(|r| r.dest.as_str()).collect();
        assert_eq!(dests, ["x@d.test"]);
        assert!(destinations(&t, &cfg, "alice@a.test").unwrap().is_empty());
        assert_eq!(destinations(&t, &cfg, "list@a.test").unwrap(), ["x@d.test"]);
    }
}
