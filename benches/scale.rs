//! Scale benchmarks (issue 7): `cargo bench --bench scale [-- aliases|idle]`.
//!
//! - `aliases`: imports 1,000,000 aliases with `tenso import` (the real CLI, release
//!   build), measures RCPT-time lookups (`Table::resolve`, the call a RCPT makes) for
//!   p50/p99/max over 200,000 random recipients (hits, subaddress hits, misses), and
//!   the daemon's RSS serving that table.
//! - `idle`: holds 10,000 idle inbound connections (from 127.0.0.2-.41), then measures
//!   how long a new client waits for its greeting, and the daemon's RSS.
//!
//! Figures are printed, never asserted: this machine is shared and noisy. Under
//! `cargo test --all-targets` (no `--bench`) it is a smoke run of the same code at a
//! fiftieth of the size, so CI does not spend minutes importing a million aliases.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tenso::smtp::address::Mailbox;
use tenso::table::Table;

const BIN: &str = env!("CARGO_BIN_EXE_tenso");

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn write_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let cfg = dir.join("tenso.toml");
    std::fs::write(
        &cfg,
        format!(
            "hostname = \"bench.test\"\ndata_dir = \"{}\"\n[smtp]\nlisten = [\"127.0.0.1:0\"]\nmax_connections = 20000\n\
             [auth]\nspf = false\ndkim = false\n[tls]\nstarttls = false\n{extra}",
            dir.join("data").display()
        ),
    )
    .unwrap();
    cfg
}

struct Daemon {
    child: Child,
    addr: SocketAddr,
}

impl Daemon {
    fn start(cfg: &Path, data: &Path) -> Daemon {
        let _ = std::fs::remove_file(data.join("tenso.listen"));
        let mut d = Daemon {
            child: Command::new(BIN)
                .args(["--config", cfg.to_str().unwrap(), "serve"])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn tenso"),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let t = Instant::now();
        loop {
            if let Ok(s) = std::fs::read_to_string(data.join("tenso.listen"))
                && let Some(a) = s.lines().next().and_then(|l| l.parse().ok())
            {
                d.addr = a;
                return d;
            }
            // Dropping `d` kills the daemon if it never comes up.
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "daemon did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `cargo bench` passes `--bench`; `cargo test --all-targets` does not.
fn full_size() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// `n` under `cargo bench`, `n / 50` (at least 100) in the smoke run.
fn sized(n: usize) -> usize {
    if full_size() { n } else { (n / 50).max(100) }
}

fn pct(v: &mut [Duration], q: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
}

fn aliases() {
    let dir = tempfile::tempdir().unwrap();
    let n = sized(1_000_000) as u32;
    let file = dir.path().join("virtual");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&file).unwrap());
        for i in 0..n {
            writeln!(
                f,
                "user{i}@alias{}.test dest{i}@d{}.example",
                i % 100,
                i % 7
            )
            .unwrap();
        }
    }
    let cfg = write_config(dir.path(), "");
    let t = Instant::now();
    let out = Command::new(BIN)
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "import",
            file.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let import = t.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "import of {n} aliases (tenso import, direct mode): {:.1} s  [{}]",
        import.as_secs_f64(),
        String::from_utf8_lossy(&out.stdout).trim()
    );

    // The RCPT path: Table::resolve on the same store, in this process.
    // The daemon's default cache size ([table] cache_bytes), or TENSO_BENCH_CACHE_MB.
    let cache = std::env::var("TENSO_BENCH_CACHE_MB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(tenso::config::Config::default().table.cache_bytes, |mb| {
            mb << 20
        });
    println!("sled cache for the lookups: {} MiB", cache >> 20);
    let table = Table::open(&dir.path().join("data/table"), cache, Some('+'), 8).unwrap();
    let mut rng_state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state
    };
    let probes: Vec<Mailbox> = (0..sized(200_000))
        .map(|k| {
            let i = (next() % n as u64) as u32;
            let addr = match k % 3 {
                0 => format!("user{i}@alias{}.test", i % 100),
                1 => format!("user{i}+tag@alias{}.test", i % 100),
                _ => format!("nobody{i}@alias{}.test", i % 100),
            };
            Mailbox::parse(&addr).unwrap()
        })
        .collect();
    // Baseline in the same run: the same probes against an in-memory HashMap of the
    // same keys. Its tail is this machine's noise floor (preemption, page faults).
    {
        let keys: std::collections::HashSet<String> = (0..n)
            .map(|i| format!("user{i}@alias{}.test", i % 100))
            .collect();
        let mut lat = Vec::with_capacity(probes.len());
        let mut hits = 0;
        for m in &probes {
            let t = Instant::now();
            let k = format!("{}@{}", m.local.to_lowercase(), m.domain.to_lowercase());
            hits += usize::from(keys.contains(&k));
            lat.push(t.elapsed());
        }
        println!(
            "baseline HashMap lookups, {} probes, {hits} hits: p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
            lat.len(),
            pct(&mut lat, 0.50).as_secs_f64() * 1e6,
            pct(&mut lat, 0.99).as_secs_f64() * 1e6,
            pct(&mut lat, 1.0).as_secs_f64() * 1e6,
        );
    }
    // First pass: a freshly opened store (pages loaded on first touch); second pass:
    // the same probes again, as a running daemon sees them once warm.
    for pass in ["cold", "warm"] {
        let mut lat = Vec::with_capacity(probes.len());
        let mut hits = 0;
        for m in &probes {
            let t = Instant::now();
            let r = table.lookup_rcpt(m).unwrap();
            lat.push(t.elapsed());
            hits += usize::from(matches!(r, tenso::table::RcptLookup::Found(_)));
        }
        println!(
            "RCPT lookups (Table::lookup_rcpt), {pass}, {} probes, {hits} hits: p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
            lat.len(),
            pct(&mut lat, 0.50).as_secs_f64() * 1e6,
            pct(&mut lat, 0.99).as_secs_f64() * 1e6,
            pct(&mut lat, 1.0).as_secs_f64() * 1e6,
        );
    }
    drop(table);

    let d = Daemon::start(&cfg, &dir.path().join("data"));
    // Exercise the table through SMTP a little, then read the resident size.
    for i in 0..200u32 {
        // Known aliases only: unknown ones would earn this client the "user unknown"
        // slow-down (the smoke run's table is small).
        let u = (i * 4999) % n;
        let mut s = TcpStream::connect(d.addr).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        write!(
            s,
            "HELO b\r\nMAIL FROM:<s@o.test>\r\nRCPT TO:<user{u}@alias{}.test>\r\nQUIT\r\n",
            u % 100
        )
        .unwrap();
        for _ in 0..4 {
            line.clear();
            r.read_line(&mut line).unwrap();
        }
        assert!(line.starts_with("250") || line.starts_with("221"), "{line}");
    }
    println!(
        "daemon RSS serving {n} aliases: {} MiB",
        rss_kib(d.child.id()) / 1024
    );
}

fn raise_nofile(n: u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on our own process.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = n.min(r.rlim_max);
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
}

fn idle() {
    let count = sized(10_000);
    raise_nofile(65536);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "[limits]\nmax_connections_per_ip = 100000\nconnect_rate_per_minute = 10000000\n",
    );
    let d = Daemon::start(&cfg, &dir.path().join("data"));
    let base = rss_kib(d.child.id());
    let mut held = Vec::with_capacity(count);
    let t = Instant::now();
    for i in 0..count {
        let src: std::net::IpAddr = format!("127.0.0.{}", 2 + i % 40).parse().unwrap();
        let sock = socket2_connect(src, d.addr);
        held.push(sock);
    }
    // Everyone got a greeting? Read them all (bounded by the socket timeout).
    let mut greeted = 0;
    for s in &held {
        let mut buf = [0u8; 128];
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        if let Ok(n) = std::io::Read::read(&mut &*s, &mut buf)
            && buf[..n].starts_with(b"220")
        {
            greeted += 1;
        }
    }
    println!(
        "{count} idle connections opened in {:.1} s, {greeted} greeted",
        t.elapsed().as_secs_f64()
    );
    let mut waits = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let s = socket2_connect("127.0.0.99".parse().unwrap(), d.addr);
        let mut buf = [0u8; 128];
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let n = std::io::Read::read(&mut &s, &mut buf).unwrap();
        assert!(buf[..n].starts_with(b"220"));
        waits.push(t.elapsed());
    }
    println!(
        "new client while {count} idle are held: greeting after p50 {:.2} ms, max {:.2} ms",
        pct(&mut waits, 0.5).as_secs_f64() * 1e3,
        pct(&mut waits, 1.0).as_secs_f64() * 1e3
    );
    println!(
        "daemon RSS: {} MiB idle before, {} MiB with {count} idle connections",
        base / 1024,
        rss_kib(d.child.id()) / 1024
    );
}

/// A TCP connection from a chosen loopback source address.
fn socket2_connect(src: std::net::IpAddr, dst: SocketAddr) -> std::net::TcpStream {
    // std has no bind-before-connect; tokio's TcpSocket does, on a tiny runtime.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(SocketAddr::new(src, 0)).unwrap();
        let std = s.connect(dst).await.unwrap().into_std().unwrap();
        std.set_nonblocking(false).unwrap();
        std
    })
}

fn main() {
    let which: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let all = which.is_empty();
    if all || which.iter().any(|w| w == "aliases") {
        aliases();
    }
    if all || which.iter().any(|w| w == "idle") {
        idle();
    }
}
