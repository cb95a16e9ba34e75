//! A fleet (issue 16): several tenso nodes on one PostgreSQL table. Two real daemons
//! share a private PostgreSQL 15 cluster; the admin CLI of one node changes the table
//! and the other node's RCPT answers follow (within a second: the change feed is
//! LISTEN/NOTIFY); the database going away makes RCPT answer 451, never 550, and the
//! node recovers without a restart; a DSN arriving at node B is correlated with the
//! copy node A forwarded. Also `tenso table copy` sled → postgres → sled without
//! losing a field, and `tenso table migrate`.
//!
//! One cluster per test (initdb takes a second or two); every wait has a deadline.

mod bounce_support;
mod common;

use bounce_support::*;
use common::daemon::Tenso;
use common::postgres::PgCluster;
use common::sink::{Reply, TestSink};
use common::smtp_client::RawSmtp;
use std::time::{Duration, Instant};

const PROPAGATION: Duration = Duration::from_secs(1);

/// The `[table]` section of a node on `url`, password from a file in `dir`.
fn table_section(url: &str, dir: &std::path::Path, extra: &str) -> String {
    let pw = dir.join("tenso.pw");
    std::fs::write(&pw, "fleet-secret\n").unwrap();
    format!(
        "[table]\nbackend = \"postgres\"\nurl = \"{url}\"\npassword_file = \"{}\"\n\
         connect_timeout = \"2s\"\nquery_timeout = \"3s\"\n{extra}\n\n\
         [limits]\nunknown_penalty_base = \"0s\"\nconnect_rate_per_minute = 100000\n",
        pw.display()
    )
}

/// The reply to `RCPT TO:<rcpt>` on a fresh session, and when the RCPT was sent.
async fn rcpt_reply(t: &Tenso, rcpt: &str) -> (u16, String, Instant) {
    let mut c = RawSmtp::connect(t.smtp_addr()).await;
    c.expect("EHLO client.test", 250).await;
    c.expect("MAIL FROM:<sender@origin.test>", 250).await;
    let sent = Instant::now();
    let (code, text) = c.cmd(&format!("RCPT TO:<{rcpt}>")).await;
    c.quit().await;
    (code, text, sent)
}

async fn rcpt_code(t: &Tenso, rcpt: &str) -> (u16, String) {
    let (code, text, _) = rcpt_reply(t, rcpt).await;
    (code, text)
}

/// The status code of `GET /health` on a node's metrics endpoint.
async fn health(t: &Tenso) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr: std::net::SocketAddr = std::fs::read_to_string(t.data_dir().join("tenso.metrics"))
        .expect("tenso.metrics")
        .trim()
        .parse()
        .unwrap();
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    let out = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("/health answers");
    out.split_whitespace().nth(1).unwrap().parse().unwrap()
}

async fn wait_health(t: &Tenso, code: u16) {
    common::wait_until(Duration::from_secs(30), || async {
        (health(t).await == code).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("/health never answered {code}\nlog:\n{}", t.log()));
}

/// Polls RCPT until it gets `code`; returns how long after the start the RCPT that
/// got it was sent, or panics when none did within `limit`.
async fn wait_rcpt(t: &Tenso, rcpt: &str, code: u16, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let (got, text, sent) = rcpt_reply(t, rcpt).await;
        if got == code && sent - start < limit {
            return sent - start;
        }
        assert!(
            start.elapsed() < limit,
            "RCPT {rcpt}: waited {limit:?} for {code}, last {got} {text}\nlog:\n{}",
            t.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_one_table_and_survive_the_database_going_away() {
    let mut pg = PgCluster::start();
    let url = pg.create_db("tenso", "fleet-secret");
    let dns = dns().await;
    // held@dest.test defers its first attempt: that copy is still queued on A when
    // the database goes away, and must be delivered all the same.
    let sink = TestSink::builder()
        .dsn(true)
        .rcpt_policy(|rcpt, attempt| {
            if rcpt == "held@dest.test" && attempt == 1 {
                Reply::tempfail()
            } else {
                Reply::ok()
            }
        })
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let table = table_section(&url, dir.path(), "view_grace = \"2s\"\nview_check = \"5s\"");
    // A exports the fleet's pool into its Maildir (for its IMAP server).
    // A also serves /health (the table probe asks the database).
    let a_extra = format!(
        "{table}\n[pool]\nmaildir_export = \"500ms\"\n\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\ntable_probe = \"200ms\"\n"
    );
    let a = Tenso::start(&config(&dns, sink.port(), &a_extra)).await;
    let b = Tenso::start(&config(&dns, sink.port(), &table)).await;

    // Nothing in the config or the logs gives the password away.
    assert!(
        !a.cli_ok(&["config", "check"])
            .await
            .contains("fleet-secret")
    );

    // Added on A: B answers 250 within a second (its view heard the change).
    add_alias(&a, "anna@alias.test", &["anna@dest.test"], "pool").await;
    let took = wait_rcpt(&b, "anna@alias.test", 250, PROPAGATION).await;
    eprintln!("user add on A -> 250 on B after {took:?}");
    // B remembers an unknown user too: warm its view with the negative answer first.
    assert_eq!(rcpt_code(&b, "later@alias.test").await.0, 550);
    add_alias(&a, "later@alias.test", &["later@dest.test"], "pool").await;
    wait_rcpt(&b, "later@alias.test", 250, PROPAGATION).await;
    // Removed on B: A answers 550 within a second.
    assert_eq!(rcpt_code(&a, "later@alias.test").await.0, 250);
    b.cli_ok(&["user", "remove", "later@alias.test"]).await;
    let took = wait_rcpt(&a, "later@alias.test", 550, PROPAGATION).await;
    eprintln!("user remove on B -> 550 on A after {took:?}");
    // Every admin command answers the same from both nodes.
    assert_eq!(
        a.cli_ok(&["user", "list", "--json"]).await,
        b.cli_ok(&["user", "list", "--json"]).await
    );

    // Bounces come home to one place: A forwards, the DSN arrives at B.
    let qid = queue_id_of(
        &send(
            &a,
            "sender@origin.test",
            &["anna@alias.test"],
            &original("fleet-1@origin.test", "anna@alias.test", "fleet"),
        )
        .await,
    );
    wait_queue_empty(&a).await;
    let dsn = remote_dsn(&RemoteDsn {
        to: "anna@alias.test",
        envid: Some(&qid),
        final_rcpt: "anna@dest.test",
        status: "5.2.2",
        diagnostic: "552 5.2.2 <anna@dest.test>: mailbox full",
        returned_headers: "From: Sender <sender@origin.test>\r\nMessage-ID: <fleet-1@origin.test>\r\n",
        token: "fleet-dsn",
    });
    send(&b, "", &["anna@alias.test"], &dsn).await;
    // One pool: listed and shown the same from both nodes.
    let listed = pool_list(&a, Some("anna@alias.test")).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(pool_list(&b, None).await, listed);
    let id = listed[0]["id"].as_str().unwrap().to_string();
    let shown = a.cli_json(&["pool", "show", &id, "--json"]).await;
    let msg = shown["message"].as_str().unwrap_or_default().to_string();
    let flag = header(msg.as_bytes(), "X-Tenso-Bounce").unwrap_or_default();
    assert!(
        flag.starts_with("correlated;") && flag.contains(&format!("forwarded-as={qid}")),
        "the DSN at B should correlate with A's copy: {flag:?}\nB log:\n{}",
        b.log()
    );
    // A's Maildir shows the pool to an IMAP server; B (no export) keeps no files.
    let files = wait_pool(&a, "anna@alias.test", 1).await;
    assert_eq!(maildir_id(&files[0].0), id);
    assert!(pool_files(&b, "anna@alias.test").is_empty());
    // The IMAP reader deletes it: it leaves the pool, for every node.
    std::fs::remove_file(&files[0].0).unwrap();
    common::wait_until(WAIT, || async {
        pool_list(&b, None).await.is_empty().then_some(())
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "the deleted message stayed in the pool\nA log:\n{}",
            a.log()
        )
    });
    // The destination's health is shared: A shows what B learned.
    let u = user_show(&a, "anna@alias.test").await;
    assert_eq!(u["health"][0]["status"], "5.2.2", "{u}");

    // A copy accepted before the database goes away, deferred by its next hop.
    add_alias(&a, "held@alias.test", &["held@dest.test"], "pool").await;
    send(
        &a,
        "sender@origin.test",
        &["held@alias.test"],
        &original("held-1@origin.test", "held@alias.test", "held"),
    )
    .await;
    common::wait_until(WAIT, || async {
        (sink.rcpt_attempts("held@dest.test") >= 1).then_some(())
    })
    .await
    .expect("the held copy was never tried");

    // The database goes away: an unknown answer is 451, never 550.
    wait_health(&a, 200).await;
    pg.stop();
    let (code, text) = rcpt_code(&a, "nobody-yet@alias.test").await;
    assert_eq!(code, 451, "{text}");
    assert!(text.contains("4.3.0"), "{text}");
    // Past the view's grace even a known alias waits: the node cannot know.
    wait_rcpt(&a, "anna@alias.test", 451, Duration::from_secs(30)).await;
    assert!(
        a.wait_for_log("table change feed lost", Duration::from_secs(10))
            .await
    );
    wait_health(&a, 503).await;
    // Mail already accepted is delivered while the table is away (the spool is the
    // node's own; the correlation log and health writes only warn).
    a.cli_ok(&["queue", "flush"]).await;
    common::wait_until(WAIT, || async {
        sink.messages()
            .iter()
            .any(|m| m.rcpts.iter().any(|r| r == "held@dest.test"))
            .then_some(())
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "the held copy was not delivered without the database\nA log:\n{}",
            a.log()
        )
    });
    // Back without a restart of either node.
    pg.start_server();
    wait_rcpt(&a, "anna@alias.test", 250, Duration::from_secs(30)).await;
    wait_rcpt(&b, "nobody-yet@alias.test", 550, Duration::from_secs(30)).await;
    wait_health(&a, 200).await;
    add_alias(&b, "after@alias.test", &["after@dest.test"], "pool").await;
    wait_rcpt(&a, "after@alias.test", 250, Duration::from_secs(5)).await;

    // A change made with plain SQL sends no notification: the change counter, checked
    // every view_check (5 s here), still brings it to a view that remembered "unknown"
    // (once A's change feed is back, the view answers again, so it must be this).
    common::wait_until(Duration::from_secs(60), || async {
        let s = a.cli_json(&["status", "--json"]).await;
        (s["table"]["change_feed"] == true).then_some(())
    })
    .await
    .expect("A's change feed did not come back");
    assert_eq!(rcpt_code(&a, "sqlonly@alias.test").await.0, 550);
    pg.psql(
        "tenso",
        r#"INSERT INTO aliases VALUES ('alias.test', 'sqlonly',
           '{"dests":["s@dest.test"],"bounce":"pool","created":1,"updated":1}')"#,
    );
    wait_rcpt(&a, "sqlonly@alias.test", 250, Duration::from_secs(15)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_copy_round_trip_loses_no_field() {
    let pg = PgCluster::start();
    let url = pg.create_db("tenso", "copy-secret");
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "copy-secret\n").unwrap();
    let table = format!(
        "[table]\nurl = \"{url}\"\npassword_file = \"{}\"\n",
        pw.display()
    );
    let dns = dns().await;
    let sink = TestSink::builder().start().await;
    // A one-node installation on sled, with every kind of field set.
    let mut one = Tenso::start(&config(&dns, sink.port(), &table)).await;
    one.cli_ok(&[
        "user",
        "add",
        "a@alias.test",
        "x@dest.test",
        "y@dest.test",
        "--bounce",
        "forward",
    ])
    .await;
    one.cli_ok(&["user", "add", "@catch.test", "c@dest.test"])
        .await;
    one.cli_ok(&["user", "add", "\"sales team\"@alias.test", "a@alias.test"])
        .await;
    one.cli_ok(&[
        "user",
        "set",
        "a@alias.test",
        "--spam",
        "quarantine",
        "--state",
        "defer",
        "--dmarc-preflight",
        "pool",
    ])
    .await;
    one.cli_ok(&["domain", "add", "empty.test"]).await;
    // A bounce waiting in the pool, with its destination's health.
    one.cli_ok(&[
        "user",
        "add",
        "p@alias.test",
        "p@dest.test",
        "--bounce",
        "pool",
    ])
    .await;
    let dsn = remote_dsn(&RemoteDsn {
        to: "p@alias.test",
        envid: None,
        final_rcpt: "p@dest.test",
        status: "5.1.1",
        diagnostic: "550 5.1.1 user unknown",
        returned_headers: "From: someone@origin.test\r\nMessage-ID: <x@origin.test>\r\n",
        token: "copy-dsn",
    });
    send(&one, "", &["p@alias.test"], &dsn).await;
    let before_pool = pool_list(&one, None).await;
    assert_eq!(before_pool.len(), 1);
    // A submission login (its Argon2id hash travels as stored).
    one.cli_ok(&["user", "passwd", "p@alias.test", "--generate"])
        .await;
    let before_show = one
        .cli_ok(&["user", "show", "p@alias.test", "--json"])
        .await;
    assert!(before_show.contains("\"login\": true"), "{before_show}");
    let before_users = one.cli_ok(&["user", "list", "--json"]).await;
    let before_domains = one.cli_ok(&["domain", "list", "--json"]).await;
    one.stop().await;

    let report = one
        .cli_json(&[
            "table", "copy", "--from", "sled", "--to", "postgres", "--json",
        ])
        .await;
    assert_eq!(report["aliases"], 4, "{report}");
    assert_eq!(report["domains"], 1, "{report}");
    assert_eq!(report["pool"], 1, "{report}");
    assert_eq!(report["logins"], 1, "{report}");

    // The same data dir, now on postgres: the same answers.
    let pg_cfg = std::fs::read_to_string(one.config_path())
        .unwrap()
        .replace("[table]\n", "[table]\nbackend = \"postgres\"\n");
    std::fs::write(one.config_path(), &pg_cfg).unwrap();
    one.launch().await;
    assert_eq!(one.cli_ok(&["user", "list", "--json"]).await, before_users);
    assert_eq!(
        one.cli_ok(&["domain", "list", "--json"]).await,
        before_domains
    );
    assert_eq!(rcpt_code(&one, "anyone@catch.test").await.0, 250);
    assert_eq!(pool_list(&one, None).await, before_pool);
    let shown = one
        .cli_ok(&["user", "show", "p@alias.test", "--json"])
        .await;
    assert_eq!(shown, before_show);
    // A change made on postgres, then back to a fresh sled table.
    one.cli_ok(&["user", "add", "new@alias.test", "n@dest.test"])
        .await;
    let pg_users = one.cli_ok(&["user", "list", "--json"]).await;
    one.stop().await;
    std::fs::remove_dir_all(one.data_dir().join("table")).unwrap();
    std::fs::remove_dir_all(one.data_dir().join("pool")).unwrap();
    let back = one
        .cli_json(&[
            "table", "copy", "--from", "postgres", "--to", "sled", "--json",
        ])
        .await;
    assert_eq!(back["aliases"], 5, "{back}");
    assert_eq!(back["pool"], 1, "{back}");
    assert_eq!(back["logins"], 1, "{back}");
    std::fs::write(
        one.config_path(),
        pg_cfg.replace("backend = \"postgres\"\n", ""),
    )
    .unwrap();
    one.launch().await;
    assert_eq!(one.cli_ok(&["user", "list", "--json"]).await, pg_users);
    assert_eq!(pool_list(&one, None).await, before_pool);
    assert_eq!(
        one.cli_ok(&["user", "show", "p@alias.test", "--json"])
            .await,
        before_show
    );
    assert_eq!(
        one.cli_ok(&["domain", "list", "--json"]).await,
        before_domains
    );
    let migrate = one.cli_ok(&["table", "migrate"]).await;
    assert!(migrate.contains("version 5"), "{migrate}");
}

/// The shared pool's own rules against the real database, in process: the per-alias
/// limits expire the oldest in the same transaction, and the Maildir export writes,
/// follows removals, and takes back what the IMAP reader deleted or read.
#[test]
fn shared_pool_limits_and_maildir_export() {
    use std::sync::atomic::Ordering;
    use tenso::bounce::pool::Pool;
    let pg = PgCluster::start();
    let url = pg.create_db("tenso", "pool-secret");
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "pool-secret\n").unwrap();
    let cfg = tenso::config::TableConfig {
        url: Some(url),
        password_file: Some(pw),
        ..Default::default()
    };
    let store = tenso::table::pg::PgStore::open(&cfg).unwrap();
    assert_eq!(store.migrate().unwrap(), 5);
    let root = dir.path().join("pool");
    let pool =
        Pool::new(root.clone(), tenso::disk::PRIVATE, "node-a", 2, 1 << 20).shared(store.clone());
    let msg = |i: usize| format!("Subject: {i}\r\n\r\nbounce {i}\r\n").into_bytes();
    let ids: Vec<String> = (0..3)
        .map(|i| pool.deliver("Lim@X.test", &msg(i)).unwrap())
        .collect();
    let left = pool.try_list(Some("lim@x.test")).unwrap();
    assert_eq!(
        left.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        ids[1..].to_vec(),
        "the oldest expired first"
    );
    assert_eq!(pool.expired.load(Ordering::Relaxed), 1);
    assert_eq!(pool.read(&ids[2]).unwrap().1, msg(2));
    // Another node's handle on the same pool sees the same.
    let other = Pool::new(
        dir.path().join("b"),
        tenso::disk::PRIVATE,
        "node-b",
        2,
        1 << 20,
    )
    .shared(store.clone());
    assert_eq!(other.try_list(None).unwrap().len(), 2);
    // A byte limit counts too: one large message pushes out everything older.
    let big =
        Pool::new(root.clone(), tenso::disk::PRIVATE, "node-a", 100, 1000).shared(store.clone());
    big.deliver("big@x.test", &[b'a'; 600]).unwrap();
    big.deliver("big@x.test", &[b'b'; 600]).unwrap();
    assert_eq!(big.try_list(Some("big@x.test")).unwrap().len(), 1);

    // Export: every message written into node-a's Maildir, by pool name.
    let r = pool.export_maildir().unwrap();
    assert_eq!(r.written, 3, "{r:?}");
    let new_dir = root.join("lim@x.test/new");
    let files: Vec<_> = std::fs::read_dir(&new_dir).unwrap().flatten().collect();
    assert_eq!(files.len(), 2);
    // Removed through the pool (any node): the file goes at the next pass.
    other.remove(&ids[1]).unwrap();
    // Read by the IMAP reader: moved to cur/ with the Seen flag; the pool follows.
    let keep = new_dir.join(
        std::fs::read_dir(&new_dir)
            .unwrap()
            .flatten()
            .map(|f| f.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with(&ids[2]))
            .unwrap(),
    );
    let cur = root.join("lim@x.test/cur");
    let seen_name = format!("{}:2,S", keep.file_name().unwrap().to_string_lossy());
    std::fs::rename(&keep, cur.join(&seen_name)).unwrap();
    let r = pool.export_maildir().unwrap();
    assert_eq!((r.written, r.removed_files), (0, 1), "{r:?}");
    let e = other.try_list(Some("lim@x.test")).unwrap();
    assert_eq!((e.len(), e[0].seen), (1, true), "{e:?}");
    // Deleted by the IMAP reader: it leaves the pool.
    std::fs::remove_file(cur.join(&seen_name)).unwrap();
    let r = pool.export_maildir().unwrap();
    assert_eq!(r.deleted_by_reader, 1, "{r:?}");
    assert!(other.try_list(Some("lim@x.test")).unwrap().is_empty());
    // The database gone: the pool says so (an error), it does not list nothing.
    drop(pg);
    assert!(other.try_list(None).is_err());
    assert!(pool.deliver("lim@x.test", &msg(9)).is_err());
}

/// A login read while the database is away is an error (AUTH answers 454 4.7.0 and
/// counts no failure), not "no such login" (which AUTH would answer 535 and count
/// towards the client's lockout).
#[test]
fn a_login_read_without_the_database_is_a_fault_not_a_wrong_password() {
    let pg = PgCluster::start();
    let url = pg.create_db("tenso", "login-secret");
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "login-secret\n").unwrap();
    let cfg = tenso::config::TableConfig {
        url: Some(url),
        password_file: Some(pw),
        ..Default::default()
    };
    tenso::table::pg::PgStore::open(&cfg)
        .unwrap()
        .migrate()
        .unwrap();
    let t = tenso::table::Table::open_postgres(&dir.path().join("node"), 1 << 20, None, 8, &cfg)
        .unwrap();
    t.add(
        "alice@alias.test",
        &["a@dest.test".into()],
        tenso::config::BouncePolicy::Pool,
    )
    .unwrap();
    let logins = t.logins().unwrap();
    let argon = tenso::table::logins::hasher(64, 1, 1).unwrap();
    let hash = tenso::table::logins::hash_password(&argon, b"correct horse").unwrap();
    logins.set("alice@alias.test", &hash).unwrap();
    assert_eq!(logins.hash_of("alice@alias.test").unwrap(), Some(hash));
    assert_eq!(logins.hash_of("bob@alias.test").unwrap(), None);
    drop(pg);
    assert!(
        logins.hash_of("alice@alias.test").is_err(),
        "the database away must not read as 'no login'"
    );
    assert!(logins.has("alice@alias.test").is_err());
}
