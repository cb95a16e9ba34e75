//! The durability promise (issue 2): a 250 to DATA means the message is on disk. The
//! daemon is killed with SIGKILL right after the 250 and the message must still be in
//! the queue, seen through the CLI both without a daemon (direct spool access) and after
//! a restart (through the admin socket). Also: start-up recovery of partial spool
//! files, and the per-message acceptance time on loopback (printed, not asserted).

mod common;

use common::daemon::Tenso;
use common::dns::TestDns;
use common::smtp_client::RawSmtp;
use serde_json::Value;
use std::time::{Duration, Instant};

const FROM: &str = "sender@origin.test";

use common::closed_port;

/// Delivery goes to a closed port with a one-hour retry: accepted mail stays queued.
/// DNS goes to the kit's server (no records), never to the machine's resolver.
fn config(dns: &TestDns) -> String {
    format!(
        "[dns]\n{}\n\n[smtp]\nlisten = [\"127.0.0.1:0\"]\n\n\
         [delivery]\nroutes = {{ \"*\" = \"127.0.0.1:{}\" }}\n\n\
         [queue]\nretry = [\"1h\"]\n",
        dns.resolver_config_toml(),
        closed_port()
    )
}

async fn cli_ok(t: &Tenso, args: &[&str]) -> String {
    t.cli_ok(args).await
}

async fn prepared() -> (Tenso, TestDns) {
    let dns = TestDns::builder().start().await;
    let t = Tenso::prepare(&config(&dns));
    cli_ok(&t, &["user", "add", "alice@alias.test", "alice@dest.test"]).await;
    cli_ok(
        &t,
        &[
            "user",
            "add",
            "team@alias.test",
            "t1@dest.test",
            "t2@dest.test",
        ],
    )
    .await;
    (t, dns)
}

async fn queue(t: &Tenso) -> Vec<Value> {
    t.queue_list().await
}

fn field_list(m: &Value, field: &str) -> Vec<String> {
    let mut v: Vec<String> = m["recipients"]
        .as_array()
        .expect("recipients")
        .iter()
        .map(|r| r[field].as_str().expect("string").to_string())
        .collect();
    v.sort();
    v
}

/// What the test sent, to find it again in the queue.
struct Sent {
    token: String,
    rcpt: &'static str,
    dests: Vec<&'static str>,
}

/// The message part of a spool file: after the `TENSO-SPOOL-1 <len>` header line and
/// the committed envelope.
fn spooled_message(path: &std::path::Path) -> Vec<u8> {
    let bytes = std::fs::read(path).expect("spool file");
    let nl = bytes.iter().position(|&b| b == b'\n').expect("header line");
    let head = String::from_utf8_lossy(&bytes[..nl]);
    let len: usize = head
        .trim()
        .strip_prefix("TENSO-SPOOL-1 ")
        .and_then(|l| l.parse().ok())
        .unwrap_or_else(|| panic!("bad spool header {head:?}"));
    bytes[nl + 1 + len..].to_vec()
}

fn check_queue(t: &Tenso, q: &[Value], sent: &[Sent]) {
    assert_eq!(q.len(), sent.len(), "queue: {q:#?}");
    let dir = t.data_dir().join("queue");
    for s in sent {
        let found: Vec<&Value> = q
            .iter()
            .filter(|m| {
                let id = m["id"].as_str().expect("id");
                std::fs::read(dir.join(format!("{id}.msg")))
                    .map(|b| String::from_utf8_lossy(&b).contains(&s.token))
                    .unwrap_or(false)
            })
            .collect();
        assert_eq!(found.len(), 1, "message {} in the queue: {q:#?}", s.token);
        let m = found[0];
        let id = m["id"].as_str().unwrap();
        assert_eq!(m["sender"], FROM, "{m:#}");
        assert!(field_list(m, "orig").iter().all(|o| o == s.rcpt), "{m:#}");
        assert_eq!(field_list(m, "dest"), s.dests, "{m:#}");
        let message = spooled_message(&dir.join(format!("{id}.msg")));
        assert_eq!(
            m["size"].as_u64(),
            Some(message.len() as u64),
            "size of {id}: {m:#}"
        );
        let body = String::from_utf8(message).unwrap();
        // Received-SPF (when SPF is checked) sits above tenso's Received (RFC 7208 §9.1).
        let received = body
            .split("\r\n")
            .find(|l| !l.starts_with([' ', '\t']) && !l.starts_with("Received-SPF: "))
            .unwrap_or_default();
        assert!(
            received.starts_with("Received: ") && body.contains(id),
            "the Received header carries the queue id {id}: {body}"
        );
    }
}

#[tokio::test]
async fn accepted_message_survives_sigkill() {
    let (mut t, _dns) = prepared().await;
    t.launch().await;

    let mut c = RawSmtp::connect(t.smtp_addr()).await;
    let mut sent = Vec::new();
    for i in 0..5 {
        let (rcpt, dests) = if i % 2 == 0 {
            ("alice@alias.test", vec!["alice@dest.test"])
        } else {
            ("team@alias.test", vec!["t1@dest.test", "t2@dest.test"])
        };
        let token = format!("durable-{i}-{}", std::process::id());
        let body = format!("Subject: {token}\r\n\r\n{}\r\n", token.repeat(20));
        let (code, text) = c
            .send_message(FROM, &[rcpt], body.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("message {i}: {e}"));
        assert_eq!(code, 250, "{text}");
        sent.push(Sent { token, rcpt, dests });
    }
    // SIGKILL at once after the last 250: no graceful anything.
    t.kill9().await;
    assert!(!t.is_running());

    // No daemon: the CLI reads the spool itself.
    let q = queue(&t).await;
    check_queue(&t, &q, &sent);

    // Restarted daemon: recovered, and listed through the admin socket.
    t.launch().await;
    let q = queue(&t).await;
    check_queue(&t, &q, &sent);
    assert!(
        t.log().contains("admin command"),
        "queue list went through the daemon"
    );
    // And it keeps accepting.
    let mut c = RawSmtp::connect(t.smtp_addr()).await;
    c.send_message(FROM, &["alice@alias.test"], b"Subject: after\r\n\r\nx\r\n")
        .await
        .expect("accepted after restart");
    c.quit().await;
    assert_eq!(queue(&t).await.len(), sent.len() + 1);
}

/// When the spool cannot be written, the client gets a temporary failure, never 250;
/// once it can be written again, mail is accepted again.
#[tokio::test]
async fn no_250_when_the_message_cannot_be_written() {
    let (mut t, _dns) = prepared().await;
    t.launch().await;
    let q = t.data_dir().join("queue");
    let away = t.data_dir().join("queue.away");
    // Root ignores permission bits, so put a regular file where the directory was.
    std::fs::rename(&q, &away).unwrap();
    std::fs::write(&q, b"not a directory").unwrap();
    let mut c = RawSmtp::connect(t.smtp_addr()).await;
    let err = c
        .send_message(FROM, &["alice@alias.test"], b"Subject: lost?\r\n\r\nx\r\n")
        .await
        .expect_err("a message that cannot be spooled must not get 250");
    assert_eq!((err.stage, err.code / 100), ("DOT", 4), "{err}");
    std::fs::remove_file(&q).unwrap();
    std::fs::rename(&away, &q).unwrap();
    c.send_message(FROM, &["alice@alias.test"], b"Subject: kept\r\n\r\nx\r\n")
        .await
        .expect("accepted once the spool is back");
    c.quit().await;
    let listed = queue(&t).await;
    assert_eq!(listed.len(), 1, "{listed:#?}");
    t.kill9().await;
    t.launch().await;
    assert_eq!(queue(&t).await.len(), 1);
}

/// A client that vanishes in the middle of DATA was never told 250: nothing of its
/// message may be queued, neither now nor after a SIGKILL and restart.
#[tokio::test]
async fn client_vanishing_mid_data_queues_nothing() {
    let (mut t, _dns) = prepared().await;
    t.launch().await;
    let mut c = RawSmtp::connect(t.smtp_addr()).await;
    c.send_message(FROM, &["alice@alias.test"], b"Subject: one\r\n\r\nkept\r\n")
        .await
        .expect("first message");
    c.expect(&format!("MAIL FROM:<{FROM}>"), 250).await;
    c.expect("RCPT TO:<alice@alias.test>", 250).await;
    c.expect("DATA", 354).await;
    // Everything but the final dot; the end of a line, even "\r\n.\r" is not an end.
    c.send(b"Subject: two\r\n\r\nnever acknowledged\r\n.\r")
        .await;
    drop(c);
    assert!(
        t.wait_for_log("disconnect", Duration::from_secs(10)).await,
        "the server noticed the client leaving: {}",
        t.log()
    );
    let qdir = t.data_dir().join("queue");
    let check = |q: &[Value]| {
        assert_eq!(q.len(), 1, "{q:#?}");
        let id = q[0]["id"].as_str().unwrap();
        let body = String::from_utf8(spooled_message(&qdir.join(format!("{id}.msg")))).unwrap();
        assert!(body.contains("kept"), "{body}");
    };
    check(&queue(&t).await);
    t.kill9().await;
    t.launch().await;
    check(&queue(&t).await);
}

#[tokio::test]
async fn start_up_recovery_removes_partials_and_quarantines_orphans() {
    let (mut t, _dns) = prepared().await;
    t.launch().await;
    let mut c = RawSmtp::connect(t.smtp_addr()).await;
    c.send_message(
        FROM,
        &["alice@alias.test"],
        b"Subject: real\r\n\r\nreal\r\n",
    )
    .await
    .expect("accepted");
    c.quit().await;
    let q = queue(&t).await;
    assert_eq!(q.len(), 1);
    let real = q[0]["id"].as_str().unwrap().to_string();
    t.kill9().await;

    // A crash can leave: a message never committed (its temp file), a temp envelope,
    // and (disk trouble) an envelope without its message. Build the orphan from the
    // real message's committed envelope.
    let dir = t.data_dir().join("queue");
    let raw = std::fs::read(dir.join(format!("{real}.msg"))).unwrap();
    let nl = raw.iter().position(|&b| b == b'\n').unwrap();
    let len: usize = String::from_utf8_lossy(&raw[..nl])
        .trim()
        .strip_prefix("TENSO-SPOOL-1 ")
        .unwrap()
        .parse()
        .unwrap();
    let env = raw[nl + 1..nl + 1 + len].to_vec();
    let orphan_id = "0000000000001FFFFF";
    let orphan_env = String::from_utf8(env).unwrap().replace(&real, orphan_id);
    std::fs::write(dir.join(format!("{orphan_id}.env")), orphan_env).unwrap();
    std::fs::write(
        dir.join("0000000000002FFFFF.msg.tmp"),
        b"Subject: partial\r\n",
    )
    .unwrap();
    std::fs::write(dir.join("0000000000003FFFFF.env.tmp"), b"{\"id\":").unwrap();

    t.launch().await;
    let q = queue(&t).await;
    let ids: Vec<&str> = q.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [real.as_str()], "only the committed message is queued");
    let mut left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    // The restarted queue may already have recorded a deferral in `{real}.env`.
    left.retain(|n| *n != format!("{real}.env"));
    assert_eq!(left, [format!("{real}.msg")]);
    let quarantined = t.data_dir().join(format!("quarantine/{orphan_id}.env"));
    assert!(
        quarantined.exists(),
        "the envelope without body is kept aside, not deleted: {}",
        t.log()
    );
}

/// Per-message acceptance time on loopback, one session, 200 messages. Printed (run with
/// `--nocapture`); the only assertions are that all were accepted and queued.
#[tokio::test]
async fn acceptance_time_200_messages_one_session() {
    let (mut t, _dns) = prepared().await;
    t.launch().await;
    let mut c = RawSmtp::connect(t.smtp_addr()).await;
    c.expect("EHLO bench.test", 250).await;
    let n = 200;
    let mut whole = Vec::with_capacity(n);
    let mut after_dot = Vec::with_capacity(n);
    let line = "x".repeat(76);
    for i in 0..n {
        let mut body = format!("Subject: bench {i}\r\n\r\n");
        for _ in 0..20 {
            body.push_str(&line);
            body.push_str("\r\n");
        }
        body.push_str(".\r\n");
        let start = Instant::now();
        c.expect(&format!("MAIL FROM:<{FROM}>"), 250).await;
        c.expect("RCPT TO:<alice@alias.test>", 250).await;
        c.expect("DATA", 354).await;
        let dot = Instant::now();
        c.send(body.as_bytes()).await;
        let (code, text) = c.read_reply().await;
        assert_eq!(code, 250, "message {i}: {text}");
        whole.push(start.elapsed());
        after_dot.push(dot.elapsed());
    }
    c.quit().await;
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        (v[v.len() / 2], v[v.len() * 9 / 10], v[v.len() - 1])
    };
    let (w50, w90, wmax) = median(&mut whole);
    let (d50, d90, dmax) = median(&mut after_dot);
    println!(
        "acceptance over loopback, {n} messages of ~1.6 kB in one session:\n  \
         MAIL..250 median {w50:?}, p90 {w90:?}, max {wmax:?}\n  \
         data+dot..250 median {d50:?}, p90 {d90:?}, max {dmax:?}"
    );
    assert_eq!(queue(&t).await.len(), n);
}
