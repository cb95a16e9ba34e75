//! One delivery attempt: route a (reverse-path, domain) group of recipients, open or
//! reuse a session to a next hop, run the transaction, report per-recipient outcomes.
//!
//! Keeps the outbound connection state: idle sessions for reuse (several messages to
//! one host over one connection), a concurrency limit per next-hop address
//! (`max_per_destination`), and the dead-host cache (a host that refused a connect is
//! skipped for `dead_host_ttl`, so queued mail waits instead of hammering it).
//! It decides nothing about retries, DSNs or the spool: the queue does.
//!
//! Each attempt decides its TLS policy per MX host (`tls_policy`: DANE, then
//! MTA-STS, then `tls_domains`, then `tls`), and an idle session is reused only for
//! mail whose requirement it meets. Every new session is counted for TLS-RPT.
//!
//! Every map is pruned once a second: idle sessions past `idle_timeout`, per-host
//! limits nobody holds or waits on, dead hosts whose time is up, per-domain limits
//! nobody holds. The dead-host map is also capped ([`MAX_DEAD_HOSTS`]).

pub mod certs;
pub mod client;
pub mod dane;
pub mod mta_sts;
pub mod outgoing;
pub mod route;
pub mod tls_policy;
pub mod tlsrpt;

use crate::config::{Config, TlsMode};
use crate::dns::Resolver;
use crate::smtp::address::WirePath;
use crate::table::Table;
use certs::Trust;
pub use client::Outcome;
use client::{Session, SessionError};
use parking_lot::Mutex;
use route::RouteError;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tls_policy::{HostPolicy, Requirement, Source};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// Hosts remembered as dead at once. At the bound the one whose time ends first is
/// forgotten: the cost is one more connection attempt to it.
pub const MAX_DEAD_HOSTS: usize = 10_000;

/// A group of recipients sharing reverse-path and destination domain.
pub struct Job<'a> {
    pub queue_id: &'a str,
    pub domain: &'a str,
    pub mail_from: &'a str,
    pub rcpts: Vec<String>,
    pub message: &'a outgoing::Outgoing,
    pub needs_smtputf8: bool,
    pub env_id: Option<&'a str>,
}

/// Outcomes in `Job::rcpts` order, plus the host that gave them and how the
/// session was protected (`TLSv1.3 TLS13_AES_128_GCM_SHA256 policy=dane`).
pub struct Report {
    pub outcomes: Vec<Outcome>,
    pub remote_mta: Option<String>,
    pub tls: Option<String>,
}

impl Report {
    fn all(o: Outcome, n: usize) -> Report {
        Report {
            outcomes: vec![o; n],
            remote_mta: None,
            tls: None,
        }
    }
}

/// Sessions per TLS policy and result (`dane.ok`, `mta-sts.failed`,
/// `opportunistic.plain`, …): a fixed set of keys, so bounded.
#[derive(Default)]
pub struct TlsCounters(Mutex<BTreeMap<String, u64>>);

impl TlsCounters {
    fn add(&self, policy: &str, result: &str) {
        *self
            .0
            .lock()
            .entry(format!("{policy}.{result}"))
            .or_default() += 1;
    }

    pub fn snapshot(&self) -> serde_json::Value {
        serde_json::json!(*self.0.lock())
    }
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
    trust: Trust,
    /// MTA-STS policies (None when `[delivery] mta_sts = false`).
    sts: Option<mta_sts::Sts>,
    /// The DNSSEC-validating resolver for TLSA (None when `[delivery] dane = false`).
    dnssec: Option<Resolver>,
    pub reports: Arc<tlsrpt::Reports>,
    pub tls_counters: TlsCounters,
    slots: Mutex<HashMap<SocketAddr, HostSlot>>,
    limits: Mutex<HashMap<SocketAddr, Limits>>,
    dead: Mutex<HashMap<SocketAddr, Instant>>,
    /// Concurrent transactions per destination domain (`domain_max_connections`).
    domains: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl Delivery {
    pub fn new(
        cfg: Arc<Config>,
        resolver: Resolver,
        table: &Table,
    ) -> Result<Arc<Delivery>, String> {
        let trust = Trust::load(cfg.delivery.ca_file.as_deref())?;
        let store = table.tls().map_err(|e| e.to_string())?;
        let sts = cfg.delivery.mta_sts.then(|| {
            mta_sts::Sts::new(
                resolver.clone(),
                trust.clone(),
                store.clone(),
                cfg.delivery.mta_sts_port,
            )
        });
        let dnssec = match cfg.delivery.dane {
            true => Some(crate::dns::build_validating(&cfg)?),
            false => None,
        };
        let d = Arc::new(Delivery {
            reports: Arc::new(tlsrpt::Reports::new(cfg.clone(), store)),
            tls_counters: TlsCounters::default(),
            cfg,
            resolver,
            trust,
            sts,
            dnssec,
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

    /// The newest idle session to `addr` that meets `req` for `host`. Expired ones
    /// met on the way are dropped; ones that do not meet `req` stay for other mail.
    fn take_idle(&self, addr: SocketAddr, host: &str, req: &Requirement) -> Option<Idle> {
        let ttl = self.cfg.delivery.idle_timeout;
        let mut slots = self.slots.lock();
        let slot = slots.get_mut(&addr)?;
        slot.idle.retain(|i| i.since.elapsed() < ttl);
        let pos = slot
            .idle
            .iter()
            .rposition(|i| req.satisfied_by(&i.session.security, &i.session.host, host))?;
        Some(slot.idle.remove(pos))
    }

    /// Closes the oldest idle session to `addr` (one that did not fit), so its
    /// connection slot can serve a session that does.
    fn evict_idle(&self, addr: SocketAddr) -> bool {
        let oldest = {
            let mut slots = self.slots.lock();
            match slots.get_mut(&addr) {
                Some(slot) if !slot.idle.is_empty() => Some(slot.idle.remove(0)),
                _ => None,
            }
        };
        let Some(Idle {
            session, permit, ..
        }) = oldest
        else {
            return false;
        };
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), session.quit()).await;
            drop(permit);
        });
        true
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

    /// A session to `addr` that meets `req`: an idle one if any, else a new one
    /// within the limit (closing an idle one that does not fit, if it holds the
    /// last slot). The flag says whether it was reused.
    async fn session(
        &self,
        addr: SocketAddr,
        host: &str,
        req: &Requirement,
    ) -> Result<(Session, OwnedSemaphorePermit, bool), SessionError> {
        let (sem, notify) = self.limits(addr);
        loop {
            if let Some(i) = self.take_idle(addr, host, req) {
                return Ok((i.session, i.permit, true));
            }
            if sem.available_permits() == 0 && self.evict_idle(addr) {
                tokio::task::yield_now().await;
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
            let s = client::open(addr, host, req, &self.trust, &p).await?;
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
                return Report::all(o, n);
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
        let (mut remote_mta, mut tls) = (None, None);
        if !paths.is_empty() {
            let report = self.deliver_inner(job, &mail_from, &paths).await;
            (remote_mta, tls) = (report.remote_mta, report.tls);
            for (k, o) in report.outcomes.into_iter().enumerate() {
                outcomes[index[k]] = Some(o);
            }
        }
        Report {
            outcomes: outcomes.into_iter().flatten().collect(),
            remote_mta,
            tls,
        }
    }

    async fn deliver_inner(
        &self,
        job: &Job<'_>,
        mail_from: &WirePath,
        rcpts: &[WirePath],
    ) -> Report {
        let n = rcpts.len();
        // The MTA-STS lookup runs beside the MX lookup.
        let (hosts, sts) = tokio::join!(
            route::resolve(&self.cfg, &self.resolver, job.domain),
            self.sts_view(job.domain)
        );
        let hosts = match hosts {
            Ok(h) => h,
            Err(RouteError::Permanent(st, text)) => {
                return Report::all(Outcome::Failed(st.into(), text), n);
            }
            Err(RouteError::Temporary(st, text)) => {
                return Report::all(Outcome::Deferred(st.into(), text), n);
            }
        };
        if let Some(problem) = &sts.problem {
            // The policy could not be had: counted once per attempt (RFC 8460 §4.3.3).
            self.report_session(
                job.domain,
                &sts_ref(&sts),
                "",
                None,
                None,
                Some((problem.result_type(), problem.to_string())),
            );
        }
        let tx = client::Transaction {
            mail_from,
            rcpts,
            message: job.message,
            needs_smtputf8: job.needs_smtputf8,
            env_id: job.env_id,
        };
        let mut attempt = Attempt {
            last: (
                "4.4.1".to_string(),
                format!("no host for {} could be reached", job.domain),
            ),
            permanent_refusals: 0,
            tried: 0,
        };
        let mode = self.tls_mode(job.domain);
        for host in &hosts {
            let dane = self.dane_lookup(host).await;
            let policy = match tls_policy::decide(&host.name, dane.as_ref(), &sts, mode) {
                Ok(p) => p,
                Err(skip) => {
                    attempt.last = self.skipped(job, host, &sts, dane.as_ref(), skip);
                    continue;
                }
            };
            tracing::debug!(queue_id = job.queue_id, host = %host.name, policy = policy.source.label(), requirement = ?policy.requirement, "TLS policy");
            for &addr in &host.addrs {
                if let Some(report) = self
                    .try_addr(job, host, addr, &policy, &tx, &mut attempt)
                    .await
                {
                    return report;
                }
            }
        }
        // Every host refused with 5xx greetings: the destination does not want mail.
        let o = if attempt.tried > 0 && attempt.permanent_refusals == attempt.tried {
            Outcome::Failed("5.4.1".into(), attempt.last.1)
        } else {
            Outcome::Deferred(attempt.last.0, attempt.last.1)
        };
        Report::all(o, n)
    }

    /// The destination's MTA-STS policy; none for static routes, which are no MX.
    async fn sts_view(&self, domain: &str) -> mta_sts::StsView {
        match &self.sts {
            Some(sts) if route::static_hop(&self.cfg, domain).is_none() => sts.view(domain).await,
            _ => mta_sts::StsView::default(),
        }
    }

    /// Records why the policy ruled `host` out; returns the deferral reason.
    fn skipped(
        &self,
        job: &Job<'_>,
        host: &route::Host,
        sts: &mta_sts::StsView,
        dane: Option<&dane::DaneLookup>,
        skip: tls_policy::Skip,
    ) -> (String, String) {
        let policy = match dane {
            Some(dane::DaneLookup::Failed(..)) => tlsrpt::PolicyRef {
                policy_type: "tlsa".into(),
                policy_string: Vec::new(),
                mx_host: vec![host.name.clone()],
            },
            _ => sts_ref(sts),
        };
        let label = if policy.policy_type == "tlsa" {
            "dane"
        } else {
            "mta-sts"
        };
        self.tls_counters.add(label, "skipped");
        tracing::info!(queue_id = job.queue_id, host = %host.name, status = skip.status, reason = %skip.text, "host ruled out by TLS policy");
        let ip = host.addrs.first().map(|a| a.ip());
        let failure = Some((skip.result_type, skip.text.clone()));
        self.report_session(job.domain, &policy, &host.name, ip, None, failure);
        (skip.status.to_string(), skip.text)
    }

    /// The secure TLSA records of `host` (None when DANE is off or `host` is an IP).
    async fn dane_lookup(&self, host: &route::Host) -> Option<dane::DaneLookup> {
        let resolver = self.dnssec.as_ref()?;
        let port = host
            .addrs
            .first()
            .map_or(self.cfg.delivery.port, |a| a.port());
        Some(dane::lookup(resolver, &host.name, port).await)
    }

    /// One address of one host: a session that meets the policy, then the
    /// transaction. Some(report) ends the attempt; None goes on to the next address.
    async fn try_addr(
        &self,
        job: &Job<'_>,
        host: &route::Host,
        addr: SocketAddr,
        policy: &HostPolicy,
        tx: &client::Transaction<'_>,
        attempt: &mut Attempt,
    ) -> Option<Report> {
        if self.is_dead(&addr) {
            attempt.last = (
                "4.4.1".into(),
                format!("{} ({addr}) was unreachable recently", host.name),
            );
            return None;
        }
        attempt.tried += 1;
        // A reused session may have been closed by the server meanwhile: one retry on
        // a fresh connection before blaming the host.
        for _ in 0..2 {
            let (mut s, permit, reused) =
                match self.session(addr, &host.name, &policy.requirement).await {
                    Ok(x) => x,
                    Err(e) => {
                        self.session_failed(job, host, addr, policy, &e, attempt);
                        return None;
                    }
                };
            if !reused {
                self.session_opened(job, &s, policy);
            }
            let tls = format!("{} policy={}", s.tls_summary(), policy.source.label());
            let (outcomes, usable) = s.transaction(tx, self.cfg.delivery.data_timeout).await;
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
                attempt.last = (
                    "4.4.2".into(),
                    format!("{}: connection lost during transaction", host.name),
                );
                return None;
            }
            return Some(Report {
                outcomes,
                remote_mta: Some(host.name.clone()),
                tls: Some(tls),
            });
        }
        None
    }

    fn session_failed(
        &self,
        job: &Job<'_>,
        host: &route::Host,
        addr: SocketAddr,
        policy: &HostPolicy,
        e: &SessionError,
        attempt: &mut Attempt,
    ) {
        tracing::info!(queue_id = job.queue_id, host = %host.name, %addr, policy = policy.source.label(), error = %e, "session failed");
        attempt.last = ("4.4.1".into(), format!("{}: {e}", host.name));
        match e {
            SessionError::Connect(_) => self.mark_dead(addr),
            SessionError::Refused {
                permanent: true, ..
            } => attempt.permanent_refusals += 1,
            SessionError::Tls(text, kind) => {
                let status = if kind.starts_with("certificate") || kind.starts_with("tlsa") {
                    "4.7.5"
                } else {
                    "4.7.10"
                };
                attempt.last = (status.into(), text.clone());
                self.tls_counters.add(policy.source.label(), "failed");
                let r = report_ref(&policy.source, &host.name);
                self.report_session(
                    job.domain,
                    &r,
                    &host.name,
                    Some(addr.ip()),
                    None,
                    Some((kind, text.clone())),
                );
            }
            _ => {}
        }
    }

    /// Counts a new session for the counters and TLS-RPT.
    fn session_opened(&self, job: &Job<'_>, s: &Session, policy: &HostPolicy) {
        let label = policy.source.label();
        let result = match (&s.security.tls, &policy.requirement) {
            (None, _) => "plain",
            (Some(_), Requirement::Verify | Requirement::Dane(_)) => "verified",
            (Some(_), _) => "tls",
        };
        self.tls_counters.add(label, result);
        tracing::debug!(queue_id = job.queue_id, host = %s.host, addr = %s.addr, tls = %s.tls_summary(), policy = label, "session opened");
        let failure = match &policy.source {
            Source::MtaStsTesting(p, _) => tls_policy::testing_failure(p, &s.host, &s.security),
            _ if s.security.tls.is_none() && s.security.starttls_tried => {
                Some(("starttls-not-supported", format!("{}: no TLS", s.host)))
            }
            _ if s.security.tls.is_none() => return,
            _ => None,
        };
        let r = report_ref(&policy.source, &s.host);
        self.report_session(job.domain, &r, &s.host, Some(s.addr.ip()), s.local, failure);
    }

    fn report_session(
        &self,
        domain: &str,
        policy: &tlsrpt::PolicyRef,
        mx: &str,
        receiving_ip: Option<std::net::IpAddr>,
        sending_ip: Option<std::net::IpAddr>,
        failure: Option<(&'static str, String)>,
    ) {
        self.reports.record(&tlsrpt::SessionResult {
            domain,
            policy: policy.clone(),
            mx,
            receiving_ip,
            sending_ip,
            failure,
        });
    }
}

/// Where an attempt stands after the hosts tried so far.
struct Attempt {
    last: (String, String),
    permanent_refusals: usize,
    tried: usize,
}

/// The TLS-RPT policy of a domain's MTA-STS view.
fn sts_ref(sts: &mta_sts::StsView) -> tlsrpt::PolicyRef {
    match &sts.policy {
        Some(p) => tlsrpt::PolicyRef {
            policy_type: "sts".into(),
            policy_string: p.lines.clone(),
            mx_host: p.mx.clone(),
        },
        None => tlsrpt::PolicyRef::none(),
    }
}

/// The TLS-RPT policy a session to `host` ran under.
fn report_ref(source: &Source, host: &str) -> tlsrpt::PolicyRef {
    let tlsa = |strings: Vec<String>| tlsrpt::PolicyRef {
        policy_type: "tlsa".into(),
        policy_string: strings,
        mx_host: vec![host.to_string()],
    };
    match source {
        Source::Dane(set) => tlsa(set.strings()),
        Source::DaneUnusable(r) => tlsa(r.clone()),
        Source::MtaSts(p) | Source::MtaStsTesting(p, _) => tlsrpt::PolicyRef {
            policy_type: "sts".into(),
            policy_string: p.lines.clone(),
            mx_host: p.mx.clone(),
        },
        Source::Config(_) => tlsrpt::PolicyRef::none(),
    }
}
