//! Helpers for the outbound TLS tests (issue 14): a test CA that issues good,
//! expired, wrong-name and self-signed certificates; an in-process HTTPS server
//! that serves an MTA-STS policy file (hyper over tokio-rustls, like the real
//! thing); TLSA data for certificates; and reading a TLS-RPT report mail.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::common::tls::install_crypto_provider;

/// A test certificate authority.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    name: String,
}

/// A server certificate: the rustls config that presents it, and its DER forms.
pub struct Leaf {
    pub config: Arc<ServerConfig>,
    pub der: CertificateDer<'static>,
}

fn dn(cn: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::CommonName, cn);
    d
}

fn server_config(chain: Vec<CertificateDer<'static>>, key: &KeyPair) -> Arc<ServerConfig> {
    install_crypto_provider();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Arc::new(
        ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server config"),
    )
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        install_crypto_provider();
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.distinguished_name = dn(name);
        let issuer =
            CertifiedIssuer::self_signed(p, KeyPair::generate().expect("key")).expect("CA");
        Ca {
            issuer,
            name: name.to_string(),
        }
    }

    pub fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// Writes the CA certificate as PEM (for `[delivery] ca_file`).
    pub fn write_pem(&self, dir: &Path) -> PathBuf {
        let p = dir.join(format!("{}.pem", self.name.replace(' ', "-")));
        std::fs::write(&p, self.issuer.pem()).expect("write CA");
        p
    }

    fn issue(&self, names: &[&str], expired: bool) -> Leaf {
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("leaf params");
        p.distinguished_name = dn(names.first().copied().unwrap_or("leaf"));
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().expect("leaf key");
        let cert = p.signed_by(&key, &self.issuer).expect("sign leaf");
        let der = cert.der().clone();
        Leaf {
            config: server_config(vec![der.clone(), self.der()], &key),
            der,
        }
    }

    /// A valid certificate for `names`, chained to this CA (the CA is in the chain).
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        self.issue(names, false)
    }

    /// Like [`Ca::leaf`], but it expired in 2021.
    pub fn expired(&self, names: &[&str]) -> Leaf {
        self.issue(names, true)
    }
}

/// A self-signed certificate for `names` (no CA vouches for it).
pub fn self_signed(names: &[&str]) -> Leaf {
    let key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .expect("params");
    p.distinguished_name = dn(names[0]);
    let cert = p.self_signed(&key).expect("self-sign");
    let der = cert.der().clone();
    Leaf {
        config: server_config(vec![der.clone()], &key),
        der,
    }
}

/// SHA-256 of a certificate's SubjectPublicKeyInfo (TLSA selector 1, matching 1).
pub fn spki_sha256(cert: &CertificateDer<'_>) -> Vec<u8> {
    let c = webpki::EndEntityCert::try_from(cert).expect("parse cert");
    aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        c.subject_public_key_info().as_ref(),
    )
    .as_ref()
    .to_vec()
}

/// SHA-256 of a whole certificate (TLSA selector 0, matching 1).
pub fn cert_sha256(cert: &CertificateDer<'_>) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert.as_ref())
        .as_ref()
        .to_vec()
}

/// An HTTPS server for `/.well-known/mta-sts.txt` on 127.0.0.1:0.
pub struct PolicyServer {
    pub addr: SocketAddr,
    policy: Arc<Mutex<Option<String>>>,
    requests: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Drop for PolicyServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PolicyServer {
    /// Serves `policy` (None: HTTP 404) with the certificate of `tls`.
    pub async fn start(tls: Arc<ServerConfig>, policy: Option<&str>) -> PolicyServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind https");
        let addr = listener.local_addr().unwrap();
        let policy = Arc::new(Mutex::new(policy.map(str::to_string)));
        let requests = Arc::new(AtomicU64::new(0));
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let (p, r) = (policy.clone(), requests.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    break;
                };
                let (acceptor, p, r) = (acceptor.clone(), p.clone(), r.clone());
                tokio::spawn(async move {
                    let Ok(Ok(tls)) = tokio::time::timeout(
                        std::time::Duration::from_secs(10),
                        acceptor.accept(tcp),
                    )
                    .await
                    else {
                        return;
                    };
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            r.fetch_add(1, Ordering::SeqCst);
                            let body = p.lock().unwrap().clone();
                            async move { Ok::<_, Infallible>(answer(req.uri().path(), body)) }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        PolicyServer {
            addr,
            policy,
            requests,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Serve another policy from now on (None: 404).
    pub fn set_policy(&self, policy: Option<&str>) {
        *self.policy.lock().unwrap() = policy.map(str::to_string);
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

fn answer(path: &str, body: Option<String>) -> Response<Full<Bytes>> {
    match (path, body) {
        ("/.well-known/mta-sts.txt", Some(b)) => Response::builder()
            .status(200)
            .header("content-type", "text/plain")
            .body(Full::new(Bytes::from(b)))
            .unwrap(),
        _ => Response::builder()
            .status(404)
            .body(Full::new(Bytes::from_static(b"not found")))
            .unwrap(),
    }
}

/// An MTA-STS policy file.
pub fn sts_policy(mode: &str, mx: &[&str]) -> String {
    let mut s = format!("version: STSv1\r\nmode: {mode}\r\n");
    for m in mx {
        s.push_str(&format!("mx: {m}\r\n"));
    }
    s.push_str("max_age: 86400\r\n");
    s
}

/// The gzipped JSON attachment of a TLS-RPT report mail, checked for the RFC 8460
/// §5.3 form on the way: multipart/report with report-type tlsrpt, the
/// TLS-Report-Domain/-Submitter fields, an application/tlsrpt+gzip part.
pub fn report_json(raw: &[u8]) -> (serde_json::Value, String) {
    use mail_parser::{MessageParser, MimeHeaders};
    let msg = MessageParser::default()
        .parse(raw)
        .expect("report parses as mail");
    let ct = msg.content_type().expect("content type");
    assert_eq!(
        (ct.ctype(), ct.subtype()),
        ("multipart", Some("report")),
        "{}",
        String::from_utf8_lossy(raw)
    );
    assert_eq!(ct.attribute("report-type"), Some("tlsrpt"));
    let domain = msg
        .header_raw("TLS-Report-Domain")
        .expect("TLS-Report-Domain")
        .trim()
        .to_string();
    assert!(msg.header_raw("TLS-Report-Submitter").is_some());
    let subject = msg.subject().unwrap_or_default();
    assert!(
        subject.starts_with(&format!("Report Domain: {domain} Submitter: ")),
        "{subject}"
    );
    let part = msg
        .attachments()
        .find(|p| {
            p.content_type()
                .is_some_and(|c| c.ctype() == "application" && c.subtype() == Some("tlsrpt+gzip"))
        })
        .expect("application/tlsrpt+gzip part");
    let name = part.attachment_name().expect("attachment file name");
    assert!(
        name.ends_with(".json.gz") && name.contains(&format!("!{domain}!")),
        "{name}"
    );
    let mut json = Vec::new();
    use std::io::Read;
    flate2::read::GzDecoder::new(part.contents())
        .read_to_end(&mut json)
        .expect("gunzip");
    (serde_json::from_slice(&json).expect("JSON"), domain)
}

/// Validates `report` against the JSON Schema of RFC 8460 §4.4 (written from the
/// RFC's field list and §4.3's result types) with Python's `jsonschema`, an
/// independent validator. Panics with its message when it does not conform.
pub fn check_schema(report: &serde_json::Value) {
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tls_support/tlsrpt-schema.json");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("report.json");
    std::fs::write(&file, serde_json::to_vec(report).unwrap()).unwrap();
    let out = std::process::Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import json,sys,jsonschema; s=json.load(open(sys.argv[1])); \
             jsonschema.Draft7Validator.check_schema(s); \
             jsonschema.Draft7Validator(s, format_checker=jsonschema.FormatChecker()).validate(json.load(open(sys.argv[2])))",
        ])
        .arg(&schema)
        .arg(&file)
        .output()
        .expect("run /usr/bin/python3 (python3-jsonschema, see .ci/install-test-deps)");
    assert!(
        out.status.success(),
        "report does not match the RFC 8460 schema:\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        serde_json::to_string_pretty(report).unwrap()
    );
}
