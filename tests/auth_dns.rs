//! `tenso dns` (issue 5) against a real DNS server on loopback, with
//! `[auth] outbound_ips = ["127.0.0.1"]` and a `[dkim]` key from `tenso dkim keygen`:
//! - a complete zone (MX to the hostname, `v=spf1 ip4:127.0.0.1 ~all`, the DKIM key)
//!   is reported ok, exit status 0;
//! - an alias domain without SPF, or with SPF that does not authorize 127.0.0.1, is
//!   reported: exit status ≠ 0 (with and without `--json`), JSON `ok: false`, and the
//!   SPF problem names the domain and the address;
//! - a published DKIM key that is not the configured one is reported.

mod auth_support;
mod common;

use std::process::Output;

use auth_support::*;
use common::daemon::{Tenso, toml_string};
use common::dns::TestDns;
use serde_json::Value;

fn dns_config(dns: &TestDns, key: &std::path::Path, selector: &str) -> String {
    format!(
        "[dns]\n{}\ntimeout = \"1s\"\n\n[auth]\noutbound_ips = [\"127.0.0.1\"]\n\n\
         [dkim]\ndomain = \"tenso.test\"\nselector = \"{selector}\"\nkey = {}\n",
        dns.resolver_config_toml(),
        toml_string(&key.to_string_lossy())
    )
}

/// Runs `tenso dns ARGS --json`: (exit success, report).
async fn dns_json(t: &Tenso, args: &[&str]) -> (Output, Value) {
    let mut a = vec!["dns"];
    a.extend_from_slice(args);
    a.push("--json");
    let out = t.cli_async(&a).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let v: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "tenso {a:?}: not JSON ({e}): {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, v)
}

/// The check of `kind` for `name`.
fn check<'a>(report: &'a Value, kind: &str, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["kind"] == kind && c["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} check for {name}: {report:#}"))
}

#[tokio::test]
async fn tenso_dns_checks_spf_mx_and_dkim_of_alias_domains() {
    let keydir = tempfile::tempdir().expect("tempdir");
    let (key, txt) = tenso_keygen(keydir.path(), "ed25519", "tenso", "tenso.test").await;
    let dns = TestDns::builder()
        .mx("good.test", 10, "tenso.test")
        .txt("good.test", "v=spf1 ip4:127.0.0.1 ~all")
        .mx("missing.test", 10, "tenso.test")
        .txt("missing.test", "google-site-verification=not-spf")
        .mx("wrong.test", 10, "tenso.test")
        .txt("wrong.test", "v=spf1 ip4:192.0.2.1 -all")
        .txt("tenso._domainkey.tenso.test", &txt)
        .start()
        .await;
    let t = Tenso::start(&dns_config(&dns, &key, "tenso")).await;
    for d in ["good.test", "missing.test", "wrong.test"] {
        cli_ok(&t, &["domain", "add", d]).await;
    }

    // The complete zone is ok.
    let (out, r) = dns_json(&t, &["--domain", "good.test"]).await;
    assert!(
        out.status.success(),
        "exit status {} for a good zone: {r:#}",
        out.status
    );
    assert_eq!(r["ok"], true, "{r:#}");
    assert_eq!(r["outbound_ips"], serde_json::json!(["127.0.0.1"]));
    for (kind, name) in [
        ("MX", "good.test"),
        ("SPF", "good.test"),
        ("DKIM", "tenso._domainkey.tenso.test"),
    ] {
        let c = check(&r, kind, name);
        assert_eq!(c["ok"], true, "{kind} {name}: {c:#}");
        assert!(c["problem"].is_null(), "{c:#}");
    }
    assert!(
        check(&r, "SPF", "good.test")["want"]
            .as_str()
            .unwrap()
            .contains("v=spf1 ip4:127.0.0.1 ~all"),
        "the suggested record starts with ~all (proposal 1a): {r:#}"
    );

    // Missing and wrong SPF: reported, naming the domain and the address.
    let mut table =
        String::from("| domain | SPF published | exit | ok | problem |\n|---|---|---|---|---|\n");
    for (domain, published) in [
        ("missing.test", "(none)"),
        ("wrong.test", "v=spf1 ip4:192.0.2.1 -all"),
    ] {
        let (out, r) = dns_json(&t, &["--domain", domain]).await;
        let c = check(&r, "SPF", domain);
        let problem = c["problem"].as_str().unwrap_or_default().to_string();
        table.push_str(&format!(
            "| {domain} | {published} | {} | {} | {problem} |\n",
            out.status.code().unwrap_or(-1),
            r["ok"]
        ));
        assert_eq!(r["ok"], false, "{r:#}");
        assert_eq!(c["ok"], false, "{c:#}");
        assert!(
            problem.contains(domain) && problem.contains("127.0.0.1"),
            "the SPF problem names {domain} and 127.0.0.1: {problem:?}"
        );
        assert!(
            !out.status.success(),
            "`tenso dns --domain {domain} --json` must exit non-zero when a record is wrong: {r:#}"
        );
        // MX and DKIM of the same run are fine: only SPF is blamed.
        assert_eq!(check(&r, "MX", domain)["ok"], true, "{r:#}");
        assert_eq!(
            check(&r, "DKIM", "tenso._domainkey.tenso.test")["ok"],
            true,
            "{r:#}"
        );
        // The human-readable form fails the same way.
        let human = t.cli_async(&["dns", "--domain", domain]).await;
        let text = String::from_utf8_lossy(&human.stdout);
        assert_eq!(human.status.code(), Some(1), "{text}");
        assert!(text.contains("PROBLEM") && text.contains(domain), "{text}");
    }
    println!("tenso dns, outbound_ips = [127.0.0.1]:\n{table}");

    // All local domains at once: not ok, and exactly the two bad SPF checks.
    let (out, r) = dns_json(&t, &[]).await;
    assert_eq!(r["ok"], false);
    assert!(!out.status.success());
    let bad: Vec<String> = r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] == false)
        .map(|c| {
            format!(
                "{} {}",
                c["kind"].as_str().unwrap(),
                c["name"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(bad, ["SPF missing.test", "SPF wrong.test"], "{r:#}");
}

#[tokio::test]
async fn tenso_dns_reports_a_stale_dkim_key() {
    let keydir = tempfile::tempdir().expect("tempdir");
    let (key, _txt) = tenso_keygen(keydir.path(), "rsa", "stale", "tenso.test").await;
    let (_other, other_txt) = tenso_keygen(keydir.path(), "rsa", "other", "tenso.test").await;
    let dns = TestDns::builder()
        .mx("good.test", 10, "tenso.test")
        .txt("good.test", "v=spf1 ip4:127.0.0.1 ~all")
        // The selector publishes a key, but not the configured one.
        .txt("stale._domainkey.tenso.test", &other_txt)
        .start()
        .await;
    // No daemon: the CLI opens the table itself and runs the same check.
    let t = Tenso::prepare(&dns_config(&dns, &key, "stale"));
    cli_ok(&t, &["domain", "add", "good.test"]).await;
    let (out, r) = dns_json(&t, &[]).await;
    let c = check(&r, "DKIM", "stale._domainkey.tenso.test");
    assert_eq!(c["ok"], false, "{r:#}");
    assert!(
        c["problem"]
            .as_str()
            .unwrap()
            .contains("not the configured"),
        "{c:#}"
    );
    assert_eq!(check(&r, "SPF", "good.test")["ok"], true, "{r:#}");
    assert_eq!(r["ok"], false);
    assert!(!out.status.success(), "exit status {}", out.status);
}
