//! Delivery over STARTTLS (issue 3): a sink with an rcgen certificate gets the mail
//! encrypted; a sink whose TLS handshake fails gets it in clear text under
//! `tls = "opportunistic"` and not at all under `tls = "required"` (the message stays
//! queued, deferred); `tls = "none"` never starts TLS; `[delivery.tls_domains]`
//! overrides the mode per destination domain.

mod common;
mod delivery_support;

use common::daemon::Tenso;
use common::dns::TestDns;
use common::sink::TestSink;
use common::tls::TestPki;
use delivery_support::*;

async fn dns() -> TestDns {
    TestDns::builder()
        .mx("dest.test", 10, "mx.dest.test")
        .a("mx.dest.test", "127.0.0.1")
        .start()
        .await
}

async fn tenso(dns: &TestDns, port: u16, tls: &str, more: &str) -> Tenso {
    let t = Tenso::start(&config(
        dns,
        port,
        &format!("tls = \"{tls}\""),
        FAST_QUEUE,
        more,
    ))
    .await;
    add_alias(&t, "alice@alias.test", &["bob@dest.test"], "pool").await;
    t
}

#[tokio::test]
async fn starttls_with_rcgen_certificate() {
    let pki = TestPki::new(&["mx.dest.test", "localhost", "127.0.0.1"]);
    let sink = TestSink::builder()
        .starttls(pki.server_config())
        .start()
        .await;
    let dns = dns().await;
    for mode in ["opportunistic", "required"] {
        let t = tenso(&dns, sink.port(), mode, "").await;
        let before = sink.messages().len();
        let body = simple_message(&format!("tls {mode}"));
        send(&t, "sender@origin.test", &["alice@alias.test"], &body).await;
        let msgs = sink.wait_for(before + 1, WAIT).await;
        let m = &msgs[before];
        assert!(m.tls, "tls = {mode}: delivered in clear text");
        assert_eq!(m.mail_from, "alice@alias.test");
        assert_eq!(split_prepended(&m.data).2, body);
    }
}

#[tokio::test]
async fn tls_none_never_starts_tls() {
    let pki = TestPki::new(&["mx.dest.test"]);
    let sink = TestSink::builder()
        .starttls(pki.server_config())
        .start()
        .await;
    let dns = dns().await;
    let t = tenso(&dns, sink.port(), "none", "").await;
    send(
        &t,
        "sender@origin.test",
        &["alice@alias.test"],
        &simple_message("no tls"),
    )
    .await;
    let msgs = sink.wait_for(1, WAIT).await;
    assert!(!msgs[0].tls, "tls = none, yet STARTTLS was used");
}

#[tokio::test]
async fn broken_tls_falls_back_to_clear_text_when_opportunistic() {
    let sink = TestSink::builder().tls_broken().start().await;
    let dns = dns().await;
    let t = tenso(&dns, sink.port(), "opportunistic", "").await;
    let body = simple_message("broken tls, opportunistic");
    send(&t, "sender@origin.test", &["alice@alias.test"], &body).await;
    let msgs = sink.wait_for(1, WAIT).await;
    assert!(!msgs[0].tls);
    assert_eq!(split_prepended(&msgs[0].data).2, body);
    // The failed handshake used one connection, the clear-text retry another.
    assert!(sink.connections() >= 2, "{}", sink.describe());
    wait_queue_empty(&t).await;
    assert!(pool_messages(&t, "alice@alias.test").is_empty());
}

/// Sends one message under `tls = "required"` to `sink` and checks it stays queued,
/// deferred, after two attempts, with nothing sent in clear text.
async fn stays_queued_under_required(sink: &TestSink) {
    let dns = dns().await;
    let t = tenso(&dns, sink.port(), "required", "").await;
    let id = send(
        &t,
        "sender@origin.test",
        &["alice@alias.test"],
        &simple_message("tls required"),
    )
    .await;
    // Wait for two attempts (retry is 1 s), so the first deferral was really retried.
    let deadline = tokio::time::Instant::now() + WAIT;
    let entry = loop {
        let list = queue_list(&t).await;
        let e = find_in(&list, &id)
            .unwrap_or_else(|| panic!("{id} left the queue: {list:?}\nlog:\n{}", t.log()))
            .clone();
        if min_attempts(&e) >= 2 {
            break e;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no second attempt: {e}\nlog:\n{}",
            t.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let r = &entry["recipients"][0];
    assert_eq!(r["state"], "pending", "{entry}");
    assert_eq!(r["dest"], "bob@dest.test");
    let status = r["status"].as_str().unwrap_or_default();
    assert!(status.starts_with("4."), "not deferred: {entry}");
    assert!(sink.connections() >= 1, "the sink was never tried");
    assert!(
        sink.all_transactions().is_empty(),
        "mail went out in clear text under tls = required:\n{}",
        sink.describe()
    );
    assert!(pool_messages(&t, "alice@alias.test").is_empty());
}

#[tokio::test]
async fn broken_tls_keeps_the_message_queued_when_required() {
    let sink = TestSink::builder().tls_broken().start().await;
    stays_queued_under_required(&sink).await;
}

#[tokio::test]
async fn no_starttls_offered_keeps_the_message_queued_when_required() {
    let sink = TestSink::start().await;
    stays_queued_under_required(&sink).await;
}

#[tokio::test]
async fn per_domain_override_requires_tls_for_one_domain() {
    let sink = TestSink::builder().tls_broken().start().await;
    let dns = TestDns::builder()
        .mx("dest.test", 10, "mx.dest.test")
        .mx("strict.test", 10, "mx.dest.test")
        .a("mx.dest.test", "127.0.0.1")
        .start()
        .await;
    let t = tenso(
        &dns,
        sink.port(),
        "opportunistic",
        "[delivery.tls_domains]\n\"strict.test\" = \"required\"\n",
    )
    .await;
    add_alias(&t, "carol@alias.test", &["carol@strict.test"], "pool").await;
    let strict = send(
        &t,
        "sender@origin.test",
        &["carol@alias.test"],
        &simple_message("strict"),
    )
    .await;
    send(
        &t,
        "sender@origin.test",
        &["alice@alias.test"],
        &simple_message("lenient"),
    )
    .await;
    let msgs = sink.wait_for(1, WAIT).await;
    assert_eq!(msgs[0].rcpts, vec!["bob@dest.test".to_string()]);
    wait_attempted(&t, std::slice::from_ref(&strict)).await;
    assert!(
        sink.messages()
            .iter()
            .all(|m| m.rcpts != vec!["carol@strict.test".to_string()]),
        "{}",
        sink.describe()
    );
}
