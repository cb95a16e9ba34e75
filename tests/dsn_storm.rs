//! Forged bounce storm (issue 11, point 1): a 600 KB DSN naming 4,000 recipients that
//! quotes a Message-ID the attacker chose in one mail sent through the alias.
//!
//! Proven by counts, never by time (speed is `benches/dsn_storm.rs`): at most
//! `MAX_DSN_GROUPS` (33) field groups are read per report; a report that names no
//! destination the copy went to is not correlated and writes no health; one that
//! names the real destination among thousands writes exactly one health entry, whose
//! count grows with repeats; an alias keeps at most 16 destinations' health; a
//! concurrent session's NOOPs are all answered while the storm is handled. The health
//! text (an escape sequence from the DSN) reaches `tenso user show` escaped, and
//! `--json` gives it back exactly.

mod bounce_support;
mod common;
mod storm_support;

use bounce_support::*;
use common::daemon::Tenso;
use common::sink::TestSink;
use common::smtp_client::RawSmtp;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use storm_support::{forged_dsn, storm_recipients};

const GROUPS_PER_REPORT: u64 = 33;
const STORM_RCPTS: usize = 4000;
const ESC_DIAG: &str = "550 5.1.1 \u{1b}[2J\u{1b}[31mGAME OVER\u{1b}[0m";

/// Sends `msg` with `MAIL FROM:<>` to `rcpt`, while another session keeps sending
/// NOOP; returns how many NOOPs were answered 250 (all of them, or the test fails).
async fn send_with_noops(t: &Tenso, rcpt: &str, msg: &[u8]) -> u64 {
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let addr = t.smtp_addr();
    let (s, a) = (stop.clone(), answered.clone());
    let noops = tokio::spawn(async move {
        let mut c = RawSmtp::connect(addr).await;
        assert_eq!(c.ehlo("noop.test").await.0, 250);
        // Bounded: the storm takes well under the 10,000 round trips this allows.
        for _ in 0..10_000 {
            if s.load(Ordering::SeqCst) {
                break;
            }
            let (code, text) = c.cmd("NOOP").await;
            assert_eq!(code, 250, "NOOP during the storm: {code} {text}");
            a.fetch_add(1, Ordering::SeqCst);
        }
        c.quit().await;
    });
    send(t, "", &[rcpt], msg).await;
    stop.store(true, Ordering::SeqCst);
    noops.await.expect("NOOP session");
    answered.load(Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_dsn_storm_costs_bounded_work() {
    let dns = dns().await;
    let sink = TestSink::start().await;
    let t = Tenso::start(&config(&dns, sink.port(), "")).await;
    let alias = "storm@alias.test";
    add_alias(&t, alias, &["victim@dest.test"], "pool").await;

    // The attacker's one mail through the alias, with a Message-ID it chose.
    let bait_id = "bait-1@attacker.test";
    send(
        &t,
        "attacker@origin.test",
        &[alias],
        &original(bait_id, alias, "bait"),
    )
    .await;
    wait_queue_empty(&t).await;
    assert_eq!(sink.messages().len(), 1);

    // 1. 4,000 strangers: read 33 groups, not correlated, no health.
    let rcpts = storm_recipients(STORM_RCPTS, None);
    let dsn = forged_dsn(alias, bait_id, &rcpts, ESC_DIAG, "storm-1");
    assert!(dsn.len() > 550_000, "{} bytes", dsn.len());
    let noops = send_with_noops(&t, alias, &dsn).await;
    let c = counters(&t).await;
    println!(
        "storm 1: {} bytes, {STORM_RCPTS} groups; groups read {}, NOOPs answered meanwhile {noops}",
        dsn.len(),
        counter(&c, "bounce", "dsn_groups_read")
    );
    assert_eq!(
        counter(&c, "bounce", "dsn_groups_read"),
        GROUPS_PER_REPORT,
        "{c}"
    );
    assert_eq!(counter(&c, "bounce", "dsn_truncated"), 1, "{c}");
    assert_eq!(counter(&c, "bounce", "final_recipient_mismatch"), 1, "{c}");
    assert_eq!(counter(&c, "bounce", "correlated"), 0, "{c}");
    assert_eq!(counter(&c, "bounce", "uncorrelated"), 1, "{c}");
    assert_eq!(counter(&c, "bounce", "health_updates"), 0, "{c}");
    assert!(
        user_show(&t, alias).await["health"]
            .as_array()
            .is_none_or(|h| h.is_empty())
    );

    // 2. The real destination among 4,000 (within the groups read), three times:
    //    correlated each time, one health entry, counted three times.
    let rcpts = storm_recipients(STORM_RCPTS, Some((3, "victim@dest.test")));
    for i in 0..3 {
        let dsn = forged_dsn(alias, bait_id, &rcpts, ESC_DIAG, &format!("storm-2-{i}"));
        send_with_noops(&t, alias, &dsn).await;
    }
    let c = counters(&t).await;
    assert_eq!(
        counter(&c, "bounce", "dsn_groups_read"),
        4 * GROUPS_PER_REPORT,
        "{c}"
    );
    assert_eq!(counter(&c, "bounce", "correlated"), 3, "{c}");
    assert_eq!(counter(&c, "bounce", "health_updates"), 3, "{c}");
    let u = user_show(&t, alias).await;
    let health = u["health"].as_array().cloned().unwrap_or_default();
    assert_eq!(health.len(), 1, "{u}");
    assert_eq!(health[0]["dest"], "victim@dest.test", "{u}");
    assert_eq!(health[0]["count"], 3, "{u}");
    // --json is exact: the escape sequence comes back as sent.
    assert!(
        health[0]["diagnostic"]
            .as_str()
            .is_some_and(|d| d.contains("\u{1b}[2J")),
        "{u}"
    );
    // The human view shows it escaped: no raw control character reaches the terminal.
    let shown = t.cli_ok(&["user", "show", alias]).await;
    assert!(
        !shown.contains('\u{1b}'),
        "raw ESC in `user show`: {shown:?}"
    );
    assert!(shown.contains("\\x1b[2J"), "{shown}");

    // 3. An alias with 20 destinations, all named failing: 16 kept.
    let many = "many@alias.test";
    let dests: Vec<String> = (0..20).map(|i| format!("d{i:02}@dest.test")).collect();
    let refs: Vec<&str> = dests.iter().map(String::as_str).collect();
    add_alias(&t, many, &refs, "pool").await;
    send(
        &t,
        "sender@origin.test",
        &[many],
        &original("bait-2@attacker.test", many, "many"),
    )
    .await;
    wait_queue_empty(&t).await;
    let dsn = forged_dsn(
        many,
        "bait-2@attacker.test",
        &dests,
        "550 5.1.1 no",
        "many-1",
    );
    send(&t, "", &[many], &dsn).await;
    let u = user_show(&t, many).await;
    let health = u["health"].as_array().cloned().unwrap_or_default();
    assert_eq!(health.len(), 16, "{u}");
    let c = counters(&t).await;
    assert_eq!(counter(&c, "bounce", "health_updates"), 3 + 20, "{c}");

    // Every report was stored (policy pool) before its 250.
    assert_eq!(counter(&c, "bounce", "pooled"), 5, "{c}");
    assert!(queue_list(&t).await.is_empty());
}
