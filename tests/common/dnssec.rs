//! A DNSSEC-signed test DNS server (hickory-server 0.26 signs the zone itself) and
//! the trust anchor a validating resolver needs to believe it.
//!
//! One signed root zone "." holds the records; `insecure_zone` adds a child zone that
//! is delegated from the root without a DS record (so its answers validate as
//! insecure), and `bogus` breaks the signature of one RRset after signing (so its
//! answers validate as bogus). Answers carry RRSIGs and NSEC denials when the query
//! asks for DNSSEC (DO bit). Served on 127.0.0.1 UDP and TCP, one port.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hickory_server::Server;
use hickory_server::dnssec::NxProofKind;
use hickory_server::net::runtime::Time;
use hickory_server::net::runtime::TokioRuntimeProvider;
use hickory_server::proto::dnssec::crypto::Ed25519SigningKey;
use hickory_server::proto::dnssec::rdata::{DNSKEY, DNSSECRData};
use hickory_server::proto::dnssec::{DnssecSigner, SigningKey};
use hickory_server::proto::rr::rdata::tlsa::{CertUsage, Matching, Selector};
use hickory_server::proto::rr::rdata::{NS, SOA, TLSA};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordSet, RecordType, RrKey};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};
use tokio::net::{TcpListener, UdpSocket};

use crate::common::dns::{fqdn, ip_rdata, mx_rdata, txt_rdata};

const TTL: u32 = 60;

/// TLSA record data (usage, selector, matching type, association data).
pub fn tlsa_rdata(usage: u8, selector: u8, matching: u8, data: Vec<u8>) -> RData {
    RData::TLSA(TLSA::new(
        CertUsage::from(usage),
        Selector::from(selector),
        Matching::from(matching),
        data,
    ))
}

pub struct SignedDnsBuilder {
    records: Vec<(Name, RData)>,
    insecure: Vec<(Name, Vec<(Name, RData)>)>,
    bogus: Vec<(Name, RecordType)>,
}

impl SignedDnsBuilder {
    pub fn record(mut self, name: &str, rdata: RData) -> Self {
        self.records.push((fqdn(name), rdata));
        self
    }
    pub fn mx(self, name: &str, pref: u16, exchange: &str) -> Self {
        self.record(name, mx_rdata(pref, exchange))
    }
    pub fn a(self, name: &str, ip: &str) -> Self {
        self.record(name, ip_rdata(ip))
    }
    pub fn txt(self, name: &str, value: &str) -> Self {
        self.record(name, txt_rdata(value))
    }
    pub fn tlsa(self, name: &str, usage: u8, selector: u8, matching: u8, data: Vec<u8>) -> Self {
        self.record(name, tlsa_rdata(usage, selector, matching, data))
    }
    /// A child zone `zone` delegated from the signed root without DS: unsigned.
    pub fn insecure_zone(mut self, zone: &str, records: Vec<(&str, RData)>) -> Self {
        let recs = records.into_iter().map(|(n, r)| (fqdn(n), r)).collect();
        self.insecure.push((fqdn(zone), recs));
        self
    }
    /// After signing, the RRset (name, type) gets different data under the old RRSIG.
    pub fn bogus(mut self, name: &str, rtype: RecordType) -> Self {
        self.bogus.push((fqdn(name), rtype));
        self
    }

    pub async fn start(self) -> SignedDns {
        let key_der = Ed25519SigningKey::generate_pkcs8().expect("generate zone key");
        let key = Ed25519SigningKey::from_pkcs8(&key_der).expect("zone key");
        let public = key.to_public_key().expect("public key");
        let dnskey = DNSKEY::from_key(&public);
        let anchor = Record::from_rdata(
            Name::root(),
            3600,
            RData::DNSSEC(DNSSECRData::DNSKEY(dnskey.clone())),
        )
        .to_string();
        let signer = DnssecSigner::new(
            dnskey,
            Box::new(key),
            Name::root(),
            Duration::from_secs(86400),
        );
        let mut root = InMemoryZoneHandler::<TokioRuntimeProvider>::empty(
            Name::root(),
            ZoneType::Primary,
            AxfrPolicy::Deny,
            Some(NxProofKind::Nsec),
        );
        root.upsert_mut(soa(Name::root()), 1);
        for (name, rdata) in &self.records {
            assert!(root.upsert_mut(Record::from_rdata(name.clone(), TTL, rdata.clone()), 1));
        }
        for (zone, _) in &self.insecure {
            let ns = RData::NS(NS(fqdn("ns.test")));
            assert!(root.upsert_mut(Record::from_rdata(zone.clone(), TTL, ns), 1));
        }
        root.add_zone_signing_key_mut(signer)
            .expect("add signing key");
        root.secure_zone_mut().expect("sign zone");
        for (name, rtype) in &self.bogus {
            break_signature(&mut root, name, *rtype);
        }
        let root = Arc::new(root);
        let mut catalog = Catalog::new();
        catalog.upsert(
            LowerName::from(Name::root()),
            vec![root.clone() as Arc<dyn ZoneHandler>],
        );
        let mut parent = Catalog::new();
        parent.upsert(
            LowerName::from(Name::root()),
            vec![root.clone() as Arc<dyn ZoneHandler>],
        );
        let mut apexes = Vec::new();
        for (zone, records) in self.insecure {
            let mut z = InMemoryZoneHandler::<TokioRuntimeProvider>::empty(
                zone.clone(),
                ZoneType::Primary,
                AxfrPolicy::Deny,
                None,
            );
            z.upsert_mut(soa(zone.clone()), 1);
            let ns = RData::NS(NS(fqdn("ns.test")));
            z.upsert_mut(Record::from_rdata(zone.clone(), TTL, ns), 1);
            for (name, rdata) in records {
                assert!(z.upsert_mut(Record::from_rdata(name, TTL, rdata), 1));
            }
            apexes.push(LowerName::from(zone.clone()));
            catalog.upsert(
                LowerName::from(zone),
                vec![Arc::new(z) as Arc<dyn ZoneHandler>],
            );
        }
        let handler = SignedHandler {
            catalog,
            parent,
            apexes,
        };
        let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind udp");
        let addr = udp.local_addr().unwrap();
        let tcp = TcpListener::bind(addr)
            .await
            .expect("bind tcp on the udp port");
        let mut server = Server::new(handler);
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(10), 65535);
        SignedDns {
            addr,
            server,
            anchor,
        }
    }
}

fn soa(origin: Name) -> Record {
    let soa = SOA::new(
        fqdn("ns.test"),
        fqdn("hostmaster.test"),
        1,
        3600,
        600,
        86400,
        1,
    );
    Record::from_rdata(origin, 3600, RData::SOA(soa))
}

/// Replaces the data of a signed RRset, keeping its RRSIGs: they no longer verify.
fn break_signature(zone: &mut InMemoryZoneHandler, name: &Name, rtype: RecordType) {
    let key = RrKey::new(LowerName::from(name.clone()), rtype);
    let records = zone.records_get_mut();
    let old = records
        .get(&key)
        .unwrap_or_else(|| panic!("no {rtype} at {name} to break"));
    let mut new = RecordSet::new(name.clone(), rtype, 0);
    for r in old.records_without_rrsigs() {
        let mut r = r.clone();
        if let RData::TLSA(t) = &r.data {
            let mut data = t.cert_data.clone();
            data[0] ^= 0xff;
            r.data = RData::TLSA(TLSA::new(t.cert_usage, t.selector, t.matching, data));
        } else if let RData::A(_) = &r.data {
            r.data = ip_rdata("127.0.0.2");
        }
        new.insert(r, 0);
    }
    for sig in old.rrsigs() {
        new.insert_rrsig(sig.clone());
    }
    records.insert(key, Arc::new(new));
}

pub struct SignedDns {
    addr: SocketAddr,
    server: Server<SignedHandler>,
    anchor: String,
}

impl SignedDns {
    pub fn builder() -> SignedDnsBuilder {
        SignedDnsBuilder {
            records: Vec::new(),
            insecure: Vec::new(),
            bogus: Vec::new(),
        }
    }
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// The root DNSKEY in zone-file syntax (what `[dns] trust_anchor` files hold).
    pub fn trust_anchor(&self) -> &str {
        &self.anchor
    }
    pub fn write_trust_anchor(&self, dir: &Path) -> PathBuf {
        let p = dir.join("trust-anchor.zone");
        std::fs::write(&p, format!("{}\n", self.anchor)).expect("write trust anchor");
        p
    }
}

struct SignedHandler {
    catalog: Catalog,
    /// The root zone alone: DS records of a delegation live in the parent.
    parent: Catalog,
    apexes: Vec<LowerName>,
}

impl RequestHandler for SignedHandler {
    fn handle_request<'life0, 'life1, 'async_trait, R, T>(
        &'life0 self,
        request: &'life1 Request,
        response_handle: R,
    ) -> Pin<Box<dyn Future<Output = ResponseInfo> + Send + 'async_trait>>
    where
        R: ResponseHandler + 'async_trait,
        T: Time + 'async_trait,
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            let ds_at_cut = request.queries.queries().first().is_some_and(|q| {
                q.query_type() == RecordType::DS && self.apexes.contains(q.name())
            });
            if ds_at_cut {
                self.parent
                    .handle_request::<R, T>(request, response_handle)
                    .await
            } else {
                self.catalog
                    .handle_request::<R, T>(request, response_handle)
                    .await
            }
        })
    }
}
