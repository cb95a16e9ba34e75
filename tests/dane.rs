//! DANE for SMTP (issue 14, RFC 7672) against a DNSSEC-signed test zone: the zone is
//! signed by hickory-server with a fresh key, tenso validates with that key as its
//! only trust anchor (`[dns] trust_anchor`). Each destination domain is routed to
//! its own sink (so each has its own `_PORT._tcp.HOST` TLSA name):
//! - DANE-EE and DANE-TA records that match: delivered over TLS (the TA case with a
//!   CA that is in no trust store);
//! - records that do not match: the mail waits, nothing is sent;
//! - a TLSA RRset whose signature is broken (bogus): the mail waits;
//! - TLSA records in an unsigned (insecure) zone, or no TLSA at all: DANE does not
//!   apply and the next policy (`tls = "opportunistic"`) does.

mod common;
mod delivery_support;
mod tls_support;

use common::daemon::{Tenso, toml_string};
use common::dnssec::{SignedDns, tlsa_rdata};
use common::sink::TestSink;
use delivery_support::*;
use hickory_resolver::proto::rr::RecordType;
use serde_json::Value;
use tls_support::*;

struct Case {
    domain: &'static str,
    host: &'static str,
    leaf: Leaf,
    /// (usage, selector, matching, data) of the TLSA record; None: no record.
    tlsa: Option<(u8, u8, u8, Vec<u8>)>,
    /// None: delivered; Some(result type): waits, counted as that TLS-RPT failure.
    refused: Option<&'static str>,
}

fn cases() -> Vec<Case> {
    let ca = Ca::new("DANE-only CA");
    let other_ca = Ca::new("another CA");
    let ee = self_signed(&["mx-ee.dest.test"]);
    let ee_data = spki_sha256(&ee.der);
    vec![
        Case {
            domain: "ee.test",
            host: "mx-ee.dest.test",
            leaf: ee,
            tlsa: Some((3, 1, 1, ee_data)),
            refused: None,
        },
        Case {
            domain: "ee-bad.test",
            host: "mx-eebad.dest.test",
            leaf: self_signed(&["mx-eebad.dest.test"]),
            tlsa: Some((3, 1, 1, vec![0x5a; 32])),
            refused: Some("tlsa-invalid"),
        },
        Case {
            domain: "ta.test",
            host: "mx-ta.dest.test",
            leaf: ca.leaf(&["mx-ta.dest.test"]),
            tlsa: Some((2, 0, 1, cert_sha256(&ca.der()))),
            refused: None,
        },
        Case {
            domain: "ta-bad.test",
            host: "mx-tabad.dest.test",
            leaf: ca.leaf(&["mx-tabad.dest.test"]),
            tlsa: Some((2, 0, 1, cert_sha256(&other_ca.der()))),
            refused: Some("tlsa-invalid"),
        },
        Case {
            domain: "bogus.test",
            host: "mx-bogus.dest.test",
            leaf: self_signed(&["mx-bogus.dest.test"]),
            // It would match; its signature does not.
            tlsa: None,
            refused: Some("dnssec-invalid"),
        },
        Case {
            domain: "none.test",
            host: "mx-none.dest.test",
            leaf: self_signed(&["mx-none.dest.test"]),
            tlsa: None,
            refused: None,
        },
        Case {
            domain: "insecure.test",
            host: "mx.insecure.test",
            leaf: self_signed(&["mx.insecure.test"]),
            // A record that would not match, in an unsigned zone: ignored.
            tlsa: None,
            refused: None,
        },
    ]
}

/// Today's TLS-RPT policies of `domain`.
async fn report(t: &Tenso, domain: &str) -> Vec<Value> {
    let v = t
        .cli_json(&["tls", "report", "--json", "--domain", domain])
        .await;
    v["reports"][0]["policies"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test]
async fn dane_ee_and_ta_must_match_bogus_waits_insecure_falls_back() {
    let cases = cases();
    let mut sinks = Vec::new();
    for c in &cases {
        sinks.push(
            TestSink::builder()
                .starttls(c.leaf.config.clone())
                .start()
                .await,
        );
    }
    let tlsa_name = |c: &Case, s: &TestSink| format!("_{}._tcp.{}", s.port(), c.host);
    let mut dns = SignedDns::builder();
    for (c, s) in cases.iter().zip(&sinks) {
        if c.host.ends_with("insecure.test") {
            continue;
        }
        dns = dns.a(c.host, "127.0.0.1");
        if let Some((u, sel, m, data)) = &c.tlsa {
            dns = dns.tlsa(&tlsa_name(c, s), *u, *sel, *m, data.clone());
        }
    }
    let (bogus, bogus_sink) = cases
        .iter()
        .zip(&sinks)
        .find(|(c, _)| c.domain == "bogus.test")
        .unwrap();
    let name = tlsa_name(bogus, bogus_sink);
    dns = dns
        .tlsa(&name, 3, 1, 1, spki_sha256(&bogus.leaf.der))
        .bogus(&name, RecordType::TLSA);
    let (insecure, insecure_sink) = cases
        .iter()
        .zip(&sinks)
        .find(|(c, _)| c.domain == "insecure.test")
        .unwrap();
    dns = dns.insecure_zone(
        "insecure.test",
        vec![
            (insecure.host, common::dns::ip_rdata("127.0.0.1")),
            (
                &tlsa_name(insecure, insecure_sink),
                tlsa_rdata(3, 1, 1, vec![0x11; 32]),
            ),
        ],
    );
    let dns = dns.start().await;

    let dir = tempfile::tempdir().unwrap();
    let anchor = dns.write_trust_anchor(dir.path());
    let mut routes = String::from("[delivery.routes]\n");
    for (c, s) in cases.iter().zip(&sinks) {
        routes.push_str(&format!("\"{}\" = \"{}:{}\"\n", c.domain, c.host, s.port()));
    }
    let cfg = format!(
        "[dns]\nnameservers = [\"{}\"]\ntimeout = \"2s\"\ntrust_anchor = {}\n\n\
         [delivery]\ndane = true\nidle_timeout = \"60s\"\nconnect_timeout = \"3s\"\n\
         command_timeout = \"10s\"\ndata_timeout = \"10s\"\n{routes}\n[queue]\n{FAST_QUEUE}\n",
        dns.addr(),
        toml_string(&anchor.to_string_lossy())
    );
    let t = Tenso::start(&cfg).await;
    let mut ids = Vec::new();
    for c in &cases {
        let alias = format!("{}@alias.test", c.domain.replace('.', "-"));
        add_alias(&t, &alias, &[&format!("rcpt@{}", c.domain)], "pool").await;
        ids.push(send(&t, "s@origin.test", &[&alias], &simple_message(c.domain)).await);
    }
    for ((c, s), id) in cases.iter().zip(&sinks).zip(&ids) {
        let p = report(&t, c.domain).await;
        match c.refused {
            None => {
                let got = s.wait_for(1, WAIT).await;
                assert!(got[0].tls, "{}: not over TLS", c.domain);
                let want = if c.tlsa.is_some() {
                    "tlsa"
                } else {
                    "no-policy-found"
                };
                assert_eq!(p[0]["policy"]["policy-type"], want, "{}: {p:?}", c.domain);
            }
            Some(kind) => {
                let list = wait_attempted(&t, std::slice::from_ref(id)).await;
                let r = &find_in(&list, id).expect("queued")["recipients"][0];
                assert_eq!(r["state"], "pending", "{}: {r}", c.domain);
                assert_eq!(r["status"], "4.7.5", "{}: {r}\n{}", c.domain, t.log());
                assert!(
                    s.all_transactions().is_empty(),
                    "{}: {}",
                    c.domain,
                    s.describe()
                );
                let kinds: Vec<&str> = p
                    .iter()
                    .flat_map(|x| x["failure-details"].as_array().cloned().unwrap_or_default())
                    .filter_map(|f| f["result-type"].as_str().map(str::to_string))
                    .map(|k| if k == kind { kind } else { "other" })
                    .collect();
                assert!(kinds.contains(&kind), "{}: {p:?}", c.domain);
            }
        }
    }
    assert!(t.log().contains("policy=dane"), "{}", t.log());
}
