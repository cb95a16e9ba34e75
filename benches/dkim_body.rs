//! DKIM body hashing in pieces (`cargo bench --bench dkim_body`): what it costs to
//! hash a large body the way tenso does for a message spilled to disk (64 KiB pieces,
//! relaxed and simple canonicalization, SHA-256), as a ratio to a bare SHA-256 of the
//! same octets measured in the same run. Under `cargo test --all-targets` (no
//! `--bench`) it is a smoke run on 1 MB.

use aws_lc_rs::digest;
use std::time::Instant;
use tenso::policy::dkim::{BodyHashKey, BodyHasher, Canon};

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let size = if full { 200 << 20 } else { 1 << 20 };
    // Lines of 78 octets with runs of blanks, like benches/memory.sh's message.
    let line =
        b"memory benchmark body line  with \t blanks  and some text to make it 78 octets\r\n";
    let body: Vec<u8> = line.iter().copied().cycle().take(size).collect();
    let piece = 64 * 1024;

    let t = Instant::now();
    let mut ctx = digest::Context::new(&digest::SHA256);
    for p in body.chunks(piece) {
        ctx.update(p);
    }
    let bare = ctx.finish();
    let bare_s = t.elapsed().as_secs_f64();

    let mut out = Vec::new();
    for (name, canon) in [("relaxed", Canon::Relaxed), ("simple", Canon::Simple)] {
        let key = BodyHashKey {
            canon,
            sha1: false,
            limit: None,
        };
        let t = Instant::now();
        let mut h = BodyHasher::new([key]);
        for p in body.chunks(piece) {
            h.write(p);
        }
        let hashes = h.finish();
        let s = t.elapsed().as_secs_f64();
        assert!(hashes.digest(&key).is_some());
        out.push((name, s));
    }
    let mb = size as f64 / 1e6;
    println!(
        "DKIM_BODY size_mb={mb:.0} sha256_mb_s={:.0} {}",
        mb / bare_s,
        out.iter()
            .map(|(n, s)| format!("{n}_mb_s={:.0} {n}_vs_sha256={:.2}", mb / s, bare_s / s))
            .collect::<Vec<_>>()
            .join(" ")
    );
    assert_eq!(bare.as_ref().len(), 32);
}
