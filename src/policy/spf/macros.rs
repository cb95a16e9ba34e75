//! Macro expansion (RFC 7208 §7.3, §7.4): letters, the digit and `r` transformers,
//! delimiters, URL escaping of uppercase letters, and the 253-octet truncation of
//! expanded domain names. Pure: `%{p}` arrives already resolved in [`Values`].

use super::record::{Macro, MacroString, Token};
use std::net::IpAddr;

/// What the macro letters stand for in one evaluation.
pub struct Values<'a> {
    /// `<sender>` as `local@domain` (`s`).
    pub sender: &'a str,
    /// `l`.
    pub local: &'a str,
    /// `o`.
    pub sender_domain: &'a str,
    /// The current `<domain>` (`d`).
    pub domain: &'a str,
    /// `i`, `c`, `v`; an IPv4-mapped IPv6 address arrives here as IPv4.
    pub ip: IpAddr,
    /// `h`.
    pub helo: &'a str,
    /// `p`: the validated domain name of `ip`, or None for "unknown".
    pub validated: Option<&'a str>,
    /// `r`: the receiving host.
    pub receiver: &'a str,
    /// `t`: seconds since the epoch.
    pub now: u64,
}

impl MacroString {
    pub fn uses(&self, letter: char) -> bool {
        self.0
            .iter()
            .any(|t| matches!(t, Token::Macro(m) if m.letter == letter))
    }
}

/// Expands a macro-string (an explanation, or a domain before [`domain`]).
pub fn expand(ms: &MacroString, v: &Values) -> String {
    let mut out = String::new();
    for t in &ms.0 {
        match t {
            Token::Literal(l) => out.push_str(l),
            Token::Macro(m) => out.push_str(&expand_one(m, v)),
        }
    }
    out
}

/// Expands a domain-spec into a name to query: without a trailing dot, and longer than
/// 253 octets cut from the left by whole labels (§7.3).
pub fn domain(ms: &MacroString, v: &Values) -> String {
    let full = expand(ms, v);
    let mut name = full.trim_end_matches('.');
    while name.len() > 253 {
        match name.split_once('.') {
            Some((_, rest)) => name = rest,
            None => break,
        }
    }
    name.to_string()
}

fn expand_one(m: &Macro, v: &Values) -> String {
    let value = match m.letter {
        's' => v.sender.to_string(),
        'l' => v.local.to_string(),
        'o' => v.sender_domain.to_string(),
        'd' => v.domain.to_string(),
        'i' => dotted(v.ip),
        'p' => v.validated.unwrap_or("unknown").to_string(),
        'v' => match v.ip {
            IpAddr::V4(_) => "in-addr".into(),
            IpAddr::V6(_) => "ip6".into(),
        },
        'h' => v.helo.to_string(),
        'c' => v.ip.to_string(),
        'r' => v.receiver.to_string(),
        't' => v.now.to_string(),
        _ => String::new(),
    };
    let out = transform(&value, m);
    if m.escape { url_escape(&out) } else { out }
}

/// Splits on the delimiters, reverses, keeps the right-hand parts, joins with dots.
pub fn transform(value: &str, m: &Macro) -> String {
    if m.keep.is_none() && !m.reverse && m.delimiters.is_empty() {
        return value.to_string();
    }
    let delims: &[char] = if m.delimiters.is_empty() {
        &['.']
    } else {
        &m.delimiters
    };
    let mut parts: Vec<&str> = value.split(delims).collect();
    if m.reverse {
        parts.reverse();
    }
    if let Some(n) = m.keep
        && n < parts.len()
    {
        parts.drain(..parts.len() - n);
    }
    parts.join(".")
}

/// `i`: dotted quad, or 32 dot-separated nibbles for IPv6 (§7.3; uppercase hex, as
/// the RFC 7208 test suite and its reference implementations write it).
pub fn dotted(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => v6
            .octets()
            .iter()
            .flat_map(|b| [b >> 4, b & 0xf])
            .map(|n| format!("{n:X}"))
            .collect::<Vec<_>>()
            .join("."),
    }
}

/// Escapes every octet outside `unreserved` (RFC 3986) as `%XX`.
pub fn url_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::record::{Context, MacroString};
    use super::*;

    fn values(ip: &str) -> Values<'static> {
        Values {
            sender: "strong-bad@email.example.com",
            local: "strong-bad",
            sender_domain: "email.example.com",
            domain: "email.example.com",
            ip: ip.parse().unwrap(),
            helo: "mx.example.org",
            validated: None,
            receiver: "tenso.test",
            now: 1,
        }
    }

    fn x(s: &str, ip: &str) -> String {
        expand(
            &MacroString::parse(s, Context::Explanation).unwrap(),
            &values(ip),
        )
    }

    /// The examples of RFC 7208 §7.4.
    #[test]
    fn rfc_examples() {
        let v4 = "192.0.2.3";
        assert_eq!(x("%{s}", v4), "strong-bad@email.example.com");
        assert_eq!(x("%{o}", v4), "email.example.com");
        assert_eq!(x("%{d}", v4), "email.example.com");
        assert_eq!(x("%{d4}", v4), "email.example.com");
        assert_eq!(x("%{d3}", v4), "email.example.com");
        assert_eq!(x("%{d2}", v4), "example.com");
        assert_eq!(x("%{d1}", v4), "com");
        assert_eq!(x("%{dr}", v4), "com.example.email");
        assert_eq!(x("%{d2r}", v4), "example.email");
        assert_eq!(x("%{l}", v4), "strong-bad");
        assert_eq!(x("%{l-}", v4), "strong.bad");
        assert_eq!(x("%{lr}", v4), "strong-bad");
        assert_eq!(x("%{lr-}", v4), "bad.strong");
        assert_eq!(x("%{l1r-}", v4), "strong");
        assert_eq!(
            x("%{ir}.%{v}._spf.%{d2}", v4),
            "3.2.0.192.in-addr._spf.example.com"
        );
        assert_eq!(
            x("%{lr-}.lp._spf.%{d2}", v4),
            "bad.strong.lp._spf.example.com"
        );
        assert_eq!(
            x("%{ir}.%{v}._spf.%{d2}", "2001:db8::cb01").to_ascii_lowercase(),
            "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.example.com"
        );
        assert_eq!(
            x("%{c} %{S}", "2001:db8::cb01"),
            "2001:db8::cb01 strong-bad%40email.example.com"
        );
        assert_eq!(x("%%%_%-", v4), "% %20");
    }

    #[test]
    fn long_domains_lose_labels_on_the_left() {
        let spec = format!("{}%{{d}}", "abcdefghij.".repeat(30));
        let ms = MacroString::parse(&spec, Context::DomainSpec).unwrap();
        let d = domain(&ms, &values("192.0.2.3"));
        assert!(d.len() <= 253, "{}", d.len());
        assert!(d.ends_with(".email.example.com"));
        assert!(d.starts_with("abcdefghij."));
    }
}
