//! DKIM through the forwarder and the DMARC pre-flight (issue 5).
//! - Mail signed in the test with mail-auth (RSA-SHA256 and Ed25519-SHA256,
//!   relaxed/relaxed and simple/simple, a folded signed header, a body ending in several
//!   blank lines) still verifies after tenso forwarded it, with an independent verifier
//!   (dkimpy, Debian's python3-dkim, fetching keys from the test DNS server with
//!   dnspython) and with mail-auth; a tampered copy does not, so the check is not
//!   vacuous. tenso records `dkim=pass` for it.
//! - With `[dkim]` set to a key from `tenso dkim keygen` (RSA and Ed25519), whose printed
//!   TXT record is published, tenso's own signature (on top) verifies with dkimpy and
//!   mail-auth, next to the original one; tenso's DSNs are signed too.
//! - DMARC pre-flight: an SPF-only sender of a `p=reject` domain is pooled under `pool`
//!   (with `X-Tenso-Pool-Reason:`) and forwarded under `forward`; aligned valid DKIM is
//!   always forwarded; an unaligned or broken signature does not rescue a message; the
//!   per-user override wins over the global setting in both directions.

mod auth_support;
mod common;

use auth_support::*;
use common::daemon::{Tenso, toml_string};
use common::dns::TestDnsBuilder;
use common::sink::{Delivered, TestSink};
use mail_auth::dkim::Canonicalization;

const ORIGIN_SPF: &str = "v=spf1 ip4:127.0.0.1 -all";

fn by_subject<'a>(got: &'a [Delivered], subject: &str) -> &'a Delivered {
    got.iter()
        .find(|d| {
            header_values(&d.data, "Subject")
                .first()
                .map(String::as_str)
                == Some(subject)
        })
        .unwrap_or_else(|| panic!("no copy with Subject {subject:?}"))
}

/// A message whose signed Subject is folded and whose body has trailing whitespace,
/// a leading dot and several blank lines at the end.
fn signable(from: &str, tag: &str) -> Vec<u8> {
    format!(
        "From: Sender <{from}>\r\n\
         To: Alice <alice@alias.test>\r\n\
         Subject: dkim {tag}\r\n   folded\r\n\
         Date: Tue, 03 Mar 2026 10:00:00 +0000\r\n\
         Message-ID: <{}@origin.test>\r\n\
         \r\n\
         Hello,\r\n\
         trailing space   \r\n\
         \tindented  line\r\n\
         .a leading dot\r\n\
         \r\n\
         \r\n\
         \r\n\
         \r\n",
        tag.replace(' ', "-")
    )
    .into_bytes()
}

/// The received copy with one body character changed.
fn tampered(data: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(data).into_owned();
    let t = text.replacen("\r\nHello,\r\n", "\r\nHallo,\r\n", 1);
    assert_ne!(t, text, "tampering changed nothing");
    t.into_bytes()
}

#[tokio::test]
async fn third_party_signatures_still_verify_after_forwarding() {
    let rsa = TestKey::rsa();
    let ed = TestKey::ed25519();
    let dns = spf_zone()
        .txt("origin.test", ORIGIN_SPF)
        .txt("rsa._domainkey.origin.test", rsa.txt())
        .txt("ed._domainkey.origin.test", ed.txt())
        .start()
        .await;
    let dest = TestSink::start().await;
    let senders = TestSink::start().await;
    let t = Tenso::start(&config(&dns, &routes(&dest, &senders), "", "", "")).await;
    cli_ok(&t, &["user", "add", "alice@alias.test", "alice@dest.test"]).await;

    let cases = [
        ("rsa relaxed", &rsa, "rsa", Canonicalization::Relaxed),
        ("rsa simple", &rsa, "rsa", Canonicalization::Simple),
        ("ed25519 relaxed", &ed, "ed", Canonicalization::Relaxed),
        ("ed25519 simple", &ed, "ed", Canonicalization::Simple),
    ];
    for (tag, key, sel, canon) in &cases {
        let signed = key.sign(
            "origin.test",
            sel,
            *canon,
            &signable("sender@origin.test", tag),
        );
        // The verifier accepts the test's own signature before forwarding.
        let before = dkimpy_verify(&dns, &signed).await;
        assert!(
            before.len() == 1 && before[0].ok,
            "{tag}: dkimpy rejects the original: {before:?}"
        );
        submit_ok(
            &t,
            "127.0.0.1",
            "mx.origin.test",
            "sender@origin.test",
            &["alice@alias.test"],
            &signed,
        )
        .await;
    }
    let got = dest.wait_for(cases.len(), WAIT).await;
    for (tag, _, sel, _) in &cases {
        let d = by_subject(&got, &format!("dkim {tag} folded"));
        let text = d.text();
        assert!(
            text.ends_with("\r\n\r\n\r\n\r\n"),
            "{tag}: trailing blank lines kept:\n{text:?}"
        );
        let py = dkimpy_verify(&dns, &d.data).await;
        assert_eq!(py.len(), 1, "{tag}: one signature: {py:?}");
        assert!(
            py[0].ok && py[0].d == "origin.test" && py[0].s == *sel,
            "{tag}: dkimpy does not verify the forwarded copy: {py:?}\n{text}"
        );
        assert_eq!(
            mail_auth_verify(&dns, &d.data).await,
            vec![("origin.test".to_string(), sel.to_string(), true)],
            "{tag}: mail-auth"
        );
        let bad = dkimpy_verify(&dns, &tampered(&d.data)).await;
        assert!(
            !bad[0].ok,
            "{tag}: a tampered copy still verifies with dkimpy: {bad:?}"
        );
        // tenso verified it on the way in, and said so.
        let ar = our_ar(&d.data, "tenso.test");
        assert_eq!(
            ar_result(&ar, "dkim", "header.s"),
            Some(("pass".into(), sel.to_string())),
            "{ar}"
        );
        assert_eq!(
            ar_result(&ar, "dkim", "header.d").map(|r| r.1),
            Some("origin.test".into()),
            "{ar}"
        );
        assert_eq!(
            ar_result(&ar, "spf", "smtp.mailfrom").map(|r| r.0),
            Some("pass".into()),
            "{ar}"
        );
    }
}

async fn own_signature_verifies(algorithm: &str) {
    let keydir = tempfile::tempdir().expect("tempdir");
    let (key_path, txt) = tenso_keygen(keydir.path(), algorithm, "fwd1", "fwd.test").await;
    let want_a = if algorithm == "rsa" {
        "rsa-sha256"
    } else {
        "ed25519-sha256"
    };
    assert!(
        txt.starts_with(&format!("v=DKIM1; k={algorithm}; p=")),
        "{txt}"
    );
    let rsa = TestKey::rsa();
    let dns = spf_zone()
        .txt("origin.test", ORIGIN_SPF)
        .txt("rsa._domainkey.origin.test", rsa.txt())
        .txt("fwd1._domainkey.fwd.test", &txt)
        .start()
        .await;
    let dest = TestSink::start().await;
    let senders = TestSink::start().await;
    let dkim = format!(
        "[dkim]\ndomain = \"fwd.test\"\nselector = \"fwd1\"\nkey = {}\n",
        toml_string(&key_path.to_string_lossy())
    );
    let t = Tenso::start(&config(
        &dns,
        &routes(&dest, &senders),
        "unknown_recipient = \"accept\"",
        "",
        &format!("{dkim}\n{NO_UNKNOWN_PENALTY}"),
    ))
    .await;
    cli_ok(&t, &["user", "add", "alice@alias.test", "alice@dest.test"]).await;

    let signed = rsa.sign(
        "origin.test",
        "rsa",
        Canonicalization::Relaxed,
        &signable("sender@origin.test", "already signed"),
    );
    submit_ok(
        &t,
        "127.0.0.1",
        "mx.origin.test",
        "sender@origin.test",
        &["alice@alias.test"],
        &signed,
    )
    .await;
    submit_ok(
        &t,
        "127.0.0.1",
        "mx.origin.test",
        "sender@origin.test",
        &["alice@alias.test"],
        &signable("sender@origin.test", "unsigned"),
    )
    .await;
    // An unknown recipient: the DSN tenso sends to the original sender is signed too.
    submit_ok(
        &t,
        "127.0.0.1",
        "mx.origin.test",
        "sender@origin.test",
        &["ghost@alias.test"],
        &signable("sender@origin.test", "to a ghost"),
    )
    .await;

    let got = dest.wait_for(2, WAIT).await;
    for (subject, want_domains) in [
        (
            "dkim already signed folded",
            vec!["fwd.test", "origin.test"],
        ),
        ("dkim unsigned folded", vec!["fwd.test"]),
    ] {
        let d = by_subject(&got, subject);
        let text = d.text();
        let fields = header_fields(&d.data);
        // Delivered-To (per copy, unsigned), then tenso's DKIM-Signature on top of its
        // Received-SPF, Received and Authentication-Results.
        assert_eq!(fields[0].0, "Delivered-To", "{text}");
        assert_eq!(fields[1].0, "DKIM-Signature", "{text}");
        assert!(
            fields[1].1.contains("d=fwd.test") && fields[1].1.contains("s=fwd1"),
            "{text}"
        );
        assert!(fields[1].1.contains(&format!("a={want_a}")), "{text}");
        assert_eq!(fields[2].0, "Received-SPF", "{text}");
        assert_eq!(fields[3].0, "Received", "{text}");
        assert!(fields[3].1.contains("(tenso)"), "{text}");

        let py = dkimpy_verify(&dns, &d.data).await;
        let mut domains: Vec<&str> = py.iter().map(|s| s.d.as_str()).collect();
        domains.sort();
        assert_eq!(domains, want_domains, "{subject}: {py:?}");
        assert!(py.iter().all(|s| s.ok), "{subject}: dkimpy: {py:?}\n{text}");
        let ma = mail_auth_verify(&dns, &d.data).await;
        assert_eq!(ma.len(), want_domains.len(), "{subject}: {ma:?}");
        assert!(
            ma.iter().all(|(_, _, ok)| *ok),
            "{subject}: mail-auth: {ma:?}"
        );
        assert!(
            ma.iter().any(|(d, s, _)| d == "fwd.test" && s == "fwd1"),
            "{ma:?}"
        );
        // Control: a changed body breaks tenso's signature for dkimpy.
        let bad = dkimpy_verify(&dns, &tampered(&d.data)).await;
        assert!(
            bad.iter().all(|s| !s.ok),
            "{subject}: tampered copy verifies: {bad:?}"
        );
    }

    let dsn = &senders.wait_for(1, WAIT).await[0];
    assert_eq!(
        (dsn.mail_from.as_str(), dsn.rcpts.clone()),
        ("", vec!["sender@origin.test".to_string()])
    );
    let py = dkimpy_verify(&dns, &dsn.data).await;
    assert!(
        py.len() == 1 && py[0].ok && py[0].d == "fwd.test",
        "tenso's DSN is signed with its key: {py:?}\n{}",
        dsn.text()
    );
    assert_eq!(
        mail_auth_verify(&dns, &dsn.data).await,
        vec![("fwd.test".into(), "fwd1".into(), true)]
    );
}

#[tokio::test]
async fn own_rsa_signature_verifies_downstream() {
    own_signature_verifies("rsa").await;
}

#[tokio::test]
async fn own_ed25519_signature_verifies_downstream() {
    own_signature_verifies("ed25519").await;
}

/// Zone for the pre-flight: spfonly.test (p=reject, SPF passes, no DKIM), signed.test
/// (p=reject, a DKIM key), monitor.test (p=none), quarantine.test (p=quarantine), and
/// origin.test's key for an unaligned signature.
fn dmarc_zone(signed_key: &TestKey, origin_key: &TestKey) -> TestDnsBuilder {
    spf_zone()
        .txt("spfonly.test", ORIGIN_SPF)
        .txt("_dmarc.spfonly.test", "v=DMARC1; p=reject")
        .txt("signed.test", ORIGIN_SPF)
        .txt("_dmarc.signed.test", "v=DMARC1; p=reject")
        .txt("k1._domainkey.signed.test", signed_key.txt())
        .txt("monitor.test", ORIGIN_SPF)
        .txt("_dmarc.monitor.test", "v=DMARC1; p=none")
        .txt("quarantine.test", ORIGIN_SPF)
        .txt("_dmarc.quarantine.test", "v=DMARC1; p=quarantine")
        .txt("origin.test", ORIGIN_SPF)
        .txt("rsa._domainkey.origin.test", origin_key.txt())
}

fn dmarc_message(from: &str, subject: &str) -> Vec<u8> {
    format!(
        "From: {from}\r\nTo: alice@alias.test\r\nSubject: {subject}\r\n\
         Date: Tue, 03 Mar 2026 10:00:00 +0000\r\nMessage-ID: <{}@test>\r\n\r\nbody\r\n",
        subject.replace(' ', ".")
    )
    .into_bytes()
}

/// The pooled copies of `alias` as (reason, text); each must start with the reason.
fn pooled(t: &Tenso, alias: &str) -> Vec<(String, String)> {
    pool_messages(t, alias)
        .into_iter()
        .map(|m| {
            let fields = header_fields(&m);
            let text = String::from_utf8_lossy(&m).into_owned();
            assert_eq!(fields[0].0, "X-Tenso-Pool-Reason", "reason on top:\n{text}");
            (fields[0].1.clone(), text)
        })
        .collect()
}

/// (subject, final recipient) of every forwarded copy.
fn forwarded(dest: &TestSink) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = dest
        .messages()
        .iter()
        .flat_map(|d| {
            let s = header_values(&d.data, "Subject")
                .first()
                .cloned()
                .unwrap_or_default();
            d.rcpts.iter().map(move |r| (s.clone(), r.clone()))
        })
        .collect();
    v.sort();
    v
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = v
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn dmarc_preflight_pool_mode_with_per_user_override() {
    let signed_key = TestKey::rsa();
    let origin_key = TestKey::rsa();
    let dns = dmarc_zone(&signed_key, &origin_key).start().await;
    let dest = TestSink::start().await;
    let senders = TestSink::start().await;
    let t = Tenso::start(&config(
        &dns,
        &routes(&dest, &senders),
        "",
        "dmarc_preflight = \"pool\"",
        "",
    ))
    .await;
    cli_ok(&t, &["user", "add", "alice@alias.test", "alice@dest.test"]).await;
    cli_ok(&t, &["user", "add", "bob@alias.test", "bob@dest.test"]).await;
    cli_ok(
        &t,
        &[
            "user",
            "set",
            "bob@alias.test",
            "--dmarc-preflight",
            "forward",
        ],
    )
    .await;

    let send = |from: &'static str, rcpts: &'static [&'static str], msg: Vec<u8>| {
        let t = &t;
        async move { submit_ok(t, "127.0.0.1", "client.test", from, rcpts, &msg).await }
    };
    // 1. SPF-only p=reject sender to alice: pooled, nothing queued. The body is
    // larger than a session keeps in memory: the pooled copy is still whole.
    let mut large = dmarc_message("x@spfonly.test", "spf only");
    for i in 0..8000 {
        large.extend_from_slice(format!("line {i} of a large pooled message\r\n").as_bytes());
    }
    let r = send("x@spfonly.test", &["alice@alias.test"], large).await;
    assert!(!r.contains("queued as"), "nothing to forward: {r}");
    let p = pooled(&t, "alice@alias.test");
    assert_eq!(p.len(), 1, "pooled at once, before the 250");
    assert!(
        p[0].0.contains("spfonly.test") && p[0].0.contains("p=reject"),
        "{}",
        p[0].0
    );
    assert!(p[0].1.contains("Subject: spf only"), "{}", p[0].1);
    assert!(
        p[0].1.ends_with("line 7999 of a large pooled message\r\n"),
        "the pooled copy is whole ({} octets)",
        p[0].1.len()
    );
    // 2. The same to alice and bob: bob's override forwards his copy.
    send(
        "x@spfonly.test",
        &["alice@alias.test", "bob@alias.test"],
        dmarc_message("x@spfonly.test", "spf only two"),
    )
    .await;
    // 3. Aligned, valid DKIM: forwarded even in pool mode.
    let aligned = signed_key.sign(
        "signed.test",
        "k1",
        Canonicalization::Relaxed,
        &dmarc_message("x@signed.test", "aligned dkim"),
    );
    send("x@signed.test", &["alice@alias.test"], aligned).await;
    // 4. A valid but unaligned signature (d=origin.test) does not rescue it: pooled.
    let unaligned = origin_key.sign(
        "origin.test",
        "rsa",
        Canonicalization::Relaxed,
        &dmarc_message("x@spfonly.test", "unaligned dkim"),
    );
    send("x@spfonly.test", &["alice@alias.test"], unaligned).await;
    // 5. An aligned signature that no longer verifies does not either: pooled.
    let broken = signed_key.sign(
        "signed.test",
        "k1",
        Canonicalization::Relaxed,
        &dmarc_message("x@signed.test", "broken dkim"),
    );
    let broken = String::from_utf8(broken)
        .unwrap()
        .replace("\r\nbody\r\n", "\r\nbody changed\r\n");
    send("x@signed.test", &["alice@alias.test"], broken.into_bytes()).await;
    // 6. p=none and p=quarantine (dmarc_preflight_quarantine is off): forwarded.
    send(
        "x@monitor.test",
        &["alice@alias.test"],
        dmarc_message("x@monitor.test", "p none"),
    )
    .await;
    send(
        "x@quarantine.test",
        &["alice@alias.test"],
        dmarc_message("x@quarantine.test", "p quarantine"),
    )
    .await;

    let want = pairs(&[
        ("spf only two", "bob@dest.test"),
        ("aligned dkim", "alice@dest.test"),
        ("p none", "alice@dest.test"),
        ("p quarantine", "alice@dest.test"),
    ]);
    dest.wait_for(want.len(), WAIT).await;
    wait_queue_empty(&t).await;
    assert_eq!(forwarded(&dest), want, "{}", dest.describe());
    let aligned_copy = by_subject(&dest.messages(), "aligned dkim").clone();
    let ar = our_ar(&aligned_copy.data, "tenso.test");
    assert_eq!(
        ar_result(&ar, "dkim", "header.d"),
        Some(("pass".into(), "signed.test".into())),
        "{ar}"
    );
    assert_eq!(
        ar_result(&ar, "dmarc", "header.from").map(|r| r.0),
        Some("pass".into()),
        "{ar}"
    );

    let p = pooled(&t, "alice@alias.test");
    let mut subjects: Vec<String> = p
        .iter()
        .map(|(_, text)| header_values(text.as_bytes(), "Subject")[0].clone())
        .collect();
    subjects.sort();
    assert_eq!(
        subjects,
        ["broken dkim", "spf only", "spf only two", "unaligned dkim"]
    );
    for (reason, text) in &p {
        assert!(reason.starts_with("DMARC pre-flight"), "{reason}");
        // The pooled copy is what would have been forwarded: tenso's results included.
        assert_eq!(
            authserv_id(&our_ar(text.as_bytes(), "tenso.test")),
            "tenso.test"
        );
    }
    assert!(
        pool_messages(&t, "bob@alias.test").is_empty(),
        "bob's override is forward"
    );
    assert_eq!(counters(&t).await["inbound"]["dmarc_preflight_pooled"], 4);
}

#[tokio::test]
async fn dmarc_preflight_forward_mode_with_per_user_override() {
    let signed_key = TestKey::rsa();
    let origin_key = TestKey::rsa();
    let dns = dmarc_zone(&signed_key, &origin_key).start().await;
    let dest = TestSink::start().await;
    let senders = TestSink::start().await;
    // No dmarc_preflight key: the default is "forward".
    let t = Tenso::start(&config(&dns, &routes(&dest, &senders), "", "", "")).await;
    cli_ok(&t, &["user", "add", "alice@alias.test", "alice@dest.test"]).await;
    cli_ok(&t, &["user", "add", "carol@alias.test", "carol@dest.test"]).await;
    cli_ok(
        &t,
        &[
            "user",
            "set",
            "carol@alias.test",
            "--dmarc-preflight",
            "pool",
        ],
    )
    .await;

    submit_ok(
        &t,
        "127.0.0.1",
        "client.test",
        "x@spfonly.test",
        &["alice@alias.test", "carol@alias.test"],
        &dmarc_message("x@spfonly.test", "spf only"),
    )
    .await;
    let aligned = signed_key.sign(
        "signed.test",
        "k1",
        Canonicalization::Simple,
        &dmarc_message("x@signed.test", "aligned dkim"),
    );
    submit_ok(
        &t,
        "127.0.0.1",
        "client.test",
        "x@signed.test",
        &["carol@alias.test"],
        &aligned,
    )
    .await;

    let want = pairs(&[
        ("spf only", "alice@dest.test"),
        ("aligned dkim", "carol@dest.test"),
    ]);
    dest.wait_for(want.len(), WAIT).await;
    wait_queue_empty(&t).await;
    assert_eq!(forwarded(&dest), want, "{}", dest.describe());
    let p = pooled(&t, "carol@alias.test");
    assert_eq!(p.len(), 1, "carol's override pools the doomed copy");
    assert!(p[0].0.contains("spfonly.test"), "{}", p[0].0);
    assert!(p[0].1.contains("Subject: spf only"));
    assert!(
        pool_messages(&t, "alice@alias.test").is_empty(),
        "alice uses the default: forward"
    );
    assert!(
        t.log().contains("DMARC pre-flight: forwarding anyway"),
        "forward mode logs the doomed forward"
    );
}
