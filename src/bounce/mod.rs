//! Bounces, both directions: tenso's own DSNs (RFC 3464) and the per-alias bounce
//! policy that decides where a bounce goes — the local pool (2a) or the alias's
//! destinations with `MAIL FROM:<>` (2b).
//!
//! Loop rules enforced here: a message with a null reverse-path never produces a
//! DSN; a bounce forwarded under 2b that fails is dropped ("lost by design", counted);
//! forwarded bounces per alias are rate-limited, the excess is pooled. New messages
//! (DSNs to forward) are committed to the spool here and returned for the queue to
//! schedule; this module never schedules or delivers anything itself.

pub mod dsn;
pub mod incoming;
pub mod pool;

use crate::config::{BouncePolicy, Config};
use crate::smtp::header::header_section;
use crate::spool::{Envelope, MessageKind, Rcpt, RcptState, Spool};
use crate::table::{Table, TableError};
use dsn::{Action, DsnRecipient, DsnReport};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Aliases whose forwarded bounces are counted at once (the current hour's). At the
/// bound, a bounce for an alias not yet counted is pooled instead of forwarded.
const MAX_RATE_ENTRIES: usize = 100_000;

#[derive(Default, Debug)]
pub struct Counters {
    pub dsn_generated: AtomicU64,
    pub pooled: AtomicU64,
    pub forwarded: AtomicU64,
    pub lost_by_design: AtomicU64,
    pub rate_limited: AtomicU64,
    pub no_dsn_null_sender: AtomicU64,
    pub correlated: AtomicU64,
    pub uncorrelated: AtomicU64,
    pub digests: AtomicU64,
    /// Field groups read from incoming reports (each report: at most
    /// `dsn::MAX_DSN_GROUPS`).
    pub dsn_groups_read: AtomicU64,
    /// Incoming reports with more groups than are read.
    pub dsn_truncated: AtomicU64,
    /// Reports tied to a forwarded copy that named none of its destinations.
    pub final_recipient_mismatch: AtomicU64,
    /// Destination health entries written.
    pub health_updates: AtomicU64,
}

impl Counters {
    pub fn snapshot(&self) -> serde_json::Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "dsn_generated": g(&self.dsn_generated),
            "pooled": g(&self.pooled),
            "forwarded": g(&self.forwarded),
            "lost_by_design": g(&self.lost_by_design),
            "rate_limited": g(&self.rate_limited),
            "no_dsn_null_sender": g(&self.no_dsn_null_sender),
            "correlated": g(&self.correlated),
            "uncorrelated": g(&self.uncorrelated),
            "digests": g(&self.digests),
            "dsn_groups_read": g(&self.dsn_groups_read),
            "dsn_truncated": g(&self.dsn_truncated),
            "final_recipient_mismatch": g(&self.final_recipient_mismatch),
            "health_updates": g(&self.health_updates),
        })
    }
}

/// A message the bounce step committed and the queue must schedule.
pub type Queued = (Envelope, Arc<Vec<u8>>);

pub struct Bounce {
    cfg: Arc<Config>,
    table: Table,
    spool: Spool,
    pub pool: Arc<pool::Pool>,
    pub counters: Counters,
    /// Forwarded bounces per alias in the current hour window.
    rate: Mutex<HashMap<String, (i64, u32)>>,
    /// The forwarder's DKIM key: tenso's own reports and forwarded bounces are signed.
    signer: Option<Arc<crate::signing::Signer>>,
}

impl Bounce {
    pub fn new(
        cfg: Arc<Config>,
        table: Table,
        spool: Spool,
        signer: Option<Arc<crate::signing::Signer>>,
    ) -> Bounce {
        let pool = pool::Pool::new(
            cfg.pool_dir(),
            cfg.pool_modes(),
            &cfg.hostname,
            cfg.pool.max_messages,
            cfg.pool.max_bytes,
        );
        // A fleet has one pool, where its table is.
        let pool = Arc::new(match table.postgres() {
            Some(pg) => pool.shared(pg.clone()),
            None => pool,
        });
        Bounce {
            cfg,
            table,
            spool,
            pool,
            counters: Counters::default(),
            rate: Mutex::new(HashMap::new()),
            signer,
        }
    }

    /// Takes one forwarded-bounce slot for `alias`; false when over the hourly limit.
    fn take_forward_slot(&self, alias: &str) -> bool {
        let hour = crate::time::unix_now() / 3600;
        let mut rate = self.rate.lock();
        if rate.len() >= MAX_RATE_ENTRIES && !rate.contains_key(alias) {
            rate.retain(|_, (h, _)| *h == hour);
            if rate.len() >= MAX_RATE_ENTRIES {
                // Pooled, not lost, and no counter of this hour is forgotten.
                return false;
            }
        }
        let e = rate.entry(alias.to_string()).or_insert((hour, 0));
        if e.0 != hour {
            *e = (hour, 0);
        }
        if e.1 >= self.cfg.bounce.forward_rate_per_hour {
            return false;
        }
        e.1 += 1;
        true
    }

    /// Stores a bounce in the alias's pool (blocking I/O on the blocking pool).
    pub async fn to_pool(&self, alias: &str, msg: Vec<u8>) -> std::io::Result<String> {
        let alias = alias.to_string();
        let pool = self.pool.clone();
        let id = tokio::task::spawn_blocking(move || pool.deliver(&alias, &msg))
            .await
            .map_err(std::io::Error::other)??;
        self.counters.pooled.fetch_add(1, Ordering::Relaxed);
        Ok(id)
    }

    /// The alias's destinations, off the async workers: a fleet's table may have to
    /// ask its database (within the query deadline) when the node's view cannot answer.
    async fn destinations_of(&self, alias: &str) -> Result<Vec<String>, TableError> {
        let (table, cfg, alias) = (self.table.clone(), self.cfg.clone(), alias.to_string());
        tokio::task::spawn_blocking(move || crate::forward::destinations(&table, &cfg, &alias))
            .await
            .unwrap_or_else(|e| Err(TableError::Unavailable(e.to_string())))
    }

    /// Applies the alias's bounce policy to a bounce addressed to it: pool it, or
    /// commit a copy for the alias's destinations with `MAIL FROM:<>`. Returns the
    /// message to schedule, if any. Errors mean nothing was stored.
    pub async fn dispatch(
        &self,
        alias: &str,
        policy: BouncePolicy,
        msg: Vec<u8>,
        kind: MessageKind,
    ) -> Result<Option<Queued>, String> {
        let dests = match policy {
            BouncePolicy::Pool => None,
            BouncePolicy::Forward => match self.destinations_of(alias).await {
                Ok(d) if d.is_empty() => None,
                Ok(d) if self.take_forward_slot(alias) => Some(d),
                Ok(_) => {
                    self.counters.rate_limited.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        alias,
                        limit = self.cfg.bounce.forward_rate_per_hour,
                        "bounce forward rate exceeded: pooling instead"
                    );
                    None
                }
                Err(_) => None,
            },
        };
        let Some(dests) = dests else {
            let id = self
                .to_pool(alias, msg)
                .await
                .map_err(|e| format!("pool write failed: {e}"))?;
            tracing::info!(alias, pool_id = %id, "bounce pooled (policy 2a)");
            return Ok(None);
        };
        let q = self
            .queue_to(alias, policy, &dests, msg, kind, Vec::new())
            .await?;
        self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
        tracing::info!(queue_id = %q.0.id, alias, dests = dests.len(), "bounce queued for forwarding with MAIL FROM:<> (policy 2b)");
        Ok(Some(q))
    }

    /// Commits `msg` for `dests` with a null reverse-path and returns it to schedule.
    async fn queue_to(
        &self,
        alias: &str,
        policy: BouncePolicy,
        dests: &[String],
        msg: Vec<u8>,
        kind: MessageKind,
        notes: Vec<String>,
    ) -> Result<Queued, String> {
        self.queue_to_rcpts(
            dests
                .iter()
                .map(|d| (alias.to_string(), d.clone()))
                .collect(),
            policy,
            msg,
            kind,
            notes,
        )
        .await
    }

    /// Commits `msg` with `MAIL FROM:<>` for (alias, destination) pairs.
    async fn queue_to_rcpts(
        &self,
        rcpts: Vec<(String, String)>,
        policy: BouncePolicy,
        msg: Vec<u8>,
        kind: MessageKind,
        notes: Vec<String>,
    ) -> Result<Queued, String> {
        let msg = match &self.signer {
            Some(s) => s.sign_prepend(msg),
            None => msg,
        };
        let id = self.spool.new_id();
        let env = Envelope {
            id: id.clone(),
            kind,
            arrival: crate::time::unix_now(),
            client_ip: None,
            helo: self.cfg.hostname.clone(),
            reverse_path: String::new(),
            env_id: None,
            smtputf8: !header_section(&msg).is_ascii(),
            eight_bit: !msg.is_ascii(),
            size: msg.len() as u64,
            held: false,
            rcpts: rcpts
                .into_iter()
                .map(|(alias, dest)| Rcpt {
                    orig: alias.clone(),
                    alias,
                    mail_from: String::new(),
                    dest,
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
                })
                .collect(),
            notes,
        };
        let body = Arc::new(msg);
        self.spool
            .commit(&env, body.clone())
            .await
            .map_err(|e| format!("spool commit failed: {e}"))?;
        Ok((env, body))
    }

    /// Proposal 1b, the allowed half: a DSN (5.1.1) to the original sender of `env`
    /// for recipients accepted under `unknown_recipient = "accept"` that do not exist.
    /// Inbound recorded them only when SPF and the sender allowed it; the returned
    /// part holds the message's header section only, never its body.
    async fn report_unknown(
        &self,
        env: &Envelope,
        body: &[u8],
        rcpts: &[&Rcpt],
    ) -> Result<Queued, String> {
        let now = crate::time::unix_now();
        let report = DsnReport {
            reporting_mta: &self.cfg.hostname,
            queue_id: &env.id,
            original_envelope_id: env.env_id.as_deref(),
            arrival: env.arrival,
            now,
            to: &env.reverse_path,
            original_sender: &env.reverse_path,
            recipients: rcpts
                .iter()
                .map(|r| DsnRecipient {
                    final_recipient: r.orig.clone(),
                    original_recipient: Some(r.orig.clone()),
                    action: Action::Failed,
                    status: r.status.clone().unwrap_or_else(|| "5.1.1".into()),
                    remote_mta: None,
                    diagnostic: r.last.clone(),
                    last_attempt: env.arrival,
                    will_retry_until: None,
                })
                .collect(),
            original_headers: header_section(body),
            message_id: format!("{}.unknown@{}", env.id, self.cfg.hostname),
        };
        let dsn = dsn::build_dsn(&report);
        self.counters.dsn_generated.fetch_add(1, Ordering::Relaxed);
        let q = self
            .queue_to_rcpts(
                vec![(String::new(), env.reverse_path.clone())],
                BouncePolicy::Pool,
                dsn,
                MessageKind::Dsn,
                vec!["unknown recipient DSN to the original sender".into()],
            )
            .await?;
        tracing::info!(queue_id = %env.id, dsn_id = %q.0.id, to = %env.reverse_path, recipients = rcpts.len(), "unknown recipients: DSN to the sender (proposal 1b)");
        Ok(q)
    }

    /// Records forwarded copies for bounce correlation (ENVID = queue id, Message-ID):
    /// one record per (alias, destination) delivered. sled writes run on the blocking
    /// pool, never on the delivery path's async workers.
    pub async fn record_forwards(
        &self,
        queue_id: &str,
        delivered: Vec<(String, String)>,
        message_id: Option<String>,
    ) {
        if delivered.is_empty() {
            return;
        }
        let table = self.table.clone();
        let id = queue_id.to_string();
        let res = tokio::task::spawn_blocking(move || {
            let log = table.fwdlog()?;
            let at = crate::time::unix_now();
            for (alias, dest) in delivered {
                log.record(&crate::table::fwdlog::FwdRecord {
                    queue_id: id.clone(),
                    alias,
                    dests: vec![dest],
                    message_id: message_id.clone(),
                    at,
                })?;
            }
            Ok::<_, crate::table::TableError>(())
        })
        .await;
        match res {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(queue_id, error = %e, "cannot record forwarded copy"),
            Err(e) => tracing::warn!(queue_id, error = %e, "cannot record forwarded copy"),
        }
    }

    /// Drops correlation records older than `[bounce] log_retention`.
    pub fn expire_log(&self) -> usize {
        let cutoff = crate::time::unix_now() - self.cfg.bounce.log_retention.as_secs() as i64;
        match self.table.fwdlog().and_then(|l| l.expire(cutoff)) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot expire the correlation log");
                0
            }
        }
    }

    /// A fleet's pool is one: only one node sends each round of digests (the one
    /// that claims the round in the database); a single node always does.
    async fn claim_digest(&self) -> bool {
        let (Some(pg), Some(every)) = (self.table.postgres().cloned(), self.cfg.pool.digest) else {
            return true;
        };
        let now = crate::time::unix_now();
        // A little slack, so that the node whose timer fires first takes the round.
        let every = (every.as_secs() as i64 * 9 / 10).max(1);
        tokio::task::spawn_blocking(move || pg.claim_job("pool_digest", now, every))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(false)
    }

    /// Builds one digest per alias with unread pooled bounces and queues it to the
    /// alias's destinations with `MAIL FROM:<>` (so the digest itself cannot loop).
    pub async fn digests(&self) -> Vec<Queued> {
        if !self.claim_digest().await {
            return Vec::new();
        }
        let pool = self.pool.clone();
        let entries = tokio::task::spawn_blocking(move || pool.list(None))
            .await
            .unwrap_or_default();
        let mut by_alias: BTreeMap<String, Vec<pool::Entry>> = BTreeMap::new();
        for e in entries.into_iter().filter(|e| !e.seen) {
            by_alias.entry(e.alias.clone()).or_default().push(e);
        }
        let mut out = Vec::new();
        for (alias, list) in by_alias {
            let Ok(dests) = self.destinations_of(&alias).await else {
                continue;
            };
            // A disabled alias (or one whose destinations all fail) gets no digest.
            if dests.is_empty() {
                continue;
            }
            let now = crate::time::unix_now();
            let mut body = format!(
                "From: Mail Delivery System <MAILER-DAEMON@{host}>\r\nTo: {to}\r\nSubject: {n} bounce(s) waiting in your forwarding pool\r\nDate: {date}\r\nMessage-ID: <digest.{now}.{id}@{host}>\r\nAuto-Submitted: auto-generated\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n",
                host = self.cfg.hostname,
                to = digest_to(&alias),
                n = list.len(),
                date = crate::time::rfc5322_date(now),
                id = self.spool.new_id(),
            );
            body.push_str(&format!(
                "{} error message(s) about mail forwarded for {alias} are kept on the\r\nforwarder {} (your bounce policy is \"pool\"). Read them with IMAP or ask\r\nyour postmaster (tenso pool list {alias}).\r\n\r\n",
                list.len(),
                self.cfg.hostname
            ));
            for e in list.iter().take(50) {
                body.push_str(&format!(
                    "  {}  {:>8} bytes  {}\r\n",
                    crate::time::rfc5322_date(e.time),
                    e.size,
                    e.id
                ));
            }
            match self
                .queue_to(
                    &alias,
                    BouncePolicy::Pool,
                    &dests,
                    body.into_bytes(),
                    MessageKind::Dsn,
                    vec!["pool digest".into()],
                )
                .await
            {
                Ok(q) => {
                    self.counters.digests.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(alias = %alias, waiting = list.len(), queue_id = %q.0.id, "pool digest queued");
                    out.push(q);
                }
                Err(e) => tracing::error!(alias = %alias, error = %e, "cannot queue pool digest"),
            }
        }
        out
    }

    /// tenso's own DSN about `rcpts` of `env` (failed, or delayed when `action` says
    /// so), sent through each alias's policy. A message with a null reverse-path gets
    /// none: that is what keeps bounces from looping.
    pub async fn report(
        &self,
        env: &Envelope,
        body: &[u8],
        rcpts: &[&Rcpt],
        action: Action,
    ) -> Result<Vec<Queued>, String> {
        if rcpts.is_empty() {
            return Ok(Vec::new());
        }
        if env.reverse_path.is_empty() {
            let n = rcpts.len() as u64;
            if env.kind == MessageKind::ForwardedBounce || env.kind == MessageKind::Dsn {
                self.counters.lost_by_design.fetch_add(n, Ordering::Relaxed);
                for r in rcpts {
                    tracing::warn!(queue_id = %env.id, alias = %r.alias, dest = %r.dest, status = ?r.status, "forwarded bounce undeliverable: lost by design (policy 2b), no further bounce");
                }
            } else {
                self.counters
                    .no_dsn_null_sender
                    .fetch_add(n, Ordering::Relaxed);
                for r in rcpts {
                    tracing::info!(queue_id = %env.id, dest = %r.dest, "null-sender message undeliverable: no DSN");
                }
            }
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        // Proposal 1b's unknown recipients: one DSN to the original sender.
        let (unknown, rcpts): (Vec<&Rcpt>, Vec<&Rcpt>) = rcpts.iter().partition(|r| r.unknown);
        if !unknown.is_empty() && action == Action::Failed {
            out.push(self.report_unknown(env, body, &unknown).await?);
        }
        // One DSN per alias: each goes through that alias's own policy.
        let mut groups: BTreeMap<(String, String), Vec<&Rcpt>> = BTreeMap::new();
        for r in rcpts {
            groups
                .entry((r.alias.clone(), r.mail_from.clone()))
                .or_default()
                .push(r);
        }
        let now = crate::time::unix_now();
        let headers = header_section(body);
        for ((alias, to), group) in groups {
            let policy = group[0].policy;
            let to = if to.is_empty() { alias.clone() } else { to };
            let report = DsnReport {
                reporting_mta: &self.cfg.hostname,
                queue_id: &env.id,
                original_envelope_id: env.env_id.as_deref(),
                arrival: env.arrival,
                now,
                to: &to,
                original_sender: &env.reverse_path,
                recipients: group
                    .iter()
                    .map(|r| DsnRecipient {
                        final_recipient: if r.dest.is_empty() {
                            r.orig.clone()
                        } else {
                            r.dest.clone()
                        },
                        original_recipient: Some(r.orig.clone()),
                        action,
                        status: r.status.clone().unwrap_or_else(|| "5.0.0".into()),
                        remote_mta: r.remote_mta.clone(),
                        diagnostic: r.last.clone(),
                        last_attempt: now,
                        will_retry_until: (action == Action::Delayed)
                            .then(|| env.arrival + self.cfg.queue.max_lifetime.as_secs() as i64),
                    })
                    .collect(),
                original_headers: headers,
                message_id: format!(
                    "{}.{}@{}",
                    env.id,
                    if action == Action::Delayed {
                        "delay"
                    } else {
                        "dsn"
                    },
                    self.cfg.hostname
                ),
            };
            let msg = dsn::build_dsn(&report);
            self.counters.dsn_generated.fetch_add(1, Ordering::Relaxed);
            tracing::info!(queue_id = %env.id, alias = %alias, recipients = group.len(), ?action, %policy, "DSN generated");
            if let Some(q) = self.dispatch(&alias, policy, msg, MessageKind::Dsn).await? {
                out.push(q);
            }
        }
        Ok(out)
    }
}

/// The `To:` of a digest: the alias in its written form, or an empty group for a
/// catch-all (`@domain` is no address) or a name that cannot be written.
fn digest_to(alias: &str) -> String {
    match crate::smtp::address::Mailbox::parse(alias).and_then(|m| m.written()) {
        Ok(w) => format!("<{w}>"),
        Err(_) => "undisclosed-recipients:;".to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn digest_to_is_an_address_or_an_empty_group() {
        assert_eq!(super::digest_to("alice@alias.test"), "<alice@alias.test>");
        assert_eq!(
            super::digest_to("\"a b\"@alias.test"),
            "<\"a b\"@alias.test>"
        );
        assert_eq!(super::digest_to("@catch.test"), "undisclosed-recipients:;");
        assert_eq!(
            super::digest_to("x\r\ny@z.test"),
            "undisclosed-recipients:;"
        );
    }
}
