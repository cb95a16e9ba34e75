//! The SMTP server: listeners, connection permits, and one [`session`] per client.
//!
//! Accepts connections, applies the connection limits, and runs the RFC 5321 state
//! machine. It decides relay/unknown-user per RCPT through the table, and answers 250
//! to DATA only after [`crate::spool::Spool::commit`] returned — never before the
//! message is on stable storage. It never delivers anything itself: committed
//! messages are handed to the queue through its handle.

mod auth;
mod data;
mod mail;
mod session;
mod spam;
mod spill;
pub mod stream;
pub mod submission;
pub mod tls;

pub use session::parse_command;

use crate::bounce::Bounce;
use crate::config::Config;
use crate::policy::Auth;
use crate::queue::QueueHandle;
use crate::rate::{Limiter, Refusal};
use crate::signing::Signer;
use crate::spool::Spool;
use crate::table::Table;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

/// Counters for the admin (`tenso status`) and tests.
#[derive(Default, Debug)]
pub struct Counters {
    pub sessions: AtomicU64,
    pub accepted: AtomicU64,
    pub rejected_rcpt: AtomicU64,
    pub relay_denied: AtomicU64,
    pub refused_data: AtomicU64,
    pub busy: AtomicU64,
    pub unknown_accepted: AtomicU64,
    /// Proposal 1b: unknown recipients whose DSN was suppressed (SPF fail/softfail
    /// or null sender).
    pub bounce_suppressed_1b: AtomicU64,
    pub unknown_bounced: AtomicU64,
    pub dmarc_preflight_pooled: AtomicU64,
    pub refused_per_ip: AtomicU64,
    pub refused_rate: AtomicU64,
    pub penalized: AtomicU64,
    pub too_many_errors: AtomicU64,
    pub too_many_messages: AtomicU64,
    pub too_many_recipients: AtomicU64,
    /// Messages over `max_message_size` (declared at MAIL SIZE= or found in DATA).
    pub too_big: AtomicU64,
    pub too_slow: AtomicU64,
    pub starttls_injection: AtomicU64,
    pub reputation_rejected: AtomicU64,
    pub reputation_recorded: AtomicU64,
    /// `452 4.3.1`: the spool's disk is short of `min_free_space` (at MAIL) or full
    /// (at the commit).
    pub no_space: AtomicU64,
    /// The spam gate, per message (quarantined: per alias copy).
    pub spam: SpamCounters,
}

/// What the spam gate did (README "Spam gate").
#[derive(Default, Debug)]
pub struct SpamCounters {
    pub spam_clean: AtomicU64,
    pub spam_tagged: AtomicU64,
    pub spam_quarantined: AtomicU64,
    pub spam_rejected: AtomicU64,
    pub spam_tempfailed: AtomicU64,
    /// Judged spam, forwarded untouched to aliases whose policy is `off`.
    pub spam_forwarded_off: AtomicU64,
    /// rspamd could not judge (down, slow, bad answer) and mail flowed unscanned.
    pub spam_unscanned: AtomicU64,
    /// Every failed rspamd call, whatever `on_error` then did.
    pub spam_errors: AtomicU64,
    /// Over `[spam] max_size`: not scanned.
    pub spam_oversize: AtomicU64,
    pub alias_discarded: AtomicU64,
    pub alias_deferred: AtomicU64,
    pub alias_rejected: AtomicU64,
}

impl SpamCounters {
    fn snapshot(&self, into: &mut serde_json::Value) {
        let g = |a: &AtomicU64| serde_json::json!(a.load(Ordering::Relaxed));
        for (name, v) in [
            ("spam_clean", &self.spam_clean),
            ("spam_tagged", &self.spam_tagged),
            ("spam_quarantined", &self.spam_quarantined),
            ("spam_rejected", &self.spam_rejected),
            ("spam_tempfailed", &self.spam_tempfailed),
            ("spam_forwarded_off", &self.spam_forwarded_off),
            ("spam_unscanned", &self.spam_unscanned),
            ("spam_errors", &self.spam_errors),
            ("spam_oversize", &self.spam_oversize),
            ("alias_discarded", &self.alias_discarded),
            ("alias_deferred", &self.alias_deferred),
            ("alias_rejected", &self.alias_rejected),
        ] {
            into[name] = g(v);
        }
    }
}

impl Counters {
    pub fn snapshot(&self) -> serde_json::Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut v = serde_json::json!({
            "sessions": g(&self.sessions),
            "accepted": g(&self.accepted),
            "rejected_rcpt": g(&self.rejected_rcpt),
            "relay_denied": g(&self.relay_denied),
            "refused_data": g(&self.refused_data),
            "busy": g(&self.busy),
            "unknown_accepted": g(&self.unknown_accepted),
            "bounce_suppressed_1b": g(&self.bounce_suppressed_1b),
            "unknown_bounced": g(&self.unknown_bounced),
            "dmarc_preflight_pooled": g(&self.dmarc_preflight_pooled),
            "refused_per_ip": g(&self.refused_per_ip),
            "refused_rate": g(&self.refused_rate),
            "penalized": g(&self.penalized),
            "too_many_errors": g(&self.too_many_errors),
            "too_many_messages": g(&self.too_many_messages),
            "too_many_recipients": g(&self.too_many_recipients),
            "too_big": g(&self.too_big),
            "too_slow": g(&self.too_slow),
            "starttls_injection": g(&self.starttls_injection),
            "reputation_rejected": g(&self.reputation_rejected),
            "reputation_recorded": g(&self.reputation_recorded),
            "no_space": g(&self.no_space),
        });
        self.spam.snapshot(&mut v);
        v
    }
}

/// Everything a session needs, shared by all sessions.
pub struct Inbound {
    pub cfg: Arc<Config>,
    pub table: Table,
    pub spool: Spool,
    pub queue: QueueHandle,
    pub bounce: Arc<Bounce>,
    pub auth: Arc<Auth>,
    pub signer: Option<Arc<Signer>>,
    pub counters: Counters,
    pub limiter: Limiter,
    /// Inbound STARTTLS; None when `[tls] starttls = false`.
    pub tls: Option<TlsAcceptor>,
    /// The spam gate's rspamd; None when `[spam] rspamd_url` is unset.
    pub spam: Option<crate::policy::spam::Rspamd>,
    /// The submission service (587/465); None unless `[submission]` listens.
    pub submission: Option<Arc<submission::Service>>,
    permits: Arc<Semaphore>,
    /// `[smtp] whole_message_memory` in KiB: spilled messages read back whole.
    pub(crate) whole_memory: Arc<Semaphore>,
}

/// The services a session uses, handed over by the daemon.
pub struct Parts {
    pub table: Table,
    pub spool: Spool,
    pub queue: QueueHandle,
    pub bounce: Arc<Bounce>,
    pub auth: Arc<Auth>,
    pub signer: Option<Arc<Signer>>,
    pub tls: Option<TlsAcceptor>,
    pub submission: Option<submission::Service>,
}

impl Inbound {
    /// The counters of `tenso status`, with `dns_timeouts`: DNS lookups of the policy
    /// checks that got no answer in time, and end-of-DATA checks cut by their deadline.
    pub fn snapshot(&self) -> serde_json::Value {
        let mut v = self.counters.snapshot();
        v["dns_timeouts"] = self.auth.dns().timeouts().into();
        if let Some(s) = &self.submission {
            v["submission"] = s.counters.snapshot();
        }
        v
    }

    pub fn new(cfg: Arc<Config>, p: Parts) -> Arc<Inbound> {
        // The URL was checked by config validation.
        let spam = cfg.spam.rspamd_url.as_deref().and_then(|u| {
            crate::policy::spam::Rspamd::new(u, cfg.spam.timeout)
                .inspect_err(
                    |e| tracing::error!(error = %e, "[spam] rspamd_url unusable: gate off"),
                )
                .ok()
        });
        Arc::new(Inbound {
            spam,
            limiter: Limiter::new(&cfg.limits),
            permits: Arc::new(Semaphore::new(cfg.smtp.max_connections)),
            whole_memory: Arc::new(Semaphore::new(spill::whole_budget_kib(&cfg))),
            table: p.table,
            spool: p.spool,
            queue: p.queue,
            bounce: p.bounce,
            auth: p.auth,
            signer: p.signer,
            tls: p.tls,
            submission: p.submission.map(Arc::new),
            counters: Counters::default(),
            cfg,
        })
    }
}

impl Inbound {
    /// Whether the spool's disk can take a message of `size` bytes and still keep
    /// `[smtp] min_free_space` free. One `statvfs` (microseconds); a failing
    /// `statvfs` does not refuse mail (the commit still meets a full disk cleanly).
    pub(crate) fn has_room_for(&self, size: u64) -> bool {
        let min = self.cfg.smtp.min_free_space();
        if min == 0 {
            return true;
        }
        match self.spool.free_space() {
            Ok(free) => free >= min.saturating_add(size),
            Err(e) => {
                tracing::warn!(error = %e, "cannot check free space of the spool");
                true
            }
        }
    }

    /// The reply for a message that could not be stored: `452 4.3.1` when the disk
    /// is full (RFC 3463: mail system full), else `451 4.3.0`.
    pub(crate) fn storage_failure(&self, no_space: bool) -> crate::smtp::Reply {
        if no_space {
            self.counters.no_space.fetch_add(1, Ordering::Relaxed);
            crate::smtp::Reply::new(452, "4.3.1", "insufficient system storage, try again later")
        } else {
            crate::smtp::Reply::new(451, "4.3.0", "temporary failure: could not store message")
        }
    }

    /// After a failed write: is the disk now too full for `size` more bytes?
    pub(crate) fn short_of_space(&self, size: u64) -> bool {
        self.spool
            .free_space()
            .is_ok_and(|free| free < size.saturating_add(64 * 1024))
    }
}

/// Binds every configured listener; returns them with their actual addresses (a
/// configured port 0 becomes the ephemeral port the kernel chose).
pub async fn bind(cfg: &Config) -> std::io::Result<Vec<(TcpListener, SocketAddr)>> {
    let mut out = Vec::new();
    for addr in &cfg.smtp.listen {
        let l = listen(*addr)
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
        let local = l.local_addr()?;
        out.push((l, local));
    }
    Ok(out)
}

/// One listening socket. IPv6 sockets are IPv6-only, so `0.0.0.0:25` and `[::]:25`
/// can both be configured (Linux would otherwise make `[::]` take IPv4 too).
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv6() {
        let s = tokio::net::TcpSocket::new_v6()?;
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on a socket we own, with a valid int option value.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                libc::IPPROTO_IPV6,
                libc::IPV6_V6ONLY,
                &one as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        s
    } else {
        tokio::net::TcpSocket::new_v4()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    // A deep backlog: bursts of connects must queue in the kernel, not be dropped.
    sock.listen(4096)
}

/// What a listener serves.
#[derive(Debug, Clone, Copy)]
enum Listener {
    /// Port 25: mail for our aliases.
    Mx,
    /// Submission: 587 (`implicit_tls` false, STARTTLS) or 465.
    Submission { implicit_tls: bool },
}

/// Accepts clients until `shutdown` flips to true.
pub async fn run(inbound: Arc<Inbound>, listener: TcpListener, shutdown: watch::Receiver<bool>) {
    accept_loop(inbound, listener, shutdown, Listener::Mx).await
}

/// Accepts submission clients (see [`submission::bind`]) until `shutdown`: the same
/// connection limits as port 25, shared per client across all ports.
pub async fn run_submission(
    inbound: Arc<Inbound>,
    listener: TcpListener,
    implicit_tls: bool,
    shutdown: watch::Receiver<bool>,
) {
    accept_loop(
        inbound,
        listener,
        shutdown,
        Listener::Submission { implicit_tls },
    )
    .await
}

async fn accept_loop(
    inbound: Arc<Inbound>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
    kind: Listener,
) {
    loop {
        let (sock, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = sock.set_nodelay(true);
        // Counted while the socket is ours, refused or served.
        let open = crate::metrics::Open::inbound();
        let inbound = inbound.clone();
        // Limits are checked before anything else: over a limit, the client gets
        // 421 at once, never a silent wait in a queue.
        let Ok(permit) = inbound.permits.clone().try_acquire_owned() else {
            inbound.counters.busy.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(client = %peer.ip(), limit = inbound.cfg.smtp.max_connections, "too many connections, refusing");
            tokio::spawn(async move {
                session::refuse(inbound, sock, "too many connections").await;
                drop(open);
            });
            continue;
        };
        tokio::spawn(async move {
            let guard = match inbound.limiter.admit(peer.ip()) {
                Ok(g) => g,
                Err(r) => {
                    let why = match r {
                        Refusal::TooManyFromClient => {
                            inbound
                                .counters
                                .refused_per_ip
                                .fetch_add(1, Ordering::Relaxed);
                            "too many connections from your address"
                        }
                        Refusal::ConnectRate => {
                            inbound
                                .counters
                                .refused_rate
                                .fetch_add(1, Ordering::Relaxed);
                            "connecting too often"
                        }
                    };
                    tracing::warn!(client = %peer.ip(), reason = why, "connection refused");
                    session::refuse(inbound.clone(), sock, why).await;
                    drop(permit);
                    return;
                }
            };
            match kind {
                Listener::Mx => session::run(inbound.clone(), sock, peer).await,
                Listener::Submission { implicit_tls } => {
                    submission::start(inbound.clone(), sock, peer, implicit_tls).await
                }
            }
            drop(guard);
            drop(permit);
            drop(open);
        });
    }
}
