//! ARC sealing (RFC 8617 §5.1) with the forwarder's DKIM key, off by default
//! (`[dkim] arc = true`; RFC 8617 is on its way to Historic). It adds one ARC set on
//! top of the message: ARC-Authentication-Results carrying exactly the
//! Authentication-Results tenso writes, an ARC-Message-Signature over the usual
//! header fields and the body (relaxed/relaxed), and an ARC-Seal over every set.
//!
//! Written on the canonicalization of [`super::dkim`] so that what tenso seals is
//! what its verifier (and dkimpy's) checks, and its `cv=` is tenso's own chain
//! verdict. Only a chain that is absent (`cv=none`, instance 1) or passes
//! (`cv=pass`) is extended; a failing chain is left as it is, and so is one already
//! at 50 sets.

use super::arc::{ArcResult, ArcVerdict, MAX_INSTANCES};
use super::dkim::{BodyHashKey, BodyHashes, Canon, Message, select_fields, signed_data};
use aws_lc_rs::digest;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{Ed25519KeyPair, RSA_PKCS1_SHA256, RsaKeyPair};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use std::path::Path;

/// The body hash the ARC-Message-Signature carries: relaxed, SHA-256, whole body.
pub const SEALED_BODY: BodyHashKey = BodyHashKey {
    canon: Canon::Relaxed,
    sha1: false,
    limit: None,
};

/// Header fields the ARC-Message-Signature covers, each instance present.
const SIGNED: [&str; 6] = [
    "from",
    "to",
    "subject",
    "date",
    "message-id",
    "dkim-signature",
];

enum Key {
    Rsa(RsaKeyPair),
    Ed25519(Ed25519KeyPair),
}

pub struct Sealer {
    key: Key,
    domain: String,
    selector: String,
}

impl Sealer {
    /// Loads a PEM private key: PKCS#8 (RSA or Ed25519) or PKCS#1 RSA.
    pub fn load(path: &Path, domain: &str, selector: &str) -> Result<Sealer, String> {
        let der = PrivateKeyDer::from_pem_file(path)
            .map_err(|e| format!("ARC key {}: not a PEM private key: {e}", path.display()))?;
        let key = match &der {
            PrivateKeyDer::Pkcs8(p8) => {
                match Ed25519KeyPair::from_pkcs8_maybe_unchecked(p8.secret_pkcs8_der()) {
                    Ok(k) => Key::Ed25519(k),
                    Err(_) => RsaKeyPair::from_pkcs8(p8.secret_pkcs8_der())
                        .map(Key::Rsa)
                        .map_err(|e| format!("ARC key {}: {e}", path.display()))?,
                }
            }
            PrivateKeyDer::Pkcs1(p1) => RsaKeyPair::from_der(p1.secret_pkcs1_der())
                .map(Key::Rsa)
                .map_err(|e| format!("ARC key {}: {e}", path.display()))?,
            _ => {
                return Err(format!(
                    "ARC key {}: neither RSA nor Ed25519",
                    path.display()
                ));
            }
        };
        Ok(Sealer {
            key,
            domain: domain.to_string(),
            selector: selector.to_string(),
        })
    }

    fn algorithm(&self) -> &'static str {
        match self.key {
            Key::Rsa(_) => "rsa-sha256",
            Key::Ed25519(_) => "ed25519-sha256",
        }
    }

    fn sign(&self, data: &[u8]) -> Result<String, String> {
        let sig = match &self.key {
            Key::Rsa(k) => {
                let mut out = vec![0; k.public_modulus_len()];
                k.sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), data, &mut out)
                    .map_err(|_| "RSA signing failed".to_string())?;
                out
            }
            Key::Ed25519(k) => {
                // RFC 8463 §3: Ed25519 signs the SHA-256 hash.
                let hash = digest::digest(&digest::SHA256, data);
                k.sign(hash.as_ref()).as_ref().to_vec()
            }
        };
        Ok(fold_base64(&STANDARD.encode(sig)))
    }

    /// The ARC set (AS, AMS, AAR, CRLF-terminated) to put on top of `msg`, or None
    /// when the chain is not to be extended. `results` is the Authentication-Results
    /// value tenso writes (authserv-id and results, possibly folded).
    pub fn seal(
        &self,
        msg: &[u8],
        body: &BodyHashes,
        chain: &ArcVerdict,
        results: &str,
        now: i64,
    ) -> Result<Option<Vec<u8>>, String> {
        let cv = match chain.result {
            ArcResult::None => "none",
            ArcResult::Pass => "pass",
            ArcResult::Fail => return Ok(None),
        };
        let i = chain.instances + 1;
        if i > MAX_INSTANCES {
            return Ok(None);
        }
        let m = Message::parse(msg);
        let aar = format!("ARC-Authentication-Results: i={i}; {results}\r\n");
        let ams = self.message_signature(&m, body, i, now)?;
        let seal_head = format!(
            "ARC-Seal: i={i}; a={}; t={now}; cv={cv};\r\n\td={}; s={};\r\n\tb=",
            self.algorithm(),
            self.domain,
            self.selector
        );
        // The seal covers the existing sets in instance order, then the new one.
        let mut fields: Vec<&[u8]> = Vec::new();
        for k in 1..i {
            for name in [
                "arc-authentication-results",
                "arc-message-signature",
                "arc-seal",
            ] {
                if let Some(f) = m
                    .fields
                    .iter()
                    .find(|f| f.is(name) && instance(f.value()) == Some(k))
                {
                    fields.push(f.raw);
                }
            }
        }
        fields.push(aar.as_bytes());
        fields.push(ams.as_bytes());
        let data = signed_data(&fields, seal_head.as_bytes(), Canon::Relaxed);
        let seal = format!("{seal_head}{}\r\n", self.sign(&data)?);
        Ok(Some([seal, ams, aar].concat().into_bytes()))
    }

    fn message_signature(
        &self,
        m: &Message,
        body: &BodyHashes,
        i: u32,
        now: i64,
    ) -> Result<String, String> {
        let names: Vec<String> = m
            .fields
            .iter()
            .filter(|f| SIGNED.iter().any(|n| f.is(n)))
            .map(|f| String::from_utf8_lossy(f.name).to_ascii_lowercase())
            .collect();
        let bh = body
            .digest(&SEALED_BODY)
            .ok_or("the body was not hashed for sealing")?;
        let bh = STANDARD.encode(bh);
        let head = format!(
            "ARC-Message-Signature: i={i}; a={}; c=relaxed/relaxed;\r\n\td={}; s={}; t={now};\r\n\th={};\r\n\tbh={bh};\r\n\tb=",
            self.algorithm(),
            self.domain,
            self.selector,
            names.join(":"),
        );
        let data = signed_data(
            &select_fields(&m.fields, &names),
            head.as_bytes(),
            Canon::Relaxed,
        );
        Ok(format!("{head}{}\r\n", self.sign(&data)?))
    }
}

fn instance(value: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(value).ok()?;
    text.split(';').find_map(|t| {
        let (n, v) = t.split_once('=')?;
        (n.trim() == "i").then(|| v.trim().parse().ok())?
    })
}

/// A base64 value folded every 72 characters (FWS is allowed inside, RFC 6376 §2.4).
fn fold_base64(b: &str) -> String {
    b.as_bytes()
        .chunks(72)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\r\n\t")
}
