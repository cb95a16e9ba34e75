//! Every address and parameter tenso writes is valid (issue 10, items 4 to 8), over real
//! TCP with the real binary, the kit's DNS server and recording sinks:
//! - paths: catch-all copies and quoted aliases go out as valid RFC 5321 paths, one
//!   alias rule for CLI/admin socket/import/RCPT, and export imports back unchanged;
//! - ESMTP parameters tenso did not offer get `555 5.5.4`;
//! - 8BITMIME follows the content, not the label;
//! - a DATA opened by the next hop for no recipient ends with a lone dot;
//! - proposal 1b's DSN returns the header section only, is made from the committed
//!   message, and is made after a crash between the commit and the DSN.

mod common;
mod delivery_support;

use common::daemon::Tenso;
use common::dns::{TestDns, TestDnsBuilder};
use common::sink::{Delivered, Reply, TestSink};
use common::smtp_client::RawSmtp;
use delivery_support::*;

/// `dest.test` and `origin.test` (senders) both have their MX on 127.0.0.1.
fn dns_builder() -> TestDnsBuilder {
    TestDns::builder()
        .mx("dest.test", 10, "mx.dest.test")
        .mx("origin.test", 10, "mx.dest.test")
        .a("mx.dest.test", "127.0.0.1")
}

/// Long-lived idle sessions, so that connection reuse can be observed.
const DELIVERY_EXTRA: &str = "idle_timeout = \"60s\"";

async fn start(dns: &TestDns, sink: &TestSink, extra: &str) -> Tenso {
    Tenso::start(&config(dns, sink.port(), DELIVERY_EXTRA, FAST_QUEUE, extra)).await
}

/// The sink's transaction whose reverse-path is `from`; panics naming what arrived.
fn from<'a>(sink: &TestSink, msgs: &'a [Delivered], from: &str) -> &'a Delivered {
    msgs.iter()
        .find(|m| m.mail_from == from)
        .unwrap_or_else(|| panic!("no MAIL FROM:<{from}>:\n{}", sink.describe()))
}

#[tokio::test]
async fn catch_all_and_quoted_aliases_go_out_as_valid_paths() {
    let dns = dns_builder().start().await;
    let sink = TestSink::start().await;
    let t = start(&dns, &sink, "").await;
    add_alias(&t, "@catch.test", &["catch@dest.test"], "pool").await;
    add_alias(&t, "\"../x\"@alias.test", &["x@dest.test"], "pool").await;
    add_alias(&t, "q@alias.test", &["\"c d\"@dest.test"], "pool").await;

    // One message per recipient, so that the Received field names it.
    let rcpts = [
        "\"a b\"@catch.test",
        "\"x>y SIZE=1\"@catch.test",
        "\"../x\"@alias.test",
        "q@alias.test",
    ];
    for r in rcpts {
        send(&t, "s@origin.test", &[r], &simple_message(r)).await;
    }
    let msgs = sink.wait_for(rcpts.len(), WAIT).await;
    wait_queue_empty(&t).await;
    assert_eq!(sink.messages().len(), rcpts.len(), "{}", sink.describe());

    for (written, rcpt) in [
        ("\"a b\"@catch.test", "catch@dest.test"),
        ("\"x>y SIZE=1\"@catch.test", "catch@dest.test"),
        ("\"../x\"@alias.test", "x@dest.test"),
    ] {
        let m = from(&sink, &msgs, written);
        assert_eq!(m.rcpts, vec![rcpt.to_string()]);
        // Nothing of the local part leaked into the MAIL parameters.
        let params: Vec<&str> = m.mail_params.split_whitespace().collect();
        assert!(
            params
                .iter()
                .all(|p| ["SIZE=", "RET=", "ENVID="].iter().any(|k| p.starts_with(k))),
            "MAIL FROM:<{written}> carries foreign parameters: {params:?}"
        );
        assert_eq!(
            params.iter().filter(|p| p.starts_with("SIZE=")).count(),
            1,
            "{params:?}"
        );
        let (delivered_to, received, _) = split_prepended(&m.data);
        assert_eq!(delivered_to, written.to_lowercase());
        if written.ends_with("catch.test") {
            assert!(
                received.contains(&format!("for <{written}>")),
                "Received names the recipient as written: {received}"
            );
        }
    }
    // A destination with a quoted local part is written quoted in RCPT.
    let m = from(&sink, &msgs, "q@alias.test");
    assert_eq!(m.rcpts, vec!["\"c d\"@dest.test".to_string()]);
}

#[tokio::test]
async fn one_alias_rule_everywhere_and_export_imports_unchanged() {
    let dns = dns_builder().start().await;
    let sink = TestSink::start().await;
    let t = start(&dns, &sink, "").await;
    add_alias(&t, "\"../x\"@alias.test", &["x@dest.test"], "pool").await;
    add_alias(
        &t,
        "\"Sales Team\"@alias.test",
        &["\"c d\"@dest.test"],
        "forward",
    )
    .await;
    add_alias(&t, "plain@alias.test", &["\"../x\"@alias.test"], "pool").await;
    let long = format!("{}@alias.test", "l".repeat(65));
    let long_quoted = format!("\"{}\"@alias.test", " ".repeat(63));
    for bad in [
        "a%b@alias.test",
        "a!b@alias.test",
        "\"u@v\"@alias.test",
        "a@[127.0.0.1]",
        ".dot@alias.test",
        "\"tab\there\"@alias.test",
        &long,
        &long_quoted,
    ] {
        let o = t
            .cli_async(&["user", "add", bad, "x@dest.test", "--bounce", "pool"])
            .await;
        assert!(!o.status.success(), "user add {bad:?} must be refused");
    }
    // RCPT applies the same rule: what cannot be an alias is a routing trick.
    let mut c = RawSmtp::connect(t.smtp_addr()).await;
    c.expect("EHLO client.test", 250).await;
    c.expect("MAIL FROM:<s@origin.test>", 250).await;
    for bad in ["a%b@alias.test", "a!b@alias.test", "\"u@v\"@alias.test"] {
        let (code, text) = c.cmd(&format!("RCPT TO:<{bad}>")).await;
        assert_eq!(code, 554, "RCPT TO:<{bad}>: {text}");
    }
    c.expect("RCPT TO:<\"../X\"@alias.test>", 250).await;
    c.expect("RCPT TO:<\"sales team\"@alias.test>", 250).await;
    c.quit().await;

    // Import applies it too, line by line.
    let file = t.dir().join("virtual");
    std::fs::write(
        &file,
        "\"with space\"@alias.test  w@dest.test\na%b@alias.test  x@dest.test\n",
    )
    .unwrap();
    let o = t
        .cli_async(&["import", &file.to_string_lossy(), "--skip-bad"])
        .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("line 2"),
        "the routing alias is reported: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Export, import into a fresh data dir: the same table, the same export.
    let exported = t.cli_ok(&["export"]).await;
    for name in [
        "\"../x\"@alias.test",
        "\"sales team\"@alias.test",
        "\"with space\"@alias.test",
        "\"c d\"@dest.test",
    ] {
        assert!(exported.contains(name), "{name} in:\n{exported}");
    }
    let path = t.dir().join("exported");
    std::fs::write(&path, &exported).unwrap();
    let fresh = Tenso::prepare(&config(&dns, sink.port(), "", FAST_QUEUE, ""));
    let o = fresh.cli_async(&["import", &path.to_string_lossy()]).await;
    assert!(
        o.status.success() && o.stderr.is_empty(),
        "the export imports cleanly: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(fresh.cli_ok(&["export"]).await, exported);
    let show = fresh.cli_ok(&["user", "show", "\"../x\"@alias.test"]).await;
    assert!(show.contains("x@dest.test"), "{show}");
}

#[tokio::test]
async fn parameters_not_offered_get_555() {
    let dns = dns_builder().start().await;
    let sink = TestSink::start().await;
    let t = start(&dns, &sink, "").await;
    add_alias(&t, "a@alias.test", &["a@dest.test"], "pool").await;

    let mut c = RawSmtp::connect(t.smtp_addr()).await;
    let (code, ehlo) = c.ehlo("client.test").await;
    assert_eq!(code, 250);
    for not_offered in ["DSN", "BINARYMIME", "CHUNKING"] {
        assert!(!ehlo.contains(not_offered), "{not_offered} offered: {ehlo}");
    }
    for mail in [
        "MAIL FROM:<s@origin.test> RET=HDRS",
        "MAIL FROM:<s@origin.test> RET=FULL",
        "MAIL FROM:<s@origin.test> ENVID=abc",
        "MAIL FROM:<s@origin.test> BODY=BINARYMIME",
        "MAIL FROM:<s@origin.test> SIZE=10 MT-PRIORITY=0",
        "MAIL FROM:<s@origin.test> REQUIRETLS",
    ] {
        let (code, text) = c.cmd(mail).await;
        assert_eq!(code, 555, "{mail}: {text}");
        assert!(text.starts_with("5.5.4"), "{mail}: {text}");
    }
    c.expect(
        "MAIL FROM:<s@origin.test> SIZE=100 BODY=8BITMIME SMTPUTF8",
        250,
    )
    .await;
    for rcpt in [
        "RCPT TO:<a@alias.test> NOTIFY=NEVER",
        "RCPT TO:<a@alias.test> NOTIFY=SUCCESS,FAILURE",
        "RCPT TO:<a@alias.test> ORCPT=rfc822;a@alias.test",
    ] {
        let (code, text) = c.cmd(rcpt).await;
        assert_eq!(code, 555, "{rcpt}: {text}");
        assert!(text.starts_with("5.5.4"), "{rcpt}: {text}");
    }
    c.expect("RCPT TO:<a@alias.test>", 250).await;
    c.expect("RSET", 250).await;
    c.expect("MAIL FROM:<s@origin.test> BODY=7BIT", 250).await;
    c.quit().await;

    // Without EHLO nothing is offered at all.
    let mut c = RawSmtp::connect(t.smtp_addr()).await;
    c.expect("HELO client.test", 250).await;
    let (code, text) = c.cmd("MAIL FROM:<s@origin.test> SIZE=10").await;
    assert_eq!((code, &text[..5]), (555, "5.5.4"), "{text}");
    c.expect("MAIL FROM:<s@origin.test>", 250).await;
    c.quit().await;
}

/// Sends one message with raw MAIL parameters; returns the queue id.
async fn send_with_params(t: &Tenso, params: &str, rcpt: &str, data: &[u8]) -> String {
    let mut c = RawSmtp::connect(t.smtp_addr()).await;
    c.expect("EHLO client.test", 250).await;
    c.expect(&format!("MAIL FROM:<s@origin.test> {params}"), 250)
        .await;
    c.expect(&format!("RCPT TO:<{rcpt}>"), 250).await;
    c.expect("DATA", 354).await;
    let mut body = common::smtp_client::dot_stuff(data);
    body.extend_from_slice(b".\r\n");
    c.send(&body).await;
    let (code, text) = c.read_reply().await;
    assert_eq!(code, 250, "{text}");
    c.quit().await;
    queue_id_of(&text)
}

#[tokio::test]
async fn eight_bit_label_follows_the_content() {
    let dns = TestDns::builder().start().await;
    let seven = TestSink::builder().eightbitmime(false).start().await;
    let eight = TestSink::start().await;
    let cfg = format!(
        "[dns]\n{}\n\n[delivery]\nroutes = {{ \"seven.test\" = \"127.0.0.1:{}\", \
         \"eight.test\" = \"127.0.0.1:{}\" }}\ncommand_timeout = \"10s\"\n\
         data_timeout = \"10s\"\n\n[queue]\n{FAST_QUEUE}\n",
        dns.resolver_config_toml(),
        seven.port(),
        eight.port()
    );
    let t = Tenso::start(&cfg).await;
    add_alias(&t, "s7@alias.test", &["x@seven.test"], "pool").await;
    add_alias(&t, "s8@alias.test", &["x@eight.test"], "pool").await;

    let ascii = simple_message("labelled 8BITMIME, 7-bit inside");
    let utf8 = "Subject: =?utf-8?q?8bit?=\r\nContent-Type: text/plain; charset=utf-8\r\n\
                Content-Transfer-Encoding: 8bit\r\n\r\nGr\u{fc}\u{df}e aus K\u{f6}ln\r\n"
        .as_bytes()
        .to_vec();
    for rcpt in ["s7@alias.test", "s8@alias.test"] {
        send_with_params(&t, "BODY=8BITMIME", rcpt, &ascii).await;
        send_with_params(&t, "BODY=8BITMIME", rcpt, &utf8).await;
    }
    // Without 8BITMIME at the next hop: the 7-bit message goes out, without BODY=;
    // only the real 8-bit one fails (5.6.3) and its DSN lands in the alias's pool.
    let got = seven.wait_for(1, WAIT).await;
    let pooled = wait_pool(&t, "s7@alias.test", 1).await;
    wait_queue_empty(&t).await;
    assert_eq!(seven.messages().len(), 1, "{}", seven.describe());
    let (_, _, rest) = split_prepended(&got[0].data);
    assert_eq!(rest, ascii);
    assert!(
        !got[0].mail_params.contains("BODY="),
        "{}",
        got[0].mail_params
    );
    let dsn = parse_dsn(&pooled[0]);
    let group = dsn
        .recipient("x@seven.test")
        .expect("DSN names x@seven.test");
    assert_eq!(
        field(group, "Status").as_deref(),
        Some("5.6.3"),
        "{}",
        dsn.text
    );
    assert_eq!(pool_messages(&t, "s7@alias.test").len(), 1);
    // With 8BITMIME: BODY=8BITMIME exactly for the 8-bit content.
    let got = eight.wait_for(2, WAIT).await;
    for m in &got {
        let (_, _, rest) = split_prepended(&m.data);
        let labelled = m.mail_params.contains("BODY=8BITMIME");
        assert_eq!(labelled, rest == utf8, "{}: {}", m.mail_params, m.text());
    }
    assert!(pool_messages(&t, "s8@alias.test").is_empty());
}

#[tokio::test]
async fn data_opened_for_no_recipient_gets_a_lone_dot() {
    let dns = dns_builder().start().await;
    let sink = TestSink::builder()
        .open_data_without_recipients(true)
        .rcpt_policy(|rcpt, _| {
            if rcpt.starts_with("gone@") {
                Reply::reject()
            } else {
                Reply::new(250, "2.1.5 OK")
            }
        })
        .start()
        .await;
    let t = start(&dns, &sink, "").await;
    add_alias(&t, "g@alias.test", &["gone@dest.test"], "pool").await;
    add_alias(&t, "ok@alias.test", &["ok@dest.test"], "pool").await;

    send(
        &t,
        "s@origin.test",
        &["g@alias.test"],
        &simple_message("gone"),
    )
    .await;
    // The refusal is reported as the RCPT reply said (not a timeout after the DATA).
    let pooled = wait_pool(&t, "g@alias.test", 1).await;
    let dsn = parse_dsn(&pooled[0]);
    let group = dsn
        .recipient("gone@dest.test")
        .expect("DSN names gone@dest.test");
    assert_eq!(
        field(group, "Status").as_deref(),
        Some("5.1.1"),
        "{}",
        dsn.text
    );
    wait_queue_empty(&t).await;
    let all = sink.all_transactions();
    assert_eq!(all.len(), 1, "{}", sink.describe());
    assert!(
        all[0].rcpts.is_empty() && all[0].data.is_empty(),
        "the DATA opened for nobody got a lone dot and nothing else:\n{}",
        sink.describe()
    );
    assert!(sink.messages().is_empty());

    // The session went on: the next message uses the same connection.
    send(
        &t,
        "s@origin.test",
        &["ok@alias.test"],
        &simple_message("ok"),
    )
    .await;
    let msgs = sink.wait_for(1, WAIT).await;
    assert_eq!(msgs[0].rcpts, vec!["ok@dest.test".to_string()]);
    assert_eq!(msgs[0].conn_id, all[0].conn_id, "{}", sink.describe());
    assert_eq!(sink.connections(), 1);
    let queue = &t.counters().await["queue"];
    assert_eq!(
        queue["delivered"], 1,
        "nothing counted for the refused one: {queue}"
    );
}

/// The returned-headers part of a DSN, as text.
fn returned_part(dsn: &str) -> String {
    let start = dsn
        .find("Content-Type: text/rfc822-headers\r\n\r\n")
        .unwrap_or_else(|| panic!("no text/rfc822-headers part:\n{dsn}"));
    let part = &dsn[start..];
    let end = part.find("\r\n--").unwrap_or(part.len());
    part[..end].to_string()
}

const ACCEPT_UNKNOWN: &str = "[smtp]\nlisten = [\"127.0.0.1:0\"]\nunknown_recipient = \"accept\"\n\n\
    [limits]\nunknown_penalty_base = \"1ms\"\nunknown_penalty_max = \"1ms\"\n";

#[tokio::test]
async fn unknown_recipient_dsn_returns_headers_only() {
    let dns = dns_builder().start().await;
    let sink = TestSink::start().await;
    let t = start(&dns, &sink, ACCEPT_UNKNOWN).await;
    add_alias(&t, "alice@alias.test", &["alice@dest.test"], "pool").await;

    // No empty line: the text after the fields must not count as headers.
    let no_empty_line = b"From: s@origin.test\r\nSubject: no empty line\r\n\
        Buy cheap REFLECTED-TEXT now\r\nX-After: REFLECTED-FIELD\r\n";
    send(
        &t,
        "s@origin.test",
        &["ghost@alias.test", "alice@alias.test"],
        no_empty_line,
    )
    .await;
    // Only unknown recipients: still one DSN, made from the committed message.
    let with_body = b"Subject: only ghosts\r\n\r\nREFLECTED-BODY\r\n";
    send(&t, "s@origin.test", &["ghost2@alias.test"], with_body).await;

    sink.wait_for(3, WAIT).await;
    wait_queue_empty(&t).await;
    let msgs = sink.messages();
    assert_eq!(msgs.len(), 3, "{}", sink.describe());
    let dsns: Vec<&Delivered> = msgs.iter().filter(|m| m.mail_from.is_empty()).collect();
    assert_eq!(dsns.len(), 2, "one DSN per message:\n{}", sink.describe());
    for (ghost, subject) in [
        ("ghost@alias.test", "no empty line"),
        ("ghost2@alias.test", "only ghosts"),
    ] {
        let d = dsns
            .iter()
            .find(|d| d.text().contains(&format!("Subject: {subject}")))
            .unwrap_or_else(|| panic!("no DSN about {subject:?}:\n{}", sink.describe()));
        assert_eq!(d.rcpts, vec!["s@origin.test".to_string()]);
        let text = d.text();
        assert!(
            !text.lines().any(|l| l.starts_with("Delivered-To:")),
            "no Delivered-To in a DSN to a sender:\n{text}"
        );
        assert!(
            !text.contains("REFLECTED"),
            "text of the original returned:\n{text}"
        );
        let part = returned_part(&text);
        assert!(part.contains(&format!("Subject: {subject}\r\n")), "{part}");
        let dsn = parse_dsn(&d.data);
        let group = dsn
            .recipient(ghost)
            .unwrap_or_else(|| panic!("{ghost}:\n{text}"));
        assert_eq!(field(group, "Status").as_deref(), Some("5.1.1"));
        assert!(!text.contains("alice@dest.test"), "{text}");
    }
    let inbound = &t.counters().await["inbound"];
    assert_eq!(inbound["unknown_bounced"], 2, "{inbound}");
}

#[tokio::test]
async fn unknown_recipient_dsn_is_made_after_a_crash_following_the_commit() {
    let dns = dns_builder().start().await;
    let sink = TestSink::start().await;
    let mut t = Tenso::prepare(&config(&dns, sink.port(), "", FAST_QUEUE, ACCEPT_UNKNOWN));
    // The state a crash leaves right after the 250: the message committed with its
    // unknown recipient, no DSN anywhere yet.
    let spool = tenso::spool::Spool::open(
        &t.data_dir().join("queue"),
        &t.data_dir().join("quarantine"),
    )
    .expect("open spool");
    let mut env = tenso::spool::Envelope::new_for_test(&spool.new_id());
    env.arrival = tenso::time::unix_now();
    env.reverse_path = "s@origin.test".into();
    env.rcpts = vec![tenso::forward::unknown("ghost@alias.test")];
    let body = b"Subject: committed, then crashed\r\n\r\nREFLECTED-BODY\r\n".to_vec();
    env.size = body.len() as u64;
    spool
        .commit(&env, std::sync::Arc::new(body))
        .await
        .expect("commit");
    drop(spool);

    t.launch().await;
    let got = sink.wait_for(1, WAIT).await;
    wait_queue_empty(&t).await;
    assert_eq!(sink.messages().len(), 1, "{}", sink.describe());
    let d = &got[0];
    assert_eq!(
        (d.mail_from.as_str(), d.rcpts.clone()),
        ("", vec!["s@origin.test".to_string()])
    );
    let dsn = parse_dsn(&d.data);
    assert!(dsn.recipient("ghost@alias.test").is_some(), "{}", dsn.text);
    assert!(dsn.text.contains("Subject: committed, then crashed"));
    assert!(!dsn.text.contains("REFLECTED"), "{}", dsn.text);
}
