//! Shared helpers for the bounce tests (issue 4): a tenso config aimed at the
//! in-process DNS server and a sink, the admin CLI as JSON, sending through tenso
//! (one message, or many pipelined), reading the per-alias Maildir pools, building the
//! DSNs "another MTA" sends back, and taking tenso's own DSNs apart with an independent
//! MIME parser. Include with `mod common; mod bounce_support;`.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use mail_parser::{MessageParser, MimeHeaders};
use serde_json::Value;

use crate::common::daemon::Tenso;
use crate::common::dns::TestDns;
use crate::common::smtp_client::{RawSmtp, dot_stuff};

/// Upper bound for every wait (nothing here needs more than a few seconds on loopback).
pub const WAIT: Duration = Duration::from_secs(30);

/// `dest.test MX 10 mx.dest.test`, `mx.dest.test A 127.0.0.1`.
pub async fn dns() -> TestDns {
    TestDns::builder()
        .mx("dest.test", 10, "mx.dest.test")
        .a("mx.dest.test", "127.0.0.1")
        .start()
        .await
}

/// A tenso config: DNS from `dns`, SPF/DKIM off, MX delivery to `sink_port`, retries
/// after 1 s; `extra` holds further tables (`[pool]`, `[bounce]`).
pub fn config(dns: &TestDns, sink_port: u16, extra: &str) -> String {
    format!(
        "[dns]\n{}\ntimeout = \"2s\"\n\n\
         [auth]\nspf = false\ndkim = false\n\n\
         [delivery]\nport = {sink_port}\nconnect_timeout = \"3s\"\ncommand_timeout = \"10s\"\n\
         data_timeout = \"10s\"\n\n\
         [queue]\nretry = [\"1s\"]\ndead_host_ttl = \"1s\"\nmax_lifetime = \"1h\"\n\n{extra}\n",
        dns.resolver_config_toml()
    )
}

/// Runs `tenso <args>` against the daemon; panics (with the log) unless it succeeds.
pub async fn cli_ok(t: &Tenso, args: &[&str]) -> String {
    t.cli_ok(args).await
}

/// `tenso <args>` whose output is JSON, parsed.
pub async fn cli_json(t: &Tenso, args: &[&str]) -> Value {
    t.cli_json(args).await
}

/// `tenso user add ALIAS DEST... --bounce POLICY`.
pub async fn add_alias(t: &Tenso, alias: &str, dests: &[&str], bounce: &str) {
    let mut args = vec!["user", "add", alias];
    args.extend_from_slice(dests);
    args.extend_from_slice(&["--bounce", bounce]);
    cli_ok(t, &args).await;
}

/// `tenso user show ALIAS --json`.
pub async fn user_show(t: &Tenso, alias: &str) -> Value {
    cli_json(t, &["user", "show", alias, "--json"]).await
}

/// The counters of `tenso status` (`{"inbound":…, "queue":…, "bounce":…, "pool":…}`).
pub async fn counters(t: &Tenso) -> Value {
    t.counters().await
}

/// One counter, e.g. `counter(&c, "bounce", "lost_by_design")`; panics if missing.
pub fn counter(c: &Value, section: &str, name: &str) -> u64 {
    c[section][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {section}.{name} in {c}"))
}

/// Waits until counter `section.name` is at least `min`; returns all counters.
pub async fn wait_counter(t: &Tenso, section: &str, name: &str, min: u64) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let c = counters(t).await;
        if counter(&c, section, name) >= min {
            return c;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!(
                "waited {WAIT:?} for {section}.{name} >= {min}; counters: {c}\nlog:\n{}",
                t.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `tenso queue list --json`.
pub async fn queue_list(t: &Tenso) -> Vec<Value> {
    t.queue_list().await
}

/// Waits until the queue is empty; panics after `WAIT`.
pub async fn wait_queue_empty(t: &Tenso) {
    t.wait_queue_empty(WAIT).await
}

/// Sends one message through tenso; panics unless it is accepted. Returns the 250 text.
pub async fn send(t: &Tenso, from: &str, rcpts: &[&str], data: &[u8]) -> String {
    let mut c = RawSmtp::connect(t.smtp_addr()).await;
    let (code, text) = c
        .send_message(from, rcpts, data)
        .await
        .unwrap_or_else(|e| panic!("tenso refused the message: {e}\nlog:\n{}", t.log()));
    c.quit().await;
    assert_eq!(code, 250, "{text}");
    text
}

/// The queue id in tenso's `250 2.0.0 Ok: queued as ID`.
pub fn queue_id_of(reply_text: &str) -> String {
    assert!(
        reply_text.contains("queued as"),
        "no queue id in {reply_text:?}"
    );
    let id = reply_text
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    assert!(!id.is_empty(), "no queue id in {reply_text:?}");
    id
}

/// Sends every message in `msgs` with `MAIL FROM:<>` to `rcpt` over one session to
/// `addr`, using PIPELINING (RFC 2920): MAIL, RCPT and DATA go in one write, and the end
/// of each message goes together with the next MAIL/RCPT/DATA. Every read is bounded
/// (RawSmtp's timeout). Errs on any unexpected reply.
pub async fn send_null_pipelined(
    addr: std::net::SocketAddr,
    rcpt: &str,
    msgs: &[Vec<u8>],
) -> Result<(), String> {
    if msgs.is_empty() {
        return Ok(());
    }
    let mut c = RawSmtp::connect(addr).await;
    if c.greeting.0 != 220 {
        return Err(format!("greeting {:?}", c.greeting));
    }
    let (code, caps) = c.ehlo("storm.test").await;
    if code != 250 || !caps.contains("PIPELINING") {
        return Err(format!("EHLO: {code} {caps} (PIPELINING needed)"));
    }
    let envelope = format!("MAIL FROM:<>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n");
    c.send(envelope.as_bytes()).await;
    for (i, m) in msgs.iter().enumerate() {
        for (what, want) in [("MAIL", 250), ("RCPT", 250), ("DATA", 354)] {
            let (code, text) = c.read_reply().await;
            if code != want {
                return Err(format!("message {i}: {what} got {code} {text}"));
            }
        }
        let mut out = dot_stuff(m);
        out.extend_from_slice(b".\r\n");
        if i + 1 < msgs.len() {
            out.extend_from_slice(envelope.as_bytes());
        }
        c.send(&out).await;
        let (code, text) = c.read_reply().await;
        if code != 250 {
            return Err(format!("message {i}: end of data got {code} {text}"));
        }
    }
    c.quit().await;
    Ok(())
}

/// Waits until the sink recorded at least `n` transactions (any reply), then returns
/// how many it has. The sink records a transaction just after writing its final reply,
/// so tenso may act on a reply a moment before the sink counts it: call this after the
/// queue is empty to read a settled count.
pub async fn settled_transactions(sink: &crate::common::sink::TestSink, n: u64) -> u64 {
    crate::common::wait_until(WAIT, || async { (sink.transactions() >= n).then_some(()) })
        .await
        .unwrap_or_else(|| {
            panic!(
                "sink: waited {WAIT:?} for {n} transaction(s), have {}:\n{}",
                sink.transactions(),
                sink.describe()
            )
        });
    sink.transactions()
}

/// The `new/` directory of the alias's Maildir pool.
pub fn pool_new_dir(t: &Tenso, alias: &str) -> PathBuf {
    t.data_dir()
        .join("pool")
        .join(alias.to_lowercase())
        .join("new")
}

/// The files in the alias's pool `new/` (path, contents), by file name.
pub fn pool_files(t: &Tenso, alias: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(pool_new_dir(t, alias))
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    paths.sort();
    paths
        .into_iter()
        .filter_map(|p| std::fs::read(&p).ok().map(|b| (p, b)))
        .collect()
}

/// The Maildir id of a pool file (its name up to the first `,` or `:`), as the CLI shows it.
pub fn maildir_id(path: &std::path::Path) -> String {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    name.split([',', ':']).next().unwrap_or("").to_string()
}

/// Waits until the alias's pool holds at least `n` files; panics (with the log) after `WAIT`.
pub async fn wait_pool(t: &Tenso, alias: &str, n: usize) -> Vec<(PathBuf, Vec<u8>)> {
    crate::common::wait_until(WAIT, || async {
        let f = pool_files(t, alias);
        (f.len() >= n).then_some(f)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "pool of {alias}: waited {WAIT:?} for {n} file(s), have {}\nlog:\n{}",
            pool_files(t, alias).len(),
            t.log()
        )
    })
}

/// `tenso pool list [ALIAS] --json`.
pub async fn pool_list(t: &Tenso, alias: Option<&str>) -> Vec<Value> {
    let mut args = vec!["pool", "list"];
    if let Some(a) = alias {
        args.push(a);
    }
    args.push("--json");
    let v = cli_json(t, &args).await;
    v.as_array()
        .unwrap_or_else(|| panic!("pool list --json is not an array: {v}"))
        .clone()
}

/// The header section of a message (up to the first empty line), as text.
pub fn header_section(msg: &[u8]) -> String {
    let text = String::from_utf8_lossy(msg);
    match text.find("\r\n\r\n") {
        Some(p) => text[..p + 2].to_string(),
        None => text.into_owned(),
    }
}

/// All values of top-level header `name` (case-insensitive, unfolded, trimmed).
pub fn header_values(msg: &[u8], name: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    for line in header_section(msg).split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some(v) = current.as_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
            continue;
        }
        if let Some(v) = current.take() {
            out.push(v);
        }
        if let Some((n, v)) = line.split_once(':')
            && n.trim().eq_ignore_ascii_case(name)
        {
            current = Some(v.trim().to_string());
        }
    }
    if let Some(v) = current {
        out.push(v);
    }
    out
}

/// The first value of top-level header `name`.
pub fn header(msg: &[u8], name: &str) -> Option<String> {
    header_values(msg, name).into_iter().next()
}

/// A delivery report taken apart with mail-parser (independently of tenso's own reader).
#[derive(Debug)]
pub struct Report {
    /// `report-type` of the top-level `multipart/report`.
    pub report_type: String,
    /// Per-message fields (first group of the delivery-status part).
    pub per_message: Vec<(String, String)>,
    /// Per-recipient groups.
    pub recipients: Vec<Vec<(String, String)>>,
}

impl Report {
    /// A field of the first recipient group that has it.
    pub fn rcpt_field(&self, name: &str) -> Option<String> {
        self.recipients.iter().find_map(|g| field(g, name))
    }
}

/// The value of `name` in a field group.
pub fn field(group: &[(String, String)], name: &str) -> Option<String> {
    group
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
}

/// Parses a `multipart/report; report-type=delivery-status` message; panics (showing the
/// message) unless it is one with a `message/delivery-status` part naming a recipient.
pub fn parse_report(msg: &[u8]) -> Report {
    let show = || String::from_utf8_lossy(msg).into_owned();
    let m = MessageParser::default()
        .parse(msg)
        .unwrap_or_else(|| panic!("not a message:\n{}", show()));
    let ct = m
        .root_part()
        .content_type()
        .unwrap_or_else(|| panic!("no Content-Type:\n{}", show()));
    assert!(
        ct.ctype().eq_ignore_ascii_case("multipart")
            && ct
                .subtype()
                .is_some_and(|s| s.eq_ignore_ascii_case("report")),
        "not multipart/report:\n{}",
        show()
    );
    let report_type = ct.attribute("report-type").unwrap_or("").to_string();
    let status = m
        .parts
        .iter()
        .find(|p| {
            p.content_type().is_some_and(|c| {
                c.ctype().eq_ignore_ascii_case("message")
                    && c.subtype()
                        .is_some_and(|s| s.eq_ignore_ascii_case("delivery-status"))
            })
        })
        .unwrap_or_else(|| panic!("no message/delivery-status part:\n{}", show()));
    let text = String::from_utf8_lossy(status.contents()).into_owned();
    let mut groups: Vec<Vec<(String, String)>> = Vec::new();
    let mut group: Vec<(String, String)> = Vec::new();
    for line in text.split('\n').map(|l| l.trim_end_matches('\r')) {
        if line.trim().is_empty() {
            if !group.is_empty() {
                groups.push(std::mem::take(&mut group));
            }
        } else if line.starts_with([' ', '\t']) {
            if let Some((_, v)) = group.last_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
        } else if let Some((n, v)) = line.split_once(':') {
            group.push((n.trim().to_string(), v.trim().to_string()));
        }
    }
    if !group.is_empty() {
        groups.push(group);
    }
    assert!(
        groups.len() >= 2,
        "delivery-status part lacks per-message or per-recipient fields:\n{text}"
    );
    let per_message = groups.remove(0);
    Report {
        report_type,
        per_message,
        recipients: groups,
    }
}

/// What "another MTA" puts into the DSN it sends back to the alias.
pub struct RemoteDsn<'a> {
    /// The alias the DSN is addressed to (the forwarded copy's MAIL FROM).
    pub to: &'a str,
    /// `Original-Envelope-Id`: the ENVID tenso sent (None: the MTA did not keep it).
    pub envid: Option<&'a str>,
    /// The address that failed (the alias's destination).
    pub final_rcpt: &'a str,
    /// RFC 3463 status, e.g. `5.2.2`.
    pub status: &'a str,
    /// The SMTP reply, e.g. `552 5.2.2 mailbox full`.
    pub diagnostic: &'a str,
    /// The returned header block (CRLF lines), sent as `text/rfc822-headers`.
    pub returned_headers: &'a str,
    /// Unique token for this DSN's own Message-ID and boundary.
    pub token: &'a str,
}

/// A realistic RFC 3464 DSN in Postfix's shape (multipart/report with notification,
/// `message/delivery-status` and `text/rfc822-headers`), CRLF line ends.
pub fn remote_dsn(d: &RemoteDsn) -> Vec<u8> {
    let boundary = format!("{}.1772532005/mx.dest.test", d.token);
    let mut per_message = String::new();
    if let Some(id) = d.envid {
        per_message.push_str(&format!("Original-Envelope-Id: {id}\r\n"));
    }
    per_message.push_str(
        "Reporting-MTA: dns; mx.dest.test\r\n\
         Arrival-Date: Tue,  3 Mar 2026 10:00:04 +0000 (UTC)\r\n",
    );
    let mut returned = d.returned_headers.to_string();
    if !returned.ends_with("\r\n") {
        returned.push_str("\r\n");
    }
    format!(
        "Received: by mx.dest.test (Postfix)\r\n\
         \tid {token}; Tue,  3 Mar 2026 10:00:05 +0000 (UTC)\r\n\
         Date: Tue,  3 Mar 2026 10:00:05 +0000 (UTC)\r\n\
         From: MAILER-DAEMON@mx.dest.test (Mail Delivery System)\r\n\
         Subject: Undelivered Mail Returned to Sender\r\n\
         To: {to}\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status;\r\n\
         \tboundary=\"{boundary}\"\r\n\
         Message-Id: <{token}@mx.dest.test>\r\n\
         \r\n\
         This is a MIME-encapsulated message.\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Description: Notification\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n\
         This is the mail system at host mx.dest.test.\r\n\
         \r\n\
         I'm sorry to have to inform you that your message could not\r\n\
         be delivered to one or more recipients.\r\n\
         \r\n\
         <{rcpt}>: {diag}\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Description: Delivery report\r\n\
         Content-Type: message/delivery-status\r\n\
         \r\n\
         {per_message}\
         \r\n\
         Final-Recipient: rfc822; {rcpt}\r\n\
         Original-Recipient: rfc822;{rcpt}\r\n\
         Action: failed\r\n\
         Status: {status}\r\n\
         Remote-MTA: dns; mbox.dest.test\r\n\
         Diagnostic-Code: smtp; {diag}\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Description: Undelivered Message Headers\r\n\
         Content-Type: text/rfc822-headers\r\n\
         \r\n\
         {returned}\
         \r\n\
         --{boundary}--\r\n",
        token = d.token,
        to = d.to,
        rcpt = d.final_rcpt,
        diag = d.diagnostic,
        status = d.status,
    )
    .into_bytes()
}

/// A plain message from sender@origin.test with the given Message-ID and subject.
pub fn original(message_id: &str, to: &str, subject: &str) -> Vec<u8> {
    format!(
        "From: Sender <sender@origin.test>\r\nTo: {to}\r\nSubject: {subject}\r\n\
         Date: Tue, 03 Mar 2026 09:59:50 +0000\r\nMessage-ID: <{message_id}>\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n\
         Hello, this is {subject}.\r\n"
    )
    .into_bytes()
}
