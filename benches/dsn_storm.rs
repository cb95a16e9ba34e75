//! Forged bounce storm (issue 11): `cargo bench --bench dsn_storm`.
//!
//! Runs the release daemon against a tiny in-process SMTP sink, sends one "bait" mail
//! through an alias (the attacker's chosen Message-ID), then sends a ~650 KB DSN
//! naming 4,000 recipients that quotes it — ROUNDS times in two shapes: strangers only
//! (uncorrelated), and the real destination among the strangers (correlated, one
//! health write). Meanwhile a second session sends NOOP after NOOP. Printed: the time
//! from the DSN's final dot to its 250 (p50, max), the worst NOOP round trip during
//! the storms, the same without a storm, and the RCPT round trip to the attacked alias
//! before and after (the issue saw it grow from 0.2 to 2.6 ms).
//!
//! Figures are printed, never asserted (a noisy shared machine). Under `cargo test`
//! (no `--bench` argument) it runs one round as a smoke test.

#[path = "../tests/storm_support/mod.rs"]
mod storm_support;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tenso");
const ALIAS: &str = "storm@alias.test";
const BAIT: &str = "bait@attacker.test";
const IO: Duration = Duration::from_secs(60);

/// A sink that accepts everything, one thread per connection.
fn start_sink() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = sink_session(s);
            });
        }
    });
    addr
}

fn sink_session(s: TcpStream) -> std::io::Result<()> {
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    w.write_all(b"220 sink ESMTP\r\n")?;
    let mut line = String::new();
    let mut in_data = false;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if in_data {
            if line == ".\r\n" {
                in_data = false;
                w.write_all(b"250 2.0.0 ok\r\n")?;
            }
            continue;
        }
        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
        match verb.as_str() {
            "EHLO" => w.write_all(b"250-sink\r\n250 PIPELINING\r\n")?,
            "DATA" => {
                in_data = true;
                w.write_all(b"354 go\r\n")?
            }
            "QUIT" => return w.write_all(b"221 bye\r\n"),
            _ => w.write_all(b"250 2.0.0 ok\r\n")?,
        }
    }
}

struct Smtp {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Smtp {
    fn connect(addr: SocketAddr) -> Smtp {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(IO)).unwrap();
        s.set_nodelay(true).unwrap();
        let mut c = Smtp {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
        };
        assert_eq!(c.reply().0, 220);
        c.cmd("EHLO bench.test", 250);
        c
    }

    fn reply(&mut self) -> (u16, String) {
        loop {
            let mut l = String::new();
            assert!(self.r.read_line(&mut l).unwrap() > 0, "connection closed");
            if l.as_bytes().get(3) != Some(&b'-') {
                return (l[..3].parse().unwrap(), l);
            }
        }
    }

    fn cmd(&mut self, line: &str, want: u16) -> Duration {
        let t = Instant::now();
        self.w.write_all(format!("{line}\r\n").as_bytes()).unwrap();
        let (code, text) = self.reply();
        assert_eq!(code, want, "{line}: {text}");
        t.elapsed()
    }

    /// Sends a message; returns the time from the final dot to the 250.
    fn message(&mut self, from: &str, to: &str, data: &[u8]) -> Duration {
        self.cmd(&format!("MAIL FROM:<{from}>"), 250);
        self.cmd(&format!("RCPT TO:<{to}>"), 250);
        self.cmd("DATA", 354);
        self.w.write_all(data).unwrap();
        let t = Instant::now();
        self.w.write_all(b".\r\n").unwrap();
        let (code, text) = self.reply();
        assert_eq!(code, 250, "end of data: {text}");
        t.elapsed()
    }
}

fn cli(cfg: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("--config")
        .arg(cfg)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "tenso {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(dir: &Path, sink: SocketAddr) -> (Daemon, SocketAddr, std::path::PathBuf) {
    let cfg = dir.join("tenso.toml");
    let data = dir.join("data");
    std::fs::write(
        &cfg,
        format!(
            "hostname = \"bench.test\"\ndata_dir = \"{}\"\n[smtp]\nlisten = [\"127.0.0.1:0\"]\n\
             [auth]\nspf = false\ndkim = false\n[tls]\nstarttls = false\n\
             [delivery]\nroutes = {{ \"*\" = \"{sink}\" }}\n[pool]\nmax_messages = 100000\nmax_bytes = 10000000000\n",
            data.display()
        ),
    )
    .unwrap();
    cli(
        &cfg,
        &["user", "add", ALIAS, "victim@dest.test", "--bounce", "pool"],
    );
    let child = Command::new(BIN)
        .args(["--config", cfg.to_str().unwrap(), "serve"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let d = Daemon(child);
    let t = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(data.join("tenso.listen"))
            && let Some(a) = s.lines().next().and_then(|l| l.parse().ok())
        {
            return (d, a, cfg);
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// NOOPs in a loop until `stop`; returns the slowest round trip.
fn noop_loop(addr: SocketAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(Duration, u64)> {
    std::thread::spawn(move || {
        let mut c = Smtp::connect(addr);
        let (mut worst, mut n) = (Duration::ZERO, 0);
        while !stop.load(Ordering::SeqCst) {
            worst = worst.max(c.cmd("NOOP", 250));
            n += 1;
        }
        (worst, n)
    })
}

fn rcpt_time(addr: SocketAddr, n: usize) -> Duration {
    let mut c = Smtp::connect(addr);
    c.cmd("MAIL FROM:<probe@origin.test>", 250);
    let mut v: Vec<Duration> = (0..n)
        .map(|_| c.cmd(&format!("RCPT TO:<{ALIAS}>"), 250))
        .collect();
    v.sort();
    v[v.len() / 2]
}

fn dot_stuffed(m: &[u8]) -> Vec<u8> {
    // No line of these messages starts with a dot.
    assert!(!m.windows(3).any(|w| w == b"\n.."));
    m.to_vec()
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let rounds = if bench { 10 } else { 1 };
    let tmp = tempfile::tempdir().unwrap();
    let sink = start_sink();
    let (_d, addr, cfg) = start(tmp.path(), sink);

    let mut c = Smtp::connect(addr);
    let bait = format!(
        "From: attacker@origin.test\r\nTo: {ALIAS}\r\nSubject: bait\r\nMessage-ID: <{BAIT}>\r\n\r\nhi\r\n"
    );
    c.message("attacker@origin.test", ALIAS, bait.as_bytes());
    let t = Instant::now();
    while !cli(&cfg, &["queue", "list", "--json"])
        .trim()
        .starts_with("[]")
    {
        assert!(t.elapsed() < IO, "bait not delivered");
        std::thread::sleep(Duration::from_millis(50));
    }
    let rcpt_before = rcpt_time(addr, 200);

    // Without a storm: the NOOP round trip on its own.
    let stop = Arc::new(AtomicBool::new(false));
    let h = noop_loop(addr, stop.clone());
    std::thread::sleep(Duration::from_millis(if bench { 2000 } else { 200 }));
    stop.store(true, Ordering::SeqCst);
    let (idle_worst, idle_n) = h.join().unwrap();

    for (shape, real) in [
        ("strangers only", None),
        ("real destination among them", Some((3, "victim@dest.test"))),
    ] {
        let rcpts = storm_support::storm_recipients(4000, real);
        let mut times = Vec::new();
        let stop = Arc::new(AtomicBool::new(false));
        let h = noop_loop(addr, stop.clone());
        let mut size = 0;
        for i in 0..rounds {
            let dsn = storm_support::forged_dsn(
                ALIAS,
                BAIT,
                &rcpts,
                "550 5.1.1 user unknown",
                &format!("r{i}-{}", real.is_some()),
            );
            size = dsn.len();
            times.push(c.message("", ALIAS, &dot_stuffed(&dsn)));
        }
        stop.store(true, Ordering::SeqCst);
        let (worst, n) = h.join().unwrap();
        times.sort();
        println!(
            "forged DSN, {shape}: {size} bytes, 4000 groups, {rounds} rounds: dot→250 p50 {:.1} ms, max {:.1} ms; \
             concurrent NOOP worst {:.2} ms over {n} NOOPs",
            times[times.len() / 2].as_secs_f64() * 1e3,
            times[times.len() - 1].as_secs_f64() * 1e3,
            worst.as_secs_f64() * 1e3,
        );
    }
    let rcpt_after = rcpt_time(addr, 200);
    let shown = cli(&cfg, &["user", "show", ALIAS, "--json"]);
    let health = shown.matches("\"dest\"").count();
    let status = cli(&cfg, &["status", "--json"]);
    let groups = status
        .split("\"dsn_groups_read\":")
        .nth(1)
        .and_then(|s| s.trim().split([',', '\n']).next())
        .unwrap_or("?")
        .trim()
        .to_string();
    println!(
        "without a storm: NOOP worst {:.2} ms over {idle_n} NOOPs; RCPT to the alias p50 {:.3} ms before, {:.3} ms after; \
         health entries {health}; DSN groups read in all {groups}",
        idle_worst.as_secs_f64() * 1e3,
        rcpt_before.as_secs_f64() * 1e3,
        rcpt_after.as_secs_f64() * 1e3,
    );
}
