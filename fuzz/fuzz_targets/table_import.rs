//! virtual(5) and aliases(5) import (`tenso::table::import::parse`) on any text, and the
//! export round trip. Invariants: every entry has destinations, no two entries share an
//! alias, aliases are lowercase, line numbers are within the text; and for the entries a
//! table can hold (alias and destinations valid mailboxes: the table validates what
//! `parse` returns), `parse(export_virtual(entries))` gives the same aliases and
//! destinations back with no bad line (the promise `tenso export` relies on).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::HashSet;
use tenso::smtp::address::Mailbox;
use tenso::table::import::{Format, export_virtual, parse};

/// A mailbox, or a catch-all `@domain`, as the table would store it.
fn storable(addr: &str) -> bool {
    match addr.strip_prefix('@') {
        Some(domain) => Mailbox::parse(&format!("x@{domain}")).is_ok(),
        None => Mailbox::parse(addr).is_ok(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let format = if ctl & 1 == 0 {
        Format::Virtual
    } else {
        Format::Aliases
    };
    let domain = (ctl & 2 != 0).then_some("Alias.Test");
    let parsed = parse(text, format, domain);
    let lines = text.split('\n').count();
    let mut seen = HashSet::new();
    for e in &parsed.entries {
        assert!(!e.dests.is_empty(), "{e:?}");
        assert!(seen.insert(e.alias.clone()), "duplicate alias {e:?}");
        assert_eq!(e.alias, e.alias.to_lowercase(), "{e:?}");
        assert!(e.line >= 1 && e.line <= lines, "{e:?} in {lines} lines");
    }
    for b in &parsed.bad {
        assert!(b.line >= 1 && b.line <= lines, "{b:?} in {lines} lines");
    }
    let pairs: Vec<(String, Vec<String>)> = parsed
        .entries
        .iter()
        .filter(|e| storable(&e.alias) && e.dests.iter().all(|d| storable(d)))
        .map(|e| (e.alias.clone(), e.dests.clone()))
        .collect();
    let exported = export_virtual(&pairs);
    let back = parse(&exported, Format::Virtual, None);
    assert!(
        back.bad.is_empty(),
        "export does not import: {:?}\n{exported}",
        back.bad
    );
    let mut got: Vec<(String, Vec<String>)> = back
        .entries
        .into_iter()
        .map(|e| (e.alias, e.dests))
        .collect();
    let mut want = pairs;
    got.sort();
    want.sort();
    assert_eq!(got, want, "round trip through:\n{exported}");
});
