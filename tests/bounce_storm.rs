//! Bounce storm (issue 4): 1,000 bounces with `MAIL FROM:<>` to an alias under policy
//! `forward` (2b) whose destination refuses everything. Without the loop rules this is
//! the talk's loop; with them the number of delivery attempts is bounded by
//! `[bounce] forward_rate_per_hour`, the excess is pooled, no message generates another,
//! and the queue drains.
//!
//! The 1,000 bounces go over 10 concurrent sessions of 100 with PIPELINING. The counts are
//! printed (run with `--nocapture`) for the closing note.

mod bounce_support;
mod common;

use bounce_support::*;
use common::daemon::Tenso;
use common::sink::{Reply, TestSink};

const STORM: usize = 1000;
const SESSIONS: usize = 10;
const RATE: u64 = 30;

fn hour_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 3600
}

#[tokio::test]
async fn bounce_storm_is_bounded_and_drains() {
    let dns = dns().await;
    let sink = TestSink::builder()
        .data_policy(|_, _| Reply::new(550, "5.1.1 <victim@dest.test>: user unknown"))
        .start()
        .await;
    let t = Tenso::start(&config(
        &dns,
        sink.port(),
        &format!(
            "[bounce]\nforward_rate_per_hour = {RATE}\n\n\
             [pool]\nmax_messages = {}\nmax_bytes = 104857600\n",
            STORM * 2
        ),
    ))
    .await;
    let alias = "storm@alias.test";
    add_alias(&t, alias, &["victim@dest.test"], "forward").await;

    // Valid-looking DSNs, each unique, about nothing tenso forwarded.
    let msgs: Vec<Vec<u8>> = (0..STORM)
        .map(|i| {
            remote_dsn(&RemoteDsn {
                to: alias,
                envid: Some(&format!("STORM{i:06}")),
                final_rcpt: "victim@dest.test",
                status: "5.1.1",
                diagnostic: "550 5.1.1 <victim@dest.test>: user unknown",
                returned_headers: &format!(
                    "From: someone@origin.test\r\nTo: {alias}\r\nSubject: storm {i}\r\n\
                     Message-ID: <storm-{i}@origin.test>\r\n"
                ),
                token: &format!("storm-dsn-{i}"),
            })
        })
        .collect();

    // The hourly window may roll over during the storm; the bound is per window.
    let first_hour = hour_now();
    let started = std::time::Instant::now();
    let per = STORM.div_ceil(SESSIONS);
    let mut sessions = tokio::task::JoinSet::new();
    for chunk in msgs.chunks(per) {
        let chunk = chunk.to_vec();
        let addr = t.smtp_addr();
        sessions.spawn(async move { send_null_pipelined(addr, alias, &chunk).await });
    }
    while let Some(res) = sessions.join_next().await {
        if let Err(e) = res.expect("session task panicked") {
            panic!("storm session failed: {e}\nlog:\n{}", t.log());
        }
    }
    let sent_in = started.elapsed();
    let windows = hour_now() - first_hour + 1;
    let bound = RATE * windows;

    // Every bounce was handled before its 250: forwarded, pooled or dropped.
    let c = counters(&t).await;
    let forwarded = counter(&c, "bounce", "forwarded");
    let rate_limited = counter(&c, "bounce", "rate_limited");
    assert_eq!(
        forwarded + rate_limited,
        STORM as u64,
        "every bounce is forwarded or rate-limited: {c}"
    );
    assert!(
        forwarded <= bound,
        "forwarded {forwarded} bounces, the limit is {RATE}/h ({windows} window(s)): {c}"
    );
    assert!(
        forwarded >= RATE.min(STORM as u64),
        "the first {RATE} bounces of the hour are forwarded: {c}"
    );

    // Each forwarded bounce is refused once, permanently, and is lost by design.
    wait_counter(&t, "bounce", "lost_by_design", forwarded).await;
    wait_queue_empty(&t).await;
    let settled = started.elapsed();

    let c = counters(&t).await;
    let attempts = settled_transactions(&sink, forwarded).await;
    let txns = sink.all_transactions();
    let pooled = counter(&c, "bounce", "pooled");
    let lost = counter(&c, "bounce", "lost_by_design");
    let expired = counter(&c, "pool", "expired");
    println!(
        "bounce storm: {STORM} bounces sent in {sent_in:?}, settled in {settled:?}; \
         attempts at the destination = {attempts}, pooled = {pooled}, forwarded = {forwarded}, \
         lost_by_design = {lost}, rate_limited = {rate_limited}, pool expired = {expired}, \
         dsn_generated = {}, queue attempts = {}, hour windows = {windows}",
        counter(&c, "bounce", "dsn_generated"),
        counter(&c, "queue", "attempts"),
    );

    // Bounded: one attempt per forwarded bounce, and no more than the limit allows.
    assert_eq!(attempts, forwarded, "{}", sink.describe());
    assert!(attempts <= bound, "{attempts} attempts > {bound}");
    assert_eq!(
        sink.rcpt_attempts("victim@dest.test") as u64,
        forwarded,
        "RCPTs at the destination"
    );
    // No message generates another: only the bounces themselves, all with <>.
    assert!(
        txns.iter()
            .all(|d| d.mail_from.is_empty() && d.rcpts == ["victim@dest.test"]),
        "a non-null or unexpected transaction reached the destination:\n{}",
        sink.describe()
    );
    assert!(txns.iter().all(|d| !d.data_reply.is_positive()));
    // Forwarded backscatter is flagged for the user's filters.
    assert!(
        txns.iter()
            .all(|d| header(&d.data, "X-Tenso-Bounce")
                .is_some_and(|f| f.starts_with("uncorrelated;"))),
        "a forwarded bounce lacks X-Tenso-Bounce: uncorrelated"
    );
    assert_eq!(counter(&c, "bounce", "dsn_generated"), 0, "{c}");
    assert_eq!(counter(&c, "bounce", "no_dsn_null_sender"), 0, "{c}");
    assert_eq!(lost, forwarded, "{c}");
    assert_eq!(counter(&c, "queue", "attempts"), forwarded, "{c}");
    assert_eq!(counter(&c, "queue", "failed"), forwarded, "{c}");
    assert_eq!(counter(&c, "queue", "delivered"), 0, "{c}");
    assert_eq!(counter(&c, "queue", "deferred"), 0, "{c}");
    assert_eq!(counter(&c, "bounce", "uncorrelated"), STORM as u64, "{c}");
    assert_eq!(counter(&c, "inbound", "accepted"), STORM as u64, "{c}");

    // The rest is pooled, every one of them (the pool limits are above the storm).
    assert_eq!(pooled, rate_limited, "{c}");
    assert_eq!(expired, 0, "{c}");
    assert_eq!(pool_files(&t, alias).len() as u64, pooled);
    assert_eq!(pool_list(&t, Some(alias)).await.len() as u64, pooled);
    assert_eq!(user_show(&t, alias).await["pool"], pooled);

    // The queue drained, and stays drained: nothing is left to schedule.
    assert!(queue_list(&t).await.is_empty());
    assert_eq!(sink.transactions(), attempts, "{}", sink.describe());
}
