//! The one DNS resolver of the process (hickory), shared by delivery (MX, A/AAAA) and
//! authentication (SPF, DKIM, DMARC through mail-auth), so both see one cache.
//!
//! Built from `[dns] nameservers` (any `ip:port`, so tests aim it at a loopback
//! server), or from the system's resolv.conf when that list is empty.

use crate::config::Config;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;

pub type Resolver = TokioResolver;

pub fn build(cfg: &Config) -> Result<Resolver, String> {
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
    opts.attempts = 2;
    // The cache honours each record's TTL; reputation lookups rely on it.
    opts.cache_size = 10_000;
    // Mail domains are fully qualified: never append a search domain.
    opts.ndots = 0;
    builder
        .build()
        .map_err(|e| format!("building resolver: {e}"))
}
