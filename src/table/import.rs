//! Reading Postfix alias tables for `tenso import`, writing them for `tenso export`.
//!
//! Two input formats are understood:
//!
//! * [`Format::Virtual`]: the source text of a `virtual_alias_maps` table (virtual(5)),
//!   `pattern result`, where the result lists addresses separated by commas and/or
//!   whitespace. Patterns are `user@domain`, `@domain` (catch-all, kept as `@domain`),
//!   a bare `domain` (a virtual alias domain declaration, see [`Parsed::domains`]) or a
//!   bare `user` (qualified with the `domain` argument).
//! * [`Format::Aliases`]: a local aliases(5) file, `name: value, value, ...`. Names are
//!   local parts, so every alias becomes `name@domain` and the `domain` argument is required.
//!
//! Both share postmap(1)'s line syntax: blank lines and lines whose first non-blank
//! character is `#` are ignored, and a line starting with whitespace continues the
//! previous logical line.
//!
//! Normalisation: alias keys are lowercased (Postfix folds keys too); destinations keep
//! their local part as written (it may be case-sensitive at the destination) and get a
//! lowercased domain. `<address>` and `Phrase <address>` are reduced to the address, a
//! fully quoted value is unquoted, and duplicate destinations of one alias are dropped.
//!
//! This module is pure text processing: no I/O, no store, and no address validation
//! beyond the file formats' own syntax. The caller validates every returned address and
//! reports problems against [`Entry::line`].
//!
//! It never fails as a whole and never panics. Every line it cannot turn into an entry
//! (commands, files, `:include:`, missing domain, duplicates, syntax errors) yields a
//! [`BadLine`] and parsing goes on, so all problems are reported in one run. A logical
//! line with any problem yields no entry at all: importing the rest of an alias would
//! silently drop mail for the refused destinations.

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::str::FromStr;

/// Input format of `tenso import`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// virtual(5): `pattern result`, as fed to postmap(1).
    Virtual,
    /// aliases(5): `name: value, ...`, as fed to postalias(1) or newaliases(1).
    Aliases,
}

impl FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "virtual" => Ok(Self::Virtual),
            "aliases" => Ok(Self::Aliases),
            _ => Err(format!(
                "unknown table format `{s}` (expected `virtual` or `aliases`)"
            )),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Virtual => "virtual",
            Self::Aliases => "aliases",
        })
    }
}

/// One alias: mail for `alias` is forwarded to every address in `dests`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Lowercased `user@domain`, or `@domain` for a virtual(5) catch-all.
    pub alias: String,
    /// In file order, without duplicates, never empty.
    pub dests: Vec<String>,
    /// 1-based line where the entry starts.
    pub line: usize,
}

/// A line that produced no entry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct BadLine {
    /// 1-based physical line of the problem: the offending destination's own line when
    /// it sits on a continuation line, otherwise the line where the entry starts.
    pub line: usize,
    /// One human sentence, without the line number.
    pub reason: String,
}

/// What [`parse`] found. A struct rather than a tuple because a virtual(5) file holds a
/// third kind of line, domain declarations, that is neither an alias nor an error.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    /// In file order.
    pub entries: Vec<Entry>,
    /// Lowercased domains declared by a bare `domain anything` line of a virtual(5) file,
    /// with their line. Postfix uses these lines to accept mail for a virtual alias domain
    /// (`virtual_alias_domains = $virtual_alias_maps`) and ignores their right-hand side.
    /// Always empty for aliases(5).
    pub domains: Vec<(String, usize)>,
    /// Sorted by line (then reason); a line may appear more than once, with different
    /// reasons.
    pub bad: Vec<BadLine>,
}

const PIPE: &str = "pipe targets (|command) are not supported by a forwarding relay";
const INCLUDE: &str =
    ":include: lists are not supported by a forwarding relay; list their addresses instead";
const FILE: &str = "file targets (/path) are not supported by a forwarding relay";
const MAILBOX: &str = "\\name delivers to a local mailbox, which a forwarding relay does not have";
const EMPTY: &str = "empty destination address";
const NO_DOMAIN: &str = "a name without @domain needs a domain: pass --domain";
const QUOTE: &str = "unterminated quoted string";
const NO_DESTS: &str = "no destination addresses";

/// Parses an alias table; see the module docs for the formats. `domain` qualifies names
/// that have no `@domain` (all of them in aliases(5)).
pub fn parse(text: &str, format: Format, domain: Option<&str>) -> Parsed {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let domain = domain.map(|d| d.trim().to_lowercase());
    let mut out = Parsed::default();
    // Key (alias or domain) -> line of its first occurrence. Bad lines count too, so that
    // fixing the first of two conflicting lines does not silently import the second.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (start, logical) in logical_lines(text, &mut out.bad) {
        let mut l = Logical {
            text: &logical,
            start,
            domain: domain.as_deref(),
            bad: Vec::new(),
            asked_domain: false,
        };
        let item = match format {
            Format::Virtual => l.virtual_entry(),
            Format::Aliases => l.alias_entry(),
        };
        if let Some(item) = item {
            let key = match &item {
                Item::Alias(alias, _) => alias,
                Item::Domain(domain) => domain,
            };
            match seen.get(key) {
                Some(&first) => l.bad.push(BadLine {
                    line: start,
                    reason: format!("duplicate of line {first}"),
                }),
                None => _ = seen.insert(key.clone(), start),
            }
            if l.bad.is_empty() {
                match item {
                    Item::Alias(alias, dests) => out.entries.push(Entry {
                        alias,
                        dests,
                        line: start,
                    }),
                    Item::Domain(domain) => out.domains.push((domain, start)),
                }
            }
        }
        out.bad.append(&mut l.bad);
    }
    // By line, then reason; two pipes on one line are one problem for the reader.
    out.bad.sort();
    out.bad.dedup();
    out
}

/// Writes `entries` as a virtual(5) table, one `alias dest, dest` line per alias, sorted
/// by alias. `parse(&export_virtual(x), Format::Virtual, None)` gives `x` back for
/// normalised entries (as [`parse`] returns them); an alias without destinations cannot
/// be expressed in virtual(5), so it is written as a comment rather than lost silently.
pub fn export_virtual(entries: &[(String, Vec<String>)]) -> String {
    let mut sorted: Vec<_> = entries.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = String::from(
        "# tenso aliases in Postfix virtual(5) format: alias destination, destination, ...\n\
         # Re-import with: tenso import FILE --format virtual\n",
    );
    for (alias, dests) in sorted {
        // Writing to a String cannot fail.
        _ = if dests.is_empty() {
            writeln!(out, "# {alias} has no destinations")
        } else {
            writeln!(out, "{alias} {}", dests.join(", "))
        };
    }
    out
}

/// What one logical line declares, before duplicate checking.
enum Item {
    Alias(String, Vec<String>),
    Domain(String),
}

/// Joins continuation lines into `(first line number, logical line)`, as postmap(1)
/// does. A logical line keeps one `\n` per physical line it spans (skipped comments
/// included), so a byte offset maps back to its physical line; see [`Logical::fail`].
fn logical_lines(text: &str, bad: &mut Vec<BadLine>) -> Vec<(usize, String)> {
    let mut out: Vec<(usize, String)> = Vec::new();
    let mut last = 0; // physical line last appended to `out`
    for (n, raw) in (1..).zip(text.lines()) {
        let trimmed = raw.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if trimmed.len() == raw.len() {
            out.push((n, raw.to_owned()));
        } else if let Some((_, logical)) = out.last_mut() {
            logical.extend(std::iter::repeat_n('\n', n - last));
            logical.push_str(raw);
        } else {
            let reason = "indented continuation line with no entry before it".to_owned();
            bad.push(BadLine { line: n, reason });
            continue;
        }
        last = n;
    }
    out
}

/// One logical line being parsed, collecting its problems.
struct Logical<'a> {
    text: &'a str,
    start: usize,
    domain: Option<&'a str>,
    bad: Vec<BadLine>,
    asked_domain: bool,
}

impl<'a> Logical<'a> {
    /// Records a problem at byte offset `at` of the logical line.
    fn fail(&mut self, at: usize, reason: &str) {
        let line = self.start + self.text[..at].matches('\n').count();
        self.bad.push(BadLine {
            line,
            reason: reason.to_owned(),
        });
    }

    /// `name@domain` for a name (unquoted) that has no domain of its own. Without a
    /// domain the line fails once, however many of its names need one, and `name` is
    /// returned as is so that duplicates are still detected.
    fn qualify(&mut self, name: &str, at: usize) -> String {
        match self.domain {
            Some(domain) => format!("{}@{domain}", quote_local(name)),
            None => {
                if !std::mem::replace(&mut self.asked_domain, true) {
                    self.fail(at, NO_DOMAIN);
                }
                name.to_owned()
            }
        }
    }

    /// Splits `s`, found at byte `at` of the logical line, like [`split`], with offsets
    /// into the whole logical line.
    fn split(
        &mut self,
        at: usize,
        s: &'a str,
        sep: impl Fn(char) -> bool + Copy,
    ) -> Vec<(usize, &'a str)> {
        match split(s, sep) {
            Ok(pieces) => pieces
                .into_iter()
                .map(|(off, piece)| (at + off, piece))
                .collect(),
            Err(quote) => {
                self.fail(at + quote, QUOTE);
                Vec::new()
            }
        }
    }

    fn virtual_entry(&mut self) -> Option<Item> {
        let text = self.text;
        // Quotes are honoured so that quoted local parts written by export_virtual survive.
        let end = match find_unquoted(text, char::is_whitespace) {
            Ok(found) => found.map_or(text.len(), |(i, _)| i),
            Err(quote) => {
                self.fail(quote, QUOTE);
                return None;
            }
        };
        let pattern = text[..end].to_lowercase();
        if pattern.ends_with(':') {
            self.fail(
                0,
                "the pattern ends with ':', which looks like aliases(5): use --format aliases",
            );
            return None;
        }
        let alias = if pattern.contains('@') {
            pattern
        } else if pattern.contains('.') {
            // Ambiguous in Postfix too: a dotted bare pattern could be a local user
            // `first.last`, but bare users only ever match Postfix's local domains, which a
            // relay import has no use for, while `domain anything` lines are common.
            if text[end..].trim().is_empty() {
                // postmap(1) rejects a key without a value, so Postfix never saw this one.
                self.fail(0, "no result after the domain name");
            }
            return Some(Item::Domain(pattern));
        } else {
            let user = unquote(&pattern).unwrap_or(pattern);
            self.qualify(&user, 0)
        };
        Some(Item::Alias(alias, self.dests(end)))
    }

    fn alias_entry(&mut self) -> Option<Item> {
        let text = self.text;
        let colon = match find_unquoted(text, |c| c == ':') {
            Ok(Some((i, _))) => i,
            Ok(None) => {
                self.fail(0, "expected `name: destination, ...`");
                return None;
            }
            Err(quote) => {
                self.fail(quote, QUOTE);
                return None;
            }
        };
        let raw = text[..colon].trim();
        if raw.is_empty() {
            self.fail(0, "no alias name before ':'");
            return None;
        }
        if raw.contains('@') && !raw.starts_with('"') {
            // Postfix would take it as a local part `joe@example.com`, which never matches
            // real mail: almost certainly a virtual(5) line in the wrong file.
            self.fail(0, "aliases(5) names are local parts: quote a name containing @, or import full addresses with --format virtual");
            return None;
        }
        let name = unquote(raw)
            .unwrap_or_else(|| raw.to_owned())
            .to_lowercase();
        let alias = self.qualify(&name, 0);
        Some(Item::Alias(alias, self.dests(colon + 1)))
    }

    /// Parses the destination list starting at byte `at`; bad values are recorded, and
    /// so is a list that is empty for no other reason.
    fn dests(&mut self, at: usize) -> Vec<String> {
        let mut dests = Vec::new();
        let problems = self.bad.len();
        let text = self.text;
        for (off, elem) in self.split(at, &text[at..], |c| c == ',') {
            let tokens = match elem.strip_suffix('>').and_then(|e| e.split_once('<')) {
                // RFC 822 `Phrase <address>`: only the address matters (a single `<` and
                // `>`, so that `<a@x> <b@y>` still reads as two addresses).
                Some((phrase, addr)) if !phrase.contains('>') && !addr.contains('<') => {
                    vec![(off + phrase.len() + 1, addr)]
                }
                // Commands and included paths may contain spaces: report each once.
                _ if elem.starts_with('|') || is_include(elem) => vec![(off, elem)],
                _ => self.split(off, elem, char::is_whitespace),
            };
            for (off, token) in tokens {
                if let Some(dest) = self.dest(token, off)
                    && !dests.contains(&dest)
                {
                    dests.push(dest);
                }
            }
        }
        if dests.is_empty() && self.bad.len() == problems {
            self.fail(0, NO_DESTS);
        }
        dests
    }

    /// One destination value at byte `at`, normalised, or `None` after recording why not.
    fn dest(&mut self, token: &str, at: usize) -> Option<String> {
        let token = token
            .strip_prefix('<')
            .and_then(|t| t.strip_suffix('>'))
            .unwrap_or(token);
        let value = unquote(token).unwrap_or_else(|| token.to_owned());
        let value = value.trim();
        let reason = if value.is_empty() {
            EMPTY
        } else if value.starts_with('|') {
            PIPE
        } else if is_include(value) {
            INCLUDE
        } else if value.starts_with('/') {
            FILE
        } else if value.starts_with('\\') {
            MAILBOX
        } else {
            return Some(match value.rsplit_once('@') {
                Some((local, domain)) => format!("{local}@{}", domain.to_lowercase()),
                // In aliases(5) a bare name is a local user. A forwarding relay has no
                // local users, so it can only mean another alias in the same domain
                // (Postfix's virtual(5) similarly appends $myorigin).
                None => self.qualify(value, at),
            });
        };
        self.fail(at, reason);
        None
    }
}

/// Byte offset and char of the first char matching `pred` outside double quotes (inside
/// which `\` escapes the next char); `Err` holds the offset of an unterminated quote.
fn find_unquoted(s: &str, pred: impl Fn(char) -> bool) -> Result<Option<(usize, char)>, usize> {
    let mut open = None;
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match (open, c) {
            (Some(_), '\\') => _ = chars.next(),
            (Some(_), '"') => open = None,
            (Some(_), _) => {}
            (None, '"') => open = Some(i),
            (None, c) if pred(c) => return Ok(Some((i, c))),
            (None, _) => {}
        }
    }
    open.map_or(Ok(None), Err)
}

/// Splits `s` at unquoted chars matching `sep` into trimmed, non-empty pieces with their
/// byte offsets in `s`; `Err` holds the offset of an unterminated quote.
fn split(s: &str, sep: impl Fn(char) -> bool + Copy) -> Result<Vec<(usize, &str)>, usize> {
    let mut pieces = Vec::new();
    let mut from = 0;
    loop {
        let rest = &s[from..];
        let found = find_unquoted(rest, sep).map_err(|quote| from + quote)?;
        let piece = &rest[..found.map_or(rest.len(), |(i, _)| i)];
        let trimmed = piece.trim_start();
        if !trimmed.trim_end().is_empty() {
            pieces.push((from + piece.len() - trimmed.len(), trimmed.trim_end()));
        }
        match found {
            Some((i, c)) => from += i + c.len_utf8(),
            None => return Ok(pieces),
        }
    }
}

/// Sendmail and Postfix match `:include:` case-insensitively.
fn is_include(s: &str) -> bool {
    s.get(..9)
        .is_some_and(|p| p.eq_ignore_ascii_case(":include:"))
}

/// The content of a fully quoted string `"..."`, with `\` escapes resolved.
fn unquote(s: &str) -> Option<String> {
    let mut chars = s.strip_prefix('"')?.chars();
    let mut out = String::new();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '"' => return chars.as_str().is_empty().then_some(out),
            c => out.push(c),
        }
    }
    None
}

/// `name` as the local part of an address: as is when it is a dot-atom (RFC 5322, with
/// RFC 6531 UTF-8), otherwise quoted, so `"sales team": x` becomes `"sales team"@domain`.
fn quote_local(name: &str) -> String {
    let atext =
        |c: char| c.is_ascii_alphanumeric() || !c.is_ascii() || "!#$%&'*+-/=?^_`{|}~".contains(c);
    if name
        .split('.')
        .all(|atom| !atom.is_empty() && atom.chars().all(atext))
    {
        return name.to_owned();
    }
    let mut quoted = String::from('"');
    for c in name.chars() {
        if matches!(c, '"' | '\\') {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(line: usize, reason: &str) -> BadLine {
        BadLine {
            line,
            reason: reason.to_owned(),
        }
    }

    /// `(line, alias, dests)` of each entry, for compact expectations.
    type Entries<'a> = Vec<(usize, &'a str, Vec<&'a str>)>;

    fn entries(parsed: &Parsed) -> Entries<'_> {
        let e = &parsed.entries;
        e.iter()
            .map(|e| {
                (
                    e.line,
                    e.alias.as_str(),
                    e.dests.iter().map(String::as_str).collect(),
                )
            })
            .collect()
    }

    const VIRTUAL: &str = "\
# Postfix virtual(5) table migrated from mx1

example.com             anything
postmaster@example.com  admin@corp.example
Info@Example.COM        Joe.Smith@Mail.EXAMPLE, jane@mail.example
sales@example.com       a@x.example
    b@x.example,
# a comment inside a continued entry
    c@x.example   d@x.example
@catchall.example       <bucket@corp.example>
list@example.com        a@x.example, a@x.example,, \"quoted user\"@x.example
  # indented comment
other.example           OK
ops@example.com         Ops Team <ops@corp.example>
bob                     bob@corp.example
pipe@example.com        |/usr/bin/procmail -a x
file@example.com        ok@x.example, /var/mail/file
dup@example.com         one@x.example
DUP@example.com         two@x.example
nohost@example.com      localuser
empty@example.com
broken@example.com      \"unterminated@x.example
multi@example.com       good@x.example,
    |/bin/a, |/bin/b
tab@example.com
\tt@x.example
postmaster:             root
inc@example.com         :include:/etc/list
";

    #[test]
    fn virtual_file() {
        // Lines whose meaning depends on --domain; every other line is the same either way.
        let without = [bad(15, NO_DOMAIN), bad(20, NO_DOMAIN)];
        let with = [
            (15, "bob@example.net", vec!["bob@corp.example"]),
            (20, "nohost@example.com", vec!["localuser@example.net"]),
        ];
        for domain in [None, Some("Example.NET")] {
            let parsed = parse(VIRTUAL, Format::Virtual, domain);
            let mut want_entries = vec![
                (4, "postmaster@example.com", vec!["admin@corp.example"]),
                (
                    5,
                    "info@example.com",
                    vec!["Joe.Smith@mail.example", "jane@mail.example"],
                ),
                (
                    6,
                    "sales@example.com",
                    vec!["a@x.example", "b@x.example", "c@x.example", "d@x.example"],
                ),
                (10, "@catchall.example", vec!["bucket@corp.example"]),
                (
                    11,
                    "list@example.com",
                    vec!["a@x.example", "\"quoted user\"@x.example"],
                ),
                (14, "ops@example.com", vec!["ops@corp.example"]),
                (18, "dup@example.com", vec!["one@x.example"]),
                (25, "tab@example.com", vec!["t@x.example"]),
            ];
            let mut want_bad = vec![
                bad(16, PIPE),
                bad(17, FILE),
                bad(19, "duplicate of line 18"),
                bad(21, NO_DESTS),
                bad(22, QUOTE),
                bad(24, PIPE),
                bad(
                    27,
                    "the pattern ends with ':', which looks like aliases(5): use --format aliases",
                ),
                bad(28, INCLUDE),
            ];
            match domain {
                None => want_bad.extend(without.clone()),
                Some(_) => want_entries.extend(with.clone()),
            }
            want_entries.sort();
            want_bad.sort();
            assert_eq!(entries(&parsed), want_entries, "domain {domain:?}");
            assert_eq!(parsed.bad, want_bad, "domain {domain:?}");
            assert_eq!(
                parsed.domains,
                [
                    ("example.com".to_owned(), 3),
                    ("other.example".to_owned(), 13)
                ]
            );
        }
    }

    const ALIASES: &str = "\
# /etc/aliases
# Basic system aliases -- these MUST be present.
MAILER-DAEMON:  postmaster
postmaster:     root

# General redirections
root:           admin@corp.example, \\root
staff:          alice@corp.example,
                bob@corp.example,
# carol left
                dave
\"sales team\":   sales@corp.example
webmaster:      <web@Corp.Example>
news:           \"|/usr/lib/news/recvnews\"
majordomo:      |/usr/lib/majordomo/wrapper majordomo
lists:          :include:/etc/mail/lists
archive:        /var/spool/archive
nobody:
nobody2:        \"\"
Staff:          eve@corp.example
Abuse:          Abuse Desk <abuse@corp.example>
joe@example.org: joe@corp.example
\"Quoted@Name\":  q@corp.example
devnull:        /dev/null
ops:            a@corp.example,
    \"|/bin/notify ops\",
    b@corp.example
bare line without colon
owner-staff:alice@corp.example
";

    #[test]
    fn aliases_file() {
        let parsed = parse(ALIASES, Format::Aliases, Some("example.org"));
        let want: Entries = vec![
            (
                3,
                "mailer-daemon@example.org",
                vec!["postmaster@example.org"],
            ),
            (4, "postmaster@example.org", vec!["root@example.org"]),
            (
                8,
                "staff@example.org",
                vec!["alice@corp.example", "bob@corp.example", "dave@example.org"],
            ),
            (12, "\"sales team\"@example.org", vec!["sales@corp.example"]),
            (13, "webmaster@example.org", vec!["web@corp.example"]),
            (21, "abuse@example.org", vec!["abuse@corp.example"]),
            (23, "\"quoted@name\"@example.org", vec!["q@corp.example"]),
            (29, "owner-staff@example.org", vec!["alice@corp.example"]),
        ];
        assert_eq!(entries(&parsed), want);
        let want_bad = vec![
            bad(7, MAILBOX),
            bad(14, PIPE),
            bad(15, PIPE),
            bad(16, INCLUDE),
            bad(17, FILE),
            bad(18, NO_DESTS),
            bad(19, EMPTY),
            bad(20, "duplicate of line 8"),
            bad(
                22,
                "aliases(5) names are local parts: quote a name containing @, or import full addresses with --format virtual",
            ),
            bad(24, FILE),
            bad(26, PIPE),
            bad(28, "expected `name: destination, ...`"),
        ];
        assert_eq!(parsed.bad, want_bad);
        assert!(parsed.domains.is_empty());
    }

    #[test]
    fn aliases_without_domain_fail_once_per_entry() {
        let parsed = parse(ALIASES, Format::Aliases, None);
        assert!(parsed.entries.is_empty());
        let lines: Vec<usize> = parsed
            .bad
            .iter()
            .filter(|b| b.reason == NO_DOMAIN)
            .map(|b| b.line)
            .collect();
        assert_eq!(
            lines,
            [
                3, 4, 7, 8, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 23, 24, 25, 29
            ]
        );
    }

    #[test]
    fn small_cases() {
        let cases: &[(&str, Format, Entries, Vec<BadLine>)] = &[
            (
                "  orphan@x.example\na@x.example b@y.example",
                Format::Virtual,
                vec![(2, "a@x.example", vec!["b@y.example"])],
                vec![bad(1, "indented continuation line with no entry before it")],
            ),
            (
                "\u{feff}a@x.example b@y.example\r\nc@x.example\r\n  d@y.example\r\n",
                Format::Virtual,
                vec![
                    (1, "a@x.example", vec!["b@y.example"]),
                    (2, "c@x.example", vec!["d@y.example"]),
                ],
                vec![],
            ),
            (
                "a:b@y.example,\"c, d\"@y.example",
                Format::Aliases,
                vec![(1, "a@d.example", vec!["b@y.example", "\"c, d\"@y.example"])],
                vec![],
            ),
            ("a: <>", Format::Aliases, vec![], vec![bad(1, EMPTY)]),
            (
                "a@x.example ,,\n  ,",
                Format::Virtual,
                vec![],
                vec![bad(1, NO_DESTS)],
            ),
            (
                "x.example",
                Format::Virtual,
                vec![],
                vec![bad(1, "no result after the domain name")],
            ),
            (
                "a: \"|x\n  y\"",
                Format::Aliases,
                vec![],
                vec![bad(1, PIPE)],
            ),
            ("\"a: b", Format::Aliases, vec![], vec![bad(1, QUOTE)]),
            (
                ": b",
                Format::Aliases,
                vec![],
                vec![bad(1, "no alias name before ':'")],
            ),
            (
                "a: :INCLUDE:/x",
                Format::Aliases,
                vec![],
                vec![bad(1, INCLUDE)],
            ),
            (
                "a: :include: /x y, |p, /f, |q",
                Format::Aliases,
                vec![],
                vec![bad(1, INCLUDE), bad(1, FILE), bad(1, PIPE)],
            ),
            (
                "a@x.example <b@y.example> <c@y.example>",
                Format::Virtual,
                vec![(1, "a@x.example", vec!["b@y.example", "c@y.example"])],
                vec![],
            ),
        ];
        for (text, format, want, want_bad) in cases {
            let parsed = parse(text, *format, Some("d.example"));
            assert_eq!(&entries(&parsed), want, "{text:?}");
            assert_eq!(&parsed.bad, want_bad, "{text:?}");
        }
    }

    #[test]
    fn format_from_str() {
        assert_eq!("virtual".parse(), Ok(Format::Virtual));
        assert_eq!("aliases".parse(), Ok(Format::Aliases));
        assert!("postfix".parse::<Format>().is_err());
        assert_eq!(Format::Aliases.to_string(), "aliases");
    }

    #[test]
    fn export_round_trips() {
        let mut from_files: Vec<(String, Vec<String>)> = [
            parse(VIRTUAL, Format::Virtual, Some("example.net")),
            parse(ALIASES, Format::Aliases, Some("example.org")),
        ]
        .into_iter()
        .flat_map(|p| p.entries)
        .map(|e| (e.alias, e.dests))
        .collect();
        from_files.sort();
        let text = export_virtual(&from_files);
        assert!(text.starts_with("# tenso"));
        let back = parse(&text, Format::Virtual, None);
        assert!(back.bad.is_empty(), "{:?}", back.bad);
        let back: Vec<_> = back
            .entries
            .into_iter()
            .map(|e| (e.alias, e.dests))
            .collect();
        assert_eq!(back, from_files);

        let odd = [
            (
                "\"a \\\" b\"@x.example".to_owned(),
                vec!["\"c d\"@y.example".to_owned()],
            ),
            ("b@x.example".to_owned(), vec![]),
        ];
        let text = export_virtual(&odd);
        let back = parse(&text, Format::Virtual, None);
        assert_eq!(
            entries(&back),
            [(3, odd[0].0.as_str(), vec![odd[0].1[0].as_str()])]
        );
        assert!(text.contains("# b@x.example has no destinations"));
    }

    #[test]
    fn never_panics() {
        const PARTS: &[&str] = &[
            "\"",
            "\\",
            ":",
            ",",
            "<",
            ">",
            "\n",
            "\r\n",
            "\t",
            " ",
            "#",
            "@",
            "|",
            "/",
            ":include:",
            "é",
            "日本",
            "\u{feff}",
            "\u{a0}",
            "\u{200b}",
            "a",
            "x.example",
            "\u{1f600}",
            "\0",
        ];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            // xorshift64: deterministic, no dependency
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..3000 {
            let text = if round % 2 == 0 {
                let bytes: Vec<u8> = (0..next() % 200).map(|_| next() as u8).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            } else {
                (0..next() % 60)
                    .map(|_| PARTS[(next() % PARTS.len() as u64) as usize])
                    .collect()
            };
            let lines = text.lines().count();
            for format in [Format::Virtual, Format::Aliases] {
                for domain in [None, Some("d.example")] {
                    let parsed = parse(&text, format, domain);
                    let in_range = |l: usize| (1..=lines).contains(&l);
                    assert!(parsed.bad.iter().all(|b| in_range(b.line)), "{text:?}");
                    assert!(
                        parsed
                            .entries
                            .iter()
                            .all(|e| in_range(e.line) && !e.dests.is_empty()),
                        "{text:?}"
                    );
                    let pairs: Vec<_> = parsed
                        .entries
                        .into_iter()
                        .map(|e| (e.alias, e.dests))
                        .collect();
                    parse(&export_virtual(&pairs), Format::Virtual, domain);
                }
            }
        }
    }
}
