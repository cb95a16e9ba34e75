//! The DATA decoder: ends exactly where the reference finds `CRLF . CRLF` (never when it
//! finds none), decodes as the reference does, and stays within its size limit, however
//! the stream is split into reads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tenso_fuzz::{checks, split};

fuzz_target!(|data: &[u8]| {
    let Some(s) = split(data) else { return };
    // High bit clear: a limit the body is likely to hit; set: no practical limit.
    let max_size = if s.control & 0x80 == 0 {
        usize::from(s.control) * 4
    } else {
        1 << 20
    };
    if let Err(e) = checks::check_data(s.stream, &s.cuts, max_size) {
        panic!("{e}");
    }
});
