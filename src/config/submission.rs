//! `[submission]` (mail clients sending as their alias on 587/465) and the per-domain
//! DKIM keys of `[[dkim.keys]]` that sign what they send.
//!
//! Parsing and validation only, like the rest of `config`: nothing here opens a socket
//! or reads a key file.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The submission service (RFC 6409 on `listen`, RFC 8314 implicit TLS on
/// `listen_tls`). Neither listener exists unless configured.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SubmissionConfig {
    /// STARTTLS listeners (port 587); AUTH is offered only once TLS is up.
    pub listen: Vec<SocketAddr>,
    /// Implicit-TLS listeners (port 465): the handshake comes before the greeting.
    pub listen_tls: Vec<SocketAddr>,
    /// Messages per login per hour (token bucket, burst = this number); 0 = no limit.
    pub max_messages_per_hour: u32,
    /// Recipients per login per day (token bucket, burst = this number); 0 = no limit.
    pub max_recipients_per_day: u32,
    /// Failed AUTH attempts per client (IPv4 address, IPv6 /64) within
    /// `auth_failure_window`; then `421 4.7.0` and a growing wait.
    pub max_auth_failures: u32,
    #[serde(with = "humantime_serde")]
    pub auth_failure_window: Duration,
    /// `Received:` of submitted mail names neither the client's address nor its EHLO.
    pub hide_client_ip: bool,
    /// Argon2 verifications running at once (each holds `argon2_memory_kib`); more
    /// clients wait for a slot.
    pub max_concurrent_auth: usize,
    /// Argon2id cost of passwords set from now on (`tenso user passwd`); stored hashes
    /// keep the cost they were made with. The defaults are the argon2 crate's
    /// (RFC 9106's second recommendation scaled down: 19 MiB, 2 passes, 1 lane);
    /// tests shrink them.
    pub argon2_memory_kib: u32,
    pub argon2_iterations: u32,
    pub argon2_parallelism: u32,
}

impl Default for SubmissionConfig {
    fn default() -> Self {
        SubmissionConfig {
            listen: Vec::new(),
            listen_tls: Vec::new(),
            max_messages_per_hour: 100,
            max_recipients_per_day: 1000,
            max_auth_failures: 5,
            auth_failure_window: Duration::from_secs(600),
            hide_client_ip: true,
            max_concurrent_auth: 4,
            argon2_memory_kib: 19 * 1024,
            argon2_iterations: 2,
            argon2_parallelism: 1,
        }
    }
}

impl SubmissionConfig {
    /// Whether any submission listener is configured.
    pub fn enabled(&self) -> bool {
        !self.listen.is_empty() || !self.listen_tls.is_empty()
    }

    pub fn validate(&self, smtp_listen: &[SocketAddr]) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for a in smtp_listen
            .iter()
            .chain(&self.listen)
            .chain(&self.listen_tls)
        {
            if a.port() != 0 && !seen.insert(*a) {
                return Err(format!(
                    "{a} is configured twice ([smtp] listen, [submission] listen, listen_tls)"
                ));
            }
        }
        if !(1..=1000).contains(&self.max_auth_failures) {
            return Err("[submission] max_auth_failures must be between 1 and 1000".into());
        }
        if self.auth_failure_window.is_zero() {
            return Err("[submission] auth_failure_window must be more than 0s".into());
        }
        if self.max_concurrent_auth == 0 {
            return Err("[submission] max_concurrent_auth must be at least 1".into());
        }
        let (m, t, p) = (
            self.argon2_memory_kib,
            self.argon2_iterations,
            self.argon2_parallelism,
        );
        if p == 0 || p > 64 || t == 0 || m < 8 * p {
            return Err(format!(
                "[submission] argon2 cost {m} KiB / {t} iterations / {p} lanes is not valid \
                 (at least 8 KiB per lane, 1 iteration, 1 to 64 lanes)"
            ));
        }
        if m > 4 * 1024 * 1024 {
            return Err("[submission] argon2_memory_kib is above 4 GiB".into());
        }
        Ok(())
    }
}

/// One `[[dkim.keys]]` entry: the key that signs mail whose From is in `domain`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DkimDomainKey {
    pub domain: String,
    pub selector: String,
    /// PEM private key (RSA PKCS#1/PKCS#8 or Ed25519 PKCS#8), e.g. from
    /// `tenso dkim keygen --domain DOMAIN`.
    pub key: PathBuf,
}

/// Checks `[[dkim.keys]]`: names that can appear in a DNS name, one key per domain.
pub fn validate_domain_keys(keys: &[DkimDomainKey]) -> Result<(), String> {
    let mut domains = std::collections::HashSet::new();
    for k in keys {
        let d = k.domain.trim_end_matches('.').to_ascii_lowercase();
        crate::smtp::address::Mailbox::parse(&format!("x@{d}"))
            .ok()
            .filter(|m| !m.is_address_literal())
            .ok_or_else(|| format!("[[dkim.keys]] domain {:?} is not a domain", k.domain))?;
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !k.selector.split('.').all(label_ok) {
            return Err(format!(
                "[[dkim.keys]] selector {:?} (domain {d}) is not a DNS label",
                k.selector
            ));
        }
        if !domains.insert(d.clone()) {
            return Err(format!("[[dkim.keys]] has two keys for {d}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn submission_section() {
        let c = Config::default();
        assert!(!c.submission.enabled(), "no submission unless configured");
        assert_eq!(c.submission.max_messages_per_hour, 100);
        assert_eq!(c.submission.max_recipients_per_day, 1000);
        assert_eq!(c.submission.max_auth_failures, 5);
        assert!(c.submission.hide_client_ip);
        let c = Config::from_toml(
            "[submission]\nlisten = [\"127.0.0.1:5870\"]\nlisten_tls = [\"127.0.0.1:4650\"]\n\
             max_messages_per_hour = 3\nauth_failure_window = \"1m\"\n\
             [[dkim.keys]]\ndomain = \"alias.example\"\nselector = \"s1\"\nkey = \"/k.pem\"\n\
             [[dkim.keys]]\ndomain = \"other.example\"\nselector = \"s2\"\nkey = \"/k2.pem\"\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert!(c.submission.enabled());
        assert_eq!(c.dkim.keys.len(), 2);
        assert_eq!(c.dkim.keys[1].selector, "s2");
        let again = Config::from_toml(&c.to_toml()).unwrap();
        assert_eq!(again.dkim.keys, c.dkim.keys);
        assert_eq!(again.submission.listen_tls, c.submission.listen_tls);
        for bad in [
            "[submission]\nmax_auth_failures = 0\n",
            "[submission]\nargon2_memory_kib = 4\n",
            "[submission]\nargon2_iterations = 0\n",
            "[submission]\nmax_concurrent_auth = 0\n",
            "[submission]\nlisten = [\"127.0.0.1:2525\"]\n",
            "[[dkim.keys]]\ndomain = \"a b\"\nselector = \"s\"\nkey = \"/k\"\n",
            "[[dkim.keys]]\ndomain = \"a.test\"\nselector = \"s;x\"\nkey = \"/k\"\n",
            "[[dkim.keys]]\ndomain = \"a.test\"\nselector = \"s\"\nkey = \"/k\"\n\
             [[dkim.keys]]\ndomain = \"A.test\"\nselector = \"t\"\nkey = \"/k2\"\n",
        ] {
            let c = Config::from_toml(bad).unwrap();
            assert!(c.validate().is_err(), "{bad}");
        }
        assert!(Config::from_toml("[submission]\nlisten_ssl = []\n").is_err());
    }
}
