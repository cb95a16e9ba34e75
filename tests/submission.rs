//! Submission on 587/465 (issue 15) against the real binary: swaks as the mail
//! client (`--tls`, `--tls-on-connect`, `--auth PLAIN|LOGIN`), a raw client for the
//! byte-exact protocol cases, Postfix-free sinks as the outside world, dkimpy as the
//! independent DKIM verifier (keys from `tenso dkim keygen --domain`, published in the
//! test DNS server).
//!
//! What is proved: a user sends as their alias — and only as their alias — over 587
//! (STARTTLS) or 465 (implicit TLS), signed with their domain's key (d= the alias
//! domain, verified by dkimpy), within their limits; AUTH exists only inside TLS;
//! nothing relays unauthenticated; port 25 never offers AUTH; failed logins lock a
//! client out with a growing wait; `tenso user passwd` sets, generates and removes
//! logins. Argon2 runs with test-sized cost (`[submission] argon2_*`).

mod auth_support;
mod common;

use auth_support::{
    WAIT, base64, config, counters, dkimpy_verify, header_values, tenso_keygen, wait_queue_empty,
};
use common::daemon::{Tenso, tenso_bin, toml_string};
use common::dns::TestDns;
use common::sink::TestSink;
use common::smtp_client::RawSmtp;
use common::tls::TestPki;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

const ALICE: &str = "alice@alias.test";
const PASSWORD: &str = "correct horse battery";
/// Argon2 at test size: the cost is a config knob, stored in each hash.
const TEST_ARGON2: &str = "argon2_memory_kib = 64\nargon2_iterations = 1\n";

/// A daemon with both submission listeners, `[tls]` from a test PKI, routes for
/// `ext.test` (the outside world) and `dest.test` (aliases' destinations) to `sink`.
struct Setup {
    t: Tenso,
    sink: TestSink,
    dns: TestDns,
    pki: TestPki,
    _keys: tempfile::TempDir,
}

impl Setup {
    async fn start(submission: &str, extra: &str) -> Setup {
        let keys = tempfile::tempdir().unwrap();
        let (alias_key, alias_txt) = tenso_keygen(keys.path(), "rsa", "s1", "alias.test").await;
        let (fwd_key, fwd_txt) = tenso_keygen(keys.path(), "ed25519", "fwd", "fwd.test").await;
        let dns = TestDns::builder()
            .txt("s1._domainkey.alias.test", &alias_txt)
            .txt("fwd._domainkey.fwd.test", &fwd_txt)
            .start()
            .await;
        let sink = TestSink::start().await;
        let pki = TestPki::new(&["tenso.test", "127.0.0.1"]);
        let (cert, key) = pki.write_to_dir(&keys.path().join("tls"));
        let p = |x: &Path| toml_string(&x.to_string_lossy());
        let extra = format!(
            "[submission]\nlisten = [\"127.0.0.1:0\"]\nlisten_tls = [\"127.0.0.1:0\"]\n\
             {TEST_ARGON2}{submission}\n\
             [tls]\ncert = {}\nkey = {}\n\n\
             [dkim]\ndomain = \"fwd.test\"\nselector = \"fwd\"\nkey = {}\n\n\
             [[dkim.keys]]\ndomain = \"alias.test\"\nselector = \"s1\"\nkey = {}\n\n{extra}",
            p(&cert),
            p(&key),
            p(&fwd_key),
            p(&alias_key)
        );
        let routes = [("ext.test", sink.port()), ("dest.test", sink.port())];
        let smtp = "max_message_size = 65536";
        let t = Tenso::start(&config(&dns, &routes, smtp, "", &extra)).await;
        for (alias, dest) in [
            (ALICE, "alice@dest.test"),
            ("bob@alias.test", "bob@dest.test"),
            ("carol@other.test", "carol@dest.test"),
        ] {
            t.cli_ok(&["user", "add", alias, dest]).await;
        }
        passwd(&t, ALICE, Some(PASSWORD), &[]).await;
        Setup {
            t,
            sink,
            dns,
            pki,
            _keys: keys,
        }
    }

    fn port25(&self) -> SocketAddr {
        self.t.listen_addrs()[0]
    }
    fn starttls(&self) -> SocketAddr {
        self.t.listen_addrs()[1]
    }
    fn implicit(&self) -> SocketAddr {
        self.t.listen_addrs()[2]
    }

    /// A raw session on 587 from `ip`: EHLO, STARTTLS (verifying the certificate),
    /// EHLO again; returns the client and the second EHLO's text.
    async fn tls_session(&self, ip: &str) -> (RawSmtp, String) {
        let mut c = RawSmtp::connect_from(ip.parse().unwrap(), self.starttls()).await;
        assert_eq!(c.greeting.0, 220);
        assert_eq!(c.ehlo("client.test").await.0, 250);
        c.starttls(self.pki.client_config(), "tenso.test")
            .await
            .expect("STARTTLS");
        let (code, text) = c.ehlo("client.test").await;
        assert_eq!(code, 250, "{text}");
        (c, text)
    }

    /// [`Setup::tls_session`] then AUTH PLAIN; returns the AUTH reply too.
    async fn login(&self, ip: &str, user: &str, pw: &str) -> (RawSmtp, (u16, String)) {
        let (mut c, _) = self.tls_session(ip).await;
        let r = c.cmd(&format!("AUTH PLAIN {}", plain(user, pw))).await;
        (c, r)
    }
}

fn plain(user: &str, pw: &str) -> String {
    base64(format!("\0{user}\0{pw}").as_bytes())
}

/// `tenso user passwd ALIAS [args]` with `stdin` piped in (None: nothing); returns
/// (exit code, stdout, stderr).
async fn passwd_cmd(
    t: &Tenso,
    alias: &str,
    stdin: Option<&str>,
    args: &[&str],
) -> (i32, String, String) {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(tenso_bin())
        .arg("--config")
        .arg(t.config_path())
        .args(["user", "passwd", alias])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run tenso user passwd");
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).await.unwrap();
    }
    drop(input);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("tenso user passwd within 60 s")
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn passwd(t: &Tenso, alias: &str, pw: Option<&str>, args: &[&str]) -> String {
    let (code, out, err) =
        passwd_cmd(t, alias, pw.map(|p| format!("{p}\n")).as_deref(), args).await;
    assert_eq!(code, 0, "tenso user passwd {alias}: {out}{err}");
    out
}

async fn swaks(args: &[&str]) -> (bool, String) {
    let p = Path::new("/usr/bin/swaks");
    assert!(
        p.exists(),
        "swaks is missing: .ci/install-test-deps installs it"
    );
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(p)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("swaks within 60 s")
    .expect("run swaks");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// swaks as a mail client of `server`: `mode` is `--tls` or `--tls-on-connect`.
async fn swaks_send(
    server: SocketAddr,
    mode: &str,
    mech: &str,
    user: &str,
    pw: &str,
    extra: &[&str],
) -> (bool, String) {
    let server = server.to_string();
    let mut args = vec![
        "--server",
        &server,
        mode,
        "--auth",
        mech,
        "--auth-user",
        user,
        "--auth-password",
        pw,
    ];
    args.extend_from_slice(extra);
    swaks(&args).await
}

/// A message whose From is `from`, with Date and Message-ID unless `bare`.
fn message(from: &str, subject: &str, bare: bool) -> Vec<u8> {
    let ids = if bare {
        String::new()
    } else {
        format!(
            "Date: Tue, 03 Mar 2026 10:00:00 +0000\r\nMessage-ID: <{}@client.test>\r\n",
            subject.replace(' ', ".")
        )
    };
    format!("From: Alice <{from}>\r\nTo: bob@ext.test\r\nSubject: {subject}\r\n{ids}\r\nHello from {subject}.\r\n")
        .into_bytes()
}

#[tokio::test]
async fn the_alias_sends_signed_with_its_own_domain_over_587_and_465() {
    let s = Setup::start("", "").await;
    // 587: STARTTLS, PLAIN.
    let (ok, text) = swaks_send(
        s.starttls(),
        "--tls",
        "PLAIN",
        ALICE,
        PASSWORD,
        &[
            "--from",
            ALICE,
            "--to",
            "bob@ext.test",
            "--h-From",
            "Alice <alice@alias.test>",
            "--h-Subject",
            "via 587",
        ],
    )
    .await;
    assert!(ok, "swaks on 587: {text}\n{}", s.t.log());
    assert!(text.contains("235 2.7.0"), "{text}");
    // 465: implicit TLS, LOGIN; the login in another case is the same login.
    let (ok, text) = swaks_send(
        s.implicit(),
        "--tls-on-connect",
        "LOGIN",
        "Alice@Alias.Test",
        PASSWORD,
        &[
            "--from",
            ALICE,
            "--to",
            "dora@ext.test",
            "--h-From",
            ALICE,
            "--h-Subject",
            "via 465",
        ],
    )
    .await;
    assert!(ok, "swaks on 465: {text}\n{}", s.t.log());

    let got = s.sink.wait_for(2, WAIT).await;
    for (subject, rcpt) in [("via 587", "bob@ext.test"), ("via 465", "dora@ext.test")] {
        let d = got
            .iter()
            .find(|d| {
                header_values(&d.data, "Subject")
                    .iter()
                    .any(|v| v == subject)
            })
            .unwrap_or_else(|| panic!("{subject} not delivered"));
        let text = d.text();
        assert_eq!(d.mail_from, ALICE, "{text}");
        assert_eq!(d.rcpts, vec![rcpt.to_string()]);
        // Signed by the alias domain's key; dkimpy fetches it from the test DNS.
        let py = dkimpy_verify(&s.dns, &d.data).await;
        assert_eq!(py.len(), 1, "{py:?}\n{text}");
        assert!(
            py[0].ok && py[0].d == "alias.test" && py[0].s == "s1",
            "{py:?}\n{text}"
        );
        // The client stays hidden: no address, no EHLO name in our Received.
        let received = header_values(&d.data, "Received");
        assert_eq!(received.len(), 1, "{text}");
        assert!(
            received[0].starts_with("by tenso.test (tenso) with ESMTPSA id"),
            "{text}"
        );
        assert!(!text.contains("127.0.0.1"), "{text}");
        // Delivered nowhere here: no Delivered-To on a submitted copy.
        assert!(header_values(&d.data, "Delivered-To").is_empty(), "{text}");
        let tampered =
            text.replacen("Hello", "Jello", 1)
                .replacen("This is a test", "This is a pest", 1);
        let bad = dkimpy_verify(&s.dns, tampered.as_bytes()).await;
        assert!(
            bad.iter().all(|p| !p.ok),
            "a changed body still verifies: {bad:?}"
        );
    }
    let c = counters(&s.t).await;
    let sub = &c["inbound"]["submission"];
    assert_eq!(
        (sub["auth_ok"].as_u64(), sub["submitted"].as_u64()),
        (Some(2), Some(2)),
        "{c}"
    );

    // RFC 6409 hygiene: Message-ID and Date are added when missing; a recipient in our
    // own domains is forwarded like port-25 mail (Delivered-To of that alias).
    let (mut c, r) = s.login("127.0.0.1", ALICE, PASSWORD).await;
    assert_eq!(r.0, 235, "{r:?}");
    let r = c
        .send_message(
            ALICE,
            &["bob@alias.test", "erin@ext.test"],
            &message(ALICE, "bare", true),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", s.t.log()));
    assert_eq!(r.0, 250, "{r:?}");
    c.quit().await;
    let got = s.sink.wait_for(4, WAIT).await;
    let bare: Vec<_> = got
        .iter()
        .filter(|d| {
            header_values(&d.data, "Subject")
                .iter()
                .any(|v| v == "bare")
        })
        .collect();
    assert_eq!(bare.len(), 2);
    for d in &bare {
        let text = d.text();
        assert_eq!(header_values(&d.data, "Message-ID").len(), 1, "{text}");
        assert_eq!(header_values(&d.data, "Date").len(), 1, "{text}");
        let py = dkimpy_verify(&s.dns, &d.data).await;
        assert!(
            py.len() == 1 && py[0].ok && py[0].d == "alias.test",
            "{py:?}\n{text}"
        );
        if d.rcpts == ["bob@dest.test"] {
            assert_eq!(
                d.mail_from, "bob@alias.test",
                "forwarded for bob: MAIL FROM is bob's alias"
            );
            assert_eq!(
                header_values(&d.data, "Delivered-To"),
                vec!["bob@alias.test"],
                "{text}"
            );
        } else {
            assert_eq!(
                (d.mail_from.as_str(), d.rcpts.clone()),
                (ALICE, vec!["erin@ext.test".to_string()])
            );
        }
    }

    // A login whose domain has no key of its own: signed with the [dkim] default key.
    passwd(&s.t, "carol@other.test", Some(PASSWORD), &[]).await;
    let (mut c, r) = s.login("127.0.0.1", "carol@other.test", PASSWORD).await;
    assert_eq!(r.0, 235);
    c.send_message(
        "carol@other.test",
        &["frank@ext.test"],
        &message("carol@other.test", "default key", false),
    )
    .await
    .unwrap();
    c.quit().await;
    let got = s.sink.wait_for(5, WAIT).await;
    let d = got.iter().find(|d| d.rcpts == ["frank@ext.test"]).unwrap();
    let py = dkimpy_verify(&s.dns, &d.data).await;
    assert!(py.len() == 1 && py[0].ok && py[0].d == "fwd.test", "{py:?}");
    let c = counters(&s.t).await;
    assert_eq!(c["inbound"]["submission"]["signed_default_key"], 1, "{c}");

    // `tenso dns` checks each domain's key against what DNS publishes.
    // (Exit status 1: MX and SPF are not published in this test zone.)
    let out = s.t.cli_async(&["dns", "--json"]).await;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "tenso dns --json: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let dkim: Vec<_> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == "DKIM")
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["ok"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        dkim,
        vec![
            ("fwd._domainkey.fwd.test".to_string(), true),
            ("s1._domainkey.alias.test".to_string(), true)
        ],
        "{report}"
    );
    wait_queue_empty(&s.t).await;
}

#[tokio::test]
async fn auth_only_inside_tls_and_nothing_before_auth() {
    let s = Setup::start("", "").await;
    // 587 in clear: STARTTLS offered, AUTH not; AUTH anyway is 538.
    let mut c = RawSmtp::connect(s.starttls()).await;
    let (code, text) = c.ehlo("client.test").await;
    assert_eq!(code, 250);
    assert!(
        text.contains("STARTTLS") && !text.contains("AUTH"),
        "{text}"
    );
    let r = c
        .cmd(&format!("AUTH PLAIN {}", plain(ALICE, PASSWORD)))
        .await;
    assert_eq!((r.0, &r.1[..6]), (538, "5.7.11"), "{r:?}");
    let r = c.cmd("AUTH LOGIN").await;
    assert_eq!(r.0, 538, "{r:?}");
    // Nothing relays without AUTH: MAIL and RCPT get 530.
    let r = c.cmd(&format!("MAIL FROM:<{ALICE}>")).await;
    assert_eq!((r.0, &r.1[..5]), (530, "5.7.0"), "{r:?}");
    let r = c.cmd("RCPT TO:<bob@ext.test>").await;
    assert_eq!(r.0, 530, "{r:?}");
    c.quit().await;

    // Inside TLS: AUTH offered, and still 530 until it succeeds.
    let (mut c, ehlo) = s.tls_session("127.0.0.1").await;
    assert!(
        ehlo.contains("AUTH PLAIN LOGIN") && !ehlo.contains("STARTTLS"),
        "{ehlo}"
    );
    let r = c.cmd(&format!("MAIL FROM:<{ALICE}>")).await;
    assert_eq!(r.0, 530, "{r:?}");
    let r = c.cmd("AUTH CRAM-MD5").await;
    assert_eq!((r.0, &r.1[..5]), (504, "5.5.4"), "{r:?}");
    let r = c.cmd("AUTH PLAIN").await;
    assert_eq!(r, (334, String::new()));
    let r = c.cmd("*").await;
    assert_eq!(r.0, 501, "cancelled: {r:?}");
    let r = c.cmd("AUTH PLAIN").await;
    assert_eq!(r.0, 334);
    let r = c.cmd("!!not base64!!").await;
    assert_eq!(r.0, 501, "{r:?}");
    let r = c
        .cmd(&format!("AUTH PLAIN {}", plain(ALICE, PASSWORD)))
        .await;
    assert_eq!((r.0, &r.1[..5]), (235, "2.7.0"), "{r:?}");
    let r = c
        .cmd(&format!("AUTH PLAIN {}", plain(ALICE, PASSWORD)))
        .await;
    assert_eq!(r.0, 503, "already authenticated: {r:?}");
    c.quit().await;

    // swaks: without --tls it finds no AUTH to use; without --auth it meets 530.
    let server = s.starttls().to_string();
    let (ok, text) = swaks(&[
        "--server",
        &server,
        "--auth",
        "PLAIN",
        "--auth-user",
        ALICE,
        "--auth-password",
        PASSWORD,
        "--from",
        ALICE,
        "--to",
        "bob@ext.test",
    ])
    .await;
    assert!(!ok && text.contains("did not advertise"), "{text}");
    let (ok, text) = swaks(&[
        "--server",
        &server,
        "--tls",
        "--from",
        ALICE,
        "--to",
        "bob@ext.test",
    ])
    .await;
    assert!(!ok && text.contains("530 5.7.0"), "{text}");
    let c = counters(&s.t).await;
    let sub = &c["inbound"]["submission"];
    assert_eq!(sub["auth_without_tls"], 2, "{c}");
    assert!(sub["auth_required"].as_u64().unwrap() >= 4, "{c}");
    assert_eq!(sub["submitted"], 0, "{c}");
    assert_eq!(s.sink.transactions(), 0, "nothing may leave without AUTH");
}

#[tokio::test]
async fn port_25_never_offers_auth_and_still_refuses_relay() {
    let s = Setup::start("", "").await;
    let mut c = RawSmtp::connect(s.port25()).await;
    let (_, text) = c.ehlo("client.test").await;
    assert!(!text.contains("AUTH"), "{text}");
    let r = c
        .cmd(&format!("AUTH PLAIN {}", plain(ALICE, PASSWORD)))
        .await;
    assert_eq!(r.0, 502, "{r:?}");
    c.starttls(s.pki.client_config(), "tenso.test")
        .await
        .unwrap();
    let (_, text) = c.ehlo("client.test").await;
    assert!(
        !text.contains("AUTH"),
        "AUTH after STARTTLS on port 25: {text}"
    );
    let r = c
        .cmd(&format!("AUTH PLAIN {}", plain(ALICE, PASSWORD)))
        .await;
    assert_eq!(r.0, 502, "{r:?}");
    let r = c.cmd(&format!("MAIL FROM:<{ALICE}>")).await;
    assert_eq!(r.0, 250, "{r:?}");
    let r = c.cmd("RCPT TO:<bob@ext.test>").await;
    assert_eq!((r.0, &r.1[..5]), (554, "5.7.1"), "relay: {r:?}");
    c.quit().await;
    // The independent client agrees, with and without TLS.
    let server = s.port25().to_string();
    let (ok, text) = swaks(&[
        "--server",
        &server,
        "--tls",
        "--auth",
        "PLAIN",
        "--auth-user",
        ALICE,
        "--auth-password",
        PASSWORD,
        "--from",
        ALICE,
        "--to",
        "bob@ext.test",
    ])
    .await;
    assert!(!ok && text.contains("did not advertise"), "{text}");
    let (ok, text) = swaks(&["--server", &server, "--from", ALICE, "--to", "bob@ext.test"]).await;
    assert!(!ok && text.contains("554 5.7.1"), "{text}");
    assert_eq!(s.sink.transactions(), 0);
}

#[tokio::test]
async fn only_as_yourself() {
    let s = Setup::start("", "").await;
    // MAIL FROM: anything but the login itself is 553 5.7.1.
    let (mut c, r) = s.login("127.0.0.1", ALICE, PASSWORD).await;
    assert_eq!(r.0, 235);
    for from in [
        "bob@alias.test",
        "",
        "alice+tag@alias.test",
        "alice@ext.test",
        "postmaster@alias.test",
    ] {
        let r = c.cmd(&format!("MAIL FROM:<{from}>")).await;
        assert_eq!(
            (r.0, &r.1[..5]),
            (553, "5.7.1"),
            "MAIL FROM:<{from}>: {r:?}"
        );
    }
    // The From field: exactly one address, the login's.
    let bad_from: &[&str] = &[
        "From: bob@alias.test",
        "From: \"alice@alias.test\" <evil@ext.test>",
        "From: \"evil@ext.test\" <alice@alias.test>",
        "From: alice@alias.test, bob@alias.test",
        "From: alice@alias.test\r\nFrom: alice@alias.test",
        "From: team: alice@alias.test;",
        "X-No-From: here",
    ];
    for from in bad_from {
        let msg = format!("{from}\r\nTo: bob@ext.test\r\nSubject: trick\r\n\r\nbody\r\n");
        let r = c
            .send_message(ALICE, &["bob@ext.test"], msg.as_bytes())
            .await;
        let e = r.expect_err(from);
        assert_eq!(
            (e.stage, e.code, &e.text[..5]),
            ("DOT", 550, "5.7.1"),
            "{from}: {e}"
        );
    }
    // Hygiene of the same input path as port 25.
    let eight_bit = "From: alice@alias.test\r\nSubject: caf\u{e9}\r\n\r\nbody\r\n";
    let e = c
        .send_message(ALICE, &["bob@ext.test"], eight_bit.as_bytes())
        .await
        .unwrap_err();
    assert_eq!(
        (e.code, &e.text[..5]),
        (554, "5.6.0"),
        "8-bit header without SMTPUTF8: {e}"
    );
    let r = c.cmd(&format!("MAIL FROM:<{ALICE}> SMTPUTF8")).await;
    assert_eq!(r.0, 250);
    c.cmd("RCPT TO:<bob@ext.test>").await;
    c.cmd("DATA").await;
    c.send(format!("{eight_bit}.\r\n").as_bytes()).await;
    assert_eq!(
        c.read_reply().await.0,
        250,
        "8-bit header with SMTPUTF8 is fine"
    );
    let big = format!(
        "From: {ALICE}\r\n\r\n{}",
        format!("{}\r\n", "x".repeat(998)).repeat(100)
    );
    let e = c
        .send_message(ALICE, &["bob@ext.test"], big.as_bytes())
        .await
        .unwrap_err();
    assert_eq!(
        (e.code, &e.text[..5]),
        (552, "5.3.4"),
        "over max_message_size: {e}"
    );
    let r = c.cmd(&format!("MAIL FROM:<{ALICE}>")).await;
    assert_eq!(r.0, 250);
    c.cmd("RCPT TO:<bob@ext.test>").await;
    c.cmd("DATA").await;
    c.send(b"From: alice@alias.test\r\n\r\nsmuggled\n.\r\nMAIL FROM:<x@y.test>\r\n.\r\n")
        .await;
    assert_eq!(c.read_reply().await.0, 554, "bare LF refused as on port 25");
    c.quit().await;

    // swaks: another alias in MAIL FROM, and in From.
    let (ok, text) = swaks_send(
        s.starttls(),
        "--tls",
        "PLAIN",
        ALICE,
        PASSWORD,
        &["--from", "bob@alias.test", "--to", "bob@ext.test"],
    )
    .await;
    assert!(!ok && text.contains("553 5.7.1"), "{text}");
    let (ok, text) = swaks_send(
        s.starttls(),
        "--tls",
        "PLAIN",
        ALICE,
        PASSWORD,
        &[
            "--from",
            ALICE,
            "--h-From",
            "Bob <bob@alias.test>",
            "--to",
            "bob@ext.test",
        ],
    )
    .await;
    assert!(!ok && text.contains("550 5.7.1"), "{text}");

    let got = s.sink.wait_for(1, WAIT).await;
    wait_queue_empty(&s.t).await;
    assert_eq!(
        s.sink.transactions(),
        1,
        "only the SMTPUTF8 message left: {got:?}"
    );
    let c = counters(&s.t).await;
    let sub = &c["inbound"]["submission"];
    assert_eq!(sub["sender_refused"], 6, "{c}");
    assert_eq!(sub["from_refused"], bad_from.len() as u64 + 1, "{c}");
}

#[tokio::test]
async fn sending_limits_per_login() {
    let s = Setup::start(
        "max_messages_per_hour = 2\nmax_recipients_per_day = 3\n",
        "",
    )
    .await;
    let (mut c, r) = s.login("127.0.0.1", ALICE, PASSWORD).await;
    assert_eq!(r.0, 235);
    let msg = message(ALICE, "limited", false);
    c.send_message(ALICE, &["a@ext.test", "b@ext.test"], &msg)
        .await
        .unwrap();
    // The fourth recipient of the day is refused; the message goes to the third.
    c.cmd(&format!("MAIL FROM:<{ALICE}>")).await;
    assert_eq!(c.cmd("RCPT TO:<c@ext.test>").await.0, 250);
    let r = c.cmd("RCPT TO:<d@ext.test>").await;
    assert_eq!((r.0, &r.1[..5]), (450, "4.7.1"), "{r:?}");
    c.cmd("DATA").await;
    c.send(&[msg.as_slice(), b".\r\n"].concat()).await;
    assert_eq!(c.read_reply().await.0, 250);
    c.quit().await;
    // The third message of the hour: 450 4.7.1 at MAIL (swaks sees it).
    let (ok, text) = swaks_send(
        s.starttls(),
        "--tls",
        "PLAIN",
        ALICE,
        PASSWORD,
        &["--from", ALICE, "--h-From", ALICE, "--to", "e@ext.test"],
    )
    .await;
    assert!(!ok && text.contains("450 4.7.1"), "{text}");
    // Another login has its own allowance.
    passwd(&s.t, "bob@alias.test", Some(PASSWORD), &[]).await;
    let (ok, text) = swaks_send(
        s.implicit(),
        "--tls-on-connect",
        "PLAIN",
        "bob@alias.test",
        PASSWORD,
        &[
            "--from",
            "bob@alias.test",
            "--h-From",
            "bob@alias.test",
            "--to",
            "f@ext.test",
        ],
    )
    .await;
    assert!(ok, "{text}");
    s.sink.wait_for(3, WAIT).await;
    wait_queue_empty(&s.t).await;
    let c = counters(&s.t).await;
    let sub = &c["inbound"]["submission"];
    assert_eq!(
        (
            sub["over_recipient_rate"].as_u64(),
            sub["over_message_rate"].as_u64()
        ),
        (Some(1), Some(1)),
        "{c}"
    );
    assert_eq!(s.sink.transactions(), 3);
}

#[tokio::test]
async fn failed_logins_lock_the_client_out_with_a_growing_wait() {
    let s = Setup::start(
        "max_auth_failures = 3\n",
        "[limits]\nunknown_penalty_base = \"1s\"\nunknown_penalty_max = \"4s\"\n",
    )
    .await;
    // All from 127.0.0.2: a wrong password (swaks), an unknown login (raw client):
    // 535 5.7.8 alike.
    let (ok, text) = swaks_send(
        s.starttls(),
        "--tls",
        "PLAIN",
        ALICE,
        "wrong password!",
        &[
            "--local-interface",
            "127.0.0.2",
            "--from",
            ALICE,
            "--to",
            "bob@ext.test",
        ],
    )
    .await;
    assert!(!ok && text.contains("535 5.7.8"), "{text}");
    let (mut c, r) = s.login("127.0.0.2", "nobody@alias.test", PASSWORD).await;
    assert_eq!((r.0, &r.1[..5]), (535, "5.7.8"), "{r:?}");
    // The third failure: 421 4.7.0 and the connection is closed.
    let r = c.cmd("AUTH LOGIN").await;
    assert_eq!(r.0, 334);
    c.cmd(&base64(ALICE.as_bytes())).await;
    let r = c.cmd(&base64(b"still wrong")).await;
    assert_eq!((r.0, &r.1[..5]), (421, "4.7.0"), "{r:?}");
    assert!(c.is_closed().await);
    // Counted per client: 127.0.0.1 is not locked out.
    let (mut c, r) = s.login("127.0.0.1", ALICE, PASSWORD).await;
    assert_eq!(r.0, 235, "another client is not locked out: {r:?}");
    c.quit().await;
    // .2 comes back: its greeting waits (the penalty), then even the right password
    // gets 421.
    let started = Instant::now();
    let mut c = RawSmtp::connect_from("127.0.0.2".parse().unwrap(), s.starttls()).await;
    let waited = started.elapsed();
    assert_eq!(c.greeting.0, 220);
    assert!(
        waited >= Duration::from_millis(900),
        "greeted after {waited:?}"
    );
    c.ehlo("client.test").await;
    c.starttls(s.pki.client_config(), "tenso.test")
        .await
        .unwrap();
    c.ehlo("client.test").await;
    let r = c
        .cmd(&format!("AUTH PLAIN {}", plain(ALICE, PASSWORD)))
        .await;
    assert_eq!((r.0, &r.1[..5]), (421, "4.7.0"), "{r:?}");
    let c = counters(&s.t).await;
    let sub = &c["inbound"]["submission"];
    assert_eq!(sub["auth_failed"], 3, "{c}");
    assert_eq!(sub["auth_locked_out"], 1, "{c}");
    assert_eq!(sub["auth_refused_locked"], 1, "{c}");
    assert_eq!(sub["auth_penalized"], 1, "{c}");
    // No password, and no name that is not a login, is written to the log.
    let log = s.t.log();
    assert!(
        !log.contains("wrong password!") && !log.contains("still wrong") && !log.contains(PASSWORD),
        "{log}"
    );
    assert!(!log.contains("nobody@alias.test"), "{log}");
}

#[tokio::test]
async fn tenso_user_passwd_sets_generates_and_removes_logins() {
    let s = Setup::start("", "").await;
    let v = s.t.cli_json(&["user", "show", ALICE, "--json"]).await;
    assert_eq!(v["login"], true, "{v}");
    // Rules: no password on stdin, too short, unknown alias, catch-all.
    assert_eq!(passwd_cmd(&s.t, ALICE, None, &[]).await.0, 2);
    assert_eq!(passwd_cmd(&s.t, ALICE, Some("short\n"), &[]).await.0, 2);
    assert_eq!(
        passwd_cmd(&s.t, "ghost@alias.test", Some("long enough pw\n"), &[])
            .await
            .0,
        1
    );
    // Generated: printed once, and it works (with the old one gone).
    let out = passwd(&s.t, ALICE, None, &["--generate"]).await;
    let generated = out
        .lines()
        .find_map(|l| {
            l.split_once("(shown once, stored only as a hash): ")
                .map(|(_, p)| p.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no password printed: {out}"));
    let (_, r) = s.login("127.0.0.1", ALICE, PASSWORD).await;
    assert_eq!(r.0, 535, "the old password is replaced");
    let (ok, text) = swaks_send(
        s.starttls(),
        "--tls",
        "LOGIN",
        ALICE,
        &generated,
        &["--from", ALICE, "--h-From", ALICE, "--to", "g@ext.test"],
    )
    .await;
    assert!(ok, "{text}");
    // The table holds an Argon2id hash, never the password.
    let table_dir = s.t.data_dir().join("table");
    for e in walk(&table_dir) {
        let bytes = std::fs::read(&e).unwrap_or_default();
        assert!(
            !bytes
                .windows(generated.len())
                .any(|w| w == generated.as_bytes()),
            "password in {}",
            e.display()
        );
    }
    // --disable removes the login; removing the alias removes it too.
    let out = passwd(&s.t, ALICE, None, &["--disable"]).await;
    assert!(out.contains("removed"), "{out}");
    let (_, r) = s.login("127.0.0.1", ALICE, &generated).await;
    assert_eq!(r.0, 535);
    passwd(&s.t, "bob@alias.test", Some(PASSWORD), &[]).await;
    s.t.cli_ok(&["user", "remove", "bob@alias.test"]).await;
    s.t.cli_ok(&["user", "add", "bob@alias.test", "bob@dest.test"])
        .await;
    let v =
        s.t.cli_json(&["user", "show", "bob@alias.test", "--json"])
            .await;
    assert_eq!(v["login"], false, "a re-added alias has no login: {v}");
    s.sink.wait_for(1, WAIT).await;
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}
