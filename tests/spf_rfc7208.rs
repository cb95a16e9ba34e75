//! The RFC 7208 SPF test suite (openspf.org release 2014.04, as shipped in pyspf
//! 2.0.14's source distribution; `tests/rfc7208/`, BSD licence beside it) run against
//! tenso's SPF evaluator over a real DNS server on loopback.
//!
//! Each scenario's zone data is loaded into the kit's hickory-server the way the
//! suite's reference driver (pyspf's `testspf.py`) reads it: an `SPF` entry is a type
//! 99 record and, when the name has no `TXT` entry, also a TXT record; `TXT: NONE`
//! means no TXT record; `TIMEOUT` makes every query for the name go unanswered except
//! for the types listed before it. Each test's `host`, `helo` and `mailfrom` go
//! through tenso's MAIL FROM check (the null sender checks postmaster@HELO); the result
//! must be one of the allowed ones and the explanation, where the suite gives one,
//! must be equal (`DEFAULT` = no `exp=` explanation). The test prints N/203 and fails
//! on any miss not in [`ALLOWED_MISSES`] (each with its reason, and the exact result it
//! must then have). It also proves tenso never asks for the retired type 99.

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use common::dns::{TestDns, TestDnsBuilder, ip_rdata, spf_rdata, txt_strings_rdata};
use hickory_server::proto::rr::rdata::{CNAME, MX, PTR};
use hickory_server::proto::rr::{RData, RecordType};
use tenso::dns::Dns;
use tenso::policy::spf::Spf;
use yaml_rust2::{Yaml, YamlLoader};

const SUITE: &str = include_str!("rfc7208/rfc7208-tests.yml");
const TESTS_IN_SUITE: usize = 203;

/// Tests that cannot pass over a real DNS wire, with the result they must give instead
/// and why. `null-text` is checked again in its nearest legal form below.
const ALLOWED_MISSES: &[(&str, &str, &str)] = &[(
    "null-text",
    "temperror",
    "the zone gives null.example.com a TXT record with no character-string; on the wire \
     that is RDLENGTH 0, which RFC 1035 3.3.14 does not allow and hickory's decoder \
     refuses (the whole answer, InvalidEmptyRecord), so the lookup is a DNS error",
)];

/// A TIMEOUT costs one unanswered query: keep it short so the suite runs in seconds.
const QUERY_TIMEOUT: Duration = Duration::from_millis(400);

struct Case {
    scenario: String,
    name: String,
    helo: String,
    host: IpAddr,
    mailfrom: String,
    results: Vec<String>,
    explanation: Option<String>,
}

fn text(y: &Yaml) -> String {
    match y {
        Yaml::String(s) | Yaml::Real(s) => s.clone(),
        Yaml::Integer(i) => i.to_string(),
        other => panic!("expected a scalar, got {other:?}"),
    }
}

fn field<'y>(h: &'y Yaml, key: &str) -> &'y Yaml {
    &h[key]
}

fn cases(doc: &Yaml) -> Vec<Case> {
    let scenario = text(field(doc, "description"));
    let tests = field(doc, "tests").as_hash().expect("tests is a map");
    tests
        .iter()
        .map(|(name, t)| {
            let results = match field(t, "result") {
                Yaml::Array(a) => a.iter().map(text).collect(),
                r => vec![text(r)],
            };
            let host = text(field(t, "host"));
            Case {
                scenario: scenario.clone(),
                name: text(name),
                helo: text(field(t, "helo")),
                host: host
                    .parse()
                    .unwrap_or_else(|e| panic!("host {host:?}: {e}")),
                mailfrom: text(field(t, "mailfrom")),
                results,
                explanation: field(t, "explanation").as_str().map(String::from),
            }
        })
        .collect()
}

/// TXT/SPF data: one string, or a list of strings (possibly empty). YAML `\xNN`
/// escapes are code points; like the reference driver, they go out as UTF-8.
fn strings(v: &Yaml) -> Vec<Vec<u8>> {
    match v {
        Yaml::Array(a) => a.iter().map(|s| text(s).into_bytes()).collect(),
        s => vec![text(s).into_bytes()],
    }
}

/// The zone of one scenario, read as testspf.py's `getrdata` and `DNSLookup` read it.
fn zone(doc: &Yaml) -> TestDnsBuilder {
    let mut b = TestDns::builder();
    let data = field(doc, "zonedata").as_hash().expect("zonedata is a map");
    for (name, entries) in data {
        let name = text(name);
        let entries = entries.as_vec().expect("zone entries are a list");
        let has_txt = entries.iter().any(|e| {
            e.as_hash()
                .is_some_and(|h| h.contains_key(&Yaml::from_str("TXT")))
        });
        let mut answered: Option<Vec<RecordType>> = None;
        let mut seen = Vec::new();
        let mut generated = Vec::new();
        for e in entries {
            if e.as_str() == Some("TIMEOUT") {
                answered.get_or_insert(seen.clone());
                continue;
            }
            let (kind, value) = e.as_hash().and_then(|h| h.front()).expect("entry");
            let kind = text(kind);
            if value.as_str() == Some("NONE") {
                continue;
            }
            let rdata = match kind.as_str() {
                "TXT" => txt_strings_rdata(&strings(value)),
                "SPF" => {
                    if !has_txt {
                        generated.push(txt_strings_rdata(&strings(value)));
                    }
                    spf_rdata(&strings(value))
                }
                "A" | "AAAA" => ip_rdata(&text(value)),
                "MX" => RData::MX(MX::new(
                    value[0].as_i64().expect("MX preference") as u16,
                    common::dns::raw_name(&text(&value[1])),
                )),
                "PTR" => RData::PTR(PTR(common::dns::raw_name(&text(value)))),
                "CNAME" => RData::CNAME(CNAME(common::dns::raw_name(&text(value)))),
                other => panic!("zone entry type {other} at {name}"),
            };
            seen.push(rdata.record_type());
            b = b.record_raw(&name, rdata);
        }
        for g in generated {
            b = b.record_raw(&name, g);
        }
        if let Some(types) = answered {
            b = b.timeout_except(&name, &types);
        }
    }
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc7208_test_suite() {
    let docs = YamlLoader::load_from_str(SUITE).expect("the suite is valid YAML");
    let mut total = 0;
    let mut misses: BTreeMap<String, String> = BTreeMap::new();
    let mut allowed = Vec::new();
    let started = std::time::Instant::now();
    for doc in &docs {
        let dns = zone(doc).start().await;
        let spf = Spf::new(
            Dns::with_memory(dns.resolver_tries(QUERY_TIMEOUT, 1), Duration::ZERO),
            "receiver.test",
        );
        let cases = cases(doc);
        // Independent tests of one scenario run in parallel, as MAIL stages do.
        let runs = cases.iter().map(|c| {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            spf.check_mail_from(c.host, &c.helo, &c.mailfrom, deadline)
        });
        let verdicts = futures_util::future::join_all(runs).await;
        for (c, v) in cases.iter().zip(verdicts) {
            total += 1;
            let got = tenso::policy::spf_name(v.result);
            let exp = v.explanation.as_deref().unwrap_or("DEFAULT");
            let result_ok = c.results.iter().any(|r| r == got);
            let exp_ok = c.explanation.as_deref().is_none_or(|e| e == exp);
            if let Some((_, instead, why)) = ALLOWED_MISSES.iter().find(|(n, ..)| *n == c.name) {
                assert_eq!(
                    got, *instead,
                    "{}: allowed miss, but not as explained: {why}",
                    c.name
                );
                allowed.push(format!(
                    "{} / {}: {got} instead of {:?}: {why}",
                    c.scenario, c.name, c.results
                ));
                continue;
            }
            if !(result_ok && exp_ok) {
                misses.insert(
                    format!("{} / {}", c.scenario, c.name),
                    format!(
                        "host {} helo {:?} mailfrom {:?}: want {:?}{}, got {got} ({:?}){}",
                        c.host,
                        c.helo,
                        c.mailfrom,
                        c.results,
                        c.explanation
                            .as_deref()
                            .map(|e| format!(" exp {e:?}"))
                            .unwrap_or_default(),
                        v.problem,
                        if exp_ok {
                            String::new()
                        } else {
                            format!(", exp {exp:?}")
                        }
                    ),
                );
            }
        }
        let asked_99: Vec<_> = dns
            .queries()
            .into_iter()
            .filter(|(_, t)| *t == RecordType::Unknown(99))
            .collect();
        assert!(
            asked_99.is_empty(),
            "type SPF (99) must not be queried (RFC 7208 3.1): {asked_99:?}"
        );
        dns.shutdown().await;
    }
    let passed = total - misses.len() - allowed.len();
    println!(
        "RFC 7208 test suite: {passed}/{total} passed, {} allowed misses, {} misses ({:.1?})",
        allowed.len(),
        misses.len(),
        started.elapsed()
    );
    for a in &allowed {
        println!("ALLOWED {a}");
    }
    for (k, v) in &misses {
        println!("MISS {k}: {v}");
    }
    assert_eq!(total, TESTS_IN_SUITE, "the whole suite was read");
    assert!(misses.is_empty(), "{} tests missed", misses.len());
}

/// `null-text` in the nearest form a DNS server can send: the SPF record split over two
/// character-strings (joined without a separator, RFC 7208 3.3) beside a TXT record
/// holding one empty string.
#[tokio::test]
async fn null_text_in_its_legal_wire_form() {
    let dns = TestDns::builder()
        .record_raw(
            "null.example.com",
            txt_strings_rdata(&[b"v=spf1 ip4:".to_vec(), b"192.0.2.5 -all".to_vec()]),
        )
        .record_raw("null.example.com", txt_strings_rdata(&[Vec::new()]))
        .start()
        .await;
    let spf = Spf::new(
        Dns::with_memory(dns.resolver_tries(QUERY_TIMEOUT, 1), Duration::ZERO),
        "receiver.test",
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let ip: IpAddr = "192.0.2.5".parse().unwrap();
    let v = spf
        .check_mail_from(ip, "hosed", "silly@null.example.com", deadline)
        .await;
    assert_eq!(v.result, mail_auth::SpfResult::Pass, "{v:?}");
    let other: IpAddr = "192.0.2.6".parse().unwrap();
    let v = spf
        .check_mail_from(other, "hosed", "silly@null.example.com", deadline)
        .await;
    assert_eq!(v.result, mail_auth::SpfResult::Fail, "{v:?}");
}
