//! MTA-STS (RFC 8461): a destination domain's `_mta-sts` TXT record, its policy
//! fetched over verified HTTPS from `https://mta-sts.<domain>/.well-known/mta-sts.txt`,
//! and the policy cache (kept in the table, honoured for `max_age`).
//!
//! The fetch is bounded: [`FETCH_TIMEOUT`] for the whole exchange, [`MAX_POLICY_BYTES`]
//! for the body, no redirects (RFC 8461 §3.3), status 200 and `text/plain` only.
//! A policy is fetched when the TXT `id` differs from the cached one; a failed fetch
//! keeps the cached policy (§5.1); without one, delivery goes on as if the domain
//! had no policy, and the failure is handed to TLS-RPT. Deciding what a policy asks
//! of a session is `tls_policy`'s job, not this module's.

use super::certs::Trust;
use crate::dns::Resolver;
use crate::table::tls::{StsCacheEntry, TlsStore};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use rustls::pki_types::ServerName;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio_rustls::TlsConnector;

/// Whole policy fetch: DNS, connect, TLS, request and body.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest policy body accepted (RFC 8461 §3.3 suggests 64 KiB).
pub const MAX_POLICY_BYTES: usize = 64 * 1024;
/// Largest `max_age` honoured (RFC 8461 §3.2: 31557600 seconds, one year).
pub const MAX_AGE_LIMIT: u64 = 31_557_600;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    Testing,
    None,
}

/// A parsed policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    /// `mx` patterns, lowercase, without a trailing dot.
    pub mx: Vec<String>,
    pub max_age: u64,
    /// The policy's lines as fetched (TLS-RPT `policy-string`).
    pub lines: Vec<String>,
}

impl Policy {
    /// Does MX host `host` match one of the policy's `mx` patterns (RFC 8461 §4.1)?
    pub fn allows(&self, host: &str) -> bool {
        self.mx.iter().any(|p| mx_matches(p, host))
    }
}

/// `*.example.com` matches exactly one more label on the left; anything else is an
/// exact, case-insensitive match. Trailing dots are ignored.
pub fn mx_matches(pattern: &str, host: &str) -> bool {
    let p = pattern.trim_end_matches('.').to_ascii_lowercase();
    let h = host.trim_end_matches('.').to_ascii_lowercase();
    match p.strip_prefix("*.") {
        Some(base) => h
            .split_once('.')
            .is_some_and(|(first, rest)| !first.is_empty() && rest == base),
        None => p == h,
    }
}

/// The `id` of a domain's `_mta-sts` TXT records (RFC 8461 §3.1): records not
/// starting with `v=STSv1` are ignored; none → Ok(None); more than one, or a bad
/// one → Err (the domain is treated as having no policy).
pub fn parse_txt(records: &[String]) -> Result<Option<String>, String> {
    let sts: Vec<&String> = records
        .iter()
        .filter(|r| r.starts_with("v=STSv1;") || r.as_str() == "v=STSv1")
        .collect();
    let record = match sts.as_slice() {
        [] => return Ok(None),
        [one] => one,
        _ => return Err(format!("{} v=STSv1 TXT records", sts.len())),
    };
    let mut id = None;
    for field in record.split(';').skip(1) {
        let field = field.trim_matches([' ', '\t']);
        if field.is_empty() {
            continue;
        }
        let (k, v) = field
            .split_once('=')
            .ok_or_else(|| format!("bad field {field:?}"))?;
        let name_ok = !k.is_empty()
            && k.len() <= 32
            && k.starts_with(|c: char| c.is_ascii_alphanumeric())
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        let value_ok = !v.is_empty() && v.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b'=');
        if !name_ok || !value_ok {
            return Err(format!("bad field {field:?}"));
        }
        if k == "id" {
            if id.is_some() || v.len() > 32 || !v.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(format!("bad id {v:?}"));
            }
            id = Some(v.to_string());
        }
    }
    id.map(Some).ok_or_else(|| "no id".to_string())
}

/// Parses a policy file (RFC 8461 §3.2). Unknown keys are ignored; `version`,
/// `mode` and `max_age` must appear once; `mx` at least once unless mode is none.
pub fn parse_policy(text: &str) -> Result<Policy, String> {
    let (mut version, mut mode, mut max_age) = (None, None, None);
    let mut mx = Vec::new();
    let mut lines = Vec::new();
    for raw in text.split('\n') {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        let line = line.trim_end_matches([' ', '\t']);
        if line.is_empty() {
            continue;
        }
        lines.push(line.to_string());
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| format!("line without a key: {line:?}"))?;
        let v = v.trim_start_matches([' ', '\t']);
        let once = |slot: &mut Option<String>| {
            if slot.replace(v.to_string()).is_some() {
                Err(format!("{k} given twice"))
            } else {
                Ok(())
            }
        };
        match k {
            "version" => once(&mut version)?,
            "mode" => once(&mut mode)?,
            "max_age" => once(&mut max_age)?,
            "mx" => mx.push(check_mx(v)?),
            _ => {}
        }
    }
    if version.as_deref() != Some("STSv1") {
        return Err(format!("version is {version:?}, not STSv1"));
    }
    let mode = match mode.as_deref() {
        Some("enforce") => Mode::Enforce,
        Some("testing") => Mode::Testing,
        Some("none") => Mode::None,
        other => return Err(format!("bad mode {other:?}")),
    };
    let max_age = max_age
        .filter(|a| !a.is_empty() && a.len() <= 10 && a.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|a| a.parse::<u64>().ok())
        .ok_or("bad or missing max_age")?
        .min(MAX_AGE_LIMIT);
    if mx.is_empty() && mode != Mode::None {
        return Err("no mx pattern".into());
    }
    Ok(Policy {
        mode,
        mx,
        max_age,
        lines,
    })
}

fn check_mx(v: &str) -> Result<String, String> {
    let p = v.trim_end_matches('.').to_ascii_lowercase();
    let name = p.strip_prefix("*.").unwrap_or(&p);
    let ok = !name.is_empty()
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(p)
    } else {
        Err(format!("bad mx pattern {v:?}"))
    }
}

/// Why a policy could not be had (RFC 8460 §4.3.3 result types).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StsProblem {
    Fetch(String),
    Invalid(String),
    WebPki(String),
}

impl StsProblem {
    pub fn result_type(&self) -> &'static str {
        match self {
            StsProblem::Fetch(_) => "sts-policy-fetch-error",
            StsProblem::Invalid(_) => "sts-policy-invalid",
            StsProblem::WebPki(_) => "sts-webpki-invalid",
        }
    }
}

impl std::fmt::Display for StsProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StsProblem::Fetch(t) | StsProblem::Invalid(t) | StsProblem::WebPki(t) => f.write_str(t),
        }
    }
}

/// The policy that applies to one attempt, and what went wrong getting it.
#[derive(Debug, Clone, Default)]
pub struct StsView {
    /// An enforce or testing policy (mode none counts as no policy).
    pub policy: Option<Arc<Policy>>,
    pub problem: Option<StsProblem>,
}

/// Finds, fetches and caches policies.
pub struct Sts {
    resolver: Resolver,
    trust: Trust,
    store: TlsStore,
    port: u16,
    /// One fetch per domain at a time; entries leave when their fetch ends.
    inflight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn now() -> i64 {
    crate::time::unix_now()
}

impl Sts {
    pub fn new(resolver: Resolver, trust: Trust, store: TlsStore, port: u16) -> Sts {
        Sts {
            resolver,
            trust,
            store,
            port,
            inflight: Mutex::new(HashMap::new()),
        }
    }

    /// The policy for `domain` now.
    pub async fn view(&self, domain: &str) -> StsView {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let id = self.txt_id(&domain).await;
        let cached = self.cached(&domain);
        let Some(id) = id else {
            return view_of(cached.as_ref(), None);
        };
        if let Some(c) = &cached
            && c.id == id
        {
            return view_of(cached.as_ref(), None);
        }
        let lock = self.lock_for(&domain);
        let guard = lock.lock().await;
        // Another attempt may have fetched it while this one waited.
        let cached = self.cached(&domain);
        let out = match cached.as_ref().filter(|c| c.id == id) {
            Some(c) => view_of(Some(c), None),
            None => self.refresh(&domain, &id, cached.as_ref()).await,
        };
        drop(guard);
        self.release(&domain, lock);
        out
    }

    async fn refresh(&self, domain: &str, id: &str, cached: Option<&StsCacheEntry>) -> StsView {
        let fetched = tokio::time::timeout(FETCH_TIMEOUT, self.fetch(domain))
            .await
            .unwrap_or_else(|_| Err(StsProblem::Fetch("policy fetch timed out".into())));
        let problem = match fetched.and_then(|t| {
            parse_policy(&t)
                .map(|p| (t, p))
                .map_err(StsProblem::Invalid)
        }) {
            Ok((text, p)) => {
                let t = now();
                let entry = StsCacheEntry {
                    id: id.to_string(),
                    text,
                    fetched: t,
                    expires: t + p.max_age as i64,
                };
                if let Err(e) = self.store.sts_put(domain, &entry) {
                    tracing::warn!(domain, error = %e, "cannot cache MTA-STS policy");
                }
                tracing::info!(domain, id, mode = ?p.mode, max_age = p.max_age, "MTA-STS policy fetched");
                return view_of(Some(&entry), None);
            }
            Err(e) => e,
        };
        tracing::info!(domain, id, error = %problem, cached = cached.is_some(), "MTA-STS policy fetch failed");
        view_of(cached, Some(problem))
    }

    fn cached(&self, domain: &str) -> Option<StsCacheEntry> {
        match self.store.sts_get(domain, now()) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(domain, error = %e, "MTA-STS cache read failed");
                None
            }
        }
    }

    fn lock_for(&self, domain: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.inflight
            .lock()
            .entry(domain.to_string())
            .or_default()
            .clone()
    }

    fn release(&self, domain: &str, lock: Arc<tokio::sync::Mutex<()>>) {
        let mut m = self.inflight.lock();
        drop(lock);
        if m.get(domain).is_some_and(|l| Arc::strong_count(l) == 1) {
            m.remove(domain);
        }
    }

    /// The TXT id, or None when the record is absent, invalid or the lookup failed
    /// (all three leave the cached policy in force, RFC 8461 §5.1).
    async fn txt_id(&self, domain: &str) -> Option<String> {
        let name = format!("_mta-sts.{domain}.");
        let records: Vec<String> = match self.resolver.txt_lookup(name.as_str()).await {
            Ok(l) => l
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    hickory_resolver::proto::rr::RData::TXT(t) => Some(
                        t.txt_data
                            .iter()
                            .map(|p| String::from_utf8_lossy(p).into_owned())
                            .collect(),
                    ),
                    _ => None,
                })
                .collect(),
            Err(e) if e.is_no_records_found() => return None,
            Err(e) => {
                tracing::debug!(domain, error = %e, "MTA-STS TXT lookup failed");
                return None;
            }
        };
        match parse_txt(&records) {
            Ok(id) => id,
            Err(e) => {
                tracing::info!(domain, error = %e, "MTA-STS TXT record ignored");
                None
            }
        }
    }

    /// GET https://mta-sts.<domain>/.well-known/mta-sts.txt, verified, bounded.
    async fn fetch(&self, domain: &str) -> Result<String, StsProblem> {
        let host = format!("mta-sts.{domain}");
        let addr = self.address(&host).await?;
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| StsProblem::Fetch(format!("connect to {host} ({addr}): {e}")))?;
        let sni = ServerName::try_from(host.clone())
            .map_err(|e| StsProblem::Fetch(format!("{host}: {e}")))?;
        let cfg = self.trust.webpki_client().map_err(StsProblem::Fetch)?;
        let tls = TlsConnector::from(Arc::new(cfg))
            .connect(sni, tcp)
            .await
            .map_err(|e| tls_problem(&host, e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| StsProblem::Fetch(format!("HTTP to {host}: {e}")))?;
        let conn = tokio::spawn(conn);
        let res = get_policy(&mut sender, &host).await;
        conn.abort();
        res
    }

    async fn address(&self, host: &str) -> Result<SocketAddr, StsProblem> {
        let l = self
            .resolver
            .lookup_ip(format!("{host}."))
            .await
            .map_err(|e| StsProblem::Fetch(format!("{host}: {e}")))?;
        let mut ips: Vec<IpAddr> = l.iter().collect();
        ips.sort_by_key(|ip| ip.is_ipv6());
        ips.first()
            .map(|ip| SocketAddr::new(*ip, self.port))
            .ok_or_else(|| StsProblem::Fetch(format!("{host} has no address")))
    }
}

async fn get_policy(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    host: &str,
) -> Result<String, StsProblem> {
    let fail = |t: String| StsProblem::Fetch(t);
    let req = hyper::Request::get("/.well-known/mta-sts.txt")
        .header(hyper::header::HOST, host)
        .header(hyper::header::USER_AGENT, "tenso")
        .body(Empty::<Bytes>::new())
        .map_err(|e| fail(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| fail(format!("HTTP to {host}: {e}")))?;
    if resp.status() != hyper::StatusCode::OK {
        return Err(fail(format!("{host} answered HTTP {}", resp.status())));
    }
    let ctype = resp
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ctype.to_ascii_lowercase().starts_with("text/plain") {
        return Err(StsProblem::Invalid(format!(
            "{host} served the policy as {ctype:?}, not text/plain"
        )));
    }
    let body = Limited::new(resp.into_body(), MAX_POLICY_BYTES)
        .collect()
        .await
        .map_err(|e| fail(format!("policy body from {host}: {e}")))?
        .to_bytes();
    String::from_utf8(body.to_vec())
        .map_err(|_| StsProblem::Invalid(format!("policy from {host} is not UTF-8")))
}

fn tls_problem(host: &str, e: std::io::Error) -> StsProblem {
    let cert = e
        .get_ref()
        .and_then(|i| i.downcast_ref::<rustls::Error>())
        .is_some_and(|r| matches!(r, rustls::Error::InvalidCertificate(_)));
    if cert {
        StsProblem::WebPki(format!("certificate of {host}: {e}"))
    } else {
        StsProblem::Fetch(format!("TLS with {host}: {e}"))
    }
}

fn view_of(entry: Option<&StsCacheEntry>, problem: Option<StsProblem>) -> StsView {
    let policy = entry
        .and_then(|e| parse_policy(&e.text).ok())
        .filter(|p| p.mode != Mode::None)
        .map(Arc::new);
    StsView { policy, problem }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn txt_records() {
        let r = |v: &[&str]| parse_txt(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(r(&[]), Ok(None));
        assert_eq!(r(&["v=spf1 -all"]), Ok(None));
        assert_eq!(
            r(&["v=STSv1; id=20160831085700Z;"]),
            Ok(Some("20160831085700Z".into()))
        );
        assert_eq!(r(&["v=STSv1;id=abc; ext=x"]), Ok(Some("abc".into())));
        assert!(r(&["v=STSv1; id=a", "v=STSv1; id=b"]).is_err());
        assert!(r(&["v=STSv1;"]).is_err());
        assert!(r(&["v=STSv1; id=has-dash"]).is_err());
        assert!(r(&["v=STSv1; id=a; id=b"]).is_err());
        assert!(r(&[&format!("v=STSv1; id={}", "a".repeat(33))]).is_err());
        assert_eq!(r(&["v=STSv10; id=a"]), Ok(None));
    }

    #[test]
    fn policy_files() {
        let p = parse_policy(
            "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmax_age: 604800\r\nfoo: bar\r\n",
        )
        .unwrap();
        assert_eq!(p.mode, Mode::Enforce);
        assert_eq!(p.mx, vec!["mail.example.com", "*.example.net"]);
        assert_eq!(p.max_age, 604800);
        assert_eq!(p.lines.len(), 6);
        assert!(p.allows("MAIL.example.com."));
        assert!(p.allows("a.example.net"));
        assert!(!p.allows("example.net"));
        assert!(!p.allows("a.b.example.net"));
        let none = parse_policy("version: STSv1\nmode: none\nmax_age: 86400\n").unwrap();
        assert_eq!(none.mode, Mode::None);
        for bad in [
            "version: STSv1\nmode: enforce\nmax_age: 1\n",
            "version: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n",
            "version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n",
            "version: STSv1\nmode: testing\nmx: a\nmax_age: -1\n",
            "version: STSv1\nmode: testing\nmx: a\nmax_age: 12345678901\n",
            "version: STSv1\nmode: testing\nmode: enforce\nmx: a\nmax_age: 1\n",
            "version: STSv1\nmode: testing\nmx: a b\nmax_age: 1\n",
            "version: STSv1\ngarbage\nmode: testing\nmx: a\nmax_age: 1\n",
        ] {
            assert!(parse_policy(bad).is_err(), "{bad:?}");
        }
        let capped = parse_policy("version: STSv1\nmode: testing\nmx: a\nmax_age: 9999999999\n");
        assert_eq!(capped.unwrap().max_age, MAX_AGE_LIMIT);
    }

    fn label() -> impl Strategy<Value = String> {
        "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?"
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// Parsing never panics, and whatever parses states a policy the text holds.
        #[test]
        fn policy_parser_is_total(text in "(?s).{0,300}") {
            if let Ok(p) = parse_policy(&text) {
                prop_assert!(text.contains("STSv1"));
                prop_assert!(p.max_age <= MAX_AGE_LIMIT);
                prop_assert!(p.mode == Mode::None || !p.mx.is_empty());
            }
            let _ = parse_txt(&[text]);
        }

        /// A policy written from its parts parses back to the same parts, whatever
        /// the line ends and unknown keys around them.
        #[test]
        fn written_policies_round_trip(
            mx in proptest::collection::vec((any::<bool>(), proptest::collection::vec(label(), 1..4)), 1..5),
            max_age in 0u64..=MAX_AGE_LIMIT,
            enforce in any::<bool>(),
            crlf in any::<bool>(),
            ext in proptest::option::of("[a-z]{1,8}"),
        ) {
            let eol = if crlf { "\r\n" } else { "\n" };
            let patterns: Vec<String> = mx.iter().map(|(w, ls)| {
                let n = ls.join(".");
                if *w { format!("*.{n}") } else { n }
            }).collect();
            let mode = if enforce { "enforce" } else { "testing" };
            let mut text = format!("version: STSv1{eol}mode: {mode}{eol}");
            if let Some(e) = &ext { text.push_str(&format!("x{e}: whatever{eol}")); }
            for p in &patterns { text.push_str(&format!("mx: {p}{eol}")); }
            text.push_str(&format!("max_age: {max_age}{eol}"));
            let p = parse_policy(&text).unwrap();
            prop_assert_eq!(&p.mx, &patterns);
            prop_assert_eq!(p.max_age, max_age);
            prop_assert_eq!(p.mode, if enforce { Mode::Enforce } else { Mode::Testing });
        }

        /// A wildcard matches exactly the names one label longer than its base.
        #[test]
        fn wildcard_matches_one_label(base in proptest::collection::vec(label(), 1..4), extra in proptest::collection::vec(label(), 0..3)) {
            let b = base.join(".");
            let host = if extra.is_empty() { b.clone() } else { format!("{}.{b}", extra.join(".")) };
            prop_assert_eq!(mx_matches(&format!("*.{b}"), &host), extra.len() == 1);
            prop_assert_eq!(mx_matches(&b, &host.to_uppercase()), extra.is_empty());
        }
    }
}
