//! The talk's rate-control slide, inbound (issue 6, part 1): every limit triggered over
//! real TCP, with its SMTP reply, its counter in `tenso status --json` (`inbound.*`),
//! its log line — and the next legitimate client served normally afterwards.
//!
//! Distinct clients are distinct 127.0.0.x source addresses (Linux routes 127/8 to lo).

mod abuse_support;
mod common;

use abuse_support::*;
use common::dns::TestDns;
use common::smtp_client::RawSmtp;
use std::time::Duration;

/// At once: a refusal must come as a reply, not after a silent wait in a queue.
const AT_ONCE: Duration = Duration::from_secs(2);

#[tokio::test]
async fn message_size_at_mail_and_at_data() {
    let dns = TestDns::builder().start().await;
    let conf = Conf {
        smtp: "max_message_size = 2048".into(),
        ..Conf::default()
    };
    let t = relay(&conf, &dns).await;
    let mut c = RawSmtp::connect_from(ip(2), t.smtp_addr()).await;
    let (code, text) = c.ehlo("client.test").await;
    assert_eq!(code, 250, "{text}");
    assert!(
        text.contains("SIZE 2048"),
        "EHLO announces the limit: {text}"
    );

    // Declared too big at MAIL.
    let (code, text) = c.cmd(&format!("MAIL FROM:<{FROM}> SIZE=5000")).await;
    assert_eq!((code, esc(&text)), (552, "5.3.4"), "{text}");
    // At the limit is fine.
    c.expect(&format!("MAIL FROM:<{FROM}> SIZE=2048"), 250)
        .await;
    c.expect("RCPT TO:<alice@alias.test>", 250).await;
    c.expect("DATA", 354).await;
    // Not declared, but too big in DATA.
    let mut big = b"Subject: big\r\n\r\n".to_vec();
    for _ in 0..40 {
        big.extend_from_slice(&[b'x'; 98]);
        big.extend_from_slice(b"\r\n");
    }
    big.extend_from_slice(b".\r\n");
    c.send(&big).await;
    let (code, text) = c.read_reply().await;
    assert_eq!((code, esc(&text)), (552, "5.3.4"), "{text}");

    // Same session: a message under the limit still goes through.
    send_ok(&mut c, "alice@alias.test", "small-after-big").await;
    c.quit().await;

    assert!(counter(&t, "inbound", "refused_data").await >= 1);
    // Both refusals are counted and logged (SIZE at MAIL and the DATA overflow).
    let c = counters(&t).await;
    assert!(
        c["inbound"]["too_big"].as_u64().unwrap_or(0) >= 2,
        "inbound.too_big should count both refusals: {c}"
    );
    expect_log(&t, &["message refused", "552"]).await;
    expect_log(&t, &["SIZE", "5000"]).await;
    legit_client(&t, ip(3), "after-size").await;
}

#[tokio::test]
async fn total_connections_over_the_limit_get_421_at_once() {
    let dns = TestDns::builder().start().await;
    let conf = Conf {
        smtp: "max_connections = 3".into(),
        ..Conf::default()
    };
    let t = relay(&conf, &dns).await;
    let mut held = Vec::new();
    for n in 2..5 {
        let c = RawSmtp::connect_from(ip(n), t.smtp_addr()).await;
        assert_eq!(c.greeting.0, 220, "{:?}", c.greeting);
        held.push(c);
    }
    // The 4th, from yet another address: 421 4.7.0 at once, then closed.
    let mut s = tcp_from(ip(5), t.smtp_addr()).await;
    let mut buf = Vec::new();
    let line = read_line(&mut s, &mut buf, AT_ONCE)
        .await
        .expect("a 421 at once, not a silent queue");
    assert!(line.starts_with("421 4.7.0"), "{line}");
    assert!(
        read_line(&mut s, &mut buf, AT_ONCE).await.is_err(),
        "closed after 421"
    );
    drop(s);
    assert!(counter(&t, "inbound", "busy").await >= 1);
    expect_log(&t, &["too many connections, refusing"]).await;

    // One leaves: the next legitimate client is served (the permit comes back as
    // soon as the server saw the close; poll a bounded number of times).
    let mut first = held.remove(0);
    first.quit().await;
    drop(first);
    let mut served = false;
    for _ in 0..50 {
        let mut c = RawSmtp::connect_from(ip(6), t.smtp_addr()).await;
        if c.greeting.0 == 220 {
            send_ok(&mut c, "alice@alias.test", "after-busy").await;
            c.quit().await;
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        served,
        "no client served after a slot was freed\n{}",
        t.log()
    );
    for mut c in held {
        c.quit().await;
    }
}

#[tokio::test]
async fn connections_per_client_ip() {
    let dns = TestDns::builder().start().await;
    let conf = Conf {
        limits: "max_connections_per_ip = 2".into(),
        ..Conf::default()
    };
    let t = relay(&conf, &dns).await;
    let a = RawSmtp::connect_from(ip(2), t.smtp_addr()).await;
    let b = RawSmtp::connect_from(ip(2), t.smtp_addr()).await;
    assert_eq!((a.greeting.0, b.greeting.0), (220, 220));
    let mut s = tcp_from(ip(2), t.smtp_addr()).await;
    let mut buf = Vec::new();
    let line = read_line(&mut s, &mut buf, AT_ONCE)
        .await
        .expect("421 at once");
    assert!(line.starts_with("421 4.7.0"), "{line}");
    assert!(read_line(&mut s, &mut buf, AT_ONCE).await.is_err());
    drop(s);
    assert!(counter(&t, "inbound", "refused_per_ip").await >= 1);
    expect_log(
        &t,
        &[
            "connection refused",
            "127.0.0.2",
            "too many connections from your address",
        ],
    )
    .await;

    // Another address is not affected at all.
    legit_client(&t, ip(3), "other-ip").await;
    // The same address again once one of its sessions ended.
    let mut a = a;
    a.quit().await;
    drop(a);
    let mut served = false;
    for _ in 0..50 {
        let mut c = RawSmtp::connect_from(ip(2), t.smtp_addr()).await;
        if c.greeting.0 == 220 {
            send_ok(&mut c, "alice@alias.test", "same-ip-later").await;
            c.quit().await;
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served, "{}", t.log());
    let mut b = b;
    b.quit().await;
}

#[tokio::test]
async fn connect_rate_per_client_ip() {
    let dns = TestDns::builder().start().await;
    let conf = Conf {
        limits: "connect_rate_per_minute = 3".into(),
        ..Conf::default()
    };
    let t = relay(&conf, &dns).await;
    for _ in 0..3 {
        let mut c = RawSmtp::connect_from(ip(2), t.smtp_addr()).await;
        assert_eq!(c.greeting.0, 220, "{:?}", c.greeting);
        c.quit().await;
    }
    // The bucket (3 per minute, burst 3) is empty now.
    let mut s = tcp_from(ip(2), t.smtp_addr()).await;
    let mut buf = Vec::new();
    let line = read_line(&mut s, &mut buf, AT_ONCE)
        .await
        .expect("421 at once");
    assert!(line.starts_with("421 4.7.0"), "{line}");
    assert!(read_line(&mut s, &mut buf, AT_ONCE).await.is_err());
    drop(s);
    assert!(counter(&t, "inbound", "refused_rate").await >= 1);
    expect_log(
        &t,
        &["connection refused", "127.0.0.2", "connecting too often"],
    )
    .await;
    legit_client(&t, ip(3), "other-ip-rate").await;
}

#[tokio::test]
async fn recipients_per_message() {
    let dns = TestDns::builder().start().await;
    let conf = Conf {
        smtp: "max_recipients = 2".into(),
        ..Conf::default()
    };
    let t = relay(&conf, &dns).await;
    let mut c = RawSmtp::connect_from(ip(2), t.smtp_addr()).await;
    c.ehlo("client.test").await;
    c.expect(&format!("MAIL FROM:<{FROM}>"), 250).await;
    c.expect("RCPT TO:<alice@alias.test>", 250).await;
    c.expect("RCPT TO:<bob@alias.test>", 250).await;
    let (code, text) = c.cmd("RCPT TO:<postmaster@alias.test>").await;
    assert_eq!((code, esc(&text)), (452, "4.5.3"), "{text}");
    // The transaction goes on with the recipients it has.
    c.expect("DATA", 354).await;
    c.send(b"Subject: two\r\n\r\nbody\r\n.\r\n").await;
    let (code, text) = c.read_reply().await;
    assert_eq!(code, 250, "{text}");
    c.quit().await;
    let cs = counters(&t).await;
    assert!(
        cs["inbound"]["too_many_recipients"].as_u64().unwrap_or(0) >= 1,
        "inbound.too_many_recipients: {cs}"
    );
    expect_log(&t, &["too many recipients", "127.0.0.2"]).await;
    legit_client(&t, ip(3), "after-rcpts").await;
}

#[tokio::test]
async fn messages_per_connection() {
    let dns = TestDns::builder().start().await;
    let conf = Conf {
        limits: "max_messages_per_connection = 2".into(),
        ..Conf::default()
    };
    let t = relay(&conf, &dns).await;
    let mut c = RawSmtp::connect_from(ip(2), t.smtp_addr()).await;
    send_ok(&mut c, "alice@alias.test", "m1").await;
    send_ok(&mut c, "alice@alias.test", "m2").await;
    let (code, text) = c.cmd(&format!("MAIL FROM:<{FROM}>")).await;
    assert_eq!((code, esc(&text)), (421, "4.7.0"), "{text}");
    assert!(c.is_closed().await, "closed after 421");
    assert!(counter(&t, "inbound", "too_many_messages").await >= 1);
    expect_log(&t, &["too many messages in one session", "127.0.0.2"]).await;
    // The same client reconnects and goes on; so does another one.
    legit_client(&t, ip(2), "m3-new-session").await;
    legit_client(&t, ip(3), "other-client").await;
}

#[tokio::test]
async fn errors_per_session() {
    let dns = TestDns::builder().start().await;
    let conf = Conf {
        limits: "max_errors = 3".into(),
        ..Conf::default()
    };
    let t = relay(&conf, &dns).await;
    let mut c = RawSmtp::connect_from(ip(2), t.smtp_addr()).await;
    c.ehlo("client.test").await;
    for _ in 0..2 {
        let (code, _) = c.cmd("FROBNICATE").await;
        assert_eq!(code / 100, 5);
    }
    // The third error: its own reply, then 421 and the close.
    let (code, _) = c.cmd("FROBNICATE").await;
    assert_eq!(code / 100, 5);
    let (code, text) = c.read_reply().await;
    assert_eq!((code, esc(&text)), (421, "4.7.0"), "{text}");
    assert!(c.is_closed().await, "closed after 421");
    assert!(counter(&t, "inbound", "too_many_errors").await >= 1);
    expect_log(&t, &["too many errors, closing", "127.0.0.2"]).await;
    legit_client(&t, ip(2), "after-errors-same-ip").await;
    legit_client(&t, ip(3), "after-errors").await;
}

#[tokio::test]
async fn slow_clients_are_bounded_by_timeouts() {
    let dns = TestDns::builder().start().await;
    let conf = Conf {
        smtp: "command_timeout = \"1s\"\ndata_timeout = \"1s\"".into(),
        ..Conf::default()
    };
    let t = relay(&conf, &dns).await;
    // Silent after the greeting: 421 4.4.2 and the close, bounded by the timeout.
    let mut c = RawSmtp::connect_from(ip(2), t.smtp_addr()).await;
    c.set_timeout(Duration::from_secs(10));
    let (code, text) = c.read_reply().await;
    assert_eq!((code, esc(&text)), (421, "4.4.2"), "{text}");
    assert!(c.is_closed().await);
    // Stalled in the middle of DATA: the same.
    let mut c = RawSmtp::connect_from(ip(2), t.smtp_addr()).await;
    c.set_timeout(Duration::from_secs(10));
    c.ehlo("client.test").await;
    c.expect(&format!("MAIL FROM:<{FROM}>"), 250).await;
    c.expect("RCPT TO:<alice@alias.test>", 250).await;
    c.expect("DATA", 354).await;
    c.send(b"Subject: half\r\n\r\nhalf a mess").await;
    let (code, text) = c.read_reply().await;
    assert_eq!((code, esc(&text)), (421, "4.4.2"), "{text}");
    assert!(c.is_closed().await);
    expect_log(&t, &["timeout", "in_data=true", "127.0.0.2"]).await;
    // Nothing of the stalled message was queued; the next client is served.
    let queued: serde_json::Value =
        serde_json::from_str(&cli_ok(&t, &["queue", "list", "--json"]).await).expect("json");
    assert_eq!(queued, serde_json::json!([]), "nothing queued");
    legit_client(&t, ip(3), "after-timeouts").await;
}
