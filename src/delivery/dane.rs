//! DANE for SMTP (RFC 7672): the TLSA records of one MX host, looked up through the
//! DNSSEC-validating resolver handle, and what they demand of the session.
//!
//! Only records that validate as secure count. Secure usable records (DANE-TA or
//! DANE-EE) make TLS mandatory and their match mandatory; secure records that are all
//! unusable make TLS mandatory without authentication (RFC 7672 §2.2); an insecure
//! answer or a denial of existence means no DANE for the host (the next policy in
//! line applies); a bogus answer or a failed lookup makes the host unusable for this
//! attempt (RFC 7672 §2.2.1: never a quiet downgrade). Nothing here connects.

use super::certs::Tlsa;
use crate::dns::Resolver;
use hickory_resolver::proto::rr::{RData, RecordType};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// The secure, usable TLSA records of one host, with a fingerprint that tells a
/// reused session whether it proved this very set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaneSet {
    pub records: Arc<Vec<Tlsa>>,
    pub fingerprint: u64,
}

impl DaneSet {
    pub fn new(mut records: Vec<Tlsa>) -> DaneSet {
        records.sort_by(|a, b| {
            (a.usage, a.selector, a.matching, &a.data)
                .cmp(&(b.usage, b.selector, b.matching, &b.data))
        });
        records.dedup();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        records.hash(&mut h);
        DaneSet {
            fingerprint: h.finish(),
            records: Arc::new(records),
        }
    }

    /// The records in presentation form (TLS-RPT `policy-string`).
    pub fn strings(&self) -> Vec<String> {
        self.records.iter().map(|t| t.to_string()).collect()
    }
}

/// What the TLSA lookup of one host says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DaneLookup {
    /// Secure and usable: TLS mandatory, the chain must match.
    Usable(DaneSet),
    /// Secure, but no record is usable: TLS mandatory, no authentication.
    Unusable(Vec<String>),
    /// No secure records: DANE does not apply to this host.
    NotApplicable,
    /// Bogus or failed: the host must not be used now (TLS-RPT result type, text).
    Failed(&'static str, String),
}

/// The TLSA query name for an SMTP server (RFC 7672 §2.2.3 / RFC 6698 §3).
pub fn tlsa_name(host: &str, port: u16) -> String {
    format!("_{port}._tcp.{}.", host.trim_end_matches('.'))
}

/// Looks up `_port._tcp.host` TLSA through the validating resolver.
pub async fn lookup(resolver: &Resolver, host: &str, port: u16) -> DaneLookup {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return DaneLookup::NotApplicable;
    }
    let name = tlsa_name(host, port);
    match resolver.lookup(name.as_str(), RecordType::TLSA).await {
        Ok(l) => classify(l.answers().iter().filter_map(|r| match &r.data {
            RData::TLSA(t) => Some((r.proof.is_secure(), to_tlsa(t))),
            _ => None,
        })),
        Err(e) if e.is_no_records_found() => DaneLookup::NotApplicable,
        Err(e) => {
            use hickory_resolver::net::{DnsError, NetError};
            let bogus = matches!(e, NetError::Dns(DnsError::DnssecBogus));
            let kind = if bogus {
                "dnssec-invalid"
            } else {
                "tlsa-invalid"
            };
            DaneLookup::Failed(kind, format!("TLSA lookup of {name} failed: {e}"))
        }
    }
}

fn to_tlsa(t: &hickory_resolver::proto::rr::rdata::TLSA) -> Tlsa {
    Tlsa {
        usage: u8::from(t.cert_usage),
        selector: u8::from(t.selector),
        matching: u8::from(t.matching),
        data: t.cert_data.clone(),
    }
}

/// Decides from (secure?, record) pairs: every record must be secure for DANE.
pub fn classify(records: impl Iterator<Item = (bool, Tlsa)>) -> DaneLookup {
    let records: Vec<(bool, Tlsa)> = records.collect();
    if records.is_empty() || records.iter().any(|(secure, _)| !secure) {
        return DaneLookup::NotApplicable;
    }
    let (usable, unusable): (Vec<Tlsa>, Vec<Tlsa>) = records
        .into_iter()
        .map(|(_, t)| t)
        .partition(|t| t.is_usable());
    if usable.is_empty() {
        return DaneLookup::Unusable(unusable.iter().map(|t| t.to_string()).collect());
    }
    DaneLookup::Usable(DaneSet::new(usable))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(usage: u8) -> Tlsa {
        Tlsa {
            usage,
            selector: 1,
            matching: 1,
            data: vec![usage; 32],
        }
    }

    #[test]
    fn only_all_secure_records_count() {
        assert_eq!(classify(vec![].into_iter()), DaneLookup::NotApplicable);
        assert_eq!(
            classify(vec![(true, t(3)), (false, t(2))].into_iter()),
            DaneLookup::NotApplicable
        );
        match classify(vec![(true, t(3)), (true, t(1))].into_iter()) {
            DaneLookup::Usable(s) => assert_eq!(*s.records, vec![t(3)]),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            classify(vec![(true, t(0)), (true, t(1))].into_iter()),
            DaneLookup::Unusable(_)
        ));
    }

    #[test]
    fn set_fingerprint_ignores_order_and_duplicates() {
        let a = DaneSet::new(vec![t(3), t(2)]);
        let b = DaneSet::new(vec![t(2), t(3), t(2)]);
        assert_eq!(a, b);
        assert_ne!(a.fingerprint, DaneSet::new(vec![t(3)]).fingerprint);
        assert_eq!(tlsa_name("mx.dest.test.", 25), "_25._tcp.mx.dest.test.");
    }
}
