//! Shared helpers for the delivery integration tests (issue 3): tenso configs aimed at
//! the in-process DNS server and a sink port, alias setup through the CLI, sending
//! through tenso, reading the bounce pool and the queue, and taking apart what the
//! sink received. Include with `mod common; mod delivery_support;`.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use crate::common::daemon::Tenso;
use crate::common::dns::TestDns;
use crate::common::smtp_client::RawSmtp;

/// Upper bound for every wait on a delivery (nothing in these tests needs more than ~5 s).
pub const WAIT: Duration = Duration::from_secs(30);

/// A tenso config aimed at `dns` with MX/A delivery to `port`, short retries, and
/// `extra` appended (more keys for `[delivery]` go in `delivery_extra`, other tables in
/// `extra`).
pub fn config(dns: &TestDns, port: u16, delivery_extra: &str, queue: &str, extra: &str) -> String {
    format!(
        "[dns]\n{}\ntimeout = \"2s\"\n\n\
         [delivery]\nport = {port}\nconnect_timeout = \"3s\"\ncommand_timeout = \"10s\"\n\
         data_timeout = \"10s\"\n{delivery_extra}\n\n\
         [queue]\n{queue}\n\n{extra}\n",
        dns.resolver_config_toml()
    )
}

/// The `[queue]` keys most tests use: retry after 1 s, forget dead hosts after 1 s.
pub const FAST_QUEUE: &str = "retry = [\"1s\"]\ndead_host_ttl = \"1s\"\nmax_lifetime = \"1h\"";

/// Runs `tenso <args>` against the running daemon and panics (with the log) unless it
/// succeeds; returns stdout.
pub async fn cli_ok(t: &Tenso, args: &[&str]) -> String {
    t.cli_ok(args).await
}

/// `tenso user add ALIAS DEST... --bounce POLICY` through the daemon.
pub async fn add_alias(t: &Tenso, alias: &str, dests: &[&str], bounce: &str) {
    let mut args = vec!["user", "add", alias];
    args.extend_from_slice(dests);
    args.extend_from_slice(&["--bounce", bounce]);
    cli_ok(t, &args).await;
}

/// Sends one message through tenso and returns the queue id from its 250 reply.
pub async fn send(t: &Tenso, from: &str, rcpts: &[&str], data: &[u8]) -> String {
    let mut c = RawSmtp::connect(t.smtp_addr()).await;
    let (code, text) = c
        .send_message(from, rcpts, data)
        .await
        .unwrap_or_else(|e| panic!("tenso refused the message: {e}\nlog:\n{}", t.log()));
    c.quit().await;
    assert_eq!(code, 250, "{text}");
    queue_id_of(&text)
}

/// The queue id in tenso's `250 2.0.0 Ok: queued as ID`.
pub fn queue_id_of(reply_text: &str) -> String {
    let id = reply_text
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    assert!(
        reply_text.contains("queued as") && !id.is_empty(),
        "no queue id in {reply_text:?}"
    );
    id
}

/// A small message with the given subject (CRLF line ends, final CRLF included).
pub fn simple_message(subject: &str) -> Vec<u8> {
    format!(
        "From: Sender <sender@origin.test>\r\nTo: alice@alias.test\r\nSubject: {subject}\r\n\
         Message-ID: <{}@origin.test>\r\n\r\nHello, this is {subject}.\r\n",
        subject.replace(' ', "-")
    )
    .into_bytes()
}

/// Splits one header field (with its continuation lines and final CRLF) off the front
/// of `data`: (field name, whole field text, rest). None at the blank line or at the end.
fn next_field(data: &[u8]) -> Option<(String, String, &[u8])> {
    if data.starts_with(b"\r\n") || data.is_empty() {
        return None;
    }
    let mut i = 0;
    while i + 1 < data.len() {
        if &data[i..i + 2] == b"\r\n" && !matches!(data.get(i + 2), Some(b' ') | Some(b'\t')) {
            let field = String::from_utf8_lossy(&data[..i + 2]).into_owned();
            let name = field
                .split(':')
                .next()
                .unwrap_or_default()
                .trim()
                .to_string();
            return Some((name, field, &data[i + 2..]));
        }
        i += 1;
    }
    None
}

/// The authserv-id / host name tenso runs under in these tests (set by the kit).
pub const TENSO_HOST: &str = "tenso.test";

/// Splits what the sink received into (the `Delivered-To:` value, tenso's `Received:`
/// field, the rest). Panics unless the message starts with exactly the header fields
/// tenso prepends: `Delivered-To: <trace>`, then tenso's own `Received:` (naming
/// "(tenso)") and tenso's authentication results (`Authentication-Results:` with
/// authserv-id `tenso.test`, `Received-SPF:` with `receiver=tenso.test`), in any
/// order. Anything else, including a second tenso `Received:`, belongs to the rest.
pub fn split_prepended(data: &[u8]) -> (String, String, Vec<u8>) {
    let text = String::from_utf8_lossy(data);
    let (name, field, mut rest) =
        next_field(data).unwrap_or_else(|| panic!("message has no header:\n{text}"));
    assert!(
        name == "Delivered-To",
        "message does not start with Delivered-To:\n{text}"
    );
    let delivered_to = field["Delivered-To:".len()..].trim().to_string();
    let mut received = None;
    let mut seen_ar = false;
    let mut seen_spf = false;
    while let Some((name, field, after)) = next_field(rest) {
        let value = field[name.len() + 1..].trim_start();
        let ours = if name.eq_ignore_ascii_case("Received") {
            received.is_none() && field.contains("(tenso)")
        } else if name.eq_ignore_ascii_case("Authentication-Results") {
            !seen_ar && value.starts_with(&format!("{TENSO_HOST};"))
        } else if name.eq_ignore_ascii_case("Received-SPF") {
            !seen_spf && field.contains(&format!("receiver={TENSO_HOST};"))
        } else {
            false
        };
        if !ours {
            break;
        }
        if name.eq_ignore_ascii_case("Received") {
            received = Some(field.clone());
        } else if name.eq_ignore_ascii_case("Authentication-Results") {
            seen_ar = true;
        } else {
            seen_spf = true;
        }
        rest = after;
    }
    let received =
        received.unwrap_or_else(|| panic!("no Received: field of tenso's at the top:\n{text}"));
    (delivered_to, received, rest.to_vec())
}

/// Path of the alias's pool `new/` directory (the Maildir tenso writes DSNs into).
pub fn pool_new_dir(t: &Tenso, alias: &str) -> PathBuf {
    t.data_dir()
        .join("pool")
        .join(alias.to_lowercase())
        .join("new")
}

/// The messages in the alias's pool (`new/`), oldest file name first.
pub fn pool_messages(t: &Tenso, alias: &str) -> Vec<Vec<u8>> {
    let dir = pool_new_dir(t, alias);
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    names.sort();
    names
        .into_iter()
        .filter_map(|p| std::fs::read(p).ok())
        .collect()
}

/// Waits until the alias's pool holds at least `n` messages; panics (with the log) after `WAIT`.
pub async fn wait_pool(t: &Tenso, alias: &str, n: usize) -> Vec<Vec<u8>> {
    let got = crate::common::wait_until(WAIT, || async {
        let m = pool_messages(t, alias);
        (m.len() >= n).then_some(m)
    })
    .await;
    got.unwrap_or_else(|| {
        panic!(
            "pool of {alias}: waited {WAIT:?} for {n} message(s), have {}\nlog:\n{}",
            pool_messages(t, alias).len(),
            t.log()
        )
    })
}

/// `tenso queue list --json`, parsed.
pub async fn queue_list(t: &Tenso) -> Vec<serde_json::Value> {
    t.queue_list().await
}

/// `tenso queue show ID --json`, parsed.
pub async fn queue_show(t: &Tenso, id: &str) -> serde_json::Value {
    let out = cli_ok(t, &["queue", "show", id, "--json"]).await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("queue show --json: {e}: {out}"))
}

/// The entry of `id` in a queue listing.
pub fn find_in<'a>(list: &'a [serde_json::Value], id: &str) -> Option<&'a serde_json::Value> {
    list.iter().find(|m| m["id"].as_str() == Some(id))
}

/// Smallest `attempts` over the pending recipients of a queue entry.
pub fn min_attempts(entry: &serde_json::Value) -> u64 {
    entry["recipients"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["state"] == "pending")
        .filter_map(|r| r["attempts"].as_u64())
        .min()
        .unwrap_or(0)
}

/// Waits until every id in `ids` is queued with at least one attempt made on each
/// pending recipient; returns the listing. Panics after `WAIT`.
pub async fn wait_attempted(t: &Tenso, ids: &[String]) -> Vec<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let list = queue_list(t).await;
        if ids
            .iter()
            .all(|id| find_in(&list, id).is_some_and(|e| min_attempts(e) >= 1))
        {
            return list;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!(
                "waited {WAIT:?} for attempts on {ids:?}; queue: {}\nlog:\n{}",
                serde_json::to_string_pretty(&list).unwrap_or_default(),
                t.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the queue is empty; panics after `WAIT`.
pub async fn wait_queue_empty(t: &Tenso) {
    t.wait_queue_empty(WAIT).await
}

/// One DSN taken apart: the top-level headers and the delivery-status groups.
#[derive(Debug)]
pub struct Dsn {
    /// The whole DSN as text.
    pub text: String,
    /// The per-message group of the delivery-status part (`Reporting-MTA`, ...).
    pub per_message: Vec<(String, String)>,
    /// One field list per recipient group (`Final-Recipient`, `Action`, `Status`, ...).
    pub recipients: Vec<Vec<(String, String)>>,
}

impl Dsn {
    /// The value of `name` in the message's top-level header.
    pub fn header(&self, name: &str) -> Option<String> {
        let msg = mail_parser::MessageParser::default().parse(self.text.as_bytes())?;
        msg.header_raw(name).map(|v| unfold(v).trim().to_string())
    }

    /// The recipient group whose Final-Recipient is `addr`.
    pub fn recipient(&self, addr: &str) -> Option<&Vec<(String, String)>> {
        self.recipients.iter().find(|g| {
            field(g, "Final-Recipient").is_some_and(|v| {
                v.split_once(';')
                    .map(|(_, a)| a.trim())
                    .unwrap_or(&v)
                    .eq_ignore_ascii_case(addr)
            })
        })
    }
}

/// The (first) value of `name` in a field list, case-insensitive.
pub fn field(group: &[(String, String)], name: &str) -> Option<String> {
    group
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
}

fn unfold(v: &str) -> String {
    v.replace("\r\n", "").replace('\n', "")
}

/// Parses header fields of one group (unfolding continuation lines).
fn parse_group(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = out.last_mut() {
                last.1.push(' ');
                last.1.push_str(line.trim());
            }
        } else if let Some((n, v)) = line.split_once(':') {
            out.push((n.trim().to_string(), v.trim().to_string()));
        }
    }
    out
}

/// Parses a DSN with mail-parser: it must be multipart/report with
/// report-type=delivery-status and contain a message/delivery-status part.
pub fn parse_dsn(raw: &[u8]) -> Dsn {
    use mail_parser::MimeHeaders;
    let text = String::from_utf8_lossy(raw).into_owned();
    let msg = mail_parser::MessageParser::default()
        .parse(raw)
        .unwrap_or_else(|| panic!("DSN does not parse:\n{text}"));
    let ct = msg
        .content_type()
        .unwrap_or_else(|| panic!("DSN has no Content-Type:\n{text}"));
    assert_eq!(
        (ct.ctype(), ct.subtype()),
        ("multipart", Some("report")),
        "{text}"
    );
    assert_eq!(
        ct.attribute("report-type"),
        Some("delivery-status"),
        "{text}"
    );
    let part = msg
        .parts
        .iter()
        .find(|p| {
            p.content_type().is_some_and(|c| {
                c.ctype().eq_ignore_ascii_case("message")
                    && c.subtype()
                        .is_some_and(|s| s.eq_ignore_ascii_case("delivery-status"))
            })
        })
        .unwrap_or_else(|| panic!("no message/delivery-status part:\n{text}"));
    let status = String::from_utf8_lossy(part.contents()).replace("\r\n", "\n");
    let status = status.replace('\n', "\r\n");
    let mut groups = status
        .split("\r\n\r\n")
        .map(str::trim)
        .filter(|g| !g.is_empty())
        .map(parse_group);
    let per_message = groups.next().unwrap_or_default();
    let recipients = groups.collect();
    Dsn {
        text,
        per_message,
        recipients,
    }
}

/// A TCP listener on `ip:port` that counts accepted connections, optionally writes
/// `greeting` to each, and closes it. For "this host must (not) be contacted" checks.
pub struct Trap {
    pub count: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Trap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Trap {
    pub async fn start(ip: &str, port: u16, greeting: Option<&'static str>) -> Trap {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind((ip.parse::<std::net::IpAddr>().unwrap(), port))
            .await
            .unwrap_or_else(|e| panic!("bind trap on {ip}:{port}: {e}"));
        let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let c = count.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if let Some(g) = greeting {
                    let _ = s.write_all(g.as_bytes()).await;
                }
                let _ = s.shutdown().await;
            }
        });
        Trap { count, task }
    }

    pub fn connections(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[allow(unused_imports)] // not every test binary uses it
pub use crate::common::closed_port;
