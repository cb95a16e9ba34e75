//! DNS lookups of the DATA-stage checks (DKIM keys, DMARC records, the existence test
//! behind DMARC's `np=`), each answer sorted into the three classes the RFCs reason
//! in: records found, nothing there (NXDOMAIN or NODATA), or a temporary failure.
//!
//! Independent lookups run concurrently: [`txt_many`] asks every name at once and
//! [`domain_exists`] asks A, AAAA and MX at once. Every lookup is bounded by the shared
//! resolver's timeout and attempts (`[dns]`); nothing here retries on its own, and
//! nothing here caches beyond the resolver's TTL cache.

use crate::dns::Resolver;
use futures_util::future::join_all;
use hickory_resolver::proto::rr::RData;
use std::collections::HashMap;

/// The outcome of one TXT lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Txt {
    /// Each TXT record with its character-strings joined (RFC 6376 §3.6.2.2,
    /// RFC 7489 §6.6.3), in the order the server gave them.
    Found(Vec<Vec<u8>>),
    /// NXDOMAIN, or the name exists without TXT records.
    NotFound,
    /// SERVFAIL, timeout, network trouble: a later attempt may answer.
    TempError(String),
}

/// Looks up the TXT records of `name` (a fully qualified name, trailing dot optional).
pub async fn txt(resolver: &Resolver, name: &str) -> Txt {
    let fqdn = if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    };
    match resolver.txt_lookup(fqdn).await {
        Ok(l) => {
            let records: Vec<Vec<u8>> = l
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TXT(t) => {
                        Some(t.txt_data.iter().flat_map(|s| s.iter().copied()).collect())
                    }
                    _ => None,
                })
                .collect();
            if records.is_empty() {
                Txt::NotFound
            } else {
                Txt::Found(records)
            }
        }
        Err(e) if e.is_no_records_found() || e.is_nx_domain() => Txt::NotFound,
        Err(e) => Txt::TempError(e.to_string()),
    }
}

/// Looks up every distinct name at once; the map holds one answer per name (the keys
/// are lowercased, so `S1._domainkey.Example.org` and `s1._domainkey.example.org`
/// share a lookup).
pub async fn txt_many(resolver: &Resolver, names: Vec<String>) -> HashMap<String, Txt> {
    let mut distinct: Vec<String> = names.into_iter().map(|n| n.to_ascii_lowercase()).collect();
    distinct.sort();
    distinct.dedup();
    let answers = join_all(distinct.iter().map(|n| txt(resolver, n))).await;
    distinct.into_iter().zip(answers).collect()
}

/// Whether `domain` exists for DMARC's `np=` (RFC 9091 §2.1, DMARCbis): it does unless
/// A, AAAA and MX all come back NXDOMAIN or NODATA. A temporary failure of any of the
/// three counts as "exists", so DNS trouble never selects the stricter policy.
pub async fn domain_exists(resolver: &Resolver, domain: &str) -> bool {
    let fqdn = format!("{}.", domain.trim_end_matches('.'));
    let (a, aaaa, mx) = tokio::join!(
        resolver.ipv4_lookup(fqdn.clone()),
        resolver.ipv6_lookup(fqdn.clone()),
        resolver.mx_lookup(fqdn),
    );
    let gone = |r: Result<usize, hickory_resolver::net::NetError>| match r {
        Ok(n) => n == 0,
        Err(e) => e.is_no_records_found() || e.is_nx_domain(),
    };
    !(gone(a.map(|l| l.answers().len()))
        && gone(aaaa.map(|l| l.answers().len()))
        && gone(mx.map(|l| l.answers().len())))
}
