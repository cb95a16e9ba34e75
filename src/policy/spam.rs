//! The spam judge: rspamd over its HTTP protocol (`POST /checkv2` to the normal worker,
//! `/learnspam` and `/learnham` to the controller), and the verdict tenso acts on.
//!
//! One HTTP/1.1 request per message on a fresh connection (rspamd answers
//! `Connection: close`), built with hyper's client connection API; the envelope goes in
//! rspamd's request headers (`IP`, `Helo`, `Hostname`, `From`, one `Rcpt` each,
//! `Queue-Id`, `MTA-Name`). Every call has a deadline (`[spam] timeout`) and the answer
//! is read up to [`MAX_RESPONSE`] bytes. This module decides nothing about recipients:
//! it returns a [`Verdict`] or a [`SpamError`], and the caller applies each alias's
//! policy. Header values rspamd asks to add are sanitized here (folded, no bare
//! CR/LF, bounded) and only [`ALLOWED_HEADERS`] are ever passed on.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

/// The only headers rspamd may add or remove through `milter.add_headers` /
/// `remove_headers`; the same names arriving from outside are removed first.
pub const ALLOWED_HEADERS: &[&str] = &["X-Spam-Status", "X-Spamd-Result", "X-Spam"];

/// Bound of rspamd's JSON answer (a verdict with every symbol is a few KiB).
pub const MAX_RESPONSE: usize = 1024 * 1024;

/// Bound of one header value taken from rspamd.
const MAX_HEADER_VALUE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SpamError {
    #[error("cannot connect to rspamd at {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("rspamd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("HTTP exchange with rspamd failed: {0}")]
    Http(String),
    #[error("rspamd answered HTTP {0}: {1}")]
    Status(u16, String),
    #[error("rspamd's answer is not a verdict: {0}")]
    Parse(String),
}

/// rspamd's recommended action (protocol names in comments).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `no action`
    NoAction,
    /// `greylist`
    Greylist,
    /// `add header`
    AddHeader,
    /// `rewrite subject`
    RewriteSubject,
    /// `soft reject`
    SoftReject,
    /// `reject`
    Reject,
}

impl Action {
    pub fn parse(s: &str) -> Option<Action> {
        Some(match s {
            "no action" => Action::NoAction,
            "greylist" => Action::Greylist,
            "add header" => Action::AddHeader,
            "rewrite subject" => Action::RewriteSubject,
            "soft reject" => Action::SoftReject,
            "reject" => Action::Reject,
            _ => return None,
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Action::NoAction => "no action",
            Action::Greylist => "greylist",
            Action::AddHeader => "add header",
            Action::RewriteSubject => "rewrite subject",
            Action::SoftReject => "soft reject",
            Action::Reject => "reject",
        }
    }

    /// Spam that the alias's policy decides about.
    pub fn is_spam(&self) -> bool {
        matches!(self, Action::AddHeader | Action::RewriteSubject)
    }
}

/// What rspamd said about one message.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub action: Action,
    pub score: f64,
    pub required: f64,
    /// Headers to add (name, sanitized value), only [`ALLOWED_HEADERS`].
    pub add_headers: Vec<(String, String)>,
    /// Names of headers to remove, only [`ALLOWED_HEADERS`].
    pub remove_headers: Vec<String>,
    /// The highest-scoring symbols, for the log line.
    pub top_symbols: Vec<String>,
}

/// The envelope and context rspamd is told about.
pub struct Envelope<'a> {
    pub ip: IpAddr,
    pub helo: &'a str,
    /// The client's forward-confirmed reverse name, or "unknown".
    pub hostname: &'a str,
    /// The reverse-path, "" for `<>`.
    pub from: &'a str,
    pub rcpts: &'a [String],
    pub queue_id: &'a str,
    /// Our authserv-id: rspamd names itself so in headers it writes.
    pub mta_name: &'a str,
}

/// A client of one rspamd worker (normal or controller).
#[derive(Debug, Clone)]
pub struct Rspamd {
    host: String,
    port: u16,
    prefix: String,
    timeout: Duration,
}

#[derive(Deserialize)]
struct Reply {
    action: String,
    #[serde(default)]
    score: f64,
    #[serde(default)]
    required_score: f64,
    #[serde(default)]
    symbols: BTreeMap<String, Symbol>,
    #[serde(default)]
    milter: Option<Milter>,
}

#[derive(Deserialize)]
struct Symbol {
    #[serde(default)]
    score: f64,
}

#[derive(Deserialize, Default)]
struct Milter {
    #[serde(default)]
    add_headers: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    remove_headers: BTreeMap<String, serde_json::Value>,
}

impl Rspamd {
    /// A client for `url` (`http://host:port[/prefix]`), every call bounded by `timeout`.
    pub fn new(url: &str, timeout: Duration) -> Result<Rspamd, String> {
        let (host, port, prefix) = crate::config::parse_http_url(url)?;
        Ok(Rspamd {
            host,
            port,
            prefix,
            timeout,
        })
    }

    /// Asks the normal worker for a verdict on `msg` (`POST /checkv2`).
    pub async fn check(&self, env: &Envelope<'_>, msg: Bytes) -> Result<Verdict, SpamError> {
        let mut headers: Vec<(&str, String)> = vec![
            ("IP", env.ip.to_string()),
            ("Helo", env.helo.to_string()),
            ("Hostname", env.hostname.to_string()),
            ("From", env.from.to_string()),
            ("Queue-Id", env.queue_id.to_string()),
            ("MTA-Name", env.mta_name.to_string()),
        ];
        headers.extend(env.rcpts.iter().map(|r| ("Rcpt", r.clone())));
        let started = std::time::Instant::now();
        let answer = self.post("/checkv2", &headers, msg).await;
        crate::metrics::metrics()
            .rspamd
            .observe(crate::metrics::since(started));
        let (status, body) = answer?;
        if status != 200 {
            return Err(SpamError::Status(status, excerpt(&body)));
        }
        parse_verdict(&body)
    }

    /// Trains rspamd's classifier (`POST /learnspam` or `/learnham` to the controller).
    /// Returns rspamd's answer as JSON.
    pub async fn learn(
        &self,
        spam: bool,
        password: Option<&str>,
        msg: Bytes,
    ) -> Result<serde_json::Value, SpamError> {
        let path = if spam { "/learnspam" } else { "/learnham" };
        let mut headers = Vec::new();
        if let Some(p) = password {
            headers.push(("Password", p.to_string()));
        }
        let (status, body) = self.post(path, &headers, msg).await?;
        let json: serde_json::Value = serde_json::from_slice(&body)
            .unwrap_or_else(|_| serde_json::json!({ "text": excerpt(&body) }));
        if status != 200 {
            let why = json["error"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| excerpt(&body));
            return Err(SpamError::Status(status, why));
        }
        Ok(json)
    }

    /// One request on a fresh connection, the whole exchange under the deadline.
    async fn post(
        &self,
        path: &str,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> Result<(u16, Bytes), SpamError> {
        let exchange = async {
            let addr = format!("{}:{}", self.host, self.port);
            let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| SpamError::Connect(addr, e))?;
            let _ = tcp.set_nodelay(true);
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .map_err(|e| SpamError::Http(e.to_string()))?;
            // The connection task ends with the exchange; the guard stops it early
            // when the deadline fires.
            let driver = AbortOnDrop(tokio::spawn(conn));
            let req = self.request(path, headers, body)?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| SpamError::Http(e.to_string()))?;
            let status = resp.status().as_u16();
            let body = Limited::new(resp.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| SpamError::Http(format!("reading the answer: {e}")))?
                .to_bytes();
            drop(driver);
            Ok((status, body))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| SpamError::Timeout(self.timeout))?
    }

    fn request(
        &self,
        path: &str,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> Result<Request<Full<Bytes>>, SpamError> {
        let mut b = Request::post(format!("{}{path}", self.prefix))
            .header(hyper::header::HOST, format!("{}:{}", self.host, self.port))
            .header(hyper::header::CONTENT_LENGTH, body.len());
        for (name, value) in headers {
            // Addresses are validated at MAIL/RCPT, so no CR/LF can be here; a value
            // HTTP cannot carry is left out rather than sent mangled.
            match hyper::header::HeaderValue::from_bytes(value.as_bytes()) {
                Ok(v) => b = b.header(*name, v),
                Err(_) => tracing::debug!(header = name, "value not sendable to rspamd, left out"),
            }
        }
        b.body(Full::new(body))
            .map_err(|e| SpamError::Http(e.to_string()))
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn excerpt(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(200)])
        .chars()
        .filter(|c| !c.is_control())
        .collect()
}

/// Parses rspamd's JSON answer into a verdict, keeping only allowed header changes.
pub fn parse_verdict(body: &[u8]) -> Result<Verdict, SpamError> {
    let r: Reply = serde_json::from_slice(body).map_err(|e| SpamError::Parse(e.to_string()))?;
    let action = Action::parse(&r.action).ok_or_else(|| {
        SpamError::Parse(format!("unknown action {:?}", excerpt(r.action.as_bytes())))
    })?;
    let milter = r.milter.unwrap_or_default();
    let allowed = |name: &str| {
        ALLOWED_HEADERS
            .iter()
            .find(|a| a.eq_ignore_ascii_case(name))
    };
    let mut add_headers = Vec::new();
    for (name, v) in &milter.add_headers {
        let Some(canonical) = allowed(name) else {
            continue;
        };
        for value in header_values(v) {
            add_headers.push((canonical.to_string(), sanitize_value(&value)));
        }
    }
    let remove_headers = milter
        .remove_headers
        .keys()
        .filter_map(|n| allowed(n).map(|c| c.to_string()))
        .collect();
    let mut symbols: Vec<(&String, f64)> = r.symbols.iter().map(|(n, s)| (n, s.score)).collect();
    symbols.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()).then(a.0.cmp(b.0)));
    Ok(Verdict {
        action,
        score: r.score,
        required: r.required_score,
        add_headers,
        remove_headers,
        top_symbols: symbols
            .iter()
            .take(5)
            .map(|(n, s)| format!("{}({s:.2})", excerpt(n.as_bytes())))
            .collect(),
    })
}

/// `add_headers` values come as a string, `{"value": …, "order": …}`, or a list of them.
fn header_values(v: &serde_json::Value) -> Vec<String> {
    match v {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Object(o) => o
            .get("value")
            .and_then(|x| x.as_str())
            .map(|s| vec![s.to_string()])
            .unwrap_or_default(),
        serde_json::Value::Array(a) => a.iter().flat_map(header_values).collect(),
        _ => Vec::new(),
    }
}

/// A header value safe to write: each line break becomes CRLF + TAB (a fold), other
/// control characters are dropped, the length is bounded.
pub fn sanitize_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len().min(MAX_HEADER_VALUE));
    for (i, line) in v
        .split(['\r', '\n'])
        .filter(|l| !l.trim().is_empty())
        .enumerate()
    {
        if i > 0 {
            out.push_str("\r\n\t");
        }
        out.extend(line.trim().chars().filter(|c| !c.is_control()));
        if out.len() > MAX_HEADER_VALUE {
            let mut cut = MAX_HEADER_VALUE;
            while !out.is_char_boundary(cut) {
                cut -= 1;
            }
            out.truncate(cut);
            // A cut inside a fold would leave a bare CR or LF at the end.
            while out.ends_with(['\r', '\n', '\t']) {
                out.pop();
            }
            break;
        }
    }
    out
}

/// What happens to the copy for one recipient after the verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Treatment {
    /// Forwarded with the gate's headers (`X-Spam-Status`…; tagged when spam).
    Forward,
    /// Forwarded untouched (the alias's policy is `off`).
    Plain,
    /// Kept in the alias's pool, never forwarded.
    Quarantine,
}

/// The gate's decision for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// `550 5.7.1` at DATA.
    Reject,
    /// `451 4.7.1` at DATA.
    Tempfail,
    /// One treatment per recipient, in the order of the policies given.
    Each(Vec<Treatment>),
}

/// Applies rspamd's action to the recipients' spam policies (see README "Spam gate").
/// A reply at DATA is for the whole message, so `reject` is answered only when every
/// recipient would refuse; the others then quarantine for the refusing aliases.
pub fn decide(action: Action, policies: &[crate::config::SpamPolicy]) -> Decision {
    use crate::config::SpamPolicy as P;
    let off = |p: &P| *p == P::Off;
    let plain_or = |t: Treatment| {
        Decision::Each(
            policies
                .iter()
                .map(|p| if off(p) { Treatment::Plain } else { t })
                .collect(),
        )
    };
    if policies.is_empty() {
        return Decision::Each(Vec::new());
    }
    match action {
        Action::NoAction => plain_or(Treatment::Forward),
        Action::Greylist | Action::SoftReject if policies.iter().all(off) => {
            plain_or(Treatment::Forward)
        }
        Action::Greylist | Action::SoftReject => Decision::Tempfail,
        Action::Reject if policies.iter().any(off) => plain_or(Treatment::Quarantine),
        Action::Reject => Decision::Reject,
        Action::AddHeader | Action::RewriteSubject => {
            if policies.iter().all(|p| *p == P::Reject) {
                return Decision::Reject;
            }
            Decision::Each(
                policies
                    .iter()
                    .map(|p| match p {
                        P::Tag => Treatment::Forward,
                        P::Off => Treatment::Plain,
                        P::Quarantine | P::Reject => Treatment::Quarantine,
                    })
                    .collect(),
            )
        }
    }
}

/// Removes every header field named in [`ALLOWED_HEADERS`] (any case) from the header
/// section of `msg`: a sender must not pre-mark mail as clean. None when none was there.
pub fn strip_spam_headers(msg: &[u8]) -> Option<Vec<u8>> {
    let headers = crate::smtp::header::header_section(msg);
    let spans: Vec<(usize, usize)> = crate::smtp::header::fields_raw(headers)
        .into_iter()
        .filter(|(_, _, name, _)| ALLOWED_HEADERS.iter().any(|a| a.eq_ignore_ascii_case(name)))
        .map(|(start, end, _, _)| (start, end))
        .collect();
    if spans.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(msg.len());
    let mut pos = 0;
    for (start, end) in spans {
        out.extend_from_slice(&msg[pos..start]);
        pos = end;
    }
    out.extend_from_slice(&msg[pos..]);
    Some(out)
}

/// Prefixes the first `Subject:` field's value with `tag` (folding kept as it was);
/// a message without a Subject gets `Subject: tag` after its other header fields.
pub fn tag_subject(msg: &[u8], tag: &str) -> Vec<u8> {
    let headers = crate::smtp::header::header_section(msg);
    let subject = crate::smtp::header::fields_raw(headers)
        .into_iter()
        .find(|(_, _, name, _)| name.eq_ignore_ascii_case("subject"));
    let mut out = Vec::with_capacity(msg.len() + tag.len() + 12);
    match subject {
        Some((start, _, _, _)) => {
            let colon = start
                + msg[start..]
                    .iter()
                    .position(|&b| b == b':')
                    .expect("a field has a colon");
            let mut value = colon + 1;
            while matches!(msg.get(value), Some(b' ' | b'\t')) {
                value += 1;
            }
            out.extend_from_slice(&msg[..colon + 1]);
            out.push(b' ');
            out.extend_from_slice(tag.as_bytes());
            out.push(b' ');
            out.extend_from_slice(&msg[value..]);
        }
        None => {
            out.extend_from_slice(headers);
            out.extend_from_slice(format!("Subject: {tag}\r\n").as_bytes());
            out.extend_from_slice(&msg[headers.len()..]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_keeps_only_allowed_headers() {
        let body = br#"{"is_skipped":false,"score":6.5,"required_score":15.0,"action":"add header",
            "symbols":{"A":{"score":0.5},"B":{"score":6.0}},
            "milter":{"add_headers":{"X-Spam-Status":{"value":"Yes, score=6.50\n\trequired=15","order":0},
                "x-spamd-result":[{"value":"default: False","order":0}],
                "Authentication-Results":{"value":"forged","order":0},
                "X-Spam":"Yes"},
              "remove_headers":{"X-Spam":0,"DKIM-Signature":-1}}}"#;
        let v = parse_verdict(body).unwrap();
        assert_eq!(v.action, Action::AddHeader);
        assert_eq!((v.score, v.required), (6.5, 15.0));
        assert_eq!(
            v.add_headers,
            vec![
                ("X-Spam".to_string(), "Yes".to_string()),
                (
                    "X-Spam-Status".to_string(),
                    "Yes, score=6.50\r\n\trequired=15".to_string()
                ),
                ("X-Spamd-Result".to_string(), "default: False".to_string()),
            ]
        );
        assert_eq!(v.remove_headers, vec!["X-Spam".to_string()]);
        assert_eq!(v.top_symbols, vec!["B(6.00)", "A(0.50)"]);
    }

    #[test]
    fn bad_answers_are_errors() {
        for body in [
            &b"not json"[..],
            br#"{"action":"explode"}"#,
            br#"{"score":1}"#,
        ] {
            assert!(matches!(parse_verdict(body), Err(SpamError::Parse(_))));
        }
    }

    #[test]
    fn actions_round_trip() {
        for a in [
            Action::NoAction,
            Action::Greylist,
            Action::AddHeader,
            Action::RewriteSubject,
            Action::SoftReject,
            Action::Reject,
        ] {
            assert_eq!(Action::parse(a.name()), Some(a));
        }
    }

    #[test]
    fn decisions() {
        use crate::config::SpamPolicy::{Off, Quarantine, Reject, Tag};
        use Treatment::{Forward as F, Plain as P, Quarantine as Q};
        let each = |v: Vec<Treatment>| Decision::Each(v);
        let cases: Vec<(Action, Vec<crate::config::SpamPolicy>, Decision)> = vec![
            (
                Action::NoAction,
                vec![Tag, Off, Reject],
                each(vec![F, P, F]),
            ),
            (
                Action::Reject,
                vec![Tag, Quarantine, Reject],
                Decision::Reject,
            ),
            (Action::Reject, vec![Tag, Off], each(vec![Q, P])),
            (Action::Reject, vec![Off], each(vec![P])),
            (
                Action::AddHeader,
                vec![Tag, Quarantine, Off],
                each(vec![F, Q, P]),
            ),
            (
                Action::RewriteSubject,
                vec![Reject, Reject],
                Decision::Reject,
            ),
            (Action::AddHeader, vec![Reject, Tag], each(vec![Q, F])),
            (Action::Greylist, vec![Off, Tag], Decision::Tempfail),
            (Action::SoftReject, vec![Off, Off], each(vec![P, P])),
            (Action::Reject, vec![], each(vec![])),
        ];
        for (action, policies, want) in cases {
            assert_eq!(decide(action, &policies), want, "{action:?} {policies:?}");
        }
    }

    #[test]
    fn strips_spam_headers_in_the_header_section_only() {
        let m = b"X-Spam: Yes\r\nSubject: s\r\nx-spam-status: No,\r\n score=-5\r\nX-Spamd-Result: x\r\nX-Spam-Flag: kept\r\n\r\nX-Spam: body\r\n";
        let out = strip_spam_headers(m).unwrap();
        assert_eq!(
            out,
            b"Subject: s\r\nX-Spam-Flag: kept\r\n\r\nX-Spam: body\r\n"
        );
        assert!(strip_spam_headers(&out).is_none());
    }

    #[test]
    fn subject_tagging() {
        let m = b"From: a\r\nSubject:  hello\r\n there\r\n\r\nSubject: body\r\n";
        assert_eq!(
            tag_subject(m, "[SPAM]"),
            b"From: a\r\nSubject: [SPAM] hello\r\n there\r\n\r\nSubject: body\r\n"
        );
        assert_eq!(
            tag_subject(b"From: a\r\n\r\nbody\r\n", "[SPAM]"),
            b"From: a\r\nSubject: [SPAM]\r\n\r\nbody\r\n"
        );
    }

    proptest::proptest! {
        /// Stripping removes exactly the spam fields: what remains parses to the same
        /// fields minus those, and the body is untouched.
        #[test]
        fn strip_keeps_everything_else(
            names in proptest::collection::vec(proptest::sample::select(vec!["X-Spam", "x-spam-status", "X-SPAMD-RESULT", "Subject", "X-Spam-Flag", "Received"]), 0..8),
            body in "[a-zA-Z :]{0,20}",
        ) {
            let mut m = String::new();
            for (i, n) in names.iter().enumerate() {
                m.push_str(&format!("{n}: v{i}\r\n"));
                if i % 2 == 0 { m.push_str(" folded\r\n"); }
            }
            m.push_str("\r\n");
            m.push_str(&body);
            let out = strip_spam_headers(m.as_bytes()).unwrap_or_else(|| m.as_bytes().to_vec());
            let fields = |b: &[u8]| crate::smtp::header::fields(crate::smtp::header::header_section(b)).collect::<Vec<_>>();
            let want: Vec<_> = fields(m.as_bytes()).into_iter().filter(|(n, _)| !ALLOWED_HEADERS.iter().any(|a| a.eq_ignore_ascii_case(n))).collect();
            proptest::prop_assert_eq!(fields(&out), want);
            // The header section still ends where it did; the body is untouched.
            let kept = m.len() - out.len();
            let sep = m.find("\r\n\r\n").map_or(0, |p| p + 2);
            proptest::prop_assert_eq!(&out[sep - kept..], &m.as_bytes()[sep..]);
        }
    }

    proptest::proptest! {
        /// Whatever rspamd sends, a sanitized value cannot end a header or start a new
        /// one: every line break is CRLF followed by a TAB, and nothing else is control.
        #[test]
        fn sanitized_values_stay_one_header(v in "\\PC*|[\\x00-\\x7f]*") {
            let s = sanitize_value(&v);
            let b: Vec<char> = s.chars().collect();
            for (i, &c) in b.iter().enumerate() {
                if c == '\r' {
                    proptest::prop_assert!(b.get(i + 1) == Some(&'\n') && b.get(i + 2) == Some(&'\t'));
                } else if c == '\n' {
                    proptest::prop_assert!(i > 0 && b[i - 1] == '\r');
                } else if c != '\t' {
                    proptest::prop_assert!(!c.is_control());
                }
            }
            proptest::prop_assert!(s.len() <= MAX_HEADER_VALUE + 4);
        }
    }
}
