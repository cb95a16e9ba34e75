//! Delivery (issue 3): proposal 2's envelope rewrite, byte-exact forwarding, MX routing,
//! retries, per-recipient outcomes and DSNs, connection reuse, Postfix's smtp-sink as an
//! independent peer, and the 250 → arrival latency on loopback.
//!
//! Every test runs the real tenso binary against the in-process DNS server and a real
//! SMTP sink on 127.0.0.1; `[delivery] port` points MX/A delivery at the sink's port.

mod common;
mod delivery_support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use common::daemon::Tenso;
use common::dns::{TestDns, TestDnsBuilder};
use common::postfix_sink::PostfixSink;
use common::sink::{Reply, TestSink};
use common::smtp_client::RawSmtp;
use delivery_support::*;
use hickory_resolver::proto::rr::RecordType;

/// `dest.test MX 10 mx.dest.test`, `mx.dest.test A 127.0.0.1`.
fn dns_builder() -> TestDnsBuilder {
    TestDns::builder()
        .mx("dest.test", 10, "mx.dest.test")
        .a("mx.dest.test", "127.0.0.1")
}

/// A message exercising what byte-exact forwarding has to get right: folded and
/// whitespace-carrying headers, lines starting with dots (a lone dot among them), a tab,
/// trailing spaces, a 998-octet line, and trailing empty lines.
fn tricky_message() -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(
        b"From: Sender <sender@origin.test>\r\n\
          To: Alice <alice@alias.test>\r\n\
          Subject: exact bytes\r\n\
          Message-ID: <exact.1@origin.test>\r\n\
          X-Folded: first part\r\n\tsecond part   \r\n\
          X-Spaces:    lots   of   space  \r\n\
          \r\n\
          .leading dot\r\n\
          ..two dots\r\n\
          .\r\n\
          trailing spaces   \r\n\
          \ttab at start\r\n",
    );
    m.extend_from_slice(&[b'a'; 998]);
    m.extend_from_slice(b"\r\nlast line\r\n\r\n\r\n");
    m
}

async fn start(sink_port: u16, dns: &TestDns) -> Tenso {
    Tenso::start(&config(dns, sink_port, "", FAST_QUEUE, "")).await
}

#[tokio::test]
async fn forwards_with_alias_as_mail_from_and_content_byte_exact() {
    let dns = dns_builder().start().await;
    let sink = TestSink::start().await;
    let t = start(sink.port(), &dns).await;
    add_alias(&t, "alice@alias.test", &["bob@dest.test"], "pool").await;

    let body = tricky_message();
    let id = send(&t, "sender@origin.test", &["alice@alias.test"], &body).await;
    let msgs = sink.wait_for(1, WAIT).await;
    let m = &msgs[0];
    // Proposal 2: the alias itself, plain (no SRS, no hash, no timestamp).
    assert_eq!(m.mail_from, "alice@alias.test", "{}", sink.describe());
    assert_eq!(m.rcpts, vec!["bob@dest.test".to_string()]);
    let (delivered_to, received, rest) = split_prepended(&m.data);
    assert_eq!(delivered_to, "alice@alias.test");
    assert!(
        received.contains(&id),
        "Received lacks the queue id {id}: {received}"
    );
    assert_eq!(
        String::from_utf8_lossy(&rest),
        String::from_utf8_lossy(&body),
        "content changed in transit"
    );
    assert_eq!(rest, body, "content changed in transit (bytes)");
    // SIZE, when the sink offers it, is the size of what is sent.
    assert!(
        m.mail_params
            .split_whitespace()
            .any(|p| p == format!("SIZE={}", m.data.len())),
        "MAIL params {:?} lack SIZE={}",
        m.mail_params,
        m.data.len()
    );
    wait_queue_empty(&t).await;
    assert_eq!(sink.messages().len(), 1, "{}", sink.describe());
}

#[tokio::test]
async fn catch_all_and_subaddress_choose_mail_from_per_alias() {
    let dns = dns_builder().start().await;
    let sink = TestSink::start().await;
    let t = start(sink.port(), &dns).await;
    add_alias(&t, "alice@alias.test", &["bob@dest.test"], "pool").await;
    add_alias(&t, "@alias.test", &["catch@dest.test"], "pool").await;

    // One inbound transaction for both: one outgoing transaction per alias.
    let body = simple_message("catch-all");
    send(
        &t,
        "sender@origin.test",
        &["Some.One@alias.test", "alice+news@alias.test"],
        &body,
    )
    .await;
    let msgs = sink.wait_for(2, WAIT).await;
    wait_queue_empty(&t).await;
    let msgs_now = sink.messages();
    assert_eq!(msgs_now.len(), 2, "{}", sink.describe());
    let by_from: HashMap<&str, _> = msgs.iter().map(|m| (m.mail_from.as_str(), m)).collect();
    // The catch-all has no address of its own: the address written in RCPT is used.
    let c = by_from
        .get("Some.One@alias.test")
        .unwrap_or_else(|| panic!("no MAIL FROM:<Some.One@alias.test>:\n{}", sink.describe()));
    assert_eq!(c.rcpts, vec!["catch@dest.test".to_string()]);
    let (dt, _, rest) = split_prepended(&c.data);
    assert!(dt.eq_ignore_ascii_case("some.one@alias.test"), "{dt}");
    assert_eq!(rest, body);
    // A subaddress matches the alias; the alias is the sender.
    let a = by_from
        .get("alice@alias.test")
        .unwrap_or_else(|| panic!("no MAIL FROM:<alice@alias.test>:\n{}", sink.describe()));
    assert_eq!(a.rcpts, vec!["bob@dest.test".to_string()]);
    let (dt, _, rest) = split_prepended(&a.data);
    assert_eq!(dt, "alice@alias.test");
    assert_eq!(rest, body);
}

#[tokio::test]
async fn null_sender_is_forwarded_with_null_mail_from() {
    let dns = dns_builder().start().await;
    let sink = TestSink::start().await;
    let t = start(sink.port(), &dns).await;
    add_alias(&t, "alice@alias.test", &["bob@dest.test"], "pool").await;

    let body = simple_message("null sender");
    send(&t, "", &["alice@alias.test"], &body).await;
    let msgs = sink.wait_for(1, WAIT).await;
    assert_eq!(msgs[0].mail_from, "", "{}", sink.describe());
    assert_eq!(msgs[0].rcpts, vec!["bob@dest.test".to_string()]);
    let (_, _, rest) = split_prepended(&msgs[0].data);
    assert_eq!(rest, body);
}

#[tokio::test]
async fn mx_preference_is_followed() {
    let sink = TestSink::start().await;
    // The less preferred MX is listed first, and a trap listens on its address.
    let dns = TestDns::builder()
        .mx("pref.test", 20, "backup.pref.test")
        .mx("pref.test", 10, "primary.pref.test")
        .a("backup.pref.test", "127.0.0.2")
        .a("primary.pref.test", "127.0.0.1")
        .start()
        .await;
    let trap = Trap::start("127.0.0.2", sink.port(), None).await;
    let t = start(sink.port(), &dns).await;
    add_alias(&t, "alice@alias.test", &["u@pref.test"], "pool").await;
    for i in 0..3 {
        send(
            &t,
            "sender@origin.test",
            &["alice@alias.test"],
            &simple_message(&format!("pref {i}")),
        )
        .await;
        sink.wait_for(i + 1, WAIT).await;
    }
    assert_eq!(
        trap.connections(),
        0,
        "the preference-20 MX was contacted while preference 10 worked"
    );
}

#[tokio::test]
async fn unreachable_or_refusing_preferred_mx_falls_back_to_next() {
    let sink = TestSink::start().await;
    let dns = TestDns::builder()
        // Preferred MX on an address where nothing listens: connection refused.
        .mx("fb.test", 10, "down.fb.test")
        .mx("fb.test", 20, "up.fb.test")
        .a("down.fb.test", "127.0.0.2")
        .a("up.fb.test", "127.0.0.1")
        // Preferred MX that answers 421 at greeting.
        .mx("busy.test", 10, "busy.mx.test")
        .mx("busy.test", 20, "up.fb.test")
        .a("busy.mx.test", "127.0.0.3")
        .start()
        .await;
    let trap = Trap::start("127.0.0.3", sink.port(), Some("421 4.3.2 too busy\r\n")).await;
    let t = start(sink.port(), &dns).await;
    add_alias(&t, "alice@alias.test", &["u@fb.test"], "pool").await;
    add_alias(&t, "carol@alias.test", &["v@busy.test"], "pool").await;

    send(
        &t,
        "sender@origin.test",
        &["alice@alias.test"],
        &simple_message("fallback down"),
    )
    .await;
    let msgs = sink.wait_for(1, WAIT).await;
    assert_eq!(msgs[0].rcpts, vec!["u@fb.test".to_string()]);
    assert!(
        dns.query_count("down.fb.test", RecordType::A) >= 1,
        "the preferred MX was never even resolved"
    );

    send(
        &t,
        "sender@origin.test",
        &["carol@alias.test"],
        &simple_message("fallback busy"),
    )
    .await;
    let msgs = sink.wait_for(2, WAIT).await;
    assert_eq!(msgs[1].rcpts, vec!["v@busy.test".to_string()]);
    assert_eq!(msgs[1].mail_from, "carol@alias.test");
    assert!(
        trap.connections() >= 1,
        "the preferred (421) MX was not tried first"
    );
    wait_queue_empty(&t).await;
    assert!(pool_messages(&t, "alice@alias.test").is_empty());
    assert!(pool_messages(&t, "carol@alias.test").is_empty());
}

#[tokio::test]
async fn equal_preference_mx_hosts_are_tried_in_random_order() {
    let sink = TestSink::start().await;
    let dns = TestDns::builder()
        .mx("eq.test", 10, "a.eq.test")
        .mx("eq.test", 10, "b.eq.test")
        .a("a.eq.test", "127.0.0.1")
        .a("b.eq.test", "127.0.0.4")
        .start()
        .await;
    // b answers 421 at greeting, so every copy ends at a; b is contacted exactly when
    // it came first in the order.
    let trap = Trap::start("127.0.0.4", sink.port(), Some("421 4.3.2 busy\r\n")).await;
    let t = start(sink.port(), &dns).await;
    add_alias(&t, "alice@alias.test", &["u@eq.test"], "pool").await;
    let n = 24;
    for i in 0..n {
        send(
            &t,
            "sender@origin.test",
            &["alice@alias.test"],
            &simple_message(&format!("equal {i}")),
        )
        .await;
        sink.wait_for(i + 1, WAIT).await;
    }
    let first_b = trap.connections();
    println!("equal-preference MX: b.eq.test came first {first_b} of {n} times");
    // With a fair shuffle, all-or-nothing has probability 2 * 2^-24.
    assert!(
        first_b >= 1 && first_b < n as u64,
        "order among equal preferences is not random: b first {first_b} of {n} times"
    );
}

#[tokio::test]
async fn static_routes_and_relay_host_take_precedence_over_mx() {
    let routed = TestSink::start().await;
    let relayed = TestSink::start().await;
    // dest.test's MX points at a trap that must never be contacted.
    let dns = TestDns::builder()
        .mx("dest.test", 10, "mx.dest.test")
        .a("mx.dest.test", "127.0.0.5")
        .start()
        .await;
    let trap = Trap::start("127.0.0.5", routed.port(), None).await;
    let delivery = format!(
        "routes = {{ \"dest.test\" = \"127.0.0.1:{}\" }}\nrelay_host = \"127.0.0.1:{}\"",
        routed.port(),
        relayed.port()
    );
    let t = Tenso::start(&config(&dns, routed.port(), &delivery, FAST_QUEUE, "")).await;
    add_alias(
        &t,
        "alice@alias.test",
        &["bob@dest.test", "carol@elsewhere.test"],
        "pool",
    )
    .await;
    send(
        &t,
        "sender@origin.test",
        &["alice@alias.test"],
        &simple_message("routes"),
    )
    .await;
    let r = routed.wait_for(1, WAIT).await;
    let s = relayed.wait_for(1, WAIT).await;
    wait_queue_empty(&t).await;
    assert_eq!(r[0].rcpts, vec!["bob@dest.test".to_string()]);
    assert_eq!(s[0].rcpts, vec!["carol@elsewhere.test".to_string()]);
    assert_eq!(r[0].mail_from, "alice@alias.test");
    assert_eq!(s[0].mail_from, "alice@alias.test");
    assert_eq!(trap.connections(), 0, "MX was used despite a static route");
    assert_eq!(dns.query_count("dest.test", RecordType::MX), 0);
}

/// Sends `body` through tenso with `BODY=8BITMIME` on MAIL.
async fn send_8bit(t: &Tenso, body: &[u8]) {
    let mut c = RawSmtp::connect(t.smtp_addr()).await;
    assert_eq!(c.ehlo("client.test").await.0, 250);
    c.expect("MAIL FROM:<sender@origin.test> BODY=8BITMIME", 250)
        .await;
    c.expect("RCPT TO:<alice@alias.test>", 250).await;
    c.expect("DATA", 354).await;
    let mut wire = common::smtp_client::dot_stuff(body);
    wire.extend_from_slice(b".\r\n");
    c.send(&wire).await;
    assert_eq!(c.read_reply().await.0, 250);
    c.quit().await;
}

#[tokio::test]
async fn esmtp_parameters_follow_the_servers_ehlo() {
    let full = TestSink::start().await;
    let bare = TestSink::builder()
        .size(None)
        .dsn(false)
        .eightbitmime(false)
        .start()
        .await;
    let small = TestSink::builder().size(Some(2000)).start().await;
    let dns = TestDns::builder().start().await;
    let delivery = format!(
        "routes = {{ \"full.test\" = \"127.0.0.1:{}\", \"bare.test\" = \"127.0.0.1:{}\", \"small.test\" = \"127.0.0.1:{}\" }}",
        full.port(),
        bare.port(),
        small.port()
    );
    let t = Tenso::start(&config(&dns, full.port(), &delivery, FAST_QUEUE, "")).await;
    let eight =
        "From: s@origin.test\r\nSubject: eight bit\r\nContent-Type: text/plain; charset=utf-8\r\n\
                 Content-Transfer-Encoding: 8bit\r\n\r\ncaf\u{e9} \u{8ee2}\u{9001}\r\n"
            .as_bytes()
            .to_vec();

    // A server offering SIZE, 8BITMIME and DSN gets all three parameters.
    add_alias(&t, "alice@alias.test", &["u@full.test"], "pool").await;
    send_8bit(&t, &eight).await;
    let m = &full.wait_for(1, WAIT).await[0];
    let params: Vec<&str> = m.mail_params.split_whitespace().collect();
    assert!(params.contains(&"BODY=8BITMIME"), "{params:?}");
    assert!(
        params.contains(&format!("SIZE={}", m.data.len()).as_str()),
        "{params:?}"
    );
    assert!(params.iter().any(|p| p.starts_with("ENVID=")), "{params:?}");
    assert_eq!(split_prepended(&m.data).2, eight);
    cli_ok(&t, &["user", "remove", "alice@alias.test"]).await;

    // A server offering none of them gets none; 8-bit content is not sent to it.
    add_alias(&t, "alice@alias.test", &["u@bare.test"], "pool").await;
    let ascii = simple_message("plain ascii");
    send(&t, "sender@origin.test", &["alice@alias.test"], &ascii).await;
    let m = &bare.wait_for(1, WAIT).await[0];
    assert_eq!(m.mail_params, "", "parameters the server did not offer");
    assert_eq!(split_prepended(&m.data).2, ascii);
    send_8bit(&t, &eight).await;
    let pooled = wait_pool(&t, "alice@alias.test", 1).await;
    let dsn = parse_dsn(&pooled[0]);
    assert!(dsn.text.contains("Status: 5.6.3"), "{}", dsn.text);
    assert_eq!(bare.messages().len(), 1, "{}", bare.describe());
    cli_ok(&t, &["user", "remove", "alice@alias.test"]).await;

    // Bigger than the server's SIZE: failed without sending (5.3.4); a small one goes.
    add_alias(&t, "bob@alias.test", &["u@small.test"], "pool").await;
    let mut big = simple_message("too big");
    big.extend_from_slice(format!("{}\r\n", "x".repeat(900)).repeat(3).as_bytes());
    send(&t, "sender@origin.test", &["bob@alias.test"], &big).await;
    let pooled = wait_pool(&t, "bob@alias.test", 1).await;
    let dsn = parse_dsn(&pooled[0]);
    assert!(dsn.text.contains("Status: 5.3.4"), "{}", dsn.text);
    send(
        &t,
        "sender@origin.test",
        &["bob@alias.test"],
        &simple_message("small enough"),
    )
    .await;
    let m = small.wait_for(1, WAIT).await;
    assert_eq!(m[0].header("Subject").as_deref(), Some("small enough"));
    wait_queue_empty(&t).await;
    assert_eq!(small.transactions(), 1, "{}", small.describe());
}

#[tokio::test]
async fn no_mx_falls_back_to_a_record() {
    let sink = TestSink::start().await;
    let dns = TestDns::builder()
        .a("plain.test", "127.0.0.1")
        .start()
        .await;
    let t = start(sink.port(), &dns).await;
    add_alias(&t, "alice@alias.test", &["u@plain.test"], "pool").await;
    send(
        &t,
        "sender@origin.test",
        &["alice@alias.test"],
        &simple_message("no mx"),
    )
    .await;
    let msgs = sink.wait_for(1, WAIT).await;
    assert_eq!(msgs[0].rcpts, vec!["u@plain.test".to_string()]);
    assert!(dns.query_count("plain.test", RecordType::MX) >= 1);
    assert!(dns.query_count("plain.test", RecordType::A) >= 1);
}

#[tokio::test]
async fn null_mx_gives_dsn_5_1_10_in_pool() {
    let sink = TestSink::start().await;
    let dns = TestDns::builder().null_mx("nomail.test").start().await;
    let t = start(sink.port(), &dns).await;
    add_alias(&t, "alice@alias.test", &["u@nomail.test"], "pool").await;
    send(
        &t,
        "sender@origin.test",
        &["alice@alias.test"],
        &simple_message("null mx"),
    )
    .await;
    let pooled = wait_pool(&t, "alice@alias.test", 1).await;
    assert_eq!(pooled.len(), 1);
    let dsn = parse_dsn(&pooled[0]);
    assert!(dsn.text.contains("Status: 5.1.10"), "{}", dsn.text);
    let r = dsn
        .recipient("u@nomail.test")
        .unwrap_or_else(|| panic!("no group for u@nomail.test:\n{}", dsn.text));
    assert_eq!(field(r, "Action").as_deref(), Some("failed"));
    assert_eq!(field(r, "Status").as_deref(), Some("5.1.10"));
    assert_eq!(dsn.header("To").as_deref(), Some("alice@alias.test"));
    wait_queue_empty(&t).await;
    assert_eq!(sink.connections(), 0);
}

#[tokio::test]
async fn nxdomain_gives_failed_dsn() {
    let sink = TestSink::start().await;
    let dns = TestDns::builder()
        .a("other.test", "127.0.0.1")
        .start()
        .await;
    let t = start(sink.port(), &dns).await;
    add_alias(&t, "alice@alias.test", &["u@nowhere.test"], "pool").await;
    send(
        &t,
        "sender@origin.test",
        &["alice@alias.test"],
        &simple_message("nxdomain"),
    )
    .await;
    let pooled = wait_pool(&t, "alice@alias.test", 1).await;
    let dsn = parse_dsn(&pooled[0]);
    let r = dsn
        .recipient("u@nowhere.test")
        .unwrap_or_else(|| panic!("no group for u@nowhere.test:\n{}", dsn.text));
    assert_eq!(field(r, "Action").as_deref(), Some("failed"));
    let status = field(r, "Status").unwrap_or_default();
    assert!(status.starts_with("5."), "status {status}:\n{}", dsn.text);
    assert!(dns.query_count("nowhere.test", RecordType::MX) >= 1);
    wait_queue_empty(&t).await;
    assert_eq!(sink.connections(), 0);
}

#[tokio::test]
async fn temporary_failure_then_success_is_delivered_once() {
    let dns = dns_builder().start().await;
    let sink = TestSink::builder()
        .rcpt_policy(|_, attempt| {
            if attempt == 1 {
                Reply::new(450, "4.2.0 mailbox busy, try later")
            } else {
                Reply::new(250, "2.1.5 OK")
            }
        })
        .start()
        .await;
    let t = start(sink.port(), &dns).await;
    add_alias(&t, "alice@alias.test", &["bob@dest.test"], "pool").await;
    let body = simple_message("retry me");
    send(&t, "sender@origin.test", &["alice@alias.test"], &body).await;
    let msgs = sink.wait_for(1, WAIT).await;
    wait_queue_empty(&t).await;
    assert_eq!(sink.messages().len(), 1, "{}", sink.describe());
    assert_eq!(sink.rcpt_attempts("bob@dest.test"), 2);
    assert_eq!(msgs[0].mail_from, "alice@alias.test");
    assert_eq!(split_prepended(&msgs[0].data).2, body);
    assert!(pool_messages(&t, "alice@alias.test").is_empty());
}

#[tokio::test]
async fn permanent_failure_gives_dsn_with_remote_reply() {
    let dns = dns_builder().start().await;
    let sink = TestSink::builder()
        .rcpt_policy(|_, _| Reply::new(550, "5.1.1 <bob@dest.test>: no such user here"))
        .start()
        .await;
    let t = start(sink.port(), &dns).await;
    add_alias(&t, "alice@alias.test", &["bob@dest.test"], "pool").await;
    send(
        &t,
        "sender@origin.test",
        &["alice@alias.test"],
        &simple_message("perm fail"),
    )
    .await;
    let pooled = wait_pool(&t, "alice@alias.test", 1).await;
    wait_queue_empty(&t).await;
    assert_eq!(pooled.len(), 1);
    let dsn = parse_dsn(&pooled[0]);
    assert_eq!(dsn.header("To").as_deref(), Some("alice@alias.test"));
    assert!(field(&dsn.per_message, "Reporting-MTA").is_some());
    assert!(field(&dsn.per_message, "Arrival-Date").is_some());
    assert_eq!(dsn.recipients.len(), 1, "{}", dsn.text);
    let r = dsn
        .recipient("bob@dest.test")
        .unwrap_or_else(|| panic!("no group for bob@dest.test:\n{}", dsn.text));
    assert_eq!(field(r, "Action").as_deref(), Some("failed"));
    assert_eq!(field(r, "Status").as_deref(), Some("5.1.1"));
    let diag = field(r, "Diagnostic-Code").unwrap_or_default();
    assert!(
        diag.contains("550 5.1.1 <bob@dest.test>: no such user here"),
        "Diagnostic-Code {diag:?}"
    );
    let mta = field(r, "Remote-MTA").unwrap_or_default();
    assert!(mta.contains("mx.dest.test"), "Remote-MTA {mta:?}");
    // The original's headers come back.
    assert!(dsn.text.contains("Subject: perm fail"), "{}", dsn.text);
    // Permanent: no retry, and nothing reached the sink.
    assert_eq!(sink.rcpt_attempts("bob@dest.test"), 1);
    assert!(sink.messages().is_empty());
}

#[tokio::test]
async fn expiry_gives_failed_dsn() {
    let dns = dns_builder().start().await;
    let sink = TestSink::builder()
        .rcpt_policy(|_, _| Reply::new(451, "4.3.0 always busy"))
        .start()
        .await;
    let queue = "retry = [\"1s\"]\nmax_lifetime = \"4s\"\ndead_host_ttl = \"1s\"";
    let t = Tenso::start(&config(&dns, sink.port(), "", queue, "")).await;
    add_alias(&t, "alice@alias.test", &["bob@dest.test"], "pool").await;
    send(
        &t,
        "sender@origin.test",
        &["alice@alias.test"],
        &simple_message("expire me"),
    )
    .await;
    let pooled = wait_pool(&t, "alice@alias.test", 1).await;
    wait_queue_empty(&t).await;
    let dsn = parse_dsn(&pooled[0]);
    let r = dsn
        .recipient("bob@dest.test")
        .unwrap_or_else(|| panic!("no group for bob@dest.test:\n{}", dsn.text));
    assert_eq!(
        field(r, "Action").as_deref(),
        Some("failed"),
        "{}",
        dsn.text
    );
    let status = field(r, "Status").unwrap_or_default();
    assert!(status.ends_with(".4.7"), "status {status}:\n{}", dsn.text);
    let diag = field(r, "Diagnostic-Code").unwrap_or_default();
    assert!(diag.contains("451"), "Diagnostic-Code {diag:?}");
    assert!(sink.rcpt_attempts("bob@dest.test") >= 2);
    assert!(sink.messages().is_empty());
}

/// An alias with three destinations at one domain; the sink answers 250 / 450 (first
/// try only) / 550 to their RCPTs: one is delivered at once, one later, one gets a DSN.
async fn mixed_replies(pipelining: bool) {
    let dns = dns_builder().start().await;
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = seen.clone();
    let sink = TestSink::builder()
        .pipelining(pipelining)
        .rcpt_policy(move |rcpt, attempt| {
            log.lock().unwrap().push(rcpt.to_string());
            match rcpt {
                "later@dest.test" if attempt == 1 => Reply::new(450, "4.2.1 come back later"),
                "bad@dest.test" => Reply::new(550, "5.1.1 no such user"),
                _ => Reply::new(250, "2.1.5 OK"),
            }
        })
        .start()
        .await;
    let t = start(sink.port(), &dns).await;
    add_alias(
        &t,
        "alice@alias.test",
        &["ok@dest.test", "later@dest.test", "bad@dest.test"],
        "pool",
    )
    .await;
    let body = simple_message("mixed");
    send(&t, "sender@origin.test", &["alice@alias.test"], &body).await;

    let msgs = sink.wait_for(2, WAIT).await;
    let pooled = wait_pool(&t, "alice@alias.test", 1).await;
    wait_queue_empty(&t).await;
    assert_eq!(sink.messages().len(), 2, "{}", sink.describe());
    assert_eq!(msgs[0].rcpts, vec!["ok@dest.test".to_string()]);
    assert_eq!(msgs[1].rcpts, vec!["later@dest.test".to_string()]);
    for m in &msgs {
        assert_eq!(m.mail_from, "alice@alias.test");
        assert_eq!(split_prepended(&m.data).2, body);
    }
    assert_eq!(sink.rcpt_attempts("ok@dest.test"), 1);
    assert_eq!(sink.rcpt_attempts("later@dest.test"), 2);
    assert_eq!(sink.rcpt_attempts("bad@dest.test"), 1);
    // The first attempt offered all three recipients (the retry comes a second later).
    let mut first: Vec<String> = seen.lock().unwrap()[..3].to_vec();
    first.sort();
    assert_eq!(
        first,
        ["bad@dest.test", "later@dest.test", "ok@dest.test"],
        "RCPTs in order: {:?}",
        seen.lock().unwrap()
    );
    assert_eq!(pool_messages(&t, "alice@alias.test").len(), 1);
    let dsn = parse_dsn(&pooled[0]);
    assert_eq!(dsn.recipients.len(), 1, "only bad@ failed:\n{}", dsn.text);
    let r = dsn
        .recipient("bad@dest.test")
        .unwrap_or_else(|| panic!("no group for bad@dest.test:\n{}", dsn.text));
    assert_eq!(field(r, "Action").as_deref(), Some("failed"));
    assert_eq!(field(r, "Status").as_deref(), Some("5.1.1"));
}

#[tokio::test]
async fn mixed_replies_in_one_transaction_are_handled_per_recipient() {
    mixed_replies(true).await;
}

#[tokio::test]
async fn mixed_replies_without_pipelining_are_handled_per_recipient() {
    mixed_replies(false).await;
}

#[tokio::test]
async fn delay_warning_dsn_when_configured() {
    let dns = dns_builder().start().await;
    let sink = TestSink::builder()
        .rcpt_policy(|_, attempt| {
            if attempt <= 2 {
                Reply::new(451, "4.3.0 busy")
            } else {
                Reply::new(250, "2.1.5 OK")
            }
        })
        .start()
        .await;
    let queue = "retry = [\"1s\"]\nmax_lifetime = \"1h\"\ndelay_warning = \"1s\"";
    let t = Tenso::start(&config(&dns, sink.port(), "", queue, "")).await;
    add_alias(&t, "alice@alias.test", &["bob@dest.test"], "pool").await;
    let body = simple_message("slow path");
    send(&t, "sender@origin.test", &["alice@alias.test"], &body).await;
    let msgs = sink.wait_for(1, WAIT).await;
    wait_queue_empty(&t).await;
    assert_eq!(sink.messages().len(), 1, "{}", sink.describe());
    assert_eq!(split_prepended(&msgs[0].data).2, body);
    let pooled = pool_messages(&t, "alice@alias.test");
    assert_eq!(pooled.len(), 1, "exactly one delay warning");
    let dsn = parse_dsn(&pooled[0]);
    let r = dsn
        .recipient("bob@dest.test")
        .unwrap_or_else(|| panic!("no group for bob@dest.test:\n{}", dsn.text));
    assert_eq!(
        field(r, "Action").as_deref(),
        Some("delayed"),
        "{}",
        dsn.text
    );
    assert!(
        field(r, "Status").unwrap_or_default().starts_with("4."),
        "{}",
        dsn.text
    );
    assert!(field(r, "Will-Retry-Until").is_some(), "{}", dsn.text);
}

#[tokio::test]
async fn null_sender_failure_produces_no_dsn() {
    let dns = dns_builder().start().await;
    let sink = TestSink::builder()
        .rcpt_policy(|_, _| Reply::reject())
        .start()
        .await;
    let t = start(sink.port(), &dns).await;
    add_alias(&t, "alice@alias.test", &["bob@dest.test"], "pool").await;
    send(&t, "", &["alice@alias.test"], &simple_message("bounce")).await;
    // The failure is recorded (and any DSN stored) before the message leaves the queue.
    wait_queue_empty(&t).await;
    assert_eq!(sink.rcpt_attempts("bob@dest.test"), 1);
    assert!(
        pool_messages(&t, "alice@alias.test").is_empty(),
        "a DSN was made about a null-sender message"
    );
    assert!(sink.messages().is_empty(), "{}", sink.describe());
}

#[tokio::test]
async fn dsn_under_policy_forward_goes_to_destinations_with_null_sender() {
    let dns = dns_builder().start().await;
    let sink = TestSink::builder()
        .rcpt_policy(|rcpt, _| {
            if rcpt == "bad@dest.test" {
                Reply::new(550, "5.1.1 no such user")
            } else {
                Reply::new(250, "2.1.5 OK")
            }
        })
        .start()
        .await;
    let t = start(sink.port(), &dns).await;
    add_alias(
        &t,
        "carol@alias.test",
        &["good@dest.test", "bad@dest.test"],
        "forward",
    )
    .await;
    send(
        &t,
        "sender@origin.test",
        &["carol@alias.test"],
        &simple_message("policy forward"),
    )
    .await;
    // The original to good@, then the DSN about bad@ with MAIL FROM:<>.
    let msgs = sink.wait_for(2, WAIT).await;
    wait_queue_empty(&t).await;
    assert_eq!(msgs[0].mail_from, "carol@alias.test");
    let d = &msgs[1];
    assert_eq!(d.mail_from, "", "{}", sink.describe());
    assert_eq!(d.rcpts, vec!["good@dest.test".to_string()]);
    let dsn = parse_dsn(&d.data);
    let r = dsn
        .recipient("bad@dest.test")
        .unwrap_or_else(|| panic!("no group for bad@dest.test:\n{}", dsn.text));
    assert_eq!(field(r, "Status").as_deref(), Some("5.1.1"));
    assert!(pool_messages(&t, "carol@alias.test").is_empty());
    assert_eq!(sink.messages().len(), 2, "{}", sink.describe());
}

#[tokio::test]
async fn own_trace_header_for_the_alias_stops_a_loop() {
    let dns = dns_builder().start().await;
    let sink = TestSink::start().await;
    let t = start(sink.port(), &dns).await;
    add_alias(&t, "alice@alias.test", &["bob@dest.test"], "pool").await;
    let mut body = b"Delivered-To: alice@alias.test\r\n".to_vec();
    body.extend_from_slice(&simple_message("looped"));
    send(&t, "sender@origin.test", &["alice@alias.test"], &body).await;
    let pooled = wait_pool(&t, "alice@alias.test", 1).await;
    wait_queue_empty(&t).await;
    let dsn = parse_dsn(&pooled[0]);
    assert!(dsn.text.contains("Status: 5.4.6"), "{}", dsn.text);
    assert_eq!(sink.connections(), 0, "{}", sink.describe());
}

#[tokio::test]
async fn several_messages_to_one_host_share_connections() {
    let dns = dns_builder().start().await;
    let sink = TestSink::start().await;
    let t = start(sink.port(), &dns).await;
    add_alias(&t, "alice@alias.test", &["bob@dest.test"], "pool").await;
    // One after the other: each copy can reuse the idle session of the one before.
    let n = 5;
    for i in 0..n {
        send(
            &t,
            "sender@origin.test",
            &["alice@alias.test"],
            &simple_message(&format!("sequential {i}")),
        )
        .await;
        sink.wait_for(i + 1, WAIT).await;
    }
    let sequential = sink.connections();
    println!("connection reuse: {n} sequential messages over {sequential} connection(s)");
    assert!(
        sequential < n as u64,
        "{n} messages used {sequential} connections:\n{}",
        sink.describe()
    );
    let conn_ids: std::collections::HashSet<u64> =
        sink.messages().iter().map(|m| m.conn_id).collect();
    assert!(conn_ids.len() < n, "{}", sink.describe());
}

#[tokio::test]
async fn a_burst_to_one_host_stays_within_max_per_destination() {
    let dns = dns_builder().start().await;
    let sink = TestSink::start().await;
    let t = Tenso::start(&config(
        &dns,
        sink.port(),
        "max_per_destination = 2",
        FAST_QUEUE,
        "",
    ))
    .await;
    add_alias(&t, "alice@alias.test", &["bob@dest.test"], "pool").await;
    let n = 10;
    let mut c = RawSmtp::connect(t.smtp_addr()).await;
    for i in 0..n {
        c.send_message(
            "sender@origin.test",
            &["alice@alias.test"],
            &simple_message(&format!("burst {i}")),
        )
        .await
        .expect("tenso accepts");
    }
    c.quit().await;
    sink.wait_for(n, WAIT).await;
    wait_queue_empty(&t).await;
    println!(
        "connection reuse: burst of {n} messages over {} connection(s)",
        sink.connections()
    );
    assert!(
        sink.connections() <= 2,
        "max_per_destination = 2 but {} connections:\n{}",
        sink.connections(),
        sink.describe()
    );
    assert_eq!(sink.messages().len(), n);
}

#[tokio::test]
async fn postfix_smtp_sink_receives_forwarded_mail() {
    let ps = PostfixSink::start_with_dump().await;
    let dns = dns_builder().start().await;
    let t = start(ps.addr().port(), &dns).await;
    add_alias(&t, "alice@alias.test", &["bob@dest.test"], "pool").await;
    let n = 3;
    let mut bodies = Vec::new();
    for i in 0..n {
        let b = simple_message(&format!("postfix {i}"));
        send(&t, "sender@origin.test", &["alice@alias.test"], &b).await;
        bodies.push(b);
    }
    assert_eq!(ps.wait_for(n as u64, WAIT).await, n as u64);
    wait_queue_empty(&t).await;
    let dumps = common::wait_until(WAIT, || async {
        let d = ps.dumps();
        (d.len() >= n).then_some(d)
    })
    .await
    .expect("smtp-sink dump files");
    assert_eq!(dumps.len(), n);
    for d in &dumps {
        assert!(
            d.mail_args.starts_with("<alice@alias.test>"),
            "MAIL args {:?}",
            d.mail_args
        );
        assert_eq!(d.rcpt_args, vec!["<bob@dest.test>".to_string()]);
        // smtp-sink stores LF line ends: compare in that form.
        let received = d.message.replace('\n', "\r\n").into_bytes();
        let (dt, _, rest) = split_prepended(&received);
        assert_eq!(dt, "alice@alias.test");
        assert!(
            bodies.contains(&rest),
            "forwarded content differs: {:?}",
            d.message
        );
    }
    assert_eq!(ps.message_count(), n as u64);
}

#[tokio::test]
async fn measure_250_to_arrival_latency() {
    let arrivals: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let a = arrivals.clone();
    let sink = TestSink::builder()
        .data_policy(move |d, n| {
            if let Some(seq) = d.header("X-Seq") {
                a.lock().unwrap().insert(seq, Instant::now());
            }
            Reply::new(250, format!("2.0.0 queued as {n}"))
        })
        .start()
        .await;
    let dns = dns_builder().start().await;
    // TENSO_MEASURE_BIN=path/to/tenso measures another build (e.g. target/release/tenso).
    let cfg = config(&dns, sink.port(), "", FAST_QUEUE, "");
    let bin = std::env::var_os("TENSO_MEASURE_BIN").map(std::path::PathBuf::from);
    let mut t = Tenso::prepare(&cfg);
    if let Some(b) = &bin {
        t = t.with_bin(b);
    }
    t.launch().await;
    add_alias(&t, "alice@alias.test", &["bob@dest.test"], "pool").await;
    let n = 100;
    let mut c = RawSmtp::connect(t.smtp_addr()).await;
    let mut latencies_ms = Vec::with_capacity(n);
    for i in 0..n {
        let body = format!(
            "From: s@origin.test\r\nTo: alice@alias.test\r\nSubject: latency {i}\r\nX-Seq: {i}\r\n\r\nbody {i}\r\n"
        );
        let (code, _) = c
            .send_message("sender@origin.test", &["alice@alias.test"], body.as_bytes())
            .await
            .expect("tenso accepts");
        let got_250 = Instant::now();
        assert_eq!(code, 250);
        let key = i.to_string();
        let arrived = common::wait_until(WAIT, || {
            let arrivals = arrivals.clone();
            let key = key.clone();
            async move { arrivals.lock().unwrap().get(&key).copied() }
        })
        .await
        .unwrap_or_else(|| panic!("message {i} did not arrive\n{}", sink.describe()));
        // Arrival can precede the client's reading of the 250: signed difference.
        let ms = if arrived >= got_250 {
            arrived.duration_since(got_250).as_secs_f64() * 1000.0
        } else {
            -(got_250.duration_since(arrived).as_secs_f64() * 1000.0)
        };
        latencies_ms.push(ms);
    }
    c.quit().await;
    assert_eq!(sink.messages().len(), n);
    latencies_ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = (latencies_ms[n / 2 - 1] + latencies_ms[n / 2]) / 2.0;
    println!(
        "250 -> arrival at sink over {n} messages on loopback ({}): median {median:.2} ms, \
         min {:.2} ms, p90 {:.2} ms, max {:.2} ms",
        bin.as_deref()
            .map_or(common::daemon::tenso_bin(), |b| b.to_path_buf())
            .display(),
        latencies_ms[0],
        latencies_ms[n * 9 / 10],
        latencies_ms[n - 1]
    );
    // The arrival time is taken inside the sink, so the test's 20 ms polling does not
    // inflate the figure.
}
