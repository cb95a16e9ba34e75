//! A minimal raw SMTP client for tests that speak exact bytes.
//!
//! Every read is bounded by a timeout (default 10 s, see [`RawSmtp::set_timeout`]).
//! Methods without `try_` panic with a clear message on I/O errors and timeouts.
#![allow(dead_code)]

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;

/// Default timeout for connecting and for each read.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Why [`RawSmtp::send_message`] stopped: the step and the server's reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpError {
    /// The step that failed: "EHLO", "MAIL", "RCPT", "DATA", "DOT" or "IO".
    pub stage: &'static str,
    /// The reply code (0 for an I/O error or a timeout).
    pub code: u16,
    /// The reply text (or the I/O error).
    pub text: String,
}

impl fmt::Display for SmtpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed: {} {}", self.stage, self.code, self.text)
    }
}

impl std::error::Error for SmtpError {}

/// Dot-stuffs `data` for DATA and makes sure it ends with CRLF (the `.CRLF` is not added).
pub fn dot_stuff(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 16);
    let mut at_line_start = true;
    for &b in data {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    if !out.ends_with(b"\r\n") {
        if out.ends_with(b"\r") {
            out.push(b'\n');
        } else {
            out.extend_from_slice(b"\r\n");
        }
    }
    out
}

/// A raw SMTP connection with a read buffer; greeting already read by `connect*`.
pub struct RawSmtp {
    stream: Option<Stream>,
    buf: Vec<u8>,
    timeout: Duration,
    /// The server's greeting as read by `connect`/`connect_from` (code, text).
    pub greeting: (u16, String),
    /// The local address of the connection.
    pub local_addr: SocketAddr,
    /// The server address.
    pub peer_addr: SocketAddr,
    ehlo_done: bool,
}

impl RawSmtp {
    /// Connects to `addr` and reads the greeting (see the `greeting` field).
    pub async fn connect(addr: SocketAddr) -> RawSmtp {
        let mut c = Self::connect_no_greeting(addr).await;
        c.greeting = c.read_reply().await;
        c
    }

    /// Connects from `local_ip` (e.g. 127.0.0.2) to `addr` and reads the greeting.
    pub async fn connect_from(local_ip: IpAddr, addr: SocketAddr) -> RawSmtp {
        let sock = match local_ip {
            IpAddr::V4(_) => TcpSocket::new_v4(),
            IpAddr::V6(_) => TcpSocket::new_v6(),
        }
        .expect("create socket");
        sock.bind(SocketAddr::new(local_ip, 0))
            .unwrap_or_else(|e| panic!("bind {local_ip}: {e}"));
        let tcp = tokio::time::timeout(DEFAULT_TIMEOUT, sock.connect(addr))
            .await
            .unwrap_or_else(|_| panic!("connect {local_ip} -> {addr}: timeout"))
            .unwrap_or_else(|e| panic!("connect {local_ip} -> {addr}: {e}"));
        let mut c = Self::from_tcp(tcp);
        c.greeting = c.read_reply().await;
        c
    }

    /// Connects without reading the greeting (for early-talker tests).
    pub async fn connect_no_greeting(addr: SocketAddr) -> RawSmtp {
        let tcp = tokio::time::timeout(DEFAULT_TIMEOUT, TcpStream::connect(addr))
            .await
            .unwrap_or_else(|_| panic!("connect {addr}: timeout"))
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        Self::from_tcp(tcp)
    }

    fn from_tcp(tcp: TcpStream) -> RawSmtp {
        let _ = tcp.set_nodelay(true);
        let local_addr = tcp.local_addr().expect("local_addr");
        let peer_addr = tcp.peer_addr().expect("peer_addr");
        RawSmtp {
            stream: Some(Stream::Plain(tcp)),
            buf: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            greeting: (0, String::new()),
            local_addr,
            peer_addr,
            ehlo_done: false,
        }
    }

    /// Changes the per-read timeout.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// True once STARTTLS succeeded.
    pub fn is_tls(&self) -> bool {
        matches!(self.stream, Some(Stream::Tls(_)))
    }

    fn stream(&mut self) -> io::Result<&mut Stream> {
        self.stream
            .as_mut()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "connection gone"))
    }

    /// Writes raw bytes.
    pub async fn try_send(&mut self, bytes: &[u8]) -> io::Result<()> {
        let t = self.timeout;
        let s = self.stream()?;
        tokio::time::timeout(t, async {
            s.write_all(bytes).await?;
            s.flush().await
        })
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "write timeout"))?
    }

    /// Writes raw bytes; panics on error.
    pub async fn send(&mut self, bytes: &[u8]) {
        if let Err(e) = self.try_send(bytes).await {
            panic!("RawSmtp send to {}: {e}", self.peer_addr);
        }
    }

    /// Reads more bytes into the buffer; `Ok(0)` on EOF.
    async fn fill(&mut self, timeout: Duration) -> io::Result<usize> {
        let mut tmp = [0u8; 8192];
        let s = self.stream()?;
        let n = tokio::time::timeout(timeout, s.read(&mut tmp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "read timeout"))??;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n)
    }

    /// Reads one line (without CRLF/LF).
    async fn read_line(&mut self) -> io::Result<String> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                let s = String::from_utf8_lossy(&line);
                return Ok(s.trim_end_matches(['\r', '\n']).to_string());
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "read timeout"));
            }
            if self.fill(left).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed (unterminated: {:?})",
                        String::from_utf8_lossy(&self.buf)
                    ),
                ));
            }
        }
    }

    /// Reads one (possibly multi-line) reply: (code, texts of all lines joined with `\n`).
    pub async fn try_read_reply(&mut self) -> io::Result<(u16, String)> {
        let mut texts = Vec::new();
        loop {
            let line = self.read_line().await?;
            let code = line
                .get(..3)
                .and_then(|c| c.parse::<u16>().ok())
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("bad reply line {line:?}"),
                    )
                })?;
            let sep = line.as_bytes().get(3).copied();
            texts.push(line.get(4..).unwrap_or("").to_string());
            if sep != Some(b'-') {
                return Ok((code, texts.join("\n")));
            }
        }
    }

    /// Reads one reply; panics on error or timeout.
    pub async fn read_reply(&mut self) -> (u16, String) {
        match self.try_read_reply().await {
            Ok(r) => r,
            Err(e) => panic!("RawSmtp read reply from {}: {e}", self.peer_addr),
        }
    }

    /// Sends `line` (CRLF added unless present) and reads the reply; panics on error.
    pub async fn cmd(&mut self, line: &str) -> (u16, String) {
        let mut bytes = line.as_bytes().to_vec();
        if !bytes.ends_with(b"\r\n") {
            bytes.extend_from_slice(b"\r\n");
        }
        self.send(&bytes).await;
        let r = self.read_reply().await;
        let verb = line
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        if (verb == "EHLO" || verb == "HELO") && r.0 == 250 {
            self.ehlo_done = true;
        }
        r
    }

    /// `cmd` that panics unless the reply code is `expect`; returns the text.
    pub async fn expect(&mut self, line: &str, expect: u16) -> String {
        let (code, text) = self.cmd(line).await;
        assert_eq!(code, expect, "{line:?} got {code} {text}");
        text
    }

    /// EHLO `name` (sent as-is); returns (code, text) and remembers success.
    pub async fn ehlo(&mut self, name: &str) -> (u16, String) {
        self.cmd(&format!("EHLO {name}")).await
    }

    /// Sends STARTTLS, expects 220, and upgrades the stream (EHLO must be sent again).
    pub async fn starttls(
        &mut self,
        config: Arc<ClientConfig>,
        server_name: &str,
    ) -> io::Result<()> {
        let (code, text) = self.cmd("STARTTLS").await;
        if code != 220 {
            return Err(io::Error::other(format!("STARTTLS refused: {code} {text}")));
        }
        self.buf.clear();
        let Some(Stream::Plain(tcp)) = self.stream.take() else {
            return Err(io::Error::other("not a plain connection"));
        };
        let name = ServerName::try_from(server_name.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let tls = tokio::time::timeout(self.timeout, connector.connect(name, tcp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timeout"))??;
        self.stream = Some(Stream::Tls(Box::new(tls)));
        self.ehlo_done = false;
        Ok(())
    }

    /// EHLO (as `client.test`, unless already done), MAIL, RCPTs, DATA with dot-stuffing.
    ///
    /// `data` gets a final CRLF if it lacks one. Recipients refused with a non-2xx reply are
    /// skipped; if none is accepted it sends RSET and returns the last RCPT error. Returns the
    /// final reply to the data on success (any 2xx).
    pub async fn send_message(
        &mut self,
        from: &str,
        rcpts: &[&str],
        data: &[u8],
    ) -> Result<(u16, String), SmtpError> {
        fn err(stage: &'static str, (code, text): (u16, String)) -> SmtpError {
            SmtpError { stage, code, text }
        }
        fn io_err(e: io::Error) -> SmtpError {
            SmtpError {
                stage: "IO",
                code: 0,
                text: e.to_string(),
            }
        }
        if !self.ehlo_done {
            self.try_send(b"EHLO client.test\r\n")
                .await
                .map_err(io_err)?;
            let r = self.try_read_reply().await.map_err(io_err)?;
            if r.0 != 250 {
                return Err(err("EHLO", r));
            }
            self.ehlo_done = true;
        }
        self.try_send(format!("MAIL FROM:<{from}>\r\n").as_bytes())
            .await
            .map_err(io_err)?;
        let r = self.try_read_reply().await.map_err(io_err)?;
        if r.0 / 100 != 2 {
            return Err(err("MAIL", r));
        }
        let mut accepted = 0;
        let mut last_rcpt_err = None;
        for rcpt in rcpts {
            self.try_send(format!("RCPT TO:<{rcpt}>\r\n").as_bytes())
                .await
                .map_err(io_err)?;
            let r = self.try_read_reply().await.map_err(io_err)?;
            if r.0 / 100 == 2 {
                accepted += 1;
            } else {
                last_rcpt_err = Some(err("RCPT", r));
            }
        }
        if accepted == 0 {
            self.try_send(b"RSET\r\n").await.map_err(io_err)?;
            let _ = self.try_read_reply().await.map_err(io_err)?;
            return Err(last_rcpt_err.unwrap_or_else(|| err("RCPT", (0, "no recipients".into()))));
        }
        self.try_send(b"DATA\r\n").await.map_err(io_err)?;
        let r = self.try_read_reply().await.map_err(io_err)?;
        if r.0 != 354 {
            return Err(err("DATA", r));
        }
        let mut body = dot_stuff(data);
        body.extend_from_slice(b".\r\n");
        self.try_send(&body).await.map_err(io_err)?;
        let r = self.try_read_reply().await.map_err(io_err)?;
        if r.0 / 100 != 2 {
            return Err(err("DOT", r));
        }
        Ok(r)
    }

    /// QUIT and read the 221 (errors ignored).
    pub async fn quit(&mut self) {
        if self.try_send(b"QUIT\r\n").await.is_ok() {
            let _ = self.try_read_reply().await;
        }
    }

    /// Waits up to `timeout` for the server to close: true on EOF or a reset, false if
    /// data arrives (kept for the next read) or nothing happens in time.
    pub async fn wait_closed(&mut self, timeout: Duration) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        match self.fill(timeout).await {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != io::ErrorKind::TimedOut,
        }
    }

    /// `wait_closed` with a 1 s bound.
    pub async fn is_closed(&mut self) -> bool {
        self.wait_closed(Duration::from_secs(1)).await
    }
}
