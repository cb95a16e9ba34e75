//! Certificate checks of outbound TLS: WebPKI (the system's roots plus `[delivery]
//! ca_file`, the name checked against the MX host name as RFC 7817 / RFC 6125 ask)
//! and DANE TLSA matching (RFC 7672 §3: DANE-EE and DANE-TA; PKIX usages are
//! unusable for SMTP).
//!
//! One rustls verifier serves every TLS level: it always checks the handshake
//! signature with the aws-lc-rs provider, always records what WebPKI (and DANE, when
//! TLSA records apply) thinks of the chain, and fails the handshake only when the
//! level demands it. So an opportunistic session knows whether it would also have
//! passed `verify`, and a reused session serves only what it proved. Session
//! resumption is off: a resumed TLS 1.3 session skips the certificate check.

use parking_lot::Mutex;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::Path;
use std::sync::Arc;
use tokio_rustls::TlsConnector;

/// Why a certificate was not accepted, in RFC 8460 §4.3.1 terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertFailure {
    Expired,
    NameMismatch,
    Untrusted,
    Other(String),
}

impl CertFailure {
    /// The TLS-RPT result type.
    pub fn result_type(&self) -> &'static str {
        match self {
            CertFailure::Expired => "certificate-expired",
            CertFailure::NameMismatch => "certificate-host-mismatch",
            CertFailure::Untrusted => "certificate-not-trusted",
            CertFailure::Other(_) => "validation-failure",
        }
    }

    fn from_rustls(e: &rustls::Error) -> CertFailure {
        match e {
            rustls::Error::InvalidCertificate(c) => match c {
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    CertFailure::Expired
                }
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => CertFailure::NameMismatch,
                CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                    CertFailure::Untrusted
                }
                other => CertFailure::Other(format!("{other:?}")),
            },
            other => CertFailure::Other(other.to_string()),
        }
    }
}

impl std::fmt::Display for CertFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CertFailure::Expired => f.write_str("certificate expired"),
            CertFailure::NameMismatch => f.write_str("certificate does not name the host"),
            CertFailure::Untrusted => f.write_str("certificate not signed by a trusted root"),
            CertFailure::Other(t) => write!(f, "certificate not valid: {t}"),
        }
    }
}

/// One TLSA record (RFC 6698 §2.1).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tlsa {
    pub usage: u8,
    pub selector: u8,
    pub matching: u8,
    pub data: Vec<u8>,
}

impl Tlsa {
    /// DANE-TA(2) or DANE-EE(3) with a known selector and matching type.
    pub fn is_usable(&self) -> bool {
        matches!(self.usage, 2 | 3) && self.selector <= 1 && self.matching <= 2
    }

    /// Does this record's association match `cert`?
    fn matches(&self, cert: &CertificateDer<'_>) -> bool {
        let content: Vec<u8> = match self.selector {
            0 => cert.as_ref().to_vec(),
            1 => match webpki::EndEntityCert::try_from(cert) {
                Ok(c) => c.subject_public_key_info().as_ref().to_vec(),
                Err(_) => return false,
            },
            _ => return false,
        };
        use aws_lc_rs::digest::{SHA256, SHA512, digest};
        match self.matching {
            0 => content == self.data,
            1 => digest(&SHA256, &content).as_ref() == self.data.as_slice(),
            2 => digest(&SHA512, &content).as_ref() == self.data.as_slice(),
            _ => false,
        }
    }
}

impl std::fmt::Display for Tlsa {
    /// Presentation form (RFC 6698 §2.2), as TLS-RPT's policy-string wants it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {} ", self.usage, self.selector, self.matching)?;
        for b in &self.data {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// What the handshake's verifier found; read after the handshake.
#[derive(Debug, Clone, Default)]
pub struct CertCheck {
    /// WebPKI result for the host name (None: no certificate was seen).
    pub webpki: Option<Result<(), CertFailure>>,
    /// DANE result, when TLSA records applied.
    pub dane: Option<Result<(), String>>,
}

/// How strict the handshake is.
#[derive(Debug, Clone)]
pub enum Strictness {
    /// Accept any certificate (opportunistic, required); results are still recorded.
    Record,
    /// The chain must pass WebPKI for the host name (verify, MTA-STS enforce).
    WebPki,
    /// The chain must match one of these usable TLSA records (DANE).
    Dane(Arc<Vec<Tlsa>>),
}

/// The roots and the crypto provider, loaded once.
#[derive(Debug, Clone)]
pub struct Trust {
    pub provider: Arc<CryptoProvider>,
    pub roots: Arc<RootCertStore>,
    webpki: Arc<WebPkiServerVerifier>,
}

impl Trust {
    /// The system's roots plus the PEM certificates of `ca_file`.
    pub fn load(ca_file: Option<&Path>) -> Result<Trust, String> {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        if let Some(p) = ca_file {
            use rustls::pki_types::pem::PemObject;
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(p)
                .map_err(|e| format!("[delivery] ca_file {}: {e}", p.display()))?
                .collect::<Result<_, _>>()
                .map_err(|e| format!("[delivery] ca_file {}: {e}", p.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "[delivery] ca_file {}: no certificate",
                    p.display()
                ));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| format!("[delivery] ca_file {}: {e}", p.display()))?;
            }
        }
        Trust::from_roots(roots)
    }

    pub fn from_roots(roots: RootCertStore) -> Result<Trust, String> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let roots = Arc::new(roots);
        let webpki = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| format!("certificate verifier: {e}"))?;
        Ok(Trust {
            provider,
            roots,
            webpki,
        })
    }

    /// A connector for one connection, and the slot its verifier reports into.
    pub fn connector(
        &self,
        strictness: Strictness,
    ) -> Result<(TlsConnector, Arc<Mutex<CertCheck>>), String> {
        let out = Arc::new(Mutex::new(CertCheck::default()));
        let verifier = PolicyVerifier {
            strictness,
            trust: self.clone(),
            out: out.clone(),
        };
        let mut cfg = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS client config: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        cfg.resumption = rustls::client::Resumption::disabled();
        Ok((TlsConnector::from(Arc::new(cfg)), out))
    }

    /// A plain WebPKI client config (the MTA-STS policy fetch over HTTPS).
    pub fn webpki_client(&self) -> Result<rustls::ClientConfig, String> {
        Ok(
            rustls::ClientConfig::builder_with_provider(self.provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS client config: {e}"))?
                .with_root_certificates(self.roots.clone())
                .with_no_client_auth(),
        )
    }
}

/// DANE-EE: the leaf matches (no name or date check, RFC 7672 §3.1.1). DANE-TA: a
/// certificate of the chain matches, and the leaf chains to it and names the host
/// (RFC 7672 §3.1.2).
fn dane_match(
    tlsa: &[Tlsa],
    trust: &Trust,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    server_name: &ServerName<'_>,
    now: UnixTime,
) -> Result<(), String> {
    let mut why = "no TLSA record matches the certificate chain".to_string();
    for t in tlsa.iter().filter(|t| t.is_usable()) {
        if t.usage == 3 && t.matches(end_entity) {
            return Ok(());
        }
        if t.usage != 2 {
            continue;
        }
        for ta in intermediates.iter().filter(|c| t.matches(c)) {
            let mut roots = RootCertStore::empty();
            if roots.add(ta.clone().into_owned()).is_err() {
                continue;
            }
            let v = WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                trust.provider.clone(),
            )
            .build()
            .map_err(|e| e.to_string())?;
            match v.verify_server_cert(end_entity, intermediates, server_name, &[], now) {
                Ok(_) => return Ok(()),
                Err(e) => why = format!("chain to the DANE-TA certificate: {e}"),
            }
        }
    }
    Err(why)
}

#[derive(Debug)]
struct PolicyVerifier {
    strictness: Strictness,
    trust: Trust,
    out: Arc<Mutex<CertCheck>>,
}

impl ServerCertVerifier for PolicyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let webpki = self.trust.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        let webpki_result = webpki
            .as_ref()
            .map(|_| ())
            .map_err(CertFailure::from_rustls);
        let dane = match &self.strictness {
            Strictness::Dane(t) => Some(dane_match(
                t,
                &self.trust,
                end_entity,
                intermediates,
                server_name,
                now,
            )),
            _ => None,
        };
        {
            let mut out = self.out.lock();
            out.webpki = Some(webpki_result);
            out.dane = dane.clone();
        }
        match &self.strictness {
            Strictness::Record => Ok(ServerCertVerified::assertion()),
            Strictness::WebPki => webpki,
            Strictness::Dane(_) => match dane {
                Some(Ok(())) => Ok(ServerCertVerified::assertion()),
                Some(Err(e)) => Err(rustls::Error::InvalidCertificate(
                    CertificateError::ApplicationVerificationFailure,
                ))
                .inspect_err(|_| tracing::debug!(error = %e, "DANE mismatch")),
                None => unreachable!("dane strictness always yields a result"),
            },
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.trust.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.trust.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.trust
            .provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tlsa_usability_and_presentation() {
        let t = Tlsa {
            usage: 3,
            selector: 1,
            matching: 1,
            data: vec![0xab, 0x01],
        };
        assert!(t.is_usable());
        assert_eq!(t.to_string(), "3 1 1 ab01");
        for (u, s, m) in [(0, 0, 1), (1, 1, 1), (3, 2, 1), (2, 0, 3), (4, 1, 1)] {
            let t = Tlsa {
                usage: u,
                selector: s,
                matching: m,
                data: vec![],
            };
            assert!(!t.is_usable(), "{u} {s} {m}");
        }
    }

    #[test]
    fn tlsa_matching_types() {
        let cert = rcgen::generate_simple_self_signed(vec!["mx.test".into()]).unwrap();
        let der = cert.cert.der().clone();
        let spki = webpki::EndEntityCert::try_from(&der)
            .unwrap()
            .subject_public_key_info()
            .as_ref()
            .to_vec();
        use aws_lc_rs::digest::{SHA256, SHA512, digest};
        let cases = [
            (0, 0, der.as_ref().to_vec()),
            (0, 1, digest(&SHA256, der.as_ref()).as_ref().to_vec()),
            (1, 1, digest(&SHA256, &spki).as_ref().to_vec()),
            (1, 2, digest(&SHA512, &spki).as_ref().to_vec()),
            (1, 0, spki.clone()),
        ];
        for (selector, matching, data) in cases {
            let mut t = Tlsa {
                usage: 3,
                selector,
                matching,
                data,
            };
            assert!(t.matches(&der), "{selector} {matching}");
            t.data[0] ^= 1;
            assert!(!t.matches(&der), "{selector} {matching} tampered");
        }
    }
}
