//! One delivery attempt: route a (reverse-path, domain) group of recipients, open or
//! reuse a session to a next hop, run the transaction, report per-recipient outcomes.
//!
//! Keeps the outbound connection state: idle sessions for reuse (several messages to
//! one host over one connection), a concurrency limit per next-hop address
//! (`max_per_destination`), and the dead-host cache (a host that refused a connect is
//! skipped for `dead_host_ttl`, so queued mail waits instead of hammering it).
//! It decides nothing about retries, DSNs or the spool: the queue does.
//!
//! Every map is pruned once a second: idle sessions past `idle_timeout`, per-host
//! limits nobody holds or waits on, dead hosts whose time is up, per-domain limits
//! nobody holds. The dead-host map is also capped ([`MAX_DEAD_HOSTS`]).

pub mod client;
pub mod route;

use crate::config::{Config, TlsMode};
use crate::dns::Resolver;
use crate::smtp::address::WirePath;
pub use client::Outcome;
use client::{Session, SessionError};
use parking_lot::Mutex;
use route::RouteError;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsConnector;

/// Hosts remembered as dead at once. At the bound the one whose time ends first is
/// forgotten: the cost is one more connection attempt to it.
pub const MAX_DEAD_HOSTS: usize = 10_000;

/// A group of recipients sharing reverse-path and destination domain.
pub struct Job<'a> {
    pub queue_id: &'a str,
    pub domain: &'a str,
    pub mail_from: &'a str,
    pub rcpts: Vec<String>,
    pub message: &'a [u8],
    pub needs_smtputf8: bool,
    pub env_id: Option<&'a str>,
}

/// Outcomes in `Job::rcpts` order, plus the host that gave them.
pub struct Report {
    pub outcomes: Vec<Outcome>,
    pub remote_mta: Option<String>,
}

struct Idle {
    session: Session,
    since: Instant,
    permit: OwnedSemaphorePermit,
}

#[derive(Default)]
struct HostSlot {
    idle: Vec<Idle>,
}

struct Limits {
    sem: Arc<Semaphore>,
    notify: Arc<Notify>,
}

pub struct Delivery {
    cfg: Arc<Config>,
    resolver: Resolver,
    tls: TlsConnector,
    slots: Mutex<HashMap<SocketAddr, HostSlot>>,
    limits: Mutex<HashMap<SocketAddr, Limits>>,
    dead: Mutex<HashMap<SocketAddr, Instant>>,
    /// Concurrent transactions per destination domain (`domain_max_connections`).
    domains: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl Delivery {
    pub fn new(cfg: Arc<Config>, resolver: Resolver) -> Result<Arc<Delivery>, String> {
        // Opportunistic TLS and `required` (Postfix's "encrypt") do not verify
        // certificates: most MX certificates would fail, and clear text is worse.
        let tls = mail_send::smtp::tls::build_tls_connector(true)?;
        let d = Arc::new(Delivery {
            cfg,
            resolver,
            tls,
            slots: Mutex::new(HashMap::new()),
            limits: Mutex::new(HashMap::new()),
            dead: Mutex::new(HashMap::new()),
            domains: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&d);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(d) = weak.upgrade() else { break };
                d.reap_idle();
                d.prune();
            }
        });
        Ok(d)
    }

    fn reap_idle(&self) {
        let ttl = self.cfg.delivery.idle_timeout;
        let mut expired = Vec::new();
        {
            let mut slots = self.slots.lock();
            for slot in slots.values_mut() {
                let (keep, old): (Vec<Idle>, Vec<Idle>) =
                    slot.idle.drain(..).partition(|i| i.since.elapsed() < ttl);
                slot.idle = keep;
                expired.extend(old);
            }
            slots.retain(|_, s| !s.idle.is_empty());
        }
        for i in expired {
            tokio::spawn(async move {
                let Idle {
                    session, permit, ..
                } = i;
                session.quit().await;
                drop(permit);
            });
        }
    }

    /// Drops map entries that hold nothing: per-host limits with every permit free,
    /// nobody waiting and no idle session; dead hosts whose time is up; per-domain
    /// limits nobody holds.
    fn prune(&self) {
        let now = Instant::now();
        self.dead.lock().retain(|_, until| *until > now);
        let idle: Vec<SocketAddr> = self.slots.lock().keys().copied().collect();
        let max = self.cfg.delivery.max_per_destination.max(1);
        self.limits.lock().retain(|addr, l| {
            idle.contains(addr)
                || Arc::strong_count(&l.sem) > 1
                || Arc::strong_count(&l.notify) > 1
                || l.sem.available_permits() < max
        });
        self.domains.lock().retain(|_, s| Arc::strong_count(s) > 1);
    }

    /// Sizes of the maps, for `tenso status` and the memory-bounds test.
    pub fn map_sizes(&self) -> serde_json::Value {
        serde_json::json!({
            "idle_hosts": self.slots.lock().len(),
            "host_limits": self.limits.lock().len(),
            "dead_hosts": self.dead.lock().len(),
            "domain_limits": self.domains.lock().len(),
        })
    }

    /// Forgets every dead host (for `queue flush`).
    pub fn forget_dead_hosts(&self) {
        self.dead.lock().clear();
    }

    fn is_dead(&self, addr: &SocketAddr) -> bool {
        let mut dead = self.dead.lock();
        match dead.get(addr) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                dead.remove(addr);
                false
            }
            None => false,
        }
    }

    fn mark_dead(&self, addr: SocketAddr) {
        let now = Instant::now();
        let mut dead = self.dead.lock();
        if dead.len() >= MAX_DEAD_HOSTS && !dead.contains_key(&addr) {
            dead.retain(|_, until| *until > now);
            if dead.len() >= MAX_DEAD_HOSTS
                && let Some(first) = dead.iter().min_by_key(|(_, u)| **u).map(|(a, _)| *a)
            {
                dead.remove(&first);
            }
        }
        dead.insert(addr, now + self.cfg.queue.dead_host_ttl);
    }

    fn limits(&self, addr: SocketAddr) -> (Arc<Semaphore>, Arc<Notify>) {
        let mut l = self.limits.lock();
        let e = l.entry(addr).or_insert_with(|| Limits {
            sem: Arc::new(Semaphore::new(self.cfg.delivery.max_per_destination.max(1))),
            notify: Arc::new(Notify::new()),
        });
        (e.sem.clone(), e.notify.clone())
    }

    fn take_idle(&self, addr: SocketAddr) -> Option<Idle> {
        let ttl = self.cfg.delivery.idle_timeout;
        let mut slots = self.slots.lock();
        let slot = slots.get_mut(&addr)?;
        while let Some(i) = slot.idle.pop() {
            if i.since.elapsed() < ttl {
                return Some(i);
            }
        }
        None
    }

    fn put_idle(&self, session: Session, permit: OwnedSemaphorePermit) {
        let addr = session.addr;
        self.slots.lock().entry(addr).or_default().idle.push(Idle {
            session,
            since: Instant::now(),
            permit,
        });
        self.limits(addr).1.notify_one();
    }

    /// A session to `addr`: an idle one if any, else a new one within the limit.
    async fn session(
        &self,
        addr: SocketAddr,
        host: &str,
        mode: TlsMode,
    ) -> Result<(Session, OwnedSemaphorePermit, bool), SessionError> {
        let (sem, notify) = self.limits(addr);
        loop {
            if let Some(i) = self.take_idle(addr) {
                return Ok((i.session, i.permit, true));
            }
            let permit = tokio::select! {
                p = sem.clone().acquire_owned() => p.expect("semaphore never closed"),
                _ = notify.notified() => continue,
            };
            let d = &self.cfg.delivery;
            let p = client::Params {
                helo_name: &self.cfg.hostname,
                connect_timeout: d.connect_timeout,
                command_timeout: d.command_timeout,
                data_timeout: d.data_timeout,
            };
            let s = client::open(addr, host, mode, &self.tls, &p).await?;
            return Ok((s, permit, false));
        }
    }

    pub fn tls_mode(&self, domain: &str) -> TlsMode {
        let d = &self.cfg.delivery;
        d.tls_domains
            .get(&domain.to_lowercase())
            .copied()
            .unwrap_or(d.tls)
    }

    /// Delivers one group. Never fails as a whole: every recipient gets an outcome.
    pub async fn deliver(&self, job: &Job<'_>) -> Report {
        let sem = {
            let mut d = self.domains.lock();
            d.entry(job.domain.to_lowercase())
                .or_insert_with(|| {
                    Arc::new(Semaphore::new(
                        self.cfg.limits.domain_max_connections.max(1),
                    ))
                })
                .clone()
        };
        let _slot = sem.acquire_owned().await.expect("semaphore never closed");
        self.deliver_checked(job).await
    }

    /// Writes every path for the wire first: a reverse-path that cannot be written
    /// fails the whole group, a forward-path that cannot fails its recipient, and
    /// only what passed goes to the next hop.
    async fn deliver_checked(&self, job: &Job<'_>) -> Report {
        let n = job.rcpts.len();
        let mail_from = match WirePath::from_stored(job.mail_from) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(queue_id = job.queue_id, from = ?job.mail_from, error = %e, "reverse-path cannot be written");
                let o = Outcome::Failed("5.1.7".into(), format!("invalid reverse-path: {e}"));
                return Report {
                    outcomes: vec![o; n],
                    remote_mta: None,
                };
            }
        };
        let mut outcomes: Vec<Option<Outcome>> = vec![None; n];
        let mut paths = Vec::with_capacity(n);
        let mut index = Vec::with_capacity(n);
        for (i, r) in job.rcpts.iter().enumerate() {
            match WirePath::from_stored(r) {
                Ok(p) if !p.is_null() => {
                    paths.push(p);
                    index.push(i);
                }
                res => {
                    let e = res
                        .err()
                        .map_or("null forward-path".into(), |e| e.to_string());
                    tracing::warn!(queue_id = job.queue_id, to = ?r, error = %e, "forward-path cannot be written");
                    outcomes[i] = Some(Outcome::Failed(
                        "5.1.3".into(),
                        format!("invalid destination address: {e}"),
                    ));
                }
            }
        }
        let mut remote_mta = None;
        if !paths.is_empty() {
            let report = self.deliver_inner(job, &mail_from, &paths).await;
            remote_mta = report.remote_mta;
            for (k, o) in report.outcomes.into_iter().enumerate() {
                outcomes[index[k]] = Some(o);
            }
        }
        Report {
            outcomes: outcomes.into_iter().flatten().collect(),
            remote_mta,
        }
    }

    async fn deliver_inner(
        &self,
        job: &Job<'_>,
        mail_from: &WirePath,
        rcpts: &[WirePath],
    ) -> Report {
        let n = rcpts.len();
        let hosts = match route::resolve(&self.cfg, &self.resolver, job.domain).await {
            Ok(h) => h,
            Err(RouteError::Permanent(st, text)) => {
                return Report {
                    outcomes: vec![Outcome::Failed(st.into(), text); n],
                    remote_mta: None,
                };
            }
            Err(RouteError::Temporary(st, text)) => {
                return Report {
                    outcomes: vec![Outcome::Deferred(st.into(), text); n],
                    remote_mta: None,
                };
            }
        };
        let mode = self.tls_mode(job.domain);
        let tx = client::Transaction {
            mail_from,
            rcpts,
            message: job.message,
            needs_smtputf8: job.needs_smtputf8,
            env_id: job.env_id,
        };
        let mut last = (
            "4.4.1".to_string(),
            format!("no host for {} could be reached", job.domain),
        );
        let mut permanent_refusals = 0;
        let mut tried = 0;
        for host in &hosts {
            for &addr in &host.addrs {
                if self.is_dead(&addr) {
                    last = (
                        "4.4.1".into(),
                        format!("{} ({addr}) was unreachable recently", host.name),
                    );
                    continue;
                }
                tried += 1;
                // A reused session may have been closed by the server meanwhile: one
                // retry on a fresh connection before blaming the host.
                for _ in 0..2 {
                    let (mut s, permit, reused) = match self.session(addr, &host.name, mode).await {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::info!(queue_id = job.queue_id, host = %host.name, %addr, error = %e, "session failed");
                            match &e {
                                SessionError::Connect(_) => self.mark_dead(addr),
                                SessionError::Refused {
                                    permanent: true, ..
                                } => permanent_refusals += 1,
                                _ => {}
                            }
                            last = ("4.4.1".into(), format!("{}: {e}", host.name));
                            if let SessionError::Tls(t) = &e {
                                last = ("4.7.10".into(), t.clone());
                            }
                            break;
                        }
                    };
                    let (outcomes, usable) =
                        s.transaction(&tx, self.cfg.delivery.data_timeout).await;
                    let broke_early =
                        !usable && outcomes.iter().all(|o| matches!(o, Outcome::Deferred(..)));
                    if usable {
                        self.put_idle(s, permit);
                    } else {
                        drop(s);
                        drop(permit);
                        self.limits(addr).1.notify_one();
                    }
                    if broke_early && reused {
                        continue;
                    }
                    if broke_early {
                        last = (
                            "4.4.2".into(),
                            format!("{}: connection lost during transaction", host.name),
                        );
                        break;
                    }
                    return Report {
                        outcomes,
                        remote_mta: Some(host.name.clone()),
                    };
                }
            }
        }
        // Every host refused with 5xx greetings: the destination does not want mail.
        let o = if tried > 0 && permanent_refusals == tried {
            Outcome::Failed("5.4.1".into(), last.1)
        } else {
            Outcome::Deferred(last.0, last.1)
        };
        Report {
            outcomes: vec![o; n],
            remote_mta: None,
        }
    }
}
