//! Shared helpers for the abuse-control tests (issue 6): limits, penalty, idle flood,
//! STARTTLS, reputation and pacing. Include with `mod abuse_support;` next to
//! `mod common;`.
#![allow(dead_code)]

use crate::common::daemon::Tenso;
use crate::common::dns::TestDns;
use crate::common::smtp_client::RawSmtp;
use serde_json::Value;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpSocket, TcpStream};

/// Upper bound for every polling wait in these tests.
pub const WAIT: Duration = Duration::from_secs(30);

pub const FROM: &str = "s@origin.test";

/// 127.0.0.n: Linux routes all of 127/8 to lo, so each is a distinct client.
pub fn ip(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

#[allow(unused_imports)] // not every test binary uses it
pub use crate::common::closed_port;

/// The parts of a test config; `Default` forwards to a closed port with a one-hour
/// retry (accepted mail stays queued) and keeps the built-in limits.
#[derive(Default, Clone)]
pub struct Conf {
    /// Extra lines in `[dns]` (the nameserver line is added).
    pub dns: String,
    /// Extra lines in `[smtp]` (the listen line is added).
    pub smtp: String,
    /// Lines of `[limits]`.
    pub limits: String,
    /// Whole extra tables (`[reputation]`, `[tls]`, ...).
    pub more: String,
    /// Where `"*"` is routed; None: a closed port.
    pub route: Option<SocketAddr>,
    /// Lines of `[queue]`; empty: `retry = ["1h"]`.
    pub queue: String,
}

impl Conf {
    pub fn render(&self, dns: &TestDns) -> String {
        let route = self
            .route
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], closed_port())));
        let queue = if self.queue.is_empty() {
            "retry = [\"1h\"]"
        } else {
            &self.queue
        };
        format!(
            "postmaster = [\"pm@dest.test\"]\n\n\
             [dns]\n{}\n{}\n\n\
             [smtp]\nlisten = [\"127.0.0.1:0\"]\n{}\n\n\
             [delivery]\nroutes = {{ \"*\" = \"{route}\" }}\n\n\
             [queue]\n{queue}\n\n\
             [limits]\n{}\n\n{}\n",
            dns.resolver_config_toml(),
            self.dns,
            self.smtp,
            self.limits,
            self.more
        )
    }
}

pub async fn cli_ok(t: &Tenso, args: &[&str]) -> String {
    t.cli_ok(args).await
}

/// Starts a daemon for `conf` with `alice@alias.test` and `bob@alias.test`
/// (→ `@dest.test`).
pub async fn relay(conf: &Conf, dns: &TestDns) -> Tenso {
    let mut t = Tenso::prepare(&conf.render(dns));
    for args in [
        &["user", "add", "alice@alias.test", "alice@dest.test"][..],
        &["user", "add", "bob@alias.test", "bob@dest.test"],
    ] {
        cli_ok(&t, args).await;
    }
    t.launch().await;
    t
}

/// `tenso status --json` → `counters`.
pub async fn counters(t: &Tenso) -> Value {
    t.counters().await
}

/// One counter, e.g. `counter(&t, "inbound", "busy")`; panics when it is missing.
pub async fn counter(t: &Tenso, section: &str, name: &str) -> u64 {
    let c = counters(t).await;
    c[section][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {section}.{name} in {c}"))
}

/// Waits until counter `section.name` is at least `min`; returns its value.
pub async fn wait_counter(t: &Tenso, section: &str, name: &str, min: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let v = counter(t, section, name).await;
        if v >= min {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!(
                "waited {WAIT:?} for {section}.{name} >= {min} (is {v})\nlog:\n{}",
                t.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for a log line containing every one of `needles`; panics after `WAIT`.
pub async fn expect_log(t: &Tenso, needles: &[&str]) {
    let found = crate::common::wait_until(WAIT, || async {
        t.log()
            .lines()
            .any(|l| needles.iter().all(|n| l.contains(n)))
            .then_some(())
    })
    .await;
    assert!(
        found.is_some(),
        "no log line with {needles:?}; log:\n{}",
        t.log()
    );
}

/// Log lines containing every one of `needles`.
pub fn log_lines(t: &Tenso, needles: &[&str]) -> Vec<String> {
    t.log()
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_string)
        .collect()
}

/// A TCP connection from `from` to `to`, bounded by 10 s.
pub async fn tcp_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().expect("socket");
    sock.bind(SocketAddr::new(from, 0))
        .unwrap_or_else(|e| panic!("bind {from}: {e}"));
    tokio::time::timeout(Duration::from_secs(10), sock.connect(to))
        .await
        .unwrap_or_else(|_| panic!("connect {from} -> {to}: timeout"))
        .unwrap_or_else(|e| panic!("connect {from} -> {to}: {e}"))
}

/// Reads one CRLF line (without it) within `timeout`; Err on EOF, error or timeout.
pub async fn read_line<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
    timeout: Duration,
) -> Result<String, String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(p) = buf.windows(2).position(|w| w == b"\r\n") {
            let line: Vec<u8> = buf.drain(..p + 2).collect();
            return Ok(String::from_utf8_lossy(&line[..p]).into_owned());
        }
        let mut tmp = [0u8; 4096];
        match tokio::time::timeout_at(deadline, s.read(&mut tmp)).await {
            Err(_) => return Err("timeout".into()),
            Ok(Err(e)) => return Err(e.to_string()),
            Ok(Ok(0)) => return Err("EOF".into()),
            Ok(Ok(n)) => buf.extend_from_slice(&tmp[..n]),
        }
    }
}

/// Connects from `from` and reads the greeting; returns it and how long it took.
pub async fn greeted_from(from: IpAddr, to: SocketAddr) -> (RawSmtp, Duration) {
    let t0 = Instant::now();
    let c = RawSmtp::connect_from(from, to).await;
    (c, t0.elapsed())
}

/// The RFC 3463 enhanced code at the start of a reply text.
pub fn esc(text: &str) -> &str {
    text.split_whitespace().next().unwrap_or("")
}

/// A complete message from `FROM` to `rcpt` on a fresh or open session.
pub async fn send_ok(c: &mut RawSmtp, rcpt: &str, token: &str) -> String {
    let body =
        format!("Subject: {token}\r\nMessage-ID: <{token}@origin.test>\r\n\r\nbody {token}\r\n");
    match c.send_message(FROM, &[rcpt], body.as_bytes()).await {
        Ok((250, text)) => text,
        other => panic!("message {token} to {rcpt} not accepted: {other:?}"),
    }
}

/// A new client from `from` that is greeted 220 and gets one message through.
pub async fn legit_client(t: &Tenso, from: IpAddr, token: &str) {
    let mut c = RawSmtp::connect_from(from, t.smtp_addr()).await;
    assert_eq!(
        c.greeting.0, 220,
        "legitimate client {from}: {:?}",
        c.greeting
    );
    send_ok(&mut c, "alice@alias.test", token).await;
    c.quit().await;
}

/// The daemon's open-file limit (soft) from /proc/PID/limits.
pub fn nofile_limit(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read limits");
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files line");
    line.split_whitespace()
        .nth(3)
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX)
}

/// VmRSS of a process in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// Raises this process's soft RLIMIT_NOFILE to at least `want` (up to the hard
/// limit); returns the soft limit now in force. Children inherit it.
pub fn raise_nofile(want: libc::rlim_t) -> libc::rlim_t {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut r), 0);
        if r.rlim_cur < want {
            r.rlim_cur = want.min(r.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &r), 0);
        }
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut r), 0);
    }
    r.rlim_cur
}
