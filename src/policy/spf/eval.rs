//! check_host() (RFC 7208 §4, §5, §6) over [`Dns`]: record lookup and selection,
//! mechanisms in order, `redirect=`, `exp=`, and the §4.6.4 limits — 10 DNS-querying
//! terms and 2 void lookups per evaluation, 10 MX names per `mx` (more is a
//! permerror), 10 PTR names per `ptr` (the rest ignored).
//!
//! Every lookup ends by the caller's deadline; one that does not answer in time makes
//! the evaluation a `temperror` (§4.4, §5), except where the RFC says to skip it (`ptr`
//! and `%{p}` validation, `exp=`). Lookups that do not depend on each other (the
//! addresses of MX and PTR names) run in parallel.

use super::macros::{self, Values};
use super::record::{self, Context, MacroString, Mechanism, Qualifier, Record};
use crate::dns::{Dns, query_name};
use futures_util::future::{BoxFuture, join_all};
use mail_auth::SpfResult;
use std::net::IpAddr;
use tokio::time::Instant;

/// DNS-querying terms (include, a, mx, ptr, exists, redirect) per evaluation.
pub const MAX_DNS_TERMS: u32 = 10;
/// Lookups answered NXDOMAIN or with no records, per evaluation.
pub const MAX_VOID_LOOKUPS: u32 = 2;
/// MX names an `mx` mechanism may return.
pub const MAX_MX_NAMES: usize = 10;
/// PTR names a `ptr` mechanism (or `%{p}`) looks at.
pub const MAX_PTR_NAMES: usize = 10;

/// What check_host() found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    pub result: SpfResult,
    /// The explanation of a `fail` (from `exp=`), if the domain gave one.
    pub explanation: Option<String>,
    /// Why the result is an error (or none): for logs and `Received-SPF: problem=`.
    pub problem: Option<String>,
    /// The term that decided, as written.
    pub mechanism: Option<String>,
}

impl Evaluation {
    fn of(result: SpfResult) -> Evaluation {
        Evaluation {
            result,
            explanation: None,
            problem: None,
            mechanism: None,
        }
    }

    fn problem(result: SpfResult, problem: String) -> Evaluation {
        Evaluation {
            problem: Some(problem),
            ..Evaluation::of(result)
        }
    }
}

/// Why an evaluation stopped before a mechanism matched.
enum Stop {
    Temp(String),
    Perm(String),
}

impl From<Stop> for Evaluation {
    fn from(s: Stop) -> Evaluation {
        match s {
            Stop::Temp(p) => Evaluation::problem(SpfResult::TempError, p),
            Stop::Perm(p) => Evaluation::problem(SpfResult::PermError, p),
        }
    }
}

/// The state of one evaluation: its inputs, its deadline and the §4.6.4 counters.
pub struct Ctx<'a> {
    pub dns: &'a Dns,
    pub deadline: Instant,
    /// An IPv4-mapped IPv6 client is IPv4 here (§5).
    pub ip: IpAddr,
    /// `<sender>` (§4.1): `local@domain`, its parts, the HELO name and our name.
    sender: String,
    local: String,
    sender_domain: String,
    helo: &'a str,
    receiver: &'a str,
    terms: u32,
    voids: u32,
    /// PTR names of `ip` that resolve back to it (asked once, for `ptr` and `%{p}`).
    validated: Option<Vec<String>>,
}

impl<'a> Ctx<'a> {
    /// `local` empty is "postmaster" (§4.3).
    pub fn new(
        dns: &'a Dns,
        deadline: Instant,
        ip: IpAddr,
        (local, sender_domain): (&str, &str),
        helo: &'a str,
        receiver: &'a str,
    ) -> Ctx<'a> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let local = if local.is_empty() {
            "postmaster"
        } else {
            local
        };
        Ctx {
            dns,
            deadline,
            ip,
            sender: format!("{local}@{sender_domain}"),
            local: local.to_string(),
            sender_domain: sender_domain.to_string(),
            helo,
            receiver,
            terms: 0,
            voids: 0,
            validated: None,
        }
    }

    /// check_host(<ip>, <domain>, <sender>) of §4.
    pub fn check_host(&mut self, domain: String) -> BoxFuture<'_, Evaluation> {
        Box::pin(async move {
            if !valid_domain(&domain) {
                return Evaluation::problem(
                    SpfResult::None,
                    format!("{domain:?} is not a domain SPF can be checked for (RFC 7208 4.3)"),
                );
            }
            let record = match self.record(&domain).await {
                Ok(Some(r)) => r,
                Ok(None) => {
                    return Evaluation::problem(
                        SpfResult::None,
                        format!("no SPF record at {domain}"),
                    );
                }
                Err(stop) => return stop.into(),
            };
            match self.evaluate(&domain, &record).await {
                Ok(e) => e,
                Err(stop) => stop.into(),
            }
        })
    }

    async fn record(&self, domain: &str) -> Result<Option<Record>, Stop> {
        let txts = self
            .dns
            .txt(domain, self.deadline)
            .await
            .map_err(|e| Stop::Temp(e.to_string()))?;
        let selected = record::select(&txts).map_err(|e| Stop::Perm(format!("{domain}: {e}")))?;
        let Some(text) = selected else {
            return Ok(None);
        };
        record::parse(text)
            .map(Some)
            .map_err(|e| Stop::Perm(format!("SPF record of {domain}: {e}")))
    }

    async fn evaluate(&mut self, domain: &str, record: &Record) -> Result<Evaluation, Stop> {
        for d in &record.directives {
            if self.matches(domain, &d.mechanism).await? {
                let result = match d.qualifier {
                    Qualifier::Pass => SpfResult::Pass,
                    Qualifier::Fail => SpfResult::Fail,
                    Qualifier::SoftFail => SpfResult::SoftFail,
                    Qualifier::Neutral => SpfResult::Neutral,
                };
                let explanation = match (&record.exp, result) {
                    (Some(exp), SpfResult::Fail) => self.explain(domain, exp).await,
                    _ => None,
                };
                return Ok(Evaluation {
                    explanation,
                    mechanism: Some(d.text.clone()),
                    ..Evaluation::of(result)
                });
            }
        }
        let Some(spec) = &record.redirect else {
            // §4.7: nothing matched and no redirect.
            return Ok(Evaluation::of(SpfResult::Neutral));
        };
        self.count_term()?;
        let target = self.expand_domain(spec, domain).await;
        if !valid_domain(&target) {
            return Err(Stop::Perm(format!(
                "redirect={target:?} in the SPF record of {domain} is not a domain"
            )));
        }
        let sub = self.check_host(target.clone()).await;
        if sub.result == SpfResult::None {
            return Err(Stop::Perm(format!(
                "redirect={target} in the SPF record of {domain}: no SPF record there (RFC 7208 6.1)"
            )));
        }
        Ok(sub)
    }

    async fn matches(&mut self, domain: &str, m: &Mechanism) -> Result<bool, Stop> {
        if m.queries_dns() {
            self.count_term()?;
        }
        match m {
            Mechanism::All => Ok(true),
            Mechanism::Ip4(net, len) => Ok(in_network(self.ip, IpAddr::V4(*net), *len)),
            Mechanism::Ip6(net, len) => Ok(in_network(self.ip, IpAddr::V6(*net), *len)),
            Mechanism::A {
                domain: spec,
                cidr4,
                cidr6,
            } => {
                let target = self.target(spec.as_ref(), domain).await;
                self.match_a(&target, *cidr4, *cidr6).await
            }
            Mechanism::Mx {
                domain: spec,
                cidr4,
                cidr6,
            } => {
                let target = self.target(spec.as_ref(), domain).await;
                self.match_mx(&target, *cidr4, *cidr6).await
            }
            Mechanism::Ptr(spec) => {
                let target = self.target(spec.as_ref(), domain).await;
                let names = self.validated_names(true).await?;
                Ok(names.iter().any(|n| is_within(n, &target)))
            }
            Mechanism::Exists(spec) => {
                let target = self.expand_domain(spec, domain).await;
                self.match_exists(&target).await
            }
            Mechanism::Include(spec) => {
                let target = self.expand_domain(spec, domain).await;
                self.match_include(domain, target).await
            }
        }
    }

    fn count_term(&mut self) -> Result<(), Stop> {
        self.terms += 1;
        if self.terms > MAX_DNS_TERMS {
            return Err(Stop::Perm(format!(
                "more than {MAX_DNS_TERMS} DNS-querying terms (RFC 7208 4.6.4)"
            )));
        }
        Ok(())
    }

    fn void_lookup(&mut self) -> Result<(), Stop> {
        self.voids += 1;
        if self.voids > MAX_VOID_LOOKUPS {
            return Err(Stop::Perm(format!(
                "more than {MAX_VOID_LOOKUPS} void DNS lookups (RFC 7208 4.6.4)"
            )));
        }
        Ok(())
    }

    async fn match_a(&mut self, target: &str, cidr4: u8, cidr6: u8) -> Result<bool, Stop> {
        if query_name(target).is_none() {
            return Ok(false);
        }
        let addrs = self
            .dns
            .addresses(target, self.ip, self.deadline)
            .await
            .map_err(|e| Stop::Temp(e.to_string()))?;
        if addrs.is_empty() {
            self.void_lookup()?;
        }
        Ok(addrs.iter().any(|a| self.in_dual(*a, cidr4, cidr6)))
    }

    async fn match_mx(&mut self, target: &str, cidr4: u8, cidr6: u8) -> Result<bool, Stop> {
        if query_name(target).is_none() {
            return Ok(false);
        }
        let exchanges = self
            .dns
            .mx(target, self.deadline)
            .await
            .map_err(|e| Stop::Temp(e.to_string()))?;
        if exchanges.is_empty() {
            self.void_lookup()?;
            return Ok(false);
        }
        if exchanges.len() > MAX_MX_NAMES {
            return Err(Stop::Perm(format!(
                "{target} has {} MX names, more than {MAX_MX_NAMES} (RFC 7208 4.6.4)",
                exchanges.len()
            )));
        }
        // A null MX ("." , RFC 7505) names no host.
        let lookups = exchanges
            .iter()
            .filter(|x| query_name(x).is_some())
            .map(|x| self.dns.addresses(x, self.ip, self.deadline));
        let mut matched = false;
        for r in join_all(lookups).await {
            let addrs = r.map_err(|e| Stop::Temp(e.to_string()))?;
            matched |= addrs.iter().any(|a| self.in_dual(*a, cidr4, cidr6));
        }
        Ok(matched)
    }

    async fn match_exists(&mut self, target: &str) -> Result<bool, Stop> {
        if query_name(target).is_none() {
            return Ok(false);
        }
        // Always an A query, whatever the client's family (§5.7).
        let addrs = self
            .dns
            .a(target, self.deadline)
            .await
            .map_err(|e| Stop::Temp(e.to_string()))?;
        if addrs.is_empty() {
            self.void_lookup()?;
        }
        Ok(!addrs.is_empty())
    }

    async fn match_include(&mut self, domain: &str, target: String) -> Result<bool, Stop> {
        let sub = self.check_host(target.clone()).await;
        let why = || sub.problem.clone().unwrap_or_default();
        match sub.result {
            SpfResult::Pass => Ok(true),
            SpfResult::Fail | SpfResult::SoftFail | SpfResult::Neutral => Ok(false),
            SpfResult::TempError => Err(Stop::Temp(why())),
            SpfResult::PermError => Err(Stop::Perm(why())),
            SpfResult::None => Err(Stop::Perm(format!(
                "include:{target} in the SPF record of {domain}: no SPF record there (RFC 7208 5.2)"
            ))),
        }
    }

    fn in_dual(&self, addr: IpAddr, cidr4: u8, cidr6: u8) -> bool {
        let len = if addr.is_ipv4() { cidr4 } else { cidr6 };
        in_network(self.ip, addr, len)
    }

    /// PTR names of the client that resolve back to it (§5.5): DNS errors skip a name,
    /// an error on the PTR query itself means no names. `count_void`: the `ptr`
    /// mechanism's PTR query counts as a lookup; `%{p}`'s does not.
    async fn validated_names(&mut self, count_void: bool) -> Result<Vec<String>, Stop> {
        if let Some(v) = &self.validated {
            return Ok(v.clone());
        }
        let mut names = match self.dns.ptr(self.ip, self.deadline).await {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "SPF: PTR lookup failed; ptr does not match");
                Vec::new()
            }
        };
        if names.is_empty() && count_void {
            self.void_lookup()?;
        }
        names.truncate(MAX_PTR_NAMES);
        let checks = names
            .iter()
            .map(|n| self.dns.addresses(n, self.ip, self.deadline));
        let results = join_all(checks).await;
        let validated: Vec<String> = names
            .into_iter()
            .zip(results)
            .filter(|(_, r)| r.as_ref().is_ok_and(|a| a.contains(&self.ip)))
            .map(|(n, _)| n.trim_end_matches('.').to_string())
            .collect();
        self.validated = Some(validated.clone());
        Ok(validated)
    }

    /// `exp=` (§6.2): any failure on the way means no explanation, never an error.
    async fn explain(&mut self, domain: &str, exp: &MacroString) -> Option<String> {
        let target = self.expand_domain(exp, domain).await;
        query_name(&target)?;
        let txts = self.dns.txt(&target, self.deadline).await.ok()?;
        let [text] = txts.as_slice() else {
            return None;
        };
        let text = std::str::from_utf8(text).ok().filter(|t| t.is_ascii())?;
        let ms = MacroString::parse(text, Context::Explanation).ok()?;
        Some(self.expand(&ms, domain).await)
    }

    /// The target of a mechanism: its domain-spec, or the current domain.
    async fn target(&mut self, spec: Option<&MacroString>, domain: &str) -> String {
        match spec {
            Some(s) => self.expand_domain(s, domain).await,
            None => domain.trim_end_matches('.').to_string(),
        }
    }

    async fn expand_domain(&mut self, ms: &MacroString, domain: &str) -> String {
        let p = self.p_macro(ms, domain).await;
        macros::domain(ms, &self.values(domain, p.as_deref()))
    }

    async fn expand(&mut self, ms: &MacroString, domain: &str) -> String {
        let p = self.p_macro(ms, domain).await;
        macros::expand(ms, &self.values(domain, p.as_deref()))
    }

    /// `%{p}` (§7.3): the validated name that is `domain` or below it, else any.
    async fn p_macro(&mut self, ms: &MacroString, domain: &str) -> Option<String> {
        if !ms.uses('p') {
            return None;
        }
        let names = self.validated_names(false).await.unwrap_or_default();
        let pick = names
            .iter()
            .find(|n| n.eq_ignore_ascii_case(domain))
            .or_else(|| names.iter().find(|n| is_within(n, domain)))
            .or(names.first());
        pick.cloned()
    }

    fn values<'v>(&'v self, domain: &'v str, validated: Option<&'v str>) -> Values<'v> {
        Values {
            sender: &self.sender,
            local: &self.local,
            sender_domain: &self.sender_domain,
            domain: domain.trim_end_matches('.'),
            ip: self.ip,
            helo: self.helo,
            validated,
            receiver: self.receiver,
            now: crate::time::unix_now().max(0) as u64,
        }
    }
}

/// §4.3: a domain check_host() can ask about — at least two labels of 1 to 63 octets,
/// at most 253 octets, not an address literal.
pub fn valid_domain(d: &str) -> bool {
    let d = d.strip_suffix('.').unwrap_or(d);
    !d.starts_with('[') && d.contains('.') && query_name(d).is_some()
}

/// `name` equals `target` or is a subdomain of it (case-insensitive, trailing dots
/// ignored).
fn is_within(name: &str, target: &str) -> bool {
    let n = name.trim_end_matches('.').to_ascii_lowercase();
    let t = target.trim_end_matches('.').to_ascii_lowercase();
    n == t || n.ends_with(&format!(".{t}"))
}

/// Whether `ip` is in `net/len`; addresses of different families never match.
pub fn in_network(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}
