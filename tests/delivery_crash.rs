//! Crash safety of the queue (issue 3): tenso is killed with SIGKILL while messages are
//! queued (destination down, or answering 4xx); after a restart with the destination
//! up, every message accepted with 250 is delivered at least once.

mod common;
mod delivery_support;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::daemon::Tenso;
use common::dns::TestDns;
use common::sink::{Reply, TestSink};
use delivery_support::*;

async fn dns() -> TestDns {
    TestDns::builder()
        .mx("dest.test", 10, "mx.dest.test")
        .a("mx.dest.test", "127.0.0.1")
        .start()
        .await
}

/// Subjects of the messages the sink accepted.
fn subjects(sink: &TestSink) -> HashSet<String> {
    sink.messages()
        .iter()
        .filter_map(|m| m.header("Subject"))
        .collect()
}

/// Waits until the sink accepted a message with each subject in `want`.
async fn wait_subjects(sink: &TestSink, want: &HashSet<String>) {
    let got = common::wait_until(WAIT, || async {
        let s = subjects(sink);
        want.is_subset(&s).then_some(())
    })
    .await;
    assert!(
        got.is_some(),
        "missing after restart: {:?}\n{}",
        want.difference(&subjects(sink)).collect::<Vec<_>>(),
        sink.describe()
    );
}

#[tokio::test]
async fn kill9_while_destination_down_then_restart_delivers_every_message() {
    let dns = dns().await;
    let down_port = closed_port();
    let mut t = Tenso::start(&config(&dns, down_port, "", FAST_QUEUE, "")).await;
    add_alias(&t, "alice@alias.test", &["bob@dest.test"], "pool").await;
    let n = 5;
    let mut ids = Vec::new();
    let mut want = HashSet::new();
    for i in 0..n {
        let subject = format!("down {i}");
        ids.push(
            send(
                &t,
                "sender@origin.test",
                &["alice@alias.test"],
                &simple_message(&subject),
            )
            .await,
        );
        want.insert(subject);
    }
    // Each was tried against the dead host and is queued for a retry.
    let list = wait_attempted(&t, &ids).await;
    assert_eq!(list.len(), n, "{list:?}");
    t.kill9().await;

    // The destination comes up (on a new port; the config is pointed at it).
    let sink = TestSink::start().await;
    let cfg_path = t.config_path().to_path_buf();
    let cfg = std::fs::read_to_string(&cfg_path).expect("read config");
    let cfg = cfg.replace(
        &format!("port = {down_port}\n"),
        &format!("port = {}\n", sink.port()),
    );
    assert!(cfg.contains(&format!("port = {}\n", sink.port())));
    std::fs::write(&cfg_path, cfg).expect("rewrite config");
    t.launch().await;

    wait_subjects(&sink, &want).await;
    wait_queue_empty(&t).await;
    for m in sink.messages() {
        assert_eq!(m.mail_from, "alice@alias.test");
        assert_eq!(m.rcpts, vec!["bob@dest.test".to_string()]);
    }
    assert!(pool_messages(&t, "alice@alias.test").is_empty());
}

#[tokio::test]
async fn kill9_while_destination_defers_then_restart_delivers_every_message() {
    let dns = dns().await;
    let accept = Arc::new(AtomicBool::new(false));
    let a = accept.clone();
    let sink = TestSink::builder()
        .rcpt_policy(move |_, _| {
            if a.load(Ordering::SeqCst) {
                Reply::new(250, "2.1.5 OK")
            } else {
                Reply::new(451, "4.3.0 not now")
            }
        })
        .start()
        .await;
    let mut t = Tenso::start(&config(&dns, sink.port(), "", FAST_QUEUE, "")).await;
    add_alias(&t, "alice@alias.test", &["bob@dest.test"], "pool").await;
    let mut want = HashSet::new();
    let mut ids = Vec::new();
    for i in 0..4 {
        let subject = format!("deferred {i}");
        ids.push(
            send(
                &t,
                "sender@origin.test",
                &["alice@alias.test"],
                &simple_message(&subject),
            )
            .await,
        );
        want.insert(subject);
    }
    wait_attempted(&t, &ids).await;
    // Two more, killed right after their 250 (maybe mid-attempt).
    for i in 4..6 {
        let subject = format!("deferred {i}");
        send(
            &t,
            "sender@origin.test",
            &["alice@alias.test"],
            &simple_message(&subject),
        )
        .await;
        want.insert(subject);
    }
    t.kill9().await;
    assert!(sink.messages().is_empty(), "{}", sink.describe());

    accept.store(true, Ordering::SeqCst);
    t.launch().await;
    wait_subjects(&sink, &want).await;
    wait_queue_empty(&t).await;
    assert!(pool_messages(&t, "alice@alias.test").is_empty());
}
