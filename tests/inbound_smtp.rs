//! Inbound SMTP over real TCP on 127.0.0.1 against the real `tenso` binary (issue 2):
//! recipient policy (unknown user, relay forms, postmaster, subaddress), SMTP smuggling,
//! line and size limits, pipelining, and an independent client (swaks).
//!
//! Every daemon forwards to a closed port on 127.0.0.1 with a one-hour retry, so accepted
//! mail stays in the queue where `tenso queue list --json` can see it.

mod common;

use common::daemon::Tenso;
use common::dns::TestDns;
use common::smtp_client::RawSmtp;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

const FROM: &str = "s@origin.test";

use common::closed_port;

/// Config shared by these tests; `top` holds extra top-level keys. DNS goes to the
/// kit's server (no records): nothing depends on the machine's resolver. These tests
/// name unknown users on purpose, so the slow-down after "user unknown" (tested in
/// the abuse-control tests) is turned off here.
fn config(top: &str, dns: &TestDns) -> String {
    let port = closed_port();
    let dns = dns.resolver_config_toml();
    format!(
        "postmaster = [\"pm@dest.test\"]\n{top}\n\
         [dns]\n{dns}\n\n\
         [smtp]\nlisten = [\"127.0.0.1:0\"]\nmax_message_size = 2048\nmax_recipients = 3\n\n\
         [delivery]\nroutes = {{ \"*\" = \"127.0.0.1:{port}\" }}\n\n\
         [queue]\nretry = [\"1h\"]\n\n\
         [limits]\nunknown_penalty_base = \"0s\"\nmax_connections_per_ip = 1000\nconnect_rate_per_minute = 100000\n"
    )
}

async fn cli_ok(t: &Tenso, args: &[&str]) -> String {
    t.cli_ok(args).await
}

/// A running daemon with `alice@alias.test`, `bob@alias.test`, a catch-all domain and an
/// explicitly added domain without aliases.
async fn relay() -> (Tenso, TestDns) {
    let dns = TestDns::builder().start().await;
    let mut t = Tenso::prepare(&config("", &dns));
    for args in [
        &["user", "add", "alice@alias.test", "alice@dest.test"][..],
        &["user", "add", "bob@alias.test", "bob@dest.test"],
        &["user", "add", "@catchall.test", "catch@dest.test"],
        &["domain", "add", "empty.test"],
    ] {
        cli_ok(&t, args).await;
    }
    t.launch().await;
    (t, dns)
}

async fn queue(t: &Tenso) -> Vec<Value> {
    t.queue_list().await
}

fn rcpt_field(m: &Value, field: &str) -> Vec<String> {
    let mut v: Vec<String> = m["recipients"]
        .as_array()
        .expect("recipients array")
        .iter()
        .map(|r| r[field].as_str().expect("string field").to_string())
        .collect();
    v.sort();
    v
}

/// The RFC 3463 code at the start of a reply text, if any.
fn esc(text: &str) -> Option<&str> {
    let first = text.split_whitespace().next()?;
    let parts: Vec<&str> = first.split('.').collect();
    (parts.len() == 3
        && matches!(parts[0], "2" | "4" | "5")
        && parts[1..]
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit())))
    .then_some(first)
}

async fn connect(t: &Tenso) -> RawSmtp {
    let mut c = RawSmtp::connect(t.smtp_addr()).await;
    assert_eq!(c.greeting.0, 220, "greeting {:?}", c.greeting);
    let (code, text) = c.ehlo("client.test").await;
    assert_eq!(code, 250, "EHLO: {text}");
    c
}

/// MAIL, one RCPT, RSET: the RCPT reply.
async fn try_rcpt(c: &mut RawSmtp, rcpt: &str) -> (u16, String) {
    c.expect(&format!("MAIL FROM:<{FROM}>"), 250).await;
    let r = c.cmd(&format!("RCPT TO:<{rcpt}>")).await;
    c.expect("RSET", 250).await;
    r
}

/// A complete good message on an open session; panics unless it gets 250.
async fn good_message(c: &mut RawSmtp, token: &str) -> String {
    let body = format!("Subject: {token}\r\n\r\nbody {token}\r\n");
    match c
        .send_message(FROM, &["alice@alias.test"], body.as_bytes())
        .await
    {
        Ok((250, text)) => text,
        other => panic!("good message {token} not accepted: {other:?}"),
    }
}

/// The spooled messages: each `.msg` file after its `TENSO-SPOOL-1 <len>` header line
/// and the committed envelope. (The header and the compact JSON envelope hold no bare
/// CR or LF either; callers check the message part.)
fn spool_bodies(t: &Tenso) -> Vec<(String, Vec<u8>)> {
    let dir = t.data_dir().join("queue");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).expect("read queue dir") {
        let p = e.expect("dir entry").path();
        if p.extension().is_some_and(|x| x == "msg") {
            let raw = std::fs::read(&p).expect("read .msg");
            assert_eq!(bare_cr_or_lf(&raw), None, "bare CR/LF in spool file {p:?}");
            let nl = raw.iter().position(|&b| b == b'\n').expect("header line");
            let len: usize = String::from_utf8_lossy(&raw[..nl])
                .trim()
                .strip_prefix("TENSO-SPOOL-1 ")
                .and_then(|l| l.parse().ok())
                .expect("spool header");
            out.push((
                p.file_name().unwrap().to_string_lossy().into_owned(),
                raw[nl + 1 + len..].to_vec(),
            ));
        }
    }
    out
}

/// Offset of the first CR not followed by LF or LF not preceded by CR.
fn bare_cr_or_lf(b: &[u8]) -> Option<usize> {
    (0..b.len()).find(|&i| {
        (b[i] == b'\r' && b.get(i + 1) != Some(&b'\n'))
            || (b[i] == b'\n' && (i == 0 || b[i - 1] != b'\r'))
    })
}

#[tokio::test]
async fn recipients_unknown_relay_forms_postmaster_subaddress() {
    let (t, _dns) = relay().await;
    let mut c = connect(&t).await;

    // Known alias (domain case does not matter), subaddress, postmaster forms.
    for ok in [
        "alice@alias.test",
        "alice@ALIAS.Test",
        "alice+tag@alias.test",
        "postmaster",
        "postmaster@alias.test",
        "POSTMASTER@alias.test",
        "postmaster@empty.test",
        "anyone@catchall.test",
    ] {
        let (code, text) = try_rcpt(&mut c, ok).await;
        assert_eq!((code, esc(&text).is_some()), (250, true), "<{ok}>: {text}");
    }

    // Unknown users in local domains (with aliases, and added with `domain add`), with
    // and without a subaddress.
    for unknown in [
        "nobody@alias.test",
        "NOBODY@Alias.Test",
        "carol+alice@alias.test",
        "u@empty.test",
    ] {
        let (code, text) = try_rcpt(&mut c, unknown).await;
        assert_eq!(
            (code, esc(&text)),
            (550, Some("5.1.1")),
            "<{unknown}>: {text}"
        );
    }

    // A foreign domain: relay denied.
    let (code, text) = try_rcpt(&mut c, "u@other.test").await;
    assert_eq!((code, esc(&text)), (554, Some("5.7.1")), "{text}");
    c.quit().await;

    // Every relay trick, in a fresh session each, so the error counter never closes one.
    let relay_forms = [
        "u%other.test@alias.test",
        "other.test!u@alias.test",
        "@alias.test:u@other.test",
        "@alias.test,@relay.test:u@other.test",
        "\"u@other.test\"@alias.test",
        "u@other.test@alias.test",
        "u@[127.0.0.1]",
        "alice@[127.0.0.1]",
        "u@alias.test.",
        "alice@alias.test.",
        "u@other.test",
        "u@alias.test.other.test",
    ];
    for form in relay_forms {
        let mut c = connect(&t).await;
        c.expect(&format!("MAIL FROM:<{FROM}>"), 250).await;
        let (code, text) = c.cmd(&format!("RCPT TO:<{form}>")).await;
        assert_eq!(code / 100, 5, "relay form <{form}> got {code} {text}");
        assert!(esc(&text).is_some_and(|e| e.starts_with("5.")), "{text}");
        // Nothing was accepted, so DATA must not open.
        let (code, text) = c.cmd("DATA").await;
        assert_eq!(code / 100, 5, "DATA after <{form}>: {code} {text}");
        c.quit().await;
    }
    assert!(queue(&t).await.is_empty(), "nothing may be queued yet");

    // The accepted special forms really queue, and go where they should.
    let mut c = connect(&t).await;
    let body = b"Subject: pm\r\n\r\nfor the postmaster\r\n";
    c.send_message(FROM, &["postmaster", "POSTMASTER@alias.test"], body)
        .await
        .expect("postmaster message accepted");
    c.send_message(
        FROM,
        &["alice+tag@alias.test"],
        b"Subject: sub\r\n\r\nx\r\n",
    )
    .await
    .expect("subaddressed message accepted");
    c.quit().await;
    let q = queue(&t).await;
    assert_eq!(q.len(), 2, "{q:#?}");
    let pm = q
        .iter()
        .find(|m| rcpt_field(m, "orig").contains(&"postmaster".to_string()))
        .expect("postmaster message queued");
    assert!(
        rcpt_field(pm, "dest").iter().all(|d| d == "pm@dest.test"),
        "postmaster mail goes to the configured postmaster: {pm:#}"
    );
    let sub = q
        .iter()
        .find(|m| rcpt_field(m, "orig") == ["alice+tag@alias.test"])
        .expect("subaddressed message queued");
    assert_eq!(rcpt_field(sub, "dest"), ["alice@dest.test"]);
}

/// With a catch-all, the relay forms that a server may accept land at the catch-all's
/// destination: never at the domain written inside the local part.
#[tokio::test]
async fn catch_all_never_relays() {
    let (t, _dns) = relay().await;
    let forms = [
        "u%other.test@catchall.test",
        "other.test!u@catchall.test",
        "\"u@other.test\"@catchall.test",
        "@catchall.test:u@other.test",
        "u@other.test@catchall.test",
        "u@catchall.test.",
    ];
    let mut accepted = 0;
    for form in forms {
        let mut c = connect(&t).await;
        c.expect(&format!("MAIL FROM:<{FROM}>"), 250).await;
        let (code, text) = c.cmd(&format!("RCPT TO:<{form}>")).await;
        assert!(code == 250 || code / 100 == 5, "<{form}>: {code} {text}");
        if code == 250 {
            accepted += 1;
            c.expect("DATA", 354).await;
            c.send(b"Subject: catch\r\n\r\nx\r\n.\r\n").await;
            let (code, text) = c.read_reply().await;
            assert_eq!(code, 250, "{text}");
        }
        c.quit().await;
    }
    let q = queue(&t).await;
    assert_eq!(q.len(), accepted, "{q:#?}");
    for m in &q {
        assert_eq!(rcpt_field(m, "dest"), ["catch@dest.test"], "{m:#}");
    }
}

const SMUGGLING_FORMS: &[(&str, &[u8])] = &[
    ("<LF>.<LF>", b"\n.\n"),
    ("<LF>.<CR><LF>", b"\n.\r\n"),
    ("<CR><LF>.<LF>", b"\r\n.\n"),
    ("<CR>.<CR>", b"\r.\r"),
    ("<CR><LF>.<CR>", b"\r\n.\r"),
    ("<CR>.<CR><LF>", b"\r.\r\n"),
    ("bare <LF>", b"\n"),
    ("bare <CR>", b"\r"),
    // Found by the codec properties (issue 10): each ended DATA in the old decoder.
    ("<CR><LF>.<LF><CR><LF>", b"\r\n.\n\r\n"),
    ("<CR><LF>.<CR><CR><LF>", b"\r\n.\r\r\n"),
    ("<CR><LF><CR>.<CR><LF>", b"\r\n\r.\r\n"),
];

fn smuggling_payload(form: &[u8]) -> Vec<u8> {
    let mut p = b"Subject: smuggling test\r\n\r\nfirst message".to_vec();
    p.extend_from_slice(form);
    p.extend_from_slice(
        b"MAIL FROM:<evil@x>\r\nRCPT TO:<alice@alias.test>\r\nDATA\r\n\
          Subject: smuggled\r\n\r\nsecond message\r\n.\r\n",
    );
    p
}

/// Sends one smuggling attempt on a fresh session; returns every reply the server sent
/// after DATA, up to the close that follows QUIT.
async fn smuggle(t: &Tenso, payload: &[u8], split_at: Option<usize>) -> Vec<(u16, String)> {
    let mut c = connect(t).await;
    c.expect(&format!("MAIL FROM:<{FROM}>"), 250).await;
    c.expect("RCPT TO:<alice@alias.test>", 250).await;
    c.expect("DATA", 354).await;
    match split_at {
        Some(n) => {
            c.send(&payload[..n]).await;
            c.send(&payload[n..]).await;
        }
        None => c.send(payload).await,
    }
    let mut replies = vec![c.read_reply().await];
    c.send(b"QUIT\r\n").await;
    loop {
        match c.try_read_reply().await {
            Ok(r) => {
                let done = r.0 == 221;
                replies.push(r);
                if done {
                    break;
                }
            }
            Err(e) => panic!("reading replies after smuggling: {e}; so far {replies:?}"),
        }
    }
    assert!(
        c.wait_closed(Duration::from_secs(5)).await,
        "server keeps the connection after QUIT"
    );
    replies
}

#[tokio::test]
async fn smuggling_never_yields_a_second_message() {
    let (t, _dns) = relay().await;
    for (name, form) in SMUGGLING_FORMS {
        let payload = smuggling_payload(form);
        let pos = payload
            .windows(form.len())
            .position(|w| w == *form)
            .expect("form in payload");
        // In one write, and split in the middle of the smuggling sequence.
        for split in [None, Some(pos + 1)] {
            let replies = smuggle(&t, &payload, split).await;
            let codes: Vec<u16> = replies.iter().map(|r| r.0).collect();
            assert_eq!(
                codes.len(),
                2,
                "{name} (split {split:?}): one reply to the data, then 221: {replies:?}"
            );
            assert_eq!(codes[1], 221, "{name}: {replies:?}");
            assert_eq!(
                codes[0] / 100,
                5,
                "{name} (split {split:?}): data with a bare CR/LF must be refused: {replies:?}"
            );
            assert!(
                esc(&replies[0].1).is_some_and(|e| e.starts_with("5.")),
                "{replies:?}"
            );
        }
    }
    let q = queue(&t).await;
    assert!(q.is_empty(), "a smuggling attempt was queued: {q:#?}");

    // Bare LF or CR in a command line is refused too: whatever the server makes of the
    // rest of the line, it answers only errors until the NOOP, and opens no transaction.
    let mut c = connect(&t).await;
    for bad in [
        &b"MAIL FROM:<evil@x>\nRCPT TO:<alice@alias.test>\r\nNOOP\r\n"[..],
        b"MAIL FROM:<evil@x>\rRCPT TO:<alice@alias.test>\r\nNOOP\r\n",
    ] {
        c.send(bad).await;
        let mut errors = 0;
        loop {
            let (code, text) = c.read_reply().await;
            if code == 250 {
                assert_eq!(
                    esc(&text),
                    Some("2.0.0"),
                    "only the NOOP may succeed: {text}"
                );
                break;
            }
            assert_eq!(
                code / 100,
                5,
                "{:?}: {code} {text}",
                String::from_utf8_lossy(bad)
            );
            errors += 1;
        }
        assert!(
            errors >= 1,
            "{:?} was not refused",
            String::from_utf8_lossy(bad)
        );
        let (code, text) = c.cmd("RCPT TO:<alice@alias.test>").await;
        assert_eq!(
            code, 503,
            "a transaction was opened by a bare CR/LF command: {text}"
        );
    }

    // The server goes on serving: a good message with dot-stuffed lines is accepted and
    // unstuffed, and nothing in the spool has a bare CR or LF.
    c.expect(&format!("MAIL FROM:<{FROM}>"), 250).await;
    c.expect("RCPT TO:<alice@alias.test>", 250).await;
    c.expect("DATA", 354).await;
    c.send(b"Subject: good\r\n\r\n..leading dot\r\n...two dots\r\n..\r\nend\r\n.\r\n")
        .await;
    let (code, text) = c.read_reply().await;
    assert_eq!(code, 250, "good message after smuggling attempts: {text}");
    c.quit().await;
    let mut c2 = connect(&t).await;
    good_message(&mut c2, "next-client").await;
    c2.quit().await;

    assert_eq!(queue(&t).await.len(), 2);
    let bodies = spool_bodies(&t);
    assert_eq!(bodies.len(), 2);
    for (name, b) in &bodies {
        assert_eq!(bare_cr_or_lf(b), None, "bare CR/LF in spooled {name}");
        assert!(b.ends_with(b"\r\n"), "{name} does not end with CRLF");
    }
    assert!(
        bodies
            .iter()
            .any(|(_, b)| b.ends_with(b"\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nend\r\n")),
        "dot-unstuffing: {:?}",
        bodies
            .iter()
            .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn line_and_size_limits_then_normal_service() {
    let (t, _dns) = relay().await;
    let mut c = connect(&t).await;
    let (_, ehlo) = c.ehlo("client.test").await;
    assert!(
        ehlo.lines().any(|l| l.trim() == "SIZE 2048"),
        "SIZE announced from config: {ehlo}"
    );

    // Text lines: 998 octets + CRLF (the RFC 5321 limit of 1000) pass; 1001 do not.
    let at_limit = format!("Subject: limit\r\n\r\n{}\r\n", "a".repeat(998));
    let (code, _) = c
        .send_message(FROM, &["alice@alias.test"], at_limit.as_bytes())
        .await
        .expect("a 1000-octet line is legal");
    assert_eq!(code, 250);
    let too_long = format!("Subject: long\r\n\r\n{}\r\nafter\r\n", "b".repeat(1001));
    let err = c
        .send_message(FROM, &["alice@alias.test"], too_long.as_bytes())
        .await
        .expect_err("a line over 1000 octets must be refused");
    assert_eq!((err.stage, err.code / 100), ("DOT", 5), "{err}");
    assert!(esc(&err.text).is_some(), "{err}");
    good_message(&mut c, "after-long-line").await;

    // SIZE parameter over the limit.
    let (code, text) = c.cmd(&format!("MAIL FROM:<{FROM}> SIZE=999999")).await;
    assert_eq!((code, esc(&text)), (552, Some("5.3.4")), "{text}");
    let (code, text) = c.cmd(&format!("MAIL FROM:<{FROM}> SIZE=2048")).await;
    assert_eq!(code, 250, "SIZE equal to the limit: {text}");
    c.expect("RSET", 250).await;

    // A body of exactly the announced size passes; one more octet does not.
    let exact = |n: usize| {
        let head = "Subject: size\r\n\r\n";
        let mut body = head.to_string();
        while body.len() + 72 <= n {
            body.push_str(&"s".repeat(70));
            body.push_str("\r\n");
        }
        let fill = n - body.len() - 2;
        body.push_str(&"t".repeat(fill));
        body.push_str("\r\n");
        assert_eq!(body.len(), n);
        body
    };
    let (code, _) = c
        .send_message(FROM, &["alice@alias.test"], exact(2048).as_bytes())
        .await
        .expect("a message of exactly SIZE octets");
    assert_eq!(code, 250);
    let err = c
        .send_message(FROM, &["alice@alias.test"], exact(2049).as_bytes())
        .await
        .expect_err("one octet over SIZE");
    assert_eq!((err.stage, err.code), ("DOT", 552), "{err}");
    assert_eq!(esc(&err.text), Some("5.3.4"), "{err}");
    let err = c
        .send_message(FROM, &["alice@alias.test"], exact(6000).as_bytes())
        .await
        .expect_err("far over SIZE");
    assert_eq!((err.stage, err.code), ("DOT", 552), "{err}");
    good_message(&mut c, "after-oversize").await;

    // Command lines: 512 octets with CRLF pass, 513 do not, 100 kB without LF neither.
    let noop = |total: usize| format!("NOOP {}\r\n", "n".repeat(total - 7));
    assert_eq!(noop(512).len(), 512);
    c.send(noop(512).as_bytes()).await;
    let (code, text) = c.read_reply().await;
    assert_eq!(code, 250, "512-octet command: {text}");
    c.send(noop(513).as_bytes()).await;
    let (code, text) = c.read_reply().await;
    assert_eq!((code, esc(&text)), (500, Some("5.5.2")), "{text}");
    let mut huge = b"MAIL FROM:<".to_vec();
    huge.extend(std::iter::repeat_n(b'x', 100_000));
    huge.extend_from_slice(b"@origin.test>\r\n");
    c.send(&huge).await;
    let (code, text) = c.read_reply().await;
    assert_eq!((code, esc(&text)), (500, Some("5.5.2")), "{text}");
    // Nothing of the long MAIL survived: RCPT still needs MAIL.
    let (code, _) = c.cmd("RCPT TO:<alice@alias.test>").await;
    assert_eq!(code, 503);
    good_message(&mut c, "after-long-command").await;
    c.quit().await;

    // And the next client is served normally.
    let mut c = connect(&t).await;
    good_message(&mut c, "next-client").await;
    c.quit().await;

    let q = queue(&t).await;
    assert_eq!(q.len(), 6, "{q:#?}");
    for (name, b) in spool_bodies(&t) {
        assert!(
            b.split(|&x| x == b'\n').all(|l| l.len() <= 1000),
            "{name} holds a line longer than 1000 octets"
        );
    }
}

#[tokio::test]
async fn too_many_recipients_get_452() {
    let (t, _dns) = relay().await;
    let mut c = connect(&t).await;
    c.expect(&format!("MAIL FROM:<{FROM}>"), 250).await;
    for r in ["alice@alias.test", "bob@alias.test", "x@catchall.test"] {
        c.expect(&format!("RCPT TO:<{r}>"), 250).await;
    }
    let (code, text) = c.cmd("RCPT TO:<y@catchall.test>").await;
    assert_eq!((code, esc(&text)), (452, Some("4.5.3")), "{text}");
    c.expect("DATA", 354).await;
    c.send(b"Subject: three\r\n\r\nx\r\n.\r\n").await;
    assert_eq!(c.read_reply().await.0, 250);
    c.quit().await;
    let q = queue(&t).await;
    assert_eq!(q.len(), 1);
    assert_eq!(
        rcpt_field(&q[0], "orig"),
        ["alice@alias.test", "bob@alias.test", "x@catchall.test"]
    );
}

#[tokio::test]
async fn pipelining_client_gets_every_reply_in_order() {
    let (t, _dns) = relay().await;
    let mut c = RawSmtp::connect(t.smtp_addr()).await;
    let (code, ehlo) = c.ehlo("pipe.test").await;
    assert_eq!(code, 250);
    assert!(ehlo.lines().any(|l| l.trim() == "PIPELINING"), "{ehlo}");

    async fn replies(c: &mut RawSmtp, n: usize) -> Vec<(u16, Option<String>)> {
        let mut v = Vec::new();
        for _ in 0..n {
            let (code, text) = c.read_reply().await;
            v.push((code, esc(&text).map(str::to_string)));
        }
        v
    }
    let e = |s: &str| Some(s.to_string());

    // One write: MAIL, good and bad RCPTs, DATA.
    c.send(
        format!(
            "MAIL FROM:<{FROM}>\r\nRCPT TO:<alice@alias.test>\r\nRCPT TO:<nobody@alias.test>\r\n\
             RCPT TO:<u@other.test>\r\nRCPT TO:<bob@alias.test>\r\nRCPT TO:<ghost@alias.test>\r\nDATA\r\n"
        )
        .as_bytes(),
    )
    .await;
    let got = replies(&mut c, 7).await;
    assert_eq!(
        got,
        vec![
            (250, e("2.1.0")),
            (250, e("2.1.5")),
            (550, e("5.1.1")),
            (554, e("5.7.1")),
            (250, e("2.1.5")),
            (550, e("5.1.1")),
            (354, None),
        ]
    );
    // The body and, in the same write, the next transaction after the real end of data.
    c.send(
        format!(
            "Subject: pipelined 1\r\n\r\none\r\n.\r\nMAIL FROM:<{FROM}>\r\n\
             RCPT TO:<bob@alias.test>\r\nDATA\r\n"
        )
        .as_bytes(),
    )
    .await;
    let got = replies(&mut c, 4).await;
    assert_eq!(
        got,
        vec![
            (250, e("2.0.0")),
            (250, e("2.1.0")),
            (250, e("2.1.5")),
            (354, None)
        ]
    );
    c.send(b"Subject: pipelined 2\r\n\r\ntwo\r\n.\r\n").await;
    assert_eq!(replies(&mut c, 1).await, vec![(250, e("2.0.0"))]);

    // RSET and NOOP pipelined; a transaction with only a bad recipient; the DATA of it
    // is refused and the session goes on.
    c.send(
        format!(
            "RSET\r\nNOOP\r\nMAIL FROM:<{FROM}>\r\nRSET\r\nRCPT TO:<alice@alias.test>\r\n\
             MAIL FROM:<{FROM}>\r\nRCPT TO:<nobody@alias.test>\r\nDATA\r\nNOOP\r\nRSET\r\nQUIT\r\n"
        )
        .as_bytes(),
    )
    .await;
    let got = replies(&mut c, 11).await;
    let mut codes: Vec<u16> = got.iter().map(|r| r.0).collect();
    // DATA without an accepted recipient: 503 or 554 (RFC 5321 4.1.1.4).
    assert!(matches!(codes[7], 503 | 554), "{got:?}");
    codes[7] = 0;
    assert_eq!(
        codes,
        vec![250, 250, 250, 250, 503, 250, 550, 0, 250, 250, 221],
        "{got:?}"
    );
    assert!(got.iter().all(|r| r.1.is_some()), "{got:?}");
    assert!(c.wait_closed(Duration::from_secs(5)).await);

    let q = queue(&t).await;
    assert_eq!(q.len(), 2, "{q:#?}");
    let mut rcpts: Vec<Vec<String>> = q.iter().map(|m| rcpt_field(m, "orig")).collect();
    rcpts.sort();
    assert_eq!(
        rcpts,
        vec![
            vec!["alice@alias.test".to_string(), "bob@alias.test".to_string()],
            vec!["bob@alias.test".to_string()],
        ]
    );
}

#[tokio::test]
async fn every_reply_after_ehlo_has_an_enhanced_code() {
    let (t, _dns) = relay().await;
    let mut c = RawSmtp::connect(t.smtp_addr()).await;
    let (code, text) = c.cmd(&format!("MAIL FROM:<{FROM}>")).await;
    assert_eq!(code, 503, "MAIL before EHLO: {text}");
    let (code, _) = c.cmd("HELO client.test").await;
    assert_eq!(code, 250);
    let cmds = [
        ("NOOP", 250),
        ("VRFY alice@alias.test", 252),
        ("HELP", 214),
        ("RCPT TO:<alice@alias.test>", 503),
        ("DATA", 503),
        ("FOO bar", 500),
        ("RSET", 250),
    ];
    for (cmd, want) in cmds {
        let (code, text) = c.cmd(cmd).await;
        assert_eq!(code, want, "{cmd}: {text}");
        assert!(
            esc(&text).is_some_and(|e| e.starts_with(&(code / 100).to_string())),
            "{cmd}: reply without matching enhanced code: {code} {text}"
        );
    }
    let (code, text) = c.cmd("QUIT").await;
    assert_eq!((code, esc(&text)), (221, Some("2.0.0")));
}

fn swaks() -> &'static Path {
    let p = Path::new("/usr/bin/swaks");
    assert!(
        p.exists(),
        "swaks is missing: install it (`apt-get install -y swaks`, done by .ci/run)"
    );
    p
}

async fn run_swaks(args: &[String]) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(swaks());
    cmd.args(args).kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("swaks finished within 60 s")
        .expect("run swaks")
}

#[tokio::test]
async fn swaks_sends_a_message_that_is_accepted() {
    let (t, _dns) = relay().await;
    let server = t.smtp_addr().to_string();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();

    let out = run_swaks(&s(&[
        "--server",
        &server,
        "--to",
        "alice@alias.test",
        "--from",
        FROM,
    ]))
    .await;
    let transcript = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "swaks failed ({}): {transcript}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let q = queue(&t).await;
    assert_eq!(q.len(), 1, "{q:#?}");
    assert_eq!(q[0]["sender"], FROM);
    assert_eq!(rcpt_field(&q[0], "orig"), ["alice@alias.test"]);

    // Pipelined, with a header and body of its own.
    let out = run_swaks(&s(&[
        "--server",
        &server,
        "--to",
        "bob@alias.test",
        "--from",
        FROM,
        "--pipeline",
        "--header",
        "Subject: swaks pipelined",
        "--body",
        "hello from swaks",
    ]))
    .await;
    assert!(
        out.status.success(),
        "swaks --pipeline: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // An unknown user makes swaks fail.
    let out = run_swaks(&s(&[
        "--server",
        &server,
        "--to",
        "nobody@alias.test",
        "--from",
        FROM,
    ]))
    .await;
    assert!(!out.status.success(), "swaks to an unknown user succeeded");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("550"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let q = queue(&t).await;
    assert_eq!(q.len(), 2, "{q:#?}");
    let bodies = spool_bodies(&t);
    assert!(
        bodies.iter().any(|(_, b)| {
            let s = String::from_utf8_lossy(b);
            s.contains("Subject: swaks pipelined") && s.contains("hello from swaks")
        }),
        "the pipelined swaks message is spooled"
    );
    for (name, b) in &bodies {
        assert_eq!(bare_cr_or_lf(b), None, "bare CR/LF in {name}");
        let text = String::from_utf8_lossy(b);
        // Unfolded field starts: Received-SPF sits above this hop's Received (RFC 7208 §9.1).
        let first: Vec<&str> = text
            .split("\r\n")
            .filter(|l| !l.starts_with([' ', '\t']))
            .take(2)
            .collect();
        assert!(
            first[0].starts_with("Received-SPF: ") && first[1].starts_with("Received: "),
            "{name}: Received-SPF and a Received header are prepended:\n{text}"
        );
    }
}
