//! An idle flood must not starve new clients (issue 6, part 6): 2,000 idle connections
//! from several 127.0.0.x sources are held open, then a new client from another source
//! is greeted within a second and served; with `max_connections` reached, the next
//! client gets `421 4.7.0` at once. Prints the daemon's RSS with the 2,000 idle
//! connections (run with `--nocapture` to see it; `TENSO_BIN=target/release/tenso` to
//! measure the release build).
//!
//! Bounded: every connect and read has a timeout, the whole flood has one too, and every
//! socket is closed before the test ends.

mod abuse_support;
mod common;

use abuse_support::*;
use common::daemon::Tenso;
use common::dns::TestDns;
use common::smtp_client::RawSmtp;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

const IDLE: usize = 2000;
/// Idle sources 127.0.0.10 .. 127.0.0.13, 500 connections each.
const SOURCES: [u8; 4] = [10, 11, 12, 13];
/// Room for the idle flood, the new client, and nothing more.
const MAX_CONNECTIONS: usize = IDLE + 1;

/// One idle client: connected and greeted, then silent.
async fn idle_client(from: u8, addr: std::net::SocketAddr) -> Result<TcpStream, String> {
    let mut s = tcp_from(ip(from), addr).await;
    let mut buf = Vec::new();
    let line = read_line(&mut s, &mut buf, Duration::from_secs(20)).await?;
    if line.starts_with("220 ") {
        Ok(s)
    } else {
        Err(format!("idle client from 127.0.0.{from}: {line}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_flood_does_not_starve_new_clients() {
    // Test process: 2,000 client sockets; the daemon inherits the limit and needs
    // 2,000 server sockets plus its own files.
    let limit = raise_nofile(8192);
    assert!(
        limit >= IDLE as u64 + 200,
        "RLIMIT_NOFILE {limit} is too low for {IDLE} connections"
    );
    let dns = TestDns::builder().start().await;
    let conf = Conf {
        smtp: format!("max_connections = {MAX_CONNECTIONS}"),
        limits: "max_connections_per_ip = 1000\nconnect_rate_per_minute = 100000".into(),
        ..Conf::default()
    };
    // TENSO_BIN=target/release/tenso measures the release build instead.
    let mut t = Tenso::prepare(&conf.render(&dns));
    if let Ok(bin) = std::env::var("TENSO_BIN") {
        t = t.with_bin(std::path::Path::new(&bin));
    }
    cli_ok(&t, &["user", "add", "alice@alias.test", "alice@dest.test"]).await;
    t.launch().await;
    let pid = t.pid().expect("daemon pid");
    let daemon_limit = nofile_limit(pid);
    assert!(
        daemon_limit >= IDLE as u64 + 100,
        "the daemon's RLIMIT_NOFILE {daemon_limit} is too low for {IDLE} connections"
    );
    let addr = t.smtp_addr();
    let rss_before = rss_kib(pid);

    // The flood: 64 connects in flight at a time, the whole thing bounded by 120 s.
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..IDLE {
        let from = SOURCES[i % SOURCES.len()];
        let gate = gate.clone();
        set.spawn(async move {
            let _p = gate.acquire_owned().await.expect("gate");
            idle_client(from, addr).await
        });
    }
    let started = Instant::now();
    let mut idle: Vec<TcpStream> = Vec::with_capacity(IDLE);
    let collected = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(r) = set.join_next().await {
            match r.expect("idle client task") {
                Ok(s) => idle.push(s),
                Err(e) => panic!("{e}\n{}", t.log()),
            }
        }
    })
    .await;
    assert!(collected.is_ok(), "the idle flood did not finish in 120 s");
    assert_eq!(idle.len(), IDLE);
    let flood_time = started.elapsed();

    let rss_idle = rss_kib(pid);
    eprintln!(
        "idle flood: {IDLE} idle connections opened in {flood_time:?}; daemon VmRSS {rss_before} KiB \
         before, {rss_idle} KiB with {IDLE} idle connections (+{} KiB, {:.1} KiB per connection); \
         daemon RLIMIT_NOFILE {daemon_limit}",
        rss_idle.saturating_sub(rss_before),
        rss_idle.saturating_sub(rss_before) as f64 / IDLE as f64
    );
    println!("RSS_WITH_{IDLE}_IDLE_KIB={rss_idle}");

    // A new client from another source: greeted within a second, and served.
    let (mut c, d) = greeted_from(ip(20), addr).await;
    assert_eq!(c.greeting.0, 220, "{:?}", c.greeting);
    assert!(
        d < Duration::from_secs(1),
        "a new client waited {d:?} for its greeting behind {IDLE} idle connections"
    );
    send_ok(&mut c, "alice@alias.test", "during-idle-flood").await;

    // Now the limit is reached (2,000 idle + this one): the next client gets 421 at once.
    let mut s = tcp_from(ip(21), addr).await;
    let mut buf = Vec::new();
    let t0 = Instant::now();
    let line = read_line(&mut s, &mut buf, Duration::from_secs(2))
        .await
        .unwrap_or_else(|e| panic!("over max_connections: no 421 within 2 s ({e})"));
    assert!(
        line.starts_with("421 4.7.0"),
        "over max_connections: {line}"
    );
    eprintln!("over the limit: 421 after {:?}", t0.elapsed());
    drop(s);
    assert!(counter(&t, "inbound", "busy").await >= 1);
    assert!(counter(&t, "inbound", "sessions").await > IDLE as u64);
    c.quit().await;
    drop(c);

    // Every socket closed; the daemon sees them go and serves normally again.
    drop(idle);
    let mut served = false;
    for _ in 0..100 {
        let mut c = RawSmtp::connect_from(ip(22), addr).await;
        if c.greeting.0 == 220 {
            send_ok(&mut c, "alice@alias.test", "after-idle-flood").await;
            c.quit().await;
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served, "no client served after the idle flood ended");
}
