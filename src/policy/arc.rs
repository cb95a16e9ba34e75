//! ARC chain validation (RFC 8617 §5.2) over the DKIM machinery of [`super::dkim`]:
//! canonicalization, tag lists, key records and signature checks are the same.
//!
//! The chain's sets are grouped by instance (`i=`), not by their position in the
//! header, and must be complete (one ARC-Seal, ARC-Message-Signature and
//! ARC-Authentication-Results per instance), numbered 1..N without gaps, N ≤ 50,
//! with `cv=none` on instance 1 and `cv=pass` above it. Then the newest
//! ARC-Message-Signature must verify and every ARC-Seal, newest first, must verify
//! over the sets up to its own. Any failure, including a key that cannot be fetched,
//! makes the chain `fail` (RFC 8617 registers only `none`, `pass` and `fail`).
//!
//! For a passing chain the older AMSs are checked too (step 6) to report
//! `header.oldest-pass` (0: all pass), and `smtp.remote-ip` is taken from the oldest
//! set's ARC-Authentication-Results (its `smtp.remote-ip=` or `policy.iprev=`
//! property), the address the first ARC participant received the message from.
//!
//! Only verification lives here; sealing (off by default) is in `policy/mod.rs`.

use super::dkim::{
    self, BodyHashKey, BodyHashes, Canon, Message, Signature, Tags, parse_common, signed_data,
    tag_list, verify_bytes,
};
use super::lookup::Txt;
use std::collections::HashMap;
use std::net::IpAddr;

/// RFC 8617 §4.2.1: instance values range from 1 to 50.
pub const MAX_INSTANCES: u32 = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArcResult {
    None,
    Pass,
    Fail,
}

impl ArcResult {
    pub fn as_str(self) -> &'static str {
        match self {
            ArcResult::None => "none",
            ArcResult::Pass => "pass",
            ArcResult::Fail => "fail",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArcVerdict {
    pub result: ArcResult,
    pub reason: Option<String>,
    /// The highest instance (0 without a chain).
    pub instances: u32,
    /// `header.oldest-pass` of a passing chain.
    pub oldest_pass: Option<u32>,
    /// `smtp.remote-ip` of a passing chain's oldest set, when it recorded one.
    pub remote_ip: Option<IpAddr>,
}

impl ArcVerdict {
    fn fail(instances: u32, reason: impl Into<String>) -> ArcVerdict {
        ArcVerdict {
            result: ArcResult::Fail,
            reason: Some(reason.into()),
            instances,
            oldest_pass: None,
            remote_ip: None,
        }
    }

    pub fn none() -> ArcVerdict {
        ArcVerdict {
            result: ArcResult::None,
            reason: None,
            instances: 0,
            oldest_pass: None,
            remote_ip: None,
        }
    }

    /// The `arc=` resinfo. `client` is the address this message came from, shown for
    /// `none` (tenso is then the chain's origin as far as anyone can tell).
    pub fn clause(&self, client: IpAddr) -> String {
        let mut out = format!("arc={}", self.result.as_str());
        match self.result {
            ArcResult::None => out.push_str(&format!(" smtp.remote-ip={client}")),
            ArcResult::Pass => {
                out.push_str(&format!(" (i={})", self.instances));
                if let Some(o) = self.oldest_pass {
                    out.push_str(&format!(" header.oldest-pass={o}"));
                }
                if let Some(ip) = self.remote_ip {
                    out.push_str(&format!(" smtp.remote-ip={ip}"));
                }
            }
            ArcResult::Fail => {
                if let Some(r) = &self.reason {
                    out.push_str(&format!(" ({})", r.replace(['(', ')', '\\', ';'], "")));
                }
            }
        }
        out
    }
}

/// One ARC set: field indexes into `Message::fields`.
#[derive(Debug, Clone, Copy)]
struct SetFields {
    aar: usize,
    ams: usize,
    seal: usize,
}

/// A structurally valid chain, its signatures parsed, ready for the key lookups.
#[derive(Debug, Clone)]
pub struct Chain {
    sets: Vec<SetFields>,
    ams: Vec<Result<Signature, &'static str>>,
    seals: Vec<Seal>,
}

/// The tags of an ARC-Seal.
#[derive(Debug, Clone)]
struct Seal {
    a: dkim::Algorithm,
    b: Vec<u8>,
    d: String,
    s: String,
    cv: String,
}

/// What [`prepare`] found: a decided verdict, or a chain to verify.
#[derive(Debug, Clone)]
pub enum Prepared {
    Done(ArcVerdict),
    Chain(Chain),
}

fn instance_of(name: &str, value: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(value).ok()?;
    let i = if name == "arc-authentication-results" {
        // `i=N; authserv-id; results`: not a tag-list.
        let first = text.split(';').next()?.trim();
        let (tag, v) = first.split_once('=')?;
        (tag.trim() == "i").then_some(v.trim())?.to_string()
    } else {
        tag_list(value).ok()?.get("i")?.to_string()
    };
    i.parse().ok().filter(|n| (1..=MAX_INSTANCES).contains(n))
}

/// Steps 1–4 of RFC 8617 §5.2: collect, group by instance, check the structure.
pub fn prepare(msg: &Message) -> Prepared {
    const NAMES: [&str; 3] = [
        "arc-authentication-results",
        "arc-message-signature",
        "arc-seal",
    ];
    let mut slots: HashMap<u32, [Option<usize>; 3]> = HashMap::new();
    let mut any = false;
    for (idx, f) in msg.fields.iter().enumerate() {
        let Some(kind) = NAMES.iter().position(|n| f.is(n)) else {
            continue;
        };
        any = true;
        let Some(i) = instance_of(NAMES[kind], f.value()) else {
            return Prepared::Done(ArcVerdict::fail(
                0,
                format!("{} without a valid i=", NAMES[kind]),
            ));
        };
        let slot = &mut slots.entry(i).or_default()[kind];
        if slot.is_some() {
            return Prepared::Done(ArcVerdict::fail(
                i,
                format!("two {} with i={i}", NAMES[kind]),
            ));
        }
        *slot = Some(idx);
    }
    if !any {
        return Prepared::Done(ArcVerdict::none());
    }
    let n = slots.keys().copied().max().unwrap_or(0);
    let mut sets = Vec::with_capacity(n as usize);
    for i in 1..=n {
        match slots.get(&i) {
            Some([Some(aar), Some(ams), Some(seal)]) => sets.push(SetFields {
                aar: *aar,
                ams: *ams,
                seal: *seal,
            }),
            _ => return Prepared::Done(ArcVerdict::fail(n, format!("ARC set i={i} incomplete"))),
        }
    }
    let seals: Vec<Result<Seal, &'static str>> = sets
        .iter()
        .map(|s| parse_seal(msg.fields[s.seal].value()))
        .collect();
    let seals = match seals.into_iter().collect::<Result<Vec<Seal>, _>>() {
        Ok(s) => s,
        Err(why) => return Prepared::Done(ArcVerdict::fail(n, why)),
    };
    if seals[n as usize - 1].cv.eq_ignore_ascii_case("fail") {
        return Prepared::Done(ArcVerdict::fail(n, "the newest ARC-Seal says cv=fail"));
    }
    for (k, seal) in seals.iter().enumerate() {
        let want = if k == 0 { "none" } else { "pass" };
        if !seal.cv.eq_ignore_ascii_case(want) {
            return Prepared::Done(ArcVerdict::fail(
                n,
                format!(
                    "ARC-Seal i={} has cv={}, not {want}",
                    k + 1,
                    seal.cv
                        .chars()
                        .filter(char::is_ascii_alphanumeric)
                        .take(10)
                        .collect::<String>()
                ),
            ));
        }
    }
    let ams = sets
        .iter()
        .map(|s| parse_ams(msg.fields[s.ams].value()))
        .collect();
    Prepared::Chain(Chain { sets, ams, seals })
}

fn parse_seal(value: &[u8]) -> Result<Seal, &'static str> {
    let tags: Tags = tag_list(value).map_err(|_| "malformed ARC-Seal")?;
    if tags.get("h").is_some() {
        return Err("ARC-Seal with h=");
    }
    let get = |n| tags.get(n).ok_or("ARC-Seal missing a required tag");
    let a = dkim::Algorithm::parse_name(get("a")?).ok_or("ARC-Seal with an unknown algorithm")?;
    let b = dkim::base64_value(get("b")?)
        .filter(|b| !b.is_empty())
        .ok_or("ARC-Seal with a malformed b=")?;
    Ok(Seal {
        a,
        b,
        d: get("d")?.to_string(),
        s: get("s")?.to_string(),
        cv: get("cv")?.to_string(),
    })
}

fn parse_ams(value: &[u8]) -> Result<Signature, &'static str> {
    let tags = tag_list(value).map_err(|_| "malformed ARC-Message-Signature")?;
    // dkimpy's default for ARC; every sealer writes c= anyway.
    let sig = parse_common(&tags, Canon::Relaxed)?;
    if sig.h.iter().any(|h| h == "arc-seal") {
        return Err("ARC-Message-Signature signs ARC-Seal");
    }
    Ok(sig)
}

/// Every key the chain needs (AMS and AS of every instance).
pub fn key_names(p: &Prepared) -> Vec<String> {
    let Prepared::Chain(c) = p else {
        return Vec::new();
    };
    let seals = c
        .seals
        .iter()
        .map(|s| format!("{}._domainkey.{}", s.s, s.d.trim_end_matches('.')));
    let ams = c
        .ams
        .iter()
        .filter_map(|a| a.as_ref().ok())
        .map(Signature::key_name);
    seals.chain(ams).collect()
}

/// The body hashes the chain's ARC-Message-Signatures need.
pub fn body_hash_keys(p: &Prepared) -> Vec<BodyHashKey> {
    match p {
        Prepared::Done(_) => Vec::new(),
        Prepared::Chain(c) => c
            .ams
            .iter()
            .filter_map(|a| a.as_ref().ok())
            .map(BodyHashKey::of)
            .collect(),
    }
}

/// Steps 5–8 of RFC 8617 §5.2 with the keys fetched and the body hashed.
pub fn verify(
    msg: &Message,
    p: &Prepared,
    keys: &HashMap<String, Txt>,
    bodies: &BodyHashes,
    now: i64,
) -> ArcVerdict {
    let c = match p {
        Prepared::Done(v) => return v.clone(),
        Prepared::Chain(c) => c,
    };
    let n = c.sets.len() as u32;
    let ams_ok = |k: usize| -> Result<(), String> {
        let sig = c.ams[k].as_ref().map_err(|e| e.to_string())?;
        let answer = keys.get(&sig.key_name().to_ascii_lowercase());
        dkim::check_signature(msg, sig, msg.fields[c.sets[k].ams].raw, answer, bodies, now)
            .map(|_| ())
            .map_err(|(_, why)| why.to_string())
    };
    if let Err(why) = ams_ok(n as usize - 1) {
        return ArcVerdict::fail(n, format!("ARC-Message-Signature i={n}: {why}"));
    }
    for k in (0..n as usize).rev() {
        if let Err(why) = seal_ok(msg, c, k, keys) {
            return ArcVerdict::fail(n, format!("ARC-Seal i={}: {why}", k + 1));
        }
    }
    let oldest_pass = (0..n as usize - 1)
        .rev()
        .find(|&k| ams_ok(k).is_err())
        .map_or(0, |k| k as u32 + 2);
    ArcVerdict {
        result: ArcResult::Pass,
        reason: None,
        instances: n,
        oldest_pass: Some(oldest_pass),
        remote_ip: remote_ip(msg.fields[c.sets[0].aar].value()),
    }
}

/// ARC-Seal `k` (0-based) over the sets 1..=k+1, relaxed (RFC 8617 §5.1.1).
fn seal_ok(
    msg: &Message,
    c: &Chain,
    k: usize,
    keys: &HashMap<String, Txt>,
) -> Result<(), &'static str> {
    let seal = &c.seals[k];
    if seal.a == dkim::Algorithm::RsaSha1 {
        return Err("rsa-sha1 is not accepted (RFC 8301)");
    }
    let name = format!("{}._domainkey.{}", seal.s, seal.d.trim_end_matches('.'));
    let record = dkim::key_for_algorithm(keys.get(&name.to_ascii_lowercase()), seal.a)
        .map_err(|(_, why)| why)?;
    let mut fields: Vec<&[u8]> = Vec::with_capacity(3 * (k + 1));
    for (j, set) in c.sets.iter().take(k + 1).enumerate() {
        fields.push(msg.fields[set.aar].raw);
        fields.push(msg.fields[set.ams].raw);
        if j < k {
            fields.push(msg.fields[set.seal].raw);
        }
    }
    let data = signed_data(&fields, msg.fields[c.sets[k].seal].raw, Canon::Relaxed);
    if verify_bytes(&record.key, seal.a, &data, &seal.b) {
        Ok(())
    } else {
        Err("signature did not verify")
    }
}

/// `smtp.remote-ip=` (RFC 8617 §6) or else `policy.iprev=` in an
/// ARC-Authentication-Results value.
fn remote_ip(aar: &[u8]) -> Option<IpAddr> {
    let text = String::from_utf8_lossy(aar);
    let find = |prop: &str| {
        text.split(|c: char| c.is_whitespace() || c == ';')
            .find_map(|w| w.strip_prefix(prop))
            .and_then(|v| v.trim_matches('"').parse::<IpAddr>().ok())
    };
    find("smtp.remote-ip=").or_else(|| find("policy.iprev="))
}

#[cfg(test)]
mod tests;
