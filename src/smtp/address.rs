//! Mailboxes and paths (RFC 5321 §4.1.2, RFC 6531 for UTF-8).
//!
//! Parses what a client wrote between `<` and `>` into a [`Path`]; keeps enough detail
//! (quoted local part, address literal) for the relay check to refuse the routing
//! tricks an open relay falls for. Only syntax is checked here: whether a domain is
//! ours is the table's business, whether a form may relay is the inbound policy's.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Mailbox {
    /// The local part, unquoted (`"a b"` is stored as `a b`).
    pub local: String,
    /// The domain as written, or an address literal with its brackets.
    pub domain: String,
}

/// A parsed reverse-path or forward-path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Path {
    /// `<>`: the null reverse-path of bounces.
    Null,
    /// `<postmaster>` without a domain (RFC 5321 §4.1.1.3).
    Postmaster,
    Mailbox(Mailbox),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("address syntax: {0}")]
    Syntax(&'static str),
    #[error("address too long")]
    TooLong,
    #[error("non-ASCII address without SMTPUTF8")]
    NeedsUtf8,
}

const MAX_LOCAL: usize = 64;
const MAX_DOMAIN: usize = 255;

fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
}

impl Mailbox {
    /// Parses `local@domain` (local part possibly quoted). Non-ASCII is accepted here;
    /// callers that speak to a peer without SMTPUTF8 check [`Mailbox::is_ascii`].
    pub fn parse(s: &str) -> Result<Mailbox, AddressError> {
        let (local, rest) = if let Some(body) = s.strip_prefix('"') {
            let mut out = String::new();
            let mut chars = body.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some((_, e)) if !e.is_control() => out.push(e),
                        _ => return Err(AddressError::Syntax("bad quoted pair")),
                    },
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    c if c.is_control() => {
                        return Err(AddressError::Syntax("control character in quoted string"));
                    }
                    c => out.push(c),
                }
            }
            let end = end.ok_or(AddressError::Syntax("unterminated quoted string"))?;
            (out, &body[end..])
        } else {
            let at = s
                .rfind('@')
                .ok_or(AddressError::Syntax("missing @domain"))?;
            let local = &s[..at];
            if local.is_empty()
                || local.starts_with('.')
                || local.ends_with('.')
                || local.contains("..")
                || !local.chars().all(|c| is_atext(c) || c == '.')
            {
                return Err(AddressError::Syntax("bad local part"));
            }
            (local.to_string(), &s[at..])
        };
        let domain = rest
            .strip_prefix('@')
            .ok_or(AddressError::Syntax("missing @domain"))?;
        if local.is_empty() {
            return Err(AddressError::Syntax("empty local part"));
        }
        if local.len() > MAX_LOCAL {
            return Err(AddressError::TooLong);
        }
        check_domain(domain)?;
        Ok(Mailbox {
            local,
            domain: domain.to_string(),
        })
    }

    /// The lookup key: lowercased. Domains are case-insensitive; local parts are
    /// matched case-insensitively too, as every widespread MTA does for its tables.
    pub fn key(&self) -> String {
        format!(
            "{}@{}",
            self.local.to_lowercase(),
            self.domain.to_lowercase()
        )
    }

    pub fn domain_lower(&self) -> String {
        self.domain.to_lowercase()
    }

    pub fn is_ascii(&self) -> bool {
        self.local.is_ascii() && self.domain.is_ascii()
    }

    /// True when the local part needs quoting on the wire.
    fn needs_quotes(&self) -> bool {
        let l = &self.local;
        l.starts_with('.')
            || l.ends_with('.')
            || l.contains("..")
            || !l.chars().all(|c| is_atext(c) || c == '.')
    }

    pub fn is_address_literal(&self) -> bool {
        self.domain.starts_with('[')
    }
}

impl fmt::Display for Mailbox {
    /// The RFC 5321 form, quoting the local part when needed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.needs_quotes() {
            f.write_str("\"")?;
            for c in self.local.chars() {
                if c == '"' || c == '\\' {
                    f.write_str("\\")?;
                }
                write!(f, "{c}")?;
            }
            write!(f, "\"@{}", self.domain)
        } else {
            write!(f, "{}@{}", self.local, self.domain)
        }
    }
}

fn check_domain(d: &str) -> Result<(), AddressError> {
    if d.is_empty() {
        return Err(AddressError::Syntax("empty domain"));
    }
    if d.len() > MAX_DOMAIN {
        return Err(AddressError::TooLong);
    }
    if let Some(lit) = d.strip_prefix('[') {
        // Address literals are parsed so they can be refused by policy with a clear
        // reason rather than a syntax error.
        let inner = lit
            .strip_suffix(']')
            .ok_or(AddressError::Syntax("bad address literal"))?;
        let ok = inner.parse::<std::net::Ipv4Addr>().is_ok()
            || inner
                .strip_prefix("IPv6:")
                .is_some_and(|v6| v6.parse::<std::net::Ipv6Addr>().is_ok());
        return if ok {
            Ok(())
        } else {
            Err(AddressError::Syntax("bad address literal"))
        };
    }
    // A trailing dot (`alias.example.`) is refused outright: it would compare unequal
    // to our domains and could slip past a naive relay check.
    for label in d.split('.') {
        if label.is_empty() {
            return Err(AddressError::Syntax("empty domain label"));
        }
        if label.len() > 63 || label.starts_with('-') || label.ends_with('-') {
            return Err(AddressError::Syntax("bad domain label"));
        }
        if !label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || !c.is_ascii())
        {
            return Err(AddressError::Syntax("bad character in domain"));
        }
    }
    Ok(())
}

/// Parses the text a client wrote between `<` and `>` in MAIL or RCPT.
/// A source route (`@a,@b:user@d`) is dropped, as RFC 5321 §C lets a server do:
/// the mailbox is what counts, so the route can never make us relay.
pub fn parse_path(inner: &str, allow_utf8: bool) -> Result<Path, AddressError> {
    if inner.is_empty() {
        return Ok(Path::Null);
    }
    if inner.eq_ignore_ascii_case("postmaster") {
        return Ok(Path::Postmaster);
    }
    let mailbox_text = if inner.starts_with('@') {
        let colon = inner
            .find(':')
            .ok_or(AddressError::Syntax("bad source route"))?;
        for hop in inner[..colon].split(',') {
            let d = hop
                .strip_prefix('@')
                .ok_or(AddressError::Syntax("bad source route"))?;
            check_domain(d)?;
        }
        &inner[colon + 1..]
    } else {
        inner
    };
    if !allow_utf8 && !mailbox_text.is_ascii() {
        return Err(AddressError::NeedsUtf8);
    }
    Mailbox::parse(mailbox_text).map(Path::Mailbox)
}

/// Finds the path text between `<` and `>` in a MAIL/RCPT command line, honouring
/// quoted strings (a `>` inside quotes does not end the path).
pub fn extract_path(line: &str) -> Option<&str> {
    let start = line.find('<')? + 1;
    let mut in_quote = false;
    let mut escaped = false;
    for (i, c) in line[start..].char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quote => escaped = true,
            '"' => in_quote = !in_quote,
            '>' if !in_quote => return Some(&line[start..start + i]),
            _ => {}
        }
    }
    None
}

/// Splits `host:port` or `[v6]:port`.
pub fn split_host_port(s: &str) -> Option<(String, u16)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, port) = rest.split_once("]:")?;
        return Some((host.to_string(), port.parse().ok()?));
    }
    let (host, port) = s.rsplit_once(':')?;
    if host.is_empty() || host.contains(':') {
        return None;
    }
    Some((host.to_string(), port.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mb(l: &str, d: &str) -> Path {
        Path::Mailbox(Mailbox {
            local: l.into(),
            domain: d.into(),
        })
    }

    #[test]
    fn paths() {
        let cases: &[(&str, Result<Path, ()>)] = &[
            ("", Ok(Path::Null)),
            ("postmaster", Ok(Path::Postmaster)),
            ("PostMaster", Ok(Path::Postmaster)),
            ("alice@alias.example", Ok(mb("alice", "alias.example"))),
            ("a.b+c@x.y", Ok(mb("a.b+c", "x.y"))),
            ("@r1.example,@r2.example:bob@x.y", Ok(mb("bob", "x.y"))),
            ("\"a b\"@x.y", Ok(mb("a b", "x.y"))),
            (
                "\"u@other\"@alias.example",
                Ok(mb("u@other", "alias.example")),
            ),
            ("u%other@alias.example", Ok(mb("u%other", "alias.example"))),
            ("a@[127.0.0.1]", Ok(mb("a", "[127.0.0.1]"))),
            ("a@b@c", Err(())),
            ("a@alias.example.", Err(())),
            ("a..b@x.y", Err(())),
            (".a@x.y", Err(())),
            ("a@", Err(())),
            ("@x.y", Err(())),
            ("a@-x.y", Err(())),
            ("a@[300.1.1.1]", Err(())),
            ("user", Err(())),
            ("\"unterminated@x.y", Err(())),
        ];
        for (input, want) in cases {
            let got = parse_path(input, false).map_err(|_| ());
            assert_eq!(&got, want, "input {input:?}");
        }
    }

    #[test]
    fn utf8_needs_smtputf8() {
        assert_eq!(parse_path("jörg@x.de", false), Err(AddressError::NeedsUtf8));
        assert!(parse_path("jörg@x.de", true).is_ok());
    }

    #[test]
    fn display_quotes_when_needed() {
        let m = Mailbox::parse("\"a b\"@x.y").unwrap();
        assert_eq!(m.to_string(), "\"a b\"@x.y");
        assert_eq!(Mailbox::parse("a@X.Y").unwrap().key(), "a@x.y");
    }

    #[test]
    fn extract() {
        assert_eq!(extract_path("MAIL FROM:<a@b> SIZE=1"), Some("a@b"));
        assert_eq!(extract_path("RCPT TO:<\"a>b\"@c>"), Some("\"a>b\"@c"));
        assert_eq!(extract_path("RCPT TO:a@b"), None);
    }

    #[test]
    fn host_port() {
        assert_eq!(split_host_port("mx:25"), Some(("mx".into(), 25)));
        assert_eq!(split_host_port("[::1]:2525"), Some(("::1".into(), 2525)));
        assert_eq!(split_host_port("mx"), None);
    }
}
