//! Throw-away test PKI made with rcgen: one CA and one leaf certificate.
//!
//! The CA and the leaf get distinct CommonNames (with rcgen's default DN both would be
//! "rcgen self signed cert" and the leaf would look self-signed to OpenSSL).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Installs the aws-lc-rs crypto provider as the process default (once; later calls are no-ops).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// A CA plus one leaf certificate valid for the given names (DNS names or IP addresses).
pub struct TestPki {
    /// CA certificate, PEM.
    pub ca_cert_pem: String,
    /// CA certificate, DER.
    pub ca_cert_der: CertificateDer<'static>,
    /// Leaf certificate, PEM (the leaf only, not the chain).
    pub cert_pem: String,
    /// Leaf certificate, DER.
    pub cert_der: CertificateDer<'static>,
    /// Leaf private key, PKCS#8 PEM.
    pub key_pem: String,
    /// Leaf private key, PKCS#8 DER bytes (see [`TestPki::key_der`]).
    pub key_pkcs8_der: Vec<u8>,
}

impl TestPki {
    /// Makes a fresh CA ("tenso test CA") and a leaf (CN = first name) for `names`;
    /// names that parse as IP addresses become IP SANs.
    pub fn new(names: &[&str]) -> TestPki {
        install_crypto_provider();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let mut ca_dn = DistinguishedName::new();
        ca_dn.push(DnType::CommonName, "tenso test CA");
        ca_dn.push(DnType::OrganizationName, "tenso tests");
        ca_params.distinguished_name = ca_dn;
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
            .expect("self-sign CA");

        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut leaf_params = CertificateParams::new(names.clone()).expect("leaf params");
        let mut leaf_dn = DistinguishedName::new();
        leaf_dn.push(
            DnType::CommonName,
            names
                .first()
                .cloned()
                .unwrap_or_else(|| "tenso test leaf".into()),
        );
        leaf_params.distinguished_name = leaf_dn;
        let leaf_key = KeyPair::generate().expect("leaf key");
        let leaf = leaf_params.signed_by(&leaf_key, &ca).expect("sign leaf");

        TestPki {
            ca_cert_pem: ca.pem(),
            ca_cert_der: ca.der().clone(),
            cert_pem: leaf.pem(),
            cert_der: leaf.der().clone(),
            key_pem: leaf_key.serialize_pem(),
            key_pkcs8_der: leaf_key.serialize_der(),
        }
    }

    /// The leaf private key as a rustls `PrivateKeyDer`.
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8_der.clone()))
    }

    /// Writes `cert.pem` (leaf), `key.pem` and `ca.pem` into `dir`; returns (cert, key) paths.
    pub fn write_to_dir(&self, dir: &Path) -> (PathBuf, PathBuf) {
        std::fs::create_dir_all(dir).expect("create cert dir");
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, &self.cert_pem).expect("write cert.pem");
        std::fs::write(&key, &self.key_pem).expect("write key.pem");
        std::fs::write(dir.join("ca.pem"), &self.ca_cert_pem).expect("write ca.pem");
        (cert, key)
    }

    /// A rustls server config presenting the leaf (with the CA appended to the chain).
    pub fn server_config(&self) -> Arc<ServerConfig> {
        install_crypto_provider();
        let chain = vec![self.cert_der.clone(), self.ca_cert_der.clone()];
        let cfg = ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, self.key_der())
            .expect("rustls server config");
        Arc::new(cfg)
    }

    /// A root store that trusts only this PKI's CA.
    pub fn client_root_store(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca_cert_der.clone())
            .expect("add CA to root store");
        roots
    }

    /// A rustls client config that trusts only this PKI's CA.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        install_crypto_provider();
        Arc::new(
            ClientConfig::builder()
                .with_root_certificates(self.client_root_store())
                .with_no_client_auth(),
        )
    }
}
