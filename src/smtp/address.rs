//! Mailboxes and paths (RFC 5321 §4.1.2, RFC 6531 for UTF-8): reading them and writing them.
//!
//! Parses what a client wrote between `<` and `>` into a [`Path`]; keeps enough detail
//! (quoted local part, address literal) for the relay check to refuse the routing
//! tricks an open relay falls for. Writes a [`Mailbox`] back in its RFC 5321 form,
//! quoting the local part when it is not a Dot-string, and refuses what cannot be
//! written at all (control characters, an empty local part, over-long parts): every
//! address tenso puts on the wire or in a header it generates goes through
//! [`Mailbox::written`] or [`WirePath`], so none can carry CR, LF, or an unquoted `>`
//! or space that would end a path early and let its text become command parameters.
//!
//! [`check_alias`] is the one rule for a mailbox that may name an alias; the table
//! (CLI, admin socket, import) and RCPT use it alike. Only syntax is checked here:
//! whether a domain is ours is the table's business, whether a form may relay is the
//! inbound policy's.
//!
//! Invariants, held by the properties in the tests: for any mailbox, `written()` either
//! refuses or gives text that parses back to the same mailbox; for any text that
//! parses, writing the result succeeds and parses back to it again.

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
    /// Valid syntax, but not a form an alias (or a forwarded recipient) may take.
    #[error("{0}")]
    NotAlias(&'static str),
}

/// Longest local part as written, quotes and escapes included (RFC 5321 §4.5.3.1.1).
const MAX_LOCAL: usize = 64;
/// Longest domain (RFC 5321 §4.5.3.1.2).
const MAX_DOMAIN: usize = 255;
/// Longest reverse- or forward-path, angle brackets included (RFC 5321 §4.5.3.1.3).
pub const MAX_PATH: usize = 256;

/// RFC 5322 atext, with RFC 6531's UTF-8 (no control characters, C1 included).
fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || is_utf8_text(c)
}

fn is_utf8_text(c: char) -> bool {
    !c.is_ascii() && !c.is_control()
}

/// A character a Quoted-string may hold: qtextSMTP, or `"` and `\` as a quoted-pair
/// (RFC 5321 §4.1.2: ASCII 32-126), or UTF-8 text (RFC 6531 §3.3).
fn is_quotable(c: char) -> bool {
    (' '..='~').contains(&c) || is_utf8_text(c)
}

/// RFC 5321 Dot-string: atoms of atext joined by single dots.
fn is_dot_string(l: &str) -> bool {
    !l.is_empty()
        && l.split('.')
            .all(|atom| !atom.is_empty() && atom.chars().all(is_atext))
}

/// Writes a local part: as is when it is a Dot-string, else as a Quoted-string.
fn write_local(local: &str, out: &mut String) -> Result<(), AddressError> {
    if local.is_empty() {
        return Err(AddressError::Syntax("empty local part"));
    }
    if is_dot_string(local) {
        out.push_str(local);
        return Ok(());
    }
    if !local.chars().all(is_quotable) {
        return Err(AddressError::Syntax(
            "local part holds a character that cannot be written",
        ));
    }
    out.push('"');
    for c in local.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    Ok(())
}

/// Reads a Quoted-string at the start of `s` (which starts with `"`): the unquoted
/// content and the rest after the closing quote.
fn read_quoted(s: &str) -> Result<(String, &str), AddressError> {
    let body = &s[1..];
    let mut out = String::new();
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some((_, e)) if (' '..='~').contains(&e) => out.push(e),
                _ => return Err(AddressError::Syntax("bad quoted pair")),
            },
            '"' => return Ok((out, &body[i + 1..])),
            c if is_quotable(c) => out.push(c),
            _ => {
                return Err(AddressError::Syntax("control character in quoted string"));
            }
        }
    }
    Err(AddressError::Syntax("unterminated quoted string"))
}

impl Mailbox {
    /// Parses `local@domain` (local part possibly quoted). Non-ASCII is accepted here;
    /// callers that speak to a peer without SMTPUTF8 check [`Mailbox::is_ascii`].
    pub fn parse(s: &str) -> Result<Mailbox, AddressError> {
        let (local, rest) = if s.starts_with('"') {
            read_quoted(s)?
        } else {
            let at = s
                .rfind('@')
                .ok_or(AddressError::Syntax("missing @domain"))?;
            let local = &s[..at];
            if !is_dot_string(local) {
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
        if s.len() - rest.len() > MAX_LOCAL || s.len() + 2 > MAX_PATH {
            return Err(AddressError::TooLong);
        }
        check_domain(domain)?;
        Ok(Mailbox {
            local,
            domain: domain.to_string(),
        })
    }

    /// The RFC 5321 Mailbox form (the text between `<` and `>`), quoting the local
    /// part when it is not a Dot-string; refuses a mailbox that cannot be written as
    /// a valid path (control characters, empty or over-long parts, a bad domain).
    pub fn written(&self) -> Result<String, AddressError> {
        let mut s = String::with_capacity(self.local.len() + self.domain.len() + 3);
        write_local(&self.local, &mut s)?;
        if s.len() > MAX_LOCAL {
            return Err(AddressError::TooLong);
        }
        check_domain(&self.domain)?;
        s.push('@');
        s.push_str(&self.domain);
        if s.len() + 2 > MAX_PATH {
            return Err(AddressError::TooLong);
        }
        Ok(s)
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

    pub fn is_address_literal(&self) -> bool {
        self.domain.starts_with('[')
    }
}

impl fmt::Display for Mailbox {
    /// The RFC 5321 form ([`Mailbox::written`]). A mailbox that cannot be written (only
    /// one built by hand, never a parsed one) is shown with `?` for what cannot be.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Ok(s) = self.written() {
            return f.write_str(&s);
        }
        let local: String = self
            .local
            .chars()
            .map(|c| if is_quotable(c) { c } else { '?' })
            .collect();
        let domain: String = self
            .domain
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-.[]:".contains(c) || is_utf8_text(c) {
                    c
                } else {
                    '?'
                }
            })
            .collect();
        let mut s = String::new();
        let _ = write_local(if local.is_empty() { "?" } else { &local }, &mut s);
        write!(f, "{s}@{domain}")
    }
}

/// The one rule for a mailbox that may name an alias, used by the table (CLI, admin
/// socket, import) and by RCPT alike: valid RFC 5321 syntax within the length limits
/// (given by [`Mailbox::parse`]), a domain name rather than an address literal, and no
/// `%`, `!` or `@` in the local part — the routing forms open relays once followed.
pub fn check_alias(m: &Mailbox) -> Result<(), AddressError> {
    if m.is_address_literal() {
        return Err(AddressError::NotAlias("address literals are not accepted"));
    }
    if m.local.contains(['%', '!']) {
        return Err(AddressError::NotAlias("% and ! routing is not supported"));
    }
    if m.local.contains('@') {
        return Err(AddressError::NotAlias("quoted local part holding @"));
    }
    Ok(())
}

/// A reverse- or forward-path fit for the wire: the text between `<` and `>`, checked
/// by [`Mailbox::written`] (or empty for `<>`). The delivery client writes nothing else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WirePath(String);

impl WirePath {
    /// A path as tenso stores it (table, envelope): `""` is the null path, a mailbox is
    /// re-written in its RFC 5321 form. Text stored raw by older versions (`a b@d`) is
    /// taken as local part and domain split at the last `@`, then quoted properly.
    pub fn from_stored(s: &str) -> Result<WirePath, AddressError> {
        if s.is_empty() {
            return Ok(WirePath(String::new()));
        }
        match parse_path(s, true) {
            Ok(Path::Mailbox(m)) => m.written().map(WirePath),
            Ok(Path::Null) => Ok(WirePath(String::new())),
            Ok(Path::Postmaster) => Err(AddressError::Syntax("postmaster without a domain")),
            Err(e) => {
                let Some((local, domain)) = s.rsplit_once('@') else {
                    return Err(e);
                };
                let m = Mailbox {
                    local: local.to_string(),
                    domain: domain.to_string(),
                };
                m.written().map(WirePath).map_err(|_| e)
            }
        }
    }

    /// The path text without the angle brackets (`""` for `<>`).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_null(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for WirePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{}>", self.0)
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
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || is_utf8_text(c))
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
    if inner.len() + 2 > MAX_PATH {
        return Err(AddressError::TooLong);
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
    split_path(line).map(|(path, _)| path)
}

/// The path text between `<` and `>` (as [`extract_path`]) and the parameter text
/// after the `>`.
pub fn split_path(line: &str) -> Option<(&str, &str)> {
    let start = line.find('<')? + 1;
    let mut in_quote = false;
    let mut escaped = false;
    for (i, c) in line[start..].char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quote => escaped = true,
            '"' => in_quote = !in_quote,
            '>' if !in_quote => return Some((&line[start..start + i], &line[start + i + 1..])),
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
    use proptest::prelude::*;

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
    fn written_form_quotes_when_needed_and_refuses_the_unwritable() {
        let mb = |l: &str, d: &str| Mailbox {
            local: l.into(),
            domain: d.into(),
        };
        let cases: &[(Mailbox, Result<&str, ()>)] = &[
            (mb("a b", "x.y"), Ok("\"a b\"@x.y")),
            (mb("x>y", "catch.test"), Ok("\"x>y\"@catch.test")),
            (mb("../x", "alias.test"), Ok("\"../x\"@alias.test")),
            (mb("a\"b\\c", "x.y"), Ok("\"a\\\"b\\\\c\"@x.y")),
            (mb("a.b+c", "x.y"), Ok("a.b+c@x.y")),
            (mb("jörg", "x.de"), Ok("jörg@x.de")),
            (mb("", "x.y"), Err(())),
            (mb("a\r\nRCPT TO:<v@evil.test>", "x.y"), Err(())),
            (mb("tab\there", "x.y"), Err(())),
            (mb("a", "x.y> NOTIFY=NEVER"), Err(())),
            (mb(&"a".repeat(65), "x.y"), Err(())),
            (mb(&"a".repeat(64), "x.y"), Ok("")),
            (mb(&" ".repeat(63), "x.y"), Err(())),
        ];
        for (m, want) in cases {
            match (m.written(), want) {
                (Ok(w), Ok(exp)) if exp.is_empty() || w == *exp => {}
                (Err(_), Err(())) => {}
                (got, _) => panic!("{m:?}: got {got:?}, want {want:?}"),
            }
        }
        assert_eq!(
            Mailbox::parse("\"a b\"@x.y").unwrap().to_string(),
            "\"a b\"@x.y"
        );
        assert_eq!(Mailbox::parse("a@X.Y").unwrap().key(), "a@x.y");
        // Display never shows a line break, even for a mailbox built by hand.
        let shown = mb("a\r\nb", "x\ny").to_string();
        assert!(!shown.contains(['\r', '\n']), "{shown}");
    }

    #[test]
    fn lengths_count_the_written_form() {
        let l64 = "a".repeat(64);
        assert!(parse_path(&format!("{l64}@x.y"), false).is_ok());
        assert_eq!(
            parse_path(&format!("a{l64}@x.y"), false),
            Err(AddressError::TooLong)
        );
        // 62 characters, 64 with the quotes.
        let q = format!("\"{}\"@x.y", " ".repeat(62));
        assert!(parse_path(&q, false).is_ok());
        let q = format!("\"{}\"@x.y", " ".repeat(63));
        assert_eq!(parse_path(&q, false), Err(AddressError::TooLong));
        // A path of 256 octets with its brackets is the most there may be.
        let label = "d".repeat(63);
        let domain = format!("{label}.{label}.{label}.{}", "e".repeat(52));
        let path = format!("abcdefghi@{domain}");
        assert_eq!(path.len(), 254);
        assert!(parse_path(&path, false).is_ok());
        assert_eq!(
            parse_path(&format!("x{path}"), false),
            Err(AddressError::TooLong)
        );
    }

    #[test]
    fn alias_rule() {
        let check = |s: &str| check_alias(&Mailbox::parse(s).unwrap());
        assert!(check("alice@alias.test").is_ok());
        assert!(check("\"../x\"@alias.test").is_ok());
        assert!(check("\"sales team\"@alias.test").is_ok());
        for bad in [
            "a@[127.0.0.1]",
            "u%other@alias.test",
            "a!b@alias.test",
            "\"u@other\"@alias.test",
        ] {
            assert!(
                matches!(check(bad), Err(AddressError::NotAlias(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn stored_paths_are_rewritten_for_the_wire() {
        let w = |s: &str| WirePath::from_stored(s).map(|p| p.to_string());
        assert_eq!(w(""), Ok("<>".into()));
        assert_eq!(w("a@x.y"), Ok("<a@x.y>".into()));
        assert_eq!(w("\"a b\"@x.y"), Ok("<\"a b\"@x.y>".into()));
        // Written raw by older versions: quoted now.
        assert_eq!(w("a b@catch.test"), Ok("<\"a b\"@catch.test>".into()));
        assert_eq!(w("x>y@catch.test"), Ok("<\"x>y\"@catch.test>".into()));
        assert_eq!(w("../x@alias.test"), Ok("<\"../x\"@alias.test>".into()));
        for bad in ["postmaster", "no-domain", "a\r\nb@x.y", "a@x.y\r\nDATA"] {
            assert!(w(bad).is_err(), "{bad:?}");
        }
    }

    /// What a written path may never hold outside a quoted string: anything that
    /// ends a path or a command line (the checker is written from RFC 5321's
    /// grammar, independently of the writer).
    fn assert_wire_safe(w: &str) -> Result<(), TestCaseError> {
        prop_assert!(w.len() + 2 <= MAX_PATH, "too long: {w:?}");
        let (mut quoted, mut escaped) = (false, false);
        for c in w.chars() {
            prop_assert!(!c.is_control(), "control character in {w:?}");
            if escaped {
                escaped = false;
                continue;
            }
            match c {
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                '>' | '<' | ' ' if !quoted => prop_assert!(false, "unquoted {c:?} in {w:?}"),
                _ => {}
            }
        }
        prop_assert!(!quoted && !escaped, "unterminated quote in {w:?}");
        Ok(())
    }

    /// Text drawn mostly from the characters that matter to quoting and framing.
    fn dense_text(max: usize) -> impl Strategy<Value = String> {
        // Control characters are rare, so that most texts are writable and the
        // round trip is exercised; they still come in one text out of several.
        let ch = prop_oneof![
            30 => prop::sample::select(vec![
                '"', '\\', '>', '<', ' ', '@', '.', 'a', 'Z', '0', '(', ',', ':', '%', '!',
                '[', ']', '+', '-', 'é',
            ]),
            1 => prop::sample::select(vec!['\r', '\n', '\t', '\0', '\u{85}', '\u{7f}']),
            2 => any::<char>(),
        ];
        prop::collection::vec(ch, 0..max).prop_map(|v| v.into_iter().collect())
    }

    fn domain() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => "[a-z0-9]{1,12}(\\.[a-z0-9-]{1,12}){0,3}",
            1 => "[a-z]{60,63}\\.[a-z]{60,63}\\.[a-z]{60,63}\\.[a-z]{2,63}",
            1 => Just("[127.0.0.1]".to_string()),
            1 => dense_text(20),
        ]
    }

    /// Path text as a client could write it: bare, local@domain, quoted@domain, or
    /// the written form of a mailbox with one character inserted (near misses).
    fn path_text() -> impl Strategy<Value = String> {
        let near = (dense_text(60), domain(), any::<Option<(usize, char)>>()).prop_map(
            |(local, domain, edit)| {
                let mut w = Mailbox { local, domain }.written().unwrap_or_default();
                if let Some((at, c)) = edit {
                    let mut at = at % (w.len() + 1);
                    while !w.is_char_boundary(at) {
                        at -= 1;
                    }
                    w.insert(at, c);
                }
                w
            },
        );
        prop_oneof![
            1 => dense_text(80),
            1 => (dense_text(80), domain()).prop_map(|(l, d)| format!("{l}@{d}")),
            1 => (dense_text(70), domain()).prop_map(|(l, d)| format!("\"{l}\"@{d}")),
            4 => near,
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// For any mailbox, writing refuses, or gives a wire-safe path that parses back
        /// to the same mailbox and that a command line cannot extend.
        #[test]
        fn write_then_parse_round_trips_or_refuses(local in dense_text(64), domain in domain()) {
            let m = Mailbox { local, domain };
            if let Ok(w) = m.written() {
                assert_wire_safe(&w)?;
                prop_assert_eq!(parse_path(&w, true), Ok(Path::Mailbox(m.clone())));
                let line = format!("MAIL FROM:<{w}> SIZE=1");
                prop_assert_eq!(extract_path(&line), Some(w.as_str()));
                prop_assert_eq!(WirePath::from_stored(&w).map(|p| p.0), Ok(w.clone()));
            }
        }

        /// For any text, what parses can be written, no longer than it came, and the
        /// written form parses to the same mailbox.
        #[test]
        fn parse_then_write_is_canonical(text in path_text()) {
            if let Ok(Path::Mailbox(m)) = parse_path(&text, true) {
                let w = m.written().expect("a parsed mailbox can be written");
                assert_wire_safe(&w)?;
                prop_assert!(w.len() <= text.len(), "{} longer than {}", w, text);
                prop_assert_eq!(parse_path(&w, true), Ok(Path::Mailbox(m)));
            }
        }

        /// Whatever is stored, a [`WirePath`] is wire-safe, and Display never breaks a line.
        #[test]
        fn stored_and_displayed_forms_are_safe(text in path_text(), local in dense_text(40), domain in dense_text(20)) {
            if let Ok(p) = WirePath::from_stored(&text) {
                assert_wire_safe(p.as_str())?;
            }
            let shown = Mailbox { local, domain }.to_string();
            prop_assert!(!shown.chars().any(char::is_control), "{:?}", shown);
        }
    }

    #[test]
    fn extract() {
        assert_eq!(extract_path("MAIL FROM:<a@b> SIZE=1"), Some("a@b"));
        assert_eq!(extract_path("RCPT TO:<\"a>b\"@c>"), Some("\"a>b\"@c"));
        assert_eq!(extract_path("RCPT TO:a@b"), None);
        assert_eq!(
            split_path("RCPT TO:<\"a>b\"@c> NOTIFY=NEVER"),
            Some(("\"a>b\"@c", " NOTIFY=NEVER"))
        );
    }

    #[test]
    fn host_port() {
        assert_eq!(split_host_port("mx:25"), Some(("mx".into(), 25)));
        assert_eq!(split_host_port("[::1]:2525"), Some(("::1".into(), 2525)));
        assert_eq!(split_host_port("mx"), None);
    }
}
