//! One outbound SMTP session (mail-send underneath): connect, EHLO, STARTTLS as the
//! TLS requirement of the attempt demands, and transactions with per-recipient
//! outcomes.
//!
//! mail-send gives the building blocks; what it lacks is done here (CRATES.md):
//! opportunistic STARTTLS with a clear-text retry, per-recipient replies (its
//! `send()` stops at the first refused RCPT), PIPELINING of MAIL/RCPT/DATA, and a
//! byte-exact DATA (its writer doubles a final CRLF). Nothing here decides retries.

use super::certs::{CertCheck, Strictness, Trust};
use super::tls_policy::{Requirement, Security, TlsParams};
use crate::smtp::address::WirePath;
use mail_send::SmtpClient;
use smtp_proto::{
    EXT_8BIT_MIME, EXT_DSN, EXT_PIPELINING, EXT_SIZE, EXT_SMTP_UTF8, EXT_START_TLS, Response,
};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// The result for one recipient of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered(String),
    Deferred(String, String),
    Failed(String, String),
}

impl Outcome {
    fn from_reply(r: &Response<String>) -> Outcome {
        let text = reply_text(r);
        let status = status_of(r);
        match r.code {
            200..=299 => Outcome::Delivered(text),
            400..=499 => Outcome::Deferred(status, text),
            _ => Outcome::Failed(status, text),
        }
    }
}

/// `550 5.1.1 no such user` as one line.
pub fn reply_text(r: &Response<String>) -> String {
    let msg = r.message.replace(['\r', '\n'], " ");
    if r.esc[0] != 0 {
        format!("{} {}.{}.{} {}", r.code, r.esc[0], r.esc[1], r.esc[2], msg)
    } else {
        format!("{} {}", r.code, msg)
    }
}

/// The enhanced status of a reply, or the generic one for its class.
pub fn status_of(r: &Response<String>) -> String {
    if r.esc[0] != 0 {
        format!("{}.{}.{}", r.esc[0], r.esc[1], r.esc[2])
    } else {
        format!("{}.0.0", r.code / 100)
    }
}

/// Why a session could not be used; the caller tries the next host.
#[derive(Debug, Clone)]
pub enum SessionError {
    /// TCP connect failed or timed out: the host is dead for a while.
    Connect(String),
    /// The server refused us (greeting/EHLO); temporary unless it said 5xx.
    Refused { permanent: bool, text: String },
    /// TLS was required and could not be had (text, TLS-RPT result type).
    Tls(String, &'static str),
    /// The connection broke.
    Io(String),
}

impl std::fmt::Display for SessionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionError::Connect(t) | SessionError::Io(t) | SessionError::Tls(t, _) => {
                f.write_str(t)
            }
            SessionError::Refused { text, .. } => f.write_str(text),
        }
    }
}

pub enum Conn {
    Plain(SmtpClient<TcpStream>),
    Tls(Box<SmtpClient<TlsStream<TcpStream>>>),
}

/// An open, greeted session ready for MAIL.
pub struct Session {
    pub conn: Conn,
    pub caps: u32,
    pub max_size: usize,
    pub host: String,
    pub addr: SocketAddr,
    /// Our end of the connection (TLS-RPT `sending-mta-ip`).
    pub local: Option<std::net::IpAddr>,
    /// What the session proved: decides which mail may reuse it.
    pub security: Security,
    /// Counts the session in `tenso_outbound_connections` while it lives.
    pub open: crate::metrics::Open,
}

/// Timeouts and names for opening sessions.
pub struct Params<'a> {
    pub helo_name: &'a str,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
}

fn io(e: mail_send::Error) -> SessionError {
    SessionError::Io(err_text(&e))
}

pub fn err_text(e: &mail_send::Error) -> String {
    match e {
        mail_send::Error::UnexpectedReply(r) => reply_text(r),
        mail_send::Error::Io(e) => format!("I/O error: {e}"),
        mail_send::Error::Tls(e) => format!("TLS error: {e}"),
        mail_send::Error::Timeout => "timeout".to_string(),
        mail_send::Error::UnparseableReply => "unparseable reply or connection closed".into(),
        other => format!("{other:?}"),
    }
}

async fn greet(
    addr: SocketAddr,
    p: &Params<'_>,
) -> Result<(SmtpClient<TcpStream>, u32, usize), SessionError> {
    let mut c = SmtpClient::connect(addr, p.connect_timeout)
        .await
        .map_err(|e| SessionError::Connect(format!("connect to {addr}: {}", err_text(&e))))?;
    c.timeout = p.command_timeout;
    let greeting = tokio::time::timeout(p.command_timeout, c.read())
        .await
        .map_err(|_| SessionError::Io("timeout waiting for greeting".into()))?
        .map_err(io)?;
    if greeting.code != 220 {
        return Err(SessionError::Refused {
            permanent: greeting.code >= 500,
            text: format!("greeting: {}", reply_text(&greeting)),
        });
    }
    let (caps, size) = ehlo(&mut c, p.helo_name).await?;
    Ok((c, caps, size))
}

async fn ehlo<T>(c: &mut SmtpClient<T>, name: &str) -> Result<(u32, usize), SessionError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match c.ehlo(name).await {
        Ok(r) => Ok((r.capabilities, r.size)),
        Err(mail_send::Error::UnexpectedReply(_)) => {
            // RFC 5321 §3.2: fall back to HELO when EHLO is refused.
            let r = c.cmd(format!("HELO {name}\r\n")).await.map_err(io)?;
            if r.code / 100 == 2 {
                Ok((0, 0))
            } else {
                Err(SessionError::Refused {
                    permanent: r.code >= 500,
                    text: format!("HELO: {}", reply_text(&r)),
                })
            }
        }
        Err(e) => Err(io(e)),
    }
}

/// Opens a session to `addr` that meets `req`: clear text for `None`; STARTTLS when
/// offered for `Opportunistic` (any certificate, clear text again if the handshake
/// fails); STARTTLS that must succeed for the others, with the certificate checked
/// as the requirement says (nothing for `Encrypt`, WebPKI for `Verify`, TLSA for
/// `Dane`). Whatever the level, the session records what its certificate proved.
pub async fn open(
    addr: SocketAddr,
    host: &str,
    req: &Requirement,
    trust: &Trust,
    p: &Params<'_>,
) -> Result<Session, SessionError> {
    let (c, caps, size) = greet(addr, p).await?;
    let offered = caps & EXT_START_TLS != 0;
    if *req == Requirement::None || !offered {
        if req.needs_tls() {
            return Err(SessionError::Tls(
                format!("{host} does not offer STARTTLS (TLS is required)"),
                "starttls-not-supported",
            ));
        }
        let tried = *req != Requirement::None;
        return Ok(Session::plain(c, caps, size, host, addr, tried));
    }
    let strictness = match req {
        Requirement::Verify => Strictness::WebPki,
        Requirement::Dane(set) => Strictness::Dane(set.records.clone()),
        _ => Strictness::Record,
    };
    let (connector, check) = trust
        .connector(strictness)
        .map_err(|e| SessionError::Tls(e, "validation-failure"))?;
    let sni = if host.parse::<std::net::IpAddr>().is_ok() || host.contains('.') {
        host
    } else {
        "localhost"
    };
    match c.start_tls(&connector, sni).await {
        Ok(mut t) => {
            t.timeout = p.command_timeout;
            let (caps, size) = ehlo(&mut t, p.helo_name).await?;
            let check = check.lock().clone();
            let security = tls_security(t.tls_connection(), &check, req);
            let local = t.stream.get_ref().0.local_addr().ok().map(|a| a.ip());
            Ok(Session {
                conn: Conn::Tls(Box::new(t)),
                caps,
                max_size: size,
                host: host.into(),
                addr,
                local,
                security,
                open: crate::metrics::Open::outbound(),
            })
        }
        Err(e) if !req.needs_tls() => {
            tracing::info!(host, %addr, error = %err_text(&e), "STARTTLS failed, retrying in clear text");
            let (c, caps, size) = greet(addr, p).await?;
            Ok(Session::plain(c, caps, size, host, addr, true))
        }
        Err(e) => {
            let check = check.lock().clone();
            let (kind, why) = tls_failure(&check, req);
            Err(SessionError::Tls(
                format!("STARTTLS with {host} failed: {why}{}", err_text(&e)),
                kind,
            ))
        }
    }
}

/// What a completed handshake proved.
fn tls_security(conn: &rustls::ClientConnection, check: &CertCheck, req: &Requirement) -> Security {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
        Some(v) => format!("{v:?}"),
        None => "TLS".to_string(),
    };
    let cipher = conn
        .negotiated_cipher_suite()
        .map(|c| format!("{:?}", c.suite()))
        .unwrap_or_default();
    let dane = match (req, &check.dane) {
        (Requirement::Dane(set), Some(Ok(()))) => Some(set.fingerprint),
        _ => None,
    };
    Security {
        tls: Some(TlsParams { version, cipher }),
        starttls_tried: true,
        webpki: check.webpki.clone(),
        dane,
    }
}

/// The TLS-RPT result type and a reason prefix for a failed mandatory handshake.
fn tls_failure(check: &CertCheck, req: &Requirement) -> (&'static str, String) {
    match (req, &check.dane, &check.webpki) {
        (Requirement::Dane(_), Some(Err(e)), _) => ("tlsa-invalid", format!("{e}: ")),
        (Requirement::Verify, _, Some(Err(f))) => (f.result_type(), format!("{f}: ")),
        _ => ("validation-failure", String::new()),
    }
}

/// What to send in one transaction.
pub struct Transaction<'a> {
    /// Paths checked for the wire: nothing else is ever written into MAIL or RCPT.
    pub mail_from: &'a WirePath,
    pub rcpts: &'a [WirePath],
    /// The message as it goes out (trace headers already prepended), CRLF lines.
    /// Whether it needs 8BITMIME is read from its bytes, not from any label.
    pub message: &'a super::outgoing::Outgoing,
    pub needs_smtputf8: bool,
    /// ENVID to send when the server offers DSN (RFC 3461), with RET=HDRS.
    pub env_id: Option<&'a str>,
}

/// RFC 3461 xtext.
pub fn xtext(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

impl Session {
    fn plain(
        c: SmtpClient<TcpStream>,
        caps: u32,
        max_size: usize,
        host: &str,
        addr: SocketAddr,
        starttls_tried: bool,
    ) -> Session {
        Session {
            local: c.stream.local_addr().ok().map(|a| a.ip()),
            conn: Conn::Plain(c),
            caps,
            max_size,
            host: host.into(),
            addr,
            security: Security {
                starttls_tried,
                ..Security::default()
            },
            open: crate::metrics::Open::outbound(),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.conn, Conn::Tls(_))
    }

    /// `TLSv1.3 TLS13_AES_256_GCM_SHA384` or `plain`, for log lines.
    pub fn tls_summary(&self) -> String {
        match &self.security.tls {
            Some(t) => format!("{} {}", t.version, t.cipher),
            None => "plain".into(),
        }
    }

    async fn cmds(&mut self, cmds: &[String]) -> Result<Vec<Response<String>>, mail_send::Error> {
        match &mut self.conn {
            Conn::Plain(c) => c.cmds(cmds).await,
            Conn::Tls(c) => c.cmds(cmds).await,
        }
    }

    async fn cmd(&mut self, cmd: &str) -> Result<Response<String>, mail_send::Error> {
        match &mut self.conn {
            Conn::Plain(c) => c.cmd(cmd).await,
            Conn::Tls(c) => c.cmd(cmd).await,
        }
    }

    /// Sends the message dot-stuffed, streamed in bounded chunks, and reads the reply.
    async fn send_data(
        &mut self,
        msg: &super::outgoing::Outgoing,
        timeout: Duration,
    ) -> Result<Response<String>, mail_send::Error> {
        use tokio::io::AsyncWriteExt;
        async fn go<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
            c: &mut SmtpClient<T>,
            msg: &super::outgoing::Outgoing,
        ) -> Result<Response<String>, mail_send::Error> {
            msg.write_stuffed(&mut c.stream).await?;
            c.stream.flush().await?;
            c.read().await
        }
        let fut = async {
            match &mut self.conn {
                Conn::Plain(c) => go(c, msg).await,
                Conn::Tls(c) => go(c.as_mut(), msg).await,
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| mail_send::Error::Timeout)?
    }

    pub async fn quit(self) {
        let _ = match self.conn {
            Conn::Plain(c) => c.quit().await,
            Conn::Tls(c) => c.quit().await,
        };
    }

    /// Runs one transaction. Returns per-recipient outcomes in `rcpts` order, and
    /// whether the session is still usable for another transaction.
    pub async fn transaction(
        &mut self,
        t: &Transaction<'_>,
        data_timeout: Duration,
    ) -> (Vec<Outcome>, bool) {
        let n = t.rcpts.len();
        let eight_bit = t.message.eight_bit();
        if let Some(o) = self.refusal(t, eight_bit) {
            return (vec![o; n], true);
        }
        let envelope = match self.envelope(t, eight_bit).await {
            Ok(e) => e,
            Err(o) => return (vec![o; n], false),
        };
        let EnvelopeReplies {
            mail,
            outcomes,
            data,
        } = envelope;
        let accepted = outcomes.iter().filter(|o| o.is_none()).count();
        let opened = data.as_ref().is_some_and(|r| r.code == 354);
        if mail.code / 100 != 2 || accepted == 0 {
            // RFC 2920 §3.1: a server that still answered 354 to the pipelined DATA
            // gets a lone dot, so it is in command state again; nothing counts as
            // delivered whatever it answers to that.
            let usable = (!opened || self.lone_dot(data_timeout).await)
                && self.cmd("RSET\r\n").await.is_ok();
            if mail.code / 100 != 2 {
                // The RCPT replies after a refused MAIL say nothing about the recipients.
                return (vec![Outcome::from_reply(&mail); n], usable);
            }
            // Every RCPT was refused: each keeps its own reply.
            return (outcomes.into_iter().flatten().collect(), usable);
        }
        let Some(data) = data else {
            let o = Outcome::Deferred("4.4.2".into(), "no reply to DATA".into());
            return (fill(outcomes, &o), false);
        };
        if !opened {
            let o = Outcome::from_reply(&data);
            let ok = self.cmd("RSET\r\n").await.is_ok();
            return (fill(outcomes, &o), ok);
        }
        let (o, usable) = match self.send_data(t.message, data_timeout).await {
            Ok(r) => (Outcome::from_reply(&r), true),
            Err(e) => (Outcome::Deferred("4.4.2".into(), err_text(&e)), false),
        };
        (fill(outcomes, &o), usable)
    }

    /// What this server cannot take at all, decided before MAIL.
    fn refusal(&self, t: &Transaction<'_>, eight_bit: bool) -> Option<Outcome> {
        if self.caps & EXT_SIZE != 0 && self.max_size > 0 && t.message.len() > self.max_size {
            return Some(Outcome::Failed(
                "5.3.4".into(),
                format!(
                    "message size {} exceeds {}'s limit of {}",
                    t.message.len(),
                    self.host,
                    self.max_size
                ),
            ));
        }
        if t.needs_smtputf8 && self.caps & EXT_SMTP_UTF8 == 0 {
            // RFC 6531 §3.2: no SMTPUTF8 at the server, no delivery of UTF-8 envelopes.
            return Some(Outcome::Failed(
                "5.6.7".into(),
                format!("{} does not support SMTPUTF8", self.host),
            ));
        }
        if eight_bit && self.caps & EXT_8BIT_MIME == 0 {
            // RFC 6152 §3: convert or bounce; converting would break DKIM signatures.
            // Only octets above 127 count: a 7-bit message labelled 8BITMIME goes out.
            return Some(Outcome::Failed(
                "5.6.3".into(),
                format!("{} does not accept 8-bit data (no 8BITMIME)", self.host),
            ));
        }
        None
    }

    /// MAIL, RCPT and DATA command lines; BODY=8BITMIME only for 8-bit content.
    fn commands(&self, t: &Transaction<'_>, eight_bit: bool) -> Vec<String> {
        let mut params = String::new();
        if self.caps & EXT_SIZE != 0 {
            params.push_str(&format!(" SIZE={}", t.message.len()));
        }
        if eight_bit {
            params.push_str(" BODY=8BITMIME");
        }
        if t.needs_smtputf8 {
            params.push_str(" SMTPUTF8");
        }
        if self.caps & EXT_DSN != 0
            && let Some(id) = t.env_id
        {
            params.push_str(&format!(" RET=HDRS ENVID={}", xtext(id)));
        }
        let mut cmds = vec![format!("MAIL FROM:{}{params}\r\n", t.mail_from)];
        for r in t.rcpts {
            cmds.push(format!("RCPT TO:{r}\r\n"));
        }
        cmds
    }

    /// Sends MAIL, the RCPTs and DATA — in one go with PIPELINING, else one by one,
    /// stopping after a refused MAIL and leaving DATA out when no RCPT was accepted.
    /// An error is the outcome for every recipient (the session is lost).
    async fn envelope(
        &mut self,
        t: &Transaction<'_>,
        eight_bit: bool,
    ) -> Result<EnvelopeReplies, Outcome> {
        let n = t.rcpts.len();
        let lost = |e: mail_send::Error| Outcome::Deferred("4.4.2".into(), err_text(&e));
        let mut cmds = self.commands(t, eight_bit);
        let mut replies = if self.caps & EXT_PIPELINING != 0 {
            cmds.push("DATA\r\n".into());
            self.cmds(&cmds).await.map_err(lost)?
        } else {
            let mut out = Vec::new();
            for c in &cmds {
                let r = self.cmd(c).await.map_err(lost)?;
                let refused_mail = out.is_empty() && r.code / 100 != 2;
                out.push(r);
                if refused_mail {
                    break;
                }
            }
            out
        };
        let data = (replies.len() > n + 1).then(|| replies.remove(n + 1));
        let mut rest = replies.into_iter();
        let mail = rest
            .next()
            .ok_or_else(|| Outcome::Deferred("4.4.2".into(), "no reply to MAIL".into()))?;
        let mut outcomes: Vec<Option<Outcome>> = rest
            .map(|r| (r.code / 100 != 2).then(|| Outcome::from_reply(&r)))
            .collect();
        outcomes.resize(
            n,
            Some(Outcome::Deferred("4.4.2".into(), "no reply to RCPT".into())),
        );
        let accepted = outcomes.iter().any(|o| o.is_none());
        let data = match data {
            Some(d) => Some(d),
            None if mail.code / 100 == 2 && accepted => {
                Some(self.cmd("DATA\r\n").await.map_err(lost)?)
            }
            None => None,
        };
        Ok(EnvelopeReplies {
            mail,
            outcomes,
            data,
        })
    }

    /// Ends a DATA the server opened although nothing is to be sent: a lone `.`
    /// (RFC 2920 §3.1). True when the server answered it and the session goes on.
    async fn lone_dot(&mut self, timeout: Duration) -> bool {
        // An empty message, stuffed, is exactly the lone `.CRLF`.
        let empty = super::outgoing::Outgoing::memory(Vec::new());
        match self.send_data(&empty, timeout).await {
            Ok(r) => {
                tracing::debug!(host = %self.host, reply = %reply_text(&r), "lone dot after a DATA opened for no recipient");
                true
            }
            Err(e) => {
                tracing::info!(host = %self.host, error = %err_text(&e), "no reply to the lone dot");
                false
            }
        }
    }
}

/// The replies to MAIL, each RCPT (None = accepted) and DATA (if it was sent).
struct EnvelopeReplies {
    mail: Response<String>,
    outcomes: Vec<Option<Outcome>>,
    data: Option<Response<String>>,
}

/// Every recipient without an outcome of its own gets `o`.
fn fill(outcomes: Vec<Option<Outcome>>, o: &Outcome) -> Vec<Outcome> {
    outcomes
        .into_iter()
        .map(|x| x.unwrap_or_else(|| o.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn xtext_encoding() {
        assert_eq!(super::xtext("abc+1=2 x"), "abc+2B1+3D2+20x");
    }
}
