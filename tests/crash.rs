//! The crash test (issue 7, item 3): under continuous load from several SMTP sessions,
//! tenso is killed with SIGKILL at random moments, at least 10 times, and restarted on
//! the same data dir each time. In the end:
//! - every message that got a 250 to its DATA has arrived at the sink at least once,
//!   and every copy the sink got is intact (the sent message, byte for byte, after the
//!   header fields tenso prepends);
//! - duplicates (at-least-once delivery) are counted and printed, not refused;
//! - right after each SIGKILL (before recovery) every `ID.env` in the spool has its
//!   `ID.msg` and parses as JSON;
//! - once everything is delivered, after a clean stop (SIGTERM) and again after a
//!   restart, the queue directory holds no file at all (no temp file, no message
//!   without envelope, no envelope without message), no start-up recovery ever
//!   quarantined anything (the quarantine dir is empty or absent), and
//!   `tenso queue list --json` is empty.
//!
//! A second case runs the data dir on a small tmpfs and fills it in the middle of the
//! kill-and-restart run (issue 11): MAIL gets `452 4.3.1`, the daemon is killed and
//! restarted while the disk is short, space returns, mail flows again — and still
//! every acknowledged message arrives and the spool ends empty.
//!
//! The kill delays come from a seeded RNG. The seed is printed; `TENSO_CRASH_SEED=<n>`
//! replays the same kill schedule (the interleaving with the load still varies).
//! Run with `--nocapture` to see the summary line.

mod common;
mod tmpfs_support;

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use common::daemon::Tenso;
use common::dns::TestDns;
use common::sink::{Delivered, TestSink};

/// SIGKILLs per run (the issue asks for at least 10).
const KILLS: usize = 12;
/// Concurrent SMTP sessions of the load client.
const SESSIONS: usize = 4;
/// Range of the random delay (ms) between traffic flowing into a daemon and its kill.
const KILL_DELAY_MS: (u64, u64) = (100, 700);
/// Bound of every connect and every reply read of the load client.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest pause between two connection attempts of one load session.
const MAX_BACKOFF: Duration = Duration::from_millis(250);
/// A restarted daemon must acknowledge some message within this time.
const FLOW_TIMEOUT: Duration = Duration::from_secs(20);
/// Load sessions must finish their current message within this time once told to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// All acknowledged messages must have arrived at the sink within this time.
const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(30);
/// The queue must be empty within this time (after arrivals, and after the restart).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

const ALIAS: &str = "crash@alias.test";
const DEST: &str = "sink@dest.test";
const FROM: &str = "load@origin.test";

/// SplitMix64: a tiny seeded generator, so a failing schedule can be replayed.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform-enough value in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

fn seed() -> u64 {
    if let Ok(s) = std::env::var("TENSO_CRASH_SEED") {
        return s
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("TENSO_CRASH_SEED={s:?} is not a u64: {e}"));
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 32)
}

/// The message with load id `id`: unique Message-ID, an `id=N` line, and enough
/// numbered lines that a truncated or mixed-up body cannot pass for the original
/// (about 190 KB for every fourth id, spilled to disk while it arrives).
fn message(id: u64) -> Vec<u8> {
    let mut m = format!(
        "From: Load <{FROM}>\r\nTo: <{ALIAS}>\r\nSubject: crash test {id}\r\n\
         Message-ID: <crash-{id}@test>\r\n\r\nid={id}\r\n"
    );
    // Every fourth message is larger than a session keeps in memory (128 KB), so it
    // continues in a spool draft while it arrives (issue 17): kills hit those too.
    let lines = if id.is_multiple_of(4) { 2500 } else { 16 };
    for i in 0..lines {
        m.push_str(&format!("line {i:04} of {id}: {}\r\n", "x".repeat(50)));
    }
    m.push_str(&format!("end of id={id}\r\n"));
    m.into_bytes()
}

/// The load id in a `Message-ID: <crash-N@test>` value.
fn id_of_message_id(v: &str) -> Option<u64> {
    v.trim()
        .strip_prefix("<crash-")?
        .strip_suffix("@test>")?
        .parse()
        .ok()
}

fn config(dns: &TestDns, sink: &TestSink, smtp_extra: &str) -> String {
    format!(
        "[smtp]\nlisten = [\"127.0.0.1:0\"]\n{smtp_extra}\n\
         [dns]\n{}\ntimeout = \"2s\"\n\n\
         [auth]\nspf = false\ndkim = false\n\n\
         [delivery]\nroutes = {{ \"*\" = \"{}\" }}\nconnect_timeout = \"3s\"\n\
         command_timeout = \"10s\"\ndata_timeout = \"10s\"\n\n\
         [queue]\nretry = [\"200ms\"]\ndead_host_ttl = \"200ms\"\nmax_lifetime = \"1h\"\n\n\
         [limits]\nmax_connections_per_ip = 1000\nconnect_rate_per_minute = 1000000\n\
         max_messages_per_connection = 1000000\nalias_rate_per_hour = 0\n\
         domain_rate_per_minute = 0\n",
        dns.resolver_config_toml(),
        sink.addr()
    )
}

/// What the load client shares with the test.
#[derive(Default)]
struct Load {
    /// Where tenso listens now and which start it is (0 = first); `None` while down.
    addr: Mutex<Option<(SocketAddr, usize)>>,
    stop: AtomicBool,
    next_id: AtomicU64,
    /// Ids whose DATA got a 250: (id, when the 250 was read, which start acknowledged it).
    acked: Mutex<Vec<(u64, Instant, usize)>>,
    /// Ids sent whose final reply was not 250 (code and text), kept for the report.
    refused: Mutex<Vec<(u64, u16, String)>>,
    /// Connections that failed or broke (each kill breaks up to SESSIONS of them).
    broken: AtomicU64,
    /// Sessions that got a 220 greeting.
    sessions: AtomicU64,
}

impl Load {
    fn acked_count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }
}

/// A bare SMTP client connection: every read bounded, every error returned.
struct Conn {
    io: BufReader<TcpStream>,
}

fn proto_err(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

impl Conn {
    async fn connect(addr: SocketAddr) -> io::Result<Conn> {
        let tcp = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timeout"))??;
        let _ = tcp.set_nodelay(true);
        Ok(Conn {
            io: BufReader::new(tcp),
        })
    }

    /// One reply, multi-line included: (code, text of the last line).
    async fn reply(&mut self) -> io::Result<(u16, String)> {
        let deadline = tokio::time::Instant::now() + IO_TIMEOUT;
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout_at(deadline, self.io.read_line(&mut line))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "reply timeout"))??;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed",
                ));
            }
            let line = line.trim_end();
            let code: u16 = line
                .get(..3)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| proto_err(format!("bad reply line {line:?}")))?;
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok((code, line.get(4..).unwrap_or("").to_string()));
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        tokio::time::timeout(IO_TIMEOUT, async {
            let s = self.io.get_mut();
            s.write_all(bytes).await?;
            s.flush().await
        })
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "write timeout"))?
    }

    /// Sends a command and requires the reply code `want`.
    async fn cmd(&mut self, line: &str, want: u16) -> io::Result<()> {
        self.send(format!("{line}\r\n").as_bytes()).await?;
        let (code, text) = self.reply().await?;
        if code != want {
            return Err(proto_err(format!("{line} got {code} {text}")));
        }
        Ok(())
    }
}

/// One session: greeting, EHLO, then messages until told to stop. `greeted` is set
/// once the server said 220 (the caller then resets its backoff).
async fn session(
    load: &Load,
    addr: SocketAddr,
    start: usize,
    greeted: &mut bool,
) -> io::Result<()> {
    let mut c = Conn::connect(addr).await?;
    let (code, text) = c.reply().await?;
    if code != 220 {
        return Err(proto_err(format!("greeting {code} {text}")));
    }
    *greeted = true;
    load.sessions.fetch_add(1, Ordering::Relaxed);
    c.cmd("EHLO load.test", 250).await?;
    while !load.stop.load(Ordering::SeqCst) {
        let id = load.next_id.fetch_add(1, Ordering::SeqCst);
        c.send(format!("MAIL FROM:<{FROM}>\r\n").as_bytes()).await?;
        let (code, text) = c.reply().await?;
        if code == 452 {
            // The disk is short of space: a clean refusal; try again shortly.
            load.refused.lock().unwrap().push((id, code, text));
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        if code != 250 {
            return Err(proto_err(format!("MAIL got {code} {text}")));
        }
        c.cmd(&format!("RCPT TO:<{ALIAS}>"), 250).await?;
        c.cmd("DATA", 354).await?;
        // No line of `message` starts with a dot: nothing to stuff.
        let mut data = message(id);
        data.extend_from_slice(b".\r\n");
        c.send(&data).await?;
        // Only a 250 read in full counts as an acknowledgement.
        let (code, text) = c.reply().await?;
        if code == 250 {
            load.acked.lock().unwrap().push((id, Instant::now(), start));
        } else {
            load.refused.lock().unwrap().push((id, code, text.clone()));
            if code == 421 {
                return Ok(());
            }
        }
    }
    let _ = c.send(b"QUIT\r\n").await;
    let _ = c.reply().await;
    Ok(())
}

/// One load session, reconnecting (bounded backoff) to wherever tenso listens now.
async fn load_loop(load: Arc<Load>) {
    let mut backoff = Duration::from_millis(10);
    while !load.stop.load(Ordering::SeqCst) {
        let addr = *load.addr.lock().unwrap();
        let Some((addr, start)) = addr else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let mut greeted = false;
        let res = session(&load, addr, start, &mut greeted).await;
        if greeted {
            backoff = Duration::from_millis(10);
        }
        if res.is_err() {
            load.broken.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// What the sink received, by load id.
struct Arrivals {
    /// Copies per id.
    count: BTreeMap<u64, usize>,
    /// Copies that are not the sent message (truncated, mixed up, unknown id).
    corrupt: Vec<String>,
    total: usize,
}

fn arrivals(msgs: &[Delivered]) -> Arrivals {
    let mut a = Arrivals {
        count: BTreeMap::new(),
        corrupt: Vec::new(),
        total: msgs.len(),
    };
    for m in msgs {
        let Some(id) = m.header("Message-ID").as_deref().and_then(id_of_message_id) else {
            a.corrupt.push(format!(
                "no crash Message-ID (conn {}): {:.300}",
                m.conn_id,
                m.text()
            ));
            continue;
        };
        // tenso prepends Delivered-To and its Received field; the rest is ours, intact.
        if !m.data.ends_with(&message(id)) || m.rcpts != [DEST] {
            a.corrupt.push(format!(
                "id {id} (conn {}) rcpts {:?} does not match what was sent: {:.600}",
                m.conn_id,
                m.rcpts,
                m.text()
            ));
        }
        *a.count.entry(id).or_default() += 1;
    }
    a
}

fn tail(text: &str, lines: usize) -> String {
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Where a missing id is on disk (queue or quarantine), for the failure message.
fn locate(t: &Tenso, id: u64) -> String {
    let needle = format!("Message-ID: <crash-{id}@test>");
    let mut found = Vec::new();
    for sub in ["queue", "quarantine"] {
        let Ok(rd) = std::fs::read_dir(t.data_dir().join(sub)) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Ok(b) = std::fs::read(e.path())
                && String::from_utf8_lossy(&b).contains(&needle)
            {
                found.push(format!("{sub}/{name}"));
            }
        }
    }
    if found.is_empty() {
        format!("id {id}: nowhere on disk")
    } else {
        format!("id {id}: {}", found.join(", "))
    }
}

async fn queue_list(t: &Tenso) -> Vec<Value> {
    let o = t.cli_async(&["queue", "list", "--json"]).await;
    assert!(
        o.status.success(),
        "tenso queue list --json failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        tail(&t.log(), 60)
    );
    match serde_json::from_slice(&o.stdout) {
        Ok(Value::Array(v)) => v,
        other => panic!(
            "queue list --json is not an array: {other:?}: {}",
            String::from_utf8_lossy(&o.stdout)
        ),
    }
}

/// Polls `queue list --json` until it is empty; returns what was left on timeout.
async fn wait_queue_empty(t: &Tenso) -> Result<(), Vec<Value>> {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        let q = queue_list(t).await;
        if q.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(q);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn spool_names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// The raw spool right after a SIGKILL, before recovery touches it. Temp files and
/// message files without `.env` are legitimate there (a commit in flight; or, with the
/// envelope inside `ID.msg`, any queued message), but every `ID.env` must have its
/// `ID.msg` (bodies are committed first, envelopes unlinked first) and parse as JSON
/// (written to a temp file and renamed). Returns the problems found.
fn crash_point_problems(dir: &Path) -> Vec<String> {
    let names = spool_names(dir);
    let mut bad = Vec::new();
    for n in &names {
        let Some(id) = n.strip_suffix(".env") else {
            continue;
        };
        if !names.contains(&format!("{id}.msg")) {
            bad.push(format!("envelope without message: {n}"));
        }
        match std::fs::read(dir.join(n)) {
            Ok(bytes) => {
                if let Err(e) = serde_json::from_slice::<Value>(&bytes) {
                    bad.push(format!(
                        "envelope {n} is not JSON ({e}): {:?}",
                        String::from_utf8_lossy(&bytes)
                    ));
                }
            }
            Err(e) => bad.push(format!("cannot read {n}: {e}")),
        }
    }
    bad
}

/// After everything was delivered the spool must hold no file at all: no temp file,
/// no message without envelope, no envelope without message. Anything left is named
/// with what it is.
fn check_spool_empty(dir: &Path, when: &str) {
    let names = spool_names(dir);
    let mut left: Vec<String> = crash_point_problems(dir);
    for n in &names {
        let what = if n.ends_with(".tmp") {
            "temp file"
        } else if n.ends_with(".msg") {
            "message"
        } else if n.ends_with(".env") {
            "envelope"
        } else {
            "unexpected file"
        };
        left.push(format!("{what}: {n}"));
    }
    assert!(left.is_empty(), "spool {when} is not empty: {left:#?}");
}

fn check_quarantine(t: &Tenso, when: &str) {
    let q = t.data_dir().join("quarantine");
    if let Ok(rd) = std::fs::read_dir(&q) {
        let left: Vec<String> = rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            left.is_empty(),
            "quarantine {when} holds {left:?}\n{}",
            tail(&t.log(), 60)
        );
    }
}

/// Sums `key=N` over the daemon's "spool recovered" log lines.
fn recovered_sum(log: &str, key: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("spool recovered"))
        .filter_map(|l| {
            let rest = &l[l.find(&format!("{key}="))? + key.len() + 1..];
            let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            digits.parse::<u64>().ok()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_acknowledged_message() {
    let started = Instant::now();
    let seed = seed();
    println!("crash test: seed={seed} (replay with TENSO_CRASH_SEED={seed})");
    let mut rng = Rng(seed);

    let dns = TestDns::builder().start().await;
    let sink = TestSink::start().await;
    let mut t = Tenso::prepare(&config(&dns, &sink, ""));
    let o = t.cli_async(&["user", "add", ALIAS, DEST]).await;
    assert!(
        o.status.success(),
        "user add: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    t.launch().await;

    let load = Arc::new(Load::default());
    *load.addr.lock().unwrap() = Some((t.smtp_addr(), 0));
    let clients: Vec<_> = (0..SESSIONS)
        .map(|_| tokio::spawn(load_loop(load.clone())))
        .collect();

    // Kill, restart, repeat. Each kill waits until the current daemon acknowledged
    // something (so every kill lands under load), then a random delay.
    let mut kills: Vec<Instant> = Vec::new();
    for k in 1..=KILLS {
        let base = load.acked_count();
        let flowing = common::wait_until(FLOW_TIMEOUT, || async {
            (load.acked_count() > base).then_some(())
        })
        .await;
        assert!(
            flowing.is_some(),
            "seed={seed}: no message acknowledged within {FLOW_TIMEOUT:?} after start #{k}; \
             refused: {:?}\n{}",
            load.refused
                .lock()
                .unwrap()
                .iter()
                .rev()
                .take(10)
                .collect::<Vec<_>>(),
            tail(&t.log(), 60)
        );
        tokio::time::sleep(Duration::from_millis(
            rng.range(KILL_DELAY_MS.0, KILL_DELAY_MS.1),
        ))
        .await;
        *load.addr.lock().unwrap() = None;
        kills.push(Instant::now());
        t.kill9().await;
        let bad = crash_point_problems(&t.data_dir().join("queue"));
        assert!(
            bad.is_empty(),
            "seed={seed}: spool right after kill #{k}: {bad:#?}\n{}",
            tail(&t.log(), 60)
        );
        t.launch().await;
        *load.addr.lock().unwrap() = Some((t.smtp_addr(), k));
    }

    // Stop the load; every session ends within its bounded reads.
    load.stop.store(true, Ordering::SeqCst);
    for c in clients {
        tokio::time::timeout(STOP_TIMEOUT, c)
            .await
            .unwrap_or_else(|_| panic!("seed={seed}: a load session did not stop"))
            .expect("load session panicked");
    }
    let acked_list = load.acked.lock().unwrap().clone();
    let acked: BTreeSet<u64> = acked_list.iter().map(|(id, _, _)| *id).collect();
    assert_eq!(
        acked.len(),
        acked_list.len(),
        "an id was acknowledged twice"
    );
    let sent = load.next_id.load(Ordering::SeqCst);
    let load_end = Instant::now();

    // Every acknowledged id reaches the sink (bounded wait).
    let deadline = Instant::now() + ARRIVAL_TIMEOUT;
    loop {
        let a = arrivals(&sink.messages());
        let missing: Vec<u64> = acked
            .iter()
            .filter(|id| !a.count.contains_key(id))
            .copied()
            .collect();
        if missing.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            let q = queue_list(&t).await;
            let where_: Vec<String> = missing.iter().take(10).map(|&id| locate(&t, id)).collect();
            panic!(
                "seed={seed}: {} of {} acknowledged message(s) did not arrive within \
                 {ARRIVAL_TIMEOUT:?}: {:?}{}\non disk: {where_:#?}\nqueue ({} entries): \
                 {:.2000}\ndaemon log tail:\n{}",
                missing.len(),
                acked.len(),
                &missing[..missing.len().min(50)],
                if missing.len() > 50 { " ..." } else { "" },
                q.len(),
                serde_json::to_string(&q).unwrap_or_default(),
                tail(&t.log(), 80)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let all_arrived = Instant::now();

    // Messages committed but never acknowledged (killed between commit and 250) are
    // delivered too: wait for the queue to empty.
    if let Err(q) = wait_queue_empty(&t).await {
        panic!(
            "seed={seed}: queue not empty {DRAIN_TIMEOUT:?} after all arrivals: {q:#?}\n{}",
            tail(&t.log(), 60)
        );
    }

    // Clean stop: the spool is whole and empty, nothing was ever quarantined.
    let status = t.stop().await;
    assert!(
        status.is_some_and(|s| s.success()),
        "seed={seed}: SIGTERM did not stop tenso cleanly: {status:?}\n{}",
        tail(&t.log(), 60)
    );
    let qdir = t.data_dir().join("queue");
    check_spool_empty(&qdir, "after the clean stop");
    check_quarantine(&t, "after the clean stop");

    // Restart: recovery finds nothing to fix, the queue is (and stays) empty.
    t.launch().await;
    if let Err(q) = wait_queue_empty(&t).await {
        panic!(
            "seed={seed}: queue not empty after the final restart: {q:#?}\n{}",
            tail(&t.log(), 60)
        );
    }
    check_spool_empty(&qdir, "after the final restart");
    check_quarantine(&t, "after the final restart");
    let log = t.log();
    assert_eq!(
        recovered_sum(&log, "quarantined"),
        0,
        "seed={seed}: a start-up recovery quarantined something:\n{}",
        log.lines()
            .filter(|l| l.contains("quarantin"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // The numbers.
    let a = arrivals(&sink.messages());
    assert!(
        a.corrupt.is_empty(),
        "seed={seed}: {} delivered copies are not what was sent: {:#?}",
        a.corrupt.len(),
        &a.corrupt[..a.corrupt.len().min(5)]
    );
    let missing: Vec<u64> = acked
        .iter()
        .filter(|id| !a.count.contains_key(id))
        .copied()
        .collect();
    assert!(missing.is_empty(), "seed={seed}: missing {missing:?}");
    let duplicates: usize = a.count.values().map(|c| c - 1).sum();
    let dup_ids = a.count.values().filter(|&&c| c > 1).count();
    let unacked_arrived = a.count.keys().filter(|id| !acked.contains(id)).count();
    let refused = load.refused.lock().unwrap().clone();

    // The 250s a killed daemon gave last (the ones most at risk; some are read from the
    // socket buffer after the kill) are among the delivered, like every other one.
    let mut last_before_kill = Vec::new();
    let mut near_kill = 0;
    for (start, killed_at) in kills.iter().enumerate() {
        let of_start: Vec<&(u64, Instant, usize)> =
            acked_list.iter().filter(|a| a.2 == start).collect();
        if let Some(last) = of_start.iter().max_by_key(|a| a.1) {
            last_before_kill.push(last.0);
        }
        near_kill += of_start
            .iter()
            .filter(|a| a.1 + Duration::from_millis(50) >= *killed_at)
            .count();
    }
    assert!(
        last_before_kill.iter().all(|id| a.count.contains_key(id)),
        "seed={seed}: last acknowledgements before the kills: {last_before_kill:?}"
    );

    println!(
        "crash test: seed={seed} kills={} sessions={SESSIONS} sessions_opened={} sent={sent} acked={} arrived={} \
         duplicates={duplicates} (ids with duplicates: {dup_ids}) unacked_arrived={unacked_arrived} \
         refused={} broken_connections={} partial_removed_at_restarts={} \
         acked_within_50ms_of_a_kill={near_kill} last_acked_before_each_kill={:?}",
        kills.len(),
        load.sessions.load(Ordering::Relaxed),
        acked.len(),
        a.total,
        refused.len(),
        load.broken.load(Ordering::Relaxed),
        recovered_sum(&log, "partial_removed"),
        last_before_kill,
    );
    println!(
        "crash test: load {:.1?}, all acknowledged arrived {:.1?} after it, queue drained \
         and checked in {:.1?}, clean stop status {status:?}, \
         total {:.1?}",
        load_end.duration_since(started),
        all_arrived.duration_since(load_end),
        all_arrived.elapsed(),
        started.elapsed()
    );
    if !refused.is_empty() {
        println!(
            "crash test: refused (not counted): {:?}",
            &refused[..refused.len().min(10)]
        );
    }
    assert!(kills.len() >= 10);
    assert!(!acked.is_empty());
    t.stop().await;
}

/// The number of load refusals with code 452 so far.
fn refused_452(load: &Load) -> usize {
    load.refused
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.1 == 452)
        .count()
}

/// Waits (bounded) until `cond` holds for the load; panics with the log otherwise.
async fn wait_load(t: &Tenso, what: &str, cond: impl Fn() -> bool) {
    let ok = common::wait_until(FLOW_TIMEOUT, || async { cond().then_some(()) }).await;
    assert!(
        ok.is_some(),
        "{what} within {FLOW_TIMEOUT:?}\n{}",
        tail(&t.log(), 60)
    );
}

/// Kill -9 and restart once traffic flows (the daemon acknowledged something new).
async fn kill_under_load(t: &mut Tenso, load: &Load, rng: &mut Rng, start: usize) {
    let base = load.acked_count();
    wait_load(t, "no message acknowledged", || load.acked_count() > base).await;
    tokio::time::sleep(Duration::from_millis(
        rng.range(KILL_DELAY_MS.0, KILL_DELAY_MS.1),
    ))
    .await;
    *load.addr.lock().unwrap() = None;
    t.kill9().await;
    let bad = crash_point_problems(&t.data_dir().join("queue"));
    assert!(bad.is_empty(), "spool right after a kill: {bad:#?}");
    t.launch().await;
    *load.addr.lock().unwrap() = Some((t.smtp_addr(), start));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_fills_during_kill_and_restart_and_nothing_is_lost() {
    const MIB: u64 = 1024 * 1024;
    let seed = seed();
    println!("crash test (disk fills): seed={seed} (replay with TENSO_CRASH_SEED={seed})");
    let mut rng = Rng(seed);
    let dns = TestDns::builder().start().await;
    let sink = TestSink::start().await;
    let mut t = Tenso::prepare(&config(
        &dns,
        &sink,
        &format!("min_free_space = {}", 8 * MIB),
    ));
    let Some(fs) = tmpfs_support::Tmpfs::mount(t.data_dir(), 40) else {
        return;
    };
    let o = t.cli_async(&["user", "add", ALIAS, DEST]).await;
    assert!(
        o.status.success(),
        "user add: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    t.launch().await;
    let load = Arc::new(Load::default());
    *load.addr.lock().unwrap() = Some((t.smtp_addr(), 0));
    let clients: Vec<_> = (0..2)
        .map(|_| tokio::spawn(load_loop(load.clone())))
        .collect();

    kill_under_load(&mut t, &load, &mut rng, 1).await;
    // The disk fills (below min_free_space, with room for the daemon to restart).
    let filler = fs.fill(4 * MIB);
    wait_load(&t, "no 452 while the disk is short", || {
        refused_452(&load) > 0
    })
    .await;
    *load.addr.lock().unwrap() = None;
    t.kill9().await;
    t.launch().await;
    *load.addr.lock().unwrap() = Some((t.smtp_addr(), 2));
    let before = refused_452(&load);
    wait_load(&t, "no 452 after the restart on a short disk", || {
        refused_452(&load) > before
    })
    .await;
    // Space returns: the same daemon takes mail again, then more kills.
    std::fs::remove_file(&filler).unwrap();
    kill_under_load(&mut t, &load, &mut rng, 3).await;
    kill_under_load(&mut t, &load, &mut rng, 4).await;

    load.stop.store(true, Ordering::SeqCst);
    for c in clients {
        tokio::time::timeout(STOP_TIMEOUT, c)
            .await
            .expect("a load session did not stop")
            .expect("load session panicked");
    }
    let acked: BTreeSet<u64> = load.acked.lock().unwrap().iter().map(|a| a.0).collect();
    let arrived = common::wait_until(ARRIVAL_TIMEOUT, || async {
        let a = arrivals(&sink.messages());
        acked.iter().all(|id| a.count.contains_key(id)).then_some(a)
    })
    .await;
    let Some(a) = arrived else {
        let a = arrivals(&sink.messages());
        let missing: Vec<u64> = acked
            .iter()
            .filter(|id| !a.count.contains_key(id))
            .copied()
            .collect();
        panic!(
            "seed={seed}: acknowledged but not arrived: {missing:?}\n{}",
            tail(&t.log(), 60)
        );
    };
    assert!(a.corrupt.is_empty(), "seed={seed}: {:#?}", a.corrupt);
    if let Err(q) = wait_queue_empty(&t).await {
        panic!(
            "seed={seed}: queue not empty: {q:#?}\n{}",
            tail(&t.log(), 60)
        );
    }
    let status = t.stop().await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    check_spool_empty(&t.data_dir().join("queue"), "after the disk-full run");
    check_quarantine(&t, "after the disk-full run");
    let full = refused_452(&load);
    let refusals = load.refused.lock().unwrap().len();
    println!(
        "crash test (disk fills): seed={seed} acked={} arrived={} refused_452={full} other_refusals={}",
        acked.len(),
        a.total,
        refusals - full,
    );
    assert!(!acked.is_empty());
}
