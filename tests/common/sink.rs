//! A recording SMTP server ("sink") for tests, written directly on tokio.
//!
//! It binds 127.0.0.1:0, serves any number of concurrent connections and any number of
//! transactions per connection (RSET, MAIL again, PIPELINING, QUIT), and records every
//! transaction that reaches the end of DATA as a [`Delivered`]. Capabilities and replies
//! are set with [`SinkBuilder`]; by default everything is accepted.
//!
//! ```ignore
//! let sink = TestSink::builder()
//!     .rcpt_policy(|rcpt, attempt| if attempt == 1 { Reply::new(450, "4.2.0 try later") } else { Reply::ok() })
//!     .start()
//!     .await;
//! let msgs = sink.wait_for(1, Duration::from_secs(10)).await;
//! ```
#![allow(dead_code)]

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// Idle time after which the sink drops a silent connection.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest command line accepted (bytes).
const MAX_COMMAND_LINE: usize = 64 * 1024;
/// Longest data line accepted (bytes); a longer one drops the connection.
const MAX_DATA_LINE: usize = 64 * 1024 * 1024;
/// Default `SIZE` limit advertised and enforced (50 MiB).
pub const DEFAULT_SIZE_LIMIT: u64 = 50 * 1024 * 1024;

/// One SMTP reply: a code and its text (text lines separated by `\n` become a multi-line reply).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Reply code, e.g. 250. Code 0 means "close the connection without replying".
    pub code: u16,
    /// Reply text after the code (enhanced status code included by the caller if wanted).
    pub text: String,
}

impl Reply {
    /// A reply with the given code and text, e.g. `Reply::new(450, "4.2.0 try later")`.
    pub fn new(code: u16, text: impl Into<String>) -> Reply {
        Reply {
            code,
            text: text.into(),
        }
    }

    /// `250 2.0.0 OK`.
    pub fn ok() -> Reply {
        Reply::new(250, "2.0.0 OK")
    }

    /// `451 4.3.0 try again later` (a temporary failure).
    pub fn tempfail() -> Reply {
        Reply::new(451, "4.3.0 try again later")
    }

    /// `550 5.1.1 user unknown` (a permanent failure).
    pub fn reject() -> Reply {
        Reply::new(550, "5.1.1 user unknown")
    }

    /// `421 4.3.2 closing connection`: sent, then the sink closes the connection.
    pub fn shutdown() -> Reply {
        Reply::new(421, "4.3.2 closing connection")
    }

    /// Close the connection at once without sending any reply.
    pub fn hangup() -> Reply {
        Reply::new(0, "")
    }

    /// True for 2xx and 3xx codes.
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// True when the sink closes the connection after (or instead of) this reply.
    fn closes(&self) -> bool {
        self.code == 0 || self.code == 421
    }

    /// The reply as it goes on the wire (multi-line when the text contains `\n`).
    pub fn to_wire(&self) -> Vec<u8> {
        if self.code == 0 {
            return Vec::new();
        }
        let lines: Vec<&str> = self
            .text
            .split('\n')
            .map(|l| l.trim_end_matches('\r'))
            .collect();
        let mut out = String::new();
        for (i, line) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            out.push_str(&format!("{}{}{}\r\n", self.code, sep, line));
        }
        out.into_bytes()
    }
}

/// A transaction that reached the end of DATA.
#[derive(Clone, Debug)]
pub struct Delivered {
    /// Argument of the last EHLO/HELO of the session ("" if none).
    pub helo: String,
    /// Reverse path without brackets ("" for the null sender `<>`).
    pub mail_from: String,
    /// Raw text after the `<address>` on MAIL FROM (e.g. `SIZE=123 BODY=8BITMIME`), trimmed.
    pub mail_params: String,
    /// Accepted recipients, without brackets, in order.
    pub rcpts: Vec<String>,
    /// Raw parameters of each accepted RCPT (parallel to `rcpts`, e.g. `NOTIFY=FAILURE`).
    pub rcpt_params: Vec<String>,
    /// Message bytes after dot-unstuffing, without the final `.CRLF` (ends with the last line's CRLF).
    pub data: Vec<u8>,
    /// Whether the session was under STARTTLS.
    pub tls: bool,
    /// The client's address.
    pub peer: SocketAddr,
    /// The final reply the sink gave to the DATA (2xx means accepted).
    pub data_reply: Reply,
    /// Number of the connection (1-based, in accept order) that carried this transaction.
    pub conn_id: u64,
}

impl Delivered {
    /// The message as (lossy) UTF-8 text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }

    /// Value of the first header named `name` (case-insensitive, unfolded, trimmed).
    pub fn header(&self, name: &str) -> Option<String> {
        let text = self.text();
        let mut found: Option<String> = None;
        for line in text.split("\r\n") {
            if line.is_empty() {
                break;
            }
            if line.starts_with([' ', '\t']) {
                if let Some(v) = found.as_mut() {
                    v.push(' ');
                    v.push_str(line.trim());
                }
                continue;
            }
            if found.is_some() {
                break;
            }
            if let Some((n, v)) = line.split_once(':')
                && n.trim().eq_ignore_ascii_case(name)
            {
                found = Some(v.trim().to_string());
            }
        }
        found
    }
}

/// Closure deciding the RCPT reply from (recipient, attempt number for it, starting at 1).
pub type RcptPolicy = Arc<dyn Fn(&str, u32) -> Reply + Send + Sync>;
/// Closure deciding the final DATA reply from (transaction, transaction number starting at 1).
pub type DataPolicy = Arc<dyn Fn(&Delivered, u64) -> Reply + Send + Sync>;

/// Configuration of a [`TestSink`]; defaults: all extensions on except STARTTLS, accept all.
#[derive(Clone)]
pub struct SinkBuilder {
    hostname: String,
    greeting: Reply,
    tls: Option<Arc<ServerConfig>>,
    tls_broken: bool,
    size: Option<u64>,
    eightbitmime: bool,
    smtputf8: bool,
    dsn: bool,
    pipelining: bool,
    enhanced_status_codes: bool,
    mail_reply: Option<Reply>,
    rcpt_policy: RcptPolicy,
    data_policy: DataPolicy,
    data_delay: Option<Duration>,
    open_data_without_recipients: bool,
}

impl SinkBuilder {
    /// Host name used in the greeting and EHLO reply (default `sink.test`).
    pub fn hostname(mut self, name: &str) -> Self {
        self.hostname = name.to_string();
        self.greeting = Reply::new(220, format!("{name} ESMTP test sink"));
        self
    }

    /// Replaces the 220 greeting (e.g. `Reply::new(421, ...)` to refuse the session,
    /// `Reply::new(554, ...)` to answer 503 to everything but QUIT).
    pub fn greeting(mut self, reply: Reply) -> Self {
        self.greeting = reply;
        self
    }

    /// Advertises and serves STARTTLS with this rustls config.
    pub fn starttls(mut self, config: Arc<ServerConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// Advertises STARTTLS, answers `220 2.0.0 go ahead`, then sends garbage and closes.
    pub fn tls_broken(mut self) -> Self {
        self.tls_broken = true;
        self
    }

    /// `SIZE n` (enforced on MAIL's SIZE= and on the received data); `None` hides SIZE.
    pub fn size(mut self, limit: Option<u64>) -> Self {
        self.size = limit;
        self
    }

    /// Advertise 8BITMIME or not (default on).
    pub fn eightbitmime(mut self, on: bool) -> Self {
        self.eightbitmime = on;
        self
    }

    /// Advertise SMTPUTF8 or not (default on).
    pub fn smtputf8(mut self, on: bool) -> Self {
        self.smtputf8 = on;
        self
    }

    /// Advertise DSN or not (default on).
    pub fn dsn(mut self, on: bool) -> Self {
        self.dsn = on;
        self
    }

    /// Advertise PIPELINING or not (default on; pipelined input is handled either way).
    pub fn pipelining(mut self, on: bool) -> Self {
        self.pipelining = on;
        self
    }

    /// Advertise ENHANCEDSTATUSCODES or not (default on).
    pub fn enhanced_status_codes(mut self, on: bool) -> Self {
        self.enhanced_status_codes = on;
        self
    }

    /// A fixed reply to every MAIL FROM (default `250 2.1.0 OK`).
    pub fn mail_reply(mut self, reply: Reply) -> Self {
        self.mail_reply = Some(reply);
        self
    }

    /// RCPT reply policy: `f(recipient, attempt)` where attempt counts RCPTs for that
    /// recipient over the sink's whole life, starting at 1 (default: `250 2.1.5 OK`).
    pub fn rcpt_policy(mut self, f: impl Fn(&str, u32) -> Reply + Send + Sync + 'static) -> Self {
        self.rcpt_policy = Arc::new(f);
        self
    }

    /// Final DATA reply policy: `f(transaction, number)` (default `250 2.0.0 queued as N`).
    pub fn data_policy(
        mut self,
        f: impl Fn(&Delivered, u64) -> Reply + Send + Sync + 'static,
    ) -> Self {
        self.data_policy = Arc::new(f);
        self
    }

    /// Answers 354 to DATA even when no RCPT of the transaction was accepted, as some
    /// servers do despite RFC 2920 §3.1; the client must then send a lone `.`. What
    /// comes before that dot is recorded as a transaction without recipients, answered
    /// `554 5.5.1 no valid recipients` (so [`TestSink::messages`] never lists it).
    pub fn open_data_without_recipients(mut self, on: bool) -> Self {
        self.open_data_without_recipients = on;
        self
    }

    /// Waits this long after the final `.` before replying (for client timeout tests).
    pub fn data_delay(mut self, delay: Duration) -> Self {
        self.data_delay = Some(delay);
        self
    }

    /// Binds 127.0.0.1:0 and starts accepting connections.
    pub async fn start(self) -> TestSink {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sink");
        let addr = listener.local_addr().expect("sink local_addr");
        let state = Arc::new(SinkState::default());
        let cfg = Arc::new(self);
        let task = tokio::spawn(accept_loop(listener, cfg, state.clone()));
        TestSink { addr, state, task }
    }
}

#[derive(Default)]
struct SinkState {
    transactions: Mutex<Vec<Delivered>>,
    rcpt_attempts: Mutex<HashMap<String, u32>>,
    connections: AtomicU64,
    txn_counter: AtomicU64,
}

/// A running recording SMTP server; stopped (with all its connections) when dropped.
pub struct TestSink {
    addr: SocketAddr,
    state: Arc<SinkState>,
    task: JoinHandle<()>,
}

impl Drop for TestSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestSink {
    /// A builder with the defaults (all extensions but STARTTLS, accept everything).
    pub fn builder() -> SinkBuilder {
        SinkBuilder {
            hostname: "sink.test".into(),
            greeting: Reply::new(220, "sink.test ESMTP test sink"),
            tls: None,
            tls_broken: false,
            size: Some(DEFAULT_SIZE_LIMIT),
            eightbitmime: true,
            smtputf8: true,
            dsn: true,
            pipelining: true,
            enhanced_status_codes: true,
            mail_reply: None,
            rcpt_policy: Arc::new(|_, _| Reply::new(250, "2.1.5 OK")),
            data_policy: Arc::new(|_, n| Reply::new(250, format!("2.0.0 queued as {n}"))),
            data_delay: None,
            open_data_without_recipients: false,
        }
    }

    /// Starts a sink with the defaults.
    pub async fn start() -> TestSink {
        Self::builder().start().await
    }

    /// The listening address (127.0.0.1:PORT).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The listening port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Number of TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Number of transactions that reached the end of DATA (accepted or not).
    pub fn transactions(&self) -> u64 {
        self.state.transactions.lock().unwrap().len() as u64
    }

    /// The accepted messages (final DATA reply 2xx), in arrival order.
    pub fn messages(&self) -> Vec<Delivered> {
        self.state
            .transactions
            .lock()
            .unwrap()
            .iter()
            .filter(|d| d.data_reply.is_positive())
            .cloned()
            .collect()
    }

    /// Every transaction that reached the end of DATA, whatever the final reply.
    pub fn all_transactions(&self) -> Vec<Delivered> {
        self.state.transactions.lock().unwrap().clone()
    }

    /// How many times RCPT TO was given for `rcpt` (exact address as sent, without brackets).
    pub fn rcpt_attempts(&self, rcpt: &str) -> u32 {
        self.state
            .rcpt_attempts
            .lock()
            .unwrap()
            .get(rcpt)
            .copied()
            .unwrap_or(0)
    }

    /// Waits until at least `n` messages were accepted; panics after `timeout`, naming what arrived.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Delivered> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let msgs = self.messages();
            if msgs.len() >= n {
                return msgs;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "sink {}: waited {:?} for {} accepted message(s), got {}; connections={}, \
                     transactions (any reply)={}:\n{}",
                    self.addr,
                    timeout,
                    n,
                    msgs.len(),
                    self.connections(),
                    self.transactions(),
                    self.describe()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until at least `n` connections were accepted; panics after `timeout`.
    pub async fn wait_for_connections(&self, n: u64, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.connections() < n {
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "sink {}: waited {:?} for {} connection(s), got {}",
                    self.addr,
                    timeout,
                    n,
                    self.connections()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One line per recorded transaction, for failure messages.
    pub fn describe(&self) -> String {
        let all = self.all_transactions();
        if all.is_empty() {
            return "  (no transactions)".into();
        }
        all.iter()
            .map(|d| {
                format!(
                    "  conn {} from {} tls={} MAIL FROM:<{}> {} RCPT {:?}, {} bytes, reply {} {}",
                    d.conn_id,
                    d.peer,
                    d.tls,
                    d.mail_from,
                    d.mail_params,
                    d.rcpts,
                    d.data.len(),
                    d.data_reply.code,
                    d.data_reply.text
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

async fn accept_loop(listener: TcpListener, cfg: Arc<SinkBuilder>, state: Arc<SinkState>) {
    let mut conns = JoinSet::new();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let conn_id = state.connections.fetch_add(1, Ordering::SeqCst) + 1;
        let ctx = ConnCtx {
            cfg: cfg.clone(),
            state: state.clone(),
            peer,
            conn_id,
        };
        conns.spawn(serve_connection(stream, ctx));
        while conns.try_join_next().is_some() {}
    }
}

struct ConnCtx {
    cfg: Arc<SinkBuilder>,
    state: Arc<SinkState>,
    peer: SocketAddr,
    conn_id: u64,
}

async fn serve_connection(stream: TcpStream, ctx: ConnCtx) {
    let _ = stream.set_nodelay(true);
    let Some(tcp) = session(stream, false, &ctx).await else {
        return;
    };
    if ctx.cfg.tls_broken {
        let mut tcp = tcp;
        let _ = tcp
            .write_all(b"\x15garbage, this is not a TLS handshake\r\n")
            .await;
        let _ = tcp.shutdown().await;
        return;
    }
    let Some(tls_cfg) = ctx.cfg.tls.clone() else {
        return;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls_cfg);
    if let Ok(Ok(tls)) = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
        let _ = session(tls, true, &ctx).await;
    }
}

/// Buffered line reader that leaves unread bytes (pipelined commands) in its buffer.
struct LineReader {
    buf: Vec<u8>,
    start: usize,
}

impl LineReader {
    fn new() -> Self {
        LineReader {
            buf: Vec::with_capacity(16 * 1024),
            start: 0,
        }
    }

    /// Next line including its terminator: CRLF only, or also a bare LF when `bare_lf`.
    /// `Ok(None)` on EOF (a partial last line is dropped).
    async fn next_line<S: AsyncRead + Unpin>(
        &mut self,
        io: &mut S,
        bare_lf: bool,
        max: usize,
    ) -> io::Result<Option<Vec<u8>>> {
        let mut scanned = 0;
        loop {
            let hay = &self.buf[self.start..];
            let found = if bare_lf {
                hay[scanned..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map(|p| p + scanned)
            } else {
                hay[scanned..]
                    .windows(2)
                    .position(|w| w == b"\r\n")
                    .map(|p| p + scanned + 1)
            };
            if let Some(end) = found {
                let line = hay[..=end].to_vec();
                self.start += end + 1;
                return Ok(Some(line));
            }
            if hay.len() > max {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
            }
            scanned = hay.len().saturating_sub(1);
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            let mut tmp = [0u8; 16 * 1024];
            let n = tokio::time::timeout(IDLE_TIMEOUT, io.read(&mut tmp))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "idle timeout"))??;
            if n == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }
}

#[derive(Default)]
struct Txn {
    active: bool,
    mail_from: String,
    mail_params: String,
    rcpts: Vec<String>,
    rcpt_params: Vec<String>,
}

/// Splits `<addr> params` into (addr, params); quotes may hide a '>'.
fn parse_path(s: &str) -> Option<(String, String)> {
    let s = s.trim_start();
    if let Some(rest) = s.strip_prefix('<') {
        let mut in_quote = false;
        let mut escaped = false;
        for (i, c) in rest.char_indices() {
            if escaped {
                escaped = false;
                continue;
            }
            match c {
                '\\' if in_quote => escaped = true,
                '"' => in_quote = !in_quote,
                '>' if !in_quote => {
                    return Some((rest[..i].to_string(), rest[i + 1..].trim().to_string()));
                }
                _ => {}
            }
        }
        None
    } else {
        // Lenient: an address without brackets, up to the first space.
        let (addr, params) = s.split_once(' ').unwrap_or((s, ""));
        if addr.is_empty() {
            None
        } else {
            Some((addr.to_string(), params.trim().to_string()))
        }
    }
}

/// Strips a case-insensitive `FROM:`/`TO:` prefix.
fn strip_keyword<'a>(arg: &'a str, kw: &str) -> Option<&'a str> {
    if arg.len() >= kw.len() && arg[..kw.len()].eq_ignore_ascii_case(kw) {
        Some(&arg[kw.len()..])
    } else {
        None
    }
}

/// Finds `NAME=value` among space-separated ESMTP params (case-insensitive name).
fn param_value<'a>(params: &'a str, name: &str) -> Option<&'a str> {
    params.split_whitespace().find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.eq_ignore_ascii_case(name).then_some(v)
    })
}

async fn send<S: AsyncWrite + Unpin>(io: &mut S, reply: &Reply) -> io::Result<()> {
    if reply.code != 0 {
        io.write_all(&reply.to_wire()).await?;
        io.flush().await?;
    }
    Ok(())
}

/// Runs one SMTP session; returns the stream when the client asked for STARTTLS and it
/// should be upgraded, `None` when the session is over.
async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    tls: bool,
    ctx: &ConnCtx,
) -> Option<S> {
    let cfg = &ctx.cfg;
    let mut reader = LineReader::new();
    let mut refused = false;
    if !tls {
        send(&mut io, &cfg.greeting).await.ok()?;
        if cfg.greeting.closes() {
            let _ = io.shutdown().await;
            return None;
        }
        refused = !cfg.greeting.is_positive();
    }
    let offer_tls = !tls && (cfg.tls.is_some() || cfg.tls_broken);
    let mut helo = String::new();
    let mut txn = Txn::default();

    macro_rules! reply {
        ($r:expr) => {{
            let r: Reply = $r;
            if send(&mut io, &r).await.is_err() {
                return None;
            }
            if r.closes() {
                let _ = io.shutdown().await;
                return None;
            }
        }};
    }

    loop {
        let line = match reader.next_line(&mut io, true, MAX_COMMAND_LINE).await {
            Ok(Some(l)) => l,
            Ok(None) => return None,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                let _ = send(&mut io, &Reply::new(500, "5.5.2 line too long")).await;
                return None;
            }
            Err(_) => return None,
        };
        let line = String::from_utf8_lossy(&line);
        let line = line.trim_end_matches(['\r', '\n']);
        let (verb, arg) = line.split_once(' ').unwrap_or((line, ""));
        let verb = verb.to_ascii_uppercase();
        let arg = arg.trim();

        if refused && verb != "QUIT" {
            reply!(Reply::new(503, "5.5.1 no service"));
            continue;
        }

        match verb.as_str() {
            "EHLO" | "HELO" if arg.is_empty() => reply!(Reply::new(501, "5.5.4 hostname required")),
            "EHLO" => {
                helo = arg.to_string();
                txn = Txn::default();
                let mut lines = vec![format!("{} greets {}", cfg.hostname, arg)];
                if cfg.pipelining {
                    lines.push("PIPELINING".into());
                }
                if let Some(n) = cfg.size {
                    lines.push(format!("SIZE {n}"));
                }
                if cfg.eightbitmime {
                    lines.push("8BITMIME".into());
                }
                if cfg.smtputf8 {
                    lines.push("SMTPUTF8".into());
                }
                if cfg.dsn {
                    lines.push("DSN".into());
                }
                if cfg.enhanced_status_codes {
                    lines.push("ENHANCEDSTATUSCODES".into());
                }
                if offer_tls {
                    lines.push("STARTTLS".into());
                }
                reply!(Reply::new(250, lines.join("\n")));
            }
            "HELO" => {
                helo = arg.to_string();
                txn = Txn::default();
                reply!(Reply::new(250, cfg.hostname.clone()));
            }
            "STARTTLS" => {
                if !offer_tls {
                    reply!(Reply::new(502, "5.5.1 STARTTLS not available"));
                } else if !arg.is_empty() {
                    reply!(Reply::new(501, "5.5.4 no parameters allowed"));
                } else {
                    reply!(Reply::new(220, "2.0.0 go ahead"));
                    // Pipelined bytes after STARTTLS are discarded with `reader`.
                    return Some(io);
                }
            }
            "MAIL" => {
                if txn.active {
                    reply!(Reply::new(503, "5.5.1 nested MAIL command"));
                    continue;
                }
                let Some((addr, params)) = strip_keyword(arg, "FROM:").and_then(parse_path) else {
                    reply!(Reply::new(501, "5.5.4 syntax: MAIL FROM:<address>"));
                    continue;
                };
                if let (Some(limit), Some(declared)) = (cfg.size, param_value(&params, "SIZE"))
                    && limit > 0
                    && declared.parse::<u64>().is_ok_and(|d| d > limit)
                {
                    reply!(Reply::new(552, "5.3.4 message size exceeds fixed limit"));
                    continue;
                }
                let r = cfg
                    .mail_reply
                    .clone()
                    .unwrap_or_else(|| Reply::new(250, "2.1.0 OK"));
                if r.is_positive() {
                    txn = Txn {
                        active: true,
                        mail_from: addr,
                        mail_params: params,
                        ..Txn::default()
                    };
                }
                reply!(r);
            }
            "RCPT" => {
                if !txn.active {
                    reply!(Reply::new(503, "5.5.1 need MAIL before RCPT"));
                    continue;
                }
                let Some((addr, params)) = strip_keyword(arg, "TO:").and_then(parse_path) else {
                    reply!(Reply::new(501, "5.5.4 syntax: RCPT TO:<address>"));
                    continue;
                };
                let attempt = {
                    let mut map = ctx.state.rcpt_attempts.lock().unwrap();
                    let n = map.entry(addr.clone()).or_insert(0);
                    *n += 1;
                    *n
                };
                let r = (cfg.rcpt_policy)(&addr, attempt);
                if r.is_positive() {
                    txn.rcpts.push(addr);
                    txn.rcpt_params.push(params);
                }
                reply!(r);
            }
            "DATA" => {
                if !txn.active {
                    reply!(Reply::new(503, "5.5.1 need MAIL before DATA"));
                    continue;
                }
                if txn.rcpts.is_empty() && !cfg.open_data_without_recipients {
                    reply!(Reply::new(554, "5.5.1 no valid recipients"));
                    continue;
                }
                reply!(Reply::new(354, "go ahead, end with <CRLF>.<CRLF>"));
                let mut data = Vec::new();
                loop {
                    match reader.next_line(&mut io, false, MAX_DATA_LINE).await {
                        Ok(Some(l)) => {
                            if l == b".\r\n" {
                                break;
                            }
                            let body = l.strip_prefix(b".").unwrap_or(&l);
                            data.extend_from_slice(body);
                        }
                        _ => return None,
                    }
                }
                let t = std::mem::take(&mut txn);
                let mut delivered = Delivered {
                    helo: helo.clone(),
                    mail_from: t.mail_from,
                    mail_params: t.mail_params,
                    rcpts: t.rcpts,
                    rcpt_params: t.rcpt_params,
                    data,
                    tls,
                    peer: ctx.peer,
                    data_reply: Reply::ok(),
                    conn_id: ctx.conn_id,
                };
                let number = ctx.state.txn_counter.fetch_add(1, Ordering::SeqCst) + 1;
                let r = match cfg.size {
                    _ if delivered.rcpts.is_empty() => Reply::new(554, "5.5.1 no valid recipients"),
                    Some(limit) if limit > 0 && delivered.data.len() as u64 > limit => {
                        Reply::new(552, "5.3.4 message size exceeds fixed limit")
                    }
                    _ => (cfg.data_policy)(&delivered, number),
                };
                if let Some(d) = cfg.data_delay {
                    tokio::time::sleep(d).await;
                }
                delivered.data_reply = r.clone();
                // Recorded after the reply is written, so the client has it when a test sees it.
                let sent = send(&mut io, &r).await;
                ctx.state.transactions.lock().unwrap().push(delivered);
                if sent.is_err() {
                    return None;
                }
                if r.closes() {
                    let _ = io.shutdown().await;
                    return None;
                }
            }
            "RSET" => {
                txn = Txn::default();
                reply!(Reply::ok());
            }
            "NOOP" => reply!(Reply::ok()),
            "QUIT" => {
                let _ = send(&mut io, &Reply::new(221, "2.0.0 bye")).await;
                let _ = io.shutdown().await;
                return None;
            }
            "VRFY" => reply!(Reply::new(252, "2.5.0 cannot VRFY user")),
            "" => reply!(Reply::new(500, "5.5.2 empty command")),
            _ => reply!(Reply::new(502, "5.5.2 command not implemented")),
        }
    }
}
