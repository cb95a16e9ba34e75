//! One SMTP session: the read loop, command dispatch, and the verbs without a file
//! of their own (EHLO/HELO, RSET, NOOP, VRFY, EXPN, HELP, QUIT).
//!
//! Replies are buffered and written when the client has nothing more pipelined
//! (RFC 2920), so a pipelining client gets every reply, in order, in few packets.

use super::Inbound;
use super::spill::Spill;
use super::stream::Stream;
use crate::forward::Target;
use crate::smtp::Reply;
use crate::smtp::codec::{Frame, Input, Reader};
use smtp_proto::Request;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A DATA transfer is judged for its rate only after this long.
const DATA_RATE_GRACE: Duration = Duration::from_secs(30);

/// The MAIL transaction in progress.
pub(super) struct Transaction {
    pub reverse_path: String,
    pub spf: crate::policy::SpfResults,
    /// Hits of `record` reputation lists, noted on the forwarded copy.
    pub reputation: Vec<crate::policy::reputation::Hit>,
    pub smtputf8: bool,
    pub targets: Vec<Target>,
}

pub(super) struct Session {
    pub ctx: Arc<Inbound>,
    pub peer: SocketAddr,
    pub stream: Stream,
    pub inbuf: Vec<u8>,
    pub outbuf: Vec<u8>,
    /// Commands, or mail data after a 354: the only place input is framed.
    pub reader: Reader,
    pub helo: Option<String>,
    pub esmtp: bool,
    pub tx: Option<Transaction>,
    pub data: Vec<u8>,
    pub errors: u32,
    pub quit: bool,
    /// Messages accepted in this session.
    pub messages: usize,
    /// Delay before each further reply: this client caused "user unknown".
    pub slow: Duration,
    /// STARTTLS was answered 220: upgrade before reading anything else.
    pub starttls: bool,
    /// When DATA started and how many bytes came since (minimum data rate).
    pub data_started: Option<Instant>,
    pub data_bytes: usize,
    /// When the last DATA ended (for the acceptance latency in the log).
    pub data_ended: Option<Instant>,
    /// Whether the message being received continues on disk (see `spill`).
    pub spill: super::spill::Spill,
    /// Decoded bytes after the spill, waiting for the next write to the draft.
    pub tail: Vec<u8>,
    /// Submission state on 587/465; None on port 25.
    pub sub: Option<super::submission::SubSession>,
}

pub(super) async fn refuse(ctx: Arc<Inbound>, mut sock: TcpStream, why: &'static str) {
    let mut out = Vec::new();
    Reply::new(
        421,
        "4.7.0",
        format!("{} {why}, try again later", ctx.cfg.hostname),
    )
    .write_to(&mut out);
    let _ = tokio::time::timeout(Duration::from_secs(5), sock.write_all(&out)).await;
}

pub(super) async fn run(ctx: Arc<Inbound>, sock: TcpStream, peer: SocketAddr) {
    ctx.counters.sessions.fetch_add(1, Ordering::Relaxed);
    tracing::info!(client = %peer.ip(), port = peer.port(), "connect");
    // The penalty after "user unknown": only this client's task waits.
    let penalty = ctx.limiter.penalty(peer.ip());
    if !penalty.is_zero() {
        ctx.counters.penalized.fetch_add(1, Ordering::Relaxed);
        tracing::info!(client = %peer.ip(), delay_ms = penalty.as_millis() as u64, "greeting delayed: earlier unknown recipients");
        tokio::time::sleep(penalty).await;
    }
    serve_stream(ctx, Stream::Plain(sock), peer, None).await;
}

/// Greets and serves one client on `stream` (plain, or TLS from the first byte on
/// 465); `sub` makes it a submission session.
pub(super) async fn serve_stream(
    ctx: Arc<Inbound>,
    stream: Stream,
    peer: SocketAddr,
    sub: Option<super::submission::SubSession>,
) {
    let mut s = Session {
        ctx,
        peer,
        stream,
        inbuf: Vec::with_capacity(4096),
        outbuf: Vec::with_capacity(1024),
        reader: Reader::default(),
        helo: None,
        esmtp: false,
        tx: None,
        data: Vec::new(),
        errors: 0,
        quit: false,
        messages: 0,
        slow: Duration::ZERO,
        starttls: false,
        data_started: None,
        data_bytes: 0,
        data_ended: None,
        spill: Default::default(),
        tail: Vec::new(),
        sub,
    };
    let greeting = Reply::plain(
        220,
        vec![format!("{} ESMTP tenso", s.ctx.cfg.hostname).into()],
    );
    s.reply(greeting);
    let res = s.serve().await;
    match res {
        Ok(()) => tracing::info!(client = %peer.ip(), "disconnect"),
        Err(e) => tracing::info!(client = %peer.ip(), reason = %e, "disconnect"),
    }
}

impl Session {
    pub fn reply(&mut self, r: Reply) {
        if r.code >= 500 {
            self.errors += 1;
        }
        r.write_to(&mut self.outbuf);
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.outbuf.is_empty() {
            self.stream.write_all(&self.outbuf).await?;
            self.outbuf.clear();
        }
        Ok(())
    }

    /// Writes a final 421 and ends the session.
    pub(super) fn close_with(&mut self, r: Reply) {
        self.reply(r);
        self.quit = true;
    }

    async fn serve(&mut self) -> std::io::Result<()> {
        loop {
            self.process_input().await;
            if self.errors >= self.ctx.cfg.limits.max_errors && !self.quit {
                self.ctx
                    .counters
                    .too_many_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(client = %self.peer.ip(), errors = self.errors, "too many errors, closing");
                self.close_with(Reply::new(
                    421,
                    "4.7.0",
                    "too many errors, closing connection",
                ));
            }
            self.flush().await?;
            if self.quit {
                let _ = self.stream.shutdown().await;
                return Ok(());
            }
            if std::mem::take(&mut self.starttls) {
                self.upgrade_tls().await?;
                continue;
            }
            let in_data = self.reader.in_data();
            let timeout = if in_data {
                self.ctx.cfg.smtp.data_timeout
            } else {
                self.ctx.cfg.smtp.command_timeout
            };
            // Idle sessions keep a small buffer; DATA reads in large chunks.
            self.inbuf.reserve(if in_data { 64 * 1024 } else { 4096 });
            let n = match tokio::time::timeout(timeout, self.stream.read_buf(&mut self.inbuf)).await
            {
                Ok(r) => r?,
                Err(_) => {
                    tracing::info!(client = %self.peer.ip(), in_data, "timeout");
                    self.reply(Reply::new(421, "4.4.2", "timeout, closing connection"));
                    self.flush().await?;
                    return Ok(());
                }
            };
            if n == 0 {
                return Ok(());
            }
            if let Some(started) = self.data_started {
                self.data_bytes += n;
                let elapsed = started.elapsed();
                let min = self.ctx.cfg.limits.min_data_rate;
                if elapsed > DATA_RATE_GRACE && (self.data_bytes as u64) < min * elapsed.as_secs() {
                    self.ctx.counters.too_slow.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(client = %self.peer.ip(), bytes = self.data_bytes, secs = elapsed.as_secs(), "DATA slower than the minimum rate, closing");
                    self.reply(Reply::new(
                        421,
                        "4.4.2",
                        "data transfer too slow, closing connection",
                    ));
                    self.flush().await?;
                    return Ok(());
                }
            }
        }
    }

    /// STARTTLS (RFC 3207): everything the client pipelined after the command is
    /// thrown away before the handshake (CVE-2011-0411), and the session starts over.
    async fn upgrade_tls(&mut self) -> std::io::Result<()> {
        if !self.inbuf.is_empty() {
            self.ctx
                .counters
                .starttls_injection
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(client = %self.peer.ip(), bytes = self.inbuf.len(), "discarding data pipelined after STARTTLS");
            self.inbuf.clear();
        }
        self.reader = Reader::default();
        let Some(acceptor) = self.acceptor() else {
            return Err(std::io::Error::other("STARTTLS without TLS configuration"));
        };
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Upgrading) else {
            return Err(std::io::Error::other("STARTTLS on a TLS stream"));
        };
        match tokio::time::timeout(self.ctx.cfg.smtp.command_timeout, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => {
                self.stream = Stream::Tls(Box::new(tls));
                self.helo = None;
                self.esmtp = false;
                self.tx = None;
                tracing::info!(client = %self.peer.ip(), "TLS established");
                Ok(())
            }
            Ok(Err(e)) => {
                tracing::info!(client = %self.peer.ip(), error = %e, "TLS handshake failed");
                Err(e)
            }
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "TLS handshake timeout",
            )),
        }
    }

    /// Handles everything complete in the input buffer.
    async fn process_input(&mut self) {
        loop {
            if self.quit || self.starttls || self.errors >= self.ctx.cfg.limits.max_errors {
                return;
            }
            // Only where the decoded bytes go depends on the spill, never how.
            let out = match self.spill {
                Spill::Memory => &mut self.data,
                _ => &mut self.tail,
            };
            match self.reader.next_input(&mut self.inbuf, out) {
                None => {
                    if self.reader.in_data() {
                        self.spill().await;
                    }
                    return;
                }
                Some(Input::EndOfData(dec)) => {
                    self.data_started = None;
                    if self.sub.is_some() {
                        self.end_of_submission(dec).await;
                    } else {
                        self.end_of_data(dec).await;
                    }
                    if self.inbuf.capacity() > 64 * 1024 && self.inbuf.len() < 4096 {
                        self.inbuf.shrink_to(4096);
                    }
                }
                Some(Input::Command(Frame::TooLong)) => self.reply(Reply::new(
                    500,
                    "5.5.2",
                    "command line too long (512 octets max)",
                )),
                Some(Input::Command(Frame::BareNewline)) => self.reply(Reply::new(
                    500,
                    "5.5.2",
                    "bare CR or LF in command (lines must end with CRLF)",
                )),
                Some(Input::Command(Frame::Line(line))) => {
                    if !self.slow.is_zero() {
                        // This client probed for users: every further reply waits.
                        tokio::time::sleep(self.slow).await;
                    }
                    self.command(line).await
                }
            }
        }
    }

    async fn command(&mut self, line: Vec<u8>) {
        if self.auth_takes(&line) {
            return self.auth_line(line).await;
        }
        let (text, req) = match parse_command(&line) {
            Ok(parsed) => parsed,
            Err(reply) => return self.reply(reply),
        };
        match req {
            Request::Ehlo { host } => self.handle_helo(host, true),
            Request::Helo { host } => self.handle_helo(host, false),
            Request::Mail { from } => self.handle_mail(&text, from).await,
            Request::Rcpt { to } => self.handle_rcpt(&text, to).await,
            Request::Data => self.handle_data(),
            Request::Rset => {
                self.tx = None;
                self.reply(Reply::new(250, "2.0.0", "Ok"));
            }
            Request::Noop { .. } => self.reply(Reply::new(250, "2.0.0", "Ok")),
            Request::Quit => {
                self.reply(Reply::new(221, "2.0.0", "Bye"));
                self.quit = true;
            }
            // VRFY and EXPN would let anyone harvest the alias table.
            Request::Vrfy { .. } => self.reply(Reply::new(
                252,
                "2.5.2",
                "cannot VRFY, but will accept the message and attempt delivery",
            )),
            Request::Expn { .. } => self.reply(Reply::new(502, "5.5.1", "EXPN not available")),
            Request::Help { .. } => self.reply(Reply::new(
                214,
                "2.0.0",
                "commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP",
            )),
            Request::Auth { .. } => self.reply(Reply::new(
                502,
                "5.5.1",
                "no AUTH here: this is a relay for alias domains, not a submission server",
            )),
            Request::StartTls => self.handle_starttls(),
            other => self.reply(Reply::new(
                502,
                "5.5.1",
                format!("{} not implemented", other.name()),
            )),
        }
    }

    /// The TLS of this listener: submission's own, or port 25's `[tls]`.
    fn acceptor(&self) -> Option<tokio_rustls::TlsAcceptor> {
        match &self.sub {
            Some(s) => Some(s.svc.tls.clone()),
            None => self.ctx.tls.clone(),
        }
    }

    fn handle_starttls(&mut self) {
        if self.acceptor().is_none() {
            return self.reply(Reply::new(502, "5.5.1", "STARTTLS not available"));
        }
        if self.stream.is_tls() {
            return self.reply(Reply::new(503, "5.5.1", "TLS already active"));
        }
        if self.tx.is_some() {
            return self.reply(Reply::new(
                503,
                "5.5.1",
                "STARTTLS not allowed inside a transaction",
            ));
        }
        self.reply(Reply::new(220, "2.0.0", "Ready to start TLS"));
        self.starttls = true;
    }

    fn handle_helo(&mut self, host: String, esmtp: bool) {
        // A new EHLO/HELO resets the transaction (RFC 5321 §4.1.4).
        self.tx = None;
        let host: String = host
            .chars()
            .map(|c| if c.is_ascii_graphic() { c } else { '?' })
            .collect();
        self.helo = Some(host);
        self.esmtp = esmtp;
        let name = self.ctx.cfg.hostname.clone();
        if !esmtp {
            self.reply(Reply::new(250, "", name));
            return;
        }
        let mut lines = vec![
            name.into(),
            "PIPELINING".into(),
            format!("SIZE {}", self.ctx.cfg.smtp.max_message_size).into(),
            "8BITMIME".into(),
            "SMTPUTF8".into(),
            "ENHANCEDSTATUSCODES".into(),
        ];
        if self.acceptor().is_some() && !self.stream.is_tls() {
            lines.push("STARTTLS".into());
        }
        self.submission_ehlo(&mut lines);
        self.reply(Reply::plain(250, lines));
    }

    pub(super) fn start_data(&mut self) {
        self.data_started = Some(Instant::now());
        self.data_bytes = 0;
        self.data = Vec::with_capacity(8 * 1024);
        self.spill = Spill::Memory;
        self.tail = Vec::new();
        self.reader.start_data(self.ctx.cfg.smtp.max_message_size);
    }
}

/// Parses one command line (a [`Frame::Line`]: the octets before its CRLF) into its
/// text and request, or the error reply. Pure, so it is fuzzed as the session uses it.
pub fn parse_command(line: &[u8]) -> Result<(String, Request<String>), Reply> {
    let Ok(text) = std::str::from_utf8(line) else {
        return Err(Reply::new(500, "5.5.2", "command is not valid UTF-8"));
    };
    let mut wire = Vec::with_capacity(line.len() + 2);
    wire.extend_from_slice(line);
    wire.extend_from_slice(b"\r\n");
    match Request::parse(&mut wire.iter()) {
        Ok(r) => Ok((text.to_string(), r.into_owned())),
        Err(e) => Err(parse_error_reply(&e, text)),
    }
}

fn parse_error_reply(e: &smtp_proto::Error, line: &str) -> Reply {
    use smtp_proto::Error as E;
    match e {
        E::UnknownCommand => Reply::new(500, "5.5.1", "command unrecognized"),
        E::InvalidSenderAddress => Reply::new(501, "5.1.7", "bad sender address syntax"),
        E::InvalidRecipientAddress => Reply::new(501, "5.1.3", "bad recipient address syntax"),
        E::SyntaxError { syntax } => Reply::new(501, "5.5.4", format!("syntax: {syntax}")),
        E::InvalidParameter { param } => {
            Reply::new(501, "5.5.4", format!("invalid value for parameter {param}"))
        }
        E::UnsupportedParameter { param } => {
            Reply::new(555, "5.5.4", format!("unsupported parameter {param}"))
        }
        _ => {
            tracing::debug!(line, error = ?e, "unparsable command");
            Reply::new(500, "5.5.2", "syntax error")
        }
    }
}
