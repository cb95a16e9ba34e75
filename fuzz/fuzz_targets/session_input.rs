//! A session's input (commands, DATA answered 354 or refused, mail data): framed exactly
//! as the reference frames it, so no octet of mail data is ever taken as a command.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tenso_fuzz::{checks, split};

fuzz_target!(|data: &[u8]| {
    let Some(s) = split(data) else { return };
    // Bit k of the control byte: whether the k-th DATA is answered 354.
    let accept: Vec<bool> = (0..8).map(|k| s.control & (1 << k) != 0).collect();
    if let Err(e) = checks::check_session(s.stream, &s.cuts, &accept) {
        panic!("{e}");
    }
});
