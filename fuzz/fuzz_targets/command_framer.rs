//! The command framer: one verdict per CRLF-terminated line, a command only from a line
//! without bare CR/LF within the length limit, bounded buffering.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tenso_fuzz::{checks, split};

fuzz_target!(|data: &[u8]| {
    let Some(s) = split(data) else { return };
    if let Err(e) = checks::check_framer(s.stream, &s.cuts) {
        panic!("{e}");
    }
});
