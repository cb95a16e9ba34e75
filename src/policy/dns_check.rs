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
    /// A recommendation (MTA-STS, TLS-RPT): never makes the report fail.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub optional: bool,
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
        optional: false,
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
                optional: false,
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
            optional: false,
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
            optional: false,
        });
        checks.extend(inbound_tls(cfg, resolver, d).await);
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

/// What an alias domain may publish so that senders protect mail to it (its inbound
/// side, which is tenso): an MTA-STS record and policy (RFC 8461) naming the
/// forwarder as MX — `enforce` only with a real certificate in `[tls]`, else
/// `testing` — and a TLS-RPT record (RFC 8460) so senders report failures.
async fn inbound_tls(cfg: &Config, resolver: &Resolver, d: &str) -> Vec<Check> {
    let host = &cfg.hostname;
    let mode = if cfg.tls.cert.is_some() {
        "enforce"
    } else {
        "testing"
    };
    let policy = format!("version: STSv1\nmode: {mode}\nmx: {host}\nmax_age: 604800\n");
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, policy.as_bytes());
    let id: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let optional = |kind, name: String, want: String, found: Vec<String>, missing: String| Check {
        kind,
        problem: found.is_empty().then_some(missing),
        name,
        want,
        found,
        ok: true,
        optional: true,
    };
    let sts = format!("_mta-sts.{d}");
    let rpt = format!("_smtp._tls.{d}");
    let sts_found = txt(resolver, &sts).await;
    let rpt_found = txt(resolver, &rpt).await;
    vec![
        optional(
            "MTA-STS",
            sts.clone(),
            format!("{sts}. IN TXT \"v=STSv1; id={id}\""),
            sts_found
                .into_iter()
                .filter(|t| t.starts_with("v=STSv1"))
                .collect(),
            "not published (optional; change the id whenever the policy changes)".into(),
        ),
        Check {
            kind: "MTA-STS policy",
            name: format!("https://mta-sts.{d}/.well-known/mta-sts.txt"),
            want: policy,
            found: Vec::new(),
            ok: true,
            problem: Some(format!(
                "serve this file (text/plain) at mta-sts.{d} over HTTPS with a certificate valid for that name"
            )),
            optional: true,
        },
        optional(
            "TLS-RPT",
            rpt.clone(),
            format!("{rpt}. IN TXT \"v=TLSRPTv1; rua=mailto:postmaster@{d}\""),
            rpt_found
                .into_iter()
                .filter(|t| t.starts_with("v=TLSRPTv1"))
                .collect(),
            "not published (optional)".into(),
        ),
    ]
}
