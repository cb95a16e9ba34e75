//! Admin requests: one versioned request/response protocol, one executor.
//!
//! sled locks its database to one process, so while the daemon runs every admin
//! command travels over a Unix socket in the data dir (mode 0600; peers whose uid is
//! neither root nor the daemon's are refused). With no daemon, the CLI opens the
//! stores itself and calls the very same [`execute`]. The protocol is one JSON line
//! each way; `v` lets a newer CLI detect an older daemon.

pub mod http;
mod release;
pub mod server;

use crate::config::{BouncePolicy, Config, SpamPolicy};
use crate::queue::QueueHandle;
use crate::spool::Spool;
use crate::table::{AliasState, Table, import};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub const PROTOCOL_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    UserAdd {
        alias: String,
        dests: Vec<String>,
        bounce: Option<BouncePolicy>,
    },
    UserSet {
        alias: String,
        dests: Option<Vec<String>>,
        bounce: Option<BouncePolicy>,
        dmarc_preflight: Option<String>,
        /// tag | quarantine | reject | off | default
        #[serde(default)]
        spam: Option<String>,
        /// active | discard | defer | reject
        #[serde(default)]
        state: Option<String>,
    },
    UserRemove {
        alias: String,
    },
    /// Sets the submission password of an alias (an Argon2id hash made by the CLI:
    /// the password itself never travels), or removes its login (`hash` None).
    UserPasswd {
        alias: String,
        hash: Option<String>,
    },
    UserShow {
        alias: String,
    },
    UserList {
        domain: Option<String>,
    },
    DomainAdd {
        domain: String,
    },
    DomainRemove {
        domain: String,
    },
    DomainList,
    Import {
        text: String,
        format: String,
        domain: Option<String>,
        skip_bad: bool,
        bounce: Option<BouncePolicy>,
    },
    Export,
    QueueList,
    QueueShow {
        id: String,
    },
    QueueFlush {
        id: Option<String>,
    },
    QueueRemove {
        id: String,
    },
    QueueHold {
        id: String,
    },
    QueueRelease {
        id: String,
    },
    PoolList {
        alias: Option<String>,
    },
    PoolShow {
        id: String,
    },
    PoolRemove {
        id: String,
    },
    PoolPurge {
        /// Seconds; None = everything.
        older_than: Option<u64>,
        alias: Option<String>,
    },
    DnsCheck {
        domain: Option<String>,
    },
    /// Today's TLS-RPT aggregate; with `send`, every report due now (today's too).
    TlsReport {
        domain: Option<String>,
        #[serde(default)]
        send: bool,
    },
    Status,
    /// Forwards a pooled message to its alias's destinations ("not spam").
    PoolRelease {
        id: String,
    },
    /// Feeds a pooled message to rspamd's classifier.
    SpamLearn {
        id: String,
        spam: bool,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope {
    pub v: u32,
    #[serde(flatten)]
    pub req: Request,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub data: Value,
}

impl Response {
    fn ok(data: Value) -> Response {
        Response {
            ok: true,
            error: None,
            data,
        }
    }
    pub fn err(e: impl std::fmt::Display) -> Response {
        Response {
            ok: false,
            error: Some(e.to_string()),
            data: Value::Null,
        }
    }
}

/// What the executor works on: the daemon's live stores, or the CLI's own.
pub struct Ctx<'a> {
    pub cfg: &'a Config,
    pub table: &'a Table,
    pub spool: &'a Spool,
    pub pool: &'a crate::bounce::pool::Pool,
    /// The running scheduler; None in direct mode (no daemon).
    pub queue: Option<&'a QueueHandle>,
    pub status: Option<Value>,
}

fn alias_json(
    name: &str,
    e: &crate::table::AliasEntry,
    health: &[crate::table::DestHealth],
) -> Value {
    json!({
        "alias": name,
        "dests": e.dests,
        "bounce": e.bounce,
        "created": e.created,
        "updated": e.updated,
        "dmarc_preflight": e.dmarc_preflight,
        "health": health,
        "spam": e.spam.map_or_else(|| "default".to_string(), |p| p.to_string()),
        "state": e.state,
    })
}

fn queue_json(e: &crate::spool::Envelope) -> Value {
    let now = crate::time::unix_now();
    json!({
        "id": e.id,
        "kind": e.kind,
        "sender": e.reverse_path,
        "recipients": e.rcpts.iter().map(|r| json!({
            "orig": r.orig,
            "alias": r.alias,
            "mail_from": r.mail_from,
            "dest": if r.dest.is_empty() { format!("pool:{}", r.pool.clone().unwrap_or_default()) } else { r.dest.clone() },
            "state": r.state,
            "attempts": r.attempts,
            "next_attempt": r.next_attempt,
            "last": r.last,
            "status": r.status,
        })).collect::<Vec<_>>(),
        "size": e.size,
        "arrival": e.arrival,
        "age": now - e.arrival,
        "next_attempt": e.next_due(),
        "held": e.held,
    })
}

/// Runs one admin request. Blocking table/spool calls are short; imports and listings
/// of large tables run on the blocking pool.
pub async fn execute(ctx: &Ctx<'_>, req: Request) -> Response {
    match execute_inner(ctx, req).await {
        Ok(v) => Response::ok(v),
        Err(e) => Response::err(e),
    }
}

async fn execute_inner(ctx: &Ctx<'_>, req: Request) -> Result<Value, String> {
    let t = ctx.table;
    let e = |x: crate::table::TableError| x.to_string();
    match req {
        Request::UserAdd {
            alias,
            dests,
            bounce,
        } => {
            let entry = t
                .add(&alias, &dests, bounce.unwrap_or(ctx.cfg.default_bounce))
                .map_err(e)?;
            Ok(alias_json(&alias.to_lowercase(), &entry, &[]))
        }
        Request::UserSet {
            alias,
            dests,
            bounce,
            dmarc_preflight,
            spam,
            state,
        } => {
            if dests.is_none()
                && bounce.is_none()
                && dmarc_preflight.is_none()
                && spam.is_none()
                && state.is_none()
            {
                return Err(
                    "nothing to change: give --dest, --bounce, --dmarc-preflight, --spam or --state"
                        .into(),
                );
            }
            let spam: Option<Option<SpamPolicy>> = match spam.as_deref() {
                None => None,
                Some("default") => Some(None),
                Some(p) => Some(Some(p.parse()?)),
            };
            let state: Option<AliasState> = state.as_deref().map(str::parse).transpose()?;
            if let Some(p) = &dmarc_preflight
                && !["off", "pool", "forward", "default"].contains(&p.as_str())
            {
                return Err(format!(
                    "unknown dmarc-preflight {p:?} (expected off, pool, forward or default)"
                ));
            }
            let entry = t
                .update(&alias, |en| {
                    if let Some(d) = &dests {
                        en.dests = d.clone();
                    }
                    if let Some(b) = bounce {
                        en.bounce = b;
                    }
                    if let Some(p) = &dmarc_preflight {
                        en.dmarc_preflight = (p != "default").then(|| p.clone());
                    }
                    if let Some(p) = spam {
                        en.spam = p;
                    }
                    if let Some(st) = state {
                        en.state = st;
                    }
                })
                .map_err(e)?;
            let health = t.health(&alias).map_err(e)?;
            Ok(alias_json(&alias.to_lowercase(), &entry, &health))
        }
        Request::UserRemove { alias } => {
            t.remove(&alias).map_err(e)?;
            Ok(json!({ "removed": alias }))
        }
        Request::UserPasswd { alias, hash } => {
            let logins = t.logins().map_err(e)?;
            let login = match &hash {
                Some(h) => {
                    logins.set(&alias, h).map_err(e)?;
                    tracing::info!(%alias, "submission password set by admin");
                    true
                }
                None => {
                    let had = logins.remove(&alias).map_err(e)?;
                    tracing::info!(%alias, had, "submission login removed by admin");
                    false
                }
            };
            Ok(json!({ "alias": alias.to_lowercase(), "login": login }))
        }
        Request::UserShow { alias } => {
            let entry = t.get(&alias).map_err(e)?;
            let health = t.health(&alias).map_err(e)?;
            let mut v = alias_json(&alias.to_lowercase(), &entry, &health);
            v["login"] = json!(t.logins().map_err(e)?.has(&alias).map_err(e)?);
            v["spam_effective"] = json!(entry.spam.unwrap_or(ctx.cfg.spam.default));
            v["pool"] = json!(ctx.pool.count(&alias));
            if let Some(h) = v["health"].as_array_mut() {
                for x in h.iter_mut() {
                    let st = x["status"].as_str().unwrap_or("").to_string();
                    x["meaning"] = json!(crate::bounce::incoming::describe(&st));
                }
            }
            Ok(v)
        }
        Request::UserList { domain } => {
            let t = t.clone();
            let (list, health) = tokio::task::spawn_blocking(move || {
                Ok::<_, crate::table::TableError>((t.list(domain.as_deref())?, t.all_health()?))
            })
            .await
            .map_err(|x| x.to_string())?
            .map_err(e)?;
            let none = Vec::new();
            Ok(Value::Array(
                list.iter()
                    .map(|(n, en)| alias_json(n, en, health.get(n).unwrap_or(&none)))
                    .collect(),
            ))
        }
        Request::DomainAdd { domain } => {
            t.add_domain(&domain).map_err(e)?;
            Ok(json!({ "added": domain.to_lowercase() }))
        }
        Request::DomainRemove { domain } => {
            t.remove_domain(&domain).map_err(e)?;
            Ok(json!({ "removed": domain.to_lowercase() }))
        }
        Request::DomainList => Ok(json!(t.domains().map_err(e)?)),
        Request::Import {
            text,
            format,
            domain,
            skip_bad,
            bounce,
        } => {
            let format: import::Format = format.parse()?;
            let bounce = bounce.unwrap_or(ctx.cfg.default_bounce);
            let t = t.clone();
            let report = tokio::task::spawn_blocking(move || {
                let parsed = import::parse(&text, format, domain.as_deref());
                t.import(parsed, skip_bad, bounce)
            })
            .await
            .map_err(|x| x.to_string())?
            .map_err(e)?;
            let bad: Vec<Value> = report
                .bad
                .iter()
                .map(|(l, r)| json!({"line": l, "reason": r}))
                .collect();
            let imported = report.bad.is_empty() || skip_bad;
            Ok(json!({
                "imported": imported,
                "added": report.added,
                "replaced": report.replaced,
                "domains": report.domains,
                "bad": bad,
            }))
        }
        Request::Export => {
            let t = t.clone();
            let list = tokio::task::spawn_blocking(move || t.list(None))
                .await
                .map_err(|x| x.to_string())?
                .map_err(e)?;
            let pairs: Vec<(String, Vec<String>)> =
                list.into_iter().map(|(n, en)| (n, en.dests)).collect();
            let mut text = import::export_virtual(&pairs);
            // Local domains without aliases (`domain add`) as virtual(5) domain lines.
            for d in ctx.table.domains().map_err(e)? {
                if !pairs.iter().any(|(n, _)| n.ends_with(&format!("@{d}"))) {
                    text.push_str(&format!("{d} anything\n"));
                }
            }
            Ok(json!({ "text": text }))
        }
        Request::QueueList => {
            let spool = ctx.spool.clone();
            let list = tokio::task::spawn_blocking(move || spool.list())
                .await
                .map_err(|x| x.to_string())?
                .map_err(|x| x.to_string())?;
            Ok(Value::Array(list.iter().map(queue_json).collect()))
        }
        Request::QueueShow { id } => {
            check_queue_id(&id)?;
            let env = ctx.spool.read_envelope(&id).map_err(|x| x.to_string())?;
            let mut v = queue_json(&env);
            let body = ctx.spool.read_body(&id).map_err(|x| x.to_string())?;
            let headers = crate::smtp::header::header_section(&body);
            v["headers"] = json!(String::from_utf8_lossy(headers));
            Ok(v)
        }
        Request::QueueFlush { id } => {
            if let Some(id) = &id {
                check_queue_id(id)?;
                ctx.spool.read_envelope(id).map_err(|x| x.to_string())?;
            }
            match ctx.queue {
                Some(q) => {
                    q.flush(id.clone());
                    Ok(json!({ "flushed": id.unwrap_or_else(|| "all".into()) }))
                }
                None => Err("no daemon is running: nothing to flush (start `tenso serve`)".into()),
            }
        }
        Request::QueueRemove { id } => {
            check_queue_id(&id)?;
            match ctx.queue {
                Some(q) => q.remove(&id).await.map_err(|x| x.to_string())?,
                None => ctx.spool.remove_blocking(&id).map_err(|x| x.to_string())?,
            }
            Ok(json!({ "removed": id }))
        }
        Request::QueueHold { id } => set_held(ctx, &id, true).await,
        Request::QueueRelease { id } => set_held(ctx, &id, false).await,
        Request::PoolList { alias } => {
            let list = ctx
                .pool
                .try_list(alias.as_deref())
                .map_err(|x| x.to_string())?;
            Ok(json!(list))
        }
        Request::PoolShow { id } => {
            let (entry, bytes) = ctx.pool.read(&id).map_err(|x| x.to_string())?;
            let mut v = json!(entry);
            v["message"] = json!(String::from_utf8_lossy(&bytes));
            Ok(v)
        }
        Request::PoolRemove { id } => {
            let entry = ctx.pool.remove(&id).map_err(|x| x.to_string())?;
            Ok(json!({ "removed": entry.id, "alias": entry.alias }))
        }
        Request::PoolPurge { older_than, alias } => {
            let n = ctx
                .pool
                .purge(alias.as_deref(), older_than.map(|s| s as i64))
                .map_err(|x| x.to_string())?;
            tracing::info!(purged = n, ?older_than, "pool purged by admin");
            Ok(json!({ "purged": n }))
        }
        Request::DnsCheck { domain } => {
            let domains = match domain {
                Some(d) => vec![d.to_lowercase()],
                None => t.domains().map_err(e)?,
            };
            let resolver = crate::dns::build(ctx.cfg)?;
            let signer = crate::signing::Signer::from_config(&ctx.cfg.dkim)?;
            let report =
                crate::policy::dns_check::check(ctx.cfg, &resolver, signer.as_ref(), &domains)
                    .await;
            Ok(json!(report))
        }
        Request::PoolRelease { id } => release::release(ctx, &id).await,
        Request::SpamLearn { id, spam } => release::learn(ctx, &id, spam).await,
        Request::TlsReport { domain, send } => tls_report(ctx, domain, send).await,
        Request::Status => Ok(json!({
            "daemon": ctx.queue.is_some(),
            "aliases": t.count(),
            "domains": t.domains().map_err(e)?.len(),
            "queue": ctx.spool.list().map(|l| l.len()).unwrap_or(0),
            "table": t.status().0,
            "counters": ctx.status.clone().unwrap_or(Value::Null),
        })),
    }
}

/// Refuses anything that is not a queue id before it gets near a file name: the same
/// check for the socket and for direct mode (the spool checks again).
fn check_queue_id(id: &str) -> Result<(), String> {
    if crate::spool::valid_id(id) {
        Ok(())
    } else {
        Err(crate::spool::SpoolError::BadId(id.to_string()).to_string())
    }
}

async fn set_held(ctx: &Ctx<'_>, id: &str, held: bool) -> Result<Value, String> {
    check_queue_id(id)?;
    match ctx.queue {
        Some(q) => q.set_held(id, held).await.map_err(|x| x.to_string())?,
        None => {
            let mut env = ctx.spool.read_envelope(id).map_err(|x| x.to_string())?;
            env.held = held;
            ctx.spool.update_blocking(&env).map_err(|x| x.to_string())?;
        }
    }
    Ok(json!({ "id": id, "held": held }))
}

/// `tenso tls report`: today's counts, or (with `--send`) the reports made now and
/// handed to the queue (without a daemon, they wait in the spool for the next start).
async fn tls_report(ctx: &Ctx<'_>, domain: Option<String>, send: bool) -> Result<Value, String> {
    let store = ctx.table.tls().map_err(|e| e.to_string())?;
    let reports =
        crate::delivery::tlsrpt::Reports::new(std::sync::Arc::new(ctx.cfg.clone()), store);
    if !send {
        return reports.today(domain.as_deref());
    }
    let resolver = crate::dns::build(ctx.cfg)?;
    let signer = crate::signing::Signer::from_config(&ctx.cfg.dkim)?;
    let queued = reports
        .send_due(&resolver, ctx.spool, signer.as_ref(), true)
        .await;
    let ids: Vec<String> = queued.iter().map(|(e, _)| e.id.clone()).collect();
    if let Some(q) = ctx.queue {
        for (e, b) in queued {
            q.enqueue(e, Some(b));
        }
    }
    Ok(json!({ "queued": ids }))
}
