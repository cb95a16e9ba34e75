//! One outbound SMTP session (mail-send underneath): connect, EHLO, STARTTLS by the
//! configured mode, and transactions with per-recipient outcomes.
//!
//! mail-send gives the building blocks; what it lacks is done here (CRATES.md):
//! opportunistic STARTTLS with a clear-text retry, per-recipient replies (its
//! `send()` stops at the first refused RCPT), PIPELINING of MAIL/RCPT/DATA, and a
//! byte-exact DATA (its writer doubles a final CRLF). Nothing here decides retries.

use crate::config::TlsMode;
use crate::smtp::codec::dot_stuff;
use mail_send::SmtpClient;
use smtp_proto::{
    EXT_8BIT_MIME, EXT_DSN, EXT_PIPELINING, EXT_SIZE, EXT_SMTP_UTF8, EXT_START_TLS, Response,
};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
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
    /// TLS was required and could not be had.
    Tls(String),
    /// The connection broke.
    Io(String),
}

impl std::fmt::Display for SessionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionError::Connect(t) | SessionError::Io(t) | SessionError::Tls(t) => f.write_str(t),
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

/// Opens a session to `addr` with the TLS mode: opportunistic (STARTTLS when offered,
/// certificate not verified, clear text if the handshake fails), required (STARTTLS
/// must succeed — like Postfix's `encrypt` level, no certificate check), or none.
pub async fn open(
    addr: SocketAddr,
    host: &str,
    mode: TlsMode,
    tls: &TlsConnector,
    p: &Params<'_>,
) -> Result<Session, SessionError> {
    let (c, caps, size) = greet(addr, p).await?;
    let offered = caps & EXT_START_TLS != 0;
    if mode == TlsMode::None || !offered {
        if mode == TlsMode::Required {
            return Err(SessionError::Tls(format!(
                "{host} does not offer STARTTLS (tls = required)"
            )));
        }
        return Ok(Session {
            conn: Conn::Plain(c),
            caps,
            max_size: size,
            host: host.into(),
            addr,
        });
    }
    let sni = if host.parse::<std::net::IpAddr>().is_ok() || host.contains('.') {
        host
    } else {
        "localhost"
    };
    match c.start_tls(tls, sni).await {
        Ok(mut t) => {
            t.timeout = p.command_timeout;
            let (caps, size) = ehlo(&mut t, p.helo_name).await?;
            Ok(Session {
                conn: Conn::Tls(Box::new(t)),
                caps,
                max_size: size,
                host: host.into(),
                addr,
            })
        }
        Err(e) if mode == TlsMode::Opportunistic => {
            tracing::info!(host, %addr, error = %err_text(&e), "STARTTLS failed, retrying in clear text");
            let (c, caps, size) = greet(addr, p).await?;
            Ok(Session {
                conn: Conn::Plain(c),
                caps,
                max_size: size,
                host: host.into(),
                addr,
            })
        }
        Err(e) => Err(SessionError::Tls(format!(
            "STARTTLS with {host} failed: {}",
            err_text(&e)
        ))),
    }
}

/// What to send in one transaction.
pub struct Transaction<'a> {
    pub mail_from: &'a str,
    pub rcpts: &'a [String],
    /// The message as it goes out (trace headers already prepended), CRLF lines.
    pub message: &'a [u8],
    pub needs_smtputf8: bool,
    pub eight_bit: bool,
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
    pub fn is_tls(&self) -> bool {
        matches!(self.conn, Conn::Tls(_))
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

    async fn send_data(
        &mut self,
        wire: &[u8],
        timeout: Duration,
    ) -> Result<Response<String>, mail_send::Error> {
        use tokio::io::AsyncWriteExt;
        async fn go<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
            c: &mut SmtpClient<T>,
            wire: &[u8],
        ) -> Result<Response<String>, mail_send::Error> {
            c.stream.write_all(wire).await?;
            c.stream.flush().await?;
            c.read().await
        }
        let fut = async {
            match &mut self.conn {
                Conn::Plain(c) => go(c, wire).await,
                Conn::Tls(c) => go(c.as_mut(), wire).await,
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
        let all = |o: Outcome| vec![o; n];
        if self.caps & EXT_SIZE != 0 && self.max_size > 0 && t.message.len() > self.max_size {
            return (
                all(Outcome::Failed(
                    "5.3.4".into(),
                    format!(
                        "message size {} exceeds {}'s limit of {}",
                        t.message.len(),
                        self.host,
                        self.max_size
                    ),
                )),
                true,
            );
        }
        let utf8 = self.caps & EXT_SMTP_UTF8 != 0;
        if t.needs_smtputf8 && !utf8 {
            // RFC 6531 §3.2: no SMTPUTF8 at the server, no delivery of UTF-8 envelopes.
            return (
                all(Outcome::Failed(
                    "5.6.7".into(),
                    format!("{} does not support SMTPUTF8", self.host),
                )),
                true,
            );
        }
        let eight = self.caps & EXT_8BIT_MIME != 0;
        if t.eight_bit && !eight {
            // RFC 6152 §3: convert or bounce; converting would break DKIM signatures.
            return (
                all(Outcome::Failed(
                    "5.6.3".into(),
                    format!("{} does not accept 8-bit data (no 8BITMIME)", self.host),
                )),
                true,
            );
        }
        let mut params = String::new();
        if self.caps & EXT_SIZE != 0 {
            params.push_str(&format!(" SIZE={}", t.message.len()));
        }
        if t.eight_bit && eight {
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
        let mut cmds = vec![format!("MAIL FROM:<{}>{params}\r\n", t.mail_from)];
        for r in t.rcpts {
            cmds.push(format!("RCPT TO:<{r}>\r\n"));
        }
        let pipelining = self.caps & EXT_PIPELINING != 0;
        let replies: Vec<Response<String>> = if pipelining {
            cmds.push("DATA\r\n".into());
            match self.cmds(&cmds).await {
                Ok(r) => r,
                Err(e) => return (all(Outcome::Deferred("4.4.2".into(), err_text(&e))), false),
            }
        } else {
            let mut out = Vec::new();
            for (i, c) in cmds.iter().enumerate() {
                match self.cmd(c).await {
                    Ok(r) => {
                        let stop = i == 0 && r.code / 100 != 2;
                        out.push(r);
                        if stop {
                            break;
                        }
                    }
                    Err(e) => return (all(Outcome::Deferred("4.4.2".into(), err_text(&e))), false),
                }
            }
            out
        };
        let mail = &replies[0];
        if mail.code / 100 != 2 {
            let o = Outcome::from_reply(mail);
            let ok = self.cmd("RSET\r\n").await.is_ok();
            return (all(o), ok);
        }
        let mut outcomes: Vec<Option<Outcome>> = replies[1..=n.min(replies.len() - 1)]
            .iter()
            .map(|r| {
                if r.code / 100 == 2 {
                    None
                } else {
                    Some(Outcome::from_reply(r))
                }
            })
            .collect();
        outcomes.resize(
            n,
            Some(Outcome::Deferred("4.4.2".into(), "no reply to RCPT".into())),
        );
        let accepted = outcomes.iter().filter(|o| o.is_none()).count();
        let data_reply = if pipelining {
            replies.get(n + 1).cloned()
        } else if accepted > 0 {
            match self.cmd("DATA\r\n").await {
                Ok(r) => Some(r),
                Err(e) => {
                    let o = Outcome::Deferred("4.4.2".into(), err_text(&e));
                    return (
                        outcomes
                            .into_iter()
                            .map(|x| x.unwrap_or_else(|| o.clone()))
                            .collect(),
                        false,
                    );
                }
            }
        } else {
            None
        };
        if accepted == 0 {
            let ok = self.cmd("RSET\r\n").await.is_ok();
            return (
                outcomes
                    .into_iter()
                    .map(|o| o.expect("all refused"))
                    .collect(),
                ok,
            );
        }
        let Some(data_reply) = data_reply else {
            let o = Outcome::Deferred("4.4.2".into(), "no reply to DATA".into());
            return (
                outcomes
                    .into_iter()
                    .map(|x| x.unwrap_or_else(|| o.clone()))
                    .collect(),
                false,
            );
        };
        if data_reply.code != 354 {
            let o = Outcome::from_reply(&data_reply);
            let ok = self.cmd("RSET\r\n").await.is_ok();
            return (
                outcomes
                    .into_iter()
                    .map(|x| x.unwrap_or_else(|| o.clone()))
                    .collect(),
                ok,
            );
        }
        let mut wire = Vec::with_capacity(t.message.len() + t.message.len() / 64 + 8);
        dot_stuff(t.message, &mut wire);
        let (o, usable) = match self.send_data(&wire, data_timeout).await {
            Ok(r) => (Outcome::from_reply(&r), true),
            Err(e) => (Outcome::Deferred("4.4.2".into(), err_text(&e)), false),
        };
        (
            outcomes
                .into_iter()
                .map(|x| x.unwrap_or_else(|| o.clone()))
                .collect(),
            usable,
        )
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn xtext_encoding() {
        assert_eq!(super::xtext("abc+1=2 x"), "abc+2B1+3D2+20x");
    }
}
