//! Prometheus metrics: the one registry of the process, its latency histograms and
//! gauges, and the node's health (listening, table reachable).
//!
//! Layer 0, so that every layer can record into it without knowing who reads: the
//! DNS front, the table and rspamd's client time their waits here, the SMTP server
//! and the queue record their latencies, and `control::http` encodes it all for
//! `GET /metrics`. The counters of `tenso status` are **not** copied here: they stay
//! where they are kept (atomics in each service), and [`StatusCollector`] reads the
//! very `tenso status` snapshot at scrape time, so the two can never disagree and a
//! counter added to `tenso status` shows up in `/metrics` without a line here.
//!
//! Must not: block (every record is an atomic add or a short lock), allocate per
//! event, or grow — every metric here has a fixed label set.
//!
//! One process, one daemon: the registry is a process-wide static (as in the
//! Prometheus clients of every language). A CLI in direct mode records into its own
//! copy, which nobody reads.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Instant;

/// What `tenso status` shows under `counters` (the daemon installs it).
pub type StatusFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// Label set of the DNS histogram: who asked.
pub type Purpose = [(&'static str, &'static str); 1];

type HistFamily = Family<Purpose, Histogram, fn() -> Histogram>;

pub struct Metrics {
    /// End of DATA (the final dot read) → the `250` reply (after the spool commit).
    pub smtp_accept: Histogram,
    /// Accepted (the queue id's timestamp) → the next hop's `250`, per recipient.
    pub delivery: Histogram,
    /// DNS lookups, by purpose (`policy`: SPF/DMARC/reputation; `delivery`: MX/A).
    pub dns: HistFamily,
    /// Table lookups at RCPT.
    pub table: Histogram,
    /// One rspamd `checkv2` exchange.
    pub rspamd: Histogram,
    pub inbound_connections: Gauge,
    pub outbound_connections: Gauge,
    pub queue_messages: Gauge,
    pub queue_oldest_seconds: Gauge,
    pub table_reachable: Gauge,
    status: Arc<Mutex<Option<StatusFn>>>,
    registry: Registry,
    listening: AtomicBool,
    table_state: Reachability,
}

fn dns_histogram() -> Histogram {
    // 0.5 ms … 8 s: a cached answer up to a resolver timeout.
    Histogram::new(exponential_buckets(0.0005, 2.0, 15))
}

impl Metrics {
    fn new() -> Metrics {
        let mut m = Metrics {
            // 1 ms … 32 s: the commit's fsyncs dominate.
            smtp_accept: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            // 0.1 s … 4.8 days: first-attempt deliveries and retries alike.
            delivery: Histogram::new(exponential_buckets(0.1, 4.0, 12)),
            dns: Family::new_with_constructor(dns_histogram as fn() -> Histogram),
            // 10 µs … 2.6 s: a cached sled read up to a slow remote store.
            table: Histogram::new(exponential_buckets(0.00001, 4.0, 10)),
            rspamd: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            inbound_connections: Gauge::default(),
            outbound_connections: Gauge::default(),
            queue_messages: Gauge::default(),
            queue_oldest_seconds: Gauge::default(),
            table_reachable: Gauge::default(),
            status: Arc::new(Mutex::new(None)),
            registry: Registry::default(),
            listening: AtomicBool::new(false),
            table_state: Reachability::default(),
        };
        m.table_state.gauge = m.table_reachable.clone();
        m.table_reachable.set(1);
        m.with_registry()
    }

    fn with_registry(mut self) -> Metrics {
        let r = &mut self.registry;
        r.register(
            "tenso_smtp_accept_seconds",
            "End of DATA to the 250 reply (spool commit included)",
            self.smtp_accept.clone(),
        );
        r.register(
            "tenso_delivery_seconds",
            "Message accepted to the next hop's 250, per delivered recipient",
            self.delivery.clone(),
        );
        r.register(
            "tenso_dns_lookup_seconds",
            "DNS lookups by purpose (policy checks, delivery routes)",
            self.dns.clone(),
        );
        r.register(
            "tenso_table_lookup_seconds",
            "Forwarding table lookups at RCPT",
            self.table.clone(),
        );
        r.register(
            "tenso_rspamd_seconds",
            "One rspamd check of a message",
            self.rspamd.clone(),
        );
        let gauges = [
            (
                "tenso_inbound_connections",
                "Open inbound SMTP connections",
                &self.inbound_connections,
            ),
            (
                "tenso_outbound_connections",
                "Open outbound SMTP sessions (active and idle)",
                &self.outbound_connections,
            ),
            (
                "tenso_queue_messages",
                "Messages in the queue",
                &self.queue_messages,
            ),
            (
                "tenso_queue_oldest_seconds",
                "Age of the oldest queued message (0 when empty)",
                &self.queue_oldest_seconds,
            ),
            (
                "tenso_table_reachable",
                "1 when the table's backend answers its probe, else 0",
                &self.table_reachable,
            ),
        ];
        for (name, help, g) in gauges {
            r.register(name, help, g.clone());
        }
        r.register_collector(Box::new(StatusCollector(self.status.clone())));
        self
    }

    /// Installs the `tenso status` counters' source (the daemon, once).
    pub fn set_status(&self, f: StatusFn) {
        *self.status.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
    }

    /// The Prometheus text format (0.0.4) of everything registered.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// The SMTP listeners accept connections (set by the daemon; false while draining).
    pub fn set_listening(&self, on: bool) {
        self.listening.store(on, Ordering::Relaxed);
    }

    /// The hook every table backend feeds (see [`Reachability`]).
    pub fn table_state(&self) -> &Reachability {
        &self.table_state
    }

    /// `GET /health`: Ok when the node listens and its table is reachable, else why not.
    pub fn health(&self) -> Result<(), String> {
        if !self.listening.load(Ordering::Relaxed) {
            return Err("not listening for SMTP".into());
        }
        self.table_state.check()
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static M: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &M
}

/// Seconds since `t`, for a histogram.
pub fn since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

/// Whether the table's backend is reachable, as its backend last reported it.
///
/// A small hook, not a policy: the backend decides what "reachable" means and calls
/// [`Reachability::report`] (sled: a periodic write-and-flush probe, see
/// `table::probe`; a database backend: its connection pool's health). Until the first
/// report the table counts as reachable — it was just opened. Transitions are logged
/// once each way, not on every report.
#[derive(Default)]
pub struct Reachability {
    /// Why the backend is unreachable; None while it is reachable.
    down: Mutex<Option<String>>,
    /// [`Metrics::table_reachable`]: 1 or 0.
    gauge: Gauge,
}

impl Reachability {
    pub fn report(&self, result: Result<(), String>) {
        let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        match (&*down, result) {
            (None, Err(why)) => {
                tracing::error!(error = %why, "table unreachable: /health answers 503");
                *down = Some(why);
            }
            (Some(_), Err(why)) => *down = Some(why),
            (Some(_), Ok(())) => {
                tracing::info!("table reachable again");
                *down = None;
            }
            (None, Ok(())) => {}
        }
        self.gauge.set(i64::from(down.is_none()));
    }

    pub fn check(&self) -> Result<(), String> {
        match &*self.down.lock().unwrap_or_else(|p| p.into_inner()) {
            None => Ok(()),
            Some(why) => Err(format!("table unreachable: {why}")),
        }
    }
}

/// Counts an open connection while alive ([`Metrics::inbound_connections`] or
/// [`Metrics::outbound_connections`]).
#[derive(Debug)]
pub struct Open(&'static Gauge);

impl Open {
    pub fn inbound() -> Open {
        Open::on(&metrics().inbound_connections)
    }

    pub fn outbound() -> Open {
        Open::on(&metrics().outbound_connections)
    }

    fn on(g: &'static Gauge) -> Open {
        g.inc();
        Open(g)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Encodes the `tenso status` counters at scrape time.
///
/// Each numeric leaf `group.name` (nested objects joined with `_`) becomes the counter
/// `tenso_<group>_<name>_total`, with two exceptions: `tls` holds
/// `policy.result` keys and becomes `tenso_tls_sessions_total{policy,result}`, and
/// `maps` holds sizes (not counts of events) and becomes the gauge
/// `tenso_map_entries{map}`.
struct StatusCollector(Arc<Mutex<Option<StatusFn>>>);

impl std::fmt::Debug for StatusCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StatusCollector")
    }
}

impl Collector for StatusCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let f = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(f) = f else { return Ok(()) };
        let status = f();
        let Some(groups) = status.as_object() else {
            return Ok(());
        };
        for (group, v) in groups {
            match group.as_str() {
                "tls" => encode_tls(&mut enc, v)?,
                "maps" => encode_maps(&mut enc, v)?,
                _ => {
                    for (name, n) in leaves(&sanitize(group), v) {
                        let c = ConstCounter::new(n);
                        let full = format!("tenso_{name}");
                        let m = enc.encode_descriptor(
                            &full,
                            &format!("tenso status: {}", name.replacen('_', ".", 1)),
                            None,
                            c.metric_type(),
                        )?;
                        c.encode(m)?;
                    }
                }
            }
        }
        Ok(())
    }
}

fn encode_tls(enc: &mut DescriptorEncoder, v: &serde_json::Value) -> Result<(), std::fmt::Error> {
    let Some(map) = v.as_object() else {
        return Ok(());
    };
    let c = ConstCounter::new(0u64);
    let mut m = enc.encode_descriptor(
        "tenso_tls_sessions",
        "Outbound sessions by TLS policy and result (tenso status: tls)",
        None,
        c.metric_type(),
    )?;
    for (key, n) in map {
        let (policy, result) = key.split_once('.').unwrap_or((key, ""));
        let labels = [("policy", policy), ("result", result)];
        ConstCounter::new(n.as_u64().unwrap_or(0)).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn encode_maps(enc: &mut DescriptorEncoder, v: &serde_json::Value) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(0i64);
    let mut m = enc.encode_descriptor(
        "tenso_map_entries",
        "Entries in the bounded in-memory maps (tenso status: maps)",
        None,
        g.metric_type(),
    )?;
    for (name, n) in leaves("", v) {
        let labels = [("map", name.as_str())];
        ConstGauge::new(n as i64).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Numeric leaves under `prefix`, names joined with `_` (non-name characters → `_`).
fn leaves(prefix: &str, v: &serde_json::Value) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                let name = match prefix {
                    "" => sanitize(k),
                    p => format!("{p}_{}", sanitize(k)),
                };
                out.extend(leaves(&name, x));
            }
        }
        serde_json::Value::Number(n) => {
            if let Some(n) = n.as_u64() {
                out.push((prefix.to_string(), n));
            }
        }
        _ => {}
    }
    out
}

/// A metric-name fragment: `[a-zA-Z0-9_]`, anything else becomes `_`.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_counters_become_total_counters() {
        let m = Metrics::new();
        m.set_status(Arc::new(|| {
            serde_json::json!({
                "inbound": {"accepted": 3, "spam": {"x-y": 1}},
                "tls": {"dane.ok": 2, "opportunistic.plain": 5},
                "maps": {"limiter_clients": 7, "delivery": {"idle_hosts": 1}},
            })
        }));
        let text = m.encode();
        for line in [
            "tenso_inbound_accepted_total 3",
            "tenso_inbound_spam_x_y_total 1",
            "tenso_tls_sessions_total{policy=\"dane\",result=\"ok\"} 2",
            "tenso_tls_sessions_total{policy=\"opportunistic\",result=\"plain\"} 5",
            "tenso_map_entries{map=\"limiter_clients\"} 7",
            "tenso_map_entries{map=\"delivery_idle_hosts\"} 1",
            "# TYPE tenso_inbound_accepted_total counter",
            "# TYPE tenso_map_entries gauge",
            "# TYPE tenso_smtp_accept_seconds histogram",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in:\n{text}"
            );
        }
    }

    #[test]
    fn health_needs_listening_and_a_reachable_table() {
        let m = Metrics::new();
        assert!(m.health().is_err(), "not listening yet");
        m.set_listening(true);
        assert_eq!(m.health(), Ok(()));
        m.table_state().report(Err("probe: disk full".into()));
        assert!(m.health().unwrap_err().contains("disk full"));
        m.table_state().report(Ok(()));
        assert_eq!(m.health(), Ok(()));
    }

    proptest::proptest! {
        /// Whatever names and values `tenso status` holds, each leaf comes out as one
        /// `tenso_<group>_<name>_total <value>` line whose name is a legal metric
        /// name, and every line is a comment or `name[{labels}] value`.
        #[test]
        fn any_status_encodes_to_legal_lines(
            groups in proptest::collection::btree_map(
                "[a-z][a-z0-9_.-]{0,8}",
                proptest::collection::btree_map("[a-zA-Z0-9_. -]{1,8}", proptest::num::u64::ANY, 0..4),
                0..4,
            )
        ) {
            let m = Metrics::new();
            let g2 = groups.clone();
            m.set_status(Arc::new(move || serde_json::json!(g2)));
            let text = m.encode();
            let name = regex_lite_name;
            for line in text.lines().filter(|l| !l.starts_with('#')) {
                let (series, value) = line.rsplit_once(' ').expect("name value");
                let bare = series.split('{').next().unwrap();
                proptest::prop_assert!(name(bare), "bad name in {:?}", line);
                proptest::prop_assert!(value.parse::<f64>().is_ok() || value == "+Inf", "{:?}", line);
            }
            for (g, leaves) in &groups {
                if g == "tls" || g == "maps" {
                    continue;
                }
                for (n, v) in leaves {
                    let want = format!("tenso_{}_{}_total {v}", sanitize(g), sanitize(n));
                    proptest::prop_assert!(text.lines().any(|l| l == want), "{} missing", want);
                }
            }
        }
    }

    /// `[a-zA-Z_:][a-zA-Z0-9_:]*`, the text format's metric name.
    fn regex_lite_name(s: &str) -> bool {
        let mut c = s.chars();
        c.next()
            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
            && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
    }

    #[test]
    fn sanitize_keeps_only_name_characters() {
        assert_eq!(sanitize("dane.ok-1"), "dane_ok_1");
        assert_eq!(sanitize("é"), "_");
    }
}
