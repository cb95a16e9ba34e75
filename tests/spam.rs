//! The spam gate (issue 13) against a real rspamd (Debian's 3.4, a private instance
//! from `tests/rspamd/`, shared by every case of this binary): GTUBE (`reject`) and the
//! `add header` test pattern under each alias policy (tag, quarantine, reject, off,
//! default), a clean message, forged `X-Spam-*` headers, mixed recipients, pool
//! release, rspamd learning, each alias `--state`, alias chains, and rspamd silent
//! (deadline), oversize, and stopped under both `on_error` settings.
//!
//! rspamd 3.4 gives GTUBE `reject` only inside a MIME text part (and no GTUBE at all in
//! a bare body); it does it for any client address (no local-only rule in 3.4). The
//! other test patterns (`YJS…` → add header) need `enable_test_patterns`, set in
//! `tests/rspamd/local.d/options.inc`.

mod abuse_support;
mod common;

use abuse_support::*;
use common::daemon::Tenso;
use common::dns::TestDns;
use common::rspamd::Rspamd;
use common::sink::{Delivered, TestSink};
use common::smtp_client::RawSmtp;
use serde_json::Value;
use std::time::Duration;

const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";
/// rspamd's "add header" test pattern.
const ADD_HEADER: &str = "YJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";
const CLEAN: &str = "Hello, lunch tomorrow at noon? The usual place.";

/// A MIME text message carrying `token` in Subject and Message-ID, `text` as its body.
fn message(token: &str, text: &str, extra_headers: &str) -> String {
    format!(
        "{extra_headers}From: Sender <{FROM}>\r\nTo: someone@alias.test\r\nSubject: {token}\r\n\
         Message-ID: <{token}@origin.test>\r\nDate: Tue, 01 Dec 2026 12:00:00 +0000\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n{text}\r\n"
    )
}

/// Sends one message from 127.0.0.1; the final reply (or the refusal).
async fn send(t: &Tenso, rcpts: &[&str], msg: &str) -> (u16, String) {
    let mut c = RawSmtp::connect(t.smtp_addr()).await;
    c.set_timeout(Duration::from_secs(30));
    let r = match c.send_message(FROM, rcpts, msg.as_bytes()).await {
        Ok(r) => r,
        Err(e) => (e.code, e.text),
    };
    c.quit().await;
    r
}

async fn send_ok(t: &Tenso, rcpts: &[&str], msg: &str) {
    let r = send(t, rcpts, msg).await;
    assert_eq!(r.0, 250, "{rcpts:?}: {r:?}\nlog:\n{}", t.log());
}

/// Waits for `n` forwarded copies carrying `token`; returns them.
async fn copies(t: &Tenso, sink: &TestSink, token: &str, n: usize) -> Vec<Delivered> {
    let found = common::wait_until(WAIT, || async {
        let m: Vec<Delivered> = sink
            .messages()
            .into_iter()
            .filter(|m| m.text().contains(token))
            .collect();
        (m.len() >= n).then_some(m)
    })
    .await;
    found.unwrap_or_else(|| {
        panic!(
            "{n} copies of {token} not forwarded:\n{}\nlog:\n{}",
            sink.describe(),
            t.log()
        )
    })
}

/// No copy carrying `token` reached the sink (checked after the queue drained).
async fn none_forwarded(t: &Tenso, sink: &TestSink, token: &str) {
    t.wait_queue_empty(WAIT).await;
    let n = sink
        .messages()
        .iter()
        .filter(|m| m.text().contains(token))
        .count();
    assert_eq!(n, 0, "{token} was forwarded:\n{}", sink.describe());
}

fn count_fields(m: &Delivered, name: &str) -> usize {
    let text = m.text();
    let head = text.split("\r\n\r\n").next().unwrap_or("").to_string();
    head.split("\r\n")
        .filter(|l| {
            l.split_once(':')
                .is_some_and(|(n, _)| n.eq_ignore_ascii_case(name))
        })
        .count()
}

async fn pool(t: &Tenso, alias: &str) -> Vec<Value> {
    let v = t.cli_json(&["pool", "list", alias, "--json"]).await;
    v.as_array().cloned().unwrap_or_default()
}

async fn pooled_text(t: &Tenso, id: &str) -> String {
    let v = t.cli_json(&["pool", "show", id, "--json"]).await;
    v["message"].as_str().unwrap_or("").to_string()
}

async fn spam_counter(t: &Tenso, name: &str) -> u64 {
    counter(t, "inbound", name).await
}

fn spam_conf(sink: &TestSink, spam: &str) -> Conf {
    Conf {
        route: Some(sink.addr()),
        queue: "retry = [\"1s\"]".into(),
        more: format!("[spam]\n{spam}\n"),
        ..Conf::default()
    }
}

/// The main daemon: one alias per policy and per state.
async fn main_daemon(dns: &TestDns, sink: &TestSink, rspamd: &Rspamd, pw_file: &str) -> Tenso {
    let conf = spam_conf(
        sink,
        &format!(
            "rspamd_url = \"{}\"\ndefault = \"quarantine\"\nsubject_tag = \"[SPAM]\"\n\
             controller_url = \"{}\"\ncontroller_password_file = \"{pw_file}\"\n",
            rspamd.url(),
            rspamd.controller_url()
        ),
    );
    let mut t = Tenso::prepare(&conf.render(dns));
    for (alias, dests, set) in [
        ("tag", vec!["tag@dest.test"], vec!["--spam", "tag"]),
        ("quar", vec!["quar@dest.test"], vec!["--spam", "quarantine"]),
        ("rej", vec!["rej@dest.test"], vec!["--spam", "reject"]),
        ("off", vec!["off@dest.test"], vec!["--spam", "off"]),
        ("dflt", vec!["dflt@dest.test"], vec![]),
        ("ok", vec!["ok@dest.test"], vec![]),
        ("disc", vec!["disc@dest.test"], vec!["--state", "discard"]),
        ("defer", vec!["defer@dest.test"], vec!["--state", "defer"]),
        ("gone", vec!["gone@dest.test"], vec!["--state", "reject"]),
        (
            "list",
            vec!["ok@alias.test", "disc@alias.test"],
            vec!["--spam", "tag"],
        ),
    ] {
        let a = format!("{alias}@alias.test");
        let mut args = vec!["user", "add", &a];
        args.extend(dests.iter());
        t.cli_ok(&args).await;
        if !set.is_empty() {
            let mut args = vec!["user", "set", &a];
            args.extend(set.iter());
            t.cli_ok(&args).await;
        }
    }
    t.launch().await;
    t
}

/// Holds every connection it accepts without answering: an rspamd that hangs.
async fn silent_listener() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            if held.len() < 100 {
                held.push(s);
            }
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spam_gate_against_real_rspamd() {
    let dns = TestDns::builder().start().await;
    let sink = TestSink::start().await;
    let mut rspamd = Rspamd::start().await;
    let pw = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(pw.path(), format!("{}\n", rspamd.password)).unwrap();
    let pw_path = pw.path().display().to_string();
    let main = main_daemon(&dns, &sink, &rspamd, &pw_path).await;
    let (silent, silent_task) = silent_listener().await;
    let hanging = relay(
        &spam_conf(
            &sink,
            &format!("rspamd_url = \"http://{silent}\"\ntimeout = \"1s\"\nmax_size = 3000\n"),
        ),
        &dns,
    )
    .await;
    let strict = relay(
        &spam_conf(
            &sink,
            &format!(
                "rspamd_url = \"{}\"\non_error = \"tempfail\"\n",
                rspamd.url()
            ),
        ),
        &dns,
    )
    .await;

    tokio::join!(
        policies(&main, &sink),
        mixed_and_release(&main, &sink, &pw_path),
        states(&main, &sink),
        rspamd_hangs(&hanging, &sink),
        async {
            // Scanned while rspamd is up.
            send_ok(
                &strict,
                &["alice@alias.test"],
                &message("strict-up", CLEAN, ""),
            )
            .await;
            copies(&strict, &sink, "strict-up", 1).await;
        },
    );
    assert_eq!(spam_counter(&strict, "spam_clean").await, 1);

    // rspamd stops: "accept" lets mail through unscanned, "tempfail" answers 451.
    rspamd.stop();
    send_ok(
        &main,
        &["tag@alias.test"],
        &message("down-accept", CLEAN, ""),
    )
    .await;
    let m = &copies(&main, &sink, "down-accept", 1).await[0];
    assert_eq!(count_fields(m, "X-Spam-Status"), 0, "unscanned: no verdict");
    assert_eq!(spam_counter(&main, "spam_unscanned").await, 1);
    expect_log(&main, &["rspamd could not judge", "on_error = accept"]).await;
    let (code, text) = send(
        &strict,
        &["alice@alias.test"],
        &message("down-tempfail", CLEAN, ""),
    )
    .await;
    assert_eq!((code, esc(&text)), (451, "4.7.1"), "{text}");
    none_forwarded(&strict, &sink, "down-tempfail").await;
    assert_eq!(spam_counter(&strict, "spam_tempfailed").await, 1);
    assert_eq!(spam_counter(&strict, "spam_errors").await, 1);

    main_counters(&main).await;
    silent_task.abort();
}

/// Each policy under rspamd's `reject` (GTUBE) and `add header`; a clean message;
/// forged spam headers.
async fn policies(t: &Tenso, sink: &TestSink) {
    // Clean: forwarded with the verdict (ours and rspamd's X-Spamd-Result), and
    // nothing else rspamd proposed (its Authentication-Results is not ours to add).
    send_ok(t, &["tag@alias.test"], &message("clean-1", CLEAN, "")).await;
    let m = &copies(t, sink, "clean-1", 1).await[0];
    let status = m.header("X-Spam-Status").expect("X-Spam-Status");
    assert!(status.starts_with("No, score="), "{status}");
    assert!(m.header("X-Spamd-Result").is_some(), "{}", m.text());
    assert_eq!(count_fields(m, "X-Spam"), 0);
    assert_eq!(count_fields(m, "Authentication-Results"), 1, "{}", m.text());
    assert_eq!(m.header("Subject").as_deref(), Some("clean-1"));
    expect_log(t, &["accepted", "spam=no action"]).await;

    // Forged verdicts from outside are removed before rspamd sees the message.
    let forged = "X-Spam: No\r\nX-Spam-Status: No, score=-100.00 FORGEDMARK\r\nX-Spamd-Result: default: False [-100.00] FORGEDMARK\r\n";
    send_ok(
        t,
        &["tag@alias.test"],
        &message("forged-clean", CLEAN, forged),
    )
    .await;
    let m = &copies(t, sink, "forged-clean", 1).await[0];
    assert!(!m.text().contains("FORGEDMARK"), "{}", m.text());
    assert_eq!(count_fields(m, "X-Spam-Status"), 1);
    send_ok(
        t,
        &["tag@alias.test"],
        &message("forged-spam", ADD_HEADER, forged),
    )
    .await;
    let m = &copies(t, sink, "forged-spam", 1).await[0];
    assert!(!m.text().contains("FORGEDMARK"), "{}", m.text());
    assert!(m.header("X-Spam-Status").unwrap().starts_with("Yes,"));
    assert_eq!(m.header("X-Spam").as_deref(), Some("Yes"));
    assert_eq!(m.header("Subject").as_deref(), Some("[SPAM] forged-spam"));

    // add header: quarantine (here through [spam] default), reject, off.
    send_ok(
        t,
        &["dflt@alias.test"],
        &message("ah-default", ADD_HEADER, ""),
    )
    .await;
    let (code, text) = send(
        t,
        &["rej@alias.test"],
        &message("ah-reject", ADD_HEADER, ""),
    )
    .await;
    assert_eq!((code, esc(&text)), (550, "5.7.1"), "{text}");
    send_ok(t, &["off@alias.test"], &message("ah-off", ADD_HEADER, "")).await;
    let m = &copies(t, sink, "ah-off", 1).await[0];
    assert_eq!(
        count_fields(m, "X-Spam-Status") + count_fields(m, "X-Spam"),
        0
    );
    assert_eq!(m.header("Subject").as_deref(), Some("ah-off"));
    none_forwarded(t, sink, "ah-default").await;
    none_forwarded(t, sink, "ah-reject").await;
    let p = pool(t, "dflt@alias.test").await;
    assert_eq!(p.len(), 1, "{p:?}");
    let text = pooled_text(t, p[0]["id"].as_str().unwrap()).await;
    assert!(
        text.starts_with(&format!(
            "Return-Path: <{FROM}>\r\nX-Tenso-Pool-Reason: spam\r\n"
        )),
        "{text}"
    );
    assert!(
        text.contains("ah-default") && text.contains("X-Spam: Yes"),
        "{text}"
    );

    // GTUBE: rspamd says reject → 550 for every alias whose policy is not off.
    for alias in ["tag@alias.test", "rej@alias.test", "quar@alias.test"] {
        let (code, text) = send(t, &[alias], &message("gtube-1", GTUBE, "")).await;
        assert_eq!((code, esc(&text)), (550, "5.7.1"), "{alias}: {text}");
        assert!(
            !text.contains("GTUBE"),
            "fixed text, not rspamd's internals: {text}"
        );
    }
    send_ok(t, &["off@alias.test"], &message("gtube-off", GTUBE, "")).await;
    let m = &copies(t, sink, "gtube-off", 1).await[0];
    assert_eq!(count_fields(m, "X-Spam-Status"), 0);
    expect_log(t, &["message refused as spam", "reject 15.00/15.00"]).await;
}

/// Mixed recipients (one reply per message): the rejecting alias quarantines, the
/// tagging one gets a tagged copy, the off one an untouched copy of its own. Then the
/// pooled copies are released and learnt.
async fn mixed_and_release(t: &Tenso, sink: &TestSink, pw_file: &str) {
    let rcpts = ["rej@alias.test", "tag@alias.test", "off@alias.test"];
    send_ok(t, &rcpts, &message("mixed-ah", ADD_HEADER, "")).await;
    let got = copies(t, sink, "mixed-ah", 2).await;
    let to = |d: &str| {
        got.iter()
            .find(|m| m.rcpts == [d])
            .unwrap_or_else(|| panic!("no copy for {d}: {got:?}"))
    };
    let tagged = to("tag@dest.test");
    assert_eq!(tagged.header("X-Spam").as_deref(), Some("Yes"));
    assert_eq!(tagged.header("Subject").as_deref(), Some("[SPAM] mixed-ah"));
    assert_eq!(tagged.mail_from, "tag@alias.test");
    let plain = to("off@dest.test");
    assert_eq!(
        count_fields(plain, "X-Spam") + count_fields(plain, "X-Spam-Status"),
        0
    );
    assert_eq!(plain.header("Subject").as_deref(), Some("mixed-ah"));
    let id = |m: &Delivered| {
        m.header("Received")
            .unwrap()
            .split(" id ")
            .nth(1)
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_string()
    };
    assert_ne!(
        id(tagged),
        id(plain),
        "two queue files, each with its own id"
    );
    t.wait_queue_empty(WAIT).await;
    let got = copies(t, sink, "mixed-ah", 2).await;
    assert_eq!(got.len(), 2, "nothing for rej@: {got:?}");
    let rej_pool = pool(t, "rej@alias.test").await;
    assert_eq!(rej_pool.len(), 1, "{rej_pool:?}");

    // GTUBE to an off alias and a quarantining one: quarantine for the one, forward
    // for the other (a 550 would refuse the off alias's mail too).
    send_ok(
        t,
        &["off@alias.test", "quar@alias.test"],
        &message("mixed-gtube", GTUBE, ""),
    )
    .await;
    let got = copies(t, sink, "mixed-gtube", 1).await;
    assert_eq!(got[0].rcpts, ["off@dest.test"]);
    let quar_pool = pool(t, "quar@alias.test").await;
    assert_eq!(quar_pool.len(), 1);

    // "Not spam": release forwards it to the alias's destinations, MAIL FROM the alias.
    let rid = rej_pool[0]["id"].as_str().unwrap().to_string();
    let out = t.cli_json(&["pool", "release", &rid]).await;
    assert_eq!(out["dests"], serde_json::json!(["rej@dest.test"]), "{out}");
    let got = copies(t, sink, "mixed-ah", 3).await;
    let released = got
        .iter()
        .find(|m| m.rcpts == ["rej@dest.test"])
        .expect("released copy");
    assert_eq!(released.mail_from, "rej@alias.test");
    assert!(
        !released.text().contains("X-Tenso-Pool-Reason"),
        "{}",
        released.text()
    );
    assert!(pool(t, "rej@alias.test").await.is_empty());
    let again = t.cli_async(&["pool", "release", &rid]).await;
    assert!(
        !again.status.success(),
        "a released message is gone from the pool"
    );

    // rspamd's controller learns from the pool; a wrong password is refused.
    let qid = quar_pool[0]["id"].as_str().unwrap().to_string();
    let out = t.cli_json(&["spam", "learn-spam", &qid]).await;
    assert_eq!(out["learned"], "spam", "{out}");
    assert_eq!(out["rspamd"]["success"], true, "{out}");
    let right = std::fs::read_to_string(pw_file).unwrap();
    std::fs::write(pw_file, "wrong\n").unwrap();
    let bad = t.cli_async(&["spam", "learn-ham", &qid]).await;
    std::fs::write(pw_file, right).unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("Unauthorized") || err.contains("403"), "{err}");
}

/// Delivery states at RCPT and DATA, inside an alias chain, and shown by `user show`.
async fn states(t: &Tenso, sink: &TestSink) {
    let (code, text) = send(t, &["defer@alias.test"], &message("st-defer", CLEAN, "")).await;
    assert_eq!((code, esc(&text)), (450, "4.2.1"), "{text}");
    let (code, text) = send(t, &["gone@alias.test"], &message("st-gone", CLEAN, "")).await;
    assert_eq!((code, esc(&text)), (550, "5.2.1"), "{text}");
    send_ok(t, &["disc@alias.test"], &message("st-disc", CLEAN, "")).await;
    // list@ → ok@ and disc@: disc@'s branch is dropped, ok@ gets its copy.
    send_ok(t, &["list@alias.test"], &message("st-chain", CLEAN, "")).await;
    let got = copies(t, sink, "st-chain", 1).await;
    assert_eq!(got[0].rcpts, ["ok@dest.test"]);
    none_forwarded(t, sink, "st-disc").await;
    assert_eq!(copies(t, sink, "st-chain", 1).await.len(), 1);

    let show = t
        .cli_json(&["user", "show", "disc@alias.test", "--json"])
        .await;
    assert_eq!(
        (show["state"].as_str(), show["spam"].as_str()),
        (Some("discard"), Some("default"))
    );
    assert_eq!(show["spam_effective"], "quarantine");
    let show = t
        .cli_json(&["user", "show", "quar@alias.test", "--json"])
        .await;
    assert_eq!(
        (show["state"].as_str(), show["spam"].as_str()),
        (Some("active"), Some("quarantine"))
    );
    let human = t.cli_ok(&["user", "show", "dflt@alias.test"]).await;
    assert!(
        human.contains("spam:     default (quarantine)") && human.contains("state:    active"),
        "{human}"
    );
    let bad = t
        .cli_async(&["user", "set", "defer@alias.test", "--state", "sleeping"])
        .await;
    assert!(!bad.status.success());

    // Back to active: mail flows again.
    t.cli_ok(&["user", "set", "defer@alias.test", "--state", "active"])
        .await;
    send_ok(t, &["defer@alias.test"], &message("st-active", CLEAN, "")).await;
    copies(t, sink, "st-active", 1).await;
}

/// An rspamd that accepts but never answers: the deadline fires and, with
/// `on_error = "accept"`, mail flows unscanned. A message over max_size is not sent.
async fn rspamd_hangs(t: &Tenso, sink: &TestSink) {
    send_ok(t, &["alice@alias.test"], &message("hang-1", CLEAN, "")).await;
    let m = &copies(t, sink, "hang-1", 1).await[0];
    assert_eq!(count_fields(m, "X-Spam-Status"), 0);
    expect_log(t, &["rspamd could not judge", "did not answer within 1s"]).await;
    let big = message("hang-big", &vec!["x".repeat(70); 60].join("\r\n"), "");
    send_ok(t, &["alice@alias.test"], &big).await;
    copies(t, sink, "hang-big", 1).await;
    assert_eq!(spam_counter(t, "spam_oversize").await, 1);
    assert_eq!(spam_counter(t, "spam_unscanned").await, 1);
    assert_eq!(spam_counter(t, "spam_errors").await, 1);
}

async fn main_counters(t: &Tenso) {
    let c = counters(t).await;
    let i = &c["inbound"];
    let want = [
        // clean-1, forged-clean, st-chain, st-active (st-disc is dropped before the gate)
        ("spam_clean", 4),
        // forged-spam, mixed-ah
        ("spam_tagged", 2),
        // ah-default, mixed-ah (rej@), mixed-gtube (quar@)
        ("spam_quarantined", 3),
        // ah-reject, gtube-1 ×3
        ("spam_rejected", 4),
        // ah-off, gtube-off, mixed-ah, mixed-gtube
        ("spam_forwarded_off", 4),
        ("spam_unscanned", 1),
        ("spam_tempfailed", 0),
        ("alias_discarded", 1),
        ("alias_deferred", 1),
        ("alias_rejected", 1),
    ];
    for (name, n) in want {
        assert_eq!(i[name].as_u64(), Some(n), "{name}: {i}");
    }
}
