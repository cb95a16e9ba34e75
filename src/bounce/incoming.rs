//! Bounces that come back to an alias (after proposal 2 they return to the forwarder,
//! not to the original sender): recognise them, tie them to the forward that caused
//! them, record what they say about the destination, and apply the alias's policy.
//!
//! What counts as a bounce is [`super::dsn::classify_null_sender`]: RFC 3464 reports
//! and recognisable non-standard bounces. Auto-replies, read receipts and other
//! null-sender mail are not bounces: the caller forwards them with `<>` kept.
//!
//! A storm of forged reports cannot turn into work: a report is tied to a forwarded
//! copy only if it names a destination that copy really went to (else it is
//! uncorrelated and writes nothing); at most `dsn::MAX_DSN_GROUPS` groups of one
//! report are read; health is one bounded write per alias (`table::MAX_HEALTH`); and
//! reading and table access run on the blocking pool, never on an async worker.

use super::dsn::{self, NullSenderKind};
use super::{Bounce, Queued};
use crate::config::BouncePolicy;
use crate::smtp::header::{fields_raw, header_section};
use crate::spool::MessageKind;
use crate::table::{DestHealth, Table};
use std::sync::atomic::Ordering;

/// One alias a bounce was addressed to.
pub struct BounceTarget {
    pub alias: String,
    pub policy: BouncePolicy,
    /// The message already passed tenso for this alias (its trace header says so).
    pub looped: bool,
}

/// What happened to an incoming bounce.
#[derive(Debug, Default)]
pub struct Handled {
    pub queued: Vec<Queued>,
    pub pooled: usize,
    pub dropped: usize,
    pub correlated: usize,
}

/// The forwarded copy a bounce was tied to, for one alias, and how.
struct Match {
    queue_id: String,
    how: &'static str,
}

/// What the blocking step learned about one bounce.
struct Reading {
    kind: NullSenderKind,
    /// Per target, in order: the copy it was tied to, if any.
    matches: Vec<Option<Match>>,
    groups_read: usize,
    truncated: bool,
    mismatched: usize,
    health_updates: usize,
}

impl Bounce {
    /// Handles null-sender mail for `targets`. Returns None when the message is not a
    /// bounce (the caller forwards it normally with `<>`). On Ok, everything that was
    /// kept is on stable storage.
    ///
    /// Reading the report and every table access (correlation log, health) run on the
    /// blocking pool: a forged report costs its own session time, never a worker's.
    pub async fn incoming(
        &self,
        targets: &[BounceTarget],
        msg: &[u8],
    ) -> Result<Option<Handled>, String> {
        let table = self.table.clone();
        let aliases: Vec<String> = targets.iter().map(|t| t.alias.clone()).collect();
        let owned = msg.to_vec();
        let reading = tokio::task::spawn_blocking(move || read_bounce(&table, &aliases, &owned))
            .await
            .map_err(|e| format!("bounce reader failed: {e}"))??;
        let Some(reading) = reading else {
            return Ok(None);
        };
        let c = &self.counters;
        c.dsn_groups_read
            .fetch_add(reading.groups_read as u64, Ordering::Relaxed);
        c.dsn_truncated
            .fetch_add(reading.truncated as u64, Ordering::Relaxed);
        c.final_recipient_mismatch
            .fetch_add(reading.mismatched as u64, Ordering::Relaxed);
        c.health_updates
            .fetch_add(reading.health_updates as u64, Ordering::Relaxed);
        let unflagged = strip_flags(msg);
        let mut out = Handled::default();
        for (t, m) in targets.iter().zip(&reading.matches) {
            let mut copy = Vec::with_capacity(msg.len() + 128);
            match m {
                Some(Match { queue_id, how }) => {
                    out.correlated += 1;
                    c.correlated.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(alias = %t.alias, forwarded_as = %queue_id, matched_by = how, "bounce correlated with a forwarded copy");
                    copy.extend_from_slice(
                        format!(
                            "X-Tenso-Bounce: correlated; forwarded-as={queue_id}; by={how}\r\n"
                        )
                        .as_bytes(),
                    );
                }
                None => {
                    c.uncorrelated.fetch_add(1, Ordering::Relaxed);
                    let kind = reading.kind;
                    if self.cfg.bounce.drop_uncorrelated {
                        out.dropped += 1;
                        tracing::warn!(alias = %t.alias, ?kind, "uncorrelated bounce dropped (drop_uncorrelated = true; likely backscatter)");
                        continue;
                    }
                    tracing::warn!(alias = %t.alias, ?kind, "uncorrelated bounce (no forwarded copy matches; possibly backscatter)");
                    copy.extend_from_slice(
                        b"X-Tenso-Bounce: uncorrelated; no forwarded copy matches (possibly backscatter)\r\n",
                    );
                }
            }
            copy.extend_from_slice(&unflagged);
            // A bounce that already went through tenso for this alias is pooled: sending
            // it to the same destinations again is exactly the talk's loop.
            let policy = if t.looped {
                BouncePolicy::Pool
            } else {
                t.policy
            };
            match self
                .dispatch(&t.alias, policy, copy, MessageKind::ForwardedBounce)
                .await?
            {
                Some(q) => out.queued.push(q),
                None => out.pooled += 1,
            }
        }
        Ok(Some(out))
    }
}

/// The blocking half of [`Bounce::incoming`]: classifies and reads the report (at
/// most [`dsn::MAX_DSN_GROUPS`] groups), ties it to a forwarded copy per alias, and
/// records what it says about destinations. None when it is no bounce.
fn read_bounce(table: &Table, aliases: &[String], msg: &[u8]) -> Result<Option<Reading>, String> {
    let kind = dsn::classify_null_sender(msg);
    if !matches!(
        kind,
        NullSenderKind::DeliveryReport | NullSenderKind::NonStandardBounce
    ) {
        return Ok(None);
    }
    let parsed = dsn::parse_dsn(msg);
    let mid = parsed
        .as_ref()
        .and_then(|p| p.returned_message_id.clone())
        .or_else(|| dsn::returned_message_id(msg));
    let envid = parsed.as_ref().and_then(|p| p.original_envelope_id.clone());
    let log = table.fwdlog().map_err(|e| e.to_string())?;
    let mut r = Reading {
        kind,
        matches: Vec::with_capacity(aliases.len()),
        groups_read: parsed.as_ref().map_or(0, |p| p.groups_read),
        truncated: parsed.as_ref().is_some_and(|p| p.truncated),
        mismatched: 0,
        health_updates: 0,
    };
    for alias in aliases {
        let found = match &envid {
            Some(id) => log
                .by_envid(id, alias)
                .map_err(|e| e.to_string())?
                .map(|x| (x, "envid")),
            None => None,
        };
        let found = match (found, &mid) {
            (Some(f), _) => Some(f),
            (None, Some(m)) => log
                .by_message_id(m, alias)
                .map_err(|e| e.to_string())?
                .map(|x| (x, "message-id")),
            (None, None) => None,
        };
        let Some((rec, how)) = found else {
            r.matches.push(None);
            continue;
        };
        let Some(health) = health_of(&rec.dests, parsed.as_ref()) else {
            // The report names none of the destinations this copy went to: whatever
            // it is about, it is not about this alias's forwarding.
            r.mismatched += 1;
            tracing::warn!(alias = %alias, forwarded_as = %rec.queue_id, "bounce names no destination the copy was forwarded to: not correlated");
            r.matches.push(None);
            continue;
        };
        if !health.is_empty() {
            r.health_updates += health.len();
            if let Err(e) = table.record_health(alias, &health) {
                tracing::warn!(alias = %alias, error = %e, "cannot record destination health");
            }
        }
        r.matches.push(Some(Match {
            queue_id: rec.queue_id,
            how,
        }));
    }
    Ok(Some(r))
}

/// The health a matched bounce reports, for destinations the copy really went to
/// (`dests`). A standard report must name at least one of them (Final-Recipient, or
/// Original-Recipient) — None otherwise; only its failed or delayed ones count. A
/// non-standard bounce names no recipient we can trust: the copy's destinations
/// are blamed.
fn health_of(dests: &[String], parsed: Option<&dsn::ParsedDsn>) -> Option<Vec<DestHealth>> {
    let now = crate::time::unix_now();
    let Some(p) = parsed else {
        return Some(
            dests
                .iter()
                .map(|d| DestHealth {
                    dest: d.clone(),
                    status: "5.0.0".into(),
                    diagnostic: "non-standard bounce".into(),
                    at: now,
                    count: 1,
                })
                .collect(),
        );
    };
    let ours = |addr: &str| dests.iter().find(|d| d.eq_ignore_ascii_case(addr.trim()));
    let mut named = false;
    let mut out: Vec<DestHealth> = Vec::new();
    for r in &p.recipients {
        let Some(dest) =
            ours(&r.final_recipient).or_else(|| r.original_recipient.as_deref().and_then(ours))
        else {
            continue;
        };
        named = true;
        let failing =
            r.action.eq_ignore_ascii_case("failed") || r.action.eq_ignore_ascii_case("delayed");
        if failing && !out.iter().any(|h| &h.dest == dest) {
            out.push(DestHealth {
                dest: dest.clone(),
                status: r.status.chars().take(32).collect(),
                diagnostic: r
                    .diagnostic
                    .clone()
                    .unwrap_or_else(|| describe(&r.status).into()),
                at: now,
                count: 1,
            });
        }
    }
    named.then_some(out)
}

/// `msg` without `X-Tenso-Bounce` fields: only tenso writes that flag, so one that
/// arrives from outside is forged (e.g. backscatter posing as correlated).
fn strip_flags(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len());
    let mut pos = 0;
    for (start, end, name, _) in fields_raw(header_section(msg)) {
        if name.eq_ignore_ascii_case("x-tenso-bounce") {
            out.extend_from_slice(&msg[pos..start]);
            pos = end;
        }
    }
    out.extend_from_slice(&msg[pos..]);
    out
}

/// The talk's reading of common statuses, for `tenso user show`.
pub fn describe(status: &str) -> &'static str {
    match status {
        "5.1.1" => "user unknown: the forwarding setting itself is wrong",
        "5.1.2" => "destination domain does not exist",
        "5.1.10" => "destination domain accepts no mail (null MX)",
        "5.2.2" | "4.2.2" => "mailbox full",
        "5.2.1" => "mailbox disabled",
        "5.7.1" | "5.7.26" => "rejected by the destination's policy (spam/authentication)",
        s if s.starts_with('4') => "temporary failure",
        _ => "delivery failed",
    }
}
