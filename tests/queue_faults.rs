//! The queue never keeps or drops a message by accident (issue 11, point 6):
//! - a message whose file can no longer be read is not retried forever: each failed
//!   read counts as a deferred attempt, `max_lifetime` ends it, and the usual DSN goes
//!   through the alias's bounce policy (here: into its pool);
//! - a corrupt `ID.env` falls back to the envelope committed in `ID.msg` (logged,
//!   counted, the bad file kept in the quarantine as evidence) and the message is
//!   delivered; only the envelope file is quarantined, never the message.

mod bounce_support;
mod common;

use bounce_support::*;
use common::daemon::Tenso;
use common::sink::{Reply, TestSink};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

async fn switchable_sink() -> (TestSink, Arc<AtomicBool>) {
    let open = Arc::new(AtomicBool::new(false));
    let o = open.clone();
    let sink = TestSink::builder()
        .rcpt_policy(move |_, _| {
            if o.load(Ordering::SeqCst) {
                Reply::ok()
            } else {
                Reply::new(451, "4.3.0 not now")
            }
        })
        .start()
        .await;
    (sink, open)
}

fn spool_files(t: &Tenso, ext: &str) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(t.data_dir().join("queue"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(ext))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_message_expires_with_a_dsn_through_the_policy() {
    let dns = dns().await;
    let (sink, _open) = switchable_sink().await;
    let cfg =
        config(&dns, sink.port(), "").replace("max_lifetime = \"1h\"", "max_lifetime = \"4s\"");
    let t = Tenso::start(&cfg).await;
    let alias = "lost@alias.test";
    add_alias(&t, alias, &["l@dest.test"], "pool").await;
    send(
        &t,
        "s@origin.test",
        &[alias],
        &original("unreadable@origin.test", alias, "unreadable"),
    )
    .await;
    // First attempt deferred (451); then the file under the queue goes bad.
    wait_counter(&t, "queue", "deferred", 1).await;
    let msg = spool_files(&t, ".msg");
    assert_eq!(msg.len(), 1, "{msg:?}");
    std::fs::write(&msg[0], b"garbage: not a spool file\r\n").unwrap();

    // Read errors count as attempts; the lifetime ends it with a DSN, pooled for the
    // alias (its policy), and the queue is empty — not retried every minute forever.
    let c = wait_counter(&t, "bounce", "dsn_generated", 1).await;
    wait_queue_empty(&t).await;
    assert!(counter(&c, "queue", "read_errors") >= 1, "{c}");
    let pooled = wait_pool(&t, alias, 1).await;
    let report = parse_report(&pooled[0].1);
    assert_eq!(report.rcpt_field("Action").as_deref(), Some("failed"));
    assert_eq!(report.rcpt_field("Status").as_deref(), Some("4.4.7"));
    assert!(
        report
            .rcpt_field("Diagnostic-Code")
            .is_some_and(|d| d.contains("cannot read the queued message")),
        "{report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_envelope_falls_back_to_the_committed_one() {
    let dns = dns().await;
    let (sink, open) = switchable_sink().await;
    let mut t = Tenso::start(&config(&dns, sink.port(), "")).await;
    let alias = "env@alias.test";
    add_alias(&t, alias, &["e@dest.test"], "pool").await;
    send(
        &t,
        "s@origin.test",
        &[alias],
        &original("envfallback@origin.test", alias, "env"),
    )
    .await;
    wait_counter(&t, "queue", "deferred", 1).await;
    t.stop().await;
    let env = spool_files(&t, ".env");
    assert_eq!(env.len(), 1, "the deferral wrote ID.env: {env:?}");
    std::fs::write(&env[0], b"{\"id\": \"trunc").unwrap();

    open.store(true, Ordering::SeqCst);
    t.launch().await;
    wait_queue_empty(&t).await;
    let got: Vec<String> = sink
        .messages()
        .iter()
        .filter_map(|d| d.header("Message-ID"))
        .collect();
    assert_eq!(got, ["<envfallback@origin.test>"]);
    let c = counters(&t).await;
    assert_eq!(counter(&c, "spool", "env_fallbacks"), 1, "{c}");
    // The delivered message's file was kept for reuse, its ID.env removed.
    assert!(counter(&c, "spool", "spares") >= 1, "{c}");
    assert!(spool_files(&t, ".env").is_empty(), "ID.env left behind");
    assert!(
        t.log().contains("corrupt envelope file set aside"),
        "{}",
        t.log()
    );
    let quarantined: Vec<String> = std::fs::read_dir(t.data_dir().join("quarantine"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    assert!(quarantined[0].ends_with(".env"), "{quarantined:?}");
}
