//! The talk's reputation lookups in DNS: DNSBL zones queried with the reversed
//! client address, and rating zones queried with the MAIL FROM domain for TXT answers
//! like `"Status: Good"` / `"Rating: 100"`.
//!
//! Lookups go through the shared resolver, whose cache honours the records' TTLs;
//! every zone is asked at once and each answer waits at most until the MAIL stage's
//! deadline (a zone that timed out is remembered briefly by [`Dns`] and not asked
//! again meanwhile). DNS failure never blocks mail: a list that cannot be asked
//! counts as no hit, and the failure is logged (fail open).

use super::Auth;
use crate::config::{ListAction, ReputationConfig};
use crate::dns::Dns;
use futures_util::future::join_all;
use std::net::IpAddr;
use tokio::time::Instant;

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

impl Auth {
    /// Reputation of the client address and the sender's domain, bounded by `deadline`.
    pub async fn reputation(&self, ip: IpAddr, sender: &str, deadline: Instant) -> Vec<Hit> {
        let r = &self.cfg.reputation;
        if r.ip_lists.is_empty() && r.domain_ratings.is_empty() {
            return Vec::new();
        }
        let domain = sender.rsplit_once('@').map(|(_, d)| d);
        check(r, &self.dns, ip, domain, deadline).await
    }
}

/// Asks every DNSBL and rating zone in parallel; the hits in configuration order.
pub async fn check(
    cfg: &ReputationConfig,
    dns: &Dns,
    ip: IpAddr,
    sender_domain: Option<&str>,
    deadline: Instant,
) -> Vec<Hit> {
    let lists = join_all(
        cfg.ip_lists
            .iter()
            .map(|l| ip_list(dns, ip, &l.zone, l.action, deadline)),
    );
    let ratings = join_all(cfg.domain_ratings.iter().filter_map(|r| {
        let domain = sender_domain?;
        Some(rating(
            dns,
            domain,
            &r.zone,
            r.min_rating,
            r.action,
            deadline,
        ))
    }));
    let (lists, ratings) = tokio::join!(lists, ratings);
    lists.into_iter().chain(ratings).flatten().collect()
}

/// A DNSBL: an A record at the reversed address lists it; its TXT is the reason.
async fn ip_list(
    dns: &Dns,
    ip: IpAddr,
    zone: &str,
    action: ListAction,
    deadline: Instant,
) -> Option<Hit> {
    let name = dnsbl_name(ip, zone);
    match dns.a(&name, deadline).await {
        Ok(a) if !a.is_empty() => {
            let reason = dns.txt(&name, deadline).await.ok().and_then(|t| {
                t.into_iter()
                    .next()
                    .map(|r| String::from_utf8_lossy(&r).into_owned())
            });
            Some(Hit {
                zone: zone.to_string(),
                reason: reason.unwrap_or_else(|| format!("{ip} is listed")),
                action,
            })
        }
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(%zone, %ip, error = %e, "DNSBL lookup failed; not blocking (fail open)");
            None
        }
    }
}

/// A rating zone: TXT `Status:`/`Rating:` at `<domain>.<zone>`.
async fn rating(
    dns: &Dns,
    domain: &str,
    zone: &str,
    min: i64,
    action: ListAction,
    deadline: Instant,
) -> Option<Hit> {
    let name = format!(
        "{}.{}.",
        domain.trim_end_matches('.'),
        zone.trim_end_matches('.')
    );
    match dns.txt(&name, deadline).await {
        Ok(t) => {
            let t: Vec<String> = t
                .iter()
                .map(|r| String::from_utf8_lossy(r).into_owned())
                .collect();
            rating_hit(&t, min).map(|reason| Hit {
                zone: zone.to_string(),
                reason: format!("{domain}: {reason}"),
                action,
            })
        }
        Err(e) => {
            tracing::warn!(%zone, domain, error = %e, "rating lookup failed; not blocking (fail open)");
            None
        }
    }
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
