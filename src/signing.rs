//! DKIM signing (RFC 6376; RSA-SHA256 or Ed25519-SHA256, RFC 8463) with the
//! forwarder's own key and with the per-domain keys of submitted mail, and key
//! generation for `tenso dkim keygen`.
//!
//! Existing signatures are never touched: a new `DKIM-Signature` is prepended. The
//! key file is read once at start; a bad key stops the daemon with a clear message
//! rather than sending unsigned mail silently.

use crate::config::DkimConfig;
use mail_auth::common::crypto::{DkimKey, Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, DkimSigner, Done};
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// Header fields signed when present (RFC 6376 §5.4.1's recommendations).
const SIGNED: [&str; 11] = [
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
];

pub struct Signer {
    signer: DkimSigner<DkimKey, Done>,
    /// The same key with simple body canonicalization, for the bodies mail-auth's
    /// relaxed one gets wrong (see [`relaxed_body_is_unsafe`]).
    simple_body: DkimSigner<DkimKey, Done>,
    pub domain: String,
    pub selector: String,
    /// The TXT value to publish at `selector._domainkey.domain`.
    pub txt: String,
}

/// DER length octets.
fn der_len(n: usize) -> Vec<u8> {
    match n {
        0..0x80 => vec![n as u8],
        0x80..0x100 => vec![0x81, n as u8],
        _ => vec![0x82, (n >> 8) as u8, n as u8],
    }
}

/// Wraps a PKCS#1 RSAPublicKey in a SubjectPublicKeyInfo, the form RFC 6376 puts
/// in `p=` (some verifiers accept nothing else).
fn rsa_spki(pkcs1: &[u8]) -> Vec<u8> {
    const RSA_ALG: [u8; 15] = [
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bits = vec![0x03];
    bits.extend(der_len(pkcs1.len() + 1));
    bits.push(0);
    bits.extend_from_slice(pkcs1);
    let mut out = vec![0x30];
    out.extend(der_len(RSA_ALG.len() + bits.len()));
    out.extend_from_slice(&RSA_ALG);
    out.extend(bits);
    out
}

/// The DKIM TXT record value for a key.
pub fn txt_record(key: &DkimKey) -> String {
    match key {
        DkimKey::Rsa(k) => format!(
            "v=DKIM1; k=rsa; p={}",
            base64_engine::encode(&rsa_spki(&k.public_key()))
        ),
        DkimKey::Ed25519(k) => format!(
            "v=DKIM1; k=ed25519; p={}",
            base64_engine::encode(&k.public_key())
        ),
    }
}

/// Loads a PEM private key: PKCS#8 (RSA or Ed25519) or PKCS#1 RSA.
pub fn load_key(path: &Path) -> Result<DkimKey, String> {
    let pem =
        std::fs::read(path).map_err(|e| format!("cannot read DKIM key {}: {e}", path.display()))?;
    let der = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| format!("DKIM key {}: not a PEM private key: {e}", path.display()))?;
    if let PrivateKeyDer::Pkcs8(p8) = &der
        && let Ok(k) = Ed25519Key::from_pkcs8_der(p8.secret_pkcs8_der())
    {
        return Ok(DkimKey::Ed25519(k));
    }
    RsaKey::<Sha256>::from_key_der(der)
        .map(DkimKey::Rsa)
        .map_err(|e| format!("DKIM key {}: neither RSA nor Ed25519: {e}", path.display()))
}

impl Signer {
    /// The configured signer, or None when `[dkim]` is not set.
    pub fn from_config(cfg: &DkimConfig) -> Result<Option<Signer>, String> {
        let (Some(domain), Some(selector), Some(key)) = (&cfg.domain, &cfg.selector, &cfg.key)
        else {
            return Ok(None);
        };
        Signer::new(domain, selector, key).map(Some)
    }

    /// A signer for `d=domain`, `s=selector` with the key in the PEM file `key`.
    pub fn new(domain: &str, selector: &str, key: &Path) -> Result<Signer, String> {
        let txt = txt_record(&load_key(key)?);
        let signer = |cb| {
            load_key(key).map(|k| {
                DkimSigner::from_key(k)
                    .domain(domain)
                    .selector(selector)
                    .headers(SIGNED)
                    .body_canonicalization(cb)
            })
        };
        Ok(Signer {
            signer: signer(Canonicalization::Relaxed)?,
            simple_body: signer(Canonicalization::Simple)?,
            domain: domain.to_string(),
            selector: selector.to_string(),
            txt,
        })
    }

    /// The `DKIM-Signature:` header (CRLF-terminated) for `message`: relaxed/relaxed,
    /// or relaxed/simple for a body mail-auth would hash wrongly.
    pub fn sign(&self, message: &[u8]) -> Result<String, String> {
        let signer = if relaxed_body_is_unsafe(body_of(message)) {
            &self.simple_body
        } else {
            &self.signer
        };
        signer
            .sign(message)
            .map(|s| s.to_header())
            .map_err(|e| format!("DKIM signing failed: {e}"))
    }

    /// `message` with a signature prepended; unchanged (and the error logged) if
    /// signing fails, because an unsigned message beats a lost one.
    pub fn sign_prepend(&self, message: Vec<u8>) -> Vec<u8> {
        match self.sign(&message) {
            Ok(h) => {
                let mut out = Vec::with_capacity(h.len() + message.len());
                out.extend_from_slice(h.as_bytes());
                out.extend_from_slice(&message);
                out
            }
            Err(e) => {
                tracing::error!(error = %e, "sending unsigned");
                message
            }
        }
    }
}

/// The body of a message: after the empty line that ends its header section.
fn body_of(message: &[u8]) -> &[u8] {
    if message.starts_with(b"\r\n") {
        return &message[2..];
    }
    message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(&[][..], |p| &message[p + 4..])
}

/// Whether mail-auth 0.13.3's relaxed body canonicalization would hash `body`
/// wrongly: when its last non-empty line holds only blanks (RFC 6376 §3.4.4 makes
/// that line empty, and so drops it; mail-auth does not). tenso's verifier, which
/// agrees with dkimpy, found it; `tests/dkim_signing.rs` checks on random bodies
/// that this is the only case, and that simple canonicalization is right for it.
/// (Bodies with a bare CR or LF, which mail-auth gets wrong either way, never reach a
/// signer: DATA refuses them and tenso's own DSNs have none.)
fn relaxed_body_is_unsafe(body: &[u8]) -> bool {
    let mut b = body;
    while let Some(rest) = b.strip_suffix(b"\r\n") {
        b = rest;
    }
    let start = b
        .windows(2)
        .rposition(|w| w == b"\r\n")
        .map_or(0, |p| p + 2);
    let last = &b[start..];
    !last.is_empty() && last.iter().all(|c| *c == b' ' || *c == b'\t')
}

/// Every signing key: the `[dkim]` default (DSNs, forwarded copies) and the
/// `[[dkim.keys]]` per domain (submitted mail, signed as its From domain so that DMARC
/// aligns). All are read at start; one bad key file stops the daemon.
#[derive(Default)]
pub struct KeyRing {
    pub default: Option<Arc<Signer>>,
    by_domain: HashMap<String, Arc<Signer>>,
}

impl KeyRing {
    pub fn from_config(cfg: &DkimConfig) -> Result<KeyRing, String> {
        let mut by_domain = HashMap::new();
        for k in &cfg.keys {
            let d = k.domain.trim_end_matches('.').to_ascii_lowercase();
            let s = Signer::new(&d, &k.selector, &k.key)
                .map_err(|e| format!("[[dkim.keys]] {d}: {e}"))?;
            by_domain.insert(d, Arc::new(s));
        }
        Ok(KeyRing {
            default: Signer::from_config(cfg)?.map(Arc::new),
            by_domain,
        })
    }

    /// The key of `domain` (any case), if `[[dkim.keys]]` has one.
    pub fn for_domain(&self, domain: &str) -> Option<&Arc<Signer>> {
        self.by_domain
            .get(&domain.trim_end_matches('.').to_ascii_lowercase())
    }

    /// The per-domain signers, by domain.
    pub fn domains(&self) -> impl Iterator<Item = &Arc<Signer>> {
        let mut v: Vec<&Arc<Signer>> = self.by_domain.values().collect();
        v.sort_by(|a, b| a.domain.cmp(&b.domain));
        v.into_iter()
    }
}

/// A new key pair: (PKCS#8 PEM private key, DNS TXT value `v=DKIM1; k=…; p=…`).
pub fn keygen(algorithm: &str) -> Result<(String, String), String> {
    use base64_engine::encode;
    let (alg, k) = match algorithm {
        "rsa" => (&rcgen::PKCS_RSA_SHA256, "rsa"),
        "ed25519" => (&rcgen::PKCS_ED25519, "ed25519"),
        other => {
            return Err(format!(
                "unknown algorithm {other:?} (expected rsa or ed25519)"
            ));
        }
    };
    let pair =
        rcgen::KeyPair::generate_for(alg).map_err(|e| format!("key generation failed: {e}"))?;
    // RFC 6376: p= of an RSA key is its SubjectPublicKeyInfo; RFC 8463: p= of an
    // Ed25519 key is the raw 32-byte key.
    let p = if k == "ed25519" {
        encode(pair.public_key_raw())
    } else {
        encode(&rcgen::PublicKeyData::subject_public_key_info(&pair))
    };
    Ok((pair.serialize_pem(), format!("v=DKIM1; k={k}; p={p}")))
}

/// Minimal standard base64 for the TXT record (no extra dependency for 20 lines).
mod base64_engine {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    pub fn encode(b: &[u8]) -> String {
        let mut s = String::with_capacity(b.len().div_ceil(3) * 4);
        for c in b.chunks(3) {
            let n = (c[0] as u32) << 16
                | (*c.get(1).unwrap_or(&0) as u32) << 8
                | *c.get(2).unwrap_or(&0) as u32;
            for i in 0..4 {
                if i <= c.len() {
                    s.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
                } else {
                    s.push('=');
                }
            }
        }
        s
    }

    #[test]
    fn rfc4648_vectors() {
        assert_eq!(encode(b""), "");
        assert_eq!(encode(b"f"), "Zg==");
        assert_eq!(encode(b"fo"), "Zm8=");
        assert_eq!(encode(b"foo"), "Zm9v");
        assert_eq!(encode(b"foobar"), "Zm9vYmFy");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_and_sign_both_algorithms() {
        for alg in ["rsa", "ed25519"] {
            let (pem, txt) = keygen(alg).unwrap();
            assert!(txt.starts_with(&format!("v=DKIM1; k={alg}; p=")), "{txt}");
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("k.pem");
            std::fs::write(&path, pem).unwrap();
            let cfg = DkimConfig {
                domain: Some("fwd.test".into()),
                selector: Some("s1".into()),
                key: Some(path.clone()),
                arc: false,
                keys: vec![crate::config::DkimDomainKey {
                    domain: "Alias.Test".into(),
                    selector: "s2".into(),
                    key: path,
                }],
            };
            let s = Signer::from_config(&cfg).unwrap().unwrap();
            assert_eq!(
                s.txt, txt,
                "the record printed at keygen is the one derived from the key"
            );
            let h = s
                .sign(b"From: a@b.test\r\nSubject: x\r\n\r\nbody\r\n")
                .unwrap();
            assert!(h.starts_with("DKIM-Signature:"), "{h}");
            assert!(h.contains("d=fwd.test") && h.contains("s=s1"), "{h}");
            let ring = KeyRing::from_config(&cfg).unwrap();
            let own = ring.for_domain("alias.TEST.").expect("per-domain key");
            let h = own.sign(b"From: a@alias.test\r\n\r\nbody\r\n").unwrap();
            assert!(h.contains("d=alias.test") && h.contains("s=s2"), "{h}");
            assert!(ring.for_domain("fwd.test").is_none());
            assert_eq!(ring.default.as_ref().unwrap().domain, "fwd.test");
        }
    }
}
