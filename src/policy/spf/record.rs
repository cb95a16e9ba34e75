//! The SPF record grammar of RFC 7208 §4.5, §4.6.1, §5, §6 and §7.1: record
//! selection, terms, mechanisms with their CIDR lengths, modifiers, and macro-strings.
//!
//! Parsing is strict and whole-record (§4.6: "If there are any syntax errors anywhere in
//! the record, check_host() returns immediately with the result permerror"), so a bad
//! term after a matching one still makes the record a permerror. Pure: no DNS, no I/O.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// A syntax error in a record; becomes `permerror` with this text as the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError(pub String);

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn err<T>(msg: impl Into<String>) -> Result<T, SyntaxError> {
    Err(SyntaxError(msg.into()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qualifier {
    Pass,
    Fail,
    SoftFail,
    Neutral,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mechanism {
    All,
    Include(MacroString),
    A {
        domain: Option<MacroString>,
        cidr4: u8,
        cidr6: u8,
    },
    Mx {
        domain: Option<MacroString>,
        cidr4: u8,
        cidr6: u8,
    },
    Ptr(Option<MacroString>),
    Ip4(Ipv4Addr, u8),
    Ip6(Ipv6Addr, u8),
    Exists(MacroString),
}

impl Mechanism {
    /// Terms that cost DNS queries and count toward the limit of 10 (§4.6.4).
    pub fn queries_dns(&self) -> bool {
        matches!(
            self,
            Mechanism::Include(_)
                | Mechanism::A { .. }
                | Mechanism::Mx { .. }
                | Mechanism::Ptr(_)
                | Mechanism::Exists(_)
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directive {
    pub qualifier: Qualifier,
    pub mechanism: Mechanism,
    /// The term as written, for logs and `Received-SPF: mechanism=`.
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    pub directives: Vec<Directive>,
    pub redirect: Option<MacroString>,
    pub exp: Option<MacroString>,
}

/// One piece of a macro-string (§7.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    Literal(String),
    Macro(Macro),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Macro {
    /// Lowercase macro letter: one of `slodiphcrtv`.
    pub letter: char,
    /// Written in uppercase: the expansion is URL-escaped (§7.3).
    pub escape: bool,
    /// Keep this many right-hand parts (never 0).
    pub keep: Option<usize>,
    pub reverse: bool,
    /// Split characters; empty means ".".
    pub delimiters: Vec<char>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MacroString(pub Vec<Token>);

/// Where a macro-string stands: the letters `c`, `r` and `t` are for explanations only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    DomainSpec,
    UnknownModifier,
    Explanation,
}

/// The record among a name's TXT strings (§4.5): those that begin with `v=spf1`
/// (any case) followed by a space or the end. `Ok(None)`: no SPF record.
pub fn select(txts: &[Vec<u8>]) -> Result<Option<&[u8]>, SyntaxError> {
    let mut found = txts.iter().filter(|t| is_spf_record(t));
    let first = found.next();
    if found.next().is_some() {
        return err("more than one SPF record (RFC 7208 4.5)");
    }
    Ok(first.map(Vec::as_slice))
}

fn is_spf_record(t: &[u8]) -> bool {
    t.len() >= 6 && t[..6].eq_ignore_ascii_case(b"v=spf1") && (t.len() == 6 || t[6] == b' ')
}

/// Parses a selected record (beginning with `v=spf1`).
pub fn parse(record: &[u8]) -> Result<Record, SyntaxError> {
    let Some(pos) = record.iter().position(|b| !(0x20..0x7f).contains(b)) else {
        return parse_terms(std::str::from_utf8(&record[6..]).unwrap_or_default());
    };
    err(format!(
        "byte 0x{:02x} at offset {pos}: only printable ASCII and spaces are allowed (RFC 7208 3.1, 4.6.1)",
        record[pos]
    ))
}

fn parse_terms(terms: &str) -> Result<Record, SyntaxError> {
    let mut rec = Record::default();
    for term in terms.split(' ').filter(|t| !t.is_empty()) {
        if let Some((name, value)) = modifier(term) {
            let slot = match name.to_ascii_lowercase().as_str() {
                "redirect" => &mut rec.redirect,
                "exp" => &mut rec.exp,
                _ => {
                    MacroString::parse(value, Context::UnknownModifier)
                        .map_err(|e| SyntaxError(format!("modifier {term:?}: {e}")))?;
                    continue;
                }
            };
            if slot.is_some() {
                return err(format!("{name}= appears twice (RFC 7208 6)"));
            }
            *slot = Some(domain_spec(value).map_err(|e| SyntaxError(format!("{term:?}: {e}")))?);
        } else {
            rec.directives.push(directive(term)?);
        }
    }
    Ok(rec)
}

/// `name "=" value` with `name = ALPHA *( ALPHA / DIGIT / "-" / "_" / "." )`.
fn modifier(term: &str) -> Option<(&str, &str)> {
    let (name, value) = term.split_once('=')?;
    let mut chars = name.chars();
    let first = chars.next()?;
    (first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    .then_some((name, value))
}

fn directive(term: &str) -> Result<Directive, SyntaxError> {
    let (qualifier, rest) = match term.as_bytes()[0] {
        b'+' => (Qualifier::Pass, &term[1..]),
        b'-' => (Qualifier::Fail, &term[1..]),
        b'~' => (Qualifier::SoftFail, &term[1..]),
        b'?' => (Qualifier::Neutral, &term[1..]),
        _ => (Qualifier::Pass, term),
    };
    let split = rest.find([':', '/']).unwrap_or(rest.len());
    let (name, args) = rest.split_at(split);
    let mechanism = mechanism(&name.to_ascii_lowercase(), args)
        .map_err(|e| SyntaxError(format!("{term:?}: {e}")))?;
    Ok(Directive {
        qualifier,
        mechanism,
        text: term.to_string(),
    })
}

fn mechanism(name: &str, args: &str) -> Result<Mechanism, SyntaxError> {
    match name {
        "all" if args.is_empty() => Ok(Mechanism::All),
        "all" => err("all takes no argument"),
        "include" => Ok(Mechanism::Include(required_domain(args)?)),
        "exists" => Ok(Mechanism::Exists(required_domain(args)?)),
        "ptr" => Ok(Mechanism::Ptr(optional_domain(args)?)),
        "a" | "mx" => {
            let (args, cidr4, cidr6) = dual_cidr(args)?;
            let domain = optional_domain(args)?;
            Ok(if name == "a" {
                Mechanism::A {
                    domain,
                    cidr4,
                    cidr6,
                }
            } else {
                Mechanism::Mx {
                    domain,
                    cidr4,
                    cidr6,
                }
            })
        }
        "ip4" => {
            let (ip, len) = network(args, 32)?;
            let ip = ip
                .parse()
                .or_else(|_| err(format!("{ip:?} is not an IPv4 address")))?;
            Ok(Mechanism::Ip4(ip, len))
        }
        "ip6" => {
            let (ip, len) = network(args, 128)?;
            let ip = ip
                .parse()
                .or_else(|_| err(format!("{ip:?} is not an IPv6 address")))?;
            Ok(Mechanism::Ip6(ip, len))
        }
        _ => err("unknown mechanism"),
    }
}

/// `":" domain-spec`, required.
fn required_domain(args: &str) -> Result<MacroString, SyntaxError> {
    match args.strip_prefix(':') {
        Some(spec) => domain_spec(spec),
        None => err("needs \":\" and a domain"),
    }
}

/// `[ ":" domain-spec ]`.
fn optional_domain(args: &str) -> Result<Option<MacroString>, SyntaxError> {
    if args.is_empty() {
        return Ok(None);
    }
    required_domain(args).map(Some)
}

/// `ip4:network[/len]` or `ip6:network[/len]`.
fn network(args: &str, max: u8) -> Result<(&str, u8), SyntaxError> {
    let Some(net) = args.strip_prefix(':') else {
        return err("needs \":\" and an address");
    };
    match net.split_once('/') {
        Some((ip, len)) => Ok((ip, cidr_length(len, max)?)),
        None => Ok((net, max)),
    }
}

/// Splits `[ "/" ip4-len ] [ "//" ip6-len ]` off the end of an `a`/`mx` argument.
fn dual_cidr(args: &str) -> Result<(&str, u8, u8), SyntaxError> {
    let mut rest = args;
    let mut cidr6 = 128;
    let mut cidr4 = 32;
    if let Some(pos) = rest.rfind("//")
        && is_digits(&rest[pos + 2..])
    {
        cidr6 = cidr_length(&rest[pos + 2..], 128)?;
        rest = &rest[..pos];
    }
    if let Some(pos) = rest.rfind('/')
        && is_digits(&rest[pos + 1..])
    {
        cidr4 = cidr_length(&rest[pos + 1..], 32)?;
        rest = &rest[..pos];
    }
    Ok((rest, cidr4, cidr6))
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// A CIDR length: digits without a leading zero, at most `max` (§5.6).
fn cidr_length(s: &str, max: u8) -> Result<u8, SyntaxError> {
    if !is_digits(s) || (s.len() > 1 && s.starts_with('0')) || s.len() > 3 {
        return err(format!("bad CIDR length {s:?}"));
    }
    match s.parse::<u8>() {
        Ok(n) if n <= max => Ok(n),
        _ => err(format!("CIDR length {s} is over {max}")),
    }
}

/// `domain-spec = macro-string domain-end`, `domain-end = ( "." toplabel [ "." ] ) /
/// macro-expand` (§7.1): a domain ends in a macro or in a real top label.
pub fn domain_spec(spec: &str) -> Result<MacroString, SyntaxError> {
    let (ms, ends_in_macro) = MacroString::parse_tail(spec, Context::DomainSpec)?;
    if spec.is_empty() {
        return err("empty domain");
    }
    if ends_in_macro {
        return Ok(ms);
    }
    let body = spec.strip_suffix('.').unwrap_or(spec);
    match body.rsplit_once('.') {
        Some((_, top)) if is_toplabel(top) => Ok(ms),
        _ => err(format!(
            "{spec:?} does not end in a top label (RFC 7208 7.1)"
        )),
    }
}

/// `toplabel = ( *alphanum ALPHA *alphanum ) / ( 1*alphanum "-" *( alphanum / "-" ) alphanum )`.
pub fn is_toplabel(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && b.iter().any(|c| c.is_ascii_alphabetic() || *c == b'-')
}

impl MacroString {
    /// Parses a macro-string; in an explanation spaces are literal too.
    pub fn parse(s: &str, ctx: Context) -> Result<MacroString, SyntaxError> {
        Self::parse_tail(s, ctx).map(|(m, _)| m)
    }

    /// Also tells whether the string ends in a macro-expand (`%{…}`, `%%`, `%_`, `%-`).
    fn parse_tail(s: &str, ctx: Context) -> Result<(MacroString, bool), SyntaxError> {
        let mut out = Vec::new();
        let mut lit = String::new();
        let mut chars = s.char_indices().peekable();
        let mut expand = false;
        while let Some((i, c)) = chars.next() {
            expand = c == '%';
            match c {
                '%' => match chars.next() {
                    Some((_, '%')) => lit.push('%'),
                    Some((_, '_')) => lit.push(' '),
                    Some((_, '-')) => lit.push_str("%20"),
                    Some((j, '{')) => {
                        let Some(end) = s[j..].find('}') else {
                            return err("unterminated macro");
                        };
                        let m = parse_macro(&s[j + 1..j + end], ctx)?;
                        if !lit.is_empty() {
                            out.push(Token::Literal(std::mem::take(&mut lit)));
                        }
                        out.push(Token::Macro(m));
                        while chars.peek().is_some_and(|(k, _)| *k <= j + end) {
                            chars.next();
                        }
                    }
                    _ => {
                        return err(format!(
                            "'%' at {i} not followed by '{{', '%', '_' or '-' (RFC 7208 7.1)"
                        ));
                    }
                },
                ' ' if ctx == Context::Explanation => lit.push(' '),
                '!'..='~' => lit.push(c),
                _ => return err(format!("character {c:?} not allowed")),
            }
        }
        if !lit.is_empty() {
            out.push(Token::Literal(lit));
        }
        Ok((MacroString(out), expand))
    }
}

/// `macro-letter transformers *delimiter` between the braces.
fn parse_macro(inner: &str, ctx: Context) -> Result<Macro, SyntaxError> {
    let mut chars = inner.chars().peekable();
    let Some(l) = chars.next() else {
        return err("empty macro");
    };
    let letter = l.to_ascii_lowercase();
    let allowed = match ctx {
        Context::DomainSpec => "slodiphv",
        Context::UnknownModifier | Context::Explanation => "slodiphcrtv",
    };
    if !l.is_ascii_alphabetic() || !allowed.contains(letter) {
        return err(format!(
            "macro letter {l:?} not allowed here (RFC 7208 7.2)"
        ));
    }
    let mut digits = String::new();
    while let Some(d) = chars.next_if(char::is_ascii_digit) {
        digits.push(d);
    }
    let keep = if digits.is_empty() {
        None
    } else {
        match digits.parse::<usize>() {
            Ok(0) => return err("macro keeps 0 parts (RFC 7208 7.3)"),
            Ok(n) => Some(n),
            Err(_) => Some(usize::MAX),
        }
    };
    let reverse = chars.next_if(|c| c.eq_ignore_ascii_case(&'r')).is_some();
    let mut delimiters = Vec::new();
    for d in chars {
        if !".-+,/_=".contains(d) {
            return err(format!("bad macro delimiter {d:?}"));
        }
        delimiters.push(d);
    }
    Ok(Macro {
        letter,
        escape: l.is_ascii_uppercase(),
        keep,
        reverse,
        delimiters,
    })
}

#[cfg(test)]
mod tests;
