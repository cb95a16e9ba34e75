//! A command line as the session parses it (`tenso::inbound::parse_command`: UTF-8,
//! smtp-proto), then MAIL/RCPT's path as `inbound/mail.rs` reads it (`extract_path`,
//! `parse_path`). Invariants: every error reply is one well-formed SMTP reply line (no
//! text of the client's can add a line of its own); a mailbox that parses is written
//! back (`Display`) as a path that extracts and parses to the same mailbox.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smtp_proto::Request;
use tenso::smtp::address::{Path, extract_path, parse_path};

fn check_reply(r: &tenso::smtp::Reply) {
    let mut wire = Vec::new();
    r.write_to(&mut wire);
    let text = String::from_utf8_lossy(&wire);
    assert!(wire.ends_with(b"\r\n"), "{text:?}");
    let lines: Vec<&[u8]> = wire[..wire.len() - 2].split(|&b| b == b'\n').collect();
    assert_eq!(lines.len(), r.lines.len().max(1), "{text:?}");
    for l in lines {
        let l = l.strip_suffix(b"\r").unwrap_or(l);
        assert!(!l.contains(&b'\r'), "bare CR in reply {text:?}");
        assert!(l.starts_with(r.code.to_string().as_bytes()), "{text:?}");
    }
    assert!((400..600).contains(&r.code), "error reply {text:?}");
}

fn check_path(line: &str, smtputf8: bool) {
    let Some(raw) = extract_path(line) else {
        return;
    };
    let Ok(Path::Mailbox(m)) = parse_path(raw, smtputf8) else {
        return;
    };
    let written = m.to_string();
    assert!(!written.contains(['\r', '\n']), "{written:?}");
    let again = format!("RCPT TO:<{written}> NOTIFY=NEVER");
    assert_eq!(extract_path(&again), Some(written.as_str()), "{line:?}");
    assert_eq!(
        parse_path(&written, true),
        Ok(Path::Mailbox(m.clone())),
        "{line:?} wrote {written:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    match tenso::inbound::parse_command(data) {
        Err(reply) => check_reply(&reply),
        Ok((text, Request::Mail { from })) => {
            check_path(&text, from.flags & smtp_proto::MAIL_SMTPUTF8 != 0)
        }
        Ok((text, Request::Rcpt { .. })) => check_path(&text, true),
        Ok(_) => {}
    }
});
