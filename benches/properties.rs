//! The codec properties of `tests/codec_properties.rs` in bench mode (issue 10):
//! `cargo bench --bench properties` runs each with ten million random cases (set
//! `PROPERTY_CASES` for another count). Under `cargo test --all-targets` (no `--bench`
//! argument) it runs a thousand, so CI only checks that it builds and agrees.
//!
//! Prints the case count and time of each property; a failing property prints its
//! minimal failing input and exits non-zero.

#[path = "../tests/codec_support/mod.rs"]
mod codec_support;

use std::time::Instant;

type Property = fn(u32) -> Result<(), String>;

const PROPERTIES: &[(&str, Property)] = &[
    (
        "data decoder ends only at CRLF.CRLF",
        codec_support::data_decoder,
    ),
    (
        "command framer splits only at CRLF",
        codec_support::command_framer,
    ),
    (
        "session input never frames mail data as commands",
        codec_support::session_input,
    ),
];

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let cases: u32 = match std::env::var("PROPERTY_CASES") {
        Ok(v) => v.parse().expect("PROPERTY_CASES: a number of cases"),
        Err(_) if bench => 10_000_000,
        Err(_) => 1_000,
    };
    let all = Instant::now();
    for (name, property) in PROPERTIES {
        let t = Instant::now();
        if let Err(e) = property(cases) {
            eprintln!("{name}: FAILED\n{e}");
            std::process::exit(1);
        }
        println!("{name}: {cases} cases passed in {:.1?}", t.elapsed());
    }
    println!(
        "{} properties x {cases} cases in {:.1?}",
        PROPERTIES.len(),
        all.elapsed()
    );
}
