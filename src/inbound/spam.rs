//! The spam gate at the end of DATA, before the commit: rspamd judges the message
//! ([`crate::policy::spam`]), each recipient's spam policy decides, and the outcome is
//! an SMTP reply (550/451 for the whole message — never a bounce) or per-recipient
//! treatments: forwarded with spam headers, forwarded untouched (`off`), or kept in the
//! alias's pool (quarantine, through `bounce`'s pool, durable before the 250).
//! Also here: aliases in state `discard`, dropped after their 250 at RCPT.
//!
//! rspamd being down never loses mail: `[spam] on_error = "accept"` lets it through
//! unscanned (counted), `"tempfail"` answers 451 so the sender keeps it.

use super::session::{Session, Transaction};
use crate::config::{SpamOnError, SpamPolicy};
use crate::forward::Target;
use crate::policy::spam::{self, Decision, SpamError, Treatment, Verdict};
use crate::smtp::Reply;
use crate::table::AliasState;
use std::collections::HashSet;
use std::sync::atomic::Ordering;

/// What the gate decided for the copies that leave.
#[derive(Default)]
pub(super) struct Gate {
    /// Header fields (CRLF lines) for the copies of aliases whose policy is not `off`.
    pub headers: Vec<u8>,
    /// Subject tag for those copies (spam under policy `tag`).
    pub subject_tag: Option<String>,
    /// Targets (RCPT address, lowercase) whose copy leaves untouched (policy `off`).
    pub plain: HashSet<String>,
    /// For the message's log line: action, score/required, top symbols.
    pub summary: String,
}

impl Gate {
    /// The copy for recipients that are not plain.
    pub fn annotate(&self, msg: Vec<u8>) -> Vec<u8> {
        if self.headers.is_empty() && self.subject_tag.is_none() {
            return msg;
        }
        let msg = match &self.subject_tag {
            Some(tag) => spam::tag_subject(&msg, tag),
            None => msg,
        };
        let mut out = Vec::with_capacity(self.headers.len() + msg.len());
        out.extend_from_slice(&self.headers);
        out.extend_from_slice(&msg);
        out
    }

    /// Does the outgoing recipient made for RCPT address `orig` get the plain copy?
    pub fn is_plain(&self, orig: &str) -> bool {
        !self.plain.is_empty() && self.plain.contains(&orig.to_lowercase())
    }

    /// Do plain and annotated copies both leave (two queue files)?
    pub fn splits(&self) -> bool {
        !self.plain.is_empty() && (!self.headers.is_empty() || self.subject_tag.is_some())
    }
}

/// The spam policy of a target, None when the gate does not judge for it.
fn policy_of(t: &Target, default: SpamPolicy) -> Option<SpamPolicy> {
    match t {
        Target::Alias { found, .. } => Some(found.entry.spam.unwrap_or(default)),
        Target::Postmaster { .. } => Some(default),
        // Submitted mail does not pass the gate (its sender is authenticated).
        Target::Unknown { .. } | Target::Submitted { .. } => None,
    }
}

impl Session {
    /// Aliases in state `discard`: 250 at RCPT, nothing forwarded, nothing bounced.
    pub(super) fn drop_discarded(&self, id: &str, targets: &mut Vec<Target>) {
        targets.retain(|t| match t {
            Target::Alias { found, written } if found.entry.state == AliasState::Discard => {
                self.ctx
                    .counters
                    .spam
                    .alias_discarded
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(queue_id = id, alias = %found.alias, rcpt = %written, "alias in state discard: copy dropped");
                false
            }
            _ => true,
        });
    }

    /// With the gate on, spam headers arriving from outside are removed first, so a
    /// sender cannot pre-mark mail as clean.
    pub(super) fn strip_foreign_spam_headers(&self, body: Vec<u8>) -> Vec<u8> {
        if self.ctx.spam.is_none() {
            return body;
        }
        spam::strip_spam_headers(&body).unwrap_or(body)
    }

    /// Judges `msg` and applies the recipients' policies. Quarantined targets are
    /// pooled (durably) and removed from `targets`. Err is the reply for the whole
    /// message (550 or 451).
    pub(super) async fn spam_gate(
        &mut self,
        id: &str,
        tx: &Transaction,
        targets: &mut Vec<Target>,
        msg: &[u8],
    ) -> Result<Gate, Reply> {
        let default = self.ctx.cfg.spam.default;
        let judged: Vec<(usize, SpamPolicy)> = targets
            .iter()
            .enumerate()
            .filter_map(|(i, t)| policy_of(t, default).map(|p| (i, p)))
            .collect();
        if self.ctx.spam.is_none() || judged.is_empty() {
            return Ok(Gate::default());
        }
        let c = &self.ctx.counters.spam;
        if msg.len() > self.ctx.cfg.spam.max_size {
            c.spam_oversize.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                queue_id = id,
                size = msg.len(),
                max_size = self.ctx.cfg.spam.max_size,
                "spam gate: message over max_size, not scanned"
            );
            return Ok(Gate {
                summary: "not scanned (over max_size)".into(),
                ..Gate::default()
            });
        }
        let rcpts: Vec<String> = judged.iter().map(|(i, _)| targets[*i].written()).collect();
        let verdict = match self.scan(id, tx, &rcpts, msg).await {
            Ok(v) => v,
            Err(e) => return self.scan_failed(id, e),
        };
        let policies: Vec<SpamPolicy> = judged.iter().map(|(_, p)| *p).collect();
        let summary = format!(
            "{} {:.2}/{:.2} {}",
            verdict.action.name(),
            verdict.score,
            verdict.required,
            verdict.top_symbols.join(",")
        );
        tracing::info!(queue_id = id, action = verdict.action.name(), score = verdict.score, required = verdict.required, symbols = %verdict.top_symbols.join(","), "spam verdict");
        match spam::decide(verdict.action, &policies) {
            Decision::Reject => {
                c.spam_rejected.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(queue_id = id, client = %self.peer.ip(), from = %tx.reverse_path, spam = %summary, "message refused as spam");
                Err(Reply::new(550, "5.7.1", "message refused as spam"))
            }
            Decision::Tempfail => {
                c.spam_tempfailed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(queue_id = id, client = %self.peer.ip(), spam = %summary, "message deferred by the spam filter");
                Err(Reply::new(
                    451,
                    "4.7.1",
                    "message deferred by the spam filter, try again later",
                ))
            }
            Decision::Each(treatments) => {
                let treated: Vec<(usize, Treatment)> =
                    judged.iter().map(|(i, _)| *i).zip(treatments).collect();
                self.apply(id, tx, targets, &treated, &verdict, msg, summary)
                    .await
            }
        }
    }

    /// Asks rspamd, with the envelope it expects.
    async fn scan(
        &self,
        id: &str,
        tx: &Transaction,
        rcpts: &[String],
        msg: &[u8],
    ) -> Result<Verdict, SpamError> {
        let rspamd = self.ctx.spam.as_ref().expect("checked by spam_gate");
        let hostname = self.client_name().await;
        let env = spam::Envelope {
            ip: self.peer.ip(),
            helo: self.helo.as_deref().unwrap_or(""),
            hostname: &hostname,
            from: &tx.reverse_path,
            rcpts,
            queue_id: id,
            mta_name: self.ctx.cfg.authserv_id(),
        };
        rspamd.check(&env, bytes::Bytes::copy_from_slice(msg)).await
    }

    fn scan_failed(&self, id: &str, e: SpamError) -> Result<Gate, Reply> {
        let c = &self.ctx.counters.spam;
        c.spam_errors.fetch_add(1, Ordering::Relaxed);
        match self.ctx.cfg.spam.on_error {
            SpamOnError::Accept => {
                c.spam_unscanned.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(queue_id = id, error = %e, "spam gate: rspamd could not judge; accepted unscanned (on_error = accept)");
                Ok(Gate {
                    summary: "unscanned (rspamd error)".into(),
                    ..Gate::default()
                })
            }
            SpamOnError::Tempfail => {
                c.spam_tempfailed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(queue_id = id, error = %e, "spam gate: rspamd could not judge; 451 (on_error = tempfail)");
                Err(Reply::new(
                    451,
                    "4.7.1",
                    "spam filter unavailable, try again later",
                ))
            }
        }
    }

    /// Carries out per-recipient treatments: pools quarantined copies, names the plain
    /// targets, and builds the headers of the other forwarded copies.
    #[allow(clippy::too_many_arguments)]
    async fn apply(
        &mut self,
        id: &str,
        tx: &Transaction,
        targets: &mut Vec<Target>,
        treated: &[(usize, Treatment)],
        verdict: &Verdict,
        msg: &[u8],
        summary: String,
    ) -> Result<Gate, Reply> {
        let spam = verdict.action.is_spam() || verdict.action == spam::Action::Reject;
        let headers = spam_headers(verdict, spam);
        let has = |t: Treatment| treated.iter().any(|(_, x)| *x == t);
        let mut gate = Gate {
            summary,
            ..Gate::default()
        };
        let mut pooled = HashSet::new();
        for (i, t) in treated {
            match t {
                Treatment::Plain => {
                    gate.plain.insert(targets[*i].written().to_lowercase());
                }
                Treatment::Quarantine => {
                    self.quarantine(id, tx, &targets[*i], &headers, msg).await?;
                    pooled.insert(*i);
                }
                Treatment::Forward => {}
            }
        }
        let c = &self.ctx.counters.spam;
        if has(Treatment::Forward) {
            gate.headers = headers;
            if spam {
                c.spam_tagged.fetch_add(1, Ordering::Relaxed);
                gate.subject_tag = self.ctx.cfg.spam.subject_tag.clone();
            }
        }
        if !spam {
            c.spam_clean.fetch_add(1, Ordering::Relaxed);
        } else if has(Treatment::Plain) {
            c.spam_forwarded_off.fetch_add(1, Ordering::Relaxed);
        }
        let mut i = 0;
        targets.retain(|_| {
            i += 1;
            !pooled.contains(&(i - 1))
        });
        Ok(gate)
    }

    /// Keeps the alias's copy in its pool with the reason and the original sender.
    async fn quarantine(
        &self,
        id: &str,
        tx: &Transaction,
        target: &Target,
        headers: &[u8],
        msg: &[u8],
    ) -> Result<(), Reply> {
        let pool = match target {
            Target::Alias { found, .. } => found.alias.clone(),
            _ => crate::forward::POSTMASTER_POOL.to_string(),
        };
        let mut copy = format!(
            "Return-Path: <{}>\r\nX-Tenso-Pool-Reason: spam\r\n",
            tx.reverse_path
        )
        .into_bytes();
        copy.extend_from_slice(headers);
        copy.extend_from_slice(msg);
        match self.ctx.bounce.to_pool(&pool, copy).await {
            Ok(pool_id) => {
                self.ctx
                    .counters
                    .spam
                    .spam_quarantined
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(queue_id = id, alias = %pool, %pool_id, "spam quarantined in the alias's pool");
                Ok(())
            }
            Err(e) => {
                tracing::error!(queue_id = id, alias = %pool, error = %e, "cannot quarantine spam");
                Err(Reply::new(
                    451,
                    "4.3.0",
                    "temporary failure: could not store message",
                ))
            }
        }
    }

    /// The client's forward-confirmed reverse name (what rspamd calls `Hostname`),
    /// or "unknown", bounded by the DNS timeout.
    async fn client_name(&self) -> String {
        let resolver = &self.ctx.auth.authenticator().0;
        let ip = self.peer.ip();
        let lookup = async {
            let ptr = resolver
                .lookup(
                    hickory_resolver::proto::rr::Name::from(ip),
                    hickory_resolver::proto::rr::RecordType::PTR,
                )
                .await
                .ok()?;
            for rec in ptr.answers().iter().take(3) {
                let hickory_resolver::proto::rr::RData::PTR(name) = &rec.data else {
                    continue;
                };
                let name = name.to_ascii();
                if let Ok(addrs) = resolver.lookup_ip(name.as_str()).await
                    && addrs.iter().any(|a| a == ip)
                {
                    return Some(name.trim_end_matches('.').to_string());
                }
            }
            None
        };
        tokio::time::timeout(self.ctx.cfg.dns.timeout, lookup)
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| "unknown".into())
    }
}

/// rspamd's allowed headers, plus `X-Spam-Status` (and `X-Spam: Yes` for spam) when
/// rspamd's milter_headers did not set them.
fn spam_headers(v: &Verdict, spam: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let given = |n: &str| v.add_headers.iter().any(|(h, _)| h.eq_ignore_ascii_case(n));
    if !given("X-Spam-Status") {
        out.extend_from_slice(
            format!(
                "X-Spam-Status: {}, score={:.2} required={:.2} action=\"{}\"\r\n",
                if spam { "Yes" } else { "No" },
                v.score,
                v.required,
                v.action.name()
            )
            .as_bytes(),
        );
    }
    if spam && !given("X-Spam") {
        out.extend_from_slice(b"X-Spam: Yes\r\n");
    }
    for (name, value) in &v.add_headers {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    out
}
