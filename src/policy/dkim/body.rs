//! Body hashes (RFC 6376 §3.4.3–§3.4.5, §3.7) computed as the body streams past:
//! the canonicalization keeps its state between pieces, so a message spilled to disk
//! is hashed in bounded chunks and never held whole, and a piece boundary can fall
//! anywhere (inside a CRLF, a run of blanks, a run of empty lines).
//!
//! The canonical forms are the ones of [`super::canon_body`]: for simple, trailing
//! empty lines dropped and a final CRLF ensured (an empty body is one CRLF); for
//! relaxed, in addition WSP at line ends dropped and WSP runs squeezed to one space,
//! and an empty body stays empty. Lines end at CRLF only: a bare CR or LF is an
//! ordinary octet, as in the whole-buffer rule.
//!
//! Nothing here reads files; the caller feeds the pieces.

use super::{Algorithm, Canon, Signature};
use aws_lc_rs::digest;

/// A body hash one signature needs: its canonicalization, digest, and `l=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BodyHashKey {
    pub canon: Canon,
    pub sha1: bool,
    pub limit: Option<u64>,
}

impl BodyHashKey {
    pub fn of(sig: &Signature) -> BodyHashKey {
        BodyHashKey {
            canon: sig.body_canon,
            sha1: sig.a == Algorithm::RsaSha1,
            limit: sig.l,
        }
    }
}

/// One canonicalization's state between pieces of the body.
#[derive(Debug, Clone)]
struct Canonicalizer {
    canon: Canon,
    /// CRLFs seen and not yet written: they are dropped if nothing follows them.
    held: u64,
    /// The last octet was a CR; whether it ends a line depends on the next one.
    cr: bool,
    /// Relaxed: WSP seen on this line and not yet written (one SP if text follows).
    wsp: bool,
    /// Anything has been written (relaxed: an empty canonical body stays empty).
    wrote: bool,
}

impl Canonicalizer {
    fn new(canon: Canon) -> Canonicalizer {
        Canonicalizer {
            canon,
            held: 0,
            cr: false,
            wsp: false,
            wrote: false,
        }
    }

    /// Writes text of the current line: what it makes pending first.
    fn text(&mut self, t: &[u8], out: &mut impl FnMut(&[u8])) {
        self.release(out);
        if self.wsp {
            out(b" ");
            self.wsp = false;
        }
        out(t);
        self.wrote = true;
    }

    /// Writes the CRLFs held back: text follows them.
    fn release(&mut self, out: &mut impl FnMut(&[u8])) {
        while self.held > 0 {
            let n = self.held.min((CRLF_PAIRS.len() / 2) as u64);
            out(&CRLF_PAIRS[..2 * n as usize]);
            self.held -= n;
        }
    }

    /// A held CR turns out not to end a line: it is text.
    fn settle_cr(&mut self, out: &mut impl FnMut(&[u8])) {
        if self.cr {
            self.cr = false;
            self.text(b"\r", out);
        }
    }

    fn write(&mut self, mut piece: &[u8], out: &mut impl FnMut(&[u8])) {
        let relaxed = self.canon == Canon::Relaxed;
        while !piece.is_empty() {
            let special = |c: &u8| match c {
                b'\r' | b'\n' => true,
                b' ' | b'\t' => relaxed,
                _ => false,
            };
            let run = piece.iter().position(special).unwrap_or(piece.len());
            if run > 0 {
                self.settle_cr(out);
                self.text(&piece[..run], out);
                piece = &piece[run..];
                continue;
            }
            match piece[0] {
                b'\n' if self.cr => {
                    self.cr = false;
                    self.wsp = false;
                    self.held += 1;
                }
                b'\n' => self.text(b"\n", out),
                b'\r' => {
                    self.settle_cr(out);
                    self.cr = true;
                }
                _ => {
                    self.settle_cr(out);
                    self.wsp = true;
                }
            }
            piece = &piece[1..];
        }
    }

    fn finish(&mut self, out: &mut impl FnMut(&[u8])) {
        self.settle_cr(out);
        // WSP ending the last line is dropped like any line's; so are held CRLFs.
        self.wsp = false;
        self.held = 0;
        if self.wrote || self.canon == Canon::Simple {
            out(b"\r\n");
        }
    }
}

/// CRLFs to write held-back empty lines many at a time.
const CRLF_PAIRS: [u8; 128] = {
    let mut run = [b'\r'; 128];
    let mut i = 1;
    while i < run.len() {
        run[i] = b'\n';
        i += 2;
    }
    run
};

/// Canonical octets gathered before the digests see them: canonicalization writes
/// word-sized runs, and a digest update per run would cost more than the hashing.
const SINK_BUFFER: usize = 16 * 1024;

/// Where one canonical form goes: its length, and each digest over its first
/// `limit` octets.
struct Sink {
    len: u64,
    buf: Vec<u8>,
    digests: Vec<(BodyHashKey, digest::Context)>,
}

impl Sink {
    fn new() -> Sink {
        Sink {
            len: 0,
            buf: Vec::new(),
            digests: Vec::new(),
        }
    }

    fn put(&mut self, b: &[u8]) {
        if self.buf.len() + b.len() > SINK_BUFFER {
            self.flush();
        }
        if b.len() >= SINK_BUFFER {
            self.hash(b);
        } else {
            self.buf.extend_from_slice(b);
        }
    }

    fn flush(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        self.hash(&buf);
        self.buf = buf;
        self.buf.clear();
    }

    /// Hands `b` (the octets after the first `len`) to every digest within its limit.
    fn hash(&mut self, b: &[u8]) {
        let at = self.len;
        self.len += b.len() as u64;
        for (key, ctx) in &mut self.digests {
            let take = match key.limit {
                Some(l) => l.saturating_sub(at).min(b.len() as u64) as usize,
                None => b.len(),
            };
            if take > 0 {
                ctx.update(&b[..take]);
            }
        }
    }
}

/// Hashes a body fed in pieces, for every [`BodyHashKey`] asked.
pub struct BodyHasher {
    forms: Vec<(Canonicalizer, Sink)>,
}

impl BodyHasher {
    pub fn new(keys: impl IntoIterator<Item = BodyHashKey>) -> BodyHasher {
        let mut forms: Vec<(Canonicalizer, Sink)> = Vec::new();
        for key in keys {
            let i = match forms.iter().position(|(c, _)| c.canon == key.canon) {
                Some(i) => i,
                None => {
                    forms.push((Canonicalizer::new(key.canon), Sink::new()));
                    forms.len() - 1
                }
            };
            let sink = &mut forms[i].1;
            if !sink.digests.iter().any(|(k, _)| *k == key) {
                let alg = if key.sha1 {
                    &digest::SHA1_FOR_LEGACY_USE_ONLY
                } else {
                    &digest::SHA256
                };
                sink.digests.push((key, digest::Context::new(alg)));
            }
        }
        BodyHasher { forms }
    }

    /// Whether any hash is asked at all (nothing to feed otherwise).
    pub fn is_needed(&self) -> bool {
        !self.forms.is_empty()
    }

    pub fn write(&mut self, piece: &[u8]) {
        for (canon, sink) in &mut self.forms {
            canon.write(piece, &mut |b| sink.put(b));
        }
    }

    pub fn finish(mut self) -> BodyHashes {
        let mut out = BodyHashes::default();
        for (canon, sink) in &mut self.forms {
            canon.finish(&mut |b| sink.put(b));
            sink.flush();
        }
        for (canon, sink) in self.forms {
            out.lens.push((canon.canon, sink.len));
            for (key, ctx) in sink.digests {
                out.digests.push((key, ctx.finish().as_ref().to_vec()));
            }
        }
        out
    }
}

/// The finished hashes: the canonical body length per canonicalization, and each
/// asked digest.
#[derive(Debug, Clone, Default)]
pub struct BodyHashes {
    lens: Vec<(Canon, u64)>,
    digests: Vec<(BodyHashKey, Vec<u8>)>,
}

impl BodyHashes {
    /// Hashes `body` whole (a message held in memory).
    pub fn of(body: &[u8], keys: impl IntoIterator<Item = BodyHashKey>) -> BodyHashes {
        let mut h = BodyHasher::new(keys);
        h.write(body);
        h.finish()
    }

    /// The canonical body's length, if that canonicalization was hashed.
    pub fn len(&self, canon: Canon) -> Option<u64> {
        self.lens.iter().find(|(c, _)| *c == canon).map(|(_, l)| *l)
    }

    pub fn digest(&self, key: &BodyHashKey) -> Option<&[u8]> {
        self.digests
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, d)| d.as_slice())
    }
}

/// The canonical body in one buffer (tests and small bodies).
pub fn canonical(c: Canon, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 2);
    let mut canon = Canonicalizer::new(c);
    canon.write(body, &mut |b| out.extend_from_slice(b));
    canon.finish(&mut |b| out.extend_from_slice(b));
    out
}
