//! SMTP smuggling end to end (issue 10): random bodies sent after a 354 to the real
//! daemon over real TCP, full of near-terminators (bare CR/LF around dots) each followed
//! by command lines (MAIL, RCPT, DATA, RSET, QUIT). Whatever the body, the client gets
//! exactly one reply for it (554 5.6.0 when the reference sees a bare CR/LF or an
//! over-long line, else 250), the next command is answered next, and the sink receives
//! exactly the accepted messages, each decoded as the reference decodes it, for the
//! one recipient the client named. A bounded number of cases: seconds, not minutes.

mod codec_support;
mod common;

use codec_support::reference;
use common::daemon::Tenso;
use common::dns::TestDns;
use common::sink::TestSink;
use common::smtp_client::RawSmtp;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use std::time::Duration;

const CASES: usize = 64;
const CASES_PER_SESSION: usize = 16;

/// A body: octets, near-terminators and command lines the old decoder ran.
fn hostile_body() -> impl Strategy<Value = Vec<u8>> {
    const COMMANDS: &[&[u8]] = &[
        b"MAIL FROM:<evil@evil.test>\r\n",
        b"RCPT TO:<bob@alias.test>\r\n",
        b"DATA\r\n",
        b"RSET\r\n",
        b"QUIT\r\n",
        b"Subject: smuggled\r\n\r\nsecond message\r\n",
    ];
    let part = prop_oneof![
        6 => codec_support::element(),
        2 => prop::sample::select(COMMANDS).prop_map(<[u8]>::to_vec),
    ];
    prop::collection::vec(part, 0..40).prop_map(|v| v.concat())
}

/// A body without bare CR or LF: lines of octets, dots and command words.
fn clean_body() -> impl Strategy<Value = Vec<u8>> {
    const WORDS: &[&[u8]] = &[
        b"a",
        b".",
        b"..",
        b" ",
        b"\0",
        b"MAIL FROM:<evil@evil.test>",
        b"RCPT TO:<bob@alias.test>",
        b"DATA",
        b"QUIT",
    ];
    let line = prop::collection::vec(prop::sample::select(WORDS), 0..6)
        .prop_map(|w| [w.concat(), b"\r\n".to_vec()].concat());
    prop::collection::vec(line, 0..12).prop_map(|v| v.concat())
}

/// `body` with every real end of data in it defused (an `x` before its dot), then the
/// real end: so the reference ends DATA exactly at the end of what is sent.
fn wire(body: Vec<u8>) -> Vec<u8> {
    let mut w = body;
    w.extend_from_slice(b"\r\n.\r\n");
    while let Some(end) = reference::data_end(&w).filter(|&e| e < w.len()) {
        w.insert(end - 3, b'x');
    }
    w
}

/// Draws the cases: (what is sent after the 354, how it is split into writes).
fn cases() -> Vec<(Vec<u8>, codec_support::Chunking)> {
    let strategy = (
        prop_oneof![hostile_body(), clean_body()].prop_map(wire),
        codec_support::chunking(),
    );
    let mut runner = TestRunner::default();
    (0..CASES)
        .map(|_| strategy.new_tree(&mut runner).expect("a case").current())
        .collect()
}

fn config(dns: &TestDns, sink: &TestSink) -> String {
    format!(
        "[dns]\n{}\n\n[auth]\nspf = false\ndkim = false\n\n\
         [smtp]\nlisten = [\"127.0.0.1:0\"]\n\n\
         [delivery]\nroutes = {{ \"*\" = \"127.0.0.1:{}\" }}\n\n\
         [queue]\nretry = [\"1s\"]\n\n\
         [limits]\nmax_errors = 1000\nunknown_penalty_base = \"0s\"\n",
        dns.resolver_config_toml(),
        sink.port()
    )
}

/// Sends one case in its transaction; returns the queue id when the data was accepted.
async fn send_case(
    c: &mut RawSmtp,
    wire: &[u8],
    reads: &codec_support::Chunking,
) -> Option<String> {
    c.expect("MAIL FROM:<s@origin.test>", 250).await;
    c.expect("RCPT TO:<alice@alias.test>", 250).await;
    c.expect("DATA", 354).await;
    for read in codec_support::reads(wire, reads) {
        c.send(read).await;
    }
    c.send(b"HELP\r\n").await;
    let data_reply = c.read_reply().await;
    let next = c.read_reply().await;
    let shown = String::from_utf8_lossy(wire);
    assert_eq!(
        next.0, 214,
        "more than one reply to the data {shown:?}: {data_reply:?}, then {next:?}"
    );
    let d = reference::decode(&wire[..wire.len() - 3]);
    if d.bare_cr || d.bare_lf || d.line_too_long {
        assert_eq!(data_reply.0, 554, "{shown:?}: {data_reply:?}");
        assert!(data_reply.1.starts_with("5.6.0"), "{data_reply:?}");
        return None;
    }
    assert_eq!(data_reply.0, 250, "{shown:?}: {data_reply:?}");
    let id = data_reply
        .1
        .rsplit(' ')
        .next()
        .expect("queue id")
        .to_string();
    Some(id)
}

#[tokio::test]
async fn no_command_inside_data_ever_runs() {
    let dns = TestDns::builder().start().await;
    let sink = TestSink::start().await;
    let mut t = Tenso::prepare(&config(&dns, &sink));
    t.cli_ok(&["user", "add", "alice@alias.test", "alice@dest.test"])
        .await;
    t.cli_ok(&["user", "add", "bob@alias.test", "bob@dest.test"])
        .await;
    t.launch().await;

    let cases = cases();
    let mut accepted = Vec::new();
    for session in cases.chunks(CASES_PER_SESSION) {
        let mut c = RawSmtp::connect(t.smtp_addr()).await;
        c.expect("EHLO client.test", 250).await;
        for (wire, reads) in session {
            if let Some(id) = send_case(&mut c, wire, reads).await {
                let message = reference::decode(&wire[..wire.len() - 3]).message;
                accepted.push((id, message));
            }
        }
        c.quit().await;
    }

    // The queue drained: every accepted message arrived, and nothing else did.
    sink.wait_for(accepted.len(), Duration::from_secs(30)).await;
    t.wait_queue_empty(Duration::from_secs(30)).await;
    let delivered = sink.all_transactions();
    assert_eq!(
        delivered.len(),
        accepted.len(),
        "{} messages accepted, the sink got {}",
        accepted.len(),
        delivered.len()
    );
    for (id, message) in &accepted {
        let tag = format!(" id {id}");
        let d = delivered
            .iter()
            .find(|d| d.text().lines().take(3).any(|l| l.contains(&tag)))
            .unwrap_or_else(|| panic!("message {id} not delivered"));
        assert_eq!(d.rcpts, ["alice@dest.test"], "{id}");
        // What tenso added is Delivered-To and its Received field; the rest is the
        // message as the reference decodes it.
        let added = d
            .data
            .strip_suffix(&message[..])
            .unwrap_or_else(|| panic!("{id}: delivered body differs: {:?}", d.text()));
        let added = String::from_utf8_lossy(added);
        let received = added
            .strip_prefix("Delivered-To: alice@alias.test\r\n")
            .unwrap_or_else(|| panic!("{id}: {added:?}"));
        assert!(
            received.starts_with("Received: ")
                && received.ends_with("\r\n")
                && received
                    .trim_end()
                    .split("\r\n")
                    .skip(1)
                    .all(|l| l.starts_with('\t')),
            "{id}: more than Delivered-To and Received was added: {added:?}"
        );
    }
    eprintln!(
        "{CASES} bodies sent, {} accepted and delivered, {} refused",
        accepted.len(),
        CASES - accepted.len()
    );
}
