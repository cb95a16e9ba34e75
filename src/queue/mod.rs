//! The queue manager: keeps every committed message, knows when each is due, runs
//! delivery attempts, applies their outcomes, retries, expires, and asks the bounce
//! step for DSNs.
//!
//! One task owns the schedule (a `BTreeSet<(due, id)>`, as in mini-redis); attempts
//! run as separate tasks under a global concurrency limit and report back. Every
//! outcome is written to the spool before the message is scheduled again, and a
//! DSN is committed before the failure it reports is recorded, so a crash can
//! repeat an attempt or a DSN but never lose one. At start the spool's committed
//! envelopes are loaded and resume exactly where they stopped.

use crate::bounce::{Bounce, dsn::Action};
use crate::config::Config;
use crate::delivery::outgoing::{Body, FileSpan, Outgoing};
use crate::delivery::{Delivery, Job, Outcome};
use crate::rate::Pacer;
use crate::smtp::header::header_section;
use crate::spool::{Envelope, MessageKind, Rcpt, RcptState, Spool, SpoolError};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{Semaphore, mpsc, oneshot};

type Reply = oneshot::Sender<Result<(), String>>;

/// Queued messages larger than this are sent from their spool file in chunks, never
/// read whole into memory (issue 17: memory must not grow with message size).
const STREAM_AT: u64 = 256 * 1024;

/// A queued message for one attempt: `head` for the header work (the whole message
/// when small, its start when large) and `out`, what is sent.
struct Loaded {
    head: Arc<Vec<u8>>,
    out: Body,
}

/// Message bodies kept in memory between acceptance and the first attempt. Beyond
/// this, queued messages are read back from the spool, so a backlog costs disk reads,
/// not memory.
const BODY_CACHE_BYTES: usize = 64 * 1024 * 1024;

pub enum Cmd {
    Enqueue(Envelope, Option<Arc<Vec<u8>>>),
    Flush(Option<String>),
    Hold(String, bool, Reply),
    Remove(String, Reply),
    Stats(oneshot::Sender<QueueStats>),
}

/// The queue's size for `/metrics`.
#[derive(Debug, Clone, Copy)]
pub struct QueueStats {
    pub messages: usize,
    /// Unix seconds of the oldest queued message's arrival; None when empty.
    pub oldest_arrival: Option<i64>,
}

#[derive(Default, Debug)]
pub struct Counters {
    pub delivered: AtomicU64,
    pub deferred: AtomicU64,
    pub failed: AtomicU64,
    pub attempts: AtomicU64,
    pub paced: AtomicU64,
    /// Attempts that could not read the queued message (each counts toward
    /// `max_lifetime`).
    pub read_errors: AtomicU64,
}

#[derive(Clone)]
pub struct QueueHandle {
    tx: mpsc::UnboundedSender<Cmd>,
    pub counters: Arc<Counters>,
}

impl QueueHandle {
    pub fn enqueue(&self, env: Envelope, body: Option<Arc<Vec<u8>>>) {
        let _ = self.tx.send(Cmd::Enqueue(env, body));
    }

    pub fn flush(&self, id: Option<String>) {
        let _ = self.tx.send(Cmd::Flush(id));
    }

    async fn ask(&self, make: impl FnOnce(Reply) -> Cmd) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .map_err(|_| "queue manager stopped".to_string())?;
        rx.await.map_err(|_| "queue manager stopped".to_string())?
    }

    pub async fn remove(&self, id: &str) -> Result<(), String> {
        self.ask(|r| Cmd::Remove(id.to_string(), r)).await
    }

    pub async fn set_held(&self, id: &str, held: bool) -> Result<(), String> {
        self.ask(|r| Cmd::Hold(id.to_string(), held, r)).await
    }

    /// Size and oldest arrival, from the manager (one pass over its entries).
    pub async fn stats(&self) -> Option<QueueStats> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Cmd::Stats(tx)).ok()?;
        rx.await.ok()
    }

    pub fn snapshot(&self) -> serde_json::Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let c = &self.counters;
        serde_json::json!({
            "delivered": g(&c.delivered),
            "deferred": g(&c.deferred),
            "failed": g(&c.failed),
            "attempts": g(&c.attempts),
            "paced": g(&c.paced),
            "read_errors": g(&c.read_errors),
        })
    }
}

struct Entry {
    env: Envelope,
    body: Option<Arc<Vec<u8>>>,
    running: bool,
    due: Option<i64>,
    /// A flush arrived while an attempt was running: apply it when it ends.
    flush: bool,
}

fn flush_entry(e: &mut Entry) {
    if e.running {
        e.flush = true;
        return;
    }
    let t = now_ms();
    for r in e.env.rcpts.iter_mut().filter(|r| r.is_pending()) {
        r.next_attempt = r.next_attempt.min(t);
    }
}

/// What an attempt needs, shared by all attempts.
pub struct Worker {
    pub cfg: Arc<Config>,
    pub spool: Spool,
    pub delivery: Arc<Delivery>,
    pub bounce: Arc<Bounce>,
    /// Outbound pacing per destination domain (`domain_rate_per_minute`).
    pub domain_pacer: Option<Pacer>,
    /// Outbound pacing per alias (`alias_rate_per_hour`): a mail-bombed alias waits.
    pub alias_pacer: Option<Pacer>,
}

impl Worker {
    pub fn new(
        cfg: Arc<Config>,
        spool: Spool,
        delivery: Arc<Delivery>,
        bounce: Arc<Bounce>,
    ) -> Worker {
        let l = &cfg.limits;
        Worker {
            domain_pacer: Pacer::new(
                l.domain_rate_per_minute,
                std::time::Duration::from_secs(60),
                l.tracked_clients,
            ),
            alias_pacer: Pacer::new(
                l.alias_rate_per_hour,
                std::time::Duration::from_secs(3600),
                l.tracked_clients,
            ),
            cfg,
            spool,
            delivery,
            bounce,
        }
    }

    /// Takes pacing slots for one outgoing transaction; Err(wait) when it must wait.
    fn pace(
        &self,
        kind: MessageKind,
        trace: &str,
        domain: &str,
    ) -> Result<(), std::time::Duration> {
        if kind == MessageKind::Relay
            && let Some(p) = &self.alias_pacer
        {
            p.take(trace)?;
        }
        if let Some(p) = &self.domain_pacer
            && let Err(wait) = p.take(domain)
        {
            // Not forwarded now: it must not use up the alias's allowance.
            if kind == MessageKind::Relay
                && let Some(a) = &self.alias_pacer
            {
                a.refund(trace);
            }
            return Err(wait);
        }
        Ok(())
    }
}

/// `tenso_delivery_seconds`: from acceptance (the queue id's microseconds, else the
/// envelope's arrival second) to the next hop's 250 (`now_ms`).
fn observe_delivery(accepted_us: i64, now_ms: i64) {
    let secs = (now_ms * 1000 - accepted_us).max(0) as f64 / 1e6;
    crate::metrics::metrics().delivery.observe(secs);
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Starts the queue manager with the messages recovered from the spool.
pub fn start(worker: Arc<Worker>, initial: Vec<Envelope>) -> QueueHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let handle = QueueHandle {
        tx,
        counters: Arc::new(Counters::default()),
    };
    let h = handle.clone();
    tokio::spawn(run(worker, h, rx, initial));
    handle
}

/// Runs one attempt in a task of its own: if it panics, the message is not left
/// "running" forever — it is rescheduled from the state it had, a minute later, and
/// every other attempt goes on (nothing shared is poisoned: the locks are
/// parking_lot's, which a panic releases).
async fn attempt_guarded(
    worker: Arc<Worker>,
    env: Envelope,
    body: Option<Arc<Vec<u8>>>,
    handle: QueueHandle,
) -> Option<Envelope> {
    let before = env.clone();
    let task = tokio::spawn(async move { worker.attempt(env, body, &handle).await });
    match task.await {
        Ok(res) => res,
        Err(e) => {
            tracing::error!(queue_id = %before.id, error = %e, "delivery attempt panicked; retrying in a minute");
            let mut env = before;
            let t = now_ms() + 60_000;
            for r in env.rcpts.iter_mut().filter(|r| r.needs_work()) {
                r.next_attempt = r.next_attempt.max(t);
            }
            Some(env)
        }
    }
}

fn due_of(env: &Envelope) -> Option<i64> {
    if env.held {
        return None;
    }
    env.next_due()
}

async fn run(
    worker: Arc<Worker>,
    handle: QueueHandle,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    initial: Vec<Envelope>,
) {
    let mut entries: HashMap<String, Entry> = HashMap::new();
    let mut timers: BTreeSet<(i64, String)> = BTreeSet::new();
    let permits = Arc::new(Semaphore::new(worker.cfg.delivery.max_concurrency.max(1)));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(String, Option<Envelope>)>();
    // Bytes of message bodies held in `entries` (see BODY_CACHE_BYTES).
    let mut cached: usize = 0;

    let schedule =
        |entries: &mut HashMap<String, Entry>, timers: &mut BTreeSet<(i64, String)>, id: &str| {
            if let Some(e) = entries.get_mut(id) {
                e.due = due_of(&e.env);
                if let Some(d) = e.due {
                    timers.insert((d, id.to_string()));
                }
            }
        };
    for env in initial {
        let id = env.id.clone();
        entries.insert(
            id.clone(),
            Entry {
                env,
                body: None,
                running: false,
                due: None,
                flush: false,
            },
        );
        schedule(&mut entries, &mut timers, &id);
    }

    loop {
        let now = now_ms();
        while let Some((due, id)) = timers.first().cloned() {
            if due > now {
                break;
            }
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                break;
            };
            timers.pop_first();
            let Some(e) = entries.get_mut(&id) else {
                continue;
            };
            if e.running || e.due != Some(due) {
                continue;
            }
            e.running = true;
            e.due = None;
            let env = e.env.clone();
            let body = e.body.take();
            cached -= body.as_ref().map_or(0, |b| b.len());
            let worker = worker.clone();
            let handle = handle.clone();
            let done = done_tx.clone();
            tokio::spawn(async move {
                let id = env.id.clone();
                let res = attempt_guarded(worker, env, body, handle).await;
                drop(permit);
                let _ = done.send((id, res));
            });
        }
        let next = timers.first().map(|(d, _)| *d);
        let can_launch = permits.available_permits() > 0;
        let sleep_ms = match next {
            Some(d) if can_launch => (d - now_ms()).clamp(0, 3_600_000),
            _ => 3_600_000,
        };
        tokio::select! {
            cmd = rx.recv() => {
                let Some(cmd) = cmd else { break };
                match cmd {
                    Cmd::Enqueue(env, body) => {
                        let id = env.id.clone();
                        // Keep fresh bodies in memory for the first attempt, up to a
                        // bound: a backlog is read back from the spool instead. A large
                        // one is always sent from its spool file, never held here.
                        let body = body.filter(|b| {
                            b.len() as u64 <= STREAM_AT && cached + b.len() <= BODY_CACHE_BYTES
                        });
                        cached += body.as_ref().map_or(0, |b| b.len());
                        entries.insert(id.clone(), Entry { env, body, running: false, due: None, flush: false });
                        schedule(&mut entries, &mut timers, &id);
                    }
                    Cmd::Flush(target) => {
                        worker.delivery.forget_dead_hosts();
                        let ids: Vec<String> = match target {
                            Some(id) => vec![id],
                            None => entries.keys().cloned().collect(),
                        };
                        for id in ids {
                            if let Some(e) = entries.get_mut(&id) {
                                flush_entry(e);
                                if !e.running {
                                    schedule(&mut entries, &mut timers, &id);
                                }
                            }
                        }
                    }
                    Cmd::Hold(id, held, reply) => {
                        let res = match entries.get_mut(&id) {
                            None => Err(format!("no such message in the queue: {id}")),
                            Some(e) if e.running => Err(format!("{id} is being delivered right now; try again")),
                            Some(e) => {
                                e.env.held = held;
                                match worker.spool.update(&e.env).await {
                                    Ok(()) => Ok(()),
                                    Err(err) => Err(err.to_string()),
                                }
                            }
                        };
                        if res.is_ok() {
                            schedule(&mut entries, &mut timers, &id);
                        }
                        let _ = reply.send(res);
                    }
                    Cmd::Remove(id, reply) => {
                        let res = match entries.get(&id) {
                            None => Err(format!("no such message in the queue: {id}")),
                            Some(e) if e.running => Err(format!("{id} is being delivered right now; try again")),
                            Some(_) => worker.spool.remove(&id).await.map_err(|e| e.to_string()),
                        };
                        if res.is_ok()
                            && let Some(e) = entries.remove(&id)
                        {
                            cached -= e.body.map_or(0, |b| b.len());
                            tracing::info!(queue_id = %id, "removed by admin");
                        }
                        let _ = reply.send(res);
                    }
                    Cmd::Stats(reply) => {
                        let _ = reply.send(QueueStats {
                            messages: entries.len(),
                            oldest_arrival: entries.values().map(|e| e.env.arrival).min(),
                        });
                    }
                }
            }
            done = done_rx.recv() => {
                let Some((id, res)) = done else { continue };
                match res {
                    None => { entries.remove(&id); }
                    Some(env) => {
                        if let Some(e) = entries.get_mut(&id) {
                            e.env = env;
                            e.running = false;
                            if std::mem::take(&mut e.flush) {
                                flush_entry(e);
                            }
                            schedule(&mut entries, &mut timers, &id);
                        }
                    }
                }
            }
            _ = tokio::time::sleep(std::time::Duration::from_millis(sleep_ms as u64)) => {}
        }
    }
}

/// One outcome of an attempt: the recipient's index, what happened, the host.
/// (recipient, outcome, remote MTA, TLS of the session)
type Result1 = (usize, Outcome, Option<String>, Option<String>);

impl Worker {
    fn retry_delay_ms(&self, attempts: u32) -> i64 {
        let r = &self.cfg.queue.retry;
        let i = (attempts.max(1) as usize - 1).min(r.len() - 1);
        r[i].as_millis() as i64
    }

    /// One attempt over every due recipient of `env`. Returns the updated envelope,
    /// or None when the message is finished and gone from the spool.
    ///
    /// A message whose body cannot be read is not retried forever: each failed read
    /// counts as a deferred attempt of its due recipients, so `max_lifetime` ends it
    /// with the usual DSN (without returned headers) through the alias's policy.
    async fn attempt(
        &self,
        mut env: Envelope,
        body: Option<Arc<Vec<u8>>>,
        handle: &QueueHandle,
    ) -> Option<Envelope> {
        handle.counters.attempts.fetch_add(1, Ordering::Relaxed);
        let now = now_ms();
        let due: Vec<usize> = (0..env.rcpts.len())
            .filter(|&i| env.rcpts[i].is_pending() && env.rcpts[i].next_attempt <= now)
            .collect();
        let body = match body {
            Some(b) => Ok(Loaded {
                head: b.clone(),
                out: Body::Memory(b),
            }),
            None => self.load(&env).await,
        };
        let (body, results) = match body {
            Ok(body) => {
                let mut results = self.deliver_to_pools(&env, &body, &due).await;
                results.extend(self.deliver_remote(&mut env, &body, &due, handle).await);
                (body.head, results)
            }
            Err(e) => {
                handle.counters.read_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(queue_id = %env.id, error = %e, "cannot read the queued message; counted as a deferred attempt");
                let why = format!("cannot read the queued message: {e}");
                let results = due
                    .iter()
                    .map(|&i| {
                        (
                            i,
                            Outcome::Deferred("4.3.0".into(), why.clone()),
                            None,
                            None,
                        )
                    })
                    .collect();
                (Arc::new(Vec::new()), results)
            }
        };
        let failed = self.apply_outcomes(&mut env, &body, results, handle).await;
        self.report(&mut env, &body, failed, handle).await;
        self.finish(env).await
    }

    /// A queued message not in memory: read whole when small; when large, only its
    /// start (for the header work), and sent from its spool file in chunks.
    async fn load(&self, env: &Envelope) -> Result<Loaded, SpoolError> {
        if env.size <= STREAM_AT {
            let b = Arc::new(self.spool.read_body_async(&env.id).await?);
            return Ok(Loaded {
                head: b.clone(),
                out: Body::Memory(b),
            });
        }
        let (spool, id) = (self.spool.clone(), env.id.clone());
        let (path, offset, len, head) =
            tokio::task::spawn_blocking(move || spool.body_span(&id, STREAM_AT as usize))
                .await
                .map_err(|_| SpoolError::Closed)??;
        Ok(Loaded {
            head: Arc::new(head),
            out: Body::File(Arc::new(FileSpan {
                path,
                offset,
                len,
                eight_bit: env.eight_bit,
            })),
        })
    }

    /// Local pool targets (postmaster without a forward address).
    async fn deliver_to_pools(&self, env: &Envelope, body: &Loaded, due: &[usize]) -> Vec<Result1> {
        let mut results = Vec::new();
        for &i in due {
            if let Some(pool) = env.rcpts[i].pool.clone() {
                // A pool keeps the whole message: a large one is read back for it.
                let whole = match &body.out {
                    Body::Memory(b) => Ok(b.to_vec()),
                    Body::File(_) => self.spool.read_body_async(&env.id).await,
                };
                let stored = match whole {
                    Ok(m) => self.bounce.to_pool(&pool, m).await,
                    Err(e) => Err(std::io::Error::other(e.to_string())),
                };
                let o = match stored {
                    Ok(id) => Outcome::Delivered(format!("stored in local pool {pool} as {id}")),
                    Err(e) => Outcome::Deferred("4.3.0".into(), format!("pool write failed: {e}")),
                };
                results.push((i, o, None, None));
            }
        }
        results
    }

    /// Remote recipients: one transaction per (reverse-path, alias, destination
    /// domain), run in parallel. Groups over a pacing limit wait in the queue (no
    /// attempt counted, nothing lost) and give no outcome.
    async fn deliver_remote(
        &self,
        env: &mut Envelope,
        body: &Loaded,
        due: &[usize],
        handle: &QueueHandle,
    ) -> Vec<Result1> {
        let mut groups: BTreeMap<(String, String, String), Vec<usize>> = BTreeMap::new();
        for &i in due {
            let r = &env.rcpts[i];
            if r.pool.is_none() {
                groups
                    .entry((
                        r.mail_from.clone(),
                        r.trace_id(),
                        r.dest_domain().to_lowercase(),
                    ))
                    .or_default()
                    .push(i);
            }
        }
        let headers_ascii = header_section(&body.head).is_ascii();
        let mut set = tokio::task::JoinSet::new();
        let mut paced: Vec<(Vec<usize>, std::time::Duration)> = Vec::new();
        for ((mail_from, trace, domain), idx) in groups {
            if let Err(wait) = self.pace(env.kind, &trace, &domain) {
                paced.push((idx, wait));
                continue;
            }
            let rcpts: Vec<String> = idx.iter().map(|&i| env.rcpts[i].dest.clone()).collect();
            let needs_smtputf8 = !mail_from.is_ascii()
                || rcpts.iter().any(|r| !r.is_ascii())
                || (env.smtputf8 && !headers_ascii);
            // A copy made for no alias (a 1b DSN to a sender) carries no Delivered-To;
            // a trace from an old envelope is never allowed to break the header.
            let mut head = Vec::new();
            if env.kind != MessageKind::Submission
                && !trace.is_empty()
                && !trace.contains(|c: char| c.is_control())
            {
                head.extend_from_slice(format!("Delivered-To: {trace}\r\n").as_bytes());
            }
            let message = Outgoing {
                head,
                body: body.out.clone(),
            };
            let delivery = self.delivery.clone();
            let id = env.id.clone();
            set.spawn(async move {
                let job = Job {
                    queue_id: &id,
                    domain: &domain,
                    mail_from: &mail_from,
                    rcpts,
                    message: &message,
                    needs_smtputf8,
                    env_id: Some(&id),
                };
                let report = delivery.deliver(&job).await;
                (idx, report)
            });
        }
        let mut results = Vec::new();
        while let Some(res) = set.join_next().await {
            match res {
                Ok((idx, report)) => {
                    for (k, o) in report.outcomes.into_iter().enumerate() {
                        results.push((idx[k], o, report.remote_mta.clone(), report.tls.clone()));
                    }
                }
                Err(e) => tracing::error!(queue_id = %env.id, error = %e, "delivery task failed"),
            }
        }
        for (idx, wait) in paced {
            let t = now_ms() + wait.as_millis() as i64 + 1;
            for i in idx {
                let r = &mut env.rcpts[i];
                r.next_attempt = t;
                tracing::debug!(queue_id = %env.id, to = %r.dest, wait_ms = wait.as_millis() as u64, "paced: waiting for the outbound rate limit");
            }
            handle.counters.paced.fetch_add(1, Ordering::Relaxed);
        }
        results
    }

    /// Records each outcome on its recipient (retry time, or failure when the next
    /// retry would pass `max_lifetime`), records forwarded copies for bounce
    /// correlation, and returns the recipients whose failure must be reported.
    async fn apply_outcomes(
        &self,
        env: &mut Envelope,
        body: &[u8],
        results: Vec<Result1>,
        handle: &QueueHandle,
    ) -> Vec<usize> {
        let message_id = env
            .kind
            .correlated()
            .then(|| {
                crate::smtp::header::field_values(header_section(body), "message-id")
                    .into_iter()
                    .next()
            })
            .flatten();
        let now = now_ms();
        let lifetime_end = env.arrival * 1000 + self.cfg.queue.max_lifetime.as_millis() as i64;
        let mut failed = Vec::new();
        let mut forwarded = Vec::new();
        let accepted_us = Spool::id_micros(&env.id).unwrap_or(env.arrival * 1_000_000);
        for (i, outcome, mta, tls) in results {
            let r = &mut env.rcpts[i];
            r.remote_mta = mta.or(r.remote_mta.take());
            match outcome {
                Outcome::Delivered(reply) => {
                    handle.counters.delivered.fetch_add(1, Ordering::Relaxed);
                    observe_delivery(accepted_us, now);
                    tracing::info!(queue_id = %env.id, from = %r.mail_from, to = %r.dest, relay = ?r.remote_mta, tls = tls.as_deref().unwrap_or("-"), reply = %reply, "delivered");
                    r.state = RcptState::Delivered;
                    r.last = Some(reply);
                    r.status = Some("2.0.0".into());
                    if env.kind.correlated() && r.pool.is_none() {
                        forwarded.push((r.alias.clone(), r.dest.clone()));
                    }
                }
                Outcome::Failed(status, text) => {
                    handle.counters.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(queue_id = %env.id, from = %r.mail_from, to = %r.dest, relay = ?r.remote_mta, %status, reply = %text, "failed permanently");
                    r.state = RcptState::Failed;
                    r.status = Some(status);
                    r.last = Some(text);
                    failed.push(i);
                }
                Outcome::Deferred(status, text) => {
                    r.attempts += 1;
                    let next = now + self.retry_delay_ms(r.attempts);
                    r.status = Some(status.clone());
                    r.last = Some(text.clone());
                    if next > lifetime_end {
                        handle.counters.failed.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(queue_id = %env.id, to = %r.dest, %status, reply = %text, "expired: giving up");
                        r.state = RcptState::Failed;
                        r.status = Some("4.4.7".into());
                        r.last = Some(format!(
                            "message expired after {} attempts; last error: {text}",
                            r.attempts
                        ));
                        failed.push(i);
                    } else {
                        handle.counters.deferred.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(queue_id = %env.id, to = %r.dest, %status, reply = %text, retry_in_s = (next - now) / 1000, "deferred");
                        r.next_attempt = next;
                    }
                }
            }
        }
        self.bounce
            .record_forwards(&env.id, forwarded, message_id)
            .await;
        // Failures recorded at acceptance (loops, unknown local destinations) and
        // failures whose report could not be stored before are reported now.
        for (i, r) in env.rcpts.iter().enumerate() {
            if r.state == RcptState::Failed
                && !r.reported
                && r.next_attempt <= now
                && !failed.contains(&i)
            {
                failed.push(i);
            }
        }
        failed
    }

    /// DSNs for `failed` recipients, and delay DSNs when `delay_warning` is due. A DSN
    /// that cannot be stored leaves its recipients unreported, retried in a minute.
    async fn report(
        &self,
        env: &mut Envelope,
        body: &[u8],
        failed: Vec<usize>,
        handle: &QueueHandle,
    ) {
        let now = now_ms();
        let mut delayed = Vec::new();
        if let Some(dw) = self.cfg.queue.delay_warning
            && now - env.arrival * 1000 >= dw.as_millis() as i64
        {
            for (i, r) in env.rcpts.iter_mut().enumerate() {
                if r.is_pending() && !r.warned && r.attempts > 0 {
                    r.warned = true;
                    delayed.push(i);
                }
            }
        }
        for (list, action) in [(&failed, Action::Failed), (&delayed, Action::Delayed)] {
            if list.is_empty() {
                continue;
            }
            let refs: Vec<&Rcpt> = list.iter().map(|&i| &env.rcpts[i]).collect();
            match self.bounce.report(env, body, &refs, action).await {
                Ok(queued) => {
                    for (e, b) in queued {
                        handle.enqueue(e, Some(b));
                    }
                    if action == Action::Failed {
                        for &i in list.iter() {
                            env.rcpts[i].reported = true;
                        }
                    }
                }
                Err(e) => {
                    // The DSN could not be stored: the recipient stays unreported and
                    // the message stays queued, so the report is retried, not lost.
                    tracing::error!(queue_id = %env.id, error = %e, "cannot store DSN; will retry");
                    for &i in list.iter() {
                        let r = &mut env.rcpts[i];
                        r.next_attempt = now + 60_000;
                        if action == Action::Delayed {
                            r.warned = false;
                        }
                    }
                }
            }
        }
    }

    /// Removes a finished message, or records the new delivery state.
    async fn finish(&self, env: Envelope) -> Option<Envelope> {
        if env.is_done() {
            match self.spool.remove(&env.id).await {
                Ok(()) | Err(SpoolError::NotFound(_)) => {
                    tracing::info!(queue_id = %env.id, "removed");
                }
                Err(e) => {
                    tracing::error!(queue_id = %env.id, error = %e, "cannot remove finished message");
                }
            }
            return None;
        }
        if let Err(e) = self.spool.update(&env).await {
            tracing::error!(queue_id = %env.id, error = %e, "cannot record delivery state");
        }
        Some(env)
    }
}
