//! The deadline of the end-of-DATA checks (DKIM, DMARC, ARC): `[auth] data_deadline`
//! bounds them as a whole, and when it passes the message is recorded with
//! `dkim=temperror` and `dmarc=temperror` (SPF, known since MAIL, is recorded as it
//! was) and accepted — a DNS outage never holds a transaction for longer, and never
//! refuses mail by itself.
//!
//! The domains of a message whose checks ran out of time (its From domain and the
//! `d=` of its signatures) are remembered for `[dns] temperror_cache` in a bounded map;
//! and when every nameserver refuses queries ([`crate::dns::Dns::refusal`]) the checks
//! end at once with the same verdict.
//! while remembered, their next messages are recorded as temperror at once, so a
//! flood from a broken domain does not wait the deadline once per message. The MAIL
//! stage needs no such layer: its lookups go through [`crate::dns::Dns`], which bounds
//! each by the stage's deadline and remembers failures by name.

use super::content::Body;
use super::{Auth, MessageVerdict, SpfResults, spf_name};
use crate::smtp::header::{field_values, header_section};
use mail_auth::{
    AuthenticationResults, DkimOutput, DmarcOutput, DmarcResult, DnsError, Error,
    common::headers::HeaderWriter,
};
use std::net::IpAddr;
use std::time::Duration;

/// How many domains [`SlowDomains`] remembers at most.
pub const SLOW_DOMAINS_ENTRIES: u64 = 10_000;

/// Domains whose end-of-DATA checks recently ran out of time.
pub struct SlowDomains {
    cache: Option<moka::sync::Cache<String, ()>>,
}

impl SlowDomains {
    /// `ttl` zero: nothing is remembered.
    pub fn new(ttl: Duration) -> SlowDomains {
        SlowDomains {
            cache: (!ttl.is_zero()).then(|| {
                moka::sync::Cache::builder()
                    .max_capacity(SLOW_DOMAINS_ENTRIES)
                    .time_to_live(ttl)
                    .build()
            }),
        }
    }

    fn recent<'d>(&self, domains: &'d [String]) -> Option<&'d str> {
        let cache = self.cache.as_ref()?;
        domains
            .iter()
            .find(|d| cache.contains_key(*d))
            .map(String::as_str)
    }

    fn remember(&self, domains: &[String]) {
        if let Some(cache) = &self.cache {
            for d in domains {
                cache.insert(d.clone(), ());
            }
        }
    }
}

impl Auth {
    /// [`Auth::check_message`] bounded by `[auth] data_deadline`.
    pub async fn check_end_of_data(
        &self,
        ip: IpAddr,
        helo: &str,
        sender: &str,
        spf: &SpfResults,
        msg: Body<'_>,
    ) -> MessageVerdict {
        if !self.cfg.auth.dkim {
            return self.check_message(ip, helo, sender, spf, msg).await;
        }
        let domains = message_domains(msg.head());
        if let Some(d) = self.slow.recent(&domains) {
            tracing::info!(client = %ip, domain = d, "end-of-DATA checks not asked: lookups for this domain ran out of time moments ago");
            let why = format!("lookups for {d} ran out of time moments ago");
            return self.out_of_time(ip, helo, sender, spf, &domains, &why);
        }
        let limit = self.cfg.auth.data_deadline;
        let checks = tokio::time::timeout(limit, self.check_message(ip, helo, sender, spf, msg));
        let outcome = tokio::select! {
            r = checks => r,
            // mail-auth asks the resolver directly; a refusing one would cost the deadline.
            () = self.dns.refusal() => {
                let why = "every nameserver refuses queries";
                return self.out_of_time(ip, helo, sender, spf, &domains, why);
            }
        };
        match outcome {
            Ok(v) => v,
            Err(_) => {
                self.dns.note_timeout();
                self.slow.remember(&domains);
                let why = format!(
                    "DKIM/DMARC lookups did not finish within {}",
                    humantime::format_duration(limit)
                );
                tracing::warn!(client = %ip, from = sender, domains = ?domains, "{why}; recorded as temperror");
                self.out_of_time(ip, helo, sender, spf, &domains, &why)
            }
        }
    }

    /// The verdict of checks that ran out of time: SPF as found at MAIL, DKIM and
    /// DMARC temperror; nothing doomed, nothing refused.
    fn out_of_time(
        &self,
        ip: IpAddr,
        helo: &str,
        sender: &str,
        spf: &SpfResults,
        domains: &[String],
        why: &str,
    ) -> MessageVerdict {
        let mut ar = AuthenticationResults::new(self.cfg.authserv_id());
        let mut summary = Vec::new();
        if let (Some(h), Some(m)) = (&spf.helo, &spf.mail_from) {
            ar = ar
                .with_spf_ehlo_result(h, ip, helo)
                .with_spf_mailfrom_result(m, ip, sender, helo);
            summary.push(format!("spf={}", spf_name(m.result())));
        }
        let temp = || Error::Dns(DnsError::Resolver(why.to_string()));
        let from = domains.first().cloned().unwrap_or_default();
        ar = ar
            .with_dkim_result(&DkimOutput::temp_err(temp()), "")
            .with_dmarc_result(
                &DmarcOutput::new(from).with_dkim_result(DmarcResult::TempError(temp())),
            );
        summary.push(format!("dkim=temperror dmarc=temperror ({why})"));
        MessageVerdict {
            headers: ar.to_header().into_bytes(),
            summary: summary.join(" "),
            ..MessageVerdict::default()
        }
    }
}

/// The domains whose DNS the end-of-DATA checks ask: the From domain first, then the
/// `d=` of each DKIM signature (lowercase, deduplicated).
pub fn message_domains(msg: &[u8]) -> Vec<String> {
    let headers = header_section(msg);
    let mut out: Vec<String> = Vec::new();
    let from = field_values(headers, "from");
    let sigs = field_values(headers, "dkim-signature");
    let found = from
        .iter()
        .filter_map(|f| address_domain(f))
        .chain(sigs.iter().filter_map(|s| signature_domain(s)));
    for d in found {
        if !out.contains(&d) {
            out.push(d);
        }
    }
    out.truncate(16);
    out
}

/// The domain of the last `@` in a From value (`"Name" <a@b>` or `a@b`).
fn address_domain(value: &str) -> Option<String> {
    let (_, rest) = value.rsplit_once('@')?;
    let d: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
        .collect();
    (!d.is_empty()).then(|| d.trim_end_matches('.').to_ascii_lowercase())
}

/// The `d=` tag of a DKIM-Signature value.
fn signature_domain(value: &str) -> Option<String> {
    value.split(';').find_map(|tag| {
        let (k, v) = tag.split_once('=')?;
        (k.trim() == "d").then(|| {
            v.split_whitespace()
                .collect::<String>()
                .trim_end_matches('.')
                .to_ascii_lowercase()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_of_a_message() {
        let m = b"DKIM-Signature: v=1; a=rsa-sha256; d=Sig.Example;\r\n s=x; b=abc\r\nFrom: \"A @ B\" <a@From.Example>\r\nDKIM-Signature: v=1; d=from.example; s=y\r\nSubject: x\r\n\r\nFrom: body@not.this\r\n";
        assert_eq!(message_domains(m), vec!["from.example", "sig.example"]);
        assert!(message_domains(b"Subject: none\r\n\r\n").is_empty());
    }

    #[test]
    fn slow_domains_are_remembered_and_bounded_in_time() {
        let s = SlowDomains::new(Duration::from_secs(60));
        let d = vec!["a.example".to_string(), "b.example".to_string()];
        assert_eq!(s.recent(&d), None);
        s.remember(&d[1..]);
        assert_eq!(s.recent(&d), Some("b.example"));
        let off = SlowDomains::new(Duration::ZERO);
        off.remember(&d);
        assert_eq!(off.recent(&d), None);
    }
}
