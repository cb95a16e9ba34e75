//! Submission throughput (issue 15): `cargo bench --bench submission`.
//!
//! Runs the release daemon with one STARTTLS submission listener, the production
//! Argon2id cost (`[submission]` defaults: 19 MiB, 2 passes, 1 lane), a 2048-bit RSA
//! `[[dkim.keys]]` key for the alias domain, and routes everything to a tiny
//! in-process sink. A small load client (tokio-rustls; smtp-source cannot AUTH) runs
//! three shapes, each with CONC concurrent clients:
//! - `auth only`: connect, EHLO, STARTTLS, EHLO, AUTH PLAIN, QUIT — the cost of a
//!   login (TLS handshake plus one Argon2 verification);
//! - `1 msg/conn`: the same plus one 2 KB message: one verification per message;
//! - `10 msgs/conn`: ten messages per login.
//!
//! Printed per shape: logins/s or messages/s (end to end: until the sink has every
//! message), and the daemon's CPU per login or per message from /proc (user+system,
//! acceptance and delivery together). Figures are printed, never asserted (a shared,
//! noisy machine). Under `cargo test` (no `--bench`) it runs a few sessions as a smoke
//! test.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const BIN: &str = env!("CARGO_BIN_EXE_tenso");
const LOGIN: &str = "alice@alias.test";
const PASSWORD: &str = "bench password 1";
const IO: Duration = Duration::from_secs(120);

/// A sink that accepts everything and counts messages.
async fn start_sink(count: Arc<AtomicU64>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let _ = sink_session(s, count).await;
            });
        }
    });
    addr
}

async fn sink_session(s: TcpStream, count: Arc<AtomicU64>) -> std::io::Result<()> {
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    w.write_all(b"220 sink ESMTP\r\n").await?;
    let (mut line, mut in_data) = (String::new(), false);
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        if in_data {
            if line == ".\r\n" {
                in_data = false;
                count.fetch_add(1, Ordering::Relaxed);
                w.write_all(b"250 2.0.0 ok\r\n").await?;
            }
            continue;
        }
        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" => b"250-sink\r\n250 PIPELINING\r\n",
            "DATA" => {
                in_data = true;
                b"354 go\r\n"
            }
            "QUIT" => return w.write_all(b"221 bye\r\n").await,
            _ => b"250 2.0.0 ok\r\n",
        };
        w.write_all(reply).await?;
    }
}

/// The daemon's CPU time so far (user + system), from /proc.
fn cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_secs_f64(ticks as f64 / hz)
}

fn cli(cfg: &Path, args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(cfg)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
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

/// Config, key, alias and password; then the daemon. Returns it with its
/// submission address.
fn start(dir: &Path, sink: SocketAddr) -> (Daemon, SocketAddr) {
    let cfg = dir.join("tenso.toml");
    let data = dir.join("data");
    let key = dir.join("alias.pem");
    let base = format!(
        "hostname = \"bench.test\"\ndata_dir = \"{}\"\n[smtp]\nlisten = [\"127.0.0.1:0\"]\n\
         [limits]\nconnect_rate_per_minute = 0\nmax_connections_per_ip = 10000\n\
         [delivery]\nroutes = {{ \"*\" = \"{sink}\" }}\n",
        data.display()
    );
    std::fs::write(&cfg, &base).unwrap();
    cli(
        &cfg,
        &[
            "dkim",
            "keygen",
            "--domain",
            "alias.test",
            "--selector",
            "s1",
            "--out",
            key.to_str().unwrap(),
        ],
        None,
    );
    std::fs::write(
        &cfg,
        format!(
            "{base}[submission]\nlisten = [\"127.0.0.1:0\"]\nmax_messages_per_hour = 0\n\
             max_recipients_per_day = 0\n\
             [[dkim.keys]]\ndomain = \"alias.test\"\nselector = \"s1\"\nkey = \"{}\"\n",
            key.display()
        ),
    )
    .unwrap();
    cli(&cfg, &["user", "add", LOGIN, "alice@dest.test"], None);
    cli(
        &cfg,
        &["user", "passwd", LOGIN],
        Some(&format!("{PASSWORD}\n")),
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
            && let Some(a) = s.lines().nth(1).and_then(|l| l.parse().ok())
        {
            return (d, a);
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Accepts any certificate: the bench measures the server, not PKI.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_config() -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
            .with_no_client_auth(),
    )
}

async fn reply<R: AsyncRead + Unpin>(r: &mut BufReader<R>) -> u16 {
    loop {
        let mut l = String::new();
        let n = tokio::time::timeout(IO, r.read_line(&mut l))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "connection closed");
        if l.as_bytes().get(3) != Some(&b'-') {
            return l[..3].parse().unwrap();
        }
    }
}

async fn cmd<S: AsyncRead + AsyncWrite + Unpin>(s: &mut BufReader<S>, line: &str, want: u16) {
    s.get_mut()
        .write_all(format!("{line}\r\n").as_bytes())
        .await
        .unwrap();
    let code = reply(s).await;
    assert_eq!(code, want, "{line}");
}

/// One client: `logins` sessions of `msgs` messages each.
async fn client(addr: SocketAddr, tls: Arc<rustls::ClientConfig>, logins: usize, msgs: usize) {
    let body = format!(
        "From: Alice <{LOGIN}>\r\nTo: bob@ext.test\r\nSubject: bench\r\n\
         Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nMessage-ID: <x@bench.test>\r\n\r\n{}",
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\r\n".repeat(30)
    );
    let auth = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("\0{LOGIN}\0{PASSWORD}"))
    };
    for _ in 0..logins {
        let tcp = TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let mut s = BufReader::new(tcp);
        assert_eq!(reply(&mut s).await, 220);
        cmd(&mut s, "EHLO bench.test", 250).await;
        cmd(&mut s, "STARTTLS", 220).await;
        let name = rustls::pki_types::ServerName::try_from("bench.test").unwrap();
        let t = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, s.into_inner())
            .await
            .unwrap();
        let mut s = BufReader::new(t);
        cmd(&mut s, "EHLO bench.test", 250).await;
        cmd(&mut s, &format!("AUTH PLAIN {auth}"), 235).await;
        for _ in 0..msgs {
            cmd(&mut s, &format!("MAIL FROM:<{LOGIN}>"), 250).await;
            cmd(&mut s, "RCPT TO:<bob@ext.test>", 250).await;
            cmd(&mut s, "DATA", 354).await;
            s.get_mut().write_all(body.as_bytes()).await.unwrap();
            cmd(&mut s, ".", 250).await;
        }
        cmd(&mut s, "QUIT", 221).await;
    }
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let bench = std::env::args().any(|a| a == "--bench");
    let conc: usize = std::env::var("CONC")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let scale = if bench { 1 } else { 0 };
    let tmp = tempfile::tempdir().unwrap();
    let delivered = Arc::new(AtomicU64::new(0));
    let sink = start_sink(delivered.clone()).await;
    let (d, addr) = tokio::task::block_in_place(|| start(tmp.path(), sink));
    let pid = d.0.id();
    let tls = tls_config();
    println!(
        "submission bench: {conc} concurrent clients, Argon2id m=19456 KiB t=2 p=1, RSA-2048 DKIM, 2 KB messages, STARTTLS (TLS 1.3)"
    );
    // (shape, logins per client, messages per login)
    let shapes = [
        ("auth only", 25 * scale + 1, 0),
        ("1 msg/conn", 25 * scale + 1, 1),
        ("10 msgs/conn", 10 * scale + 1, 10),
    ];
    for (shape, logins, msgs) in shapes {
        let before_msgs = delivered.load(Ordering::Relaxed);
        let cpu0 = cpu(pid);
        let t = Instant::now();
        let tasks: Vec<_> = (0..conc)
            .map(|_| tokio::spawn(client(addr, tls.clone(), logins, msgs)))
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let want = before_msgs + (conc * logins * msgs) as u64;
        while delivered.load(Ordering::Relaxed) < want {
            assert!(
                t.elapsed() < IO,
                "sink got {} of {want}",
                delivered.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (wall, used) = (t.elapsed(), cpu(pid).saturating_sub(cpu0));
        let n_logins = conc * logins;
        let n_msgs = n_logins * msgs;
        if msgs == 0 {
            println!(
                "{shape:>13}: {n_logins} logins in {:.2} s = {:.1} logins/s; daemon CPU {:.2} ms/login",
                wall.as_secs_f64(),
                n_logins as f64 / wall.as_secs_f64(),
                used.as_secs_f64() * 1e3 / n_logins as f64
            );
        } else {
            println!(
                "{shape:>13}: {n_msgs} msgs ({n_logins} logins) in {:.2} s = {:.1} msgs/s end to end; daemon CPU {:.2} ms/msg",
                wall.as_secs_f64(),
                n_msgs as f64 / wall.as_secs_f64(),
                used.as_secs_f64() * 1e3 / n_msgs as f64
            );
        }
    }
    drop(d);
}
