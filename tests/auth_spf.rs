//! SPF at tenso's MAIL FROM (issue 5), over real SMTP from 127.0.0.x against a real DNS
//! server on loopback that publishes every SPF outcome:
//! - each result (pass, fail, softfail, neutral, none, permerror, temperror by SERVFAIL
//!   and by a silent server) is recorded in the forwarded copy's
//!   `Authentication-Results` and in one `Received-SPF` above tenso's `Received`
//!   (RFC 7208 §9.1) with the same result and each error named once, and it follows
//!   the client IP;
//! - `spf_fail = "reject"` refuses only `fail` (550 5.7.23), softfail is accepted;
//! - `spf_temperror = "defer"` answers 451 4.7.24 and only for temperror;
//! - a forged `Authentication-Results` carrying tenso's authserv-id is stripped, foreign
//!   ones are kept (RFC 8601 §5);
//! - the MAIL FROM tenso rewrites to (proposal 2) passes SPF at the destination.

mod auth_support;
mod common;

use std::net::IpAddr;

use auth_support::*;
use common::daemon::Tenso;
use common::sink::{Delivered, TestSink};
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{MessageAuthenticator, SpfResult};

/// The copy whose Subject is `subject`.
fn by_subject<'a>(got: &'a [Delivered], subject: &str) -> &'a Delivered {
    got.iter()
        .find(|d| {
            header_values(&d.data, "Subject")
                .first()
                .map(String::as_str)
                == Some(subject)
        })
        .unwrap_or_else(|| {
            panic!(
                "no forwarded copy with Subject {subject:?}; got {:?}",
                got.iter()
                    .map(|d| header_values(&d.data, "Subject"))
                    .collect::<Vec<_>>()
            )
        })
}

/// Checks the SPF record-keeping of one forwarded copy.
fn assert_spf_recorded(d: &Delivered, ip: &str, helo: &str, from: &str, want: &str) {
    let text = d.text();
    let ar = our_ar(&d.data, "tenso.test");
    let mailfrom = if from.is_empty() { "<>" } else { from };
    assert_eq!(
        ar_result(&ar, "spf", "smtp.mailfrom"),
        Some((want.to_string(), mailfrom.to_string())),
        "MAIL FROM:<{from}> from {ip}: wrong spf= in\n{text}"
    );
    assert_eq!(
        ar_result(&ar, "spf", "smtp.helo").map(|(_, h)| h),
        Some(helo.to_string()),
        "the HELO identity is recorded separately:\n{text}"
    );
    let rspf = header_values(&d.data, "Received-SPF");
    assert_eq!(rspf.len(), 1, "one Received-SPF:\n{text}");
    assert!(
        rspf[0].starts_with(&format!("{want} ")),
        "Received-SPF does not start with {want}: {}",
        rspf[0]
    );
    assert!(
        rspf[0].contains(&format!("client-ip={ip};")),
        "Received-SPF names the client IP {ip}: {}",
        rspf[0]
    );
    if !from.is_empty() {
        assert!(
            rspf[0].contains(&format!("envelope-from=\"{from}\"")),
            "Received-SPF names the envelope sender: {}",
            rspf[0]
        );
    }
    // Each error is named once: in `problem=`, not again in the comment.
    if want == "permerror" || want == "temperror" {
        let problem = rspf[0]
            .split("problem=\"")
            .nth(1)
            .and_then(|p| p.split("\";").next())
            .unwrap_or_else(|| panic!("{want} without problem=: {}", rspf[0]));
        assert_eq!(rspf[0].matches(problem).count(), 1, "{}", rspf[0]);
    }
    // Order (RFC 7208 §9.1): Received-SPF above tenso's Received, then
    // Authentication-Results, then the message as it came (its From).
    let names: Vec<String> = header_fields(&d.data)
        .into_iter()
        .map(|(n, _)| n.to_ascii_lowercase())
        .collect();
    let pos = |n: &str| {
        names
            .iter()
            .position(|x| x == n)
            .unwrap_or_else(|| panic!("no {n} header in\n{text}"))
    };
    assert!(
        header_values(&d.data, "Received")[0].contains("(tenso)"),
        "first Received is tenso's:\n{text}"
    );
    assert!(
        pos("received-spf") < pos("received")
            && pos("received") < pos("authentication-results")
            && pos("authentication-results") < pos("from"),
        "header order is Received-SPF, Received, Authentication-Results, original:\n{text}"
    );
}

async fn relay(
    dns: &common::dns::TestDns,
    dest: &TestSink,
    senders: &TestSink,
    auth: &str,
) -> Tenso {
    let t = Tenso::start(&config(dns, &routes(dest, senders), "", auth, "")).await;
    cli_ok(&t, &["user", "add", "alice@alias.test", "alice@dest.test"]).await;
    t
}

#[tokio::test]
async fn every_spf_result_is_recorded_in_the_forwarded_copy() {
    let dns = spf_zone().start().await;
    let dest = TestSink::start().await;
    let senders = TestSink::start().await;
    let t = relay(&dns, &dest, &senders, "").await;

    // (client IP, MAIL FROM, expected result)
    let mut cases: Vec<(&str, String, &str)> = SPF_DOMAINS
        .iter()
        .map(|(d, r)| ("127.0.0.1", format!("user@{d}"), *r))
        .collect();
    // The client IP is what is checked: the same domains give other results elsewhere.
    cases.push(("127.0.0.2", "user@fail.test".into(), "pass"));
    cases.push(("127.0.0.2", "user@softfail.test".into(), "pass"));
    cases.push(("127.0.0.2", "user@pass.test".into(), "fail"));
    for (i, (ip, from, _)) in cases.iter().enumerate() {
        let subject = format!("spf case {i}");
        submit_ok(
            &t,
            ip,
            "client.test",
            from,
            &["alice@alias.test"],
            &message(from, &subject),
        )
        .await;
    }
    let got = dest.wait_for(cases.len(), WAIT).await;
    println!(
        "{:<10} {:<22} {:<10} {:<10}",
        "client", "MAIL FROM", "expected", "recorded"
    );
    for (i, (ip, from, want)) in cases.iter().enumerate() {
        let d = by_subject(&got, &format!("spf case {i}"));
        let ar = our_ar(&d.data, "tenso.test");
        let recorded = ar_result(&ar, "spf", "smtp.mailfrom")
            .map(|(r, _)| r)
            .unwrap_or_default();
        println!("{ip:<10} {from:<22} {want:<10} {recorded:<10}");
        assert_spf_recorded(d, ip, "client.test", from, want);
        assert_eq!(d.mail_from, "alice@alias.test", "proposal 2 rewrite");
    }
    wait_queue_empty(&t).await;
    assert_eq!(dest.messages().len(), cases.len(), "one copy per message");
    assert_eq!(
        senders.transactions(),
        0,
        "no DSN to anyone:\n{}",
        senders.describe()
    );
}

#[tokio::test]
async fn spf_fail_reject_policy_refuses_only_fail() {
    let dns = spf_zone().start().await;
    let dest = TestSink::start().await;
    let senders = TestSink::start().await;
    let t = relay(&dns, &dest, &senders, "spf_fail = \"reject\"").await;

    let mut accepted = Vec::new();
    for (i, (dom, want)) in SPF_DOMAINS.iter().enumerate() {
        let from = format!("user@{dom}");
        let subject = format!("reject policy {i}");
        let r = submit(
            &t,
            "127.0.0.1",
            "client.test",
            &from,
            &["alice@alias.test"],
            &message(&from, &subject),
        )
        .await;
        if *want == "fail" {
            let e = r.expect_err("SPF fail must be refused under spf_fail = reject");
            assert_eq!((e.stage, e.code), ("MAIL", 550), "{e}");
            assert!(e.text.starts_with("5.7.23"), "enhanced code 5.7.23: {e}");
        } else {
            let (code, text) = r.unwrap_or_else(|e| panic!("{from} ({want}) refused: {e}"));
            assert_eq!(code, 250, "{from} ({want}): {text}");
            accepted.push(("127.0.0.1", "client.test", from, subject, *want));
        }
    }
    // Null sender: SPF checks postmaster@HELO, so EHLO fail.test is refused too …
    let e = submit(
        &t,
        "127.0.0.1",
        "fail.test",
        "",
        &["alice@alias.test"],
        &message("auto@fail.test", "null fail"),
    )
    .await
    .expect_err("null sender with a failing HELO domain");
    assert_eq!((e.stage, e.code), ("MAIL", 550), "{e}");
    assert!(e.text.starts_with("5.7.23"), "{e}");
    // … while a softfailing HELO domain is accepted.
    submit_ok(
        &t,
        "127.0.0.1",
        "softfail.test",
        "",
        &["alice@alias.test"],
        &message("auto@softfail.test", "null softfail"),
    )
    .await;
    accepted.push((
        "127.0.0.1",
        "softfail.test",
        String::new(),
        "null softfail".into(),
        "softfail",
    ));
    // The policy follows the result, not the domain: fail.test from its own IP passes.
    submit_ok(
        &t,
        "127.0.0.2",
        "client.test",
        "user@fail.test",
        &["alice@alias.test"],
        &message("user@fail.test", "fail.test authorized"),
    )
    .await;
    accepted.push((
        "127.0.0.2",
        "client.test",
        "user@fail.test".into(),
        "fail.test authorized".into(),
        "pass",
    ));

    let got = dest.wait_for(accepted.len(), WAIT).await;
    for (ip, helo, from, subject, want) in &accepted {
        assert_spf_recorded(by_subject(&got, subject), ip, helo, from, want);
    }
    wait_queue_empty(&t).await;
    assert_eq!(
        dest.messages().len(),
        accepted.len(),
        "nothing refused was forwarded:\n{}",
        dest.describe()
    );
}

#[tokio::test]
async fn spf_temperror_defer_policy_gives_451() {
    let dns = spf_zone().start().await;
    let dest = TestSink::start().await;
    let senders = TestSink::start().await;
    let t = relay(&dns, &dest, &senders, "spf_temperror = \"defer\"").await;

    for dom in ["servfail.test", "blackhole.test"] {
        let from = format!("user@{dom}");
        let e = submit(
            &t,
            "127.0.0.1",
            "client.test",
            &from,
            &["alice@alias.test"],
            &message(&from, dom),
        )
        .await
        .expect_err("temperror must be deferred");
        assert_eq!((e.stage, e.code), ("MAIL", 451), "{from}: {e}");
        assert!(e.text.starts_with("4.7.24"), "enhanced code 4.7.24: {e}");
    }
    // Every other result is accepted under this policy (spf_fail stays "record").
    let others: Vec<(&str, &str)> = SPF_DOMAINS
        .iter()
        .filter(|(_, r)| *r != "temperror")
        .copied()
        .collect();
    for (dom, _) in &others {
        let from = format!("user@{dom}");
        submit_ok(
            &t,
            "127.0.0.1",
            "client.test",
            &from,
            &["alice@alias.test"],
            &message(&from, dom),
        )
        .await;
    }
    let got = dest.wait_for(others.len(), WAIT).await;
    for (dom, want) in &others {
        assert_spf_recorded(
            by_subject(&got, dom),
            "127.0.0.1",
            "client.test",
            &format!("user@{dom}"),
            want,
        );
    }
    wait_queue_empty(&t).await;
    assert_eq!(dest.messages().len(), others.len(), "{}", dest.describe());
}

#[tokio::test]
async fn forged_authentication_results_are_stripped_foreign_ones_kept() {
    let dns = spf_zone().start().await;
    let dest = TestSink::start().await;
    let senders = TestSink::start().await;

    // 1. authserv-id = hostname (tenso.test).
    let t = relay(&dns, &dest, &senders, "").await;
    let msg = b"Authentication-Results: tenso.test; spf=pass smtp.mailfrom=forged1@fail.test\r\n\
Authentication-Results: TENSO.TEST 1;\r\n\tdkim=pass header.d=forged2.example\r\n\
Authentication-Results: (looks harmless) tenso.test; dmarc=pass header.from=forged3.example\r\n\
Authentication-Results: mx.other.example; dkim=pass header.d=kept1.example\r\n\
Authentication-Results: tenso.test.evil.example; spf=pass smtp.mailfrom=kept2@fail.test\r\n\
From: user@fail.test\r\nTo: alice@alias.test\r\nSubject: forged results\r\n\r\n\
Authentication-Results: tenso.test; a body line is not a header\r\n";
    submit_ok(
        &t,
        "127.0.0.1",
        "client.test",
        "user@fail.test",
        &["alice@alias.test"],
        msg,
    )
    .await;
    let got = dest.wait_for(1, WAIT).await;
    let d = &got[0];
    let text = d.text();
    let (head, body) = text.split_once("\r\n\r\n").expect("header/body separator");
    for forged in ["forged1@fail.test", "forged2.example", "forged3.example"] {
        assert!(
            !head.contains(forged),
            "forged result {forged} survived:\n{text}"
        );
    }
    for kept in [
        "header.d=kept1.example",
        "tenso.test.evil.example; spf=pass smtp.mailfrom=kept2@fail.test",
    ] {
        assert!(
            head.contains(kept),
            "foreign result {kept:?} was removed:\n{text}"
        );
    }
    assert!(
        body.contains("Authentication-Results: tenso.test; a body line"),
        "body untouched:\n{text}"
    );
    let ar = our_ar(&d.data, "tenso.test");
    assert_eq!(
        ar_result(&ar, "spf", "smtp.mailfrom"),
        Some(("fail".into(), "user@fail.test".into())),
        "tenso's own result replaces the forged pass:\n{text}"
    );
    assert_eq!(
        header_values(&d.data, "Authentication-Results").len(),
        3,
        "ours + 2 foreign:\n{text}"
    );
    drop(t);

    // 2. An explicit authserv-id: only that one is ours; the hostname is just a name.
    let dest2 = TestSink::start().await;
    let t = relay(&dns, &dest2, &senders, "authserv_id = \"auth.tenso.test\"").await;
    let msg =
        b"Authentication-Results: auth.tenso.test; spf=pass smtp.mailfrom=forged4@fail.test\r\n\
Authentication-Results: tenso.test; dkim=pass header.d=kept3.example\r\n\
From: user@fail.test\r\nTo: alice@alias.test\r\nSubject: forged results 2\r\n\r\nbody\r\n";
    submit_ok(
        &t,
        "127.0.0.1",
        "client.test",
        "user@fail.test",
        &["alice@alias.test"],
        msg,
    )
    .await;
    let got = dest2.wait_for(1, WAIT).await;
    let text = got[0].text();
    assert!(!text.contains("forged4"), "forged result survived:\n{text}");
    assert!(
        text.contains("tenso.test; dkim=pass header.d=kept3.example"),
        "foreign kept:\n{text}"
    );
    let ar = our_ar(&got[0].data, "auth.tenso.test");
    assert_eq!(
        ar_result(&ar, "spf", "smtp.mailfrom"),
        Some(("fail".into(), "user@fail.test".into())),
        "{text}"
    );
}

#[tokio::test]
async fn rewritten_mail_from_passes_spf_at_the_destination() {
    let dns = spf_zone().start().await;
    let dest = TestSink::start().await;
    let senders = TestSink::start().await;
    let t = relay(&dns, &dest, &senders, "").await;

    // The original sender fails SPF at tenso; the copy tenso sends must pass.
    submit_ok(
        &t,
        "127.0.0.1",
        "client.test",
        "user@fail.test",
        &["alice@alias.test"],
        &message("user@fail.test", "rewrite"),
    )
    .await;
    let got = dest.wait_for(1, WAIT).await;
    let d = &got[0];
    let ar = our_ar(&d.data, "tenso.test");
    assert_eq!(
        ar_result(&ar, "spf", "smtp.mailfrom").map(|r| r.0),
        Some("fail".into())
    );
    assert_eq!(
        d.mail_from, "alice@alias.test",
        "MAIL FROM rewritten to the alias"
    );

    // Check it as the destination would: the IP the sink saw, tenso's HELO, the
    // MAIL FROM it received, against the test zone (alias.test: ip4:127.0.0.1 ~all).
    let ip: IpAddr = d.peer.ip();
    assert_eq!(ip, IpAddr::from([127, 0, 0, 1]));
    let ma = MessageAuthenticator(dns.resolver());
    let out = ma
        .verify_spf(SpfParameters::verify_mail_from(
            ip,
            &d.helo,
            "dest.test",
            &d.mail_from,
        ))
        .await;
    assert_eq!(
        out.result(),
        SpfResult::Pass,
        "rewritten MAIL FROM <{}> from {ip}",
        d.mail_from
    );
    // Control: without the rewrite the destination would see the original sender fail.
    let orig = ma
        .verify_spf(SpfParameters::verify_mail_from(
            ip,
            &d.helo,
            "dest.test",
            "user@fail.test",
        ))
        .await;
    assert_eq!(orig.result(), SpfResult::Fail);
}

/// A header section longer than a session keeps in memory (128 KiB): the fields past
/// that point are examined too (the message is read back whole), so a forged result
/// placed there is stripped like one on top.
#[tokio::test]
async fn forged_results_past_the_first_128_kib_of_header_are_stripped_too() {
    let dns = spf_zone().start().await;
    let dest = TestSink::start().await;
    let senders = TestSink::start().await;
    let t = relay(&dns, &dest, &senders, "").await;
    let mut msg = Vec::new();
    for i in 0..1500 {
        msg.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "f".repeat(100)).as_bytes());
    }
    assert!(msg.len() > 140 * 1024);
    msg.extend_from_slice(
        b"Authentication-Results: tenso.test; dkim=pass header.d=forged-late.example\r\n\
From: user@fail.test\r\nTo: alice@alias.test\r\nSubject: long header\r\n\r\nbody\r\n",
    );
    submit_ok(
        &t,
        "127.0.0.1",
        "client.test",
        "user@fail.test",
        &["alice@alias.test"],
        &msg,
    )
    .await;
    let got = dest.wait_for(1, WAIT).await;
    let text = got[0].text();
    assert!(
        !text.contains("forged-late.example"),
        "a forged result past 128 KiB survived"
    );
    assert!(text.contains("X-Filler-1499: "), "the long header was kept");
    assert_eq!(
        header_values(&got[0].data, "Authentication-Results").len(),
        1,
        "only ours"
    );
}
