//! DKIM verification (RFC 6376, with RFC 8301's algorithm rules and RFC 8463's
//! Ed25519), written here rather than taken from mail-auth 0.13.3, whose verifier
//! disagrees with dkimpy (and the RFC) in its core: it refuses every `l=` signature,
//! its body canonicalization differs on some bodies ending in blank or
//! whitespace-only lines, and a signature it cannot parse yields no result at all.
//! None of that can be fixed from outside: its body-hash check short-circuits before
//! the signature is looked at. The parts here are small and each is tested against
//! the RFC's rules and, end to end, against dkimpy (`tests/dkim_corpus.rs`).
//!
//! Every DKIM-Signature field gets exactly one [`DkimVerdict`], classed as RFC 8601
//! §2.7.1 says:
//! - `pass`: the signature verifies with the published key. With `l=` shorter than
//!   the body it still passes (as dkimpy and RFC 6376 §3.5 say), and the verdict
//!   records how many body octets it leaves unsigned ([`BodyLength`]), so decisions can
//!   refuse to treat that content as signed.
//! - `fail`: the body hash or the signature does not match (the message changed), or
//!   `l=` claims more body than there is.
//! - `policy`: it might verify, but tenso does not accept it: `x=` expired, `t=` in
//!   the future, `rsa-sha1` (RFC 8301 §3.1), an RSA key under 1024 bits (RFC 8301
//!   §3.2), or more signatures than [`MAX_SIGNATURES`] on one message.
//! - `permerror`: it cannot ever verify: the signature cannot be parsed (a required
//!   tag missing or malformed, unknown algorithm or canonicalization, `i=` outside
//!   `d=`, `h=` without From), or the key is missing (NXDOMAIN/NODATA), revoked
//!   (`p=` empty), malformed, or unusable for this signature (`k=`, `h=`, `s=`,
//!   `t=s`).
//! - `temperror`: the key lookup failed temporarily (SERVFAIL, timeout).
//! - `neutral` is never produced.
//!
//! Like dkimpy, an extra From field the signature did not cover makes it fail (a
//! second From prepended to a signed message must not ride on its signature).
//!
//! This module does no I/O: the keys arrive fetched (all of a message's at once, by
//! `super::content` through `super::lookup`).

use super::lookup::Txt;
use aws_lc_rs::digest;
use aws_lc_rs::signature::{self, UnparsedPublicKey};
use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
pub use body::{BodyHashKey, BodyHasher, BodyHashes};
use std::collections::HashMap;

/// Signatures verified per message; each one beyond gets no lookup and no
/// verification, and all of them share one `policy` clause (a bound on the DNS
/// lookups and RSA operations one message can cause).
pub const MAX_SIGNATURES: usize = 10;
/// How long after `x=` a signature is still accepted (clock skew).
const EXPIRY_SKEW: i64 = 300;
/// How far in the future `t=` may be (dkimpy's allowance for bad clocks).
const FUTURE_LEEWAY: i64 = 36_000;

/// A result of RFC 8601 §2.7.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DkimResult {
    Pass,
    Fail,
    Policy,
    PermError,
    TempError,
}

impl DkimResult {
    pub fn as_str(self) -> &'static str {
        match self {
            DkimResult::Pass => "pass",
            DkimResult::Fail => "fail",
            DkimResult::Policy => "policy",
            DkimResult::PermError => "permerror",
            DkimResult::TempError => "temperror",
        }
    }
}

/// What `l=` covers of the canonicalized body (`unsigned` is 0 when it all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLength {
    pub signed: u64,
    pub unsigned: u64,
}

/// The verdict on one DKIM-Signature field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DkimVerdict {
    pub result: DkimResult,
    /// Why it is not `pass` (a fixed phrase, never text from the message).
    pub reason: Option<&'static str>,
    /// Tags as far as they could be read (for the A-R properties).
    pub d: Option<String>,
    pub s: Option<String>,
    pub i: Option<String>,
    pub a: Option<String>,
    /// The first characters of `b=` (RFC 6008), to tell signatures apart.
    pub b: Option<String>,
    pub body_length: Option<BodyLength>,
    /// The key is flagged `t=y` (testing).
    pub testing: bool,
}

impl DkimVerdict {
    /// A pass that covers the whole body: the only kind decisions may rely on.
    pub fn passes_whole_body(&self) -> bool {
        self.result == DkimResult::Pass && self.body_length.is_none_or(|l| l.unsigned == 0)
    }
}

/// Header and body canonicalization (RFC 6376 §3.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Canon {
    Simple,
    Relaxed,
}

/// Signing algorithms (RFC 6376 §3.3, RFC 8463).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    RsaSha1,
    RsaSha256,
    Ed25519Sha256,
}

impl Algorithm {
    pub fn parse_name(v: &str) -> Option<Algorithm> {
        match v.to_ascii_lowercase().as_str() {
            "rsa-sha1" => Some(Algorithm::RsaSha1),
            "rsa-sha256" => Some(Algorithm::RsaSha256),
            "ed25519-sha256" => Some(Algorithm::Ed25519Sha256),
            _ => None,
        }
    }
    fn key_type(self) -> &'static str {
        match self {
            Algorithm::Ed25519Sha256 => "ed25519",
            _ => "rsa",
        }
    }
    fn hash_name(self) -> &'static str {
        match self {
            Algorithm::RsaSha1 => "sha1",
            _ => "sha256",
        }
    }
}

// ---------------------------------------------------------------------------------
// The message as DKIM sees it

/// One header field: its name (as written, without the colon) and its raw bytes
/// (name, colon, value, continuation lines, final CRLF).
#[derive(Debug, Clone, Copy)]
pub struct Field<'a> {
    pub name: &'a [u8],
    pub raw: &'a [u8],
}

impl<'a> Field<'a> {
    pub fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name.as_bytes())
    }
    /// The raw value: everything after the colon, continuation lines included.
    pub fn value(&self) -> &'a [u8] {
        let colon = self.raw.iter().position(|&c| c == b':').unwrap_or(0);
        &self.raw[colon + 1..]
    }
}

/// A message split into header fields (top first) and body.
#[derive(Debug, Clone)]
pub struct Message<'a> {
    pub fields: Vec<Field<'a>>,
    pub body: &'a [u8],
}

impl<'a> Message<'a> {
    /// Splits at the first empty line. A line that is neither a field nor a
    /// continuation (no colon) belongs to no field and is skipped, as are
    /// continuation lines without a field above them.
    pub fn parse(msg: &'a [u8]) -> Message<'a> {
        let mut fields: Vec<Field<'a>> = Vec::new();
        let mut pos = 0;
        let mut open = false;
        while pos < msg.len() {
            let end = msg[pos..]
                .windows(2)
                .position(|w| w == b"\r\n")
                .map_or(msg.len(), |p| pos + p + 2);
            let line = &msg[pos..end];
            if line == b"\r\n" {
                return Message {
                    fields,
                    body: &msg[end..],
                };
            }
            if line[0] == b' ' || line[0] == b'\t' {
                if open && let Some(last) = fields.last_mut() {
                    let start = last.raw.as_ptr() as usize - msg.as_ptr() as usize;
                    last.raw = &msg[start..end];
                }
            } else if let Some(colon) = line.iter().position(|&c| c == b':') {
                let name = trim_wsp_end(&line[..colon]);
                fields.push(Field {
                    name,
                    raw: &msg[pos..end],
                });
                open = true;
            } else {
                open = false;
            }
            pos = end;
        }
        Message { fields, body: &[] }
    }
}

fn is_wsp(c: u8) -> bool {
    c == b' ' || c == b'\t'
}

fn trim_wsp_end(s: &[u8]) -> &[u8] {
    let end = s.iter().rposition(|&c| !is_wsp(c)).map_or(0, |p| p + 1);
    &s[..end]
}

// ---------------------------------------------------------------------------------
// Canonicalization (RFC 6376 §3.4)

/// Appends the canonical form of a raw header field (with its final CRLF).
pub fn canon_header(c: Canon, raw: &[u8], out: &mut Vec<u8>) {
    match c {
        Canon::Simple => out.extend_from_slice(raw),
        Canon::Relaxed => {
            let colon = raw.iter().position(|&b| b == b':').unwrap_or(raw.len());
            let name = trim_wsp_end(&raw[..colon]);
            out.extend(name.iter().map(u8::to_ascii_lowercase));
            out.push(b':');
            let value = raw.get(colon + 1..).unwrap_or_default();
            // Unfold (drop every CR and LF of a CRLF), squeeze WSP runs, trim.
            let mut pending_space = false;
            let mut started = false;
            let mut i = 0;
            while i < value.len() {
                let c = value[i];
                if c == b'\r' && value.get(i + 1) == Some(&b'\n') {
                    i += 2;
                    continue;
                }
                if is_wsp(c) {
                    pending_space = started;
                } else {
                    if pending_space {
                        out.push(b' ');
                        pending_space = false;
                    }
                    out.push(c);
                    started = true;
                }
                i += 1;
            }
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// The canonical body (RFC 6376 §3.4.3, §3.4.4) in one buffer; [`BodyHasher`] makes
/// the same form piece by piece.
pub fn canon_body(c: Canon, body: &[u8]) -> Vec<u8> {
    body::canonical(c, body)
}

/// The raw field with the value of its `b=` tag removed (RFC 6376 §3.5: "treated as
/// the empty string"): from after the `=` through the last non-space character of the
/// value, as dkimpy and OpenDKIM do, so space after the value stays.
pub fn strip_b_value(raw: &[u8]) -> Vec<u8> {
    let colon = raw.iter().position(|&c| c == b':').map_or(0, |p| p + 1);
    let mut out = raw.to_vec();
    let mut seg_start = colon;
    while seg_start <= raw.len() {
        let seg_end = raw[seg_start..]
            .iter()
            .position(|&c| c == b';')
            .map_or(raw.len(), |p| seg_start + p);
        let seg = &raw[seg_start..seg_end];
        let name_at = seg
            .iter()
            .position(|&c| !matches!(c, b' ' | b'\t' | b'\r' | b'\n'));
        if let Some(n) = name_at
            && seg[n] == b'b'
        {
            let after = &seg[n + 1..];
            let eq = after
                .iter()
                .position(|&c| !matches!(c, b' ' | b'\t' | b'\r' | b'\n'));
            if let Some(e) = eq
                && after[e] == b'='
            {
                let value_start = seg_start + n + 1 + e + 1;
                let last = raw[value_start..seg_end]
                    .iter()
                    .rposition(|&c| !matches!(c, b' ' | b'\t' | b'\r' | b'\n'));
                if let Some(l) = last {
                    out.drain(value_start..value_start + l + 1);
                }
                return out;
            }
        }
        seg_start = seg_end + 1;
    }
    out
}

// ---------------------------------------------------------------------------------
// Tag lists (RFC 6376 §3.2), shared with the key record, ARC and DMARC

/// Tag=value pairs in order, values trimmed of surrounding whitespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tags(pub Vec<(String, String)>);

impl Tags {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses a tag-list: `name=value` separated by `;`, an optional final `;`. A
/// duplicate name, a spec without `=`, a bad name or a control character make the
/// whole list invalid (RFC 6376 §3.2).
pub fn tag_list(input: &[u8]) -> Result<Tags, &'static str> {
    let text = std::str::from_utf8(input).map_err(|_| "tag list is not UTF-8")?;
    let text = text.trim_matches(|c: char| c.is_ascii_whitespace());
    let mut specs: Vec<&str> = text.split(';').collect();
    if specs
        .last()
        .is_some_and(|s| s.trim_matches(|c: char| c.is_ascii_whitespace()).is_empty())
    {
        specs.pop();
    }
    let mut tags: Vec<(String, String)> = Vec::with_capacity(specs.len());
    for spec in specs {
        let (name, value) = spec.split_once('=').ok_or("tag without '='")?;
        let name = name.trim_matches(|c: char| c.is_ascii_whitespace());
        let value = value.trim_matches(|c: char| c.is_ascii_whitespace());
        let mut chars = name.chars();
        let good_name = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !good_name {
            return Err("malformed tag name");
        }
        if value
            .chars()
            .any(|c| c.is_control() && !matches!(c, ' ' | '\t' | '\r' | '\n'))
        {
            return Err("control character in a tag value");
        }
        if tags.iter().any(|(n, _)| n == name) {
            return Err("duplicate tag");
        }
        tags.push((name.to_string(), value.to_string()));
    }
    Ok(tags.into())
}

impl From<Vec<(String, String)>> for Tags {
    fn from(v: Vec<(String, String)>) -> Tags {
        Tags(v)
    }
}

const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Base64 with folding whitespace anywhere (RFC 6376 §2.4 base64string).
pub fn base64_value(v: &str) -> Option<Vec<u8>> {
    let compact: String = v.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    B64.decode(compact).ok()
}

fn decimal(v: &str, max_digits: usize) -> Option<u64> {
    if v.is_empty() || v.len() > max_digits || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Longer than u64 (l= allows 76 digits): saturate, it can only be too long.
    Some(v.parse::<u64>().unwrap_or(u64::MAX))
}

fn valid_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && d.trim_end_matches('.').split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_alphanumeric() || c == '-' || c == '_')
        })
}

// ---------------------------------------------------------------------------------
// The signature (RFC 6376 §3.5)

/// The tags a signature of either kind (DKIM, ARC-Message-Signature) needs to be
/// verified.
#[derive(Debug, Clone)]
pub struct Signature {
    pub a: Algorithm,
    pub a_text: String,
    pub b: Vec<u8>,
    pub b_text: String,
    pub bh: Vec<u8>,
    pub header_canon: Canon,
    pub body_canon: Canon,
    pub d: String,
    /// h=, lowercased.
    pub h: Vec<String>,
    pub i: Option<String>,
    pub l: Option<u64>,
    pub s: String,
    pub t: Option<u64>,
    pub x: Option<u64>,
}

impl Signature {
    /// `selector._domainkey.domain`, where the key lives.
    pub fn key_name(&self) -> String {
        format!("{}._domainkey.{}", self.s, self.d.trim_end_matches('.'))
    }
}

/// Why a signature cannot be used, with what of it could be read (for the A-R).
#[derive(Debug, Clone)]
pub struct Unparsable {
    pub reason: &'static str,
    pub tags: Tags,
}

fn required<'t>(
    tags: &'t Tags,
    name: &str,
    missing: &'static str,
) -> Result<&'t str, &'static str> {
    tags.get(name).ok_or(missing)
}

fn parse_canon(c: Option<&str>, default: Canon) -> Result<(Canon, Canon), &'static str> {
    let one = |v: &str| match v.to_ascii_lowercase().as_str() {
        "simple" => Ok(Canon::Simple),
        "relaxed" => Ok(Canon::Relaxed),
        _ => Err("unknown canonicalization in c="),
    };
    match c {
        None => Ok((default, default)),
        Some(v) => match v.split_once('/') {
            Some((h, b)) => Ok((one(h.trim())?, one(b.trim())?)),
            None => Ok((one(v.trim())?, Canon::Simple)),
        },
    }
}

/// Reads the tags both DKIM-Signature and ARC-Message-Signature carry: a, b, bh, c,
/// d, h, l, s, t, x. `h=` must name From. `default_canon` applies without `c=`.
pub fn parse_common(tags: &Tags, default_canon: Canon) -> Result<Signature, &'static str> {
    let a_text = required(tags, "a", "missing required tag a=")?;
    let b_text = required(tags, "b", "missing required tag b=")?;
    let bh_text = required(tags, "bh", "missing required tag bh=")?;
    let d = required(tags, "d", "missing required tag d=")?;
    let h = required(tags, "h", "missing required tag h=")?;
    let s = required(tags, "s", "missing required tag s=")?;
    let a = Algorithm::parse_name(a_text).ok_or("unknown algorithm in a=")?;
    let b = base64_value(b_text)
        .filter(|b| !b.is_empty())
        .ok_or("malformed b=")?;
    let bh = base64_value(bh_text)
        .filter(|b| !b.is_empty())
        .ok_or("malformed bh=")?;
    let (header_canon, body_canon) = parse_canon(tags.get("c"), default_canon)?;
    if !valid_domain(d) {
        return Err("malformed d=");
    }
    if !valid_domain(s) {
        return Err("malformed s=");
    }
    let h: Vec<String> = h
        .split(':')
        .map(|n| {
            n.trim_matches(|c: char| c.is_ascii_whitespace())
                .to_ascii_lowercase()
        })
        .collect();
    if h.iter()
        .any(|n| n.is_empty() || n.contains(char::is_whitespace))
    {
        return Err("malformed h=");
    }
    if !h.iter().any(|n| n == "from") {
        return Err("h= does not include From");
    }
    let l = match tags.get("l") {
        Some(v) => Some(decimal(v, 76).ok_or("malformed l=")?),
        None => None,
    };
    let t = match tags.get("t") {
        Some(v) => Some(decimal(v, 12).ok_or("malformed t=")?),
        None => None,
    };
    let x = match tags.get("x") {
        Some(v) => Some(decimal(v, 12).ok_or("malformed x=")?),
        None => None,
    };
    if let (Some(t), Some(x)) = (t, x)
        && x < t
    {
        return Err("x= is before t=");
    }
    Ok(Signature {
        a,
        a_text: a_text.to_ascii_lowercase(),
        b,
        b_text: b_text
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect(),
        bh,
        header_canon,
        body_canon,
        d: d.to_string(),
        h,
        i: None,
        l,
        s: s.to_string(),
        t,
        x,
    })
}

/// A DKIM-Signature value: the common tags plus v=1, q=dns/txt and i= within d=.
pub fn parse_signature(value: &[u8]) -> Result<Signature, Unparsable> {
    let tags = tag_list(value).map_err(|reason| Unparsable {
        reason,
        tags: Tags::default(),
    })?;
    let fail = |reason| Unparsable {
        reason,
        tags: tags.clone(),
    };
    match tags.get("v") {
        None => return Err(fail("missing required tag v=")),
        Some("1") => {}
        Some(_) => return Err(fail("unsupported version in v=")),
    }
    let mut sig = parse_common(&tags, Canon::Simple).map_err(fail)?;
    if let Some(q) = tags.get("q")
        && !q
            .split(':')
            .any(|m| m.trim().eq_ignore_ascii_case("dns/txt"))
    {
        return Err(fail("unsupported query method in q="));
    }
    if let Some(i) = tags.get("i") {
        let domain = i
            .rsplit_once('@')
            .map(|(_, d)| d)
            .ok_or(fail("malformed i="))?;
        if !within(domain, &sig.d) {
            return Err(fail("i= is not within d="));
        }
        sig.i = Some(i.to_string());
    }
    Ok(sig)
}

/// `sub` equals `domain` or is below it (case-insensitive).
pub fn within(sub: &str, domain: &str) -> bool {
    let sub = sub.trim_end_matches('.').to_ascii_lowercase();
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    sub == domain || sub.ends_with(&format!(".{domain}"))
}

// ---------------------------------------------------------------------------------
// The key record (RFC 6376 §3.6.1)

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// SubjectPublicKeyInfo or PKCS#1 RSAPublicKey DER (both are seen in `p=`).
    Rsa(Vec<u8>),
    Ed25519(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub key: PublicKey,
    /// `h=`: acceptable hash algorithms (None: any).
    pub hashes: Option<Vec<String>>,
    /// `t=y`
    pub testing: bool,
    /// `t=s`: i= must be exactly d=.
    pub strict: bool,
}

/// A key refused for a reason, with its RFC 8601 class.
pub type KeyError = (DkimResult, &'static str);

/// Parses a key record. `p=` empty is a revoked key.
pub fn parse_key(txt: &[u8]) -> Result<KeyRecord, KeyError> {
    let perm = |r| (DkimResult::PermError, r);
    let tags = tag_list(txt).map_err(|_| perm("malformed key record"))?;
    if let Some(v) = tags.get("v")
        && v != "DKIM1"
    {
        return Err(perm("unsupported key record version"));
    }
    if let Some(s) = tags.get("s")
        && !s.split(':').any(|t| matches!(t.trim(), "*" | "email"))
    {
        return Err(perm("key not for email (s=)"));
    }
    let p = tags.get("p").ok_or(perm("key record without p="))?;
    if p.trim().is_empty() {
        return Err(perm("key revoked"));
    }
    let bytes = base64_value(p).ok_or(perm("malformed p= in key record"))?;
    let key = match tags.get("k").unwrap_or("rsa").to_ascii_lowercase().as_str() {
        "rsa" => PublicKey::Rsa(bytes),
        "ed25519" if bytes.len() == 32 => PublicKey::Ed25519(bytes),
        "ed25519" => return Err(perm("malformed Ed25519 key")),
        _ => return Err(perm("unknown key type in k=")),
    };
    let flags: Vec<&str> = tags
        .get("t")
        .map(|t| t.split(':').map(str::trim).collect())
        .unwrap_or_default();
    Ok(KeyRecord {
        key,
        hashes: tags.get("h").map(|h| {
            h.split(':')
                .map(|x| x.trim().to_ascii_lowercase())
                .collect()
        }),
        testing: flags.contains(&"y"),
        strict: flags.contains(&"s"),
    })
}

/// The key for a signature from a lookup answer: the first TXT record is used, as
/// dkimpy does (RFC 6376 §3.6.2.2 leaves the choice open).
pub fn key_for(answer: Option<&Txt>, sig: &Signature) -> Result<KeyRecord, KeyError> {
    key_for_algorithm(answer, sig.a)
}

/// [`key_for`] for a signature made with `a`: the record must fit the algorithm
/// (`k=`, `h=`) and an RSA key must have at least 1024 bits (RFC 8301 §3.2).
pub fn key_for_algorithm(answer: Option<&Txt>, a: Algorithm) -> Result<KeyRecord, KeyError> {
    let perm = |r| (DkimResult::PermError, r);
    let record = match answer {
        Some(Txt::Found(records)) => parse_key(&records[0])?,
        Some(Txt::NotFound) => return Err(perm("no key for signature")),
        Some(Txt::TempError(_)) => return Err((DkimResult::TempError, "key lookup failed")),
        None => return Err((DkimResult::TempError, "key not looked up")),
    };
    let key_type = match record.key {
        PublicKey::Rsa(_) => "rsa",
        PublicKey::Ed25519(_) => "ed25519",
    };
    if key_type != a.key_type() {
        return Err(perm("key type does not match a="));
    }
    if let Some(h) = &record.hashes
        && !h.iter().any(|x| x == a.hash_name())
    {
        return Err(perm("key does not allow this hash (h=)"));
    }
    if let PublicKey::Rsa(der) = &record.key {
        let bits = aws_lc_rs::rsa::PublicKey::from_der(der)
            .map_err(|_| perm("malformed RSA key"))?
            .modulus_len()
            * 8;
        if bits < 1024 {
            return Err((DkimResult::Policy, "RSA key shorter than 1024 bits"));
        }
    }
    Ok(record)
}

/// Checks `b=` over `data` (the canonicalized header fields) with the key.
pub fn verify_bytes(key: &PublicKey, a: Algorithm, data: &[u8], b: &[u8]) -> bool {
    match (key, a) {
        (PublicKey::Rsa(der), Algorithm::RsaSha256) => UnparsedPublicKey::new(
            &signature::RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY,
            der,
        )
        .verify(data, b)
        .is_ok(),
        (PublicKey::Ed25519(raw), Algorithm::Ed25519Sha256) => {
            // RFC 8463 §3: Ed25519 signs the SHA-256 hash of the data.
            let hash = digest::digest(&digest::SHA256, data);
            UnparsedPublicKey::new(&signature::ED25519, raw)
                .verify(hash.as_ref(), b)
                .is_ok()
        }
        _ => false,
    }
}

// ---------------------------------------------------------------------------------
// Hashing

/// The header fields `h=` selects, bottom-up per name (RFC 6376 §5.4.2); a name
/// listed more often than present selects nothing (oversigning).
pub fn select_fields<'a>(fields: &[Field<'a>], names: &[String]) -> Vec<&'a [u8]> {
    let mut next_below: HashMap<&str, usize> = HashMap::new();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let mut i = *next_below.get(name.as_str()).unwrap_or(&fields.len());
        while i > 0 {
            i -= 1;
            if fields[i].is(name) {
                out.push(fields[i].raw);
                break;
            }
        }
        next_below.insert(name.as_str(), i);
    }
    out
}

/// The data `b=` signs: the selected fields, then the signature field itself with
/// its `b=` value removed and without its final CRLF.
pub fn signed_data(fields: &[&[u8]], own: &[u8], canon: Canon) -> Vec<u8> {
    let mut data = Vec::with_capacity(fields.iter().map(|f| f.len()).sum::<usize>() + own.len());
    for f in fields {
        canon_header(canon, f, &mut data);
    }
    canon_header(canon, &strip_b_value(own), &mut data);
    if data.ends_with(b"\r\n") {
        data.truncate(data.len() - 2);
    }
    data
}

/// Checks `bh=` against the body hashes. Ok(Some(length)) when the signature has `l=`.
pub fn check_body_hash(
    sig: &Signature,
    hashes: &BodyHashes,
) -> Result<Option<BodyLength>, &'static str> {
    let key = BodyHashKey::of(sig);
    let (Some(total), Some(hash)) = (hashes.len(sig.body_canon), hashes.digest(&key)) else {
        return Err("body not hashed");
    };
    let signed = match sig.l {
        Some(l) if l > total => return Err("l= is longer than the body"),
        Some(l) => l,
        None => total,
    };
    if hash != sig.bh.as_slice() {
        return Err("body hash mismatch");
    }
    Ok(sig.l.map(|_| BodyLength {
        signed,
        unsigned: total - signed,
    }))
}

// ---------------------------------------------------------------------------------
// Verification

/// One DKIM-Signature field of the message, parsed or not.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Index into `Message::fields`.
    pub field: usize,
    pub parsed: Result<Signature, Unparsable>,
}

/// The DKIM-Signature fields, top first; the first [`MAX_SIGNATURES`] and the count of
/// the rest.
pub fn candidates(msg: &Message) -> (Vec<Candidate>, usize) {
    let all: Vec<usize> = (0..msg.fields.len())
        .filter(|&i| msg.fields[i].is("dkim-signature"))
        .collect();
    let extra = all.len().saturating_sub(MAX_SIGNATURES);
    let list = all
        .into_iter()
        .take(MAX_SIGNATURES)
        .map(|field| Candidate {
            field,
            parsed: parse_signature(msg.fields[field].value()),
        })
        .collect();
    (list, extra)
}

/// The key names the candidates need.
pub fn key_names(cands: &[Candidate]) -> Vec<String> {
    cands
        .iter()
        .filter_map(|c| c.parsed.as_ref().ok())
        .filter(|s| s.a != Algorithm::RsaSha1)
        .map(Signature::key_name)
        .collect()
}

fn verdict_for(sig: &Signature) -> DkimVerdict {
    DkimVerdict {
        result: DkimResult::Pass,
        reason: None,
        d: Some(sig.d.clone()),
        s: Some(sig.s.clone()),
        i: sig.i.clone(),
        a: Some(sig.a_text.clone()),
        b: Some(sig.b_text.chars().take(8).collect()),
        body_length: None,
        testing: false,
    }
}

fn unparsable_verdict(u: &Unparsable) -> DkimVerdict {
    let text = |n: &str| u.tags.get(n).filter(|v| !v.is_empty()).map(str::to_string);
    DkimVerdict {
        result: DkimResult::PermError,
        reason: Some(u.reason),
        d: text("d"),
        s: text("s"),
        i: None,
        a: None,
        b: text("b").map(|b| b.chars().filter(|c| !c.is_whitespace()).take(8).collect()),
        body_length: None,
        testing: false,
    }
}

/// What a verified signature leaves to note.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    pub body_length: Option<BodyLength>,
    pub testing: bool,
}

/// Checks a parsed signature (DKIM-Signature or ARC-Message-Signature) that sits in
/// the raw field `own` of `msg`, with the answer of its key lookup. The order is
/// RFC 6376 §6.1's: the signature's own acceptability, the key, the body hash,
/// then `b=`.
pub fn check_signature(
    msg: &Message,
    sig: &Signature,
    own: &[u8],
    key_answer: Option<&Txt>,
    bodies: &BodyHashes,
    now: i64,
) -> Result<Checked, KeyError> {
    if sig.a == Algorithm::RsaSha1 {
        return Err((DkimResult::Policy, "rsa-sha1 is not accepted (RFC 8301)"));
    }
    if let Some(x) = sig.x
        && (x as i64).saturating_add(EXPIRY_SKEW) < now
    {
        return Err((DkimResult::Policy, "signature expired"));
    }
    if let Some(t) = sig.t
        && (t as i64) > now.saturating_add(FUTURE_LEEWAY)
    {
        return Err((DkimResult::Policy, "signature timestamp in the future"));
    }
    let key = key_for(key_answer, sig)?;
    if key.strict
        && let Some(i) = &sig.i
        && !i.rsplit_once('@').is_some_and(|(_, d)| {
            d.trim_end_matches('.')
                .eq_ignore_ascii_case(sig.d.trim_end_matches('.'))
        })
    {
        return Err((DkimResult::PermError, "key requires i= in d= itself (t=s)"));
    }
    let body_length = check_body_hash(sig, bodies).map_err(|why| (DkimResult::Fail, why))?;
    // dkimpy's defence, kept: one more From than h= lists is hashed too.
    let mut names = sig.h.clone();
    names.push("from".into());
    let selected = select_fields(&msg.fields, &names);
    let data = signed_data(&selected, own, sig.header_canon);
    if !verify_bytes(&key.key, sig.a, &data, &sig.b) {
        return Err((DkimResult::Fail, "signature did not verify"));
    }
    Ok(Checked {
        body_length,
        testing: key.testing,
    })
}

/// Verifies one candidate against the fetched keys. `now` is Unix seconds.
pub fn verify_candidate(
    msg: &Message,
    cand: &Candidate,
    keys: &HashMap<String, Txt>,
    bodies: &BodyHashes,
    now: i64,
) -> DkimVerdict {
    let sig = match &cand.parsed {
        Ok(s) => s,
        Err(u) => return unparsable_verdict(u),
    };
    let mut v = verdict_for(sig);
    let answer = keys.get(&sig.key_name().to_ascii_lowercase());
    match check_signature(msg, sig, msg.fields[cand.field].raw, answer, bodies, now) {
        Ok(c) => {
            v.body_length = c.body_length;
            v.testing = c.testing;
        }
        Err((r, why)) => {
            v.result = r;
            v.reason = Some(why);
        }
    }
    v
}

/// Verifies candidates whose keys have been fetched, top first, with the body hashes
/// [`body_hash_keys`] asked for.
pub fn verify_all(
    msg: &Message,
    cands: &[Candidate],
    keys: &HashMap<String, Txt>,
    bodies: &BodyHashes,
    now: i64,
) -> Vec<DkimVerdict> {
    cands
        .iter()
        .map(|c| verify_candidate(msg, c, keys, bodies, now))
        .collect()
}

/// The body hashes the candidates need.
pub fn body_hash_keys(cands: &[Candidate]) -> impl Iterator<Item = BodyHashKey> + '_ {
    cands
        .iter()
        .filter_map(|c| c.parsed.as_ref().ok())
        .map(BodyHashKey::of)
}

// ---------------------------------------------------------------------------------
// Authentication-Results (RFC 8601 §2.2, RFC 6008 for header.b)

/// A property value as RFC 8601 allows it: plain when it is a token or
/// `local@domain` of token characters, otherwise a quoted-string; control
/// characters dropped, capped at 255 characters.
pub fn pvalue(v: &str) -> String {
    let clean: String = v.chars().filter(|c| !c.is_control()).take(255).collect();
    let token = |s: &str| {
        !s.is_empty()
            && s.chars().all(|c| {
                !c.is_ascii() || (c.is_ascii_graphic() && !"()<>@,;:\\\"/[]?=".contains(c))
            })
    };
    let plain = match clean.rsplit_once('@') {
        Some((local, domain)) => (local.is_empty() || token(local)) && token(domain),
        None => token(&clean),
    };
    if plain {
        clean
    } else {
        let escaped = clean.replace('\\', "\\\\").replace('"', "\\\"");
        format!("\"{escaped}\"")
    }
}

/// One `dkim=` resinfo (without the leading `;`), folded between properties so no
/// line grows long whatever the message put in its tags.
pub fn clause(v: &DkimVerdict) -> String {
    let mut head = format!("dkim={}", v.result.as_str());
    let mut comments: Vec<String> = Vec::new();
    if let Some(r) = v.reason {
        comments.push(r.to_string());
    }
    match v.body_length {
        Some(l) if l.unsigned > 0 => comments.push(format!(
            "l={}, {} body octets after it not signed",
            l.signed, l.unsigned
        )),
        Some(l) => comments.push(format!("l={} covers the whole body", l.signed)),
        None => {}
    }
    if v.testing {
        comments.push("key in testing mode".into());
    }
    if !comments.is_empty() {
        head.push_str(&format!(" ({})", comments.join(", ")));
    }
    let mut parts = vec![head];
    for (prop, val) in [
        ("header.d", &v.d),
        ("header.i", &v.i),
        ("header.s", &v.s),
        ("header.a", &v.a),
        ("header.b", &v.b),
    ] {
        if let Some(val) = val {
            parts.push(format!("{prop}={}", pvalue(val)));
        }
    }
    fold(&parts)
}

/// Joins with spaces, starting a new line (CRLF TAB) before a part that would take
/// the current line past 200 characters.
pub fn fold(parts: &[String]) -> String {
    let mut out = String::new();
    let mut line = 0;
    for (k, p) in parts.iter().enumerate() {
        if k > 0 {
            if line + 1 + p.len() > 200 {
                out.push_str("\r\n\t");
                line = 0;
            } else {
                out.push(' ');
                line += 1;
            }
        }
        out.push_str(p);
        line += p.len();
    }
    out
}

/// The clause for signatures beyond [`MAX_SIGNATURES`].
pub fn overflow_clause(extra: usize) -> String {
    format!(
        "dkim=policy ({extra} more signatures not verified: at most {MAX_SIGNATURES} per message)"
    )
}

mod body;
#[cfg(test)]
mod tests;
