//! DATA: receive the body, check it, prepend the trace header, commit, then 250.

use super::session::{Session, Transaction};
use crate::bounce::incoming::BounceTarget;
use crate::config::Preflight;
use crate::forward;
use crate::policy::content::{self, Body};
use crate::policy::dkim::BodyHashes;
use crate::policy::strip_forged_results;
use crate::smtp::Reply;
use crate::smtp::codec::{DataDecoder, DataError};
use crate::smtp::header::{count_fields, field_values, header_section};
use crate::spool::{Draft, Envelope, MessageKind, Rcpt, RcptState};
use std::sync::Arc;

/// One copy to commit: its start in memory, and the rest on disk when it spilled.
struct Content<'a> {
    head: Vec<u8>,
    tail: Option<&'a mut Draft>,
}
use std::sync::atomic::Ordering;

/// The reply to a message the DATA decoder refused (the same on every port).
pub(super) fn data_error_reply(err: DataError, max_size: usize) -> Reply {
    match err {
        DataError::TooBig => Reply::new(
            552,
            "5.3.4",
            format!("message exceeds fixed maximum size of {max_size} bytes"),
        ),
        DataError::LineTooLong => Reply::new(
            554,
            "5.6.0",
            "message refused: a line is longer than 1000 octets (RFC 5321 4.5.3.1.6)",
        ),
        DataError::BareLf | DataError::BareCr => Reply::new(
            554,
            "5.6.0",
            "message refused: bare CR or LF in data; lines must end with CRLF",
        ),
    }
}

impl Session {
    pub(super) fn handle_data(&mut self) {
        match &self.tx {
            None => self.reply(Reply::new(503, "5.5.1", "need MAIL before DATA")),
            Some(tx) if tx.targets.is_empty() => {
                self.reply(Reply::new(554, "5.5.1", "no valid recipients"))
            }
            Some(_) => {
                self.reply(Reply::new(354, "", "End data with <CR><LF>.<CR><LF>"));
                self.start_data();
            }
        }
    }

    /// The end of DATA, timed up to its reply for `tenso_smtp_accept_seconds` when
    /// that reply is a 250 (the reply is written right after, with the next flush).
    pub(super) async fn end_of_data(&mut self, dec: DataDecoder) {
        let started = std::time::Instant::now();
        self.data_ended = Some(started);
        let before = self.outbuf.len();
        self.end_of_data_reply(dec).await;
        if self
            .outbuf
            .get(before..)
            .is_some_and(|r| r.starts_with(b"250"))
        {
            crate::metrics::metrics()
                .smtp_accept
                .observe(crate::metrics::since(started));
        }
    }

    async fn end_of_data_reply(&mut self, dec: DataDecoder) {
        let mut body = std::mem::take(&mut self.data);
        let spilled = self.finish_spill().await;
        let tx = self
            .tx
            .take()
            .expect("DATA only starts inside a transaction");
        let client = self.peer.ip();
        let (mut draft, header_room) = match self.received(&dec, spilled, &mut body).await {
            Ok(r) => r,
            Err(reply) => return self.reply(reply),
        };
        // RFC 8601 §5: results claiming to be ours can only be forged.
        let body = strip_forged_results(&body, self.ctx.cfg.authserv_id()).unwrap_or(body);
        let mut body = self.strip_foreign_spam_headers(body);
        let helo = self.helo.clone().unwrap_or_default();
        let verdict = match self.checked(&tx, &helo, &body, draft.as_ref()).await {
            Ok(v) => v,
            Err(reply) => return self.reply(reply),
        };
        // Read whole only now, after the DNS checks: room in `whole_message_memory` is
        // held for the rest of this function, not through lookups.
        let doomed = verdict.doomed.is_some();
        let _rooms = match self
            .whole_if_needed(&tx, doomed, &mut body, &mut draft)
            .await
        {
            Ok(room) => (header_room, room),
            Err(reply) => return self.reply(reply),
        };
        let delivered_to = field_values(header_section(&body), "delivered-to");
        let looped = |trace: &str| delivered_to.iter().any(|d| d.eq_ignore_ascii_case(trace));

        let id = self.ctx.spool.new_id();
        // Everything below our Received line; a second copy (spam gate, policy off)
        // gets its own Received with its own queue id.
        let mut rest = Vec::with_capacity(body.len() + 1024);
        rest.extend_from_slice(&verdict.headers);
        for hit in &tx.reputation {
            let reason: String = hit
                .reason
                .chars()
                .filter(|c| !c.is_control())
                .take(200)
                .collect();
            rest.extend_from_slice(
                format!("X-Tenso-Reputation: {}; {reason}\r\n", hit.zone).as_bytes(),
            );
        }
        rest.extend_from_slice(&body);
        drop(body);
        // Our trace fields for a copy with queue id `id`. RFC 7208 §9.1: Received-SPF
        // goes above the Received field of this hop.
        let trace = |s: &Self, id: &str| {
            let mut head = Vec::with_capacity(1024);
            if let Some(r) = &tx.spf.received_spf {
                head.extend_from_slice(r.as_bytes());
            }
            s.write_received(&mut head, id, &helo, &tx.targets, tx.smtputf8);
            head
        };
        let mut msg = trace(self, &id);
        msg.extend_from_slice(&rest);

        let mut targets = tx.targets.clone();
        self.drop_discarded(&id, &mut targets);
        let gate = match self.spam_gate(&id, &tx, &mut targets, &msg).await {
            Ok(g) => g,
            Err(reply) => return self.reply(reply),
        };
        let plain_rest = gate.splits().then_some(rest);
        let mut msg = gate.annotate(msg);
        if let Some(signer) = &self.ctx.signer {
            msg = signer.sign_prepend(msg);
        }
        let unknown = self.unknown_recipients(&id, &tx, &mut targets);

        // Bounces coming home to an alias (proposal 2) go through its bounce policy.
        if tx.reverse_path.is_empty()
            && let Err(reply) = self.bounces_home(&id, &mut targets, &msg, &looped).await
        {
            return self.reply(reply);
        }

        if let Some(reason) = &verdict.doomed
            && let Err(e) = self.preflight(&id, reason, &mut targets, &msg).await
        {
            tracing::error!(queue_id = %id, client = %client, error = %e, "cannot pool message");
            let reply = self
                .ctx
                .storage_failure(self.ctx.short_of_space(msg.len() as u64));
            return self.reply(reply);
        }

        let mut rcpts = match self
            .recipients_of(&id, &targets, &tx.reverse_path, &looped)
            .await
        {
            Ok(r) => r,
            Err(reply) => return self.reply(reply),
        };
        // Proposal 1b: the unknown recipients travel in the message's own envelope,
        // failed and not yet reported, so the DSN to the sender is made by the queue
        // from the committed message — never before it (a 451 retry would send one
        // more DSN each time), and never lost to a crash after the commit.
        let n_unknown = unknown.len();
        rcpts.extend(unknown);
        self.ctx.counters.accepted.fetch_add(1, Ordering::Relaxed);
        self.messages += 1;
        if rcpts.is_empty() {
            // Everything was pooled, bounced or discarded above, durably.
            tracing::info!(queue_id = %id, client = %client, from = %tx.reverse_path, auth = %verdict.summary, spam = %gate.summary, "accepted; nothing to forward");
            return self.reply(Reply::new(250, "2.0.0", format!("Ok ({id})")));
        }
        // Aliases with spam policy `off` get the untouched copy, in a queue file of
        // its own, committed first: the 250 below covers both.
        let (plain, rcpts): (Vec<_>, Vec<_>) = match &plain_rest {
            Some(_) => rcpts.into_iter().partition(|r| gate.is_plain(&r.orig)),
            None => (Vec::new(), rcpts),
        };
        let notes = [verdict.summary.as_str(), gate.summary.as_str()];
        if let (Some(rest), false) = (plain_rest, plain.is_empty()) {
            let id2 = self.ctx.spool.new_id();
            let mut copy = trace(self, &id2);
            copy.extend_from_slice(&rest);
            if let Some(signer) = &self.ctx.signer {
                copy = signer.sign_prepend(copy);
            }
            let copy = Content {
                head: copy,
                tail: None,
            };
            if let Err(reply) = self.commit_copy(&tx, &id2, &helo, plain, copy, notes).await {
                return self.reply(reply);
            }
        }
        let msg = Content {
            head: msg,
            tail: draft.as_mut(),
        };
        if !rcpts.is_empty()
            && let Err(reply) = self.commit_copy(&tx, &id, &helo, rcpts, msg, notes).await
        {
            return self.reply(reply);
        }
        if n_unknown > 0 {
            self.ctx
                .counters
                .unknown_bounced
                .fetch_add(n_unknown as u64, Ordering::Relaxed);
            tracing::info!(queue_id = %id, to = %tx.reverse_path, unknown = n_unknown, "unknown recipients: DSN to the sender is due");
        }
        self.reply(Reply::new(250, "2.0.0", format!("Ok: queued as {id}")));
    }

    /// What arrived, before any check: the decoder's verdict, the draft holding the
    /// rest of a spilled message, and the hop count. A header section longer than what
    /// stayed in memory is read back whole first (every field must be examined: hops,
    /// forged results, what DKIM signs), with its room in `whole_message_memory`.
    async fn received(
        &mut self,
        dec: &DataDecoder,
        spilled: Result<Option<Draft>, Reply>,
        body: &mut Vec<u8>,
    ) -> Result<(Option<Draft>, super::spill::WholeRoom), Reply> {
        let (mut draft, mut room) = (None, None);
        if dec.error.is_none() {
            draft = spilled?;
            if draft.is_some() && !super::spill::header_complete(body) {
                room = self.read_back(body, Ok(draft.take())).await?;
            }
        }
        self.refuse_unchecked(dec, body)?;
        Ok((draft, room))
    }

    /// SPF (found at MAIL), DKIM, ARC and DMARC within their deadline; a spilled body
    /// is hashed from its draft. Err: the DMARC refusal (`dmarc_reject`).
    async fn checked(
        &self,
        tx: &Transaction,
        helo: &str,
        body: &[u8],
        draft: Option<&Draft>,
    ) -> Result<crate::policy::MessageVerdict, Reply> {
        let client = self.peer.ip();
        let checked = match self.spilled_body_hashes(body, draft).await? {
            Some(hashes) => Body::Hashed(body, hashes),
            None => Body::Whole(body),
        };
        let mut verdict = self
            .ctx
            .auth
            .check_end_of_data(client, helo, &tx.reverse_path, &tx.spf, checked)
            .await;
        if let Some(reply) = verdict.reject.take() {
            self.ctx
                .counters
                .refused_data
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(client = %client, from = %tx.reverse_path, auth = %verdict.summary, reply = %reply, "message refused by DMARC policy");
            return Err(reply);
        }
        Ok(verdict)
    }

    /// Refusals that need no lookup: the decoder's verdict and the hop count.
    fn refuse_unchecked(&self, dec: &DataDecoder, body: &[u8]) -> Result<(), Reply> {
        let client = self.peer.ip();
        let counters = &self.ctx.counters;
        if let Some(err) = dec.error {
            counters.refused_data.fetch_add(1, Ordering::Relaxed);
            if matches!(err, DataError::TooBig) {
                counters.too_big.fetch_add(1, Ordering::Relaxed);
            }
            let reply = data_error_reply(err, self.ctx.cfg.smtp.max_message_size);
            tracing::warn!(client = %client, size = dec.size, reply = %reply, "message refused");
            return Err(reply);
        }
        let hops = count_fields(header_section(body), "received");
        if hops > self.ctx.cfg.delivery.max_hops {
            counters.refused_data.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(client = %client, hops, "message refused: too many hops");
            return Err(Reply::new(
                554,
                "5.4.6",
                format!("too many hops ({hops} Received headers): mail loop?"),
            ));
        }
        Ok(())
    }

    /// A bounce (`MAIL FROM:<>`) to aliases: each alias's bounce policy takes it
    /// (pooled or forwarded, durably) and those aliases leave `targets`.
    async fn bounces_home(
        &mut self,
        id: &str,
        targets: &mut Vec<forward::Target>,
        msg: &[u8],
        looped: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<(), Reply> {
        let client = self.peer.ip();
        let bounce_targets: Vec<BounceTarget> = targets
            .iter()
            .filter_map(|t| match t {
                forward::Target::Alias { found, .. } => Some(BounceTarget {
                    alias: found.alias.clone(),
                    policy: found.entry.bounce,
                    looped: looped(&t.trace_id()),
                }),
                _ => None,
            })
            .collect();
        if bounce_targets.is_empty() {
            return Ok(());
        }
        match self.ctx.bounce.incoming(&bounce_targets, msg).await {
            Ok(None) => Ok(()),
            Ok(Some(handled)) => {
                tracing::info!(
                    queue_id = %id,
                    client = %client,
                    pooled = handled.pooled,
                    forwarded = handled.queued.len(),
                    dropped = handled.dropped,
                    correlated = handled.correlated,
                    "bounce received for alias"
                );
                for (e, b) in handled.queued {
                    self.ctx.queue.enqueue(e, Some(b));
                }
                targets.retain(|t| !matches!(t, forward::Target::Alias { .. }));
                Ok(())
            }
            Err(e) => {
                tracing::error!(queue_id = %id, client = %client, error = %e, "cannot store bounce");
                let full = self.ctx.short_of_space(msg.len() as u64);
                Err(self.ctx.storage_failure(full))
            }
        }
    }

    /// The envelope recipients of the copy: every target expanded, and a destination
    /// whose alias trace the message already carries failed as a loop.
    async fn recipients_of(
        &self,
        id: &str,
        targets: &[forward::Target],
        reverse_path: &str,
        looped: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<Vec<Rcpt>, Reply> {
        let mut rcpts = Vec::new();
        for expanded in self.expand_targets(targets, reverse_path).await {
            let mut r = expanded.map_err(|e| {
                tracing::error!(queue_id = %id, error = %e, "table lookup failed");
                Reply::new(451, "4.3.0", "temporary failure, try again later")
            })?;
            // tenso's own trace for this alias: the message has been here before, so
            // forwarding it again would loop.
            for x in r.iter_mut() {
                if x.state == RcptState::Pending && looped(&x.trace_id()) {
                    forward::fail(x, "5.4.6", "mail forwarding loop for this alias");
                }
            }
            rcpts.extend(r);
        }
        Ok(rcpts)
    }

    /// A spilled message stays on disk unless a step needs it whole in memory: the
    /// spam gate, signing, a bounce coming home to an alias (parsed as a DSN), or the
    /// DMARC pre-flight (`doomed`: a copy may go to a pool). DKIM, ARC and DMARC do
    /// not: they read a spilled body in pieces.
    async fn whole_if_needed(
        &self,
        tx: &Transaction,
        doomed: bool,
        body: &mut Vec<u8>,
        draft: &mut Option<Draft>,
    ) -> Result<super::spill::WholeRoom, Reply> {
        let bounce_home = tx.reverse_path.is_empty()
            && tx
                .targets
                .iter()
                .any(|t| matches!(t, forward::Target::Alias { .. }));
        let needs = self.ctx.spam.is_some() || self.ctx.signer.is_some() || bounce_home || doomed;
        if needs {
            return self.read_back(body, Ok(draft.take())).await;
        }
        Ok(None)
    }

    /// The body hashes DKIM and ARC need, for a message whose body is on disk: the
    /// body part of `head`, then the draft, read in pieces. None when the message is
    /// whole in memory or DKIM is off.
    async fn spilled_body_hashes(
        &self,
        head: &[u8],
        draft: Option<&Draft>,
    ) -> Result<Option<BodyHashes>, Reply> {
        let Some(draft) = draft.filter(|_| self.ctx.cfg.auth.dkim) else {
            return Ok(None);
        };
        let hasher = content::body_hasher(head, self.ctx.auth.seals());
        if !hasher.is_needed() {
            return Ok(Some(hasher.finish()));
        }
        match draft.scan(hasher, |h, piece| h.write(piece)).await {
            Ok(h) => Ok(Some(h.finish())),
            Err(e) => {
                tracing::error!(client = %self.peer.ip(), error = %e, "cannot read back the message being received");
                Err(self.ctx.storage_failure(e.is_no_space()))
            }
        }
    }

    /// Commits one copy for `rcpts` and hands it to the queue. `notes` are the auth
    /// and spam summaries for the log line.
    async fn commit_copy(
        &mut self,
        tx: &Transaction,
        id: &str,
        helo: &str,
        rcpts: Vec<Rcpt>,
        msg: Content<'_>,
        [auth, spam]: [&str; 2],
    ) -> Result<(), Reply> {
        let Content { head: msg, tail } = msg;
        let tail_len = tail.as_ref().map_or(0, |d| d.len());
        let client = self.peer.ip();
        let env = Envelope {
            id: id.to_string(),
            kind: MessageKind::Relay,
            arrival: crate::time::unix_now(),
            client_ip: Some(client),
            helo: helo.to_string(),
            reverse_path: tx.reverse_path.clone(),
            env_id: None,
            smtputf8: tx.smtputf8,
            // What the content is, not what MAIL's BODY= said: delivery decides from
            // the bytes whether a next hop without 8BITMIME can take it.
            eight_bit: !msg.is_ascii() || tail.as_ref().is_some_and(|d| d.eight_bit()),
            size: msg.len() as u64 + tail_len,
            held: false,
            rcpts,
            notes: Vec::new(),
        };
        let msg = Arc::new(msg);
        let spilled = tail.is_some();
        let res = match tail {
            Some(d) => self.ctx.spool.commit_with_draft(&env, msg.clone(), d).await,
            None => self.ctx.spool.commit(&env, msg.clone()).await,
        };
        if let Err(e) = res {
            tracing::error!(queue_id = %id, client = %client, error = %e, "cannot commit message");
            return Err(self.ctx.storage_failure(e.is_no_space()));
        }
        tracing::info!(
            queue_id = %id,
            client = %client,
            from = %env.reverse_path,
            nrcpt = tx.targets.len(),
            size = env.size,
            auth = %auth,
            spam = %spam,
            // End of DATA to durable: the acceptance latency `benches/steady.sh` reads.
            commit_ms = self.data_ended.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1000.0),
            "accepted"
        );
        // A spilled message is read from the spool at delivery, like a backlog.
        self.ctx.queue.enqueue(env, (!spilled).then_some(msg));
        Ok(())
    }

    /// Unknown recipients accepted under `unknown_recipient = "accept"`: taken out of
    /// `targets` and returned as failed recipients whose DSN goes to the sender —
    /// except when SPF says fail or softfail, or the sender is null (proposal 1b):
    /// then the copy is discarded, logged and counted.
    /// Each target's outgoing recipients. A shared (postgres) table may have to ask
    /// its database: then on the blocking pool, never on an async worker.
    async fn expand_targets(
        &self,
        targets: &[forward::Target],
        reverse_path: &str,
    ) -> Vec<Result<Vec<Rcpt>, crate::table::TableError>> {
        let (table, cfg) = (self.ctx.table.clone(), self.ctx.cfg.clone());
        let (targets, rp) = (targets.to_vec(), reverse_path.to_string());
        let run = move || {
            targets
                .iter()
                .map(|t| forward::expand(&table, &cfg, t, &rp))
                .collect::<Vec<_>>()
        };
        if self.ctx.table.postgres().is_none() {
            return run();
        }
        tokio::task::spawn_blocking(run).await.unwrap_or_else(|e| {
            vec![Err(crate::table::TableError::Unavailable(format!(
                "expansion task: {e}"
            )))]
        })
    }

    fn unknown_recipients(
        &mut self,
        id: &str,
        tx: &Transaction,
        targets: &mut Vec<forward::Target>,
    ) -> Vec<Rcpt> {
        let unknown: Vec<String> = targets
            .iter()
            .filter_map(|t| match t {
                forward::Target::Unknown { written } => Some(written.clone()),
                _ => None,
            })
            .collect();
        if unknown.is_empty() {
            return Vec::new();
        }
        targets.retain(|t| !matches!(t, forward::Target::Unknown { .. }));
        let spf = tx
            .spf
            .result()
            .map(crate::policy::spf_name)
            .unwrap_or("not checked");
        if tx.reverse_path.is_empty() || tx.spf.forbids_bounce() {
            let why = if tx.reverse_path.is_empty() {
                "null sender"
            } else {
                "SPF fail/softfail (proposal 1b)"
            };
            self.ctx
                .counters
                .bounce_suppressed_1b
                .fetch_add(unknown.len() as u64, Ordering::Relaxed);
            tracing::info!(queue_id = id, client = %self.peer.ip(), from = %tx.reverse_path, %spf, unknown = ?unknown, why, "unknown recipients discarded without bounce");
            return Vec::new();
        }
        tracing::debug!(queue_id = id, from = %tx.reverse_path, %spf, unknown = ?unknown, "unknown recipients: the sender gets a DSN");
        unknown.iter().map(|u| forward::unknown(u)).collect()
    }

    /// The DMARC pre-flight: aliases whose policy (or the default) is `pool` keep a
    /// doomed message in their pool with the reason, instead of sending it to fail.
    async fn preflight(
        &mut self,
        id: &str,
        reason: &str,
        targets: &mut Vec<forward::Target>,
        msg: &[u8],
    ) -> Result<(), String> {
        let default = self.ctx.cfg.auth.dmarc_preflight;
        let mut keep = Vec::new();
        for t in targets.drain(..) {
            let action = match &t {
                forward::Target::Alias { found, .. } => found
                    .entry
                    .dmarc_preflight
                    .as_deref()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(default),
                _ => Preflight::Off,
            };
            let forward::Target::Alias { found, .. } = &t else {
                keep.push(t);
                continue;
            };
            if action != Preflight::Pool {
                if action == Preflight::Forward {
                    tracing::info!(queue_id = id, alias = %found.alias, reason, "DMARC pre-flight: forwarding anyway");
                }
                keep.push(t);
                continue;
            }
            let mut copy = format!("X-Tenso-Pool-Reason: {reason}\r\n").into_bytes();
            copy.extend_from_slice(msg);
            let pool_id = self
                .ctx
                .bounce
                .to_pool(&found.alias, copy)
                .await
                .map_err(|e| e.to_string())?;
            self.ctx
                .counters
                .dmarc_preflight_pooled
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(queue_id = id, alias = %found.alias, %pool_id, reason, "DMARC pre-flight: pooled instead of forwarded");
        }
        *targets = keep;
        Ok(())
    }

    /// RFC 5321 §4.4 trace header; names the recipient only when there is one.
    fn write_received(
        &self,
        out: &mut Vec<u8>,
        id: &str,
        helo: &str,
        targets: &[forward::Target],
        smtputf8: bool,
    ) {
        let proto = match (smtputf8, self.esmtp, self.stream.is_tls()) {
            (true, _, false) => "UTF8SMTP",
            (true, _, true) => "UTF8SMTPS",
            (false, true, false) => "ESMTP",
            (false, true, true) => "ESMTPS",
            (false, false, _) => "SMTP",
        };
        let ip = self.peer.ip();
        let ip_lit = match ip {
            std::net::IpAddr::V4(v4) => format!("[{v4}]"),
            std::net::IpAddr::V6(v6) => format!("[IPv6:{v6}]"),
        };
        let host = &self.ctx.cfg.hostname;
        let mut h =
            format!("Received: from {helo} ({ip_lit})\r\n\tby {host} (tenso) with {proto} id {id}");
        if let [t] = targets {
            h.push_str(&format!("\r\n\tfor <{}>", t.written()));
        }
        h.push_str(&format!(
            "; {}\r\n",
            crate::time::rfc5322_date(crate::time::unix_now())
        ));
        out.extend_from_slice(h.as_bytes());
    }
}
