//! MAIL and RCPT: the envelope, and the relay decision for each forward-path.
//!
//! A forward-path is accepted only for a local domain: an alias, a catch-all, or
//! postmaster (always, RFC 5321 §4.5.1). Every form that made open relays of old MTAs
//! — `%` hack, bang paths, quoted local parts holding `@`, address literals — is
//! refused here, whatever the table holds.

use super::session::{Session, Transaction};
use crate::config::{ListAction, UnknownRecipient};
use crate::forward::Target;
use crate::smtp::Reply;
use crate::smtp::address::{AddressError, Path, check_alias, extract_path, parse_path, split_path};
use crate::table::{AliasState, RcptLookup};
use smtp_proto::{MAIL_SMTPUTF8, MailFrom, RcptTo};
use std::sync::atomic::Ordering;

/// The MAIL parameters tenso offers in EHLO: SIZE, BODY (7BIT or 8BITMIME only) and
/// SMTPUTF8. RCPT has none.
///
/// DSN (RFC 3461) is not offered, so RET, ENVID, NOTIFY and ORCPT are refused, like
/// BODY=BINARYMIME and everything else not offered. Under proposal 2 tenso rewrites
/// MAIL FROM to the alias: every later report about a forwarded copy goes to the alias
/// (its pool or its owner), never to the original sender, so the sender's NOTIFY and
/// RET could not be honoured — accepting them would promise what cannot be kept (a
/// NOTIFY=NEVER silently ignored). Clients only send them after seeing DSN in EHLO
/// (RFC 3461 §4), so refusing costs nothing to a correct one.
const MAIL_PARAMS: &[&str] = &["SIZE", "BODY", "SMTPUTF8"];
/// On a submission port MAIL also takes RFC 4954's AUTH= (and ignores it: the
/// sender is the login).
const SUBMISSION_MAIL_PARAMS: &[&str] = &["SIZE", "BODY", "SMTPUTF8", "AUTH"];
const RCPT_PARAMS: &[&str] = &[];

/// The first parameter in a MAIL/RCPT line that tenso did not offer (`NOTIFY`,
/// `BODY=BINARYMIME`), uppercased and cut to printable ASCII for the reply.
fn unoffered_param(params: &str, offered: &[&str]) -> Option<String> {
    for p in params.split_ascii_whitespace() {
        let (keyword, value) = p.split_once('=').unwrap_or((p, ""));
        let keyword = keyword.to_ascii_uppercase();
        let body_ok = ["7BIT", "8BITMIME"]
            .iter()
            .any(|v| value.eq_ignore_ascii_case(v));
        let bad = if !offered.contains(&keyword.as_str()) {
            keyword
        } else if keyword == "BODY" && !body_ok {
            format!("BODY={}", value.to_ascii_uppercase())
        } else {
            continue;
        };
        return Some(
            bad.chars()
                .filter(char::is_ascii_graphic)
                .take(40)
                .collect(),
        );
    }
    None
}

impl Session {
    /// 555 5.5.4 for a parameter tenso did not offer (RFC 5321 §4.1.1.11), and for
    /// any parameter after HELO (nothing is offered without EHLO).
    pub(super) fn check_params(&mut self, line: &str, offered: &[&str]) -> Option<Reply> {
        let params = split_path(line).map_or("", |(_, p)| p);
        if params.trim().is_empty() {
            return None;
        }
        if !self.esmtp {
            return Some(Reply::new(555, "5.5.4", "parameters need EHLO"));
        }
        let bad = unoffered_param(params, offered)?;
        tracing::info!(client = %self.peer.ip(), param = %bad, "parameter not offered, refused");
        Some(Reply::new(
            555,
            "5.5.4",
            format!("{bad} parameter not supported"),
        ))
    }

    pub(super) async fn handle_mail(&mut self, line: &str, from: MailFrom<String>) {
        if self.helo.is_none() {
            return self.reply(Reply::new(503, "5.5.1", "send EHLO or HELO first"));
        }
        if self.tx.is_some() {
            return self.reply(Reply::new(503, "5.5.1", "nested MAIL command"));
        }
        if let Some(reply) = self.submission_gate() {
            return self.reply(reply);
        }
        let max_msgs = self.ctx.cfg.limits.max_messages_per_connection;
        if self.messages >= max_msgs {
            self.ctx
                .counters
                .too_many_messages
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(client = %self.peer.ip(), messages = self.messages, "too many messages in one session, closing");
            return self.close_with(Reply::new(
                421,
                "4.7.0",
                format!("too many messages in one session (at most {max_msgs}), reconnect"),
            ));
        }
        let offered = match self.sub {
            Some(_) => SUBMISSION_MAIL_PARAMS,
            None => MAIL_PARAMS,
        };
        if let Some(reply) = self.check_params(line, offered) {
            return self.reply(reply);
        }
        let smtputf8 = from.flags & MAIL_SMTPUTF8 != 0;
        let max = self.ctx.cfg.smtp.max_message_size;
        if from.size > max {
            self.ctx.counters.too_big.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(client = %self.peer.ip(), size = from.size, max, "message refused: declared SIZE over the limit");
            return self.reply(Reply::new(
                552,
                "5.3.4",
                format!("message size exceeds fixed limit of {max} bytes"),
            ));
        }
        // Like Postfix's queue_minfree: refuse before reading a byte of DATA when the
        // spool could not keep its reserve with this message in it.
        if !self.ctx.has_room_for(from.size as u64) {
            tracing::warn!(client = %self.peer.ip(), size = from.size, min_free_space = self.ctx.cfg.smtp.min_free_space(), "MAIL refused: spool disk short of free space");
            let reply = self.ctx.storage_failure(true);
            return self.reply(reply);
        }
        if self.sub.is_some() {
            return self.submission_mail(line, smtputf8);
        }
        let raw = extract_path(line).unwrap_or("");
        let reverse_path = match parse_path(raw, smtputf8) {
            Ok(Path::Null) => String::new(),
            Ok(Path::Mailbox(m)) => m.to_string(),
            Ok(Path::Postmaster) => {
                return self.reply(Reply::new(501, "5.1.7", "reverse-path needs a domain"));
            }
            Err(AddressError::NeedsUtf8) => {
                return self.reply(Reply::new(553, "5.6.7", "non-ASCII address needs SMTPUTF8"));
            }
            Err(e) => return self.reply(Reply::new(501, "5.1.7", format!("bad sender: {e}"))),
        };
        let helo = self.helo.clone().unwrap_or_default();
        // SPF of both identities and every reputation zone at once, all bounded by one
        // deadline: a silent resolver costs `mail_deadline`, not a wait per lookup.
        let deadline = tokio::time::Instant::now() + self.ctx.cfg.auth.mail_deadline;
        let ip = self.peer.ip();
        let (spf, mut reputation) = tokio::join!(
            self.ctx.auth.check_spf(ip, &helo, &reverse_path, deadline),
            self.ctx.auth.reputation(ip, &reverse_path, deadline)
        );
        if let Some(reply) = self.ctx.auth.spf_reply(&spf) {
            tracing::info!(client = %self.peer.ip(), from = %reverse_path, reply = %reply, "sender refused by SPF policy");
            return self.reply(reply);
        }
        if let Some(hit) = reputation.iter().find(|h| h.action == ListAction::Reject) {
            self.ctx
                .counters
                .reputation_rejected
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(client = %self.peer.ip(), from = %reverse_path, zone = %hit.zone, reason = %hit.reason, "rejected by reputation list");
            return self.reply(Reply::new(
                554,
                "5.7.1",
                format!("rejected: listed in {} ({})", hit.zone, hit.reason),
            ));
        }
        if !reputation.is_empty() {
            self.ctx
                .counters
                .reputation_recorded
                .fetch_add(1, Ordering::Relaxed);
        }
        reputation.retain(|h| h.action == ListAction::Record);
        tracing::debug!(client = %self.peer.ip(), from = %reverse_path, spf = ?spf.result(), "mail");
        self.tx = Some(Transaction {
            spf,
            reputation,
            reverse_path,
            smtputf8,
            targets: Vec::new(),
        });
        self.reply(Reply::new(250, "2.1.0", "Ok"));
    }

    pub(super) fn handle_rcpt(&mut self, line: &str, _to: RcptTo<String>) {
        if self.sub.is_some() {
            return self.submission_rcpt(line);
        }
        if self.tx.is_none() {
            return self.reply(Reply::new(503, "5.5.1", "need MAIL before RCPT"));
        }
        if let Some(reply) = self.check_params(line, RCPT_PARAMS) {
            return self.reply(reply);
        }
        let Some(tx) = &self.tx else { return };
        let max = self.ctx.cfg.smtp.max_recipients;
        if tx.targets.len() >= max {
            self.ctx
                .counters
                .too_many_recipients
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(client = %self.peer.ip(), max, "too many recipients, refusing this one");
            return self.reply(Reply::new(
                452,
                "4.5.3",
                format!("too many recipients (at most {max} per message)"),
            ));
        }
        let raw = extract_path(line).unwrap_or("");
        let reply = self.check_rcpt(raw);
        if reply.code == 250 {
            tracing::debug!(client = %self.peer.ip(), rcpt = raw, "rcpt accepted");
        } else {
            tracing::info!(client = %self.peer.ip(), rcpt = raw, reply = %reply, "rcpt refused");
        }
        self.reply(reply);
    }

    pub(super) fn check_rcpt(&mut self, raw: &str) -> Reply {
        let smtputf8 = self.tx.as_ref().is_some_and(|t| t.smtputf8);
        let counters = &self.ctx.counters;
        let relay_denied = |why: &'static str| {
            counters.relay_denied.fetch_add(1, Ordering::Relaxed);
            Reply::new(554, "5.7.1", format!("relay access denied: {why}"))
        };
        let m = match parse_path(raw, smtputf8) {
            Ok(Path::Mailbox(m)) => m,
            Ok(Path::Postmaster) => {
                return self.accept(Target::Postmaster {
                    written: "postmaster".into(),
                });
            }
            Ok(Path::Null) => return Reply::new(501, "5.1.3", "null forward-path"),
            Err(AddressError::NeedsUtf8) => {
                return Reply::new(553, "5.6.7", "non-ASCII address needs SMTPUTF8");
            }
            Err(e) => return Reply::new(501, "5.1.3", format!("bad recipient: {e}")),
        };
        // The same rule as for the table's aliases: what could never be an alias is
        // a routing trick here.
        if let Err(e) = check_alias(&m) {
            let why = match e {
                AddressError::NotAlias(why) => why,
                _ => "not a forwardable address",
            };
            return relay_denied(why);
        }
        let found = match self.ctx.table.lookup_rcpt(&m) {
            Ok(RcptLookup::Found(f)) => Some(f),
            Ok(RcptLookup::UnknownLocal) => None,
            Ok(RcptLookup::NotLocal) => return relay_denied("not a local domain"),
            Err(e) => {
                tracing::error!(error = %e, "table lookup failed");
                return Reply::new(451, "4.3.0", "temporary lookup failure, try again later");
            }
        };
        // An explicit alias for postmaster wins; otherwise postmaster of every local
        // domain goes where the config says, never to a catch-all.
        let is_postmaster = m.local.eq_ignore_ascii_case("postmaster");
        match found {
            Some(f) if !is_postmaster || f.kind == crate::table::MatchKind::Exact => {
                match self.alias_state_reply(&f) {
                    Some(refusal) => refusal,
                    None => self.accept(Target::Alias {
                        written: m,
                        found: f,
                    }),
                }
            }
            _ if is_postmaster => self.accept(Target::Postmaster {
                written: m.to_string(),
            }),
            _ if self.ctx.cfg.smtp.unknown_recipient == UnknownRecipient::Accept => {
                // Only the next connection waits: slowing this session would tell a
                // harvester which address does not exist, defeating `accept`.
                self.ctx.limiter.unknown_user(self.peer.ip());
                // Harvest resistance: the reply does not tell who exists.
                self.ctx
                    .counters
                    .unknown_accepted
                    .fetch_add(1, Ordering::Relaxed);
                self.accept(Target::Unknown {
                    written: m.to_string(),
                })
            }
            _ => {
                self.ctx
                    .counters
                    .rejected_rcpt
                    .fetch_add(1, Ordering::Relaxed);
                self.unknown_user();
                Reply::new(550, "5.1.1", "user unknown")
            }
        }
    }

    /// The reply for an alias that is not taking mail (`tenso user set --state`), or
    /// None to accept (`discard` is accepted here and dropped at DATA).
    fn alias_state_reply(&self, f: &crate::table::Found) -> Option<Reply> {
        let c = &self.ctx.counters.spam;
        let reply = match f.entry.state {
            AliasState::Active | AliasState::Discard => return None,
            AliasState::Defer => {
                c.alias_deferred.fetch_add(1, Ordering::Relaxed);
                Reply::new(
                    450,
                    "4.2.1",
                    "mailbox temporarily disabled, try again later",
                )
            }
            AliasState::Reject => {
                c.alias_rejected.fetch_add(1, Ordering::Relaxed);
                Reply::new(550, "5.2.1", "mailbox disabled")
            }
        };
        tracing::info!(client = %self.peer.ip(), alias = %f.alias, state = %f.entry.state, "rcpt refused: alias disabled");
        Some(reply)
    }

    /// The talk's slow-down: a client that names unknown users waits longer for
    /// its next connection, and for every further reply in this session.
    fn unknown_user(&mut self) {
        self.slow = self.ctx.limiter.unknown_user(self.peer.ip());
        tracing::info!(client = %self.peer.ip(), delay_ms = self.slow.as_millis() as u64, "unknown recipient: client slowed down");
    }

    fn accept(&mut self, target: Target) -> Reply {
        let tx = self.tx.as_mut().expect("checked by handle_rcpt");
        let written = target.written();
        if !tx
            .targets
            .iter()
            .any(|t| t.written().eq_ignore_ascii_case(&written))
        {
            tx.targets.push(target);
        }
        Reply::new(250, "2.1.5", "Ok")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_not_offered() {
        let cases: &[(&str, &[&str], Option<&str>)] = &[
            ("", MAIL_PARAMS, None),
            (" SIZE=10 BODY=8BITMIME SMTPUTF8", MAIL_PARAMS, None),
            (" size=10 body=7bit", MAIL_PARAMS, None),
            (" BODY=BINARYMIME", MAIL_PARAMS, Some("BODY=BINARYMIME")),
            (" SIZE=1 RET=HDRS", MAIL_PARAMS, Some("RET")),
            (" envid=x", MAIL_PARAMS, Some("ENVID")),
            (" MT-PRIORITY=0", MAIL_PARAMS, Some("MT-PRIORITY")),
            (" NOTIFY=NEVER", RCPT_PARAMS, Some("NOTIFY")),
            (" ORCPT=rfc822;a@b", RCPT_PARAMS, Some("ORCPT")),
            (" SIZE=1", RCPT_PARAMS, Some("SIZE")),
            (" X\u{7}Y=1", MAIL_PARAMS, Some("XY")),
        ];
        for (params, offered, want) in cases {
            assert_eq!(
                unoffered_param(params, offered).as_deref(),
                *want,
                "{params:?}"
            );
        }
    }
}
