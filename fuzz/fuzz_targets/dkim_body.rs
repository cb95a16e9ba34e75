//! DKIM body hashing in pieces (what tenso does for a message spilled to disk): however
//! the body is cut, each canonical form's length and each digest (whole, and over the
//! first `l` octets) are those of the body hashed in one piece; and the canonical forms
//! keep their promises — a fixed point of themselves; relaxed has no tab, no run of
//! spaces, no space before CRLF and no trailing empty line; simple ends in exactly one
//! CRLF or is just CRLF. (The whole-buffer rule itself is checked against the old
//! implementation by the unit properties in `src/policy/dkim/tests.rs`.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use tenso::policy::dkim::{BodyHashKey, BodyHasher, BodyHashes, Canon, canon_body};
use tenso_fuzz::split;

fuzz_target!(|data: &[u8]| {
    let Some(s) = split(data) else { return };
    let body = s.stream;
    let limit = Some(u64::from(s.control) * 3);
    let keys: Vec<BodyHashKey> = [Canon::Simple, Canon::Relaxed]
        .into_iter()
        .flat_map(|canon| {
            [None, limit].map(|limit| BodyHashKey {
                canon,
                sha1: false,
                limit,
            })
        })
        .collect();
    let whole = BodyHashes::of(body, keys.clone());
    let mut h = BodyHasher::new(keys.clone());
    let mut at: Vec<usize> = s.cuts.iter().map(|c| c % (body.len() + 1)).collect();
    at.sort_unstable();
    let mut from = 0;
    for a in at.into_iter().chain([body.len()]) {
        h.write(&body[from..a]);
        from = a;
    }
    let pieces = h.finish();
    for k in &keys {
        assert_eq!(pieces.digest(k), whole.digest(k), "{k:?}");
        assert_eq!(pieces.len(k.canon), whole.len(k.canon), "{k:?}");
    }
    for c in [Canon::Simple, Canon::Relaxed] {
        let once = canon_body(c, body);
        assert_eq!(canon_body(c, &once), once, "{c:?} is not a fixed point");
        assert_eq!(whole.len(c), Some(once.len() as u64));
        match c {
            Canon::Relaxed => {
                assert!(!once.contains(&b'\t'));
                assert!(!once.windows(2).any(|w| w == b"  "));
                assert!(!once.windows(3).any(|w| w == b" \r\n"));
                assert!(!once.ends_with(b"\r\n\r\n"));
                assert!(once.is_empty() || once.ends_with(b"\r\n"));
            }
            Canon::Simple => {
                assert!(once.ends_with(b"\r\n"));
                assert!(once == b"\r\n" || !once.ends_with(b"\r\n\r\n"));
            }
        }
    }
});
