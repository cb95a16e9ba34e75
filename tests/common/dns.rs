//! In-process authoritative DNS server for tests (hickory-server 0.26).
//!
//! One root zone "." holds every record, so any name that was not defined gets a real
//! NXDOMAIN, and a defined name queried for another type gets NODATA (NOERROR, no answer).
//! UDP and TCP are served on the same 127.0.0.1 port.
//!
//! ```ignore
//! let dns = TestDns::builder()
//!     .mx("alias.test", 10, "mx1.dest.test")
//!     .a("mx1.dest.test", "127.0.0.1")
//!     .txt("alias.test", "v=spf1 ip4:127.0.0.1 ~all")
//!     .null_mx("nullmx.test")
//!     .blackhole("slow.test")
//!     .spf("legacy.test", &["v=spf1 -all"])      // type 99, never asked by tenso
//!     .timeout_except("half.test", &[RecordType::TXT])  // TXT answered, rest silent
//!     .start()
//!     .await;
//! let toml = dns.resolver_config_toml(); // nameservers = ["127.0.0.1:PORT"]
//! ```
#![allow(dead_code)]

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Header, HeaderCounts, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, CNAME, MX, NULL, PTR, SOA, TXT};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{
    AxfrPolicy, Catalog, MessageResponseBuilder, ZoneHandler, ZoneType,
};
use tokio::net::{TcpListener, UdpSocket};

/// Default TTL of the records (seconds); change it with [`TestDnsBuilder::ttl`].
pub const DEFAULT_TTL: u32 = 60;

/// Parses a domain name (UTF-8 allowed, converted to punycode) and makes it fully qualified.
pub fn fqdn(name: &str) -> Name {
    let mut n = Name::from_utf8(name).unwrap_or_else(|e| panic!("bad DNS name {name:?}: {e}"));
    n.set_fqdn(true);
    n
}

/// A name from raw labels, any bytes allowed (for names like `foo:bar/baz.example.com`
/// or labels with spaces that test data may hold); "" and "." are the root.
pub fn raw_name(name: &str) -> Name {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return Name::root();
    }
    let mut n = Name::from_labels(name.split('.').map(str::as_bytes))
        .unwrap_or_else(|e| panic!("bad DNS name {name:?}: {e}"));
    n.set_fqdn(true);
    n
}

/// TXT record data from character-strings given as bytes (none at all is allowed).
pub fn txt_strings_rdata(strings: &[Vec<u8>]) -> RData {
    RData::TXT(TXT::from_bytes(strings.iter().map(Vec::as_slice).collect()))
}

/// SPF (type 99, RFC 4408) record data: the TXT wire format under the retired type.
pub fn spf_rdata(strings: &[Vec<u8>]) -> RData {
    let mut wire = Vec::new();
    for s in strings {
        for chunk in s.chunks(255) {
            wire.push(chunk.len() as u8);
            wire.extend_from_slice(chunk);
        }
    }
    RData::Unknown {
        code: RecordType::Unknown(99),
        // `NULL::with` refuses empty data (an SPF record without strings).
        rdata: if wire.is_empty() {
            NULL::new()
        } else {
            NULL::with(wire)
        },
    }
}

/// MX record data; `exchange` "." makes a null MX (RFC 7505).
pub fn mx_rdata(preference: u16, exchange: &str) -> RData {
    RData::MX(MX::new(preference, fqdn(exchange)))
}

/// TXT record data; values longer than 255 bytes are split into several character-strings.
pub fn txt_rdata(value: &str) -> RData {
    let bytes = value.as_bytes();
    let chunks: Vec<&[u8]> = if bytes.is_empty() {
        vec![b""]
    } else {
        bytes.chunks(255).collect()
    };
    RData::TXT(TXT::from_bytes(chunks))
}

/// A or AAAA record data, chosen by the address family of `ip`.
pub fn ip_rdata(ip: &str) -> RData {
    match ip
        .parse::<IpAddr>()
        .unwrap_or_else(|e| panic!("bad IP {ip:?}: {e}"))
    {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    }
}

/// Builder for [`TestDns`]; every method adds to the root zone or to the handler rules.
pub struct TestDnsBuilder {
    records: Vec<(Name, Option<u32>, RData)>,
    blackholes: Vec<Name>,
    servfails: Vec<Name>,
    timeouts: Vec<(Name, Vec<RecordType>)>,
    ttl: u32,
}

impl TestDnsBuilder {
    /// TTL (seconds) for records that have no explicit TTL; default [`DEFAULT_TTL`].
    pub fn ttl(mut self, secs: u32) -> Self {
        self.ttl = secs;
        self
    }

    /// Adds any record data at `name` (escape hatch for types without a helper).
    pub fn record(mut self, name: &str, rdata: RData) -> Self {
        self.records.push((fqdn(name), None, rdata));
        self
    }

    /// Adds any record data at `name` with its own TTL.
    pub fn record_ttl(mut self, name: &str, ttl: u32, rdata: RData) -> Self {
        self.records.push((fqdn(name), Some(ttl), rdata));
        self
    }

    /// Adds `name MX preference exchange`.
    pub fn mx(self, name: &str, preference: u16, exchange: &str) -> Self {
        self.record(name, mx_rdata(preference, exchange))
    }

    /// Adds a null MX (`name MX 0 .`, RFC 7505).
    pub fn null_mx(self, name: &str) -> Self {
        self.record(name, mx_rdata(0, "."))
    }

    /// Adds `name A ip` (panics if `ip` is not IPv4).
    pub fn a(self, name: &str, ip: &str) -> Self {
        let rdata = ip_rdata(ip);
        assert!(matches!(rdata, RData::A(_)), "a({name}, {ip}): not IPv4");
        self.record(name, rdata)
    }

    /// Adds `name AAAA ip` (panics if `ip` is not IPv6).
    pub fn aaaa(self, name: &str, ip: &str) -> Self {
        let rdata = ip_rdata(ip);
        assert!(
            matches!(rdata, RData::AAAA(_)),
            "aaaa({name}, {ip}): not IPv6"
        );
        self.record(name, rdata)
    }

    /// Adds `name TXT value`, split into 255-byte character-strings when longer.
    pub fn txt(self, name: &str, value: &str) -> Self {
        self.record(name, txt_rdata(value))
    }

    /// Adds `name CNAME target`.
    pub fn cname(self, name: &str, target: &str) -> Self {
        self.record(name, RData::CNAME(CNAME(fqdn(target))))
    }

    /// Adds a PTR record for `ip` (in-addr.arpa / ip6.arpa) pointing to `target`.
    ///
    /// Note: hickory-resolver answers PTR for 127.0.0.0/8 and ::1 itself ("localhost.")
    /// without asking any server, so such records are never seen through it.
    pub fn ptr(self, ip: &str, target: &str) -> Self {
        let ip: IpAddr = ip.parse().unwrap_or_else(|e| panic!("bad IP {ip:?}: {e}"));
        let name = Name::from(ip);
        let mut s = self;
        s.records.push((name, None, RData::PTR(PTR(fqdn(target)))));
        s
    }

    /// Queries for `name` or any name below it are never answered (for DNS timeout tests).
    pub fn blackhole(mut self, name: &str) -> Self {
        self.blackholes.push(fqdn(name));
        self
    }

    /// Adds any record data at a name taken as raw labels (see [`raw_name`]).
    pub fn record_raw(mut self, name: &str, rdata: RData) -> Self {
        self.records.push((raw_name(name), None, rdata));
        self
    }

    /// Adds an SPF (type 99) record at `name`; resolvers following RFC 7208 never ask it.
    pub fn spf(self, name: &str, strings: &[&str]) -> Self {
        let strings: Vec<Vec<u8>> = strings.iter().map(|s| s.as_bytes().to_vec()).collect();
        self.record_raw(name, spf_rdata(&strings))
    }

    /// Queries for exactly `name` (not names below it) are never answered, except for
    /// the record types in `answered` (the RFC 7208 test suite's `TIMEOUT` entries).
    pub fn timeout_except(mut self, name: &str, answered: &[RecordType]) -> Self {
        self.timeouts.push((raw_name(name), answered.to_vec()));
        self
    }

    /// Queries for `name` or any name below it get SERVFAIL at once (temporary DNS error).
    pub fn servfail(mut self, name: &str) -> Self {
        self.servfails.push(fqdn(name));
        self
    }

    /// Binds UDP and TCP on the same 127.0.0.1 ephemeral port and starts serving.
    pub async fn start(self) -> TestDns {
        let mut zone =
            InMemoryZoneHandler::empty(Name::root(), ZoneType::Primary, AxfrPolicy::Deny, None);
        // SOA minimum (negative-caching TTL) of 1 s keeps NXDOMAIN/NODATA from being cached long.
        let soa = SOA::new(
            fqdn("ns.test"),
            fqdn("hostmaster.test"),
            1,
            3600,
            600,
            86400,
            1,
        );
        zone.upsert_mut(Record::from_rdata(Name::root(), 3600, RData::SOA(soa)), 1);
        let mut added: Vec<(Name, RData)> = Vec::new();
        for (name, ttl, rdata) in self.records {
            // Identical records are one record (an RRset is a set, RFC 2181 §5).
            if added.iter().any(|(n, r)| *n == name && *r == rdata) {
                continue;
            }
            added.push((name.clone(), rdata.clone()));
            let rec = Record::from_rdata(name.clone(), ttl.unwrap_or(self.ttl), rdata);
            assert!(
                zone.upsert_mut(rec, 1),
                "test DNS: could not insert a record at {name}"
            );
        }
        let zone = Arc::new(zone);
        let mut catalog = Catalog::new();
        catalog.upsert(
            LowerName::from(Name::root()),
            vec![zone.clone() as Arc<dyn ZoneHandler>],
        );

        let queries = Arc::new(Mutex::new(Vec::new()));
        let handler = KitHandler {
            catalog,
            blackholes: self.blackholes.into_iter().map(LowerName::from).collect(),
            servfails: self.servfails.into_iter().map(LowerName::from).collect(),
            timeouts: self
                .timeouts
                .into_iter()
                .map(|(n, t)| (LowerName::from(n), t))
                .collect(),
            log: queries.clone(),
        };

        // Bind UDP on an ephemeral port, then TCP on the same port; retry on a collision.
        let mut last_err = None;
        for _ in 0..20 {
            let udp = UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("bind DNS UDP socket");
            let addr = udp.local_addr().expect("DNS UDP local_addr");
            match TcpListener::bind(addr).await {
                Ok(tcp) => {
                    let mut server = Server::new(handler);
                    server.register_socket(udp);
                    server.register_listener(tcp, Duration::from_secs(10), 65535);
                    return TestDns {
                        addr,
                        server,
                        zone,
                        queries,
                        ttl: self.ttl,
                    };
                }
                Err(e) => last_err = Some(e),
            }
        }
        panic!("test DNS: could not bind UDP+TCP on one port: {last_err:?}");
    }
}

/// A running in-process DNS server; stopped when dropped.
pub struct TestDns {
    addr: SocketAddr,
    server: Server<KitHandler>,
    zone: Arc<InMemoryZoneHandler>,
    queries: Arc<Mutex<Vec<(String, RecordType)>>>,
    ttl: u32,
}

impl TestDns {
    /// Starts building a server.
    pub fn builder() -> TestDnsBuilder {
        TestDnsBuilder {
            records: Vec::new(),
            blackholes: Vec::new(),
            servfails: Vec::new(),
            timeouts: Vec::new(),
            ttl: DEFAULT_TTL,
        }
    }

    /// The address (127.0.0.1:PORT) that serves both UDP and TCP.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The `[dns]` config line for tenso: `nameservers = ["127.0.0.1:PORT"]`.
    pub fn resolver_config_toml(&self) -> String {
        format!("nameservers = [\"{}\"]", self.addr)
    }

    /// Adds a record while the server runs (same TTL rule as the builder).
    pub async fn insert(&self, name: &str, rdata: RData) {
        let rec = Record::from_rdata(fqdn(name), self.ttl, rdata);
        assert!(
            self.zone.upsert(rec, 1).await,
            "test DNS: insert at {name} failed"
        );
    }

    /// Every query received so far as (name without trailing dot, lowercase; type).
    pub fn queries(&self) -> Vec<(String, RecordType)> {
        self.queries.lock().unwrap().clone()
    }

    /// How many queries for `name` (any case, with or without trailing dot) of type `rtype`.
    pub fn query_count(&self, name: &str, rtype: RecordType) -> usize {
        let want = name.trim_end_matches('.').to_ascii_lowercase();
        self.queries
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, t)| *n == want && *t == rtype)
            .count()
    }

    /// A hickory resolver aimed at this server only (no cache, no hosts file, 2 s timeout).
    pub fn resolver(&self) -> TokioResolver {
        self.resolver_with_timeout(Duration::from_secs(2))
    }

    /// Like [`TestDns::resolver`] with the given per-query timeout (hickory's
    /// `attempts = 1`: one retry, so two tries).
    pub fn resolver_with_timeout(&self, timeout: Duration) -> TokioResolver {
        self.resolver_tries(timeout, 2)
    }

    /// A resolver aimed at this server: `tries` tries of `timeout` each (at least 1).
    pub fn resolver_tries(&self, timeout: Duration, tries: usize) -> TokioResolver {
        let mut ns = NameServerConfig::udp_and_tcp(self.addr.ip());
        for conn in &mut ns.connections {
            conn.port = self.addr.port();
        }
        let cfg = ResolverConfig::from_name_servers(vec![ns]);
        let mut opts = ResolverOpts::default();
        opts.timeout = timeout;
        // hickory counts retries after the first try.
        opts.attempts = tries.max(1) - 1;
        opts.cache_size = 0;
        opts.use_hosts_file = ResolveHosts::Never;
        TokioResolver::builder_with_config(cfg, TokioRuntimeProvider::default())
            .with_options(opts)
            .build()
            .expect("build test resolver")
    }

    /// Stops the server and waits for its tasks to end (dropping it also stops it).
    pub async fn shutdown(mut self) {
        let _ =
            tokio::time::timeout(Duration::from_secs(5), self.server.shutdown_gracefully()).await;
    }
}

/// Wraps the catalog to log queries and to apply the blackhole/servfail rules.
struct KitHandler {
    catalog: Catalog,
    blackholes: Vec<LowerName>,
    servfails: Vec<LowerName>,
    timeouts: Vec<(LowerName, Vec<RecordType>)>,
    log: Arc<Mutex<Vec<(String, RecordType)>>>,
}

// `RequestHandler` is declared with `#[async_trait]`; this is the same signature written out
// by hand, so the kit needs no `async-trait` dependency.
impl RequestHandler for KitHandler {
    fn handle_request<'life0, 'life1, 'async_trait, R, T>(
        &'life0 self,
        request: &'life1 Request,
        mut response_handle: R,
    ) -> Pin<Box<dyn Future<Output = ResponseInfo> + Send + 'async_trait>>
    where
        R: ResponseHandler + 'async_trait,
        T: Time + 'async_trait,
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            let first = request
                .queries
                .queries()
                .first()
                .map(|q| (q.name().clone(), q.query_type()));
            if let Some((name, qtype)) = first {
                let shown = name.to_string().trim_end_matches('.').to_ascii_lowercase();
                self.log.lock().unwrap().push((shown, qtype));
                let silent = self
                    .timeouts
                    .iter()
                    .any(|(n, answered)| *n == name && !answered.contains(&qtype));
                if silent || self.blackholes.iter().any(|b| b.zone_of(&name)) {
                    // Never answer; the task is dropped when the server stops.
                    std::future::pending::<()>().await;
                }
                if self.servfails.iter().any(|b| b.zone_of(&name)) {
                    let response = MessageResponseBuilder::new(&request.queries, None)
                        .error_msg(&request.metadata, ResponseCode::ServFail);
                    return match response_handle.send_response(response).await {
                        Ok(info) => info,
                        Err(_) => {
                            let mut metadata = request.metadata;
                            metadata.response_code = ResponseCode::ServFail;
                            ResponseInfo::from(Header {
                                metadata,
                                counts: HeaderCounts::default(),
                            })
                        }
                    };
                }
            }
            self.catalog
                .handle_request::<R, T>(request, response_handle)
                .await
        })
    }
}
