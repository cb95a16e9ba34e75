//! Where a domain's mail goes: static routes, the smart host, or MX (RFC 5321 §5.1).
//!
//! Order: `[delivery] routes` (exact domain, then `"*"`), then `relay_host`, then MX.
//! MX hosts are tried by preference, in random order among equal preferences; a null
//! MX (RFC 7505) and NXDOMAIN are permanent failures; a domain without MX falls back
//! to its A/AAAA records. Only names are resolved here; nothing connects.

use crate::config::Config;
use crate::dns::Resolver;
use crate::smtp::address::split_host_port;
use hickory_resolver::proto::rr::RData;
use rand::seq::SliceRandom;
use std::net::{IpAddr, SocketAddr};

/// One host to try, with its addresses in the order to try them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    pub addrs: Vec<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// Will never work: the DSN says so (status, text).
    Permanent(&'static str, String),
    /// DNS trouble: try again later.
    Temporary(&'static str, String),
}

async fn host_addrs(
    resolver: &Resolver,
    host: &str,
    port: u16,
) -> Result<Vec<SocketAddr>, RouteError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let started = std::time::Instant::now();
    let answer = resolver.lookup_ip(fqdn(host)).await;
    observe_dns(started);
    match answer {
        Ok(l) => {
            // IPv4 first: most forwarding hosts have no outbound IPv6 route.
            let mut v: Vec<IpAddr> = l.iter().collect();
            v.sort_by_key(|ip| ip.is_ipv6());
            Ok(v.into_iter().map(|ip| SocketAddr::new(ip, port)).collect())
        }
        Err(e) if e.is_nx_domain() => Err(RouteError::Permanent(
            "5.1.2",
            format!("host {host} not found (NXDOMAIN)"),
        )),
        Err(e) if e.is_no_records_found() => Err(RouteError::Permanent(
            "5.1.2",
            format!("host {host} has no address records"),
        )),
        Err(e) => Err(RouteError::Temporary(
            "4.4.3",
            format!("DNS lookup of {host} failed: {e}"),
        )),
    }
}

fn fqdn(name: &str) -> String {
    if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    }
}

/// The static next hop for `domain`, if the config names one.
pub fn static_hop(cfg: &Config, domain: &str) -> Option<(String, u16)> {
    let d = domain.to_lowercase();
    cfg.delivery
        .routes
        .get(&d)
        .or_else(|| cfg.delivery.routes.get("*"))
        .or(cfg.delivery.relay_host.as_ref())
        .and_then(|hop| split_host_port(hop))
}

/// Resolves the ordered list of hosts for a destination domain.
pub async fn resolve(
    cfg: &Config,
    resolver: &Resolver,
    domain: &str,
) -> Result<Vec<Host>, RouteError> {
    if let Some((host, port)) = static_hop(cfg, domain) {
        let addrs = host_addrs(resolver, &host, port).await?;
        return Ok(vec![Host { name: host, addrs }]);
    }
    let port = cfg.delivery.port;
    let started = std::time::Instant::now();
    let answer = resolver.mx_lookup(fqdn(domain)).await;
    observe_dns(started);
    let mx = match answer {
        Ok(l) => l
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
                _ => None,
            })
            .collect::<Vec<_>>(),
        Err(e) if e.is_nx_domain() => {
            return Err(RouteError::Permanent(
                "5.1.2",
                format!("domain {domain} does not exist (NXDOMAIN)"),
            ));
        }
        Err(e) if e.is_no_records_found() => Vec::new(),
        Err(e) => {
            return Err(RouteError::Temporary(
                "4.4.3",
                format!("MX lookup for {domain} failed: {e}"),
            ));
        }
    };
    if mx.iter().any(|(_, x)| x == "." || x.is_empty()) {
        return Err(RouteError::Permanent(
            "5.1.10",
            format!("domain {domain} accepts no mail (null MX, RFC 7505)"),
        ));
    }
    if mx.is_empty() {
        // RFC 5321 §5.1: no MX means the domain itself is the host.
        let addrs = host_addrs(resolver, domain, port).await?;
        return Ok(vec![Host {
            name: domain.to_string(),
            addrs,
        }]);
    }
    let order = order_mx(mx);
    let mut hosts = Vec::new();
    let mut last_err = None;
    for name in order {
        let name = name.trim_end_matches('.').to_string();
        match host_addrs(resolver, &name, port).await {
            Ok(addrs) if !addrs.is_empty() => hosts.push(Host { name, addrs }),
            Ok(_) => {}
            Err(e) => last_err = Some(e),
        }
    }
    if hosts.is_empty() {
        // Every MX host failed to resolve: a broken DNS setup is usually fixed, so
        // this stays temporary unless all of them are definitely absent.
        return Err(match last_err {
            Some(RouteError::Permanent(_, t)) => RouteError::Temporary("4.4.4", t),
            Some(e) => e,
            None => RouteError::Temporary("4.4.4", format!("no MX host of {domain} resolves")),
        });
    }
    Ok(hosts)
}

/// Sorts MX records by preference, shuffling equal preferences (RFC 5321 §5.1).
pub fn order_mx(mut mx: Vec<(u16, String)>) -> Vec<String> {
    mx.shuffle(&mut rand::rng());
    mx.sort_by_key(|(p, _)| *p);
    let mut out: Vec<String> = Vec::new();
    for (_, x) in mx {
        if !out.contains(&x) {
            out.push(x);
        }
    }
    out
}

/// `tenso_dns_lookup_seconds{purpose="delivery"}`.
fn observe_dns(started: std::time::Instant) {
    crate::metrics::metrics()
        .dns
        .get_or_create(&[("purpose", "delivery")])
        .observe(crate::metrics::since(started));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mx_order_by_preference() {
        for _ in 0..20 {
            let o = order_mx(vec![
                (20, "c.".into()),
                (10, "a.".into()),
                (10, "b.".into()),
                (30, "d.".into()),
            ]);
            assert_eq!(o.len(), 4);
            assert!(o[..2].contains(&"a.".to_string()) && o[..2].contains(&"b.".to_string()));
            assert_eq!(o[2..], ["c.".to_string(), "d.".to_string()]);
        }
    }

    #[test]
    fn static_routes_first() {
        let mut cfg = Config::default();
        cfg.delivery
            .routes
            .insert("dest.test".into(), "127.0.0.1:2626".into());
        assert_eq!(
            static_hop(&cfg, "DEST.test"),
            Some(("127.0.0.1".into(), 2626))
        );
        assert_eq!(static_hop(&cfg, "other.test"), None);
        cfg.delivery.relay_host = Some("smart:587".into());
        assert_eq!(static_hop(&cfg, "other.test"), Some(("smart".into(), 587)));
        cfg.delivery.routes.insert("*".into(), "all:25".into());
        assert_eq!(static_hop(&cfg, "other.test"), Some(("all".into(), 25)));
    }
}
