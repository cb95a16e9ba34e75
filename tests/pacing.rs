//! Outbound pacing (issue 6, part 3): per destination domain (`domain_rate_per_minute`)
//! and per alias (`alias_rate_per_hour`). Over a limit a message waits in the queue
//! (counter `queue.paced`); nothing is lost, nothing floods the destination.

mod abuse_support;
mod common;

use abuse_support::*;
use common::daemon::Tenso;
use common::dns::TestDns;
use common::sink::TestSink;
use common::smtp_client::RawSmtp;
use serde_json::Value;
use std::time::{Duration, Instant};

/// Sends `n` messages to `rcpt` over `sessions` parallel sessions; panics unless all
/// are accepted.
async fn inject(t: &Tenso, rcpt: &str, n: usize, sessions: usize, tag: &str) {
    let mut set = tokio::task::JoinSet::new();
    for s in 0..sessions {
        let addr = t.smtp_addr();
        let rcpt = rcpt.to_string();
        let tag = tag.to_string();
        set.spawn(async move {
            let mut c = RawSmtp::connect_from(ip(2 + s as u8), addr).await;
            for i in (s..n).step_by(sessions) {
                send_ok(&mut c, &rcpt, &format!("{tag}-{i}")).await;
            }
            c.quit().await;
        });
    }
    while let Some(r) = set.join_next().await {
        r.expect("injecting session");
    }
}

async fn queue_list(t: &Tenso) -> Vec<Value> {
    let out = cli_ok(t, &["queue", "list", "--json"]).await;
    match serde_json::from_str(&out) {
        Ok(Value::Array(v)) => v,
        other => panic!("queue list --json: {other:?}\n{out}"),
    }
}

/// 200 messages to one destination domain are spread out by the pacer and all arrive.
///
/// The scenario is 60 messages per minute; at that rate 200 messages take over
/// three minutes. This test is that scenario scaled by 10 to keep CI bounded:
/// `domain_rate_per_minute = 600` (10 per second, burst = rate / 10 = 60) runs the same
/// code path and finishes in about 15 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_messages_to_one_domain_are_spread_and_all_delivered() {
    const N: usize = 200;
    const PER_SEC: f64 = 10.0; // 600 per minute
    const BURST: f64 = 60.0; // a tenth of the per-minute allowance
    let dns = TestDns::builder().start().await;
    let sink = TestSink::start().await;
    let conf = Conf {
        route: Some(sink.addr()),
        // The alias limit is off here: this test isolates the domain limit.
        limits: "domain_rate_per_minute = 600\nalias_rate_per_hour = 0".into(),
        more: "[auth]\nspf = false\ndkim = false\n".into(),
        ..Conf::default()
    };
    let t = relay(&conf, &dns).await;

    // Arrivals sampled every 25 ms while the messages are injected and delivered.
    let start = Instant::now();
    let injector = inject(&t, "alice@alias.test", N, 4, "paced");
    let sampler = async {
        let mut samples: Vec<(f64, usize)> = Vec::new();
        let deadline = start + Duration::from_secs(90);
        loop {
            let n = sink.messages().len();
            samples.push((start.elapsed().as_secs_f64(), n));
            if n >= N || Instant::now() >= deadline {
                return samples;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    };
    let ((), samples) = tokio::join!(injector, sampler);
    let injected_after = samples.iter().find(|s| s.1 > 0).map(|s| s.0);
    let delivered = sink.messages().len();
    assert_eq!(
        delivered,
        N,
        "all {N} must arrive within 90 s; got {delivered}\ncounters: {}",
        counters(&t).await
    );

    // Nothing lost, nothing doubled.
    let msgs = sink.messages();
    let mut tokens: Vec<String> = msgs.iter().filter_map(|m| m.header("Subject")).collect();
    tokens.sort();
    tokens.dedup();
    assert_eq!(tokens.len(), N, "distinct messages at the sink");

    // Spread out: the span from the first to the last arrival is at least the time the
    // bucket needs for everything beyond the burst (with 20 % tolerance).
    let first = samples.iter().find(|s| s.1 >= 1).expect("first").0;
    let last = samples.iter().find(|s| s.1 >= N).expect("last").0;
    let min_span = (N as f64 - BURST) / PER_SEC * 0.8;
    eprintln!(
        "pacing: first arrival {first:.2}s, last {last:.2}s, span {:.2}s (min {min_span:.2}s); \
         first delivered at {injected_after:?}",
        last - first
    );
    assert!(
        last - first >= min_span,
        "arrivals span {:.2}s < {min_span:.2}s: not paced",
        last - first
    );
    // In no window did more arrive than burst + rate × window (+10 for the time a
    // delivery takes between the pacer and the sink).
    for (i, a) in samples.iter().enumerate() {
        for b in &samples[i + 1..] {
            let got = (b.1 - a.1) as f64;
            let allowed = BURST + PER_SEC * (b.0 - a.0) + 10.0;
            assert!(
                got <= allowed,
                "{got} arrivals between {:.2}s and {:.2}s: more than {allowed:.0}",
                a.0,
                b.0
            );
        }
    }
    assert!(wait_counter(&t, "queue", "paced", 1).await > 0);
    let c = counters(&t).await;
    eprintln!("pacing: queue counters {}", c["queue"]);
    assert_eq!(c["queue"]["failed"], 0, "{c}");
    assert_eq!(c["queue"]["delivered"], N as u64, "{c}");
    // And the queue is empty again.
    let left = common::wait_until(WAIT, || async {
        let l = queue_list(&t).await;
        l.is_empty().then_some(())
    })
    .await;
    assert!(
        left.is_some(),
        "queue not empty: {:?}",
        queue_list(&t).await
    );
}

/// A mail-bombed alias defers instead of flooding its owner; other aliases go on.
#[tokio::test]
async fn alias_rate_defers_instead_of_flooding() {
    let dns = TestDns::builder().start().await;
    let sink = TestSink::start().await;
    let conf = Conf {
        route: Some(sink.addr()),
        // 36 per hour: a burst of 3.6, then one every 100 s.
        limits: "alias_rate_per_hour = 36".into(),
        ..Conf::default()
    };
    let t = relay(&conf, &dns).await;
    inject(&t, "alice@alias.test", 8, 2, "bomb").await;
    inject(&t, "bob@alias.test", 2, 1, "bob").await;

    // Alice's burst (3) and both of bob's arrive …
    sink.wait_for(5, WAIT).await;
    // … and then nothing more for alice: her other messages wait in the queue.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let msgs = sink.messages();
    let to = |who: &str| {
        msgs.iter()
            .filter(|m| m.rcpts.iter().any(|r| r.starts_with(who)))
            .count()
    };
    assert_eq!((to("alice@"), to("bob@")), (3, 2), "{}", sink.describe());
    assert!(counter(&t, "queue", "paced").await >= 1);
    let c = counters(&t).await;
    assert_eq!(c["queue"]["failed"], 0, "{c}");
    let waiting = queue_list(&t).await;
    assert_eq!(waiting.len(), 5, "alice's other messages wait: {waiting:?}");
    let text = serde_json::to_string(&waiting).unwrap_or_default();
    assert!(text.contains("alice@dest.test"), "{text}");
    assert!(!text.contains("bob@dest.test"), "{text}");
    // No bounce was generated for the deferred ones.
    assert_eq!(c["bounce"]["dsn_generated"], 0, "{c}");
}

/// A message held back by the destination domain's limit must not use up its alias's
/// hourly allowance: it was not forwarded.
#[tokio::test]
async fn domain_pacing_does_not_use_up_the_alias_allowance() {
    let dns = TestDns::builder().start().await;
    let sink = TestSink::start().await;
    let conf = Conf {
        route: Some(sink.addr()),
        // Alias: 36 per hour (burst 3.6: three messages go at once).
        // Domain: 20 per minute (burst 2, then one every 3 s).
        limits: "alias_rate_per_hour = 36\ndomain_rate_per_minute = 20".into(),
        ..Conf::default()
    };
    let t = relay(&conf, &dns).await;
    inject(&t, "alice@alias.test", 3, 1, "both").await;
    // Two at once, the third after about 3 s when the domain bucket refills. Were the
    // alias charged for the attempt the domain limit held back, the third would wait
    // for the alias bucket (about 40 s more).
    let started = Instant::now();
    sink.wait_for(3, Duration::from_secs(15)).await;
    eprintln!("third message after {:?}", started.elapsed());
    assert!(counter(&t, "queue", "paced").await >= 1);
}
