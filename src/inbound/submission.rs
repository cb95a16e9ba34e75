//! Submission: mail clients sending as their alias (RFC 6409 on port 587 with
//! STARTTLS, RFC 8314 implicit TLS on 465) — the talk's first measure.
//!
//! A second kind of listener on the same session machinery (framer, DATA decoder,
//! limits, spool commit, queue), with its own policy: nothing is accepted before
//! AUTH ([`super::auth`]), which is offered only inside TLS; MAIL FROM and the From
//! field must be the login's own alias; recipients may be anywhere (the one relay
//! tenso does); every login has sending limits, every client a bound on failed logins.
//! Submitted mail gets RFC 6409's fixes (Message-ID, Date), a `Received:` that hides
//! the client when `hide_client_ip`, and a DKIM signature of its From domain's key,
//! then leaves through the same queue and delivery as forwarded mail. It never
//! checks SPF, DMARC or spam on what an authenticated user sends, and never relays
//! for anyone unauthenticated.

use super::Inbound;
use super::session::{Session, Transaction};
use super::stream::Stream;
use crate::forward::{self, Target};
use crate::rate::submission::{OverLimit, SendLimits};
use crate::signing::KeyRing;
use crate::smtp::Reply;
use crate::smtp::address::{AddressError, Mailbox, Path, extract_path, parse_path};
use crate::smtp::author::sole_author;
use crate::smtp::codec::DataDecoder;
use crate::smtp::header::{count_fields, header_section};
use crate::spool::{Envelope, MessageKind, Rcpt};
use crate::table::RcptLookup;
use crate::table::logins::{self, Logins};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

/// What submission did, for `tenso status` (`counters.inbound.submission`).
#[derive(Default, Debug)]
pub struct Counters {
    pub sessions: AtomicU64,
    pub auth_ok: AtomicU64,
    /// 535 5.7.8: wrong password, unknown login.
    pub auth_failed: AtomicU64,
    /// A client reached `max_auth_failures`: 421 4.7.0 and a growing wait.
    pub auth_locked_out: AtomicU64,
    /// AUTH refused (421) because the client is locked out.
    pub auth_refused_locked: AtomicU64,
    /// Greetings delayed for clients with earlier lockouts.
    pub auth_penalized: AtomicU64,
    /// 454 4.7.0: no verification slot in time.
    pub auth_tempfail: AtomicU64,
    /// 538 5.7.11: AUTH before TLS.
    pub auth_without_tls: AtomicU64,
    /// 530 5.7.0: MAIL or RCPT before AUTH.
    pub auth_required: AtomicU64,
    /// 553 5.7.1: MAIL FROM was not the login.
    pub sender_refused: AtomicU64,
    /// 550 5.7.1: the From field was not the login alone.
    pub from_refused: AtomicU64,
    /// 450 4.7.1 per limit.
    pub over_message_rate: AtomicU64,
    pub over_recipient_rate: AtomicU64,
    pub submitted: AtomicU64,
    /// Submitted messages signed with no key of their own domain.
    pub signed_default_key: AtomicU64,
    pub unsigned: AtomicU64,
}

impl Counters {
    pub fn snapshot(&self) -> serde_json::Value {
        let g = |a: &AtomicU64| serde_json::json!(a.load(Ordering::Relaxed));
        let mut v = serde_json::json!({});
        for (name, a) in [
            ("sessions", &self.sessions),
            ("auth_ok", &self.auth_ok),
            ("auth_failed", &self.auth_failed),
            ("auth_locked_out", &self.auth_locked_out),
            ("auth_refused_locked", &self.auth_refused_locked),
            ("auth_penalized", &self.auth_penalized),
            ("auth_tempfail", &self.auth_tempfail),
            ("auth_without_tls", &self.auth_without_tls),
            ("auth_required", &self.auth_required),
            ("sender_refused", &self.sender_refused),
            ("from_refused", &self.from_refused),
            ("over_message_rate", &self.over_message_rate),
            ("over_recipient_rate", &self.over_recipient_rate),
            ("submitted", &self.submitted),
            ("signed_default_key", &self.signed_default_key),
            ("unsigned", &self.unsigned),
        ] {
            v[name] = g(a);
        }
        v
    }
}

/// The submission service, shared by its sessions.
pub struct Service {
    pub(super) tls: TlsAcceptor,
    pub(super) keys: KeyRing,
    pub(super) limits: SendLimits,
    pub(super) logins: Logins,
    /// Argon2 verifications running at once.
    pub(super) verifications: Arc<Semaphore>,
    /// Verified when the login is unknown, so that a wrong name costs what a wrong
    /// password costs and the timing tells nothing.
    pub(super) dummy_hash: Arc<str>,
    pub counters: Counters,
}

impl Service {
    /// Loads the keys and the certificate and makes the stand-in hash; None when no
    /// submission listener is configured.
    pub fn new(
        cfg: &crate::config::Config,
        table: &crate::table::Table,
    ) -> Result<Option<Service>, String> {
        let s = &cfg.submission;
        if !s.enabled() {
            return Ok(None);
        }
        if cfg.tls.cert.is_none() {
            tracing::warn!(
                "[submission] without [tls] cert/key: mail clients will see a self-signed certificate and refuse it unless told to trust it"
            );
        }
        let argon = logins::hasher(
            s.argon2_memory_kib,
            s.argon2_iterations,
            s.argon2_parallelism,
        )?;
        let dummy = logins::hash_password(&argon, b"no such login: same work as a wrong password")?;
        Ok(Some(Service {
            tls: super::tls::submission_acceptor(cfg)?,
            keys: KeyRing::from_config(&cfg.dkim)?,
            limits: SendLimits::new(
                s.max_messages_per_hour,
                s.max_recipients_per_day,
                cfg.limits.tracked_clients,
            ),
            logins: table.logins().map_err(|e| e.to_string())?,
            verifications: Arc::new(Semaphore::new(s.max_concurrent_auth)),
            dummy_hash: dummy.into(),
            counters: Counters::default(),
        }))
    }

    /// Live sizes of its maps, for `tenso status` (`maps`).
    pub fn tracked_logins(&self) -> usize {
        self.limits.tracked()
    }
}

/// A session's submission state.
pub(super) struct SubSession {
    pub svc: Arc<Service>,
    /// The alias this client authenticated as (canonical form).
    pub login: Option<String>,
    /// A SASL exchange waiting for the client's next line.
    pub sasl: Option<super::auth::Exchange>,
}

/// Binds `[submission] listen` (STARTTLS) then `listen_tls` (implicit TLS); returns
/// each with its address and whether it is implicit TLS.
pub async fn bind(
    cfg: &crate::config::Config,
) -> std::io::Result<Vec<(TcpListener, SocketAddr, bool)>> {
    let s = &cfg.submission;
    let mut out = Vec::new();
    for (addr, implicit) in s
        .listen
        .iter()
        .map(|a| (a, false))
        .chain(s.listen_tls.iter().map(|a| (a, true)))
    {
        let l = super::listen(*addr)
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
        let local = l.local_addr()?;
        out.push((l, local, implicit));
    }
    Ok(out)
}

/// One admitted submission connection: the wait of clients locked out before, the
/// TLS handshake on 465, then the session.
pub(super) async fn start(
    ctx: Arc<Inbound>,
    sock: TcpStream,
    peer: SocketAddr,
    implicit_tls: bool,
) {
    let Some(svc) = ctx.submission.clone() else {
        return;
    };
    svc.counters.sessions.fetch_add(1, Ordering::Relaxed);
    tracing::info!(client = %peer.ip(), port = peer.port(), implicit_tls, "submission connect");
    let penalty = ctx.limiter.auth_penalty(peer.ip());
    if !penalty.is_zero() {
        svc.counters.auth_penalized.fetch_add(1, Ordering::Relaxed);
        tracing::info!(client = %peer.ip(), delay_ms = penalty.as_millis() as u64, "submission greeting delayed: earlier failed logins");
        tokio::time::sleep(penalty).await;
    }
    let stream = if implicit_tls {
        let hs = tokio::time::timeout(ctx.cfg.smtp.command_timeout, svc.tls.accept(sock)).await;
        match hs {
            Ok(Ok(tls)) => Stream::Tls(Box::new(tls)),
            Ok(Err(e)) => {
                tracing::info!(client = %peer.ip(), error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::info!(client = %peer.ip(), "TLS handshake timeout");
                return;
            }
        }
    } else {
        Stream::Plain(sock)
    };
    let sub = SubSession {
        svc,
        login: None,
        sasl: None,
    };
    super::session::serve_stream(ctx, stream, peer, Some(sub)).await;
}

/// 450 4.7.1 for a login over one of its limits.
fn over_limit_reply(over: OverLimit) -> Reply {
    let (what, wait) = match over {
        OverLimit::MessagesPerHour(w) => ("messages per hour", w),
        OverLimit::RecipientsPerDay(w) => ("recipients per day", w),
    };
    Reply::new(
        450,
        "4.7.1",
        format!(
            "sending limit reached ({what}), try again in {} s",
            wait.as_secs().max(1)
        ),
    )
}

impl Session {
    fn sub(&self) -> Option<&SubSession> {
        self.sub.as_ref()
    }

    fn login(&self) -> Option<&str> {
        self.sub().and_then(|s| s.login.as_deref())
    }

    /// EHLO on a submission port: AUTH is offered only once TLS is up.
    pub(super) fn submission_ehlo(&self, lines: &mut Vec<std::borrow::Cow<'static, str>>) {
        if self.sub().is_some() && self.stream.is_tls() {
            lines.push("AUTH PLAIN LOGIN".into());
        }
    }

    /// `530 5.7.0` for MAIL on a submission port before AUTH; None otherwise (and
    /// always on port 25).
    pub(super) fn submission_gate(&self) -> Option<Reply> {
        let sub = self.sub()?;
        if sub.login.is_some() {
            return None;
        }
        sub.svc
            .counters
            .auth_required
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(client = %self.peer.ip(), "submission: MAIL or RCPT before AUTH refused");
        Some(Reply::new(530, "5.7.0", "authentication required"))
    }

    /// MAIL after the generic checks: the reverse-path must be the login, and the
    /// login under its hourly message limit.
    pub(super) fn submission_mail(&mut self, line: &str, smtputf8: bool) {
        let Some(login) = self.login().map(str::to_string) else {
            return;
        };
        let svc = self.sub().expect("submission session").svc.clone();
        let raw = extract_path(line).unwrap_or("");
        let own = match parse_path(raw, smtputf8) {
            Ok(Path::Mailbox(m)) => Logins::canonical(&m.to_string()).is_some_and(|c| c == login),
            Err(AddressError::NeedsUtf8) => {
                return self.reply(Reply::new(553, "5.6.7", "non-ASCII address needs SMTPUTF8"));
            }
            _ => false,
        };
        if !own {
            svc.counters.sender_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(client = %self.peer.ip(), %login, from = %raw.escape_debug(), "submission: MAIL FROM is not the login, refused");
            return self.reply(Reply::new(
                553,
                "5.7.1",
                format!("you may send only as yourself: MAIL FROM:<{login}>"),
            ));
        }
        if let Err(over) = svc.limits.message(&login) {
            svc.counters
                .over_message_rate
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(client = %self.peer.ip(), %login, "submission: hourly message limit reached");
            return self.reply(over_limit_reply(over));
        }
        self.tx = Some(Transaction {
            reverse_path: login,
            spf: Default::default(),
            reputation: Vec::new(),
            smtputf8,
            targets: Vec::new(),
        });
        self.reply(Reply::new(250, "2.1.0", "Ok"));
    }

    /// RCPT on a submission port: anywhere, within the login's daily recipient
    /// limit; addresses in our domains follow the table like port-25 mail, and an
    /// unknown one there is refused at once (the sender is ours: tell them now).
    pub(super) async fn submission_rcpt(&mut self, line: &str) {
        if let Some(r) = self.submission_gate() {
            return self.reply(r);
        }
        let Some(tx) = &self.tx else {
            return self.reply(Reply::new(503, "5.5.1", "need MAIL before RCPT"));
        };
        let smtputf8 = tx.smtputf8;
        let max = self.ctx.cfg.smtp.max_recipients;
        if tx.targets.len() >= max {
            return self.reply(Reply::new(
                452,
                "4.5.3",
                format!("too many recipients (at most {max} per message)"),
            ));
        }
        if let Some(reply) = self.check_params(line, &[]) {
            return self.reply(reply);
        }
        let raw = extract_path(line).unwrap_or("");
        let m = match parse_path(raw, smtputf8) {
            Ok(Path::Mailbox(m)) => m,
            Ok(Path::Postmaster) => return self.submission_rcpt_accepted(raw, None).await,
            Ok(Path::Null) => return self.reply(Reply::new(501, "5.1.3", "null forward-path")),
            Err(AddressError::NeedsUtf8) => {
                return self.reply(Reply::new(553, "5.6.7", "non-ASCII address needs SMTPUTF8"));
            }
            Err(e) => return self.reply(Reply::new(501, "5.1.3", format!("bad recipient: {e}"))),
        };
        if m.is_address_literal() || m.written().is_err() {
            return self.reply(Reply::new(553, "5.1.3", "recipient address not supported"));
        }
        self.submission_rcpt_accepted(raw, Some(m)).await;
    }

    /// The rate and routing step of RCPT: `m` None is `<postmaster>`.
    async fn submission_rcpt_accepted(&mut self, raw: &str, m: Option<Mailbox>) {
        let svc = self.sub().expect("submission session").svc.clone();
        let login = self.login().unwrap_or_default().to_string();
        if let Err(over) = svc.limits.recipient(&login) {
            svc.counters
                .over_recipient_rate
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(client = %self.peer.ip(), %login, "submission: daily recipient limit reached");
            return self.reply(over_limit_reply(over));
        }
        let local = match &m {
            None => Ok(RcptLookup::UnknownLocal),
            Some(m) => self.ctx.table.lookup_rcpt_async(m).await,
        };
        let reply = match (local, m) {
            (Err(e), _) => {
                tracing::error!(error = %e, "table lookup failed");
                Reply::new(451, "4.3.0", "temporary lookup failure, try again later")
            }
            (Ok(RcptLookup::NotLocal), Some(m)) => {
                let tx = self.tx.as_mut().expect("checked by submission_rcpt");
                if !tx
                    .targets
                    .iter()
                    .any(|t| t.written().eq_ignore_ascii_case(&m.to_string()))
                {
                    tx.targets.push(Target::Submitted { written: m });
                }
                Reply::new(250, "2.1.5", "Ok")
            }
            (Ok(RcptLookup::UnknownLocal), Some(m))
                if !m.local.eq_ignore_ascii_case("postmaster") =>
            {
                Reply::new(550, "5.1.1", "user unknown")
            }
            // Our own domains (and postmaster): exactly what port 25 does.
            _ => self.check_rcpt(raw).await,
        };
        tracing::debug!(client = %self.peer.ip(), %login, rcpt = raw, reply = %reply, "submission rcpt");
        self.reply(reply);
    }
}

/// The copies one submitted message becomes: outside recipients (kind Submission)
/// and recipients in our domains (forwarded like port-25 mail, kind Relay).
struct Copies {
    remote: Vec<Rcpt>,
    local: Vec<Rcpt>,
}

impl Session {
    /// End of DATA on a submission port: the same decoder verdicts as port 25, then
    /// the author check, RFC 6409's fixes, signing, commit, 250.
    pub(super) async fn end_of_submission(&mut self, dec: DataDecoder) {
        let mut body = std::mem::take(&mut self.data);
        let spilled = self.finish_spill().await;
        let tx = self
            .tx
            .take()
            .expect("DATA only starts inside a transaction");
        let svc = self.sub().expect("submission session").svc.clone();
        if let Some(err) = dec.error {
            let reply = super::data::data_error_reply(err, self.ctx.cfg.smtp.max_message_size);
            self.ctx
                .counters
                .refused_data
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(client = %self.peer.ip(), login = %tx.reverse_path, size = dec.size, reply = %reply, "submission refused");
            return self.reply(reply);
        }
        // Submitted mail is signed whole: a message that spilled is read back (room in
        // `whole_message_memory` held until this function returns).
        let _room = match self.read_back(&mut body, spilled).await {
            Ok(room) => room,
            Err(reply) => return self.reply(reply),
        };
        if let Err(reply) = self.check_submitted(&svc, &tx, &body) {
            self.ctx
                .counters
                .refused_data
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(client = %self.peer.ip(), login = %tx.reverse_path, reply = %reply, "submission refused");
            return self.reply(reply);
        }
        let body =
            crate::policy::strip_forged_results(&body, self.ctx.cfg.authserv_id()).unwrap_or(body);
        let copies = match self.submission_copies(&tx) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(login = %tx.reverse_path, error = %e, "table lookup failed");
                return self.reply(Reply::new(
                    451,
                    "4.3.0",
                    "temporary failure, try again later",
                ));
            }
        };
        let rest = self.hygiene(&body);
        drop(body);
        let mut ids = Vec::new();
        for (rcpts, kind) in [
            (copies.local, MessageKind::Relay),
            (copies.remote, MessageKind::Submission),
        ] {
            if rcpts.is_empty() {
                continue;
            }
            let id = self.ctx.spool.new_id();
            let msg = self.sign_submitted(
                &svc,
                &id,
                &tx.reverse_path,
                self.submitted_trace(&id, tx.smtputf8, &rest),
            );
            if let Err(reply) = self.commit_submitted(&tx, &id, kind, rcpts, msg).await {
                return self.reply(reply);
            }
            ids.push(id);
        }
        svc.counters.submitted.fetch_add(1, Ordering::Relaxed);
        self.messages += 1;
        self.reply(Reply::new(
            250,
            "2.0.0",
            format!("Ok: queued as {}", ids.join(" ")),
        ));
    }

    /// What RFC 6409 and "send only as yourself" refuse: loops, 8-bit header fields
    /// without SMTPUTF8 (RFC 6532 §3.3), a From that is not the login alone.
    fn check_submitted(&self, svc: &Service, tx: &Transaction, body: &[u8]) -> Result<(), Reply> {
        let headers = header_section(body);
        let hops = count_fields(headers, "received");
        if hops > self.ctx.cfg.delivery.max_hops {
            return Err(Reply::new(
                554,
                "5.4.6",
                format!("too many hops ({hops} Received headers): mail loop?"),
            ));
        }
        if !tx.smtputf8 && !headers.is_ascii() {
            return Err(Reply::new(
                554,
                "5.6.0",
                "8-bit header fields need SMTPUTF8 (MAIL FROM:<...> SMTPUTF8)",
            ));
        }
        let why = match sole_author(headers) {
            Ok(m) if Logins::canonical(&m.to_string()).is_some_and(|c| c == tx.reverse_path) => {
                return Ok(());
            }
            Ok(_) => "the From address is not yours".to_string(),
            Err(e) => e.to_string(),
        };
        svc.counters.from_refused.fetch_add(1, Ordering::Relaxed);
        Err(Reply::new(
            550,
            "5.7.1",
            format!(
                "you may send only as yourself ({why}): From: <{}>",
                tx.reverse_path
            ),
        ))
    }

    fn submission_copies(&self, tx: &Transaction) -> Result<Copies, crate::table::TableError> {
        let mut c = Copies {
            remote: Vec::new(),
            local: Vec::new(),
        };
        for t in &tx.targets {
            let r = forward::expand(&self.ctx.table, &self.ctx.cfg, t, &tx.reverse_path)?;
            match t {
                Target::Submitted { .. } => c.remote.extend(r),
                _ => c.local.extend(r),
            }
        }
        Ok(c)
    }

    /// RFC 6409 §8: a submission server may add a missing Date and Message-ID.
    fn hygiene(&self, body: &[u8]) -> Vec<u8> {
        let headers = header_section(body);
        let mut out = Vec::with_capacity(body.len() + 200);
        if count_fields(headers, "message-id") == 0 {
            let r: u64 = rand::random();
            out.extend_from_slice(
                format!(
                    "Message-ID: <{}.{r:016x}@{}>\r\n",
                    self.ctx.spool.new_id(),
                    self.ctx.cfg.hostname
                )
                .as_bytes(),
            );
        }
        if count_fields(headers, "date") == 0 {
            let now = crate::time::rfc5322_date(crate::time::unix_now());
            out.extend_from_slice(format!("Date: {now}\r\n").as_bytes());
        }
        out.extend_from_slice(body);
        out
    }

    /// `rest` under our `Received:` (RFC 3848's ESMTPSA: TLS and AUTH). With
    /// `hide_client_ip` it names neither the client's address nor its EHLO name.
    fn submitted_trace(&self, id: &str, smtputf8: bool, rest: &[u8]) -> Vec<u8> {
        let proto = if smtputf8 { "UTF8SMTPSA" } else { "ESMTPSA" };
        let host = &self.ctx.cfg.hostname;
        let date = crate::time::rfc5322_date(crate::time::unix_now());
        let h = if self.ctx.cfg.submission.hide_client_ip {
            format!("Received: by {host} (tenso) with {proto} id {id};\r\n\t{date}\r\n")
        } else {
            let helo = self.helo.clone().unwrap_or_default();
            let ip = match self.peer.ip() {
                std::net::IpAddr::V4(v4) => format!("[{v4}]"),
                std::net::IpAddr::V6(v6) => format!("[IPv6:{v6}]"),
            };
            format!(
                "Received: from {helo} ({ip})\r\n\tby {host} (tenso) with {proto} id {id};\r\n\t{date}\r\n"
            )
        };
        let mut msg = Vec::with_capacity(h.len() + rest.len());
        msg.extend_from_slice(h.as_bytes());
        msg.extend_from_slice(rest);
        msg
    }

    /// Signs with the key of the login's domain (= the From domain: DMARC aligns),
    /// or the `[dkim]` default key, or not at all (each counted and logged).
    fn sign_submitted(&self, svc: &Service, id: &str, login: &str, msg: Vec<u8>) -> Vec<u8> {
        let domain = login.rsplit_once('@').map_or("", |(_, d)| d);
        if let Some(s) = svc.keys.for_domain(domain) {
            return s.sign_prepend(msg);
        }
        if let Some(s) = &svc.keys.default {
            svc.counters
                .signed_default_key
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(queue_id = id, %domain, key_domain = %s.domain, "submitted mail signed with the default key: no [[dkim.keys]] entry for its domain (DMARC will not align)");
            return s.sign_prepend(msg);
        }
        svc.counters.unsigned.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(queue_id = id, %domain, "submitted mail sent unsigned: no DKIM key configured");
        msg
    }

    async fn commit_submitted(
        &mut self,
        tx: &Transaction,
        id: &str,
        kind: MessageKind,
        rcpts: Vec<Rcpt>,
        msg: Vec<u8>,
    ) -> Result<(), Reply> {
        let client = self.peer.ip();
        let nrcpt = rcpts.len();
        let env = Envelope {
            id: id.to_string(),
            kind,
            arrival: crate::time::unix_now(),
            client_ip: Some(client),
            helo: self.helo.clone().unwrap_or_default(),
            reverse_path: tx.reverse_path.clone(),
            env_id: None,
            smtputf8: tx.smtputf8,
            eight_bit: !msg.is_ascii(),
            size: msg.len() as u64,
            held: false,
            rcpts,
            notes: Vec::new(),
        };
        let msg = Arc::new(msg);
        if let Err(e) = self.ctx.spool.commit(&env, msg.clone()).await {
            tracing::error!(queue_id = %id, client = %client, error = %e, "cannot commit message");
            return Err(self.ctx.storage_failure(e.is_no_space()));
        }
        tracing::info!(queue_id = %id, client = %client, login = %tx.reverse_path, ?kind, nrcpt, size = env.size, "submitted");
        self.ctx.queue.enqueue(env, Some(msg));
        Ok(())
    }
}
