//! Every map is bounded and eviction never forgets live state (issue 11, point 7):
//! - the limiter: while one client holds its connections, 300 other clients (each a
//!   different loopback address) churn through a table of 16; the client's per-IP
//!   limit still holds, and the table stays at its bound plus the connected client;
//! - the delivery maps (per-host limits, dead hosts, per-domain limits, idle sessions)
//!   empty themselves once nothing is in flight.

mod bounce_support;
mod common;

use bounce_support::*;
use common::daemon::Tenso;
use common::sink::TestSink;
use common::smtp_client::RawSmtp;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churning_clients_never_reset_a_connected_clients_limit() {
    let t = Tenso::start(
        "[limits]\ntracked_clients = 16\nmax_connections_per_ip = 2\n\
         connect_rate_per_minute = 1000000\n",
    )
    .await;
    let me = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let mut held = Vec::new();
    for _ in 0..2 {
        let c = RawSmtp::connect_from(me, t.smtp_addr()).await;
        assert_eq!(c.greeting.0, 220);
        held.push(c);
    }
    for i in 0..300u32 {
        let ip = IpAddr::V4(Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8));
        let mut c = RawSmtp::connect_from(ip, t.smtp_addr()).await;
        assert_eq!(c.greeting.0, 220, "client {ip}");
        c.quit().await;
    }
    let c = RawSmtp::connect_from(me, t.smtp_addr()).await;
    assert_eq!(
        c.greeting.0, 421,
        "the third connection of a client holding two: {:?}",
        c.greeting
    );
    let counters = counters(&t).await;
    let tracked = counters["maps"]["limiter_clients"].as_u64().unwrap();
    assert!(tracked <= 17, "limiter holds {tracked} clients: {counters}");
    assert_eq!(
        counter(&counters, "inbound", "refused_per_ip"),
        1,
        "{counters}"
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_maps_empty_once_nothing_is_in_flight() {
    let dns = dns().await;
    let sink = TestSink::start().await;
    let dead = common::closed_port();
    let cfg = config(&dns, sink.port(), "")
        .replace("dead_host_ttl = \"1s\"", "dead_host_ttl = \"2s\"")
        .replace(
            "[delivery]\n",
            &format!("[delivery]\nidle_timeout = \"1s\"\nroutes = {{ \"dead.test\" = \"127.0.0.1:{dead}\" }}\n"),
        );
    let t = Tenso::start(&cfg).await;
    add_alias(&t, "ok@alias.test", &["a@dest.test"], "pool").await;
    add_alias(&t, "dead@alias.test", &["b@dead.test"], "pool").await;
    send(
        &t,
        "s@origin.test",
        &["ok@alias.test"],
        &original("ok@o.test", "ok@alias.test", "ok"),
    )
    .await;
    send(
        &t,
        "s@origin.test",
        &["dead@alias.test"],
        &original("dd@o.test", "dead@alias.test", "dd"),
    )
    .await;
    wait_counter(&t, "queue", "delivered", 1).await;
    wait_counter(&t, "queue", "deferred", 1).await;
    let seen = counters(&t).await["maps"]["delivery"].clone();
    println!("delivery maps while busy: {seen}");
    // The dead message waits (retried every second into a closed port) — remove it,
    // then nothing is in flight and every map must drain.
    let emptied = common::wait_until(Duration::from_secs(20), || async {
        for m in queue_list(&t).await {
            // "being delivered right now" is answered while an attempt runs: try again.
            let _ = t
                .cli_async(&["queue", "remove", m["id"].as_str().unwrap()])
                .await;
        }
        queue_list(&t).await.is_empty().then_some(())
    })
    .await;
    assert!(emptied.is_some(), "could not empty the queue");
    let drained = common::wait_until(Duration::from_secs(20), || async {
        let m = counters(&t).await["maps"]["delivery"].clone();
        let all_zero = ["idle_hosts", "host_limits", "dead_hosts", "domain_limits"]
            .iter()
            .all(|k| m[*k].as_u64() == Some(0));
        all_zero.then_some(m)
    })
    .await;
    assert!(
        drained.is_some(),
        "delivery maps did not drain: {}\n{}",
        counters(&t).await["maps"],
        t.log()
    );
}

/// Spilled messages that must be read back whole (here null-sender mail to an alias,
/// read as a possible bounce coming home) count against `[smtp] whole_message_memory`:
/// each is counted at about 830 KiB of a 1 MiB budget, so three sent at once take
/// turns, and every one is accepted and forwarded whole. A room that was never given back would make the
/// second and third wait out their 60 s and get 451.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_read_back_whole_take_turns_within_the_memory_budget() {
    let dns = dns().await;
    let sink = TestSink::start().await;
    let t = Tenso::start(&config(
        &dns,
        sink.port(),
        "[smtp]\nwhole_message_memory = 1048576\n",
    ))
    .await;
    add_alias(&t, "pool@alias.test", &["p@dest.test"], "pool").await;
    let messages: Vec<Vec<u8>> = (0..3)
        .map(|i| {
            let mut m = original(&format!("big{i}@origin.test"), "pool@alias.test", "big");
            for n in 0..9000 {
                m.extend_from_slice(format!("line {n} of a large bounce {i}\r\n").as_bytes());
            }
            assert!(m.len() > 256 * 1024);
            m
        })
        .collect();
    let sends = messages
        .iter()
        .map(|m| send(&t, "", &["pool@alias.test"], m));
    // `send` panics unless each gets its 250.
    futures_util::future::join_all(sends).await;
    let got = sink.wait_for(3, WAIT).await;
    for m in &messages {
        let tail = &m[m.len() - 200..];
        assert!(
            got.iter().any(|d| d.data.ends_with(tail)),
            "a forwarded copy ends like the message sent"
        );
    }
}
