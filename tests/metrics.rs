//! Prometheus metrics and `/health` (issue 16, item 6), over real TCP against the real
//! binary.
//!
//! `/metrics` is parsed by an independent parser — the Prometheus project's Python
//! client (`python3-prometheus-client`, installed by `.ci/install-test-deps`), which
//! raises on anything outside the text format — and its figures are checked against
//! `tenso status` and against one message taken through the daemon: accepted, queued
//! while the next hop says 451, then delivered. `/health` turns 503 when the table can
//! no longer write (a tmpfs data dir filled up; root needed, skipped otherwise). The
//! endpoint's bounds: an oversized request head gets 431, a silent client is closed.

mod common;
mod delivery_support;
mod tmpfs_support;

use common::daemon::Tenso;
use common::dns::TestDns;
use common::sink::{Reply, TestSink};
use common::wait_until;
use delivery_support::*;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HTTP_DEADLINE: Duration = Duration::from_secs(20);

async fn dns() -> TestDns {
    TestDns::builder()
        .mx("dest.test", 10, "mx.dest.test")
        .a("mx.dest.test", "127.0.0.1")
        .start()
        .await
}

fn metrics_addr(t: &Tenso) -> SocketAddr {
    let text = std::fs::read_to_string(t.data_dir().join("tenso.metrics"))
        .unwrap_or_else(|e| panic!("no tenso.metrics: {e}\n{}", t.log()));
    text.trim().parse().expect("tenso.metrics holds ip:port")
}

/// Sends `request` as is and reads until the server closes: (status, body).
async fn http_raw(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.expect("connect to /metrics");
        s.write_all(request).await.expect("write request");
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("read response");
        out
    };
    let out = tokio::time::timeout(HTTP_DEADLINE, exchange)
        .await
        .expect("the endpoint answers and closes within the deadline");
    let text = String::from_utf8(out).expect("a UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    (status, body.to_string())
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: tenso\r\nConnection: close\r\n\r\n");
    http_raw(addr, req.as_bytes()).await
}

/// Parses the exposition with the Prometheus Python client: sample name with its
/// sorted labels (`name{k="v",...}`) → value. Panics if the parser rejects the text.
fn parse_with_prometheus_client(text: &str) -> BTreeMap<String, f64> {
    const SCRIPT: &str = r##"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        labels = ",".join('%s="%s"' % (k, v) for k, v in sorted(s.labels.items()))
        out[s.name + ("{" + labels + "}" if labels else "")] = s.value
    out["#type " + fam.name] = {"counter": 1, "gauge": 2, "histogram": 3}.get(fam.type, 0)
print(json.dumps(out))
"##;
    let mut child = std::process::Command::new("/usr/bin/python3")
        .args(["-c", SCRIPT])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child.stdin.take().unwrap().write_all_sync(text.as_bytes());
    let out = child.wait_with_output().expect("python3 ends");
    assert!(
        out.status.success(),
        "the Prometheus parser rejected /metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the script prints JSON")
}

trait WriteAllSync {
    fn write_all_sync(self, b: &[u8]);
}

impl WriteAllSync for std::process::ChildStdin {
    fn write_all_sync(mut self, b: &[u8]) {
        std::io::Write::write_all(&mut self, b).expect("feed python3");
    }
}

async fn scrape(addr: SocketAddr) -> BTreeMap<String, f64> {
    let (status, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    parse_with_prometheus_client(&body)
}

fn value(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("{key} missing from /metrics: {:?}", m.keys()))
}

/// Every counter of `tenso status` is in `/metrics` as `tenso_<group>_<name>_total`
/// with the same value (the daemon is at rest: nothing moves between the two reads).
async fn assert_status_matches(t: &Tenso, m: &BTreeMap<String, f64>) {
    let status = t.cli_json(&["status", "--json"]).await;
    let counters = status["counters"].as_object().expect("counters");
    let mut checked = 0;
    for (group, v) in counters {
        if group == "maps" || group == "tls" {
            continue;
        }
        for (name, n) in v.as_object().expect("a group of counters") {
            let key = format!("tenso_{group}_{name}_total");
            assert_eq!(value(m, &key), n.as_f64().unwrap(), "{key}");
            assert_eq!(
                m.get(&format!("#type tenso_{group}_{name}")),
                Some(&1.0),
                "{key} is a counter"
            );
            checked += 1;
        }
    }
    assert!(checked > 40, "only {checked} counters in tenso status?");
}

/// Every metric the Grafana dashboard in deploy/ queries is one tenso serves.
fn assert_dashboard_names_exist(m: &BTreeMap<String, f64>) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/tenso-dashboard.json"
    );
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("JSON");
    let mut names = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("expr");
            for (i, _) in expr.match_indices("tenso_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                names.push(name);
            }
        }
    }
    assert!(names.len() > 20, "{names:?}");
    for n in names {
        assert!(
            m.keys()
                .any(|k| k == &n || k.starts_with(&format!("{n}{{"))),
            "the dashboard queries {n}, which /metrics lacks"
        );
    }
}

#[tokio::test]
async fn metrics_follow_one_message_and_agree_with_status() {
    let dns = dns().await;
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
    let extra = "[metrics]\nlisten = \"127.0.0.1:0\"\n";
    let t = Tenso::start(&config(&dns, sink.port(), "", FAST_QUEUE, extra)).await;
    let addr = metrics_addr(&t);
    add_alias(&t, "alice@alias.test", &["bob@dest.test"], "pool").await;

    let before = scrape(addr).await;
    assert_eq!(value(&before, "tenso_inbound_accepted_total"), 0.0);
    assert_eq!(value(&before, "tenso_smtp_accept_seconds_count"), 0.0);
    assert_eq!(value(&before, "tenso_table_reachable"), 1.0);
    assert_eq!(value(&before, "tenso_queue_messages"), 0.0);
    assert_status_matches(&t, &before).await;

    send(
        &t,
        "sender@origin.test",
        &["alice@alias.test"],
        &simple_message("m"),
    )
    .await;
    // The next hop says 451: the message waits in the queue.
    let queued = wait_until(WAIT, || async {
        let m = scrape(addr).await;
        (value(&m, "tenso_queue_deferred_total") >= 1.0).then_some(m)
    })
    .await
    .expect("the 451 is counted as a deferral");
    assert_eq!(value(&queued, "tenso_inbound_accepted_total"), 1.0);
    assert_eq!(value(&queued, "tenso_queue_messages"), 1.0);
    assert!(value(&queued, "tenso_queue_oldest_seconds") >= 0.0);
    assert_eq!(value(&queued, "tenso_smtp_accept_seconds_count"), 1.0);
    assert!(value(&queued, "tenso_smtp_accept_seconds_sum") > 0.0);
    assert!(value(&queued, "tenso_table_lookup_seconds_count") >= 1.0);
    assert!(
        value(
            &queued,
            "tenso_dns_lookup_seconds_count{purpose=\"delivery\"}"
        ) >= 1.0
    );
    assert_eq!(value(&queued, "tenso_delivery_seconds_count"), 0.0);

    open.store(true, Ordering::SeqCst);
    t.cli_ok(&["queue", "flush"]).await;
    sink.wait_for(1, WAIT).await;
    wait_queue_empty(&t).await;
    let after = scrape(addr).await;
    assert_eq!(value(&after, "tenso_queue_delivered_total"), 1.0);
    assert_eq!(value(&after, "tenso_queue_messages"), 0.0);
    assert_eq!(value(&after, "tenso_queue_oldest_seconds"), 0.0);
    assert_eq!(value(&after, "tenso_delivery_seconds_count"), 1.0);
    // Bucket counts are cumulative: +Inf holds every observation.
    assert_eq!(
        value(&after, "tenso_delivery_seconds_bucket{le=\"+Inf\"}"),
        1.0
    );
    assert!(
        value(
            &after,
            "tenso_tls_sessions_total{policy=\"opportunistic\",result=\"plain\"}"
        ) >= 1.0
    );
    assert_status_matches(&t, &after).await;
    assert_dashboard_names_exist(&after);
    // Connections: the SMTP client has gone (the gauge follows when its task ends).
    let gone = wait_until(WAIT, || async {
        (value(&scrape(addr).await, "tenso_inbound_connections") == 0.0).then_some(())
    })
    .await;
    assert!(gone.is_some(), "tenso_inbound_connections stays above 0");
    assert!(value(&after, "tenso_outbound_connections") >= 0.0);

    assert_eq!(get(addr, "/health").await, (200, "ok\n".into()));
}

#[tokio::test]
async fn endpoint_answers_only_what_it_serves_within_bounds() {
    let dns = dns().await;
    let extra = "[metrics]\nlisten = \"127.0.0.1:0\"\n";
    let t = Tenso::start(&config(&dns, common::closed_port(), "", FAST_QUEUE, extra)).await;
    let addr = metrics_addr(&t);
    assert_eq!(get(addr, "/nothing").await.0, 404);
    let post =
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    assert_eq!(http_raw(addr, post).await.0, 405);
    // HEAD: the head only.
    let head = b"HEAD /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    assert_eq!(http_raw(addr, head).await, (200, String::new()));
    // A head over the bound is refused, not buffered.
    let big = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    assert_eq!(http_raw(addr, big.as_bytes()).await.0, 431);
    // A client that says nothing is closed (header deadline), without an answer.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(HTTP_DEADLINE, idle.read_to_end(&mut buf))
        .await
        .expect("a silent client is closed within the deadline")
        .unwrap_or(0);
    assert!(
        n == 0 || String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 408"),
        "{buf:?}"
    );
    // Still serving.
    assert_eq!(get(addr, "/health").await.0, 200);
}

#[tokio::test]
async fn metrics_are_off_unless_configured() {
    let dns = dns().await;
    let t = Tenso::start(&config(&dns, common::closed_port(), "", FAST_QUEUE, "")).await;
    assert!(!t.data_dir().join("tenso.metrics").exists());
    assert!(!t.log().contains("serving /metrics"), "{}", t.log());
}

/// sled cannot be "down" like a server: what fails is the disk under it. The probe
/// writes and flushes a key; with the data dir's file system full, that fails, and
/// `/health` says 503 with the reason while `tenso_table_reachable` drops to 0.
#[tokio::test]
async fn health_turns_503_when_the_table_cannot_write() {
    let dns = dns().await;
    let extra = "[metrics]\nlisten = \"127.0.0.1:0\"\ntable_probe = \"100ms\"\n";
    let cfg = format!(
        "{}\n[smtp]\nlisten = [\"127.0.0.1:0\"]\nmin_free_space = 0\n",
        config(&dns, common::closed_port(), "", FAST_QUEUE, extra)
    );
    let mut t = Tenso::prepare(&cfg);
    let Some(fs) = tmpfs_support::Tmpfs::mount(t.data_dir(), 24) else {
        return;
    };
    t.launch().await;
    let addr = metrics_addr(&t);
    assert_eq!(get(addr, "/health").await, (200, "ok\n".into()));
    let _filler = fs.fill(0);
    let down = wait_until(WAIT, || async {
        let (status, body) = get(addr, "/health").await;
        (status == 503).then_some(body)
    })
    .await
    .unwrap_or_else(|| panic!("/health stays 200 on a full disk\n{}", t.log()));
    assert!(down.contains("table unreachable"), "{down}");
    assert_eq!(value(&scrape(addr).await, "tenso_table_reachable"), 0.0);
    assert!(t.log().contains("table unreachable"), "{}", t.log());
}
