//! DKIM survives forwarding (issue 3): a message signed in the test with mail-auth's
//! `DkimSigner` (RSA-SHA256 and Ed25519-SHA256, simple and relaxed canonicalization),
//! keys published as TXT records in the in-process DNS server, is forwarded by tenso and
//! the bytes the sink received verify with mail-auth's `MessageAuthenticator` aimed at
//! that DNS server. A tampered copy of the same bytes must not verify, so the check is
//! not vacuous.

mod common;
mod delivery_support;

use common::daemon::Tenso;
use common::dns::TestDns;
use common::sink::TestSink;
use delivery_support::*;
use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256, SigningKey};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, DkimSigner};
use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// Standard base64 (RFC 4648) with padding, for the `p=` tag.
fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

fn rsa_key() -> RsaKey<Sha256> {
    common::tls::install_crypto_provider();
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("RSA key generation");
    RsaKey::<Sha256>::from_key_der(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        kp.serialize_der(),
    )))
    .expect("RSA key for mail-auth")
}

fn ed25519_key() -> Ed25519Key {
    let pkcs8 = Ed25519Key::generate_pkcs8().expect("Ed25519 key generation");
    Ed25519Key::from_pkcs8_der(&pkcs8).expect("Ed25519 key for mail-auth")
}

/// The unsigned message: dot lines, trailing whitespace, a folded header, trailing empty
/// lines — all things that break a simple/simple signature if touched.
fn unsigned_message(tag: &str) -> Vec<u8> {
    format!(
        "From: Sender <sender@origin.test>\r\n\
         To: Alice <alice@alias.test>\r\n\
         Subject: signed with {tag}\r\n\
         Date: Tue, 03 Mar 2026 10:00:00 +0000\r\n\
         Message-ID: <dkim.{tag}@origin.test>\r\n\
         X-Folded: one\r\n two   \r\n\
         \r\n\
         .a line with a leading dot\r\n\
         .\r\n\
         trailing space \r\n\
         \tindented\r\n\
         \r\n\
         \r\n"
    )
    .into_bytes()
}

fn sign<K: SigningKey>(key: K, selector: &str, canon: Canonicalization, msg: &[u8]) -> Vec<u8> {
    let sig = DkimSigner::from_key(key)
        .domain("origin.test")
        .selector(selector)
        .headers(["From", "To", "Subject", "Date", "Message-ID", "X-Folded"])
        .header_canonicalization(canon)
        .body_canonicalization(canon)
        .sign(msg)
        .expect("DKIM sign");
    let mut out = sig.to_header().into_bytes();
    out.extend_from_slice(msg);
    out
}

/// DKIM results of `raw` with mail-auth aimed at the test DNS server.
async fn verify(dns: &TestDns, raw: &[u8]) -> Vec<DkimResult> {
    let auth = MessageAuthenticator(dns.resolver());
    let msg = AuthenticatedMessage::parse(raw).expect("message parses");
    auth.verify_dkim(&msg)
        .await
        .iter()
        .map(|o| o.result().clone())
        .collect()
}

/// Forwards each signed message through tenso (with `extra` config) and checks the
/// copy the sink got: `signatures` DKIM results, all `Pass`.
async fn forwarded_dkim_verifies(
    signed: Vec<(String, Vec<u8>)>,
    dns: TestDns,
    extra: &str,
    signatures: usize,
) {
    let sink = TestSink::start().await;
    let t = Tenso::start(&config(&dns, sink.port(), "", FAST_QUEUE, extra)).await;
    add_alias(&t, "alice@alias.test", &["bob@dest.test"], "pool").await;
    for (i, (what, msg)) in signed.iter().enumerate() {
        // Sanity: the signature verifies before forwarding.
        assert_eq!(
            verify(&dns, msg).await,
            vec![DkimResult::Pass],
            "{what}: the test's own signature does not verify"
        );
        send(&t, "sender@origin.test", &["alice@alias.test"], msg).await;
        let got = sink.wait_for(i + 1, WAIT).await;
        let received = &got[i].data;
        assert_eq!(got[i].mail_from, "alice@alias.test");
        assert_eq!(
            verify(&dns, received).await,
            vec![DkimResult::Pass; signatures],
            "{what}: DKIM does not verify after forwarding:\n{}",
            String::from_utf8_lossy(received)
        );
        // Negative control: one changed header value must not verify any more.
        let text = String::from_utf8_lossy(received).into_owned();
        let tampered = text.replacen("Subject: signed", "Subject: Signed", 1);
        assert_ne!(tampered, text);
        let results = verify(&dns, tampered.as_bytes()).await;
        assert!(
            !results.contains(&DkimResult::Pass),
            "{what}: a tampered copy still verifies: {results:?}"
        );
    }
}

#[tokio::test]
async fn rsa_signed_message_still_verifies_after_forwarding() {
    let key = rsa_key();
    let p = base64(&key.public_key());
    let key2 = rsa_key();
    let p2 = base64(&key2.public_key());
    let dns = TestDns::builder()
        .mx("dest.test", 10, "mx.dest.test")
        .a("mx.dest.test", "127.0.0.1")
        .txt(
            "sel._domainkey.origin.test",
            &format!("v=DKIM1; k=rsa; p={p}"),
        )
        .txt(
            "relaxed._domainkey.origin.test",
            &format!("v=DKIM1; k=rsa; p={p2}"),
        )
        .start()
        .await;
    let simple = sign(
        key,
        "sel",
        Canonicalization::Simple,
        &unsigned_message("rsa-simple"),
    );
    let relaxed = sign(
        key2,
        "relaxed",
        Canonicalization::Relaxed,
        &unsigned_message("rsa-relaxed"),
    );
    forwarded_dkim_verifies(
        vec![
            ("rsa simple/simple".into(), simple),
            ("rsa relaxed/relaxed".into(), relaxed),
        ],
        dns,
        "",
        1,
    )
    .await;
}

#[tokio::test]
async fn ed25519_signed_message_still_verifies_after_forwarding() {
    let key = ed25519_key();
    let p = base64(&key.public_key());
    let key2 = ed25519_key();
    let p2 = base64(&key2.public_key());
    let dns = TestDns::builder()
        .mx("dest.test", 10, "mx.dest.test")
        .a("mx.dest.test", "127.0.0.1")
        .txt(
            "sel._domainkey.origin.test",
            &format!("v=DKIM1; k=ed25519; p={p}"),
        )
        .txt(
            "relaxed._domainkey.origin.test",
            &format!("v=DKIM1; k=ed25519; p={p2}"),
        )
        .start()
        .await;
    let simple = sign(
        key,
        "sel",
        Canonicalization::Simple,
        &unsigned_message("ed25519-simple"),
    );
    let relaxed = sign(
        key2,
        "relaxed",
        Canonicalization::Relaxed,
        &unsigned_message("ed25519-relaxed"),
    );
    forwarded_dkim_verifies(
        vec![
            ("ed25519 simple/simple".into(), simple),
            ("ed25519 relaxed/relaxed".into(), relaxed),
        ],
        dns,
        "",
        1,
    )
    .await;
}

/// PEM text of a PKCS#8 private key.
fn pkcs8_pem(der: &[u8]) -> String {
    let b64 = base64(der);
    let mut out = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str("-----END PRIVATE KEY-----\n");
    out
}

#[tokio::test]
async fn original_signature_survives_next_to_tensos_own_signature() {
    // tenso signs forwarded copies as alias.test with its own Ed25519 key.
    let tenso_pkcs8 = Ed25519Key::generate_pkcs8().expect("key");
    let tenso_pub = Ed25519Key::from_pkcs8_der(&tenso_pkcs8)
        .expect("key")
        .public_key();
    let dir = tempfile::tempdir().expect("tempdir");
    let key_path = dir.path().join("fwd.pem");
    std::fs::write(&key_path, pkcs8_pem(&tenso_pkcs8)).expect("write key");

    let origin = ed25519_key();
    let p = base64(&origin.public_key());
    let dns = TestDns::builder()
        .mx("dest.test", 10, "mx.dest.test")
        .a("mx.dest.test", "127.0.0.1")
        .txt(
            "sel._domainkey.origin.test",
            &format!("v=DKIM1; k=ed25519; p={p}"),
        )
        .txt(
            "fwd._domainkey.alias.test",
            &format!("v=DKIM1; k=ed25519; p={}", base64(&tenso_pub)),
        )
        .start()
        .await;
    let signed = sign(
        origin,
        "sel",
        Canonicalization::Simple,
        &unsigned_message("double-signed"),
    );
    let extra = format!(
        "[dkim]\ndomain = \"alias.test\"\nselector = \"fwd\"\nkey = {}\n",
        common::daemon::toml_string(&key_path.to_string_lossy())
    );
    forwarded_dkim_verifies(
        vec![("origin + tenso signatures".into(), signed)],
        dns,
        &extra,
        2,
    )
    .await;
}
