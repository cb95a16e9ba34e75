//! The talk's reputation lookups in DNS: DNSBL zones queried with the reversed
//! client address, and rating zones queried with the MAIL FROM domain for TXT answers
//! like `"Status: Good"` / `"Rating: 100"`.
//!
//! Lookups go through the shared resolver, whose cache honours the records' TTLs.
//! DNS failure never blocks mail: a list that cannot be asked counts as no hit, and
//! the failure is logged (fail open).

use crate::config::{ListAction, ReputationConfig};
use crate::dns::Resolver;
use hickory_resolver::proto::rr::RData;
use std::net::IpAddr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    pub zone: String,
    pub reason: String,
    pub action: ListAction,
}

/// `4.3.2.1.zone.` for 1.2.3.4, nibbles for IPv6 (RFC 5782 §2.4).
pub fn dnsbl_name(ip: IpAddr, zone: &str) -> String {
    let zone = zone.trim_end_matches('.');
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.{zone}.", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut s = String::new();
            for b in v6.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", b & 0xf, b >> 4));
            }
            format!("{s}{zone}.")
        }
    }
}

/// Reads `Status: …` and `Rating: N` from rating TXT strings; a hit when the status
/// is not good or the rating is below `min`.
pub fn rating_hit(txts: &[String], min: i64) -> Option<String> {
    let mut status = None;
    let mut rating = None;
    for t in txts {
        for part in t.split([';', ',', '\n']) {
            if let Some((k, v)) = part.split_once(':') {
                match k.trim().to_ascii_lowercase().as_str() {
                    "status" => status = Some(v.trim().to_string()),
                    "rating" => rating = v.trim().parse::<i64>().ok(),
                    _ => {}
                }
            }
        }
    }
    let bad_status = status.as_ref().filter(|s| !s.eq_ignore_ascii_case("good"));
    let low = rating.filter(|r| *r < min);
    match (bad_status, low) {
        (None, None) => None,
        _ => Some(format!(
            "status {}, rating {}",
            status.as_deref().unwrap_or("-"),
            rating.map_or("-".to_string(), |r| r.to_string())
        )),
    }
}

async fn txts(
    resolver: &Resolver,
    name: &str,
) -> Result<Vec<String>, hickory_resolver::net::NetError> {
    let l = resolver.txt_lookup(name).await?;
    Ok(l.answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::TXT(t) => Some(
                t.txt_data
                    .iter()
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .collect(),
            ),
            _ => None,
        })
        .collect())
}

pub async fn check(
    cfg: &ReputationConfig,
    resolver: &Resolver,
    ip: IpAddr,
    sender_domain: Option<&str>,
) -> Vec<Hit> {
    let mut hits = Vec::new();
    for list in &cfg.ip_lists {
        let name = dnsbl_name(ip, &list.zone);
        match resolver.ipv4_lookup(name.as_str()).await {
            Ok(l) if !l.answers().is_empty() => {
                let reason = txts(resolver, &name)
                    .await
                    .ok()
                    .and_then(|t| t.into_iter().next());
                hits.push(Hit {
                    zone: list.zone.clone(),
                    reason: reason.unwrap_or_else(|| format!("{ip} is listed")),
                    action: list.action,
                });
            }
            Ok(_) => {}
            Err(e) if e.is_no_records_found() => {}
            Err(e) => {
                tracing::warn!(zone = %list.zone, %ip, error = %e, "DNSBL lookup failed; not blocking (fail open)")
            }
        }
    }
    if let Some(domain) = sender_domain {
        for r in &cfg.domain_ratings {
            let name = format!(
                "{}.{}.",
                domain.trim_end_matches('.'),
                r.zone.trim_end_matches('.')
            );
            match txts(resolver, &name).await {
                Ok(t) => {
                    if let Some(reason) = rating_hit(&t, r.min_rating) {
                        hits.push(Hit {
                            zone: r.zone.clone(),
                            reason: format!("{domain}: {reason}"),
                            action: r.action,
                        });
                    }
                }
                Err(e) if e.is_no_records_found() => {}
                Err(e) => {
                    tracing::warn!(zone = %r.zone, domain, error = %e, "rating lookup failed; not blocking (fail open)")
                }
            }
        }
    }
    hits
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            dnsbl_name("192.0.2.99".parse().unwrap(), "bl.test"),
            "99.2.0.192.bl.test."
        );
        let v6 = dnsbl_name("2001:db8::1".parse().unwrap(), "bl.test.");
        assert!(v6.starts_with("1.0.0.0.0.0.0.0"), "{v6}");
        assert!(v6.ends_with("8.b.d.0.1.0.0.2.bl.test."), "{v6}");
    }

    #[test]
    fn ratings() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(rating_hit(&s(&["Status: Good", "Rating: 100"]), 50), None);
        assert!(rating_hit(&s(&["Status: Bad"]), 50).is_some());
        assert!(rating_hit(&s(&["Status: Good; Rating: 10"]), 50).is_some());
        assert_eq!(rating_hit(&s(&["unrelated"]), 50), None);
    }
}
