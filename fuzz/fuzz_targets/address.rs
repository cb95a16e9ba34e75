//! The address and path parser (`tenso::smtp::address`). Invariants: a parsed mailbox
//! respects the RFC 5321 length limits; what tenso writes for it (`Display`) has no
//! CR/LF, extracts whole from a command line, and parses back to the same mailbox;
//! `extract_path` returns what follows a `<` of its input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tenso::smtp::address::{Mailbox, Path, extract_path, parse_path};

fn check_mailbox(m: &Mailbox, input: &str) {
    assert!(
        !m.local.is_empty() && m.local.len() <= 64,
        "local part {:?}",
        m.local
    );
    assert!(m.domain.len() <= 255, "domain {:?}", m.domain);
    let written = m.to_string();
    assert!(!written.contains(['\r', '\n']), "{written:?}");
    let line = format!("MAIL FROM:<{written}> SIZE=10");
    assert_eq!(
        extract_path(&line),
        Some(written.as_str()),
        "{input:?} wrote {written:?}"
    );
    assert_eq!(
        Mailbox::parse(&written).as_ref(),
        Ok(m),
        "{input:?} wrote {written:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(m) = Mailbox::parse(s) {
        check_mailbox(&m, s);
    }
    for utf8 in [false, true] {
        if let Ok(Path::Mailbox(m)) = parse_path(s, utf8) {
            assert!(utf8 || m.is_ascii(), "{s:?}");
            check_mailbox(&m, s);
        }
    }
    if let Some(inner) = extract_path(s) {
        let start = inner.as_ptr() as usize - s.as_ptr() as usize;
        assert!(start >= 1 && &s[start - 1..start] == "<", "{s:?}");
    }
});
