//! Bounces that come back to an alias (after proposal 2 they return to the forwarder,
//! not to the original sender): recognise them, tie them to the forward that caused
//! them, record what they say about the destination, and apply the alias's policy.
//!
//! What counts as a bounce is [`super::dsn::classify_null_sender`]: RFC 3464 reports
//! and recognisable non-standard bounces. Auto-replies, read receipts and other
//! null-sender mail are not bounces: the caller forwards them with `<>` kept.

use super::dsn::{self, NullSenderKind};
use super::{Bounce, Queued};
use crate::config::BouncePolicy;
use crate::smtp::header::{fields_raw, header_section};
use crate::spool::MessageKind;
use crate::table::DestHealth;
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

impl Bounce {
    /// Handles null-sender mail for `targets`. Returns None when the message is not a
    /// bounce (the caller forwards it normally with `<>`). On Ok, everything that was
    /// kept is on stable storage.
    pub async fn incoming(
        &self,
        targets: &[BounceTarget],
        msg: &[u8],
    ) -> Result<Option<Handled>, String> {
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
        let log = self.table.fwdlog().map_err(|e| e.to_string())?;
        let unflagged = strip_flags(msg);
        let mut out = Handled::default();
        for t in targets {
            let by_envid = match &envid {
                Some(id) => log.by_envid(id, &t.alias).map_err(|e| e.to_string())?,
                None => None,
            };
            let record = match (by_envid, &mid) {
                (Some(r), _) => Some((r, "envid")),
                (None, Some(m)) => log
                    .by_message_id(m, &t.alias)
                    .map_err(|e| e.to_string())?
                    .map(|r| (r, "message-id")),
                (None, None) => None,
            };
            let mut copy = Vec::with_capacity(msg.len() + 128);
            match &record {
                Some((rec, how)) => {
                    out.correlated += 1;
                    self.counters.correlated.fetch_add(1, Ordering::Relaxed);
                    self.record_health(&t.alias, &rec.dests, parsed.as_ref());
                    tracing::info!(alias = %t.alias, forwarded_as = %rec.queue_id, matched_by = how, "bounce correlated with a forwarded copy");
                    copy.extend_from_slice(
                        format!(
                            "X-Tenso-Bounce: correlated; forwarded-as={}; by={how}\r\n",
                            rec.queue_id
                        )
                        .as_bytes(),
                    );
                }
                None => {
                    self.counters.uncorrelated.fetch_add(1, Ordering::Relaxed);
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

    /// Stores the statuses a matched bounce reports for the alias's destinations.
    fn record_health(&self, alias: &str, dests: &[String], parsed: Option<&dsn::ParsedDsn>) {
        let now = crate::time::unix_now();
        let mut entries = Vec::new();
        if let Some(p) = parsed {
            for r in &p.recipients {
                if r.action.eq_ignore_ascii_case("failed")
                    || r.action.eq_ignore_ascii_case("delayed")
                {
                    entries.push(DestHealth {
                        dest: r.final_recipient.clone(),
                        status: r.status.clone(),
                        diagnostic: r
                            .diagnostic
                            .clone()
                            .unwrap_or_else(|| describe(&r.status).into()),
                        at: now,
                    });
                }
            }
        }
        if entries.is_empty() {
            // A non-standard bounce names no recipient we can trust: blame the copy.
            for d in dests {
                entries.push(DestHealth {
                    dest: d.clone(),
                    status: "5.0.0".into(),
                    diagnostic: "non-standard bounce".into(),
                    at: now,
                });
            }
        }
        for h in entries {
            if let Err(e) = self.table.record_health(alias, h) {
                tracing::warn!(alias, error = %e, "cannot record destination health");
            }
        }
    }
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
