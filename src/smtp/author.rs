//! The author of a submitted message: the one address of its one `From:` field
//! (RFC 5322 §3.6.2), read strictly enough that a reader cannot be shown another.
//!
//! Submission lets a user send only as their alias, so what a mail reader will
//! display as the sender must be that alias and nothing else. Refused: no From,
//! several From fields, several addresses, a group, and a display name that itself
//! looks like an address (`"alice@alias.example" <evil@x>`, or the reverse).
//! mail-parser reads the field; an independent lexical count of `@` outside quoted
//! strings and comments must agree, so a parser differential cannot smuggle a second
//! address past it. Pure: no I/O.

use super::address::Mailbox;
use super::header::fields_raw;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorError {
    #[error("no From field")]
    NoFrom,
    #[error("several From fields")]
    SeveralFields,
    #[error("the From field is unreadable")]
    Unreadable,
    #[error("the From field names several addresses")]
    SeveralAddresses,
    #[error("the From field is a group")]
    Group,
    #[error("the display name of From looks like an address")]
    AddressInName,
    #[error("the From address is not a valid mailbox")]
    BadAddress,
}

/// The one author mailbox of a header section.
pub fn sole_author(headers: &[u8]) -> Result<Mailbox, AuthorError> {
    let from: Vec<_> = fields_raw(headers)
        .into_iter()
        .filter(|f| f.2.eq_ignore_ascii_case("from"))
        .collect();
    let (start, end) = match from.as_slice() {
        [] => return Err(AuthorError::NoFrom),
        [one] => (one.0, one.1),
        _ => return Err(AuthorError::SeveralFields),
    };
    let raw = &headers[start..end];
    let value = raw
        .iter()
        .position(|&b| b == b':')
        .map_or(&raw[..0], |p| &raw[p + 1..]);
    if at_signs(value) != 1 {
        return Err(AuthorError::SeveralAddresses);
    }
    let parsed = mail_parser::MessageParser::new()
        .parse_headers(raw)
        .ok_or(AuthorError::Unreadable)?;
    let addrs = match parsed.from() {
        Some(mail_parser::Address::List(l)) => l,
        Some(mail_parser::Address::Group(_)) => return Err(AuthorError::Group),
        None => return Err(AuthorError::Unreadable),
    };
    let [one] = addrs.as_slice() else {
        return Err(AuthorError::SeveralAddresses);
    };
    if one.name.as_deref().is_some_and(looks_like_address) {
        return Err(AuthorError::AddressInName);
    }
    let addr = one.address.as_deref().ok_or(AuthorError::Unreadable)?;
    let mailbox = Mailbox::parse(addr).map_err(|_| AuthorError::BadAddress)?;
    // mail-parser reads leniently (`<a\@b.test>` becomes a@b.test): a reader may show
    // the field as written, so the author must be written as it was read. (A comment
    // or display name holding the address was refused above: mail-parser takes a
    // comment for the display name.)
    let written = String::from_utf8_lossy(value).to_lowercase();
    if !written.contains(&mailbox.to_string().to_lowercase()) {
        return Err(AuthorError::Unreadable);
    }
    Ok(mailbox)
}

/// `@` signs outside quoted strings and comments (nested, with quoted-pairs), and
/// inside encoded words too (`=40` or `@` in `=?…?=` counts as an `@`).
fn at_signs(value: &[u8]) -> usize {
    let (mut n, mut depth, mut quoted, mut escaped) = (0, 0usize, false, false);
    for (i, &b) in value.iter().enumerate() {
        if escaped {
            escaped = false;
            continue;
        }
        match b {
            b'\\' if quoted || depth > 0 => escaped = true,
            b'"' if depth == 0 => quoted = !quoted,
            b'(' if !quoted => depth += 1,
            b')' if !quoted && depth > 0 => depth -= 1,
            b'@' if !quoted && depth == 0 => n += 1,
            b'=' if !quoted && depth == 0 && value[i..].starts_with(b"=?") => {
                // An encoded word in a phrase may decode to an address.
                let end = value[i + 2..]
                    .windows(2)
                    .position(|w| w == b"?=")
                    .map_or(value.len(), |p| i + 2 + p);
                let word = value[i..end].to_ascii_lowercase();
                if word.contains(&b'@') || word.windows(3).any(|w| w == b"=40") {
                    n += 1;
                }
            }
            _ => {}
        }
    }
    n
}

/// A display name holding `x@y`: what a reader might take for the sender.
fn looks_like_address(name: &str) -> bool {
    name.char_indices().any(|(i, c)| {
        c == '@'
            && name[..i]
                .chars()
                .next_back()
                .is_some_and(|p| !p.is_whitespace())
            && name[i + 1..]
                .chars()
                .next()
                .is_some_and(|n| !n.is_whitespace())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn author(field: &str) -> Result<String, AuthorError> {
        let h = format!("To: bob@dest.test\r\n{field}\r\nSubject: x\r\n");
        sole_author(h.as_bytes()).map(|m| m.to_string())
    }

    #[test]
    fn one_author_or_refused() {
        use AuthorError::*;
        let ok = Ok("alice@alias.example".to_string());
        let cases: &[(&str, Result<String, AuthorError>)] = &[
            ("From: alice@alias.example", ok.clone()),
            ("From: Alice <alice@alias.example>", ok.clone()),
            ("from: \"Alice A.\" <alice@alias.example>", ok.clone()),
            ("From: Alice\r\n <alice@alias.example>", ok.clone()),
            ("From: alice@alias.example (Alice at home)", ok.clone()),
            // Read as A@0 by mail-parser, written otherwise (found by the property).
            ("From: <A\\@0>", Err(Unreadable)),
            ("From: <alice\\@alias.example>", Err(Unreadable)),
            (
                "From: (alice@alias.example) <alice\\@alias.example>",
                Err(AddressInName),
            ),
            (
                "From: <alice\\@alias.example> (alice@alias.example)",
                Err(AddressInName),
            ),
            (
                "From: =?utf-8?q?Al=C3=AFce?= <alice@alias.example>",
                ok.clone(),
            ),
            (
                "From: \"alice@alias.example\" <evil@x.test>",
                Err(AddressInName),
            ),
            (
                "From: \"evil@x.test\" <alice@alias.example>",
                Err(AddressInName),
            ),
            (
                "From: =?utf-8?q?evil=40x.test?= <alice@alias.example>",
                Err(SeveralAddresses),
            ),
            (
                "From: alice@alias.example, evil@x.test",
                Err(SeveralAddresses),
            ),
            (
                "From: <alice@alias.example> <evil@x.test>",
                Err(SeveralAddresses),
            ),
            ("From: friends: alice@alias.example;", Err(Group)),
            ("From: Alice", Err(SeveralAddresses)),
            ("From: ", Err(SeveralAddresses)),
            ("X-Other: a@b.test", Err(NoFrom)),
            (
                "From: alice@alias.example\r\nFrom: alice@alias.example",
                Err(SeveralFields),
            ),
        ];
        for (field, want) in cases {
            assert_eq!(&author(field), want, "{field}");
        }
    }

    /// The pieces a From field is built from in the property below.
    fn name() -> impl Strategy<Value = Option<String>> {
        prop_oneof![
            Just(None),
            Just(Some("Alice".to_string())),
            Just(Some("\"Alice, A.\"".to_string())),
            Just(Some("\"alice@alias.example\"".to_string())),
            Just(Some("\"evil@x.test\"".to_string())),
            Just(Some("=?utf-8?q?evil=40x.test?=".to_string())),
            Just(Some("(c@d.test) Bob".to_string())),
            "[A-Za-z]{1,8}".prop_map(Some),
        ]
    }

    fn addr() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("alice@alias.example".to_string()),
            Just("evil@x.test".to_string()),
            "[a-z]{1,6}@[a-z]{1,6}\\.test",
        ]
    }

    proptest! {
        /// Against a model: accepted iff exactly one field with exactly one mailbox
        /// and a display name that holds no `@`; and then the address is the one
        /// written.
        #[test]
        fn matches_the_model(
            fields in prop::collection::vec(
                prop::collection::vec((name(), addr()), 0..3), 0..3),
        ) {
            let mut h = String::from("To: bob@dest.test\r\n");
            for mailboxes in &fields {
                let list: Vec<String> = mailboxes
                    .iter()
                    .map(|(n, a)| match n {
                        Some(n) => format!("{n} <{a}>"),
                        None => a.clone(),
                    })
                    .collect();
                h.push_str(&format!("From: {}\r\n", list.join(", ")));
            }
            let got = sole_author(h.as_bytes());
            let want = match fields.as_slice() {
                [one] => match one.as_slice() {
                    [(n, a)] if !n.as_deref().is_some_and(|n| n.contains('@') || n.contains("=40")) => Some(a.clone()),
                    _ => None,
                },
                _ => None,
            };
            match (got, want) {
                (Ok(m), Some(a)) => prop_assert_eq!(m.to_string(), a),
                (Err(_), None) => {}
                (got, want) => prop_assert!(false, "{h:?}: got {got:?}, want {want:?}"),
            }
        }

        /// Whatever the bytes, an accepted author is a mailbox that occurs in the
        /// header section as written.
        #[test]
        fn accepted_author_is_written_there(v in "[ -~]{0,60}") {
            let h = format!("From: {v}\r\n");
            if let Ok(m) = sole_author(h.as_bytes()) {
                prop_assert!(h.to_lowercase().contains(&m.to_string().to_lowercase()), "{h:?} {m}");
            }
        }
    }
}
