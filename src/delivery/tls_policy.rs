//! The TLS policy of one delivery attempt to one MX host, and whether a session
//! satisfies it.
//!
//! Precedence (RFC 8461 §2 leaves DANE first): secure DANE TLSA records of the host,
//! then the destination's MTA-STS policy, then `[delivery] tls_domains`, then
//! `[delivery] tls`. Each gives a [`Requirement`]; a session records what it proved
//! ([`Security`]), and a pooled session is reused only for a requirement it meets —
//! clear text never serves a domain that needs TLS, an unverified session never one
//! that needs verification, a session verified for another host name never that
//! host. Pure decisions: no I/O here.

use super::certs::CertFailure;
use super::dane::{DaneLookup, DaneSet};
use super::mta_sts::{Mode, StsView};
use crate::config::TlsMode;
use std::sync::Arc;

/// What a session must prove before mail goes over it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// Clear text is fine (`tls = "none"`; STARTTLS is not even tried).
    None,
    /// STARTTLS when offered; clear text after a refused or broken STARTTLS.
    Opportunistic,
    /// TLS, any certificate (`required`, and DANE with only unusable records).
    Encrypt,
    /// TLS with a WebPKI-valid certificate naming the host (`verify`, MTA-STS).
    Verify,
    /// TLS with a chain matching these TLSA records (DANE).
    Dane(DaneSet),
}

impl Requirement {
    pub fn from_mode(mode: TlsMode) -> Requirement {
        match mode {
            TlsMode::None => Requirement::None,
            TlsMode::Opportunistic => Requirement::Opportunistic,
            TlsMode::Required => Requirement::Encrypt,
            TlsMode::Verify => Requirement::Verify,
        }
    }

    /// STARTTLS must succeed, or the host is not usable.
    pub fn needs_tls(&self) -> bool {
        !matches!(self, Requirement::None | Requirement::Opportunistic)
    }

    /// Does a session to `session_host` with `s` meet this requirement for `host`?
    pub fn satisfied_by(&self, s: &Security, session_host: &str, host: &str) -> bool {
        let same_host = session_host.eq_ignore_ascii_case(host);
        match self {
            Requirement::None => true,
            Requirement::Opportunistic => s.tls.is_some() || s.starttls_tried,
            Requirement::Encrypt => s.tls.is_some(),
            Requirement::Verify => s.tls.is_some() && same_host && s.webpki == Some(Ok(())),
            Requirement::Dane(set) => {
                s.tls.is_some() && same_host && s.dane == Some(set.fingerprint)
            }
        }
    }
}

/// The negotiated protocol, for logs and `Received`-style notes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsParams {
    pub version: String,
    pub cipher: String,
}

/// What an open session proved about its peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Security {
    /// TLS is up (None: clear text).
    pub tls: Option<TlsParams>,
    /// STARTTLS was attempted (so a clear-text session here is what opportunistic
    /// TLS would get anyway).
    pub starttls_tried: bool,
    /// WebPKI's verdict on the certificate for the session's host name.
    pub webpki: Option<Result<(), CertFailure>>,
    /// Fingerprint of the TLSA set the chain matched.
    pub dane: Option<u64>,
}

/// Which rule gave the requirement, for logs, counters and TLS-RPT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Dane(DaneSet),
    /// DANE records exist but none is usable: mandatory TLS only.
    DaneUnusable(Vec<String>),
    MtaSts(Arc<super::mta_sts::Policy>),
    /// `testing` mode: delivered under `fallback`, evaluated for reports.
    MtaStsTesting(Arc<super::mta_sts::Policy>, TlsMode),
    Config(TlsMode),
}

impl Source {
    /// The word in log lines and counters.
    pub fn label(&self) -> &'static str {
        match self {
            Source::Dane(_) | Source::DaneUnusable(_) => "dane",
            Source::MtaSts(_) => "mta-sts",
            Source::MtaStsTesting(..) => "mta-sts-testing",
            Source::Config(TlsMode::Verify) => "verify",
            Source::Config(TlsMode::Required) => "required",
            Source::Config(TlsMode::Opportunistic) => "opportunistic",
            Source::Config(TlsMode::None) => "none",
        }
    }
}

/// The policy for one host.
#[derive(Debug, Clone)]
pub struct HostPolicy {
    pub requirement: Requirement,
    pub source: Source,
}

/// Why a host is not tried at all under the policy (status, text, TLS-RPT type).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    pub status: &'static str,
    pub text: String,
    pub result_type: &'static str,
}

/// Decides the policy for `host` from its DANE lookup (None when DANE is off or the
/// route is static), the domain's MTA-STS view and the configured mode.
pub fn decide(
    host: &str,
    dane: Option<&DaneLookup>,
    sts: &StsView,
    mode: TlsMode,
) -> Result<HostPolicy, Skip> {
    match dane {
        Some(DaneLookup::Usable(set)) => {
            return Ok(HostPolicy {
                requirement: Requirement::Dane(set.clone()),
                source: Source::Dane(set.clone()),
            });
        }
        Some(DaneLookup::Unusable(r)) => {
            return Ok(HostPolicy {
                requirement: Requirement::Encrypt,
                source: Source::DaneUnusable(r.clone()),
            });
        }
        Some(DaneLookup::Failed(kind, text)) => {
            return Err(Skip {
                status: "4.7.5",
                text: text.clone(),
                result_type: kind,
            });
        }
        Some(DaneLookup::NotApplicable) | None => {}
    }
    match &sts.policy {
        Some(p) if p.mode == Mode::Enforce => {
            if !p.allows(host) {
                return Err(Skip {
                    status: "4.7.5",
                    text: format!("MX host {host} is not listed in the domain's MTA-STS policy"),
                    result_type: "validation-failure",
                });
            }
            Ok(HostPolicy {
                requirement: Requirement::Verify,
                source: Source::MtaSts(p.clone()),
            })
        }
        Some(p) => Ok(HostPolicy {
            // testing: deliver as before; the caller reports what enforce would do.
            requirement: Requirement::from_mode(mode),
            source: Source::MtaStsTesting(p.clone(), mode),
        }),
        None => Ok(HostPolicy {
            requirement: Requirement::from_mode(mode),
            source: Source::Config(mode),
        }),
    }
}

/// Under an MTA-STS `testing` policy: the failure `enforce` would have had with a
/// session that proved `s` to `host` (None: it would have passed).
pub fn testing_failure(
    policy: &super::mta_sts::Policy,
    host: &str,
    s: &Security,
) -> Option<(&'static str, String)> {
    if !policy.allows(host) {
        return Some((
            "validation-failure",
            format!("MX host {host} is not listed in the MTA-STS policy"),
        ));
    }
    if s.tls.is_none() {
        return Some(("starttls-not-supported", format!("{host}: no TLS")));
    }
    match &s.webpki {
        Some(Ok(())) => None,
        Some(Err(f)) => Some((f.result_type(), format!("{host}: {f}"))),
        None => Some(("validation-failure", format!("{host}: no certificate seen"))),
    }
}

#[cfg(test)]
mod tests {
    use super::super::certs::Tlsa;
    use super::super::mta_sts::parse_policy;
    use super::*;

    fn tls() -> Option<TlsParams> {
        Some(TlsParams {
            version: "TLSv1_3".into(),
            cipher: "X".into(),
        })
    }

    fn set() -> DaneSet {
        DaneSet::new(vec![Tlsa {
            usage: 3,
            selector: 1,
            matching: 1,
            data: vec![7; 32],
        }])
    }

    /// Every (session, requirement) pair: what may be reused for what.
    #[test]
    fn reuse_table() {
        let plain_untried = Security::default();
        let plain_tried = Security {
            starttls_tried: true,
            ..Default::default()
        };
        let unverified = Security {
            tls: tls(),
            starttls_tried: true,
            webpki: Some(Err(CertFailure::Untrusted)),
            dane: None,
        };
        let verified = Security {
            webpki: Some(Ok(())),
            ..unverified.clone()
        };
        let dane = Security {
            dane: Some(set().fingerprint),
            ..unverified.clone()
        };
        let reqs = [
            Requirement::None,
            Requirement::Opportunistic,
            Requirement::Encrypt,
            Requirement::Verify,
            Requirement::Dane(set()),
        ];
        // rows: sessions; columns: requirements above (same host).
        let table = [
            (&plain_untried, [true, false, false, false, false]),
            (&plain_tried, [true, true, false, false, false]),
            (&unverified, [true, true, true, false, false]),
            (&verified, [true, true, true, true, false]),
            (&dane, [true, true, true, false, true]),
        ];
        for (s, want) in table {
            for (r, w) in reqs.iter().zip(want) {
                assert_eq!(
                    r.satisfied_by(s, "mx.test", "MX.test"),
                    w,
                    "{s:?} for {r:?}"
                );
            }
        }
        // A session verified for another name serves neither verify nor DANE here.
        assert!(!Requirement::Verify.satisfied_by(&verified, "other.test", "mx.test"));
        assert!(!Requirement::Dane(set()).satisfied_by(&dane, "other.test", "mx.test"));
        assert!(Requirement::Encrypt.satisfied_by(&unverified, "other.test", "mx.test"));
    }

    #[test]
    fn precedence_dane_then_sts_then_config() {
        let enforce = StsView {
            policy: Some(Arc::new(
                parse_policy("version: STSv1\nmode: enforce\nmx: mx.test\nmax_age: 60\n").unwrap(),
            )),
            problem: None,
        };
        let none = StsView::default();
        let d = DaneLookup::Usable(set());
        let p = decide("mx.test", Some(&d), &enforce, TlsMode::None).unwrap();
        assert_eq!(p.source.label(), "dane");
        assert_eq!(p.requirement, Requirement::Dane(set()));
        let p = decide(
            "mx.test",
            Some(&DaneLookup::NotApplicable),
            &enforce,
            TlsMode::None,
        )
        .unwrap();
        assert_eq!(
            (p.source.label(), p.requirement),
            ("mta-sts", Requirement::Verify)
        );
        let skip = decide("other.test", None, &enforce, TlsMode::Opportunistic).unwrap_err();
        assert_eq!(skip.status, "4.7.5");
        let p = decide("mx.test", None, &none, TlsMode::Verify).unwrap();
        assert_eq!(
            (p.source.label(), p.requirement),
            ("verify", Requirement::Verify)
        );
        let failed = DaneLookup::Failed("dnssec-invalid", "bogus".into());
        assert!(decide("mx.test", Some(&failed), &none, TlsMode::None).is_err());
        let unusable = DaneLookup::Unusable(vec!["0 0 1 00".into()]);
        let p = decide("mx.test", Some(&unusable), &none, TlsMode::None).unwrap();
        assert_eq!(p.requirement, Requirement::Encrypt);
    }

    #[test]
    fn testing_mode_reports_what_enforce_would_refuse() {
        let p =
            parse_policy("version: STSv1\nmode: testing\nmx: *.dest.test\nmax_age: 60\n").unwrap();
        let ok = Security {
            tls: tls(),
            webpki: Some(Ok(())),
            ..Default::default()
        };
        assert_eq!(testing_failure(&p, "mx.dest.test", &ok), None);
        assert_eq!(
            testing_failure(&p, "mx.other.test", &ok).unwrap().0,
            "validation-failure"
        );
        let plain = Security::default();
        assert_eq!(
            testing_failure(&p, "mx.dest.test", &plain).unwrap().0,
            "starttls-not-supported"
        );
        let expired = Security {
            webpki: Some(Err(CertFailure::Expired)),
            ..ok
        };
        assert_eq!(
            testing_failure(&p, "mx.dest.test", &expired).unwrap().0,
            "certificate-expired"
        );
    }
}
