//! The config loader (`Config::from_toml` then `validate`, what `tenso config check` and
//! the daemon run) on any text. Invariants: no panic; a parse error names a line within
//! the text; parsing is deterministic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tenso::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_toml(text) {
        Ok(cfg) => {
            let verdict = cfg.validate().map_err(|e| e.to_string());
            let again = Config::from_toml(text).expect("parsed once, parses again");
            assert_eq!(again.validate().map_err(|e| e.to_string()), verdict);
        }
        Err(msg) => {
            if let Some(n) = msg
                .strip_prefix("line ")
                .and_then(|r| r.split(':').next())
                .and_then(|n| n.parse::<usize>().ok())
            {
                assert!(
                    n >= 1 && n <= text.lines().count().max(1) + 1,
                    "line {n} of a {}-line text: {msg}",
                    text.lines().count()
                );
            }
        }
    }
});
