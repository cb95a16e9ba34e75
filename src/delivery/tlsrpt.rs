//! TLS reporting (RFC 8460): every outbound TLS session is counted per UTC day and
//! destination (policy) domain — successes, and failures by result type (§4.3) —
//! and once a day each domain that publishes a `_smtp._tls` TXT record with a
//! `mailto:` rua gets the aggregate as gzipped JSON (§4.4, §5.3) in a message that
//! enters tenso's own queue through `Spool::commit`, DKIM-signed when a key is set.
//!
//! Counts live in the table (bounded per day by `[tls_report] max_domains`; failure
//! details per policy by [`MAX_DETAILS`]), so `tenso tls report` reads them with or
//! without a running daemon. Reports go out with `MAIL FROM:<>` (a notification:
//! its own failure makes no DSN). `https:` rua are not used (optional in the RFC).

use crate::config::{BouncePolicy, Config};
use crate::dns::Resolver;
use crate::signing::Signer;
use crate::smtp::address::Mailbox;
use crate::spool::{Envelope, MessageKind, Rcpt, RcptState, Spool};
use crate::table::tls::TlsStore;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::net::IpAddr;
use std::sync::Arc;

/// Policies remembered per domain and day.
pub const MAX_POLICIES: usize = 16;
/// Distinct failure details kept per policy; more are only counted.
pub const MAX_DETAILS: usize = 64;

/// The policy a session ran under, as RFC 8460 §4.4 names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRef {
    /// `sts`, `tlsa` or `no-policy-found`.
    pub policy_type: String,
    pub policy_string: Vec<String>,
    pub mx_host: Vec<String>,
}

impl PolicyRef {
    pub fn none() -> PolicyRef {
        PolicyRef {
            policy_type: "no-policy-found".into(),
            policy_string: Vec::new(),
            mx_host: Vec::new(),
        }
    }
}

/// One counted session (or a session that could not be had).
#[derive(Debug, Clone)]
pub struct SessionResult<'a> {
    pub domain: &'a str,
    pub policy: PolicyRef,
    pub mx: &'a str,
    pub receiving_ip: Option<IpAddr>,
    pub sending_ip: Option<IpAddr>,
    /// (result type, additional information); None for success.
    pub failure: Option<(&'static str, String)>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct FailureAgg {
    result_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sending_mta_ip: Option<String>,
    receiving_mx_hostname: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    receiving_ip: Option<String>,
    additional: String,
    count: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PolicyAgg {
    policy: PolicyRef,
    success: u64,
    failure: u64,
    details: Vec<FailureAgg>,
}

/// The stored aggregate of one (day, domain).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct DomainAgg {
    /// Unix seconds where the reported period starts.
    start: i64,
    policies: Vec<PolicyAgg>,
}

impl DomainAgg {
    fn add(&mut self, r: &SessionResult<'_>) {
        let i = match self.policies.iter().position(|p| p.policy == r.policy) {
            Some(i) => i,
            None if self.policies.len() < MAX_POLICIES => {
                self.policies.push(PolicyAgg {
                    policy: r.policy.clone(),
                    success: 0,
                    failure: 0,
                    details: Vec::new(),
                });
                self.policies.len() - 1
            }
            None => return,
        };
        let p = &mut self.policies[i];
        let Some((kind, info)) = &r.failure else {
            p.success += 1;
            return;
        };
        p.failure += 1;
        let d = FailureAgg {
            result_type: kind.to_string(),
            sending_mta_ip: r.sending_ip.map(|i| i.to_string()),
            receiving_mx_hostname: r.mx.to_string(),
            receiving_ip: r.receiving_ip.map(|i| i.to_string()),
            additional: info.chars().take(300).collect(),
            count: 0,
        };
        let same = |x: &FailureAgg| {
            x.result_type == d.result_type
                && x.receiving_mx_hostname == d.receiving_mx_hostname
                && x.receiving_ip == d.receiving_ip
                && x.sending_mta_ip == d.sending_mta_ip
        };
        if let Some(x) = p.details.iter_mut().find(|x| same(x)) {
            x.count += 1;
        } else if p.details.len() < MAX_DETAILS {
            p.details.push(FailureAgg { count: 1, ..d });
        }
    }
}

/// `YYYY-MM-DD` of a Unix time (UTC), and the Unix time that day starts.
pub fn day_of(unix: i64) -> (String, i64) {
    let start = unix - unix.rem_euclid(86400);
    let d = mail_parser::DateTime::from_timestamp(start);
    (format!("{:04}-{:02}-{:02}", d.year, d.month, d.day), start)
}

fn rfc3339(unix: i64) -> String {
    let d = mail_parser::DateTime::from_timestamp(unix);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        d.year, d.month, d.day, d.hour, d.minute, d.second
    )
}

/// The `mailto:` addresses of a domain's `_smtp._tls` TXT records (RFC 8460 §3).
/// Records not starting with `v=TLSRPTv1` are ignored; more than one is an error.
pub fn parse_rua(records: &[String]) -> Result<Vec<String>, String> {
    let mine: Vec<&String> = records
        .iter()
        .filter(|r| {
            r.strip_prefix("v=TLSRPTv1")
                .is_some_and(|rest| rest.trim_start().starts_with(';') || rest.is_empty())
        })
        .collect();
    let record = match mine.as_slice() {
        [] => return Ok(Vec::new()),
        [one] => one,
        _ => return Err(format!("{} v=TLSRPTv1 records", mine.len())),
    };
    let rua = record
        .split(';')
        .map(|f| f.trim())
        .find_map(|f| f.strip_prefix("rua="))
        .ok_or("no rua")?;
    let mut out = Vec::new();
    for uri in rua.split(',').map(|u| u.trim()) {
        if let Some(addr) = uri.strip_prefix("mailto:") {
            let addr = addr.split('?').next().unwrap_or("");
            let m = Mailbox::parse(addr).map_err(|e| format!("rua {uri:?}: {e}"))?;
            out.push(m.to_string());
        } else if !uri.starts_with("https:") {
            return Err(format!("rua {uri:?} is neither mailto: nor https:"));
        }
    }
    Ok(out)
}

/// The counts and the report sender.
pub struct Reports {
    cfg: Arc<Config>,
    store: TlsStore,
}

impl Reports {
    pub fn new(cfg: Arc<Config>, store: TlsStore) -> Reports {
        Reports { cfg, store }
    }

    pub fn enabled(&self) -> bool {
        self.cfg.tls_report.enabled
    }

    /// Counts one session result under today's aggregate of its domain.
    pub fn record(&self, r: &SessionResult<'_>) {
        if !self.cfg.tls_report.enabled {
            return;
        }
        let now = crate::time::unix_now();
        let (day, start) = day_of(now);
        let domain = r.domain.trim_end_matches('.').to_ascii_lowercase();
        let res = self
            .store
            .rpt_update(&day, &domain, self.cfg.tls_report.max_domains, |old| {
                let mut agg = old
                    .and_then(|b| serde_json::from_slice::<DomainAgg>(b).ok())
                    .unwrap_or(DomainAgg {
                        start,
                        policies: Vec::new(),
                    });
                agg.add(r);
                serde_json::to_vec(&agg).expect("aggregate serializes")
            });
        match res {
            Ok(true) => {}
            Ok(false) => {
                tracing::debug!(domain, "TLS-RPT: daily domain limit reached, not counted")
            }
            Err(e) => tracing::warn!(domain, error = %e, "TLS-RPT: cannot record"),
        }
    }

    /// RFC 8460 §4.4 JSON of one aggregate.
    fn report_json(&self, domain: &str, agg: &DomainAgg, end: i64, report_id: &str) -> Value {
        let contact = self.contact();
        let policies: Vec<Value> = agg
            .policies
            .iter()
            .map(|p| {
                let mut policy = json!({
                    "policy-type": p.policy.policy_type,
                    "policy-domain": domain,
                });
                if !p.policy.policy_string.is_empty() {
                    policy["policy-string"] = json!(p.policy.policy_string);
                }
                if !p.policy.mx_host.is_empty() {
                    policy["mx-host"] = json!(p.policy.mx_host);
                }
                let details: Vec<Value> = p.details.iter().map(detail_json).collect();
                let mut v = json!({
                    "policy": policy,
                    "summary": {
                        "total-successful-session-count": p.success,
                        "total-failure-session-count": p.failure,
                    },
                });
                if !details.is_empty() {
                    v["failure-details"] = json!(details);
                }
                v
            })
            .collect();
        json!({
            "organization-name": self.cfg.tls_report.org_name.clone().unwrap_or_else(|| self.cfg.hostname.clone()),
            "date-range": {
                "start-datetime": rfc3339(agg.start),
                "end-datetime": rfc3339(end),
            },
            "contact-info": contact,
            "report-id": report_id,
            "policies": policies,
        })
    }

    fn contact(&self) -> String {
        self.cfg
            .tls_report
            .contact
            .clone()
            .unwrap_or_else(|| format!("postmaster@{}", self.cfg.hostname))
    }

    /// Today's aggregates as the reports would say now (`tenso tls report`).
    pub fn today(&self, domain: Option<&str>) -> Result<Value, String> {
        let now = crate::time::unix_now();
        let (day, _) = day_of(now);
        let want = domain.map(|d| d.trim_end_matches('.').to_ascii_lowercase());
        let mut out = Vec::new();
        for (d, dom, bytes) in self.store.rpt_list().map_err(|e| e.to_string())? {
            if d != day || want.as_ref().is_some_and(|w| *w != dom) {
                continue;
            }
            let Ok(agg) = serde_json::from_slice::<DomainAgg>(&bytes) else {
                continue;
            };
            if !agg.policies.is_empty() {
                out.push(self.report_json(&dom, &agg, now, "(not sent yet)"));
            }
        }
        Ok(json!({ "day": day, "reports": out }))
    }

    /// Makes the reports that are due — every past day, and today's too when
    /// `include_today` — commits them to the spool and returns them for the queue.
    pub async fn send_due(
        &self,
        resolver: &Resolver,
        spool: &Spool,
        signer: Option<&Signer>,
        include_today: bool,
    ) -> Vec<(Envelope, Arc<Vec<u8>>)> {
        let now = crate::time::unix_now();
        let (today, _) = day_of(now);
        let list = match self.store.rpt_list() {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "TLS-RPT: cannot list aggregates");
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for (day, domain, bytes) in list {
            let is_today = day == today;
            if is_today && !include_today {
                continue;
            }
            let agg: DomainAgg = serde_json::from_slice(&bytes).unwrap_or_default();
            let end = if is_today {
                now
            } else {
                day_of(agg.start).1 + 86399
            };
            // A past day ends with its report (or with nobody to send it to); today
            // starts again from now.
            let next = is_today.then(|| {
                serde_json::to_vec(&DomainAgg {
                    start: now,
                    policies: Vec::new(),
                })
                .expect("aggregate serializes")
            });
            if !agg.policies.is_empty()
                && let Some(q) = self
                    .report_one(resolver, spool, signer, &domain, &agg, end)
                    .await
            {
                out.push(q);
            }
            if let Err(e) = self.store.rpt_swap(&day, &domain, &bytes, next) {
                tracing::warn!(domain, error = %e, "TLS-RPT: cannot clear aggregate");
            }
        }
        out
    }

    async fn report_one(
        &self,
        resolver: &Resolver,
        spool: &Spool,
        signer: Option<&Signer>,
        domain: &str,
        agg: &DomainAgg,
        end: i64,
    ) -> Option<(Envelope, Arc<Vec<u8>>)> {
        let rua = match rua_of(resolver, domain).await {
            Ok(r) if !r.is_empty() => r,
            Ok(_) => {
                tracing::debug!(domain, "TLS-RPT: no mailto: rua published, report dropped");
                return None;
            }
            Err(e) => {
                tracing::info!(domain, error = %e, "TLS-RPT: no usable _smtp._tls record, report dropped");
                return None;
            }
        };
        let id = spool.new_id();
        let report_id = format!("{id}@{}", self.cfg.hostname);
        let json = self.report_json(domain, agg, end, &report_id);
        let msg = match self.message(domain, &rua, &json, agg.start, end, &id) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(domain, error = %e, "TLS-RPT: cannot build report");
                return None;
            }
        };
        let msg = match signer {
            Some(s) => s.sign_prepend(msg),
            None => msg,
        };
        let env = envelope(&self.cfg, id, &rua, &msg);
        let body = Arc::new(msg);
        match spool.commit(&env, body.clone()).await {
            Ok(()) => {
                tracing::info!(queue_id = %env.id, domain, rua = ?rua, "TLS-RPT report queued");
                Some((env, body))
            }
            Err(e) => {
                tracing::error!(domain, error = %e, "TLS-RPT: cannot store report");
                None
            }
        }
    }

    /// The report mail of RFC 8460 §5.3: multipart/report, report-type tlsrpt, the
    /// JSON gzipped as application/tlsrpt+gzip.
    fn message(
        &self,
        domain: &str,
        rua: &[String],
        json: &Value,
        start: i64,
        end: i64,
        id: &str,
    ) -> Result<Vec<u8>, String> {
        use mail_builder::MessageBuilder;
        use mail_builder::headers::content_type::ContentType;
        use mail_builder::headers::raw::Raw;
        use mail_builder::mime::MimePart;
        let host = &self.cfg.hostname;
        let gz = gzip(&serde_json::to_vec(json).map_err(|e| e.to_string())?)?;
        let filename = format!("{host}!{domain}!{start}!{end}!{id}.json.gz");
        let report_id = json["report-id"].as_str().unwrap_or_default().to_string();
        let body = MimePart::new(
            ContentType::new("multipart/report").attribute("report-type", "tlsrpt"),
            vec![
                MimePart::new(
                    "text/plain",
                    format!(
                        "TLS report for {domain} from {host}, covering {} to {}.\r\n",
                        rfc3339(start),
                        rfc3339(end)
                    ),
                ),
                MimePart::new("application/tlsrpt+gzip", gz).attachment(filename),
            ],
        );
        MessageBuilder::new()
            .from(self.contact())
            .to(rua.to_vec())
            .subject(format!(
                "Report Domain: {domain} Submitter: {host} Report-ID: <{report_id}>"
            ))
            .message_id(format!("{id}.tlsrpt@{host}"))
            .date(end)
            .header("TLS-Report-Domain", Raw::new(domain.to_string()))
            .header("TLS-Report-Submitter", Raw::new(host.to_string()))
            .header("Auto-Submitted", Raw::new("auto-generated"))
            .body(body)
            .write_to_vec()
            .map_err(|e| e.to_string())
    }
}

fn detail_json(d: &FailureAgg) -> Value {
    let mut v = json!({
        "result-type": d.result_type,
        "failed-session-count": d.count,
    });
    if !d.receiving_mx_hostname.is_empty() {
        v["receiving-mx-hostname"] = json!(d.receiving_mx_hostname);
    }
    if let Some(ip) = &d.sending_mta_ip {
        v["sending-mta-ip"] = json!(ip);
    }
    if let Some(ip) = &d.receiving_ip {
        v["receiving-ip"] = json!(ip);
    }
    if !d.additional.is_empty() {
        v["failure-reason-code"] = json!(d.additional);
    }
    v
}

fn gzip(data: &[u8]) -> Result<Vec<u8>, String> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).map_err(|e| e.to_string())?;
    e.finish().map_err(|e| e.to_string())
}

async fn rua_of(resolver: &Resolver, domain: &str) -> Result<Vec<String>, String> {
    let name = format!("_smtp._tls.{domain}.");
    let records: Vec<String> = match resolver.txt_lookup(name.as_str()).await {
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
        Err(e) if e.is_no_records_found() => return Ok(Vec::new()),
        Err(e) => return Err(e.to_string()),
    };
    parse_rua(&records)
}

fn envelope(cfg: &Config, id: String, rua: &[String], msg: &[u8]) -> Envelope {
    Envelope {
        id,
        kind: MessageKind::Dsn,
        arrival: crate::time::unix_now(),
        client_ip: None,
        helo: cfg.hostname.clone(),
        reverse_path: String::new(),
        env_id: None,
        smtputf8: false,
        eight_bit: !msg.is_ascii(),
        size: msg.len() as u64,
        held: false,
        rcpts: rua
            .iter()
            .map(|dest| Rcpt {
                orig: dest.clone(),
                alias: String::new(),
                mail_from: String::new(),
                dest: dest.clone(),
                pool: None,
                policy: BouncePolicy::Pool,
                state: RcptState::Pending,
                attempts: 0,
                next_attempt: 0,
                last: None,
                status: None,
                remote_mta: None,
                warned: false,
                reported: false,
                unknown: false,
            })
            .collect(),
        notes: vec!["TLS report (RFC 8460)".into()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rua_records() {
        let r = |v: &[&str]| parse_rua(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(r(&[]), Ok(vec![]));
        assert_eq!(
            r(&["v=TLSRPTv1; rua=mailto:tls@dest.test,https://r.dest.test/x"]),
            Ok(vec!["tls@dest.test".to_string()])
        );
        assert_eq!(
            r(&["v=TLSRPTv1;rua=mailto:a@x.test?subject=y, mailto:b@x.test"]),
            Ok(vec!["a@x.test".to_string(), "b@x.test".to_string()])
        );
        assert!(r(&["v=TLSRPTv1; rua=ftp://x"]).is_err());
        assert!(
            r(&[
                "v=TLSRPTv1; rua=mailto:a@b.test",
                "v=TLSRPTv1; rua=mailto:c@d.test"
            ])
            .is_err()
        );
        assert!(r(&["v=TLSRPTv1;"]).is_err());
        assert_eq!(r(&["v=TLSRPTv10; rua=mailto:a@b.test"]), Ok(vec![]));
    }

    #[test]
    fn days_and_dates() {
        assert_eq!(day_of(0), ("1970-01-01".into(), 0));
        assert_eq!(
            day_of(86400 * 365 + 3600),
            ("1971-01-01".into(), 86400 * 365)
        );
        assert_eq!(rfc3339(86399), "1970-01-01T23:59:59Z");
    }

    fn result(kind: Option<&'static str>, mx: &str) -> SessionResult<'static> {
        SessionResult {
            domain: "dest.test",
            policy: PolicyRef::none(),
            mx: Box::leak(mx.to_string().into_boxed_str()),
            receiving_ip: Some("127.0.0.1".parse().unwrap()),
            sending_ip: None,
            failure: kind.map(|k| (k, "why".to_string())),
        }
    }

    #[test]
    fn aggregation_counts_and_bounds() {
        let mut a = DomainAgg::default();
        for _ in 0..3 {
            a.add(&result(None, "mx"));
        }
        a.add(&result(Some("certificate-expired"), "mx"));
        a.add(&result(Some("certificate-expired"), "mx"));
        a.add(&result(Some("starttls-not-supported"), "mx"));
        let p = &a.policies[0];
        assert_eq!((p.success, p.failure, p.details.len()), (3, 3, 2));
        assert_eq!(p.details[0].count, 2);
        for i in 0..(MAX_DETAILS + 10) {
            a.add(&result(Some("validation-failure"), &format!("mx{i}")));
        }
        let p = &a.policies[0];
        assert_eq!(p.details.len(), MAX_DETAILS);
        assert_eq!(p.failure, 3 + MAX_DETAILS as u64 + 10);
    }

    proptest! {
        /// However results arrive, the summary counts every one of them and the
        /// details never count more failures than the summary.
        #[test]
        fn counts_add_up(kinds in proptest::collection::vec(proptest::option::of(0usize..4), 0..200)) {
            const K: [&str; 4] = ["certificate-expired", "certificate-not-trusted", "starttls-not-supported", "validation-failure"];
            let mut a = DomainAgg::default();
            for k in &kinds {
                a.add(&result(k.map(|i| K[i]), "mx"));
            }
            let ok = kinds.iter().filter(|k| k.is_none()).count() as u64;
            let total: u64 = a.policies.iter().map(|p| p.success + p.failure).sum();
            prop_assert_eq!(total, kinds.len() as u64);
            prop_assert_eq!(a.policies.iter().map(|p| p.success).sum::<u64>(), ok);
            for p in &a.policies {
                prop_assert_eq!(p.details.iter().map(|d| d.count).sum::<u64>(), p.failure);
            }
        }

        /// The rua parser never panics on any TXT text.
        #[test]
        fn rua_parser_is_total(t in "(?s).{0,200}") {
            let _ = parse_rua(&[format!("v=TLSRPTv1; {t}"), t]);
        }
    }
}
