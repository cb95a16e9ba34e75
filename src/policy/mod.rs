//! Authentication of inbound mail: SPF (HELO and MAIL FROM identities checked
//! separately, by [`spf`]), DKIM, DMARC, recorded in `Authentication-Results` and
//! `Received-SPF` (the talk's "record the results in a header"), the DMARC pre-flight,
//! and optional ARC sealing. SPF is tenso's own evaluator ([`spf`]); DKIM ([`dkim`]),
//! DMARC ([`dmarc`]) and ARC ([`arc`], [`seal`]) are tenso's own too, run together by
//! [`content`]; [`stage`] bounds each stage's DNS waits by its deadline.
//!
//! Decisions are returned as verdicts and replies; this module never touches the
//! session, the spool or the table. DNS trouble never blocks mail by itself: a
//! temperror is accepted and recorded unless `[auth] spf_temperror = "defer"`.

pub mod arc;
pub mod content;
pub mod dkim;
pub mod dmarc;
pub mod dns_check;
pub mod lookup;
pub mod reputation;
pub mod seal;
pub mod spam;
pub mod spf;
pub mod stage;

use crate::config::{Config, SpfFailAction, TempErrorAction};
use crate::smtp::Reply;
use crate::smtp::header::{fields_raw, header_section};
use mail_auth::{AuthenticationResults, MessageAuthenticator, SpfOutput, SpfResult};
use std::net::IpAddr;
use std::sync::Arc;

/// The SPF results of one transaction (None when SPF checking is off).
#[derive(Debug, Clone, Default)]
pub struct SpfResults {
    pub helo: Option<SpfOutput>,
    pub mail_from: Option<SpfOutput>,
    /// The `Received-SPF:` field (CRLF-terminated) of the MAIL FROM result, made from
    /// the same verdict as `spf=… smtp.mailfrom`; written above tenso's `Received:`.
    pub received_spf: Option<String>,
}

impl SpfResults {
    /// The MAIL FROM result the 1b rule looks at.
    pub fn result(&self) -> Option<SpfResult> {
        self.mail_from.as_ref().map(|o| o.result())
    }

    /// Proposal 1b: SPF fail or softfail means no error mail goes back.
    pub fn forbids_bounce(&self) -> bool {
        matches!(self.result(), Some(SpfResult::Fail | SpfResult::SoftFail))
    }
}

/// What the message-level checks found.
#[derive(Debug, Default)]
pub struct MessageVerdict {
    /// `Authentication-Results:` and `Received-SPF:` to prepend (CRLF lines).
    pub headers: Vec<u8>,
    /// From domain has p=reject (or quarantine) and no aligned DKIM pass: forwarding
    /// will fail DMARC at the destination.
    pub doomed: Option<String>,
    /// Refuse at DATA (dmarc_reject).
    pub reject: Option<Reply>,
    /// Summary for logs: `spf=pass dkim=pass dmarc=pass`.
    pub summary: String,
}

pub struct Auth {
    cfg: Arc<Config>,
    ma: MessageAuthenticator,
    /// SPF and reputation lookups: bounded by the stage deadline, temperrors remembered.
    dns: crate::dns::Dns,
    spf: spf::Spf,
    /// Domains whose end-of-DATA checks recently ran out of time.
    slow: stage::SlowDomains,
    /// ARC sealer with the forwarder's key (`[dkim] arc = true`).
    arc: Option<seal::Sealer>,
}

pub fn spf_name(r: SpfResult) -> &'static str {
    match r {
        SpfResult::Pass => "pass",
        SpfResult::Fail => "fail",
        SpfResult::SoftFail => "softfail",
        SpfResult::Neutral => "neutral",
        SpfResult::TempError => "temperror",
        SpfResult::PermError => "permerror",
        SpfResult::None => "none",
    }
}

impl Auth {
    pub fn new(cfg: Arc<Config>, resolver: crate::dns::Resolver) -> Result<Auth, String> {
        let d = &cfg.dkim;
        let arc = match (&d.domain, &d.selector, &d.key) {
            (Some(domain), Some(selector), Some(key)) if d.arc => {
                Some(seal::Sealer::load(key, domain, selector)?)
            }
            _ if d.arc => return Err("[dkim] arc = true needs domain, selector and key".into()),
            _ => None,
        };
        let dns = crate::dns::Dns::new(resolver.clone(), &cfg.dns);
        Ok(Auth {
            spf: spf::Spf::new(dns.clone(), cfg.hostname.clone()),
            slow: stage::SlowDomains::new(cfg.dns.temperror_cache),
            dns,
            cfg,
            ma: MessageAuthenticator(resolver),
            arc,
        })
    }

    pub fn authenticator(&self) -> &MessageAuthenticator {
        &self.ma
    }

    /// Whether messages get an ARC seal (their body hash is made for it).
    pub fn seals(&self) -> bool {
        self.arc.is_some()
    }

    /// The policy checks' resolver front (its `timeouts()` is `dns_timeouts`).
    pub fn dns(&self) -> &crate::dns::Dns {
        &self.dns
    }

    /// The reply to MAIL when the SPF policy refuses the sender, else None.
    pub fn spf_reply(&self, spf: &SpfResults) -> Option<Reply> {
        match spf.result()? {
            SpfResult::Fail if self.cfg.auth.spf_fail == SpfFailAction::Reject => Some(Reply::new(
                550,
                "5.7.23",
                "SPF validation failed: the sender's domain does not authorize this host",
            )),
            SpfResult::TempError if self.cfg.auth.spf_temperror == TempErrorAction::Defer => {
                Some(Reply::new(
                    451,
                    "4.7.24",
                    "temporary SPF validation error, try again later",
                ))
            }
            _ => None,
        }
    }

    /// DKIM, DMARC and the headers that record every result.
    pub async fn check_message(
        &self,
        ip: IpAddr,
        helo: &str,
        sender: &str,
        spf: &SpfResults,
        msg: content::Body<'_>,
    ) -> MessageVerdict {
        let mut v = MessageVerdict::default();
        if !self.cfg.auth.spf && !self.cfg.auth.dkim {
            return v;
        }
        let head = msg.head();
        let authserv = self.cfg.authserv_id();
        let mut ar = AuthenticationResults::new(authserv);
        let mut summary = Vec::new();
        if let (Some(h), Some(m)) = (&spf.helo, &spf.mail_from) {
            ar = ar
                .with_spf_ehlo_result(h, ip, helo)
                .with_spf_mailfrom_result(m, ip, sender, helo);
            summary.push(format!("spf={}", spf_name(m.result())));
        }
        let mut clauses = Vec::new();
        let mut chain = None;
        if self.cfg.auth.dkim {
            let spf_domain = match sender.rsplit_once('@') {
                Some((_, d)) => d,
                None => helo,
            };
            let spf_pass = spf.result() == Some(SpfResult::Pass);
            let identity = content::SpfIdentity {
                domain: spf_domain,
                pass: spf_pass,
            };
            let now = crate::time::unix_now();
            let checks =
                content::check(self.dns.resolver(), msg, self.arc.is_some(), &identity, now).await;
            let decisions = checks.decide(
                self.cfg.auth.dmarc_preflight_quarantine,
                self.cfg.auth.dmarc_reject,
            );
            clauses = checks.clauses(ip);
            summary.push(checks.summary());
            v.doomed = decisions.doomed;
            v.reject = decisions.reject;
            chain = Some((checks.arc, checks.bodies));
        }
        // RFC 8601 §2.2: `authserv-id; resinfo; resinfo` or `authserv-id; none`.
        let mut results = ar.to_string();
        if results == authserv && clauses.is_empty() {
            results.push_str("; none");
        }
        for c in &clauses {
            results.push_str(";\r\n\t");
            results.push_str(c);
        }
        if let (Some(sealer), Some((chain, bodies))) = (&self.arc, &chain) {
            match sealer.seal(head, bodies, chain, &results, crate::time::unix_now()) {
                Ok(Some(set)) => v.headers.extend_from_slice(&set),
                Ok(None) => tracing::info!(arc = ?chain.result, "ARC chain not extended"),
                Err(e) => tracing::warn!(error = %e, "ARC sealing failed"),
            }
        }
        v.headers
            .extend_from_slice(format!("Authentication-Results: {results}\r\n").as_bytes());
        v.summary = summary.join(" ");
        v
    }
}

/// Removes incoming `Authentication-Results` fields that claim our authserv-id
/// (RFC 8601 §5: a forged one could make downstream filters trust the message).
/// Returns None when there is nothing to remove.
pub fn strip_forged_results(msg: &[u8], authserv_id: &str) -> Option<Vec<u8>> {
    let headers = header_section(msg);
    let mut out = Vec::with_capacity(msg.len());
    let mut removed = false;
    let mut pos = 0;
    for (start, end, name, value) in fields_raw(headers) {
        if name.eq_ignore_ascii_case("authentication-results") {
            // RFC 8601 §2.2: `[CFWS] authserv-id`; skip leading comments.
            let mut rest = value.trim_start();
            while rest.starts_with('(') {
                let mut depth = 0;
                let end = rest.char_indices().find_map(|(i, c)| {
                    depth += match c {
                        '(' => 1,
                        ')' => -1,
                        _ => 0,
                    };
                    (depth == 0).then_some(i + 1)
                });
                rest = end.map_or("", |e| &rest[e..]).trim_start();
            }
            let id = rest
                .split(|c: char| c == ';' || c == '(' || c.is_whitespace())
                .next()
                .unwrap_or("");
            if id.eq_ignore_ascii_case(authserv_id) {
                out.extend_from_slice(&msg[pos..start]);
                pos = end;
                removed = true;
            }
        }
    }
    if !removed {
        return None;
    }
    out.extend_from_slice(&msg[pos..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_only_our_authserv_id() {
        let m = b"Authentication-Results: tenso.test; spf=pass\r\n smtp.mailfrom=x\r\nAuthentication-Results: other.test; dkim=pass\r\nSubject: s\r\n\r\nAuthentication-Results: tenso.test; body\r\n";
        let out = strip_forged_results(m, "TENSO.test").unwrap();
        assert_eq!(
            out,
            b"Authentication-Results: other.test; dkim=pass\r\nSubject: s\r\n\r\nAuthentication-Results: tenso.test; body\r\n"
        );
        assert!(strip_forged_results(&out, "tenso.test").is_none());
    }
}
