//! Inbound STARTTLS (issue 6, part 5): a self-signed certificate is generated in
//! `DATA_DIR/tls/` when none is configured; a configured certificate chains to the
//! test CA; every byte pipelined after STARTTLS is discarded before the handshake
//! (the CVE-2011-0411 class: `STARTTLS\r\nRSET\r\nMAIL FROM:<x@y>\r\n` in one write),
//! the session restarts from EHLO, STARTTLS is no longer offered, and mail received
//! over TLS says `with ESMTPS` in its Received header.

mod abuse_support;
mod common;

use abuse_support::*;
use common::dns::TestDns;
use common::sink::TestSink;
use common::smtp_client::RawSmtp;
use common::tls::{TestPki, install_crypto_provider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const SHORT: Duration = Duration::from_secs(10);

/// A client config trusting only the certificate the daemon generated for itself.
fn trust_generated(t: &common::daemon::Tenso) -> Arc<rustls::ClientConfig> {
    install_crypto_provider();
    let pem = t.data_dir().join("tls").join("cert.pem");
    let cert =
        CertificateDer::from_pem_file(&pem).unwrap_or_else(|e| panic!("{}: {e}", pem.display()));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).expect("generated cert as trust anchor");
    Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// One reply (multi-line joined with `\n`) read from any stream.
async fn reply<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> (u16, String) {
    let mut texts = Vec::new();
    loop {
        let line = read_line(s, buf, SHORT)
            .await
            .unwrap_or_else(|e| panic!("reading a reply: {e}"));
        let code: u16 = line
            .get(..3)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("bad reply line {line:?}"));
        texts.push(line.get(4..).unwrap_or("").to_string());
        if line.as_bytes().get(3) != Some(&b'-') {
            return (code, texts.join("\n"));
        }
    }
}

async fn cmd<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
    line: &str,
) -> (u16, String) {
    s.write_all(format!("{line}\r\n").as_bytes())
        .await
        .expect("write");
    s.flush().await.expect("flush");
    reply(s, buf).await
}

/// True when nothing at all arrives within `d` (no stray replies).
async fn silent<S: AsyncRead + Unpin>(s: &mut S, buf: &[u8], d: Duration) -> Result<(), String> {
    if !buf.is_empty() {
        return Err(format!("stray bytes: {:?}", String::from_utf8_lossy(buf)));
    }
    let mut tmp = [0u8; 1024];
    match tokio::time::timeout(d, s.read(&mut tmp)).await {
        Err(_) => Ok(()),
        Ok(Ok(0)) => Err("connection closed".into()),
        Ok(Ok(n)) => Err(format!(
            "stray bytes: {:?}",
            String::from_utf8_lossy(&tmp[..n])
        )),
        Ok(Err(e)) => Err(e.to_string()),
    }
}

#[tokio::test]
async fn pipelined_commands_after_starttls_are_discarded() {
    let dns = TestDns::builder().start().await;
    let sink = TestSink::start().await;
    let conf = Conf {
        route: Some(sink.addr()),
        ..Conf::default()
    };
    let t = relay(&conf, &dns).await;
    let mut tcp = tcp_from(ip(2), t.smtp_addr()).await;
    let mut buf = Vec::new();
    let (code, _) = reply(&mut tcp, &mut buf).await;
    assert_eq!(code, 220);
    let (code, ehlo) = cmd(&mut tcp, &mut buf, "EHLO injector.test").await;
    assert_eq!(code, 250);
    assert!(
        ehlo.contains("STARTTLS"),
        "STARTTLS offered in clear: {ehlo}"
    );

    // The injection: three commands in one write.
    tcp.write_all(b"STARTTLS\r\nRSET\r\nMAIL FROM:<x@y>\r\n")
        .await
        .expect("write");
    let (code, text) = reply(&mut tcp, &mut buf).await;
    assert_eq!(code, 220, "STARTTLS: {text}");
    // Nothing else in clear: the RSET and MAIL were not answered before the handshake.
    assert!(
        buf.is_empty(),
        "clear-text replies after 220: {:?}",
        String::from_utf8_lossy(&buf)
    );

    let connector = tokio_rustls::TlsConnector::from(trust_generated(&t));
    let name = ServerName::try_from("tenso.test").expect("name");
    let mut tls = tokio::time::timeout(SHORT, connector.connect(name, tcp))
        .await
        .expect("handshake timeout")
        .expect("TLS handshake with the generated certificate");

    // After the handshake nothing pipelined executes: no stray 250 for RSET or MAIL…
    let mut buf = Vec::new();
    silent(&mut tls, &buf, Duration::from_millis(500))
        .await
        .expect("no replies for the discarded commands");
    // … and the session starts over: MAIL before EHLO is refused, and that reply is
    // the only one that comes.
    let (code, text) = cmd(&mut tls, &mut buf, "MAIL FROM:<x@y>").await;
    assert_eq!((code, esc(&text)), (503, "5.5.1"), "{text}");
    silent(&mut tls, &buf, Duration::from_millis(300))
        .await
        .expect("exactly one reply for one command");

    let (code, ehlo) = cmd(&mut tls, &mut buf, "EHLO injector.test").await;
    assert_eq!(code, 250, "{ehlo}");
    assert!(
        !ehlo.contains("STARTTLS"),
        "STARTTLS offered again under TLS: {ehlo}"
    );
    let (code, text) = cmd(&mut tls, &mut buf, "STARTTLS").await;
    assert_eq!(code, 503, "STARTTLS twice: {text}");

    // A message over TLS is accepted and the Received header says ESMTPS.
    assert_eq!(
        cmd(&mut tls, &mut buf, &format!("MAIL FROM:<{FROM}>"))
            .await
            .0,
        250
    );
    assert_eq!(
        cmd(&mut tls, &mut buf, "RCPT TO:<alice@alias.test>")
            .await
            .0,
        250
    );
    assert_eq!(cmd(&mut tls, &mut buf, "DATA").await.0, 354);
    let (code, text) = cmd(
        &mut tls,
        &mut buf,
        "Subject: over tls\r\nMessage-ID: <tls1@origin.test>\r\n\r\nsecret\r\n.",
    )
    .await;
    assert_eq!(code, 250, "{text}");
    assert_eq!(cmd(&mut tls, &mut buf, "QUIT").await.0, 221);
    drop(tls);

    let msgs = sink.wait_for(1, WAIT).await;
    let got = &msgs[0];
    assert_eq!(got.rcpts, vec!["alice@dest.test".to_string()]);
    let received = got.header("Received").expect("Received header");
    assert!(
        received.contains("with ESMTPS"),
        "Received of mail over TLS: {received}"
    );
    assert!(
        !got.text().contains("x@y"),
        "the injected MAIL left a trace:\n{}",
        got.text()
    );

    assert_eq!(counter(&t, "inbound", "starttls_injection").await, 1);
    expect_log(
        &t,
        &["discarding data pipelined after STARTTLS", "127.0.0.2"],
    )
    .await;
    // The next client, in clear, is served normally and is recorded as ESMTP.
    legit_client(&t, ip(3), "clear-after-injection").await;
    let msgs = sink.wait_for(2, WAIT).await;
    let clear = msgs
        .iter()
        .find(|m| m.text().contains("clear-after-injection"))
        .expect("clear message");
    let received = clear.header("Received").expect("Received");
    assert!(
        received.contains("with ESMTP ") || received.contains("with ESMTP;"),
        "{received}"
    );
}

#[tokio::test]
async fn self_signed_certificate_generated_when_none_configured() {
    let dns = TestDns::builder().start().await;
    let t = relay(&Conf::default(), &dns).await;
    let dir = t.data_dir().join("tls");
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    assert!(
        cert.is_file() && key.is_file(),
        "no cert/key in {}",
        dir.display()
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key).expect("key").permissions().mode() & 0o777;
    assert_eq!(mode & 0o077, 0, "key.pem readable by others: {mode:o}");
    let pem = std::fs::read_to_string(&cert).expect("cert");
    assert!(pem.contains("BEGIN CERTIFICATE"), "{pem}");

    // Opportunistic TLS works out of the box with that certificate (trusted here as
    // its own anchor: it is self-signed for the hostname).
    let mut c = RawSmtp::connect_from(ip(2), t.smtp_addr()).await;
    let (_, ehlo) = c.ehlo("client.test").await;
    assert!(ehlo.contains("STARTTLS"), "{ehlo}");
    c.starttls(trust_generated(&t), "tenso.test")
        .await
        .expect("STARTTLS with the generated certificate");
    let (code, ehlo) = c.ehlo("client.test").await;
    assert_eq!(code, 250);
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    send_ok(&mut c, "alice@alias.test", "self-signed").await;
    c.quit().await;

    // A restart keeps the same certificate (generated once).
    let mut t = t;
    t.restart().await;
    assert_eq!(std::fs::read_to_string(&cert).expect("cert"), pem);
}

#[tokio::test]
async fn configured_certificate_verifies_with_the_test_ca() {
    let dns = TestDns::builder().start().await;
    let sink = TestSink::start().await;
    let pki = TestPki::new(&["tenso.test"]);
    let certs = tempfile::tempdir().expect("tempdir");
    let (cert, key) = pki.write_to_dir(certs.path());
    let conf = Conf {
        route: Some(sink.addr()),
        more: format!(
            "[tls]\ncert = {}\nkey = {}\n",
            common::daemon::toml_string(&cert.to_string_lossy()),
            common::daemon::toml_string(&key.to_string_lossy())
        ),
        ..Conf::default()
    };
    let t = relay(&conf, &dns).await;
    assert!(
        !t.data_dir().join("tls").exists(),
        "no self-signed certificate when one is configured"
    );
    let mut c = RawSmtp::connect_from(ip(2), t.smtp_addr()).await;
    c.ehlo("client.test").await;
    // The client verifies the chain against the test CA only.
    c.starttls(pki.client_config(), "tenso.test")
        .await
        .expect("STARTTLS verified with the test CA");
    assert!(c.is_tls());
    let (_, ehlo) = c.ehlo("client.test").await;
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    send_ok(&mut c, "alice@alias.test", "verified-tls").await;
    c.quit().await;
    let msgs = sink.wait_for(1, WAIT).await;
    let received = msgs[0].header("Received").expect("Received");
    assert!(received.contains("with ESMTPS"), "{received}");

    // A client trusting another CA refuses the server's certificate.
    let other = TestPki::new(&["tenso.test"]);
    let mut c = RawSmtp::connect_from(ip(3), t.smtp_addr()).await;
    c.ehlo("client.test").await;
    assert!(
        c.starttls(other.client_config(), "tenso.test")
            .await
            .is_err(),
        "a certificate from another CA must not verify"
    );
}
