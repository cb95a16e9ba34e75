//! Shared helpers for the authentication tests (issue 5): a test zone whose sender
//! domains publish every SPF outcome, tenso configs aimed at it with static routes to
//! sinks, sending from a chosen 127.0.0.x with a chosen EHLO, reading header fields and
//! `Authentication-Results` clauses, waiting for the queue to drain (the barrier that
//! makes "nothing else arrived" a fact rather than a guess), DKIM keys, and dkimpy as
//! the independent verifier. Include with `mod common; mod auth_support;`.
#![allow(dead_code)]

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256, SigningKey};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, DkimSigner};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::Value;

use crate::common::daemon::{Tenso, toml_string};
use crate::common::dns::{TestDns, TestDnsBuilder};
use crate::common::sink::TestSink;
use crate::common::smtp_client::{RawSmtp, SmtpError};

/// Upper bound for every wait on a delivery or a drain.
pub const WAIT: Duration = Duration::from_secs(30);

/// The sender domains of [`spf_zone`] and the SPF result a client at 127.0.0.1 gets.
pub const SPF_DOMAINS: &[(&str, &str)] = &[
    ("pass.test", "pass"),
    ("fail.test", "fail"),
    ("softfail.test", "softfail"),
    ("neutral.test", "neutral"),
    ("none.test", "none"),
    ("permerror.test", "permerror"),
    ("servfail.test", "temperror"),
    ("blackhole.test", "temperror"),
];

/// A zone where each sender domain of [`SPF_DOMAINS`] publishes its outcome for a client
/// at 127.0.0.1 (pass.test authorizes only 127.0.0.1; fail.test and softfail.test only
/// 127.0.0.2), and the alias domain authorizes the forwarder (127.0.0.1, `~all`).
pub fn spf_zone() -> TestDnsBuilder {
    TestDns::builder()
        .txt("pass.test", "v=spf1 ip4:127.0.0.1 -all")
        .txt("fail.test", "v=spf1 ip4:127.0.0.2 -all")
        .txt("softfail.test", "v=spf1 ip4:127.0.0.2 ~all")
        .txt("neutral.test", "v=spf1 ?all")
        // Exists (A record) but publishes no SPF: NODATA for TXT.
        .a("none.test", "127.0.0.9")
        .txt("permerror.test", "v=spf1 ip4:not-an-ip -all")
        .servfail("servfail.test")
        .blackhole("blackhole.test")
        .txt("alias.test", "v=spf1 ip4:127.0.0.1 ~all")
}

/// A tenso config: DNS from `dns` (1 s timeout), `[smtp]` with `smtp` extra keys,
/// static routes `domain → 127.0.0.1:port`, short retries, `[auth]` with `auth` keys,
/// then `extra` (other tables).
pub fn config(
    dns: &TestDns,
    routes: &[(&str, u16)],
    smtp: &str,
    auth: &str,
    extra: &str,
) -> String {
    let routes: Vec<String> = routes
        .iter()
        .map(|(d, p)| format!("{} = \"127.0.0.1:{p}\"", toml_string(d)))
        .collect();
    format!(
        "[dns]\n{}\ntimeout = \"1s\"\n\n\
         [smtp]\nlisten = [\"127.0.0.1:0\"]\n{smtp}\n\n\
         [delivery]\nroutes = {{ {} }}\nconnect_timeout = \"3s\"\ncommand_timeout = \"10s\"\n\
         data_timeout = \"10s\"\n\n\
         [queue]\nretry = [\"1s\"]\ndead_host_ttl = \"1s\"\nmax_lifetime = \"1h\"\n\n\
         [auth]\n{auth}\n\n{extra}\n",
        dns.resolver_config_toml(),
        routes.join(", ")
    )
}

/// `[limits]` for tests that name unknown users on purpose: the talk's slow-down of
/// such clients (doubling delays per "user unknown") shrunk to 1 ms, so a matrix of
/// unknown-recipient cases from one address is not a test of patience.
pub const NO_UNKNOWN_PENALTY: &str =
    "[limits]\nunknown_penalty_base = \"1ms\"\nunknown_penalty_max = \"1ms\"\n";

/// Routes: `dest.test` to `dest`, every sender domain of [`SPF_DOMAINS`] (and
/// `origin.test`) to `senders` (where DSNs to original senders arrive).
pub fn routes(dest: &TestSink, senders: &TestSink) -> Vec<(&'static str, u16)> {
    let mut r = vec![("dest.test", dest.port()), ("origin.test", senders.port())];
    r.extend(SPF_DOMAINS.iter().map(|(d, _)| (*d, senders.port())));
    r
}

/// Runs `tenso <args>` (without blocking the runtime that serves the test DNS) and
/// panics with the log unless it succeeds; returns stdout.
pub async fn cli_ok(t: &Tenso, args: &[&str]) -> String {
    t.cli_ok(args).await
}

/// One SMTP transaction from `ip` (127.0.0.x) with `EHLO helo`; the reply to the end of
/// DATA, or the step that was refused.
pub async fn submit(
    t: &Tenso,
    ip: &str,
    helo: &str,
    from: &str,
    rcpts: &[&str],
    data: &[u8],
) -> Result<(u16, String), SmtpError> {
    let ip: IpAddr = ip.parse().expect("client IP");
    let mut c = RawSmtp::connect_from(ip, t.smtp_addr()).await;
    // MAIL waits for SPF; a blackholed domain costs the resolver's timeouts.
    c.set_timeout(Duration::from_secs(30));
    let (code, text) = c.ehlo(helo).await;
    assert_eq!(code, 250, "EHLO {helo}: {code} {text}");
    let r = c.send_message(from, rcpts, data).await;
    c.quit().await;
    r
}

/// [`submit`] that must be accepted with 250; returns the reply text.
pub async fn submit_ok(
    t: &Tenso,
    ip: &str,
    helo: &str,
    from: &str,
    rcpts: &[&str],
    data: &[u8],
) -> String {
    match submit(t, ip, helo, from, rcpts, data).await {
        Ok((250, text)) => text,
        Ok((code, text)) => panic!("MAIL FROM:<{from}> got {code} {text}"),
        Err(e) => panic!("MAIL FROM:<{from}> refused: {e}\nlog:\n{}", t.log()),
    }
}

/// A plain message with a unique subject.
pub fn message(from_hdr: &str, subject: &str) -> Vec<u8> {
    format!(
        "From: {from_hdr}\r\nTo: alice@alias.test\r\nSubject: {subject}\r\n\
         Date: Tue, 03 Mar 2026 10:00:00 +0000\r\n\
         Message-ID: <{}@test>\r\n\r\nThis is {subject}.\r\n",
        subject.replace(' ', ".")
    )
    .into_bytes()
}

/// The header section as (name, unfolded value) pairs, in order.
pub fn header_fields(data: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(data);
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.split("\r\n") {
        if line.is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            if let Some((_, v)) = out.last_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
            continue;
        }
        if let Some((n, v)) = line.split_once(':') {
            out.push((n.trim().to_string(), v.trim().to_string()));
        }
    }
    out
}

/// Every value of header `name` (case-insensitive), in order.
pub fn header_values(data: &[u8], name: &str) -> Vec<String> {
    header_fields(data)
        .into_iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
        .collect()
}

/// The authserv-id of an `Authentication-Results` value.
pub fn authserv_id(ar: &str) -> String {
    ar.split(';')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// The result clauses (`method=result ...`) of an `Authentication-Results` value.
pub fn ar_clauses(ar: &str) -> Vec<String> {
    ar.split(';')
        .skip(1)
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty())
        .collect()
}

/// (result, value) of the clause of `method` that has property `prop`: e.g.
/// `("spf", "smtp.mailfrom")` gives ("fail", "x@fail.test").
pub fn ar_result(ar: &str, method: &str, prop: &str) -> Option<(String, String)> {
    ar_clauses(ar).into_iter().find_map(|c| {
        let rest = c.strip_prefix(&format!("{method}="))?;
        let result = rest.split_whitespace().next()?.to_string();
        let value = c
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{prop}=")))?
            .trim_matches('"')
            .to_string();
        Some((result, value))
    })
}

/// tenso's own `Authentication-Results` of a forwarded copy: exactly one must carry
/// `authserv`; returns it.
pub fn our_ar(data: &[u8], authserv: &str) -> String {
    let ours: Vec<String> = header_values(data, "Authentication-Results")
        .into_iter()
        .filter(|v| authserv_id(v).eq_ignore_ascii_case(authserv))
        .collect();
    assert_eq!(
        ours.len(),
        1,
        "expected exactly one Authentication-Results with authserv-id {authserv}:\n{}",
        String::from_utf8_lossy(data)
    );
    ours.into_iter().next().unwrap()
}

/// Ids of the messages in tenso's queue.
pub async fn queue_ids(t: &Tenso) -> Vec<String> {
    let out = cli_ok(t, &["queue", "list", "--json"]).await;
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("queue list: {e}: {out}"));
    v.as_array()
        .unwrap_or_else(|| panic!("queue list is not an array: {out}"))
        .iter()
        .map(|m| m["id"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Waits (bounded) until tenso's queue is empty: every copy and DSN has been handed to
/// a sink (or failed for good). Panics with the log after [`WAIT`].
pub async fn wait_queue_empty(t: &Tenso) {
    t.wait_queue_empty(WAIT).await
}

/// The daemon's counters (`tenso status --json` → `counters`).
pub async fn counters(t: &Tenso) -> Value {
    t.counters().await
}

/// The messages in the alias's pool `new/` directory, file name order.
pub fn pool_messages(t: &Tenso, alias: &str) -> Vec<Vec<u8>> {
    let dir = t.data_dir().join("pool").join(alias).join("new");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    names.sort();
    names
        .iter()
        .map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display())))
        .collect()
}

/// Standard base64 with padding (for `p=` tags).
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for group in data.chunks(3) {
        let mut n = 0u32;
        for (i, b) in group.iter().enumerate() {
            n |= u32::from(*b) << (16 - 8 * i);
        }
        for i in 0..4 {
            if i <= group.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 0x3f) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A DKIM key for signing in the test (PKCS#8 DER), and its DNS TXT value.
pub struct TestKey {
    ed25519: bool,
    pkcs8: Vec<u8>,
    txt: String,
}

impl TestKey {
    /// A 2048-bit RSA key; `p=` is its SubjectPublicKeyInfo (RFC 6376 §3.6.1).
    pub fn rsa() -> TestKey {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("RSA keygen");
        let spki = rcgen::PublicKeyData::subject_public_key_info(&kp);
        TestKey {
            ed25519: false,
            pkcs8: kp.serialize_der(),
            txt: format!("v=DKIM1; k=rsa; p={}", base64(&spki)),
        }
    }

    /// An Ed25519 key; `p=` is the raw public key (RFC 8463).
    pub fn ed25519() -> TestKey {
        let pkcs8 = Ed25519Key::generate_pkcs8().expect("Ed25519 keygen");
        let key = Ed25519Key::from_pkcs8_der(&pkcs8).expect("Ed25519 key for mail-auth");
        let txt = format!("v=DKIM1; k=ed25519; p={}", base64(&key.public_key()));
        TestKey {
            ed25519: true,
            pkcs8,
            txt,
        }
    }

    pub fn txt(&self) -> &str {
        &self.txt
    }

    /// `msg` with a `DKIM-Signature` (d=`domain`, s=`selector`) prepended.
    pub fn sign(
        &self,
        domain: &str,
        selector: &str,
        canon: Canonicalization,
        msg: &[u8],
    ) -> Vec<u8> {
        fn go<K: SigningKey>(
            k: K,
            domain: &str,
            selector: &str,
            canon: Canonicalization,
            msg: &[u8],
        ) -> String {
            DkimSigner::from_key(k)
                .domain(domain)
                .selector(selector)
                .headers(["From", "To", "Subject", "Date", "Message-ID"])
                .header_canonicalization(canon)
                .body_canonicalization(canon)
                .sign(msg)
                .expect("DKIM sign")
                .to_header()
        }
        let h = if self.ed25519 {
            let k = Ed25519Key::from_pkcs8_der(&self.pkcs8).expect("Ed25519 key");
            go(k, domain, selector, canon, msg)
        } else {
            let k = RsaKey::<Sha256>::from_key_der(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                self.pkcs8.clone(),
            )))
            .expect("RSA key for mail-auth");
            go(k, domain, selector, canon, msg)
        };
        let mut out = h.into_bytes();
        out.extend_from_slice(msg);
        out
    }
}

/// `tenso dkim keygen` (the real binary, no config) into `dir/<selector>.pem`; returns
/// the key path and the TXT value it printed for `<selector>._domainkey.<domain>`.
pub async fn tenso_keygen(
    dir: &Path,
    algorithm: &str,
    selector: &str,
    domain: &str,
) -> (PathBuf, String) {
    let out_path = dir.join(format!("{selector}.pem"));
    let out = tokio::process::Command::new(crate::common::daemon::tenso_bin())
        .args([
            "dkim",
            "keygen",
            "--algorithm",
            algorithm,
            "--selector",
            selector,
            "--domain",
            domain,
        ])
        .arg("--out")
        .arg(&out_path)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("tenso dkim keygen did not finish in 60 s")
        .expect("run tenso dkim keygen");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "tenso dkim keygen failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let prefix = format!("{selector}._domainkey.{domain}. IN TXT \"");
    let txt = stdout
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.strip_suffix('"'))
        .unwrap_or_else(|| panic!("no TXT line for {selector}._domainkey.{domain} in:\n{stdout}"))
        .to_string();
    (out_path, txt)
}

/// One signature as dkimpy saw it.
#[derive(Debug, Clone)]
pub struct PyDkim {
    pub d: String,
    pub s: String,
    pub ok: bool,
    pub err: Option<String>,
}

/// dkimpy (Debian's python3-dkim, run with /usr/bin/python3) verifies every
/// DKIM-Signature of `msg`, fetching keys from `dns` itself (dnspython aimed at the test
/// DNS server): an independent verifier with its own resolver.
const DKIMPY: &str = r#"
import sys, json, dkim, dns.resolver
res = dns.resolver.Resolver(configure=False)
res.nameservers = ["127.0.0.1"]
res.port = int(sys.argv[1])
def txt(name, timeout=5):
    n = name.decode() if isinstance(name, bytes) else name
    try:
        ans = res.resolve(n, "TXT", lifetime=timeout)
    except Exception:
        return None
    for rr in ans:
        return b"".join(rr.strings)
    return None
msg = sys.stdin.buffer.read()
n = sum(1 for k, v in dkim.DKIM(msg).headers if k.lower() == b"dkim-signature")
out = []
for i in range(n):
    v = dkim.DKIM(msg)
    err = None
    try:
        ok = bool(v.verify(idx=i, dnsfunc=txt))
    except Exception as e:
        ok, err = False, repr(e)
    d = v.domain.decode() if isinstance(v.domain, bytes) else str(v.domain)
    s = v.selector.decode() if isinstance(v.selector, bytes) else str(v.selector)
    out.append({"d": d, "s": s, "ok": ok, "err": err})
print(json.dumps(out))
"#;

pub async fn dkimpy_verify(dns: &TestDns, msg: &[u8]) -> Vec<PyDkim> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(DKIMPY)
        .arg(dns.addr().port().to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run /usr/bin/python3 (install python3-dkim: .ci/install-test-deps)");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(msg).await.expect("write message to dkimpy");
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("dkimpy did not finish in 60 s")
        .expect("dkimpy output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "dkimpy failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("dkimpy output {stdout:?}: {e}"));
    v.as_array()
        .expect("dkimpy prints an array")
        .iter()
        .map(|x| PyDkim {
            d: x["d"].as_str().unwrap_or_default().to_string(),
            s: x["s"].as_str().unwrap_or_default().to_string(),
            ok: x["ok"].as_bool().unwrap_or(false),
            err: x["err"].as_str().map(str::to_string),
        })
        .collect()
}

/// mail-auth's DKIM results for `msg`, keys fetched from `dns`: (d, s, passed).
pub async fn mail_auth_verify(dns: &TestDns, msg: &[u8]) -> Vec<(String, String, bool)> {
    use mail_auth::common::verify::VerifySignature;
    let auth = mail_auth::MessageAuthenticator(dns.resolver());
    let parsed = mail_auth::AuthenticatedMessage::parse(msg).expect("message parses");
    auth.verify_dkim(&parsed)
        .await
        .iter()
        .map(|o| {
            let (d, s) = o
                .signature()
                .map(|s| (s.domain().to_string(), s.selector().to_string()))
                .unwrap_or_default();
            (d, s, o.result() == &mail_auth::DkimResult::Pass)
        })
        .collect()
}

/// `tests/dkimpy_support/dkimpy.py`: batch signing and verification (DKIM and ARC)
/// with dkimpy, keys made by openssl and PyNaCl.
const DKIMPY_SCRIPT: &str = include_str!("../dkimpy_support/dkimpy.py");

/// Runs the dkimpy script with `args` (a mode, see the script), JSON on stdin and
/// stdout.
pub async fn dkimpy_script(args: &[&str], input: &Value) -> Value {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(DKIMPY_SCRIPT)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run /usr/bin/python3 (install python3-dkim and openssl: .ci/install-test-deps)");
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(input.to_string().as_bytes())
        .await
        .expect("write to dkimpy");
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("dkimpy did not finish in 120 s")
        .expect("dkimpy output");
    assert!(
        out.status.success(),
        "dkimpy {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("dkimpy prints JSON")
}
