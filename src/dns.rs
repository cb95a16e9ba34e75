//! The one DNS resolver of the process (hickory), shared by delivery (MX, A/AAAA) and
//! authentication (SPF, reputation through [`Dns`]; DKIM, DMARC, ARC through mail-auth),
//! so all see one cache.
//!
//! Built from `[dns] nameservers` (any `ip:port`, so tests aim it at a loopback
//! server), or from the system's resolv.conf when that list is empty. `[dns] timeout`
//! bounds one query and `[dns] attempts` counts tries (hickory's own `attempts` counts
//! retries: 1 try = 0 retries).
//!
//! [`Dns`] is the front the policy checks use: every lookup ends by a deadline the
//! caller gives (the stage's), classifies the answer as records, void (NXDOMAIN or
//! NODATA) or a temporary failure, and remembers a temporary failure of a name and
//! type for `[dns] temperror_cache` in a bounded map, so a flood of mail naming a
//! broken domain costs one wait, not one per message. It never blocks longer than the
//! deadline and never retries on its own.
//!
//! hickory sends each query from an unconnected UDP socket, where the kernel drops
//! ICMP "port unreachable": a resolver that is down would cost every lookup its full
//! timeout. So while a lookup runs, [`Dns`] also sends one small query to each
//! nameserver from a connected socket, which does see the refusal; when every
//! nameserver refuses, the lookup fails at once ([`Dns::refusal`]). A nameserver that
//! answered is not probed again for [`ANSWERING_FRESH`].
//!
//! DANE needs answers whose DNSSEC status is known: [`build_validating`] makes a
//! second handle over the same servers and options that validates every answer
//! itself (hickory's DNSSEC, trust anchors from `[dns] trust_anchor` or the IANA
//! root keys) and marks each record secure or insecure; a bogus answer is an error.

use crate::config::{Config, DnsConfig};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    NameServerConfig, ProtocolConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::dnssec::TrustAnchors;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use parking_lot::Mutex;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

pub type Resolver = TokioResolver;

/// How many (name, type) temperrors [`Dns`] remembers at most.
pub const TEMPERROR_CACHE_ENTRIES: u64 = 10_000;
/// A nameserver that answered a probe is not probed again for this long.
pub const ANSWERING_FRESH: Duration = Duration::from_secs(30);
/// Nameservers found refusing are taken as refusing for this long, then probed again.
pub const REFUSING_FRESH: Duration = Duration::from_secs(2);

/// The UDP addresses of the nameservers `build` aims the resolver at.
pub fn nameserver_addrs(cfg: &DnsConfig) -> Vec<SocketAddr> {
    if !cfg.nameservers.is_empty() {
        return cfg.nameservers.clone();
    }
    let Ok((conf, _)) = hickory_resolver::system_conf::read_system_conf() else {
        return Vec::new();
    };
    conf.name_servers()
        .iter()
        .flat_map(|ns| {
            ns.connections
                .iter()
                .filter(|c| matches!(c.protocol, ProtocolConfig::Udp))
                .map(|c| SocketAddr::new(ns.ip, c.port))
        })
        .collect()
}

pub fn build(cfg: &Config) -> Result<Resolver, String> {
    builder(cfg)?
        .build()
        .map_err(|e| format!("building resolver: {e}"))
}

/// The DNSSEC-validating handle (DANE's TLSA lookups), same servers and options.
pub fn build_validating(cfg: &Config) -> Result<Resolver, String> {
    let anchors = match &cfg.dns.trust_anchor {
        Some(p) => TrustAnchors::from_file(p)
            .map_err(|e| format!("[dns] trust_anchor {}: {e}", p.display()))?,
        None => TrustAnchors::default(),
    };
    builder(cfg)?
        .with_trust_anchor(Arc::new(anchors))
        .build()
        .map_err(|e| format!("building validating resolver: {e}"))
}

type Builder = hickory_resolver::ResolverBuilder<TokioRuntimeProvider>;

fn builder(cfg: &Config) -> Result<Builder, String> {
    let provider = TokioRuntimeProvider::default();
    let mut builder = if cfg.dns.nameservers.is_empty() {
        TokioResolver::builder(provider).map_err(|e| format!("reading resolv.conf: {e}"))?
    } else {
        let servers = cfg
            .dns
            .nameservers
            .iter()
            .map(|sa| {
                let mut ns = NameServerConfig::udp_and_tcp(sa.ip());
                for c in ns.connections.iter_mut() {
                    c.port = sa.port();
                }
                ns
            })
            .collect();
        let mut b = TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            provider,
        );
        let mut opts = ResolverOpts::default();
        // An explicit resolver list is authoritative: /etc/hosts must not answer.
        opts.use_hosts_file = ResolveHosts::Never;
        *b.options_mut() = opts;
        b
    };
    let opts = builder.options_mut();
    opts.timeout = cfg.dns.timeout;
    // hickory's `attempts` is the number of retries after the first try.
    opts.attempts = cfg.dns.attempts.saturating_sub(1);
    // The cache honours each record's TTL; reputation lookups rely on it.
    opts.cache_size = 10_000;
    // Mail domains are fully qualified: never append a search domain.
    opts.ndots = 0;
    Ok(builder)
}

/// Why a lookup gave no answer. Every variant is temporary (RFC 7208 `temperror`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsFailure {
    #[error("DNS lookup of {0} timed out")]
    Timeout(String),
    #[error("DNS lookup of {0} failed: {1}")]
    Failed(String, String),
    #[error("DNS lookup of {0} failed recently; not asked again yet")]
    Remembered(String),
}

/// What a successful lookup found; an empty list is a void lookup (NXDOMAIN or NODATA).
pub type Answer<T> = Result<Vec<T>, DnsFailure>;

/// The policy checks' view of the resolver (cheap to clone).
#[derive(Clone)]
pub struct Dns {
    inner: Arc<Inner>,
}

struct Inner {
    resolver: Resolver,
    /// (lowercase name, type) → a temporary failure seen within the TTL.
    failed: Option<moka::sync::Cache<(String, RecordType), DnsFailure>>,
    timeouts: AtomicU64,
    /// Where the resolver sends its queries (probed for refusals); empty: no probes.
    servers: Vec<SocketAddr>,
    /// What the last probe found, and when.
    health: Mutex<Option<(Health, Instant)>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    Answering,
    Refusing,
}

impl Dns {
    /// The front of the daemon's resolver: `[dns] temperror_cache`, nameservers probed.
    pub fn new(resolver: Resolver, cfg: &DnsConfig) -> Dns {
        let mut d = Dns::with_memory(resolver, cfg.temperror_cache);
        Arc::get_mut(&mut d.inner).expect("just built").servers = nameserver_addrs(cfg);
        d
    }

    /// `remember` = how long a temporary failure is remembered (zero: not at all).
    pub fn with_memory(resolver: Resolver, remember: Duration) -> Dns {
        let failed = (!remember.is_zero()).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(TEMPERROR_CACHE_ENTRIES)
                .time_to_live(remember)
                .build()
        });
        Dns {
            inner: Arc::new(Inner {
                resolver,
                failed,
                timeouts: AtomicU64::new(0),
                servers: Vec::new(),
                health: Mutex::new(None),
            }),
        }
    }

    pub fn resolver(&self) -> &Resolver {
        &self.inner.resolver
    }

    /// Lookups (and stage deadlines, see [`Dns::note_timeout`]) that ran out of time.
    pub fn timeouts(&self) -> u64 {
        self.inner.timeouts.load(Ordering::Relaxed)
    }

    /// Counts a wait that ran out of time outside [`Dns`] (a stage deadline).
    pub fn note_timeout(&self) {
        self.inner.timeouts.fetch_add(1, Ordering::Relaxed);
    }

    /// TXT records, each the concatenation of its character-strings (RFC 7208 §3.3).
    pub async fn txt(&self, name: &str, deadline: Instant) -> Answer<Vec<u8>> {
        let records = self.lookup(name, RecordType::TXT, deadline).await?;
        Ok(records
            .into_iter()
            .filter_map(|r| match r {
                RData::TXT(t) => Some(t.txt_data.iter().flat_map(|s| s.iter().copied()).collect()),
                _ => None,
            })
            .collect())
    }

    pub async fn a(&self, name: &str, deadline: Instant) -> Answer<Ipv4Addr> {
        let records = self.lookup(name, RecordType::A, deadline).await?;
        Ok(records
            .into_iter()
            .filter_map(|r| match r {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect())
    }

    pub async fn aaaa(&self, name: &str, deadline: Instant) -> Answer<Ipv6Addr> {
        let records = self.lookup(name, RecordType::AAAA, deadline).await?;
        Ok(records
            .into_iter()
            .filter_map(|r| match r {
                RData::AAAA(a) => Some(a.0),
                _ => None,
            })
            .collect())
    }

    /// The addresses of `name` in the family of `like` (A for IPv4, AAAA for IPv6).
    pub async fn addresses(&self, name: &str, like: IpAddr, deadline: Instant) -> Answer<IpAddr> {
        Ok(match like {
            IpAddr::V4(_) => self
                .a(name, deadline)
                .await?
                .into_iter()
                .map(IpAddr::V4)
                .collect(),
            IpAddr::V6(_) => self
                .aaaa(name, deadline)
                .await?
                .into_iter()
                .map(IpAddr::V6)
                .collect(),
        })
    }

    /// MX exchanges in the order received (preference is irrelevant to SPF).
    pub async fn mx(&self, name: &str, deadline: Instant) -> Answer<String> {
        let records = self.lookup(name, RecordType::MX, deadline).await?;
        Ok(records
            .into_iter()
            .filter_map(|r| match r {
                RData::MX(mx) => Some(raw_name(&mx.exchange)),
                _ => None,
            })
            .collect())
    }

    /// PTR names of `ip` (in-addr.arpa / ip6.arpa), in the order received.
    pub async fn ptr(&self, ip: IpAddr, deadline: Instant) -> Answer<String> {
        let name = Name::from(ip);
        let records = self
            .lookup_name(
                Some(name.clone()),
                &raw_name(&name),
                RecordType::PTR,
                deadline,
            )
            .await?;
        Ok(records
            .into_iter()
            .filter_map(|r| match r {
                RData::PTR(p) => Some(raw_name(&p.0)),
                _ => None,
            })
            .collect())
    }

    async fn lookup(&self, name: &str, rtype: RecordType, deadline: Instant) -> Answer<RData> {
        self.lookup_name(query_name(name), name, rtype, deadline)
            .await
    }

    /// One query, bounded by `deadline`; a temporary failure is remembered. `qname`
    /// None: not a name DNS can carry, so nothing can exist there.
    async fn lookup_name(
        &self,
        qname: Option<Name>,
        name: &str,
        rtype: RecordType,
        deadline: Instant,
    ) -> Answer<RData> {
        let key = (name.trim_end_matches('.').to_ascii_lowercase(), rtype);
        let shown = format!("{} {rtype}", key.0);
        if let Some(failed) = &self.inner.failed
            && let Some(f) = failed.get(&key)
        {
            tracing::debug!(lookup = %shown, failure = %f, "DNS temperror remembered");
            return Err(DnsFailure::Remembered(shown));
        }
        let Some(qname) = qname else {
            return Ok(Vec::new());
        };
        if Instant::now() >= deadline {
            // Never asked: nothing to count or remember.
            return Err(DnsFailure::Timeout(shown));
        }
        let lookup = tokio::time::timeout_at(deadline, self.inner.resolver.lookup(qname, rtype));
        let started = std::time::Instant::now();
        let r = tokio::select! {
            r = lookup => r,
            // Not remembered by name: `refusal` keeps the state, briefly.
            () = self.refusal() => {
                return Err(DnsFailure::Failed(shown, REFUSED.into()));
            }
        };
        crate::metrics::metrics()
            .dns
            .get_or_create(&[("purpose", "policy")])
            .observe(crate::metrics::since(started));
        let failure = match r {
            Ok(Ok(l)) => return Ok(l.answers().iter().map(|r| r.data.clone()).collect()),
            Ok(Err(e)) if e.is_no_records_found() => return Ok(Vec::new()),
            Ok(Err(NetError::Timeout)) | Err(_) => {
                self.note_timeout();
                DnsFailure::Timeout(shown)
            }
            Ok(Err(e)) => DnsFailure::Failed(shown, e.to_string()),
        };
        if let Some(failed) = &self.inner.failed {
            failed.insert(key, failure.clone());
        }
        Err(failure)
    }
}

const REFUSED: &str = "every nameserver refuses queries (ICMP port unreachable)";

impl Dns {
    /// Completes when every nameserver refuses queries (found now or moments ago);
    /// never completes while one answers or stays silent. Race it against waits
    /// that only DNS can end.
    pub async fn refusal(&self) {
        let servers = &self.inner.servers;
        let fresh = *self.inner.health.lock();
        match fresh {
            _ if servers.is_empty() => {}
            Some((Health::Refusing, at)) if at.elapsed() < REFUSING_FRESH => return,
            Some((Health::Answering, at)) if at.elapsed() < ANSWERING_FRESH => {}
            _ => {
                let wait = self.inner.resolver.options().timeout;
                let probes =
                    futures_util::future::join_all(servers.iter().map(|s| probe(*s, wait)));
                let found = probes.await;
                let health = if found.iter().all(|p| *p == Some(Health::Refusing)) {
                    Some(Health::Refusing)
                } else if found.contains(&Some(Health::Answering)) {
                    Some(Health::Answering)
                } else {
                    None
                };
                if let Some(h) = health {
                    *self.inner.health.lock() = Some((h, Instant::now()));
                    if h == Health::Refusing {
                        tracing::warn!(servers = ?servers, "{REFUSED}");
                        return;
                    }
                }
            }
        }
        std::future::pending::<()>().await
    }
}

/// One query for the root's NS from a connected UDP socket: `Refusing` when the
/// kernel reports ICMP port unreachable, `Answering` on any datagram, None when the
/// server stays silent for `wait` or the socket cannot be made.
async fn probe(server: SocketAddr, wait: Duration) -> Option<Health> {
    // A DNS query (RFC 1035 §4.1): id, RD set, one question: ". IN NS".
    const QUERY: [u8; 17] = [
        0x74, 0x65, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 1,
    ];
    let local: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = tokio::net::UdpSocket::bind(local).await.ok()?;
    sock.connect(server).await.ok()?;
    let refused = |e: std::io::Error| {
        (e.kind() == std::io::ErrorKind::ConnectionRefused).then_some(Health::Refusing)
    };
    if let Err(e) = sock.send(&QUERY).await {
        return refused(e);
    }
    let mut buf = [0u8; 512];
    match tokio::time::timeout(wait, sock.recv(&mut buf)).await {
        Ok(Ok(_)) => Some(Health::Answering),
        Ok(Err(e)) => refused(e),
        Err(_) => None,
    }
}

/// The labels of `name` as they are on the wire, joined by dots (no escaping, no
/// trailing dot): SPF compares and expands names, it does not print them.
pub fn raw_name(name: &Name) -> String {
    name.iter()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect::<Vec<_>>()
        .join(".")
}

/// A fully qualified query name from raw labels (SPF macro expansion may produce any
/// visible character); None when a label is empty or longer than 63 octets, or the
/// name is longer than 253.
pub fn query_name(name: &str) -> Option<Name> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return None;
    }
    let labels: Vec<&[u8]> = name.split('.').map(str::as_bytes).collect();
    if labels.iter().any(|l| l.is_empty() || l.len() > 63) {
        return None;
    }
    let mut n = Name::from_labels(labels).ok()?;
    n.set_fqdn(true);
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config whose resolver asks only `ns`, one try of `timeout`.
    fn config(ns: SocketAddr, timeout: Duration) -> Config {
        let mut cfg = Config::default();
        cfg.dns.nameservers = vec![ns];
        cfg.dns.timeout = timeout;
        cfg.dns.attempts = 1;
        cfg
    }

    /// A UDP port on 127.0.0.1 where nothing listens.
    fn closed_port() -> SocketAddr {
        std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    #[tokio::test]
    async fn probes_tell_refusing_answering_and_silent_apart() {
        let wait = Duration::from_secs(5);
        assert_eq!(probe(closed_port(), wait).await, Some(Health::Refusing));
        let echo = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            if let Ok((n, from)) = echo.recv_from(&mut buf).await {
                let _ = echo.send_to(&buf[..n], from).await;
            }
        });
        assert_eq!(probe(echo_addr, wait).await, Some(Health::Answering));
        let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let silent_addr = silent.local_addr().unwrap();
        assert_eq!(probe(silent_addr, Duration::from_millis(100)).await, None);
    }

    #[tokio::test]
    async fn a_refusing_resolver_fails_the_lookup_not_by_timeout() {
        let cfg = config(closed_port(), Duration::from_secs(5));
        let dns = Dns::new(build(&cfg).unwrap(), &cfg.dns);
        let deadline = Instant::now() + Duration::from_secs(30);
        let r = dns.txt("example.org", deadline).await;
        assert!(
            matches!(&r, Err(DnsFailure::Failed(_, why)) if why == REFUSED),
            "{r:?}"
        );
        assert_eq!(dns.timeouts(), 0);
        // Not remembered by name (the refusal is, for REFUSING_FRESH): a resolver that
        // comes back is used at once.
        let again = dns.a("example.org", deadline).await;
        assert!(
            matches!(&again, Err(DnsFailure::Failed(_, why)) if why == REFUSED),
            "{again:?}"
        );
    }

    #[tokio::test]
    async fn a_timeout_is_counted_and_remembered_per_name_and_type() {
        let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let cfg = config(silent.local_addr().unwrap(), Duration::from_secs(5));
        let dns = Dns::new(build(&cfg).unwrap(), &cfg.dns);
        let soon = || Instant::now() + Duration::from_millis(200);
        let r = dns.txt("broken.example", soon()).await;
        assert!(matches!(r, Err(DnsFailure::Timeout(_))), "{r:?}");
        assert_eq!(dns.timeouts(), 1);
        let r = dns.txt("BROKEN.example.", soon()).await;
        assert!(matches!(r, Err(DnsFailure::Remembered(_))), "{r:?}");
        // Another type of the same name is asked (and times out) on its own.
        let r = dns.a("broken.example", soon()).await;
        assert!(matches!(r, Err(DnsFailure::Timeout(_))), "{r:?}");
        assert_eq!(dns.timeouts(), 2);
        // A deadline already past asks nothing and remembers nothing.
        let r = dns.mx("other.example", Instant::now()).await;
        assert!(matches!(r, Err(DnsFailure::Timeout(_))), "{r:?}");
        assert_eq!(dns.timeouts(), 2);
        let off = Dns::with_memory(build(&cfg).unwrap(), Duration::ZERO);
        for _ in 0..2 {
            let r = off.txt("broken.example", soon()).await;
            assert!(matches!(r, Err(DnsFailure::Timeout(_))), "{r:?}");
        }
    }

    #[test]
    fn query_names() {
        assert!(query_name("example.com").is_some());
        assert!(query_name("example.com.").is_some());
        assert!(query_name("macro%percent  space%20url-space.example.com").is_some());
        assert!(query_name("a..b").is_none());
        assert!(query_name("").is_none());
        assert!(query_name(&format!("{}.com", "a".repeat(64))).is_none());
        assert!(query_name(&format!("{}.com", "a".repeat(63))).is_some());
    }
}
