//! tenso's own DSNs (`build_dsn`) from arbitrary report data, then read back by its own
//! parser and classifier. Invariants (the builder's documented promises): CRLF line
//! endings only, no line over 998 octets, 7-bit ASCII unless `dsn_requires_smtputf8`;
//! and the report parses back with every recipient and its action, and is classified
//! as a delivery report.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use tenso::bounce::dsn::{
    Action, DsnRecipient, DsnReport, NullSenderKind, build_dsn, classify_null_sender,
    dsn_requires_smtputf8, parse_dsn,
};

#[derive(Debug, Arbitrary)]
struct Rcpt {
    final_recipient: String,
    original_recipient: Option<String>,
    action: u8,
    status: String,
    remote_mta: Option<String>,
    diagnostic: Option<String>,
    last_attempt: i64,
    will_retry_until: Option<i64>,
}

#[derive(Debug, Arbitrary)]
struct Report {
    reporting_mta: String,
    queue_id: String,
    original_envelope_id: Option<String>,
    arrival: i64,
    now: i64,
    to: String,
    original_sender: String,
    recipients: Vec<Rcpt>,
    original_headers: Vec<u8>,
    message_id: String,
}

const ACTIONS: [Action; 5] = [
    Action::Failed,
    Action::Delayed,
    Action::Delivered,
    Action::Relayed,
    Action::Expanded,
];

fuzz_target!(|r: Report| {
    let recipients: Vec<DsnRecipient> = r
        .recipients
        .into_iter()
        .take(8)
        .map(|x| DsnRecipient {
            final_recipient: x.final_recipient,
            original_recipient: x.original_recipient,
            action: ACTIONS[usize::from(x.action) % ACTIONS.len()],
            status: x.status,
            remote_mta: x.remote_mta,
            diagnostic: x.diagnostic,
            last_attempt: x.last_attempt,
            will_retry_until: x.will_retry_until,
        })
        .collect();
    let report = DsnReport {
        reporting_mta: &r.reporting_mta,
        queue_id: &r.queue_id,
        original_envelope_id: r.original_envelope_id.as_deref(),
        arrival: r.arrival,
        now: r.now,
        to: &r.to,
        original_sender: &r.original_sender,
        recipients,
        original_headers: &r.original_headers,
        message_id: r.message_id,
    };
    let out = build_dsn(&report);
    let text = String::from_utf8_lossy(&out);
    for line in out.split_inclusive(|&b| b == b'\n') {
        let line = line
            .strip_suffix(b"\r\n")
            .unwrap_or_else(|| panic!("line without CRLF {line:?}: {text}"));
        assert!(
            !line.contains(&b'\r') && !line.contains(&b'\n'),
            "bare CR/LF: {text}"
        );
        assert!(line.len() <= 998, "line of {} octets: {text}", line.len());
    }
    assert!(
        out.is_ascii() || dsn_requires_smtputf8(&report),
        "8-bit in an ASCII report: {text}"
    );
    assert_eq!(
        classify_null_sender(&out),
        NullSenderKind::DeliveryReport,
        "{text}"
    );
    if report.recipients.is_empty() {
        return;
    }
    let parsed = parse_dsn(&out).unwrap_or_else(|| panic!("own DSN unreadable: {text}"));
    assert_eq!(parsed.recipients.len(), report.recipients.len(), "{text}");
    for (p, want) in parsed.recipients.iter().zip(&report.recipients) {
        assert_eq!(p.action, want.action.as_str(), "{text}");
    }
});
