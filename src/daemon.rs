//! `tenso serve`: wires the services together, handles signals, drains on exit.
//!
//! Order at start: check the data dir (owned by us, not world-writable; modes of our
//! subtrees tightened), lock and open the table (a second daemon stops here with a
//! clear message), recover the spool, start the queue, bind the admin socket and the
//! SMTP listeners, then announce the bound addresses in `DATA_DIR/tenso.listen`.

use crate::config::Config;
use crate::control::server as control_server;
use crate::disk::{self, Modes};
use crate::spool::Spool;
use crate::table::{Table, TableError};
use anyhow::{Context, bail};
use std::sync::Arc;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// Opens the table on the configured store (`[table] backend`); the node's sled
/// database in `DATA_DIR/table` is opened either way (node-local state, the lock).
pub fn open_table(cfg: &Config) -> Result<Table, TableError> {
    let sep = cfg.subaddress_separator.chars().next();
    let (dir, cache, depth) = (
        cfg.table_dir(),
        cfg.table.cache_bytes,
        cfg.delivery.max_alias_depth,
    );
    let t = match cfg.table.backend {
        crate::config::TableBackend::Sled => Table::open(&dir, cache, sep, depth)?,
        crate::config::TableBackend::Postgres => {
            Table::open_postgres(&dir, cache, sep, depth, &cfg.table)?
        }
    };
    // sled creates its files with the process umask (077 in the binary); a library
    // caller or an older install may have left them wider: tighten, never widen.
    match disk::tighten(&cfg.table_dir(), disk::PRIVATE) {
        Ok(0) => {}
        Ok(n) => {
            tracing::warn!(fixed = n, dir = %cfg.table_dir().display(), "table files were readable by others: modes tightened")
        }
        Err(e) => tracing::warn!(error = %e, "cannot check the modes of the table files"),
    }
    Ok(t)
}

/// The data dir's own modes: owner-only, or 0710 in the pool's group so an IMAP
/// server of that group can reach `pool/` (and list nothing else).
fn top_modes(cfg: &Config) -> Modes {
    match cfg.pool_modes().gid {
        Some(g) => Modes {
            dir: 0o710,
            file: 0o600,
            gid: Some(g),
        },
        None => disk::PRIVATE,
    }
}

/// Checks the data dir before anything is opened, creating it (0700) when missing:
/// it must belong to the user tenso runs as and must not be world-writable (refused);
/// world-readable is warned about. Our subtrees (queue, quarantine, table, tls,
/// pool) get their modes tightened, whatever a loose umask once made of them.
pub fn prepare_data_dir(cfg: &Config) -> anyhow::Result<()> {
    let dir = &cfg.data_dir;
    let top = top_modes(cfg);
    if !dir.exists() {
        disk::create_dir_durable(dir, top)
            .with_context(|| format!("creating data dir {}", dir.display()))?;
    }
    let (uid, _, mode) = disk::owner_and_mode(dir)
        .with_context(|| format!("checking data dir {}", dir.display()))?;
    // SAFETY: geteuid(2) cannot fail.
    let me = unsafe { libc::geteuid() };
    if uid != me {
        bail!(
            "data dir {} belongs to uid {uid}, but tenso runs as uid {me}: run tenso as the \
             data dir's owner (files another user writes may be unwritable for the daemon)",
            dir.display()
        );
    }
    if mode & 0o002 != 0 {
        bail!(
            "refusing to use data dir {}: it is world-writable (mode {mode:04o}); \
             `chmod 700` it",
            dir.display()
        );
    }
    if top.gid.is_some() {
        disk::set_dir_mode(dir, top).with_context(|| format!("chmod {}", dir.display()))?;
    } else if mode & 0o077 != 0 {
        tracing::warn!(dir = %dir.display(), mode = %format!("{mode:04o}"), "data dir is accessible to other users; tenso keeps everything below it owner-only, but `chmod 700` it");
    }
    let private = ["queue", "quarantine", "table", "tls"].map(|s| (s, disk::PRIVATE));
    for (sub, m) in private.into_iter().chain([("pool", cfg.pool_modes())]) {
        let path = dir.join(sub);
        let fixed = if m.gid.is_some() {
            disk::apply(&path, m)
        } else {
            disk::tighten(&path, m)
        }
        .with_context(|| format!("fixing modes under {}", path.display()))?;
        if fixed > 0 {
            tracing::warn!(dir = %path.display(), fixed, "file modes were wider than tenso's: tightened");
        }
    }
    Ok(())
}

pub fn open_spool(cfg: &Config) -> anyhow::Result<Spool> {
    Spool::open(&cfg.queue_dir(), &cfg.data_dir.join("quarantine")).context("opening the spool")
}

/// Messages held whole (signing, the spam gate, submission) are buffers of up to
/// `max_message_size`. glibc's dynamic mmap threshold grows past such sizes after the
/// first is freed; from then on they come from the arena of the thread that allocated
/// them and stay there after free, one arena per thread (the blocking pool's too):
/// `benches/memory.sh` with signing peaked at 311 MiB. A fixed threshold maps every
/// buffer of 1 MiB or more and unmaps it on free.
fn large_buffers_return_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; no memory is touched.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    large_buffers_return_to_the_system();
    let cfg = Arc::new(cfg);
    prepare_data_dir(&cfg)?;
    let table = match open_table(&cfg) {
        Ok(t) => t,
        Err(TableError::Locked(_)) => bail!(
            "another tenso is already running on data dir {} (its table is locked); stop it first",
            cfg.data_dir.display()
        ),
        Err(e) => return Err(e).context("opening the forwarding table"),
    };
    if let Some(pg) = table.postgres() {
        let pg = pg.clone();
        match tokio::task::spawn_blocking(move || pg.migrate()).await? {
            Ok(v) => tracing::info!(schema = v, "postgres table ready"),
            // Not fatal: the change feed keeps trying (and migrates when it gets
            // through); meanwhile RCPT answers 451.
            Err(e) => tracing::warn!(error = %e, "postgres table not reachable at start"),
        }
    }
    let spool = open_spool(&cfg)?;
    let recovered = spool.recover().context("recovering the spool")?;
    tracing::info!(
        queued = recovered.envelopes.len(),
        partial_removed = recovered.partial_removed,
        quarantined = recovered.quarantined,
        env_fallbacks = recovered.env_fallbacks,
        aliases = table.count(),
        "spool recovered"
    );
    let resolver = crate::dns::build(&cfg).map_err(anyhow::Error::msg)?;
    let delivery = crate::delivery::Delivery::new(cfg.clone(), resolver.clone(), &table)
        .map_err(anyhow::Error::msg)?;
    let signer = crate::signing::Signer::from_config(&cfg.dkim)
        .map_err(anyhow::Error::msg)?
        .map(Arc::new);
    let auth = Arc::new(
        crate::policy::Auth::new(cfg.clone(), resolver.clone()).map_err(anyhow::Error::msg)?,
    );
    let bounce = Arc::new(crate::bounce::Bounce::new(
        cfg.clone(),
        table.clone(),
        spool.clone(),
        signer.clone(),
    ));
    let worker = Arc::new(crate::queue::Worker::new(
        cfg.clone(),
        spool.clone(),
        delivery.clone(),
        bounce.clone(),
    ));
    let queue = crate::queue::start(worker, recovered.envelopes);
    let inbound = crate::inbound::Inbound::new(
        cfg.clone(),
        crate::inbound::Parts {
            table: table.clone(),
            spool: spool.clone(),
            queue: queue.clone(),
            bounce: bounce.clone(),
            auth,
            signer: signer.clone(),
            tls: crate::inbound::tls::acceptor(&cfg).map_err(anyhow::Error::msg)?,
            submission: crate::inbound::submission::Service::new(&cfg, &table)
                .map_err(anyhow::Error::msg)?,
        },
    );

    let admin = control_server::bind(&cfg.socket_path())
        .with_context(|| format!("binding admin socket {}", cfg.socket_path().display()))?;
    let status = status_fn(&inbound, &queue, &bounce, &spool, &delivery, &table);
    crate::metrics::metrics().set_status(status.clone());
    let server = Arc::new(control_server::Server {
        cfg: cfg.clone(),
        table: table.clone(),
        spool: spool.clone(),
        queue: queue.clone(),
        pool: bounce.pool.clone(),
        status,
    });
    tokio::spawn(control_server::run(server, admin));
    let metrics_addr = start_metrics(&cfg, &table, &queue).await?;

    spawn_pool_housekeeping(&cfg, &bounce, &queue);
    tokio::spawn(tls_housekeeping(
        delivery.clone(),
        table.clone(),
        resolver.clone(),
        spool.clone(),
        signer.clone(),
        queue.clone(),
    ));

    let listeners = crate::inbound::bind(&cfg).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut announce = String::new();
    for (l, addr) in listeners {
        tracing::info!(%addr, hostname = %cfg.hostname, "listening");
        announce.push_str(&format!("{addr}\n"));
        tokio::spawn(crate::inbound::run(inbound.clone(), l, stop_rx.clone()));
    }
    // Submission after port 25 in `tenso.listen`: 587-style, then 465-style.
    for (l, addr, implicit_tls) in crate::inbound::submission::bind(&cfg).await? {
        tracing::info!(%addr, implicit_tls, "listening for submission");
        announce.push_str(&format!("{addr}\n"));
        tokio::spawn(crate::inbound::run_submission(
            inbound.clone(),
            l,
            implicit_tls,
            stop_rx.clone(),
        ));
    }
    crate::metrics::metrics().set_listening(true);
    if let Some(addr) = metrics_addr {
        announce_file(&cfg, "tenso.metrics", &format!("{addr}\n"))?;
    }
    let listen_file = cfg.data_dir.join("tenso.listen");
    announce_file(&cfg, "tenso.listen", &announce)?;

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    let _ = stop_tx.send(true);
    // Load balancers see 503 from now on.
    crate::metrics::metrics().set_listening(false);
    // Sessions in the middle of DATA have not been answered 250: dropping them loses
    // nothing. Give replies in flight a moment, then persist the table and leave.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    table.flush()?;
    let _ = std::fs::remove_file(&listen_file);
    let _ = std::fs::remove_file(cfg.data_dir.join("tenso.metrics"));
    let _ = std::fs::remove_file(cfg.socket_path());
    tracing::info!("stopped");
    Ok(())
}

/// `tenso status` and the JSON behind `/metrics`: every service's counters and map sizes.
fn status_fn(
    inbound: &Arc<crate::inbound::Inbound>,
    queue: &crate::queue::QueueHandle,
    bounce: &Arc<crate::bounce::Bounce>,
    spool: &Spool,
    delivery: &Arc<crate::delivery::Delivery>,
    table: &Table,
) -> crate::metrics::StatusFn {
    let (inbound, queue, bounce) = (inbound.clone(), queue.clone(), bounce.clone());
    let (spool, delivery, table) = (spool.clone(), delivery.clone(), table.clone());
    Arc::new(move || {
        serde_json::json!({
            "inbound": inbound.snapshot(),
            "queue": queue.snapshot(),
            "bounce": bounce.counters.snapshot(),
            "tls": delivery.tls_counters.snapshot(),
            "table": table.status().1,
            "pool": {
                "stored": bounce.pool.stored.load(std::sync::atomic::Ordering::Relaxed),
                "expired": bounce.pool.expired.load(std::sync::atomic::Ordering::Relaxed),
            },
            "spool": {
                "env_fallbacks": spool.env_fallbacks(),
                "spares": spool.spares(),
            },
            "maps": {
                "limiter_clients": inbound.limiter.tracked(),
                "submission_logins": inbound.submission.as_ref().map(|s| s.tracked_logins()),
                "delivery": delivery.map_sizes(),
            },
        })
    })
}

/// The bounce side's periodic jobs: the correlation log's expiry (it is bounded in
/// time), and pool digests and the Maildir export when enabled.
fn spawn_pool_housekeeping(
    cfg: &Arc<Config>,
    bounce: &Arc<crate::bounce::Bounce>,
    queue: &crate::queue::QueueHandle,
) {
    let hk_bounce = bounce.clone();
    tokio::spawn(async move {
        loop {
            let b = hk_bounce.clone();
            let n = tokio::task::spawn_blocking(move || b.expire_log())
                .await
                .unwrap_or(0);
            if n > 0 {
                tracing::info!(expired = n, "correlation log records expired");
            }
            tokio::time::sleep(std::time::Duration::from_secs(600)).await;
        }
    });
    if let Some(every) = cfg.pool.digest {
        let b = bounce.clone();
        let q = queue.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                for (e, body) in b.digests().await {
                    q.enqueue(e, Some(body));
                }
            }
        });
    }

    if let (Some(every), true) = (cfg.pool.maildir_export, bounce.pool.is_shared()) {
        tokio::spawn(export_pool(bounce.pool.clone(), every));
    }
}

/// The fleet's pool into this node's Maildir, for an IMAP server (`[pool]
/// maildir_export`): one pass every `every`, trouble logged and tried again.
async fn export_pool(pool: Arc<crate::bounce::pool::Pool>, every: std::time::Duration) {
    loop {
        let p = pool.clone();
        match tokio::task::spawn_blocking(move || p.export_maildir()).await {
            Ok(Ok(r)) if r != Default::default() => tracing::info!(
                written = r.written,
                removed = r.removed_files,
                deleted_by_reader = r.deleted_by_reader,
                "pool exported to the Maildir"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "pool export to the Maildir failed"),
            Err(e) => tracing::warn!(error = %e, "pool export task failed"),
        }
        tokio::time::sleep(every).await;
    }
}

/// `[metrics] listen`: binds the HTTP endpoint and starts the table's reachability
/// probe; returns the bound address (None when off).
async fn start_metrics(
    cfg: &Config,
    table: &Table,
    queue: &crate::queue::QueueHandle,
) -> anyhow::Result<Option<std::net::SocketAddr>> {
    let Some(addr) = cfg.metrics.listen else {
        return Ok(None);
    };
    let l = crate::control::http::bind(addr).await?;
    let bound = l.local_addr()?;
    tracing::info!(%bound, "metrics: serving /metrics and /health");
    tokio::spawn(crate::control::http::run(l, queue.clone()));
    tokio::spawn(crate::table::probe::run(
        table.clone(),
        cfg.metrics.table_probe,
        cfg.metrics.table_probe_deadline,
    ));
    Ok(Some(bound))
}

/// Writes `DATA_DIR/name` (owner-only) through a temp file and a rename, so a reader
/// never sees half of it.
fn announce_file(cfg: &Config, name: &str, text: &str) -> anyhow::Result<()> {
    let path = cfg.data_dir.join(name);
    let tmp = cfg.data_dir.join(format!("{name}.tmp"));
    disk::create_file(&tmp, disk::PRIVATE, true)
        .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
        .and_then(|_| std::fs::rename(&tmp, &path))
        .with_context(|| format!("writing {}", path.display()))
}

/// Hourly: the TLS reports of past days go out (RFC 8460 §5.1: daily aggregates),
/// and expired MTA-STS policies leave the cache.
async fn tls_housekeeping(
    delivery: Arc<crate::delivery::Delivery>,
    table: Table,
    resolver: crate::dns::Resolver,
    spool: Spool,
    signer: Option<Arc<crate::signing::Signer>>,
    queue: crate::queue::QueueHandle,
) {
    loop {
        if delivery.reports.enabled() {
            let queued = delivery
                .reports
                .send_due(&resolver, &spool, signer.as_deref(), false)
                .await;
            for (e, b) in queued {
                queue.enqueue(e, Some(b));
            }
        }
        let t = table.clone();
        let expired = tokio::task::spawn_blocking(move || {
            t.tls()
                .and_then(|s| s.sts_expire(crate::time::unix_now()))
                .unwrap_or(0)
        })
        .await
        .unwrap_or(0);
        if expired > 0 {
            tracing::info!(expired, "expired MTA-STS policies dropped");
        }
        tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
    }
}
