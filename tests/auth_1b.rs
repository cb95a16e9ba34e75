//! Proposal 1b in `[smtp] unknown_recipient = "accept"` mode (issue 5): the full matrix
//! {pass, fail, softfail, neutral, none} × {known, unknown recipient} × {normal, null
//! sender}. Exactly the cases "unknown recipient AND normal sender AND SPF not
//! fail/softfail" produce a DSN, it goes to the original sender (MAIL FROM:<>, RCPT =
//! that sender, Status 5.1.1 for the unknown recipient), and the known recipient of the
//! same message is delivered normally in every case.
//!
//! Each case is one SMTP transaction from 127.0.0.1 with `EHLO <spf domain>`, so both
//! identities give the intended result (a null sender is checked as postmaster@HELO).
//! "No bounce" is not a timeout: the DSN is made by the queue from the committed message,
//! which leaves the queue only after its DSN is committed, so once the queue is empty
//! every DSN tenso made has reached the senders' sink, and the sink's list is complete.

mod auth_support;
mod common;

use auth_support::*;
use common::daemon::Tenso;
use common::sink::{Delivered, TestSink};
use mail_parser::{MessageParser, MimeHeaders};

struct Case {
    n: usize,
    spf: &'static str,
    domain: &'static str,
    unknown: bool,
    null: bool,
}

impl Case {
    fn sender(&self) -> String {
        if self.null {
            String::new()
        } else {
            format!("s{:02}@{}", self.n, self.domain)
        }
    }
    fn ghost(&self) -> String {
        format!("ghost{:02}@alias.test", self.n)
    }
    fn subject(&self) -> String {
        format!("1b case {:02}", self.n)
    }
    fn bounce_expected(&self) -> bool {
        self.unknown && !self.null && !matches!(self.spf, "fail" | "softfail")
    }
}

/// The delivery-status part of a DSN: (Final-Recipient values, Status values, Action values).
fn dsn_fields(d: &Delivered) -> (Vec<String>, Vec<String>, Vec<String>) {
    let msg = MessageParser::default()
        .parse(&d.data)
        .unwrap_or_else(|| panic!("DSN does not parse:\n{}", d.text()));
    let ct = msg.content_type().expect("DSN has a Content-Type");
    assert_eq!(
        (ct.ctype(), ct.subtype(), ct.attribute("report-type")),
        ("multipart", Some("report"), Some("delivery-status")),
        "RFC 3464 report:\n{}",
        d.text()
    );
    let part = msg
        .parts
        .iter()
        .find(|p| {
            p.content_type()
                .is_some_and(|c| c.ctype() == "message" && c.subtype() == Some("delivery-status"))
        })
        .unwrap_or_else(|| panic!("no message/delivery-status part:\n{}", d.text()));
    let status = String::from_utf8_lossy(part.contents()).into_owned();
    let field = |name: &str| -> Vec<String> {
        status
            .lines()
            .filter_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
            .collect()
    };
    (field("Final-Recipient"), field("Status"), field("Action"))
}

#[tokio::test]
async fn proposal_1b_matrix() {
    let dns = spf_zone().start().await;
    let dest = TestSink::start().await;
    let senders = TestSink::start().await;
    let t = Tenso::start(&config(
        &dns,
        &routes(&dest, &senders),
        "unknown_recipient = \"accept\"",
        "",
        NO_UNKNOWN_PENALTY,
    ))
    .await;
    cli_ok(&t, &["user", "add", "alice@alias.test", "alice@dest.test"]).await;

    let spfs = [
        ("pass", "pass.test"),
        ("fail", "fail.test"),
        ("softfail", "softfail.test"),
        ("neutral", "neutral.test"),
        ("none", "none.test"),
    ];
    let mut cases = Vec::new();
    for (spf, domain) in spfs {
        for unknown in [false, true] {
            for null in [false, true] {
                cases.push(Case {
                    n: cases.len(),
                    spf,
                    domain,
                    unknown,
                    null,
                });
            }
        }
    }

    for c in &cases {
        let sender = c.sender();
        let ghost = c.ghost();
        // Unknown-recipient cases also carry the known alias: its copy must go out.
        let rcpts: Vec<&str> = if c.unknown {
            vec![&ghost, "alice@alias.test"]
        } else {
            vec!["alice@alias.test"]
        };
        // Null-sender mail that is not a bounce (an auto-reply) is forwarded as such.
        let from_hdr = if c.null {
            format!("responder@{}", c.domain)
        } else {
            sender.clone()
        };
        let mut msg = format!(
            "From: {from_hdr}\r\nTo: alice@alias.test\r\nSubject: {}\r\n\
             Message-ID: <case{:02}@{}>\r\n",
            c.subject(),
            c.n,
            c.domain
        );
        if c.null {
            msg.push_str("Auto-Submitted: auto-replied\r\n");
        }
        msg.push_str("\r\nbody\r\n");
        let text = submit_ok(&t, "127.0.0.1", c.domain, &sender, &rcpts, msg.as_bytes()).await;
        assert!(text.starts_with("2.0.0"), "{text}");
    }

    // Every case forwards exactly one copy (the known recipient); then the queue drains.
    let forwarded = dest.wait_for(cases.len(), WAIT).await;
    wait_queue_empty(&t).await;
    let forwarded_now = dest.messages();
    assert_eq!(
        forwarded_now.len(),
        cases.len(),
        "one forwarded copy per case:\n{}",
        dest.describe()
    );
    let bounces = senders.messages();
    assert_eq!(
        senders.transactions() as usize,
        bounces.len(),
        "the senders' sink refused nothing"
    );

    let mut table = String::from(
        "| # | SPF | recipient | sender | bounce expected | bounce sent | known copy delivered |\n\
         |---|---|---|---|---|---|---|\n",
    );
    let mut failures = Vec::new();
    for c in &cases {
        // The known recipient's copy, with the SPF result this case was built for.
        let copy = forwarded
            .iter()
            .find(|d| header_values(&d.data, "Subject").first() == Some(&c.subject()));
        let copy_ok = match copy {
            Some(d) => {
                let ar = our_ar(&d.data, "tenso.test");
                let want_mf = if c.null { "<>".to_string() } else { c.sender() };
                assert_eq!(
                    ar_result(&ar, "spf", "smtp.mailfrom"),
                    Some((c.spf.to_string(), want_mf)),
                    "case {}: SPF result is not the one the case is about:\n{}",
                    c.n,
                    d.text()
                );
                assert_eq!(d.rcpts, vec!["alice@dest.test".to_string()], "case {}", c.n);
                let want_from = if c.null { "" } else { "alice@alias.test" };
                assert_eq!(d.mail_from, want_from, "case {}: reverse-path", c.n);
                true
            }
            None => false,
        };
        // DSNs that concern this case (they return its headers, hence its Subject).
        let mine: Vec<&Delivered> = bounces
            .iter()
            .filter(|b| b.text().contains(&format!("Subject: {}", c.subject())))
            .collect();
        for b in &mine {
            assert_eq!(b.mail_from, "", "case {}: a DSN has MAIL FROM:<>", c.n);
            assert_eq!(
                b.rcpts,
                vec![c.sender()],
                "case {}: DSN goes to the original sender",
                c.n
            );
            let (finals, statuses, actions) = dsn_fields(b);
            assert_eq!(
                finals,
                vec![format!("rfc822; {}", c.ghost())],
                "case {}:\n{}",
                c.n,
                b.text()
            );
            assert_eq!(statuses, vec!["5.1.1".to_string()], "case {}", c.n);
            assert_eq!(actions, vec!["failed".to_string()], "case {}", c.n);
            assert!(
                !b.text().contains("alice@dest.test"),
                "case {}: the DSN does not mention the known recipient's destination",
                c.n
            );
        }
        let sent = mine.len();
        table.push_str(&format!(
            "| {:02} | {} | {} | {} | {} | {} | {} |\n",
            c.n,
            c.spf,
            if c.unknown {
                "unknown (+ known)"
            } else {
                "known"
            },
            if c.null { "null <>" } else { "normal" },
            if c.bounce_expected() { "yes" } else { "no" },
            match sent {
                0 => "no".to_string(),
                1 => "yes".to_string(),
                n => format!("{n} (!)"),
            },
            if copy_ok { "yes" } else { "NO" },
        ));
        if sent != usize::from(c.bounce_expected()) || !copy_ok {
            failures.push(c.n);
        }
    }
    println!("proposal 1b matrix (unknown_recipient = \"accept\"):\n{table}");
    assert!(
        failures.is_empty(),
        "cases {failures:?} differ:\n{table}\nlog:\n{}",
        t.log()
    );
    let expected_bounces = cases.iter().filter(|c| c.bounce_expected()).count();
    assert_eq!(expected_bounces, 3);
    assert_eq!(
        bounces.len(),
        expected_bounces,
        "no stray DSN:\n{}",
        senders.describe()
    );

    // The counters tell the same story.
    let inbound = &counters(&t).await["inbound"];
    let unknown = cases.iter().filter(|c| c.unknown).count() as u64;
    assert_eq!(inbound["unknown_accepted"], unknown, "{inbound}");
    assert_eq!(
        inbound["unknown_bounced"], expected_bounces as u64,
        "{inbound}"
    );
    assert_eq!(
        inbound["bounce_suppressed_1b"],
        unknown - expected_bounces as u64,
        "{inbound}"
    );
}
