//! `tenso dns`: the records each local domain needs, and whether they are published
//! and consistent — above all, whether the SPF record of every alias domain
//! authorizes the forwarder's outbound addresses. Without that, proposal 2's rewrite
//! of MAIL FROM to the alias gains nothing: the destination would see SPF fail.
//!
//! Read-only: it resolves names through the configured resolver and reports.

use crate::config::Config;
use crate::dns::Resolver;
use crate::signing::Signer;
use hickory_resolver::proto::rr::RData;
use mail_auth::SpfResult;
use serde::Serialize;
use std::net::IpAddr;

#[derive(Debug, Serialize)]
pub struct Check {
    /// MX, SPF or DKIM.
    pub kind: &'static str,
    pub name: String,
    /// The record to publish, in zone-file syntax.
    pub want: String,
    /// What DNS has now.
    pub found: Vec<String>,
    pub ok: bool,
    pub problem: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub outbound_ips: Vec<IpAddr>,
    pub checks: Vec<Check>,
    pub ok: bool,
}

async fn txt(resolver: &Resolver, name: &str) -> Vec<String> {
    match resolver.txt_lookup(format!("{name}.")).await {
        Ok(l) => l
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::TXT(t) => Some(
                    t.txt_data
                        .iter()
                        .map(|p| String::from_utf8_lossy(p).into_owned())
                        .collect::<String>(),
                ),
                _ => None,
            })
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn spf_suggestion(ips: &[IpAddr]) -> String {
    let mut v = String::from("v=spf1");
    for ip in ips {
        match ip {
            IpAddr::V4(a) => v.push_str(&format!(" ip4:{a}")),
            IpAddr::V6(a) => v.push_str(&format!(" ip6:{a}")),
        }
    }
    // Proposal 1a: publish softfail first, move to -all once receivers record results.
    v.push_str(" ~all");
    v
}

/// The forwarder's outbound addresses: configured, or the hostname's A/AAAA.
pub async fn outbound_ips(cfg: &Config, resolver: &Resolver) -> Vec<IpAddr> {
    if !cfg.auth.outbound_ips.is_empty() {
        return cfg.auth.outbound_ips.clone();
    }
    match resolver.lookup_ip(format!("{}.", cfg.hostname)).await {
        Ok(l) => l.iter().collect(),
        Err(_) => Vec::new(),
    }
}

/// Whether the key of `s` is what DNS publishes at its selector.
async fn dkim_check(resolver: &Resolver, s: &Signer, which: &str) -> Check {
    let name = format!("{}._domainkey.{}", s.selector, s.domain);
    let found = txt(resolver, &name).await;
    let key_of = |t: &str| -> Option<String> {
        t.split(';')
            .find_map(|kv| kv.trim().strip_prefix("p="))
            .map(|p| p.split_whitespace().collect())
    };
    let ours = key_of(&s.txt);
    let ok = found.iter().any(|f| key_of(f) == ours);
    Check {
        kind: "DKIM",
        name: name.clone(),
        want: format!("{name}. IN TXT \"{}\"", s.txt),
        problem: (!ok).then(|| {
            if found.is_empty() {
                "no DKIM key published".to_string()
            } else {
                format!("the published key is not {which}")
            }
        }),
        found,
        ok,
    }
}

/// The `[[dkim.keys]]` of submitted mail, one check per domain (a key file that
/// cannot be read is a failed check naming it).
async fn domain_keys(cfg: &Config, resolver: &Resolver) -> Vec<Check> {
    let ring = match crate::signing::KeyRing::from_config(&cfg.dkim) {
        Ok(r) => r,
        Err(e) => {
            return vec![Check {
                kind: "DKIM",
                name: "[[dkim.keys]]".into(),
                want: String::new(),
                found: Vec::new(),
                ok: false,
                problem: Some(e),
            }];
        }
    };
    let mut out = Vec::new();
    for s in ring.domains() {
        let which = format!("the [[dkim.keys]] key of {}", s.domain);
        out.push(dkim_check(resolver, s, &which).await);
    }
    out
}

pub async fn check(
    cfg: &Config,
    resolver: &Resolver,
    signer: Option<&Signer>,
    domains: &[String],
) -> Report {
    let spf = super::spf::Spf::new(
        crate::dns::Dns::with_memory(resolver.clone(), std::time::Duration::ZERO),
        cfg.hostname.clone(),
    );
    let ips = outbound_ips(cfg, resolver).await;
    let host = &cfg.hostname;
    let mut checks = Vec::new();
    for d in domains {
        // MX: mail for the alias domain must reach the forwarder.
        let found: Vec<String> = match resolver.mx_lookup(format!("{d}.")).await {
            Ok(l) => l
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::MX(mx) => Some(format!(
                        "{} {}",
                        mx.preference,
                        mx.exchange.to_ascii().trim_end_matches('.')
                    )),
                    _ => None,
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        let ok = found.iter().any(|f| {
            f.split_whitespace()
                .nth(1)
                .is_some_and(|x| x.eq_ignore_ascii_case(host))
        });
        checks.push(Check {
            kind: "MX",
            name: d.clone(),
            want: format!("{d}. IN MX 10 {host}."),
            problem: (!ok).then(|| {
                if found.is_empty() {
                    "no MX record".to_string()
                } else {
                    format!("no MX points to {host}")
                }
            }),
            found,
            ok,
        });
        // SPF: every outbound address must pass for MAIL FROM:<alias@d>.
        let found: Vec<String> = txt(resolver, d)
            .await
            .into_iter()
            .filter(|t| t.to_ascii_lowercase().starts_with("v=spf1"))
            .collect();
        let mut problems = Vec::new();
        if ips.is_empty() {
            problems.push(format!(
                "the forwarder's outbound addresses are unknown: {host} has no A/AAAA record; set [auth] outbound_ips"
            ));
        }
        if found.is_empty() {
            problems.push(format!(
                "no SPF record at {d}; publish \"{}\"",
                spf_suggestion(&ips)
            ));
        } else {
            for ip in &ips {
                // RFC 7208 4.6.4 asks for at least 20 s per evaluation; this is a
                // command, not a transaction, so it can wait that long.
                let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
                let out = spf
                    .check_mail_from(*ip, host, &format!("postmaster@{d}"), deadline)
                    .await;
                if out.result != SpfResult::Pass {
                    problems.push(format!(
                        "SPF of {d} does not authorize the forwarder's address {ip} (result: {}{})",
                        super::spf_name(out.result),
                        out.problem.map(|p| format!(": {p}")).unwrap_or_default()
                    ));
                }
            }
        }
        checks.push(Check {
            kind: "SPF",
            name: d.clone(),
            want: format!("{d}. IN TXT \"{}\"", spf_suggestion(&ips)),
            found,
            ok: problems.is_empty(),
            problem: (!problems.is_empty()).then(|| problems.join("; ")),
        });
    }
    if let Some(s) = signer {
        checks.push(dkim_check(resolver, s, "the configured [dkim] key").await);
    }
    checks.extend(domain_keys(cfg, resolver).await);
    let ok = checks.iter().all(|c| c.ok);
    Report {
        outbound_ips: ips,
        checks,
        ok,
    }
}
