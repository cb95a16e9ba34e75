//! The talk's reputation lookups in DNS (issue 6, part 4), served by the test DNS server:
//! a DNSBL queried with the reversed client address — listed, not listed, timing out
//! (fail open, logged) — with action `reject` (554 5.7.1 naming the list) or `record`
//! (an `X-Tenso-Reputation:` header on the forwarded copy); and domain ratings like the
//! talk's `"Status: Good"` / `"Rating: 100"` TXT records — good, bad, low, absent.

mod abuse_support;
mod common;

use abuse_support::*;
use common::dns::TestDns;
use common::sink::TestSink;
use common::smtp_client::RawSmtp;
use hickory_server::proto::rr::RecordType;
use std::time::{Duration, Instant};

/// 127.0.0.2 is listed in bl.test (A 127.0.0.2 with a TXT reason); 127.0.0.3 is not.
/// Rating zone rating.test: good.test is good (the talk's two TXT records), bad.test has
/// a bad status, low.test a low rating, absent.test has no record.
async fn lists() -> TestDns {
    TestDns::builder()
        .a("2.0.0.127.bl.test", "127.0.0.2")
        .txt("2.0.0.127.bl.test", "127.0.0.2 is a test spammer")
        .txt("good.test.rating.test", "Status: Good")
        .txt("good.test.rating.test", "Rating: 100")
        .txt("bad.test.rating.test", "Status: Bad")
        .txt("bad.test.rating.test", "Rating: 0")
        .txt("low.test.rating.test", "Status: Good")
        .txt("low.test.rating.test", "Rating: 10")
        .blackhole("slow.test")
        .start()
        .await
}

async fn daemon(
    dns: &TestDns,
    sink: &TestSink,
    reputation: &str,
    dns_extra: &str,
) -> common::daemon::Tenso {
    let conf = Conf {
        route: Some(sink.addr()),
        dns: dns_extra.into(),
        more: format!("[reputation]\n{reputation}\n"),
        ..Conf::default()
    };
    relay(&conf, dns).await
}

/// MAIL from `from` on a fresh session from 127.0.0.`client`: the reply.
async fn mail_reply(t: &common::daemon::Tenso, client: u8, from: &str) -> (u16, String) {
    let mut c = RawSmtp::connect_from(ip(client), t.smtp_addr()).await;
    c.set_timeout(Duration::from_secs(20));
    c.ehlo("client.test").await;
    let r = c.cmd(&format!("MAIL FROM:<{from}>")).await;
    c.quit().await;
    r
}

/// A whole message from `from` via 127.0.0.`client`; panics unless accepted.
async fn send_from(t: &common::daemon::Tenso, client: u8, from: &str, token: &str) {
    let mut c = RawSmtp::connect_from(ip(client), t.smtp_addr()).await;
    c.set_timeout(Duration::from_secs(20));
    let body = format!("Subject: {token}\r\nMessage-ID: <{token}@origin.test>\r\n\r\n{token}\r\n");
    match c
        .send_message(from, &["alice@alias.test"], body.as_bytes())
        .await
    {
        Ok((250, _)) => {}
        other => panic!(
            "{token} from {from} via 127.0.0.{client}: {other:?}\n{}",
            t.log()
        ),
    }
    c.quit().await;
}

/// The forwarded copy carrying `token` (waits for it).
async fn forwarded(sink: &TestSink, token: &str) -> common::sink::Delivered {
    let found = common::wait_until(WAIT, || async {
        sink.messages()
            .into_iter()
            .find(|m| m.text().contains(token))
    })
    .await;
    found.unwrap_or_else(|| panic!("{token} not forwarded:\n{}", sink.describe()))
}

#[tokio::test]
async fn dnsbl_reject_listed_and_not_listed() {
    let dns = lists().await;
    let sink = TestSink::start().await;
    let t = daemon(
        &dns,
        &sink,
        "ip_lists = [{ zone = \"bl.test\", action = \"reject\" }]",
        "",
    )
    .await;

    let (code, text) = mail_reply(&t, 2, FROM).await;
    assert_eq!((code, esc(&text)), (554, "5.7.1"), "{text}");
    assert!(text.contains("bl.test"), "the reply names the list: {text}");
    let asked = dns.query_count("2.0.0.127.bl.test", RecordType::A);
    assert!(asked >= 1);
    assert_eq!(counter(&t, "inbound", "reputation_rejected").await, 1);
    expect_log(&t, &["rejected by reputation list", "127.0.0.2", "bl.test"]).await;
    // Again: still refused, answered from the cache (the record's TTL is 60 s).
    let (code, text) = mail_reply(&t, 2, FROM).await;
    assert_eq!((code, esc(&text)), (554, "5.7.1"), "{text}");
    assert_eq!(
        dns.query_count("2.0.0.127.bl.test", RecordType::A),
        asked,
        "the listing is cached by TTL"
    );

    // Not listed: accepted and forwarded without a reputation header.
    send_from(&t, 3, FROM, "not-listed").await;
    assert!(dns.query_count("3.0.0.127.bl.test", RecordType::A) >= 1);
    let m = forwarded(&sink, "not-listed").await;
    assert_eq!(m.header("X-Tenso-Reputation"), None, "{}", m.text());
    assert_eq!(counter(&t, "inbound", "reputation_rejected").await, 2);
}

#[tokio::test]
async fn dnsbl_record_adds_a_header_to_the_forwarded_copy() {
    let dns = lists().await;
    let sink = TestSink::start().await;
    let t = daemon(
        &dns,
        &sink,
        "ip_lists = [{ zone = \"bl.test\", action = \"record\" }]",
        "",
    )
    .await;

    send_from(&t, 2, FROM, "listed-recorded").await;
    let m = forwarded(&sink, "listed-recorded").await;
    let h = m
        .header("X-Tenso-Reputation")
        .unwrap_or_else(|| panic!("no X-Tenso-Reputation:\n{}", m.text()));
    assert!(h.starts_with("bl.test;"), "{h}");
    assert!(h.contains("test spammer"), "the list's TXT reason: {h}");
    assert!(counter(&t, "inbound", "reputation_recorded").await >= 1);
    assert_eq!(counter(&t, "inbound", "reputation_rejected").await, 0);

    send_from(&t, 3, FROM, "clean-recorded").await;
    let m = forwarded(&sink, "clean-recorded").await;
    assert_eq!(m.header("X-Tenso-Reputation"), None, "{}", m.text());
}

#[tokio::test]
async fn dnsbl_timeout_fails_open() {
    let dns = lists().await;
    let sink = TestSink::start().await;
    let t = daemon(
        &dns,
        &sink,
        "ip_lists = [{ zone = \"slow.test\", action = \"reject\" }]",
        "timeout = \"300ms\"",
    )
    .await;
    let t0 = Instant::now();
    send_from(&t, 2, FROM, "dnsbl-timeout").await;
    let took = t0.elapsed();
    assert!(dns.query_count("2.0.0.127.slow.test", RecordType::A) >= 1);
    expect_log(
        &t,
        &["DNSBL lookup failed; not blocking (fail open)", "slow.test"],
    )
    .await;
    let m = forwarded(&sink, "dnsbl-timeout").await;
    assert_eq!(m.header("X-Tenso-Reputation"), None);
    assert_eq!(counter(&t, "inbound", "reputation_rejected").await, 0);
    eprintln!("message with a timing-out DNSBL accepted after {took:?}");
}

#[tokio::test]
async fn domain_ratings_good_bad_low_absent() {
    let dns = lists().await;
    let sink = TestSink::start().await;
    let t = daemon(
        &dns,
        &sink,
        "domain_ratings = [{ zone = \"rating.test\", action = \"reject\", min_rating = 50 }]",
        "",
    )
    .await;
    for (from, want) in [
        ("s@good.test", 250),
        ("s@bad.test", 554),
        ("s@low.test", 554),
        ("s@absent.test", 250),
    ] {
        let (code, text) = mail_reply(&t, 2, from).await;
        assert_eq!(code, want, "MAIL FROM:<{from}>: {text}");
        if code == 554 {
            assert_eq!(esc(&text), "5.7.1", "{text}");
            assert!(
                text.contains("rating.test"),
                "names the rating zone: {text}"
            );
        }
    }
    assert!(dns.query_count("good.test.rating.test", RecordType::TXT) >= 1);
    assert!(dns.query_count("absent.test.rating.test", RecordType::TXT) >= 1);
    assert_eq!(counter(&t, "inbound", "reputation_rejected").await, 2);
    expect_log(
        &t,
        &["rejected by reputation list", "rating.test", "bad.test"],
    )
    .await;
    // Good and absent mail goes through whole.
    send_from(&t, 3, "s@good.test", "rated-good").await;
    send_from(&t, 3, "s@absent.test", "rated-absent").await;
    for token in ["rated-good", "rated-absent"] {
        let m = forwarded(&sink, token).await;
        assert_eq!(m.header("X-Tenso-Reputation"), None, "{}", m.text());
    }
}

#[tokio::test]
async fn domain_rating_record_marks_bad_senders() {
    let dns = lists().await;
    let sink = TestSink::start().await;
    let t = daemon(
        &dns,
        &sink,
        "domain_ratings = [{ zone = \"rating.test\", action = \"record\" }]",
        "",
    )
    .await;
    send_from(&t, 2, "s@bad.test", "rated-bad-recorded").await;
    send_from(&t, 2, "s@good.test", "rated-good-recorded").await;
    let bad = forwarded(&sink, "rated-bad-recorded").await;
    let h = bad
        .header("X-Tenso-Reputation")
        .unwrap_or_else(|| panic!("no X-Tenso-Reputation:\n{}", bad.text()));
    assert!(h.starts_with("rating.test;"), "{h}");
    assert!(h.contains("bad.test"), "{h}");
    let good = forwarded(&sink, "rated-good-recorded").await;
    assert_eq!(good.header("X-Tenso-Reputation"), None, "{}", good.text());
}

#[tokio::test]
async fn rating_lookup_timeout_fails_open() {
    let dns = lists().await;
    let sink = TestSink::start().await;
    let t = daemon(
        &dns,
        &sink,
        "domain_ratings = [{ zone = \"slow.test\", action = \"reject\" }]",
        "timeout = \"300ms\"",
    )
    .await;
    send_from(&t, 2, "s@bad.test", "rating-timeout").await;
    assert!(dns.query_count("bad.test.slow.test", RecordType::TXT) >= 1);
    expect_log(
        &t,
        &[
            "rating lookup failed; not blocking (fail open)",
            "slow.test",
        ],
    )
    .await;
    forwarded(&sink, "rating-timeout").await;
}
