//! What tenso signs, tenso's verifier (which agrees with dkimpy, `tests/dkim_corpus.rs`)
//! verifies — for any body. mail-auth 0.13.3, which makes tenso's signatures, hashes
//! some bodies wrongly under relaxed body canonicalization: those whose last non-empty
//! line holds only blanks. tenso signs those with simple body canonicalization, and
//! everything else relaxed/relaxed.
//!
//! Invariants, on random bodies of `a`, SP, TAB and CRLF (lines end in CRLF only, as
//! DATA accepts them; mail-auth gets bodies with a bare CR or LF wrong under any
//! canonicalization, and none ever reaches a signer):
//! - every signature passes tenso's verifier against the published key;
//! - it is relaxed/relaxed unless the body's last non-empty line is blanks only.

mod auth_support;
mod common;

use auth_support::dkimpy_verify;
use common::dns::TestDns;
use proptest::prelude::*;
use std::collections::HashMap;
use tenso::policy::dkim::{self, Canon, DkimResult, Message, candidates};
use tenso::policy::lookup::Txt;
use tenso::signing::{Signer, keygen};

const NOW: i64 = 1_900_000_000;

fn signer(dir: &std::path::Path, alg: &str) -> (Signer, HashMap<String, Txt>) {
    let (s, txt) = signer_txt(dir, alg);
    let keys = [(
        "s1._domainkey.fwd.test".to_string(),
        Txt::Found(vec![txt.into_bytes()]),
    )]
    .into_iter()
    .collect();
    (s, keys)
}

fn signer_txt(dir: &std::path::Path, alg: &str) -> (Signer, String) {
    let (pem, txt) = keygen(alg).unwrap();
    let path = dir.join(format!("{alg}.pem"));
    std::fs::write(&path, pem).unwrap();
    (Signer::new("fwd.test", "s1", &path).unwrap(), txt)
}

/// The last non-empty line of `body` (trailing CRLFs dropped) is blanks only.
fn blank_last_line(body: &[u8]) -> bool {
    let mut b = body;
    while let Some(rest) = b.strip_suffix(b"\r\n") {
        b = rest;
    }
    let start = b
        .windows(2)
        .rposition(|w| w == b"\r\n")
        .map_or(0, |p| p + 2);
    !b[start..].is_empty() && b[start..].iter().all(|c| *c == b' ' || *c == b'\t')
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        prop_oneof![
            4 => Just(b"a".to_vec()),
            3 => Just(b" ".to_vec()),
            2 => Just(b"\t".to_vec()),
            4 => Just(b"\r\n".to_vec()),
        ],
        0..40,
    )
    .prop_map(|v| v.concat())
}

fn check(s: &Signer, keys: &HashMap<String, Txt>, body: &[u8]) -> Result<(), TestCaseError> {
    let msg = [
        b"From: a@fwd.test\r\nTo: b@dest.test\r\nSubject: x\r\n\r\n".as_slice(),
        body,
    ]
    .concat();
    let signed = [s.sign(&msg).unwrap().into_bytes(), msg].concat();
    let m = Message::parse(&signed);
    let (cands, _) = candidates(&m);
    let hashes = dkim::BodyHashes::of(m.body, dkim::body_hash_keys(&cands));
    let v = dkim::verify_all(&m, &cands, keys, &hashes, NOW);
    prop_assert_eq!(v.len(), 1);
    prop_assert_eq!(v[0].result, DkimResult::Pass, "{:?} {:?}", body, v[0]);
    let sig = cands[0].parsed.as_ref().unwrap();
    let want = if blank_last_line(body) {
        Canon::Simple
    } else {
        Canon::Relaxed
    };
    prop_assert_eq!(sig.body_canon, want);
    prop_assert_eq!(sig.header_canon, Canon::Relaxed);
    Ok(())
}

#[test]
fn the_bodies_mail_auth_gets_wrong_are_signed_simple_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let (s, keys) = signer(dir.path(), "ed25519");
    for body in [
        &b"Hello  list. \r\n \t \r\nx  y\t\r\n   \r\n\t\r\n"[..],
        b"a\r\n\r\n \r\n",
        b"x \r\n\t",
        b"plain\r\n",
        b"",
    ] {
        check(&s, &keys, body).unwrap();
    }
}

/// The independent verifier agrees: dkimpy (Debian's python3-dkim) verifies tenso's
/// signatures over bodies ending in blank lines, RSA and Ed25519.
#[tokio::test]
async fn dkimpy_verifies_signatures_over_blank_tailed_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let (rsa, rsa_txt) = signer_txt(dir.path(), "rsa");
    let (ed, ed_txt) = signer_txt(dir.path(), "ed25519");
    for (s, txt) in [(&rsa, rsa_txt), (&ed, ed_txt)] {
        let dns = TestDns::builder()
            .txt("s1._domainkey.fwd.test", &txt)
            .start()
            .await;
        for body in [
            &b"Hello  list. \r\n \t \r\nx  y\t\r\n   \r\n\t\r\n"[..],
            b"a\r\n\r\n \r\n",
            b"plain  text \r\n",
        ] {
            let msg = [
                b"From: a@fwd.test\r\nTo: b@dest.test\r\nSubject: x\r\n\r\n".as_slice(),
                body,
            ]
            .concat();
            let signed = [s.sign(&msg).unwrap().into_bytes(), msg].concat();
            let py = dkimpy_verify(&dns, &signed).await;
            assert!(
                py.len() == 1 && py[0].ok,
                "{py:?}\n{}",
                String::from_utf8_lossy(&signed)
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]
    #[test]
    fn every_signature_verifies(body in body()) {
        static KEY: std::sync::OnceLock<(tempfile::TempDir, Signer, HashMap<String, Txt>)> =
            std::sync::OnceLock::new();
        let (_, s, keys) = KEY.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let (s, k) = signer(dir.path(), "ed25519");
            (dir, s, k)
        });
        check(s, keys, &body)?;
    }
}
