//! Outbound TLS session reuse (issue 14): `cargo bench --bench tls_reuse [-- N [C]]`.
//!
//! Delivers N (default 10,000) 2 KB messages through tenso's delivery layer
//! (`Delivery::deliver`, C = 10 at a time) to a STARTTLS sink in a separate process,
//! with `tls = "verify"` (a certificate from a test CA, trusted through `ca_file`):
//! once with idle sessions reused (`idle_timeout = 60s`) and once with a new TCP
//! connection and TLS handshake per message (`idle_timeout = 0`). Prints msgs/s and
//! tenso's CPU time per message (getrusage of this process; the sink's CPU is not
//! counted). Figures are printed, never asserted: the machine is shared and noisy.

#[path = "../tests/common/sink.rs"]
mod sink;
#[path = "../tests/common/tls.rs"]
mod tls;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tenso::config::{Config, TlsMode};
use tenso::delivery::{Delivery, Job, Outcome};

fn cpu_ms() -> f64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 * 1000.0 + tv.tv_usec as f64 / 1000.0;
    t(u.ru_utime) + t(u.ru_stime)
}

/// The sink process: STARTTLS with the certificate in `dir`, prints its port, runs
/// until its stdin closes.
async fn sink_child(dir: &Path) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    tls::install_crypto_provider();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("cert.pem"))
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("key.pem")).unwrap();
    let cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let s = sink::TestSink::builder()
        .starttls(Arc::new(cfg))
        .start()
        .await;
    println!("{}", s.port());
    std::io::stdout().flush().unwrap();
    tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    })
    .await
    .unwrap();
    eprintln!(
        "sink: {} connections, {} transactions",
        s.connections(),
        s.transactions()
    );
}

fn message() -> Vec<u8> {
    let mut m = b"From: <bench@origin.test>\r\nTo: <rcpt@dest.test>\r\nSubject: tls reuse bench\r\nMessage-ID: <bench@origin.test>\r\n\r\n".to_vec();
    while m.len() < 2048 - 80 {
        m.extend_from_slice(
            b"The quick brown fox jumps over the lazy dog; 0123456789 abcdefghijklmnop.\r\n",
        );
    }
    m
}

async fn run(port: u16, ca: &Path, idle: Duration, n: usize, c: usize) -> (f64, f64, usize) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config {
        hostname: "bench.test".into(),
        data_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    cfg.delivery
        .routes
        .insert("*".into(), format!("127.0.0.1:{port}"));
    cfg.delivery.tls = TlsMode::Verify;
    cfg.delivery.ca_file = Some(ca.to_path_buf());
    cfg.delivery.idle_timeout = idle;
    cfg.delivery.mta_sts = false;
    let cfg = Arc::new(cfg);
    let table = tenso::table::Table::open(&dir.path().join("table"), 1 << 24, None, 8).unwrap();
    let resolver = tenso::dns::build(&cfg).unwrap();
    let d = Delivery::new(cfg, resolver, &table).unwrap();
    let msg = Arc::new(tenso::delivery::outgoing::Outgoing::memory(message()));
    let (t0, cpu0) = (Instant::now(), cpu_ms());
    let mut set = tokio::task::JoinSet::new();
    for w in 0..c {
        let (d, msg) = (d.clone(), msg.clone());
        let count = n / c + usize::from(w < n % c);
        set.spawn(async move {
            let mut failed = 0;
            for i in 0..count {
                let id = format!("B{w:02}{i:06}");
                let job = Job {
                    queue_id: &id,
                    domain: "dest.test",
                    mail_from: "bench@origin.test",
                    rcpts: vec!["rcpt@dest.test".into()],
                    message: &msg,
                    needs_smtputf8: false,
                    env_id: None,
                };
                let r = d.deliver(&job).await;
                if !matches!(r.outcomes[0], Outcome::Delivered(_)) {
                    failed += 1;
                    if failed == 1 {
                        eprintln!("not delivered: {:?}", r.outcomes[0]);
                    }
                }
            }
            failed
        });
    }
    let mut failed = 0;
    while let Some(f) = set.join_next().await {
        failed += f.unwrap();
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_ms() - cpu0;
    (n as f64 / secs, cpu / n as f64, failed)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let all: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this with nothing:
    // then a small smoke run keeps the suite fast.
    let bench = all.iter().any(|a| a == "--bench");
    let args: Vec<String> = all.into_iter().filter(|a| a != "--bench").collect();
    if args.first().map(String::as_str) == Some("--sink-child") {
        return sink_child(Path::new(&args[1])).await;
    }
    let default_n = if bench { 10_000 } else { 200 };
    let n: usize = args
        .first()
        .and_then(|a| a.parse().ok())
        .unwrap_or(default_n);
    let c: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10);
    let pki = tls::TestPki::new(&["127.0.0.1", "localhost"]);
    let dir = tempfile::tempdir().unwrap();
    pki.write_to_dir(dir.path());
    let mut child = Command::new(std::env::current_exe().unwrap())
        .arg("--sink-child")
        .arg(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line.trim().parse().expect("sink port");
    let ca = dir.path().join("ca.pem");
    println!("{n} messages of 2 KB, {c} at a time, tls = \"verify\", sink in its own process");
    println!("| sessions | msgs/s | tenso CPU ms/msg | not delivered |");
    println!("|---|---|---|---|");
    for (name, idle) in [
        ("reused", Duration::from_secs(60)),
        ("new per message", Duration::ZERO),
    ] {
        let (rate, cpu, failed) = run(port, &ca, idle, n, c).await;
        println!("| {name} | {rate:.0} | {cpu:.3} | {failed} |");
    }
    drop(child.stdin.take());
    let _ = child.wait();
}
