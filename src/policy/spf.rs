//! SPF (RFC 7208), evaluated by tenso itself on the one resolver ([`crate::dns::Dns`]):
//! the HELO and MAIL FROM identities checked separately (§2.3, §2.4) and in parallel,
//! each bounded by the MAIL stage's deadline, and the `Received-SPF:` field (§9.1).
//!
//! Why not mail-auth's evaluator: 0.13.3 passes records RFC 7208 makes a permerror
//! (unknown mechanisms, bad `ip4`/CIDR, two records, syntax errors after a match),
//! gets `ptr` wrong, does not enforce the void-lookup limit, and its lookups cannot be
//! bounded by a stage deadline. The result still leaves here as mail-auth's
//! [`SpfOutput`], which `Authentication-Results` and DMARC take.
//!
//! It never refuses mail itself: the caller applies `[auth] spf_fail`/`spf_temperror`.

mod eval;
pub mod macros;
pub mod record;

pub use eval::{MAX_DNS_TERMS, MAX_MX_NAMES, MAX_PTR_NAMES, MAX_VOID_LOOKUPS};

use super::{Auth, SpfResults};
use crate::dns::Dns;
use mail_auth::{SpfOutput, SpfResult};
use std::net::IpAddr;
use tokio::time::Instant;

/// Which identity a verdict is about (§9.1 `identity=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    Helo,
    MailFrom,
}

/// The outcome of checking one identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub identity: Identity,
    pub result: SpfResult,
    /// The domain whose policy was asked: the HELO name or the MAIL FROM domain.
    pub domain: String,
    /// A `fail`'s explanation from the domain's `exp=`.
    pub explanation: Option<String>,
    /// What went wrong (permerror, temperror) or why there is no result (none).
    pub problem: Option<String>,
    /// The term that decided, as written in the record.
    pub mechanism: Option<String>,
}

impl Verdict {
    /// The form mail-auth's `Authentication-Results` builder and DMARC take.
    pub fn output(&self) -> SpfOutput {
        let out = SpfOutput::new(self.domain.clone()).with_result(self.result);
        match &self.explanation {
            Some(e) => out.with_explanation(e.clone()),
            None => out,
        }
    }
}

/// The evaluator: the resolver front and our host name (`%{r}`).
#[derive(Clone)]
pub struct Spf {
    dns: Dns,
    receiver: String,
}

impl Spf {
    pub fn new(dns: Dns, receiver: impl Into<String>) -> Spf {
        Spf {
            dns,
            receiver: receiver.into(),
        }
    }

    /// §2.3: the HELO identity, check_host(ip, helo, postmaster@helo). A HELO that is
    /// not a domain (an address literal, one label) gives `none`.
    pub async fn check_helo(&self, ip: IpAddr, helo: &str, deadline: Instant) -> Verdict {
        self.check(Identity::Helo, ip, helo, ("", helo), deadline)
            .await
    }

    /// §2.4: the MAIL FROM identity; `sender` is the whole reverse-path, "" for `<>`
    /// (then postmaster@HELO is checked, §2.4).
    pub async fn check_mail_from(
        &self,
        ip: IpAddr,
        helo: &str,
        sender: &str,
        deadline: Instant,
    ) -> Verdict {
        let (local, domain) = match sender.rsplit_once('@') {
            _ if sender.is_empty() => ("", helo),
            Some((l, d)) => (l, d),
            None => ("", sender),
        };
        self.check(Identity::MailFrom, ip, helo, (local, domain), deadline)
            .await
    }

    async fn check(
        &self,
        identity: Identity,
        ip: IpAddr,
        helo: &str,
        (local, domain): (&str, &str),
        deadline: Instant,
    ) -> Verdict {
        let domain = &a_labels(domain);
        let mut ctx = eval::Ctx::new(
            &self.dns,
            deadline,
            ip,
            (local, domain),
            helo,
            &self.receiver,
        );
        let e = ctx.check_host(domain.to_string()).await;
        Verdict {
            identity,
            result: e.result,
            domain: domain.trim_end_matches('.').to_ascii_lowercase(),
            explanation: e.explanation,
            problem: e.problem,
            mechanism: e.mechanism,
        }
    }
}

/// An internationalized domain (SMTPUTF8) as DNS knows it: A-labels (RFC 5890).
/// Anything IDNA refuses stays as it is, and check_host() finds it invalid or absent.
fn a_labels(domain: &str) -> String {
    if domain.is_ascii() {
        return domain.to_string();
    }
    hickory_resolver::proto::rr::Name::from_utf8(domain)
        .map(|n| n.to_ascii().trim_end_matches('.').to_string())
        .unwrap_or_else(|_| domain.to_string())
}

impl Auth {
    /// SPF of the HELO and the MAIL FROM identities (RFC 7208 §2.3, §2.4), in parallel
    /// and bounded by `deadline`. `sender` is the full reverse-path, "" for `<>`: its
    /// identity is then postmaster@HELO, the same check as HELO's, asked once.
    pub async fn check_spf(
        &self,
        ip: IpAddr,
        helo: &str,
        sender: &str,
        deadline: Instant,
    ) -> SpfResults {
        if !self.cfg.auth.spf {
            return SpfResults::default();
        }
        let (h, m) = if sender.is_empty() {
            let h = self.spf.check_helo(ip, helo, deadline).await;
            let m = Verdict {
                identity: Identity::MailFrom,
                ..h.clone()
            };
            (h, m)
        } else {
            tokio::join!(
                self.spf.check_helo(ip, helo, deadline),
                self.spf.check_mail_from(ip, helo, sender, deadline)
            )
        };
        for v in [&h, &m] {
            if let (Some(problem), SpfResult::TempError | SpfResult::PermError) =
                (&v.problem, v.result)
            {
                tracing::info!(client = %ip, identity = ?v.identity, domain = %v.domain, result = super::spf_name(v.result), problem, "SPF error");
            }
        }
        SpfResults {
            helo: Some(h.output()),
            mail_from: Some(m.output()),
            received_spf: Some(received_spf(&m, ip, helo, sender, &self.cfg.hostname)),
        }
    }
}

/// The `Received-SPF:` field (RFC 7208 §9.1, CRLF-terminated) for `v`: the result, a
/// comment, then `receiver`, `client-ip`, `envelope-from`, `helo`, `identity`, and
/// `mechanism` or `problem` (each error named once, in `problem=`).
pub fn received_spf(v: &Verdict, ip: IpAddr, helo: &str, sender: &str, receiver: &str) -> String {
    let who = if sender.is_empty() {
        format!("postmaster@{helo}")
    } else {
        sender.to_string()
    };
    let (c_who, c_ip, c_me) = (comment(&who), ip.to_string(), comment(receiver));
    let why = match v.result {
        SpfResult::Pass => format!("domain of {c_who} designates {c_ip} as permitted sender"),
        SpfResult::Fail => {
            format!("domain of {c_who} does not designate {c_ip} as permitted sender")
        }
        SpfResult::SoftFail => {
            format!("domain of {c_who} discourages use of {c_ip} as permitted sender")
        }
        SpfResult::Neutral => {
            format!("{c_ip} is neither permitted nor denied by domain of {c_who}")
        }
        SpfResult::None => format!("no SPF record found for {c_who}"),
        SpfResult::TempError => format!("temporary error checking SPF for {c_who}"),
        SpfResult::PermError => format!("permanent error in the SPF policy for {c_who}"),
    };
    let mut h = format!(
        "Received-SPF: {} ({c_me}: {why})\r\n\treceiver={}; client-ip={};\r\n\tenvelope-from={}; helo={};\r\n\tidentity={};",
        super::spf_name(v.result),
        value(receiver),
        value(&c_ip),
        quoted(&who),
        value(helo),
        match v.identity {
            Identity::Helo => "helo",
            Identity::MailFrom => "mailfrom",
        },
    );
    let key = match v.result {
        SpfResult::TempError | SpfResult::PermError => v.problem.as_ref().map(|p| ("problem", p)),
        _ => v.mechanism.as_ref().map(|m| ("mechanism", m)),
    };
    if let Some((k, text)) = key {
        h.push_str(&format!("\r\n\t{k}={};", quoted(text)));
    }
    h.push_str("\r\n");
    h
}

/// Text safe inside a comment: no parentheses, backslashes or controls, bounded.
fn comment(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control() && !matches!(c, '(' | ')' | '\\'))
        .take(256)
        .collect()
}

/// A dot-atom when the text is one, else a quoted-string (RFC 5322 §3.2.3, §3.2.4).
fn value(s: &str) -> String {
    let atext = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c);
    let dot_atom = !s.is_empty() && s.split('.').all(|a| !a.is_empty() && a.chars().all(atext));
    if dot_atom { s.to_string() } else { quoted(s) }
}

/// A quoted-string: `"` and `\` escaped, controls dropped, bounded.
fn quoted(s: &str) -> String {
    let mut q = String::from("\"");
    for c in s.chars().filter(|c| !c.is_control()).take(256) {
        if matches!(c, '"' | '\\') {
            q.push('\\');
        }
        q.push(c);
    }
    q.push('"');
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(result: SpfResult, problem: Option<&str>, mechanism: Option<&str>) -> Verdict {
        Verdict {
            identity: Identity::MailFrom,
            result,
            domain: "example.org".into(),
            explanation: None,
            problem: problem.map(String::from),
            mechanism: mechanism.map(String::from),
        }
    }

    #[test]
    fn idn_domains_are_checked_as_a_labels() {
        assert_eq!(a_labels("bücher.example"), "xn--bcher-kva.example");
        assert_eq!(a_labels("Example.ORG"), "Example.ORG");
    }

    #[test]
    fn received_spf_names_each_error_once() {
        let v = verdict(
            SpfResult::PermError,
            Some("SPF record of example.org: \"ip4:x\": bad"),
            None,
        );
        let h = received_spf(
            &v,
            "192.0.2.1".parse().unwrap(),
            "mx.example.org",
            "a@example.org",
            "tenso.test",
        );
        assert!(
            h.starts_with("Received-SPF: permerror (tenso.test: "),
            "{h}"
        );
        assert!(h.ends_with(";\r\n"));
        assert_eq!(h.matches("ip4:x").count(), 1, "{h}");
        assert!(
            h.contains("problem=\"SPF record of example.org: \\\"ip4:x\\\": bad\";"),
            "{h}"
        );
        assert!(h.contains("client-ip=192.0.2.1;"));
        assert!(h.contains("envelope-from=\"a@example.org\";"));
        assert!(h.contains("identity=mailfrom;"));
        // Every line but the first is folded (starts with a tab): one header field.
        assert!(
            h.trim_end()
                .split("\r\n")
                .skip(1)
                .all(|l| l.starts_with('\t'))
        );
    }

    #[test]
    fn received_spf_quotes_what_is_not_an_atom() {
        let v = verdict(SpfResult::Pass, None, Some("ip6:2001:db8::/32"));
        let h = received_spf(
            &v,
            "2001:db8::1".parse().unwrap(),
            "[192.0.2.1]",
            "",
            "tenso.test",
        );
        assert!(h.contains("client-ip=\"2001:db8::1\";"), "{h}");
        assert!(h.contains("helo=\"[192.0.2.1]\";"), "{h}");
        assert!(
            h.contains("envelope-from=\"postmaster@[192.0.2.1]\";"),
            "{h}"
        );
        assert!(h.contains("mechanism=\"ip6:2001:db8::/32\";"), "{h}");
        let evil = received_spf(&v, "192.0.2.1".parse().unwrap(), "x", "a(\")\r\nb@x", "t");
        assert!(!evil.contains("\r\nb@"), "no header injection: {evil}");
        assert!(evil.contains("envelope-from=\"a(\\\")b@x\";"), "{evil}");
    }
}
