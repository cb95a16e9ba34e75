//! Outbound TLS that an attacker cannot downgrade (issue 14), over real TLS (rcgen
//! PKI), a real in-process HTTPS server for MTA-STS policies and the test DNS:
//! - reuse by policy: a clear-text session never carries mail for a domain that
//!   needs TLS (the confirmed defect), an unverified one never for `verify`, a
//!   verified one is reused;
//! - `tls = "verify"`: good, expired, wrong-name and self-signed certificates;
//! - MTA-STS enforce/testing/none, mx mismatch, fetch failure with and without a
//!   cached policy;
//! - TLS-RPT counts, and a report mail checked against RFC 8460's schema.

mod common;
mod delivery_support;
mod tls_support;

use common::daemon::{Tenso, assemble_config, toml_string};
use common::dns::{TestDns, TestDnsBuilder};
use common::sink::TestSink;
use delivery_support::*;
use serde_json::Value;
use tls_support::*;

/// `[delivery]` keys: trust `ca`, keep idle sessions long enough to be reused.
fn delivery_keys(ca: &std::path::Path, more: &str) -> String {
    format!(
        "ca_file = {}\nidle_timeout = \"60s\"\n{more}",
        toml_string(&ca.to_string_lossy())
    )
}

/// The queue entry of `id` once it has been attempted, with its first recipient.
async fn attempted(t: &Tenso, id: &str) -> Value {
    let list = wait_attempted(t, &[id.to_string()]).await;
    let e = find_in(&list, id).expect("still queued").clone();
    e["recipients"][0].clone()
}

/// Asserts `id` waits in the queue with a 4.7.x status mentioning `why`.
async fn waits_with(t: &Tenso, id: &str, why: &str) {
    let r = attempted(t, id).await;
    assert_eq!(r["state"], "pending", "{r}\nlog:\n{}", t.log());
    let status = r["status"].as_str().unwrap_or_default();
    assert!(status.starts_with("4.7."), "{r}");
    let last = r["last"].as_str().unwrap_or_default();
    assert!(last.contains(why), "{why:?} not in {r}\nlog:\n{}", t.log());
}

/// `tenso tls report --json [--domain D]`: the policies of today's report for D.
async fn tls_report(t: &Tenso, domain: &str) -> Vec<Value> {
    let v = t
        .cli_json(&["tls", "report", "--json", "--domain", domain])
        .await;
    v["reports"]
        .as_array()
        .and_then(|r| r.first())
        .and_then(|r| r["policies"].as_array().cloned())
        .unwrap_or_default()
}

/// Failure result types (with counts) of one policy of a report.
fn failures(policy: &Value) -> Vec<(String, u64)> {
    policy["failure-details"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| {
            (
                f["result-type"].as_str().unwrap_or_default().to_string(),
                f["failed-session-count"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

fn dns_base() -> TestDnsBuilder {
    TestDns::builder().a("mx.dest.test", "127.0.0.1")
}

#[tokio::test]
async fn clear_text_session_is_not_reused_for_a_domain_that_requires_tls() {
    // The confirmed defect: a session opened for a `none` domain carried a
    // `required` domain's mail in clear text because reuse looked at the address only.
    let sink = TestSink::start().await;
    let dns = dns_base()
        .mx("plain.test", 10, "mx.dest.test")
        .mx("req.test", 10, "mx.dest.test")
        .start()
        .await;
    // One connection per host: the idle clear-text session must be closed to make
    // room for the session req.test needs.
    let more = "idle_timeout = \"60s\"\nmax_per_destination = 1\n[delivery.tls_domains]\n\"plain.test\" = \"none\"\n\"req.test\" = \"required\"\n";
    let t = Tenso::start(&config(&dns, sink.port(), more, FAST_QUEUE, "")).await;
    add_alias(&t, "p@alias.test", &["bob@plain.test"], "pool").await;
    add_alias(&t, "r@alias.test", &["carol@req.test"], "pool").await;
    send(
        &t,
        "s@origin.test",
        &["p@alias.test"],
        &simple_message("plain"),
    )
    .await;
    sink.wait_for(1, WAIT).await;
    let id = send(
        &t,
        "s@origin.test",
        &["r@alias.test"],
        &simple_message("req"),
    )
    .await;
    waits_with(&t, &id, "STARTTLS").await;
    let all = sink.all_transactions();
    assert_eq!(all.len(), 1, "{}", sink.describe());
    assert_eq!(all[0].rcpts, vec!["bob@plain.test".to_string()]);
    assert!(
        sink.connections() >= 2,
        "no new session was tried for req.test"
    );
}

#[tokio::test]
async fn unverified_session_is_not_reused_for_verify_but_verified_one_is() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("tenso test CA");
    let ca_file = ca.write_pem(dir.path());
    let dns = dns_base()
        .mx("opp.test", 10, "mx.dest.test")
        .mx("ver.test", 10, "mx.dest.test")
        .start()
        .await;
    let more = delivery_keys(
        &ca_file,
        "[delivery.tls_domains]\n\"ver.test\" = \"verify\"\n",
    );

    // Self-signed: opportunistic TLS works, verification does not.
    let sink = TestSink::builder()
        .starttls(self_signed(&["mx.dest.test"]).config)
        .start()
        .await;
    let t = Tenso::start(&config(&dns, sink.port(), &more, FAST_QUEUE, "")).await;
    add_alias(&t, "o@alias.test", &["bob@opp.test"], "pool").await;
    add_alias(&t, "v@alias.test", &["carol@ver.test"], "pool").await;
    send(
        &t,
        "s@origin.test",
        &["o@alias.test"],
        &simple_message("opp"),
    )
    .await;
    assert!(sink.wait_for(1, WAIT).await[0].tls);
    let id = send(
        &t,
        "s@origin.test",
        &["v@alias.test"],
        &simple_message("ver"),
    )
    .await;
    waits_with(&t, &id, "not signed by a trusted root").await;
    assert_eq!(sink.all_transactions().len(), 1, "{}", sink.describe());

    // A CA-signed certificate: one verified session carries all three messages.
    let good = TestSink::builder()
        .starttls(ca.leaf(&["mx.dest.test"]).config)
        .start()
        .await;
    let t = Tenso::start(&config(&dns, good.port(), &more, FAST_QUEUE, "")).await;
    add_alias(&t, "v@alias.test", &["carol@ver.test"], "pool").await;
    for i in 0..3 {
        send(
            &t,
            "s@origin.test",
            &["v@alias.test"],
            &simple_message(&format!("ver {i}")),
        )
        .await;
        let got = good.wait_for(i + 1, WAIT).await;
        assert!(got[i].tls);
    }
    assert_eq!(good.connections(), 1, "the verified session was not reused");
    let tls = &t.counters().await["tls"];
    assert_eq!(tls["verify.verified"], 1, "{tls}");
    assert!(
        t.wait_for_log("policy=verify", WAIT).await && t.log().contains("tls=\"TLSv1."),
        "no TLS version and policy in the delivery log:\n{}",
        t.log()
    );
}

#[tokio::test]
async fn verify_accepts_only_a_trusted_certificate_naming_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("tenso test CA");
    let ca_file = ca.write_pem(dir.path());
    let cases = [
        ("good.test", ca.leaf(&["mx.dest.test"]), None),
        (
            "expired.test",
            ca.expired(&["mx.dest.test"]),
            Some(("certificate expired", "certificate-expired")),
        ),
        (
            "wrong.test",
            ca.leaf(&["other.dest.test"]),
            Some(("does not name the host", "certificate-host-mismatch")),
        ),
        (
            "selfsigned.test",
            self_signed(&["mx.dest.test"]),
            Some(("not signed by a trusted root", "certificate-not-trusted")),
        ),
    ];
    let mut sinks = Vec::new();
    let mut routes = String::from("[delivery.routes]\n");
    for (domain, leaf, _) in &cases {
        let sink = TestSink::builder()
            .starttls(leaf.config.clone())
            .start()
            .await;
        routes.push_str(&format!(
            "\"{domain}\" = \"mx.dest.test:{}\"\n",
            sink.port()
        ));
        sinks.push(sink);
    }
    let dns = dns_base().start().await;
    let more = delivery_keys(&ca_file, &format!("tls = \"verify\"\n{routes}"));
    let t = Tenso::start(&config(&dns, common::closed_port(), &more, FAST_QUEUE, "")).await;
    let mut ids = Vec::new();
    for (domain, _, _) in &cases {
        let alias = format!("{}@alias.test", domain.trim_end_matches(".test"));
        add_alias(&t, &alias, &[&format!("rcpt@{domain}")], "pool").await;
        ids.push(send(&t, "s@origin.test", &[&alias], &simple_message(domain)).await);
    }
    for (((domain, _, bad), sink), id) in cases.iter().zip(&sinks).zip(&ids) {
        match bad {
            None => {
                let got = sink.wait_for(1, WAIT).await;
                assert!(got[0].tls, "{domain}");
                let p = tls_report(&t, domain).await;
                assert_eq!(
                    p[0]["summary"]["total-successful-session-count"], 1,
                    "{p:?}"
                );
            }
            Some((why, kind)) => {
                waits_with(&t, id, why).await;
                assert!(
                    sink.all_transactions().is_empty(),
                    "{domain}: {}",
                    sink.describe()
                );
                let p = tls_report(&t, domain).await;
                assert!(
                    failures(&p[0]).iter().any(|(k, _)| k == kind),
                    "{domain}: {p:?}"
                );
            }
        }
    }
}

/// The MTA-STS world of one test: `dest.test` with MX `mx.dest.test`, its
/// `_mta-sts` TXT (id `id`), `mta-sts.dest.test` on 127.0.0.1, and a policy server.
struct Sts {
    dns: TestDns,
    https: PolicyServer,
    ca: Ca,
    dir: tempfile::TempDir,
}

async fn sts_world(id: &str, policy: Option<&str>) -> Sts {
    let ca = Ca::new("tenso test CA");
    let https = PolicyServer::start(ca.leaf(&["mta-sts.dest.test"]).config, policy).await;
    Sts {
        dns: sts_dns(id).start().await,
        https,
        ca,
        dir: tempfile::tempdir().unwrap(),
    }
}

fn sts_dns(id: &str) -> TestDnsBuilder {
    dns_base()
        .mx("dest.test", 10, "mx.dest.test")
        .a("mta-sts.dest.test", "127.0.0.1")
        .txt("_mta-sts.dest.test", &format!("v=STSv1; id={id};"))
        .mx("reports.test", 10, "mx.dest.test")
        .txt(
            "_smtp._tls.dest.test",
            "v=TLSRPTv1; rua=mailto:tlsrpt@reports.test",
        )
}

impl Sts {
    fn config(&self, sink: &TestSink, dns: &TestDns) -> String {
        let ca_file = self.ca.write_pem(self.dir.path());
        let more = delivery_keys(&ca_file, &format!("mta_sts_port = {}\n", self.https.port()));
        config(dns, sink.port(), &more, FAST_QUEUE, "")
    }

    async fn tenso(&self, sink: &TestSink) -> Tenso {
        let t = Tenso::start(&self.config(sink, &self.dns)).await;
        add_alias(&t, "alice@alias.test", &["bob@dest.test"], "pool").await;
        t
    }
}

#[tokio::test]
async fn mta_sts_enforce_delivers_only_to_listed_mx_with_a_valid_certificate() {
    let w = sts_world("1", Some(&sts_policy("enforce", &["mx.dest.test"]))).await;
    let good = TestSink::builder()
        .starttls(w.ca.leaf(&["mx.dest.test"]).config)
        .start()
        .await;
    let t = w.tenso(&good).await;
    for i in 0..2 {
        send(
            &t,
            "s@origin.test",
            &["alice@alias.test"],
            &simple_message(&format!("sts {i}")),
        )
        .await;
        assert!(good.wait_for(i + 1, WAIT).await[i].tls);
    }
    assert!(t.log().contains("policy=mta-sts"), "{}", t.log());
    assert_eq!(w.https.requests(), 1, "the cached policy was fetched again");

    // The same policy and a certificate nobody vouches for: the mail waits.
    let bad = TestSink::builder()
        .starttls(self_signed(&["mx.dest.test"]).config)
        .start()
        .await;
    let t = w.tenso(&bad).await;
    let id = send(
        &t,
        "s@origin.test",
        &["alice@alias.test"],
        &simple_message("bad cert"),
    )
    .await;
    waits_with(&t, &id, "not signed by a trusted root").await;
    assert!(bad.all_transactions().is_empty(), "{}", bad.describe());
}

#[tokio::test]
async fn mta_sts_enforce_with_mx_mismatch_waits() {
    let w = sts_world("1", Some(&sts_policy("enforce", &["*.elsewhere.test"]))).await;
    let sink = TestSink::builder()
        .starttls(w.ca.leaf(&["mx.dest.test"]).config)
        .start()
        .await;
    let t = w.tenso(&sink).await;
    let id = send(
        &t,
        "s@origin.test",
        &["alice@alias.test"],
        &simple_message("mismatch"),
    )
    .await;
    waits_with(&t, &id, "not listed in the domain's MTA-STS policy").await;
    assert_eq!(sink.connections(), 0, "an unlisted MX was contacted");
}

#[tokio::test]
async fn mta_sts_testing_and_none_deliver_as_before_and_testing_reports() {
    for mode in ["testing", "none"] {
        let w = sts_world("1", Some(&sts_policy(mode, &["mx.dest.test"]))).await;
        let sink = TestSink::builder()
            .starttls(self_signed(&["mx.dest.test"]).config)
            .start()
            .await;
        let t = w.tenso(&sink).await;
        send(
            &t,
            "s@origin.test",
            &["alice@alias.test"],
            &simple_message(mode),
        )
        .await;
        assert!(sink.wait_for(1, WAIT).await[0].tls, "{mode}");
        let p = tls_report(&t, "dest.test").await;
        let want = if mode == "testing" {
            "sts"
        } else {
            "no-policy-found"
        };
        assert_eq!(p[0]["policy"]["policy-type"], want, "{mode}: {p:?}");
        if mode == "testing" {
            assert_eq!(
                failures(&p[0]),
                vec![("certificate-not-trusted".into(), 1)],
                "{p:?}"
            );
            assert!(t.log().contains("policy=mta-sts-testing"), "{}", t.log());
        }
    }
}

#[tokio::test]
async fn mta_sts_fetch_failure_without_cache_delivers_as_if_no_policy() {
    let w = sts_world("1", None).await;
    let sink = TestSink::builder()
        .starttls(self_signed(&["mx.dest.test"]).config)
        .start()
        .await;
    let t = w.tenso(&sink).await;
    send(
        &t,
        "s@origin.test",
        &["alice@alias.test"],
        &simple_message("no policy"),
    )
    .await;
    sink.wait_for(1, WAIT).await;
    assert!(w.https.requests() >= 1);
    let p = tls_report(&t, "dest.test").await;
    let all: Vec<(String, u64)> = p.iter().flat_map(failures).collect();
    assert!(
        all.iter().any(|(k, _)| k == "sts-policy-fetch-error"),
        "{p:?}"
    );
}

#[tokio::test]
async fn mta_sts_fetch_failure_keeps_the_cached_policy() {
    // Fetch an enforce policy whose mx does not match: the mail waits.
    let w = sts_world("1", Some(&sts_policy("enforce", &["*.elsewhere.test"]))).await;
    let sink = TestSink::builder()
        .starttls(w.ca.leaf(&["mx.dest.test"]).config)
        .start()
        .await;
    let mut t = w.tenso(&sink).await;
    let first = send(
        &t,
        "s@origin.test",
        &["alice@alias.test"],
        &simple_message("one"),
    )
    .await;
    waits_with(&t, &first, "not listed").await;
    let fetched = w.https.requests();
    // A new policy id is published, and the policy host now fails (404). After a
    // restart (the cache is in the table), the cached policy still rules.
    w.https.set_policy(None);
    let dns2 = sts_dns("2").start().await;
    t.stop().await;
    std::fs::write(
        t.config_path(),
        assemble_config(t.data_dir(), &w.config(&sink, &dns2)),
    )
    .unwrap();
    t.restart().await;
    t.cli_ok(&["queue", "remove", &first]).await;
    let second = send(
        &t,
        "s@origin.test",
        &["alice@alias.test"],
        &simple_message("two"),
    )
    .await;
    waits_with(&t, &second, "not listed").await;
    assert!(
        w.https.requests() > fetched,
        "no fetch was tried for the new id"
    );
    assert_eq!(sink.connections(), 0, "{}", sink.describe());
}

#[tokio::test]
async fn tls_report_is_mailed_signed_and_matches_the_rfc_schema() {
    let (pem, txt) = tenso::signing::keygen("ed25519").unwrap();
    let w = sts_world("1", Some(&sts_policy("testing", &["mx.dest.test"]))).await;
    let key = w.dir.path().join("dkim.pem");
    std::fs::write(&key, pem).unwrap();
    let dns = sts_dns("1")
        .txt("rpt._domainkey.tenso.test", &txt)
        .start()
        .await;
    let sink = TestSink::builder()
        .starttls(self_signed(&["mx.dest.test"]).config)
        .start()
        .await;
    let cfg = w.config(&sink, &dns)
        + &format!(
            "\n[dkim]\ndomain = \"tenso.test\"\nselector = \"rpt\"\nkey = {}\n",
            toml_string(&key.to_string_lossy())
        );
    let t = Tenso::start(&cfg).await;
    add_alias(&t, "alice@alias.test", &["bob@dest.test"], "pool").await;
    send(
        &t,
        "s@origin.test",
        &["alice@alias.test"],
        &simple_message("counted"),
    )
    .await;
    sink.wait_for(1, WAIT).await;

    let out = t.cli_ok(&["tls", "report", "--domain", "dest.test"]).await;
    assert!(
        out.contains("dest.test  policy sts  successful 0  failed 1"),
        "{out}"
    );
    assert!(out.contains("certificate-not-trusted"), "{out}");
    let queued = t.cli_json(&["tls", "report", "--send", "--json"]).await;
    assert!(!queued["queued"].as_array().unwrap().is_empty(), "{queued}");
    let msgs = sink.wait_for(2, WAIT).await;
    let report = msgs
        .iter()
        .find(|m| m.rcpts == vec!["tlsrpt@reports.test".to_string()])
        .expect("the report reached the rua address");
    assert_eq!(report.mail_from, "", "reports go out with MAIL FROM:<>");
    let (json, domain) = report_json(&report.data);
    assert_eq!(domain, "dest.test");
    check_schema(&json);
    let p = &json["policies"][0];
    assert_eq!(p["policy"]["policy-type"], "sts");
    assert_eq!(p["policy"]["policy-domain"], "dest.test");
    assert_eq!(p["policy"]["mx-host"], serde_json::json!(["mx.dest.test"]));
    assert_eq!(p["summary"]["total-failure-session-count"], 1);
    assert_eq!(failures(p), vec![("certificate-not-trusted".into(), 1)]);
    let auth = mail_auth::MessageAuthenticator(dns.resolver());
    let msg = mail_auth::AuthenticatedMessage::parse(&report.data).unwrap();
    let dkim = auth.verify_dkim(&msg).await;
    assert!(
        dkim.iter()
            .any(|o| *o.result() == mail_auth::DkimResult::Pass),
        "report not DKIM-signed by tenso: {dkim:?}"
    );
    // Sent: today's count starts again.
    let after = tls_report(&t, "dest.test").await;
    assert!(after.is_empty(), "{after:?}");
}

#[tokio::test]
async fn tenso_dns_suggests_mta_sts_and_tls_rpt_records_for_alias_domains() {
    let dns = TestDns::builder()
        .mx("alias.test", 10, "tenso.test")
        .txt("alias.test", "v=spf1 ip4:127.0.0.1 ~all")
        .txt(
            "_smtp._tls.alias.test",
            "v=TLSRPTv1; rua=mailto:postmaster@alias.test",
        )
        .start()
        .await;
    let cfg = format!(
        "[dns]\n{}\ntimeout = \"2s\"\n\n[auth]\noutbound_ips = [\"127.0.0.1\"]\n",
        dns.resolver_config_toml()
    );
    // No daemon: the CLI runs the same check itself.
    let t = Tenso::prepare(&cfg);
    t.cli_ok(&["domain", "add", "alias.test"]).await;
    let out = t
        .cli_async(&["dns", "--domain", "alias.test", "--json"])
        .await;
    let r: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(
        out.status.success(),
        "optional records must not fail the check: {r:#}"
    );
    let check = |kind: &str| {
        r["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} check: {r:#}"))
            .clone()
    };
    let sts = check("MTA-STS");
    assert!(
        sts["want"]
            .as_str()
            .unwrap()
            .starts_with("_mta-sts.alias.test. IN TXT \"v=STSv1; id="),
        "{sts:#}"
    );
    assert!(sts["problem"].as_str().unwrap().contains("not published"));
    let policy = check("MTA-STS policy");
    assert_eq!(
        policy["name"],
        "https://mta-sts.alias.test/.well-known/mta-sts.txt"
    );
    let text = policy["want"].as_str().unwrap();
    assert!(
        text.contains("mode: testing") && text.contains("mx: tenso.test"),
        "{text}"
    );
    let rpt = check("TLS-RPT");
    assert_eq!(
        rpt["found"],
        serde_json::json!(["v=TLSRPTv1; rua=mailto:postmaster@alias.test"])
    );
    assert!(rpt["problem"].is_null(), "{rpt:#}");
    let human = t.cli_async(&["dns", "--domain", "alias.test"]).await;
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.contains("_mta-sts.alias.test") && text.contains("optional"),
        "{text}"
    );
}
