//! The DSN parser and the null-sender classifier (`tenso::bounce::dsn`) on any bytes.
//! Invariants: a parsed DSN names at least one recipient, and the classifier calls the
//! same message a report (a delivery report, or a read receipt when an MDN part comes
//! first); the returned Message-ID has no angle brackets, CR or LF.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tenso::bounce::dsn::{NullSenderKind, classify_null_sender, parse_dsn, returned_message_id};

fuzz_target!(|data: &[u8]| {
    let kind = classify_null_sender(data);
    if let Some(dsn) = parse_dsn(data) {
        assert!(!dsn.recipients.is_empty(), "{dsn:?}");
        assert!(
            matches!(
                kind,
                NullSenderKind::DeliveryReport | NullSenderKind::ReadReceipt
            ),
            "a parsed DSN classified as {kind:?}"
        );
    }
    if let Some(id) = returned_message_id(data) {
        assert!(!id.contains(['<', '>', '\r', '\n']), "{id:?}");
    }
});
