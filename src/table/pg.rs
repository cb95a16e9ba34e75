//! The PostgreSQL table store: the table of a fleet, shared by every node.
//!
//! Connections come from a deadpool pool driven by a small runtime of its own (one
//! worker thread), so the table keeps its synchronous interface: a call hands its
//! query to that runtime and waits for the answer with a deadline (`[table]
//! query_timeout`, connection attempts `connect_timeout`). Every failure — refused,
//! timed out, dropped — is a [`TableError::Unavailable`], which RCPT answers with
//! `451 4.3.0`: an unknown answer is never "user unknown".
//!
//! Every statement that writes aliases or domains moves the change counter
//! (`tenso_generation`, by a statement trigger), and tenso's own changes send
//! `NOTIFY tenso_table` in the same transaction, so the other nodes hear of them
//! exactly when they commit; a change made with plain SQL is caught by the counter. [`PgStore::start_feed`] keeps
//! one extra connection LISTENing and feeds the node's [`View`]; it also checks the
//! counter every `view_check` (a missed notification is caught there), and on loss
//! reconnects with backoff (1 s doubling to 30 s), logging each loss and recovery.
//!
//! The schema is tenso's own and versioned (`tenso_schema`); [`PgStore::migrate`]
//! applies what is missing under an advisory lock, so nodes starting together do not
//! race. It runs at `serve` (and on every reconnection of the feed, so a node started
//! before its database catches up) and as `tenso table migrate`.
//!
//! The password never sits in the config: it is read from `[table] password_file`
//! and handed to the driver only; error texts are the driver's, which do not quote it.

use super::fwdlog::{FwdRecord, extend_dests, norm_mid};
use super::store::{Change, KeyedHealth, split_key};
use super::view::View;
use super::{AliasEntry, DestHealth, TableError, decode, encode};
use crate::config::TableConfig;
use deadpool_postgres::{Client, Manager, ManagerConfig, Pool, RecyclingMethod};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio_postgres::NoTls;

/// The NOTIFY channel of table changes.
pub const CHANNEL: &str = "tenso_table";

/// Schema migrations, in order; `tenso_schema.version` counts those applied.
const MIGRATIONS: &[&str] = &[
    // 1: aliases, domains, health, the change counter.
    r#"
    CREATE TABLE aliases (
        domain text COLLATE "C" NOT NULL,
        local text COLLATE "C" NOT NULL,
        entry text NOT NULL,
        PRIMARY KEY (domain, local)
    );
    CREATE INDEX aliases_catch_all ON aliases (domain) WHERE local = '';
    CREATE TABLE domains (domain text COLLATE "C" PRIMARY KEY);
    CREATE TABLE health (
        domain text COLLATE "C" NOT NULL,
        local text COLLATE "C" NOT NULL,
        list text NOT NULL,
        PRIMARY KEY (domain, local)
    );
    CREATE TABLE tenso_generation (id int PRIMARY KEY, generation bigint NOT NULL);
    INSERT INTO tenso_generation VALUES (1, 0);
    "#,
    // 2: the bounce correlation log.
    r#"
    CREATE TABLE fwdlog (
        queue_id text COLLATE "C" NOT NULL,
        alias text COLLATE "C" NOT NULL,
        rec text NOT NULL,
        at bigint NOT NULL,
        PRIMARY KEY (queue_id, alias)
    );
    CREATE INDEX fwdlog_at ON fwdlog (at);
    CREATE TABLE fwdlog_mid (
        mid text COLLATE "C" NOT NULL,
        alias text COLLATE "C" NOT NULL,
        queue_id text COLLATE "C" NOT NULL,
        PRIMARY KEY (mid, alias)
    );
    "#,
    // 3: the shared bounce pool; periodic jobs that one node of the fleet runs.
    r#"
    CREATE TABLE pool (
        id text COLLATE "C" PRIMARY KEY,
        alias text COLLATE "C" NOT NULL,
        time bigint NOT NULL,
        size bigint NOT NULL,
        seen boolean NOT NULL DEFAULT false,
        exported_by text,
        body bytea NOT NULL
    );
    CREATE INDEX pool_alias ON pool (alias, time, id);
    CREATE TABLE tenso_jobs (name text PRIMARY KEY, at bigint NOT NULL);
    "#,
    // 4: the change counter moves with every statement that writes aliases or domains,
    // whoever runs it (an operator's SQL too), so the views' periodic check sees
    // changes that sent no notification. Per statement, not per row: an import of a
    // million rows bumps it once.
    r#"
    CREATE FUNCTION tenso_bump() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE tenso_generation SET generation = generation + 1 WHERE id = 1;
        RETURN NULL;
    END $$;
    CREATE TRIGGER aliases_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON aliases
        FOR EACH STATEMENT EXECUTE FUNCTION tenso_bump();
    CREATE TRIGGER domains_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON domains
        FOR EACH STATEMENT EXECUTE FUNCTION tenso_bump();
    "#,
    // 5: submission logins (an Argon2id hash per alias), gone with their alias.
    r#"
    CREATE TABLE logins (
        domain text COLLATE "C" NOT NULL,
        local text COLLATE "C" NOT NULL,
        login text NOT NULL,
        PRIMARY KEY (domain, local),
        FOREIGN KEY (domain, local) REFERENCES aliases ON DELETE CASCADE
    );
    "#,
];

/// Arbitrary, fixed: the advisory lock that serializes migrations across nodes.
const MIGRATE_LOCK: i64 = 0x7465_6e73_6f5f_6d69;

/// Counters of the store's trouble, for `tenso status`.
#[derive(Default)]
pub struct PgStats {
    /// Operations that failed because the database could not be reached in time.
    pub unavailable: AtomicU64,
    /// Times the change feed was lost.
    pub feed_lost: AtomicU64,
}

#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    rt: Runtime,
    pool: Pool,
    pg: tokio_postgres::Config,
    query_timeout: Duration,
    view_check: Duration,
    stats: PgStats,
}

/// The store's own runtime; shut down in the background when the last handle goes,
/// which may be on an async worker (a blocking shutdown there would panic).
struct Runtime(Option<tokio::runtime::Runtime>);

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Does a postgres error mean "not reachable" rather than a statement's own fault?
/// Both are temporary to the table's callers; only reachability is counted.
fn unavailable(what: &str, e: impl std::fmt::Display) -> TableError {
    TableError::Unavailable(format!("{what}: {e}"))
}

fn db(e: tokio_postgres::Error) -> TableError {
    unavailable("postgres", e)
}

fn pool_err(e: deadpool_postgres::PoolError) -> TableError {
    unavailable("postgres pool", e)
}

/// Reads the password file: its first line, trailing newline dropped.
fn read_password(path: &std::path::Path) -> Result<String, TableError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        TableError::Invalid(format!("[table] password_file {}: {e}", path.display()))
    })?;
    Ok(text.lines().next().unwrap_or("").to_string())
}

impl PgStore {
    /// Builds the pool and its runtime; connects nothing yet (a node may start
    /// before its database: calls fail as temporary until it answers).
    pub fn open(cfg: &TableConfig) -> Result<PgStore, TableError> {
        let url = cfg
            .url
            .as_deref()
            .ok_or_else(|| TableError::Invalid("[table] url is not set".into()))?;
        let mut pg: tokio_postgres::Config = url
            .parse()
            .map_err(|e| TableError::Invalid(format!("[table] url: {e}")))?;
        if let Some(p) = &cfg.password_file {
            pg.password(read_password(p)?);
        }
        pg.connect_timeout(cfg.connect_timeout)
            .application_name("tenso")
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tenso-pg")
            .enable_all()
            .build()
            .map_err(|e| TableError::Invalid(format!("postgres runtime: {e}")))?;
        let mgr = Manager::from_config(
            pg.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = {
            let _enter = rt.enter();
            Pool::builder(mgr)
                .max_size(cfg.pool_size)
                .wait_timeout(Some(cfg.query_timeout))
                .create_timeout(Some(cfg.connect_timeout))
                .recycle_timeout(Some(cfg.connect_timeout))
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .build()
                .map_err(|e| TableError::Invalid(format!("postgres pool: {e}")))?
        };
        Ok(PgStore {
            inner: Arc::new(Inner {
                rt: Runtime(Some(rt)),
                pool,
                pg,
                query_timeout: cfg.query_timeout,
                view_check: cfg.view_check,
                stats: PgStats::default(),
            }),
        })
    }

    pub fn stats(&self) -> &PgStats {
        &self.inner.stats
    }

    /// Runs `f` on the store's runtime and waits for it, at most `query_timeout`.
    fn run<T, F, Fut>(&self, f: F) -> Result<T, TableError>
    where
        F: FnOnce(Client) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, TableError>> + Send + 'static,
        T: Send + 'static,
    {
        self.run_for(self.inner.query_timeout, f)
    }

    /// Runs `f` with a pooled connection on the store's runtime; the deadline covers
    /// waiting for the connection too.
    fn run_for<T, F, Fut>(&self, deadline: Duration, f: F) -> Result<T, TableError>
    where
        F: FnOnce(Client) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, TableError>> + Send + 'static,
        T: Send + 'static,
    {
        let pool = self.inner.pool.clone();
        let fut = async move { f(pool.get().await.map_err(pool_err)?).await };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let rt = self
            .inner
            .rt
            .0
            .as_ref()
            .expect("runtime lives as long as the store");
        rt.spawn(async move {
            let r = match tokio::time::timeout(deadline, fut).await {
                Ok(r) => r,
                Err(_) => Err(unavailable(
                    "postgres",
                    format!("no answer within {deadline:?}"),
                )),
            };
            let _ = tx.send(r);
        });
        let r = rx
            .recv_timeout(deadline + Duration::from_secs(1))
            .unwrap_or_else(|_| Err(unavailable("postgres", "no answer")));
        if let Err(TableError::Unavailable(_)) = &r {
            self.inner.stats.unavailable.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Does the database answer? (The reachability probe of `/health`.)
    pub fn ping(&self) -> Result<(), TableError> {
        self.run(move |c| async move {
            c.execute("SELECT 1", &[]).await.map_err(db)?;
            Ok(())
        })
    }

    /// Creates or upgrades the schema; returns the version now in place.
    pub fn migrate(&self) -> Result<usize, TableError> {
        self.run(move |mut c| async move { migrate_on(&mut c).await })
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<AliasEntry>, TableError> {
        let (d, l) = split_key(key);
        self.run(move |c| async move {
            let row = c
                .query_opt(
                    "SELECT entry FROM aliases WHERE domain = $1 AND local = $2",
                    &[&d, &l],
                )
                .await
                .map_err(db)?;
            row.map(|r| decode(r.get::<_, &str>(0).as_bytes()))
                .transpose()
        })
    }

    pub fn get_many(&self, keys: &[Vec<u8>]) -> Result<HashMap<Vec<u8>, AliasEntry>, TableError> {
        let mut out = HashMap::new();
        for chunk in keys.chunks(50_000) {
            let (ds, ls): (Vec<String>, Vec<String>) = chunk.iter().map(|k| split_key(k)).unzip();
            let rows = self.run(move |c| async move {
                c.query(
                    "SELECT a.domain, a.local, a.entry FROM aliases a \
                     JOIN unnest($1::text[], $2::text[]) AS k(domain, local) \
                     ON a.domain = k.domain AND a.local = k.local",
                    &[&ds, &ls],
                )
                .await
                .map_err(db)
            })?;
            for r in rows {
                let k = super::key(r.get(0), r.get(1));
                out.insert(k, decode(r.get::<_, &str>(2).as_bytes())?);
            }
        }
        Ok(out)
    }

    /// One write and its notification, in one transaction.
    fn write(
        &self,
        sql: &'static str,
        key: &[u8],
        entry: Option<String>,
        change: Change,
    ) -> Result<u64, TableError> {
        let (d, l) = split_key(key);
        self.run(move |mut c| async move {
            let tx = c.transaction().await.map_err(db)?;
            let n = match &entry {
                Some(e) => tx.execute(sql, &[&d, &l, e]).await,
                None => tx.execute(sql, &[&d, &l]).await,
            }
            .map_err(db)?;
            if n > 0 {
                notify(&tx, change, &d, &l).await?;
            }
            tx.commit().await.map_err(db)?;
            Ok(n)
        })
    }

    pub fn insert_new(&self, key: &[u8], entry: &AliasEntry) -> Result<bool, TableError> {
        let e = String::from_utf8(encode(entry)).expect("JSON is UTF-8");
        let n = self.write(
            "INSERT INTO aliases (domain, local, entry) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            key,
            Some(e),
            Change::Membership,
        )?;
        Ok(n == 1)
    }

    pub fn put(&self, key: &[u8], entry: &AliasEntry) -> Result<(), TableError> {
        let e = String::from_utf8(encode(entry)).expect("JSON is UTF-8");
        self.write(
            "INSERT INTO aliases (domain, local, entry) VALUES ($1, $2, $3) \
             ON CONFLICT (domain, local) DO UPDATE SET entry = excluded.entry",
            key,
            Some(e),
            Change::Entry,
        )?;
        Ok(())
    }

    pub fn remove(&self, key: &[u8]) -> Result<bool, TableError> {
        let (d, l) = split_key(key);
        self.run(move |mut c| async move {
            let tx = c.transaction().await.map_err(db)?;
            let n = tx
                .execute(
                    "DELETE FROM aliases WHERE domain = $1 AND local = $2",
                    &[&d, &l],
                )
                .await
                .map_err(db)?;
            tx.execute(
                "DELETE FROM health WHERE domain = $1 AND local = $2",
                &[&d, &l],
            )
            .await
            .map_err(db)?;
            if n > 0 {
                notify(&tx, Change::Membership, &d, &l).await?;
            }
            tx.commit().await.map_err(db)?;
            Ok(n > 0)
        })
    }

    pub fn list(&self, domain: Option<&str>) -> Result<Vec<(Vec<u8>, AliasEntry)>, TableError> {
        let domain = domain.map(str::to_string);
        let rows = self.run_for(self.inner.query_timeout * 12, move |c| async move {
            match domain {
                Some(d) => {
                    c.query(
                        "SELECT domain, local, entry FROM aliases WHERE domain = $1 ORDER BY domain, local",
                        &[&d],
                    )
                    .await
                }
                None => {
                    c.query(
                        "SELECT domain, local, entry FROM aliases ORDER BY domain, local",
                        &[],
                    )
                    .await
                }
            }
            .map_err(db)
        })?;
        rows.iter()
            .map(|r| {
                Ok((
                    super::key(r.get(0), r.get(1)),
                    decode(r.get::<_, &str>(2).as_bytes())?,
                ))
            })
            .collect()
    }

    pub fn count(&self) -> Result<usize, TableError> {
        self.run(move |c| async move {
            let n: i64 = c
                .query_one("SELECT count(*) FROM aliases", &[])
                .await
                .map_err(db)?
                .get(0);
            Ok(n as usize)
        })
    }

    pub fn add_domains(&self, domains: &[String]) -> Result<(), TableError> {
        let ds = domains.to_vec();
        self.run(move |mut c| async move {
            let tx = c.transaction().await.map_err(db)?;
            tx.execute(
                "INSERT INTO domains SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
                &[&ds],
            )
            .await
            .map_err(db)?;
            notify(&tx, Change::Membership, "", "").await?;
            tx.commit().await.map_err(db)
        })
    }

    pub fn remove_domain(&self, d: &str) -> Result<bool, TableError> {
        let n = self.write(
            "DELETE FROM domains WHERE domain = $1 AND $2 = ''",
            &super::key(d, ""),
            None,
            Change::Membership,
        )?;
        Ok(n > 0)
    }

    pub fn explicit_domains(&self) -> Result<Vec<String>, TableError> {
        self.strings("SELECT domain FROM domains ORDER BY domain")
    }

    /// Explicit domains and those holding an alias. The distinct domains of the
    /// alias table are found by a skip scan over its primary key (one index probe
    /// per domain, not a read of every alias).
    pub fn domains(&self) -> Result<Vec<String>, TableError> {
        self.strings(
            "WITH RECURSIVE d(domain) AS ( \
               (SELECT domain FROM aliases ORDER BY domain LIMIT 1) \
               UNION ALL \
               SELECT (SELECT a.domain FROM aliases a WHERE a.domain > d.domain \
                       ORDER BY a.domain LIMIT 1) FROM d WHERE d.domain IS NOT NULL) \
             SELECT domain FROM d WHERE domain IS NOT NULL \
             UNION SELECT domain FROM domains ORDER BY 1",
        )
    }

    fn strings(&self, sql: &'static str) -> Result<Vec<String>, TableError> {
        self.run(move |c| async move {
            let rows = c.query(sql, &[]).await.map_err(db)?;
            Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
        })
    }

    pub fn local_domains(&self) -> Result<HashMap<String, bool>, TableError> {
        let mut m: HashMap<String, bool> =
            self.domains()?.into_iter().map(|d| (d, false)).collect();
        for d in self.strings("SELECT domain FROM aliases WHERE local = ''")? {
            m.insert(d, true);
        }
        Ok(m)
    }

    pub fn health(&self, key: &[u8]) -> Result<Vec<DestHealth>, TableError> {
        let (d, l) = split_key(key);
        self.run(move |c| async move {
            let row = c
                .query_opt(
                    "SELECT list FROM health WHERE domain = $1 AND local = $2",
                    &[&d, &l],
                )
                .await
                .map_err(db)?;
            Ok(row
                .and_then(|r| serde_json::from_str(r.get::<_, &str>(0)).ok())
                .unwrap_or_default())
        })
    }

    /// Read-modify-write under a row lock (`SELECT … FOR UPDATE`); a first report
    /// racing another node's first report keeps the later one (health is advice).
    pub fn health_update(
        &self,
        key: &[u8],
        merge: &(dyn Fn(&mut Vec<DestHealth>) + Sync),
    ) -> Result<(), TableError> {
        let (d, l) = split_key(key);
        // Read, merge here, write: the merge closure cannot travel to the runtime.
        let old = self.run({
            let (d, l) = (d.clone(), l.clone());
            move |c| async move {
                let row = c
                    .query_opt(
                        "SELECT list FROM health WHERE domain = $1 AND local = $2",
                        &[&d, &l],
                    )
                    .await
                    .map_err(db)?;
                Ok(row.map(|r| r.get::<_, String>(0)))
            }
        })?;
        let mut list: Vec<DestHealth> = old
            .as_deref()
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default();
        merge(&mut list);
        let new = serde_json::to_string(&list).expect("health serializes");
        let swapped = self.run(move |c| async move {
            let n = match old {
                Some(o) => {
                    c.execute(
                        "UPDATE health SET list = $3 WHERE domain = $1 AND local = $2 AND list = $4",
                        &[&d, &l, &new, &o],
                    )
                    .await
                }
                None => {
                    c.execute(
                        "INSERT INTO health VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                        &[&d, &l, &new],
                    )
                    .await
                }
            }
            .map_err(db)?;
            Ok(n == 1)
        })?;
        if swapped {
            Ok(())
        } else {
            // Another node wrote in between: merge again onto its list.
            self.health_update(key, merge)
        }
    }

    pub fn all_health(&self) -> Result<Vec<KeyedHealth>, TableError> {
        let rows = self.run(move |c| async move {
            c.query(
                "SELECT domain, local, list FROM health ORDER BY domain, local",
                &[],
            )
            .await
            .map_err(db)
        })?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    super::key(r.get(0), r.get(1)),
                    serde_json::from_str(r.get::<_, &str>(2)).unwrap_or_default(),
                )
            })
            .collect())
    }

    /// Bulk write through COPY into a temporary table, then one upsert: a million
    /// aliases in one transaction, one notification ("everything changed").
    pub fn write_batch(
        &self,
        entries: &[(Vec<u8>, AliasEntry)],
        domains: &[String],
    ) -> Result<usize, TableError> {
        let mut data = Vec::with_capacity(entries.len() * 128);
        for (k, e) in entries {
            let (d, l) = split_key(k);
            copy_field(&mut data, &d);
            data.push(b'\t');
            copy_field(&mut data, &l);
            data.push(b'\t');
            copy_field(
                &mut data,
                std::str::from_utf8(&encode(e)).expect("JSON is UTF-8"),
            );
            data.push(b'\n');
        }
        let ds = domains.to_vec();
        // A bulk load is allowed the time it takes: a minute per million rows.
        let deadline =
            self.inner.query_timeout + Duration::from_secs(60 + entries.len() as u64 / 10_000);
        self.run_for(deadline, move |mut c| async move {
            let tx = c.transaction().await.map_err(db)?;
            tx.batch_execute(
                "CREATE TEMP TABLE tenso_import (domain text COLLATE \"C\", local text COLLATE \"C\", entry text) ON COMMIT DROP",
            )
            .await
            .map_err(db)?;
            copy_in(&tx, "COPY tenso_import FROM STDIN", data).await?;
            let replaced: i64 = tx
                .query_one(
                    "SELECT count(*) FROM tenso_import i JOIN aliases a USING (domain, local)",
                    &[],
                )
                .await
                .map_err(db)?
                .get(0);
            tx.execute(
                "INSERT INTO aliases SELECT DISTINCT ON (domain, local) * FROM tenso_import \
                 ON CONFLICT (domain, local) DO UPDATE SET entry = excluded.entry",
                &[],
            )
            .await
            .map_err(db)?;
            tx.execute(
                "INSERT INTO domains SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
                &[&ds],
            )
            .await
            .map_err(db)?;
            notify_all(&tx).await?;
            tx.commit().await.map_err(db)?;
            Ok(replaced as usize)
        })
    }
}

/// Appends one COPY text-format field.
fn copy_field(out: &mut Vec<u8>, s: &str) {
    for b in s.bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b => out.push(b),
        }
    }
}

async fn copy_in(
    tx: &deadpool_postgres::Transaction<'_>,
    sql: &str,
    data: Vec<u8>,
) -> Result<(), TableError> {
    use futures_util::SinkExt;
    let sink = tx.copy_in::<_, bytes::Bytes>(sql).await.map_err(db)?;
    futures_util::pin_mut!(sink);
    let data = bytes::Bytes::from(data);
    let mut at = 0;
    while at < data.len() {
        let end = (at + (1 << 20)).min(data.len());
        sink.send(data.slice(at..end)).await.map_err(db)?;
        at = end;
    }
    sink.finish().await.map_err(db)?;
    Ok(())
}

/// Bumps the change counter and notifies every node, inside `tx`: delivered when
/// (and only if) the change commits. Payload: `GEN KIND DOMAIN LOCAL`, tab-separated
/// (an alias holds no tab: the alias rule refuses control characters).
async fn notify(
    tx: &deadpool_postgres::Transaction<'_>,
    change: Change,
    domain: &str,
    local: &str,
) -> Result<(), TableError> {
    let generation = current_generation(tx).await?;
    let kind = match change {
        Change::Entry => "e",
        Change::Membership => "m",
    };
    let payload = format!("{generation}\t{kind}\t{domain}\t{local}");
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])
        .await
        .map_err(db)?;
    Ok(())
}

async fn notify_all(tx: &deadpool_postgres::Transaction<'_>) -> Result<(), TableError> {
    let generation = current_generation(tx).await?;
    let payload = format!("{generation}\t*");
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])
        .await
        .map_err(db)?;
    Ok(())
}

/// The change counter after this transaction's writes (the triggers of schema 4
/// moved it; the row stays locked by them until commit, so counters follow commits).
async fn current_generation(tx: &deadpool_postgres::Transaction<'_>) -> Result<i64, TableError> {
    Ok(tx
        .query_one("SELECT generation FROM tenso_generation WHERE id = 1", &[])
        .await
        .map_err(db)?
        .get(0))
}

async fn migrate_on(c: &mut tokio_postgres::Client) -> Result<usize, TableError> {
    let tx = c.transaction().await.map_err(db)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
        .await
        .map_err(db)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS tenso_schema (version int NOT NULL)")
        .await
        .map_err(db)?;
    let row = tx
        .query_opt("SELECT version FROM tenso_schema", &[])
        .await
        .map_err(db)?;
    let have = match row {
        Some(r) => r.get::<_, i32>(0) as usize,
        None => {
            tx.execute("INSERT INTO tenso_schema VALUES (0)", &[])
                .await
                .map_err(db)?;
            0
        }
    };
    if have > MIGRATIONS.len() {
        return Err(TableError::Invalid(format!(
            "the database schema is version {have}, newer than this tenso knows ({}): upgrade tenso",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(have) {
        tx.batch_execute(sql).await.map_err(db)?;
        tracing::info!(version = i + 1, "table schema migrated");
    }
    let now = MIGRATIONS.len() as i32;
    tx.execute("UPDATE tenso_schema SET version = $1", &[&now])
        .await
        .map_err(db)?;
    tx.commit().await.map_err(db)?;
    Ok(MIGRATIONS.len())
}

impl PgStore {
    /// Starts the change feed for `view` on the store's runtime (see the module docs).
    pub fn start_feed(&self, view: Arc<View>) {
        let store = self.clone();
        let rt = self
            .inner
            .rt
            .0
            .as_ref()
            .expect("runtime lives as long as the store");
        rt.spawn(async move { feed(store, view).await });
    }
}

/// The feed's life: connect, migrate, LISTEN, follow; on loss, back off and again.
async fn feed(store: PgStore, view: Arc<View>) {
    let mut backoff = Duration::from_secs(1);
    let mut was_up = false;
    loop {
        match follow(&store, &view).await {
            Ok(()) => {}
            Err(e) => {
                view.feed_down();
                if was_up || backoff == Duration::from_secs(1) {
                    store.inner.stats.feed_lost.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, retry_in = ?backoff, "table change feed lost: answers from memory for view_grace, then 451 until the database answers");
                }
                was_up = false;
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
        if view.feed_connected() {
            backoff = Duration::from_secs(1);
            was_up = true;
        }
    }
}

/// One connection of the feed: returns when it breaks.
async fn follow(store: &PgStore, view: &Arc<View>) -> Result<(), TableError> {
    let cfg = store.inner.pg.clone();
    let deadline = store.inner.query_timeout;
    let (mut client, mut conn) = cfg.connect(NoTls).await.map_err(db)?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        use futures_util::StreamExt;
        while let Some(m) = stream.next().await {
            match m {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    if tx.send(n.payload().to_string()).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    let _stop = AbortOnDrop(driver);
    tokio::time::timeout(deadline, migrate_on(&mut client))
        .await
        .map_err(|_| unavailable("postgres", "migration timed out"))??;
    tokio::time::timeout(deadline, client.batch_execute(&format!("LISTEN {CHANNEL}")))
        .await
        .map_err(|_| unavailable("postgres", "LISTEN timed out"))?
        .map_err(db)?;
    let mut seen = generation(&client, deadline).await?;
    view.feed_up();
    tracing::info!("table change feed connected");
    let mut check = tokio::time::interval(store.inner.view_check);
    check.tick().await;
    loop {
        tokio::select! {
            msg = rx.recv() => {
                let Some(payload) = msg else {
                    return Err(unavailable("postgres", "change feed connection closed"));
                };
                seen = seen.max(apply(view, &payload));
            }
            _ = check.tick() => {
                let now = generation(&client, deadline).await?;
                if now != seen {
                    // Changes without a notification we saw: start over.
                    tracing::info!(seen, now, "table changed without notice: view dropped");
                    view.invalidate_all();
                    seen = now;
                }
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn generation(c: &tokio_postgres::Client, deadline: Duration) -> Result<i64, TableError> {
    let row = tokio::time::timeout(
        deadline,
        c.query_one("SELECT generation FROM tenso_generation WHERE id = 1", &[]),
    )
    .await
    .map_err(|_| unavailable("postgres", "change counter query timed out"))?
    .map_err(db)?;
    Ok(row.get(0))
}

/// Applies one notification to the view; returns its generation (0 if unreadable).
fn apply(view: &View, payload: &str) -> i64 {
    let mut parts = payload.split('\t');
    let generation = parts.next().and_then(|g| g.parse().ok()).unwrap_or(0);
    match (parts.next(), parts.next(), parts.next()) {
        (Some(kind @ ("e" | "m")), Some(d), Some(l)) => {
            view.invalidate(&super::key(d, l), kind == "m")
        }
        _ => view.invalidate_all(),
    }
    generation
}

/// The correlation log (see `fwdlog`): one row per (queue id, alias), and the
/// Message-ID index beside it.
impl PgStore {
    pub fn fwd_record(&self, rec: &FwdRecord) -> Result<(), TableError> {
        let mut rec = rec.clone();
        self.run(move |mut c| async move {
            let tx = c.transaction().await.map_err(db)?;
            let old = tx
                .query_opt(
                    "SELECT rec FROM fwdlog WHERE queue_id = $1 AND alias = $2 FOR UPDATE",
                    &[&rec.queue_id, &rec.alias],
                )
                .await
                .map_err(db)?;
            if let Some(old) = old.and_then(|r| serde_json::from_str(r.get::<_, &str>(0)).ok()) {
                extend_dests(&mut rec, &old);
            }
            let text = serde_json::to_string(&rec).expect("record serializes");
            tx.execute(
                "INSERT INTO fwdlog VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (queue_id, alias) DO UPDATE SET rec = excluded.rec, at = excluded.at",
                &[&rec.queue_id, &rec.alias, &text, &rec.at],
            )
            .await
            .map_err(db)?;
            if let Some(mid) = &rec.message_id {
                tx.execute(
                    "INSERT INTO fwdlog_mid VALUES ($1, $2, $3) \
                     ON CONFLICT (mid, alias) DO UPDATE SET queue_id = excluded.queue_id",
                    &[&norm_mid(mid), &rec.alias, &rec.queue_id],
                )
                .await
                .map_err(db)?;
            }
            tx.commit().await.map_err(db)
        })
    }

    pub fn fwd_get(&self, queue_id: &str, alias: &str) -> Result<Option<FwdRecord>, TableError> {
        let (q, a) = (queue_id.to_string(), alias.to_string());
        self.run(move |c| async move {
            let row = c
                .query_opt(
                    "SELECT rec FROM fwdlog WHERE queue_id = $1 AND alias = $2",
                    &[&q, &a],
                )
                .await
                .map_err(db)?;
            Ok(row.and_then(|r| serde_json::from_str(r.get::<_, &str>(0)).ok()))
        })
    }

    pub fn fwd_by_mid(&self, mid: &str, alias: &str) -> Result<Option<FwdRecord>, TableError> {
        let (m, a) = (mid.to_string(), alias.to_string());
        self.run(move |c| async move {
            let row = c
                .query_opt(
                    "SELECT f.rec FROM fwdlog_mid m JOIN fwdlog f \
                     ON f.queue_id = m.queue_id AND f.alias = m.alias \
                     WHERE m.mid = $1 AND m.alias = $2",
                    &[&m, &a],
                )
                .await
                .map_err(db)?;
            Ok(row.and_then(|r| serde_json::from_str(r.get::<_, &str>(0)).ok()))
        })
    }

    pub fn fwd_expire(&self, cutoff: i64) -> Result<usize, TableError> {
        self.run(move |mut c| async move {
            let tx = c.transaction().await.map_err(db)?;
            tx.execute(
                "DELETE FROM fwdlog_mid m USING fwdlog f \
                 WHERE f.queue_id = m.queue_id AND f.alias = m.alias AND f.at < $1",
                &[&cutoff],
            )
            .await
            .map_err(db)?;
            let n = tx
                .execute("DELETE FROM fwdlog WHERE at < $1", &[&cutoff])
                .await
                .map_err(db)?;
            tx.commit().await.map_err(db)?;
            Ok(n as usize)
        })
    }

    pub fn fwd_all(&self) -> Result<Vec<FwdRecord>, TableError> {
        let rows = self.run_for(self.inner.query_timeout * 12, move |c| async move {
            c.query("SELECT rec FROM fwdlog ORDER BY queue_id, alias", &[])
                .await
                .map_err(db)
        })?;
        Ok(rows
            .iter()
            .filter_map(|r| serde_json::from_str(r.get::<_, &str>(0)).ok())
            .collect())
    }

    pub fn fwd_len(&self) -> Result<usize, TableError> {
        self.run(move |c| async move {
            let n: i64 = c
                .query_one("SELECT count(*) FROM fwdlog", &[])
                .await
                .map_err(db)?
                .get(0);
            Ok(n as usize)
        })
    }
}

/// Submission logins (see `logins`): the stored JSON per alias key.
impl PgStore {
    /// Sets the login of an existing alias; false when there is no such alias.
    pub fn login_set(&self, key: &[u8], login: String) -> Result<bool, TableError> {
        let (d, l) = split_key(key);
        self.run(move |c| async move {
            let n = c
                .execute(
                    "INSERT INTO logins SELECT domain, local, $3 FROM aliases \
                     WHERE domain = $1 AND local = $2 \
                     ON CONFLICT (domain, local) DO UPDATE SET login = excluded.login",
                    &[&d, &l, &login],
                )
                .await
                .map_err(db)?;
            Ok(n == 1)
        })
    }

    pub fn login_remove(&self, key: &[u8]) -> Result<bool, TableError> {
        let (d, l) = split_key(key);
        self.run(move |c| async move {
            let n = c
                .execute(
                    "DELETE FROM logins WHERE domain = $1 AND local = $2",
                    &[&d, &l],
                )
                .await
                .map_err(db)?;
            Ok(n == 1)
        })
    }

    pub fn login_get(&self, key: &[u8]) -> Result<Option<String>, TableError> {
        let (d, l) = split_key(key);
        self.run(move |c| async move {
            let row = c
                .query_opt(
                    "SELECT login FROM logins WHERE domain = $1 AND local = $2",
                    &[&d, &l],
                )
                .await
                .map_err(db)?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    pub fn login_all(&self) -> Result<Vec<(Vec<u8>, String)>, TableError> {
        let rows = self.run(move |c| async move {
            c.query(
                "SELECT domain, local, login FROM logins ORDER BY domain, local",
                &[],
            )
            .await
            .map_err(db)
        })?;
        Ok(rows
            .iter()
            .map(|r| (super::key(r.get(0), r.get(1)), r.get(2)))
            .collect())
    }
}

/// One pooled message as stored (the body only where asked for).
#[derive(Debug, Clone)]
pub struct PooledRow {
    pub id: String,
    pub alias: String,
    pub time: i64,
    pub size: u64,
    pub seen: bool,
    pub exported_by: Option<String>,
}

fn pooled_row(r: &tokio_postgres::Row) -> PooledRow {
    PooledRow {
        id: r.get(0),
        alias: r.get(1),
        time: r.get(2),
        size: r.get::<_, i64>(3) as u64,
        seen: r.get(4),
        exported_by: r.get(5),
    }
}

const POOL_COLUMNS: &str = "id, alias, time, size, seen, exported_by";

/// The shared bounce pool (see `bounce::pool`): messages in PostgreSQL, so every node
/// stores into and serves the same pool.
impl PgStore {
    /// Stores one message and expires the alias's oldest beyond the limits, in one
    /// transaction (durable when it returns). Returns the expired (id, size).
    pub fn pool_put(
        &self,
        row: PooledRow,
        body: Vec<u8>,
        max_messages: usize,
        max_bytes: u64,
    ) -> Result<Vec<(String, u64)>, TableError> {
        let deadline = self.inner.query_timeout + Duration::from_secs(body.len() as u64 >> 20);
        self.run_for(deadline, move |mut c| async move {
            let tx = c.transaction().await.map_err(db)?;
            tx.execute(
                "INSERT INTO pool (id, alias, time, size, seen, body) VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (id) DO NOTHING",
                &[&row.id, &row.alias, &row.time, &(row.size as i64), &row.seen, &body],
            )
            .await
            .map_err(db)?;
            let expired = tx
                .query(
                    "DELETE FROM pool WHERE id IN (SELECT id FROM ( \
                     SELECT id, count(*) OVER w AS n, (sum(size) OVER w)::bigint AS bytes FROM pool \
                     WHERE alias = $1 WINDOW w AS (ORDER BY time DESC, id DESC)) x \
                     WHERE n > $2 OR bytes > $3) RETURNING id, size",
                    &[
                        &row.alias,
                        &(max_messages.min(i64::MAX as usize) as i64),
                        &(max_bytes.min(i64::MAX as u64) as i64),
                    ],
                )
                .await
                .map_err(db)?;
            tx.commit().await.map_err(db)?;
            Ok(expired
                .iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64))
                .collect())
        })
    }

    /// Pooled messages of one alias (its pool name) or all, oldest first.
    pub fn pool_list(&self, alias: Option<&str>) -> Result<Vec<PooledRow>, TableError> {
        let alias = alias.map(str::to_string);
        let rows = self.run(move |c| async move {
            match alias {
                Some(a) => {
                    c.query(
                        &format!(
                            "SELECT {POOL_COLUMNS} FROM pool WHERE alias = $1 ORDER BY time, id"
                        ),
                        &[&a],
                    )
                    .await
                }
                None => {
                    c.query(
                        &format!("SELECT {POOL_COLUMNS} FROM pool ORDER BY time, id"),
                        &[],
                    )
                    .await
                }
            }
            .map_err(db)
        })?;
        Ok(rows.iter().map(pooled_row).collect())
    }

    pub fn pool_read(&self, id: &str) -> Result<Option<(PooledRow, Vec<u8>)>, TableError> {
        let id = id.to_string();
        let row = self.run(move |c| async move {
            c.query_opt(
                &format!("SELECT {POOL_COLUMNS}, body FROM pool WHERE id = $1"),
                &[&id],
            )
            .await
            .map_err(db)
        })?;
        Ok(row.map(|r| (pooled_row(&r), r.get(6))))
    }

    /// Removes entries by id; returns those that were there.
    pub fn pool_remove(&self, ids: &[String]) -> Result<Vec<PooledRow>, TableError> {
        let ids = ids.to_vec();
        let rows = self.run(move |c| async move {
            c.query(
                &format!("DELETE FROM pool WHERE id = ANY($1) RETURNING {POOL_COLUMNS}"),
                &[&ids],
            )
            .await
            .map_err(db)
        })?;
        Ok(rows.iter().map(pooled_row).collect())
    }

    /// Marks entries exported to `node`'s Maildir (and seen there, or not).
    pub fn pool_mark(&self, id: &str, node: &str, seen: bool) -> Result<(), TableError> {
        let (id, node) = (id.to_string(), node.to_string());
        self.run(move |c| async move {
            c.execute(
                "UPDATE pool SET exported_by = $2, seen = seen OR $3 WHERE id = $1",
                &[&id, &node, &seen],
            )
            .await
            .map_err(db)?;
            Ok(())
        })
    }

    /// Claims the periodic job `name` for this node when it last ran at least
    /// `every` seconds before `now` (on any node): true means "run it here".
    pub fn claim_job(&self, name: &str, now: i64, every: i64) -> Result<bool, TableError> {
        let name = name.to_string();
        self.run(move |c| async move {
            let row = c
                .query_opt(
                    "INSERT INTO tenso_jobs VALUES ($1, $2) ON CONFLICT (name) DO UPDATE \
                     SET at = excluded.at WHERE tenso_jobs.at <= $2 - $3 RETURNING at",
                    &[&name, &now, &every],
                )
                .await
                .map_err(db)?;
            Ok(row.is_some())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_fields_are_escaped() {
        let mut out = Vec::new();
        copy_field(&mut out, "a\\b\tc\nd\re");
        assert_eq!(out, b"a\\\\b\\tc\\nd\\re");
    }

    #[test]
    fn notifications_invalidate_what_they_name() {
        let v = View::shared(10, Duration::from_secs(60));
        v.feed_up();
        let g = v.generation();
        v.put_entry(g, &super::super::key("x.test", "a"), None);
        v.put_entry(g, &super::super::key("x.test", "b"), None);
        v.put_domains(g, Arc::new(HashMap::new()));
        assert_eq!(apply(&v, "7\te\tx.test\ta"), 7);
        assert!(v.entry(&super::super::key("x.test", "a")).is_none());
        assert!(v.entry(&super::super::key("x.test", "b")).is_some());
        assert!(v.domains().is_some(), "an entry change keeps the domains");
        apply(&v, "8\tm\tx.test\tb");
        assert!(v.domains().is_none());
        let g = v.generation();
        v.put_entry(g, &super::super::key("x.test", "c"), None);
        apply(&v, "9\t*");
        assert!(v.entry(&super::super::key("x.test", "c")).is_none());
    }
}
