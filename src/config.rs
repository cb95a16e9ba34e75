//! Typed configuration: TOML read with `--config FILE`, or the embedded defaults.
//!
//! Every key has a default in code, so `tenso serve` without a file is useful on a
//! laptop. Unknown keys are errors (serde `deny_unknown_fields`): a typo in a mail
//! server's config must not silently fall back to a default. Durations use humantime
//! (`30s`, `5d`). This module only parses and validates; it opens no socket or file
//! other than the config file itself.

mod submission;

pub use submission::{DkimDomainKey, SubmissionConfig};

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What happens to bounces that come back to an alias (the talk's proposals 2a/2b).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BouncePolicy {
    /// 2a: keep bounces in a local pool (Maildir) on the forwarder.
    #[default]
    Pool,
    /// 2b: forward bounces to the destinations keeping `MAIL FROM:<>`.
    Forward,
}

impl std::fmt::Display for BouncePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BouncePolicy::Pool => "pool",
            BouncePolicy::Forward => "forward",
        })
    }
}

impl std::str::FromStr for BouncePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pool" => Ok(BouncePolicy::Pool),
            "forward" => Ok(BouncePolicy::Forward),
            _ => Err(format!(
                "unknown bounce policy {s:?} (expected pool or forward)"
            )),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Our name in the greeting, EHLO, Received and DSNs.
    pub hostname: String,
    /// Spool, forwarding table, pools and the admin socket live here.
    pub data_dir: PathBuf,
    /// Where mail for `postmaster` of every local domain goes. Empty: kept in the
    /// local pool `pool/postmaster`, never lost.
    pub postmaster: Vec<String>,
    /// Bounce policy of aliases created without `--bounce`.
    pub default_bounce: BouncePolicy,
    /// `alice+tag@d` matches `alice@d`. Empty string disables subaddressing.
    pub subaddress_separator: String,
    pub smtp: SmtpConfig,
    pub dns: DnsConfig,
    pub delivery: DeliveryConfig,
    pub queue: QueueConfig,
    pub table: TableConfig,
    pub pool: PoolConfig,
    pub bounce: BounceConfig,
    pub auth: AuthConfig,
    pub dkim: DkimConfig,
    pub limits: LimitsConfig,
    pub reputation: ReputationConfig,
    pub tls: TlsConfig,
    pub spam: SpamConfig,
    pub submission: SubmissionConfig,
    pub tls_report: TlsReportConfig,
    pub metrics: MetricsConfig,
}

/// `GET /metrics` and `GET /health` over HTTP (README "Metrics").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where the HTTP endpoint listens; off when unset. Plain HTTP, no auth: keep it
    /// on loopback or a monitoring network.
    pub listen: Option<SocketAddr>,
    /// How often the table's reachability is probed (for `/health`).
    #[serde(with = "humantime_serde")]
    pub table_probe: Duration,
    /// A probe not done in this time counts as unreachable.
    #[serde(with = "humantime_serde")]
    pub table_probe_deadline: Duration,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: None,
            table_probe: Duration::from_secs(5),
            table_probe_deadline: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpConfig {
    pub listen: Vec<SocketAddr>,
    /// Largest message accepted, in bytes (announced in EHLO SIZE).
    pub max_message_size: usize,
    /// Recipients per transaction; more get 452 4.5.3 (RFC 5321 §4.5.3.1.8).
    pub max_recipients: usize,
    /// Wait for the next command (RFC 5321 §4.5.3.2.7: 5 minutes).
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Wait for the next chunk of DATA (RFC 5321 §4.5.3.2.5 client side: 3 minutes).
    #[serde(with = "humantime_serde")]
    pub data_timeout: Duration,
    /// Concurrent inbound sessions; more get `421 4.7.0` at once.
    pub max_connections: usize,
    /// Unknown recipients in a local domain: `reject` (550 5.1.1 at RCPT) or `accept`
    /// (250, then a DSN to the sender unless SPF failed: proposal 1b).
    pub unknown_recipient: UnknownRecipient,
    /// Free bytes the spool's file system must keep: below it, MAIL gets `452 4.3.1`
    /// (like Postfix's `queue_minfree`). Default: 2 × `max_message_size` + 100 MiB.
    /// 0 turns the check off (a commit that meets a full disk still gets `452 4.3.1`).
    pub min_free_space: Option<u64>,
    /// Memory all sessions together may use for spilled messages read back whole at
    /// the end of DATA (spam gate, signing, submission, bounces coming home, DMARC
    /// pre-flight pooling), each counted three times its size (the copies the end of
    /// DATA builds). A session whose message does not fit waits for its turn, at most
    /// 60 s, then 451; one counted at more than the whole budget (over ~21 MiB by
    /// default) waits to be alone.
    pub whole_message_memory: u64,
}

impl SmtpConfig {
    /// `min_free_space`, or its default derived from `max_message_size`.
    pub fn min_free_space(&self) -> u64 {
        self.min_free_space
            .unwrap_or(2 * self.max_message_size as u64 + 100 * 1024 * 1024)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownRecipient {
    Reject,
    Accept,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpfFailAction {
    /// Accept and record the result in the headers (the talk's transition phase).
    Record,
    /// 550 5.7.23.
    Reject,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TempErrorAction {
    /// Accept and record `spf=temperror`.
    Accept,
    /// 451 4.7.24: let the sender retry.
    Defer,
}

/// What to do with mail whose forwarding DMARC will certainly reject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preflight {
    Off,
    Pool,
    Forward,
}

impl std::str::FromStr for Preflight {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Preflight::Off),
            "pool" => Ok(Preflight::Pool),
            "forward" => Ok(Preflight::Forward),
            _ => Err(format!(
                "unknown dmarc preflight {s:?} (expected off, pool or forward)"
            )),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Check SPF (HELO and MAIL FROM identities) on every transaction.
    pub spf: bool,
    /// Verify DKIM signatures and evaluate DMARC on every message.
    pub dkim: bool,
    pub spf_fail: SpfFailAction,
    pub spf_temperror: TempErrorAction,
    /// Reject (550 5.7.1) mail whose DMARC evaluation fails with p=reject.
    pub dmarc_reject: bool,
    /// Mail from a `p=reject` domain without an aligned DKIM pass cannot survive
    /// forwarding: `pool` keeps it on the forwarder, `forward` sends it anyway.
    pub dmarc_preflight: Preflight,
    /// Treat `p=quarantine` like `p=reject` for the pre-flight.
    pub dmarc_preflight_quarantine: bool,
    /// The authserv-id in Authentication-Results (default: hostname).
    pub authserv_id: Option<String>,
    /// The forwarder's outbound IPs, for `tenso dns` (default: the hostname's A/AAAA).
    pub outbound_ips: Vec<std::net::IpAddr>,
    /// Time the MAIL stage's DNS lookups (SPF of HELO and MAIL FROM, reputation zones,
    /// all in parallel) may take; what has not answered by then is a temperror.
    #[serde(with = "humantime_serde")]
    pub mail_deadline: Duration,
    /// Time the end-of-DATA checks (DKIM, DMARC, ARC) may take; then temperror.
    #[serde(with = "humantime_serde")]
    pub data_deadline: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            spf: true,
            dkim: true,
            spf_fail: SpfFailAction::Record,
            spf_temperror: TempErrorAction::Accept,
            dmarc_reject: false,
            dmarc_preflight: Preflight::Forward,
            dmarc_preflight_quarantine: false,
            authserv_id: None,
            outbound_ips: Vec::new(),
            mail_deadline: Duration::from_millis(2500),
            data_deadline: Duration::from_secs(5),
        }
    }
}

/// The talk's rate controls, inbound and outbound.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Concurrent sessions from one client (IPv4 address, IPv6 /64).
    pub max_connections_per_ip: usize,
    /// New connections per client per minute (token bucket; burst = this number).
    pub connect_rate_per_minute: u32,
    /// Messages per session; then 421 and close.
    pub max_messages_per_connection: usize,
    /// Error replies per session; then 421 and close.
    pub max_errors: u32,
    /// First delay after a "user unknown" from a client; doubles per event.
    #[serde(with = "humantime_serde")]
    pub unknown_penalty_base: Duration,
    #[serde(with = "humantime_serde")]
    pub unknown_penalty_max: Duration,
    /// Every period without a new event halves the penalty.
    #[serde(with = "humantime_serde")]
    pub unknown_penalty_decay: Duration,
    /// Clients remembered for penalties and connect rates (oldest evicted).
    pub tracked_clients: usize,
    /// A DATA transfer slower than this many bytes per second (after 30 s) is cut.
    pub min_data_rate: u64,
    /// Outbound: messages per minute to one destination domain (0 = no limit).
    pub domain_rate_per_minute: u32,
    /// Outbound: concurrent connections to one destination domain.
    pub domain_max_connections: usize,
    /// Outbound: messages forwarded per alias per hour (0 = no limit); more wait.
    pub alias_rate_per_hour: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections_per_ip: 50,
            connect_rate_per_minute: 300,
            max_messages_per_connection: 1000,
            max_errors: 20,
            unknown_penalty_base: Duration::from_secs(1),
            unknown_penalty_max: Duration::from_secs(60),
            unknown_penalty_decay: Duration::from_secs(600),
            tracked_clients: 100_000,
            min_data_rate: 1024,
            domain_rate_per_minute: 0,
            domain_max_connections: 20,
            alias_rate_per_hour: 1000,
        }
    }
}

/// What a reputation list does with a hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListAction {
    /// 554 5.7.1 naming the list.
    Reject,
    /// Accept and note the hit in a header on the forwarded copy.
    Record,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpList {
    /// DNSBL zone queried with the reversed client address (A record; TXT = reason).
    pub zone: String,
    pub action: ListAction,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainRating {
    /// Zone queried with the MAIL FROM domain for TXT like "Status: Good", "Rating: 100".
    pub zone: String,
    pub action: ListAction,
    /// Ratings below this (or a status other than Good) are a hit.
    #[serde(default = "default_min_rating")]
    pub min_rating: i64,
}

fn default_min_rating() -> i64 {
    50
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ReputationConfig {
    pub ip_lists: Vec<IpList>,
    pub domain_ratings: Vec<DomainRating>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain for inbound STARTTLS. Without cert and key, a
    /// self-signed certificate is generated in the data dir.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Offer STARTTLS inbound.
    pub starttls: bool,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert: None,
            key: None,
            starttls: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DkimConfig {
    /// Signing domain (d=); signing is off unless domain, selector and key are set.
    pub domain: Option<String>,
    pub selector: Option<String>,
    /// PEM private key (RSA PKCS#1/PKCS#8 or Ed25519 PKCS#8), e.g. from `tenso dkim keygen`.
    pub key: Option<PathBuf>,
    /// ARC-seal forwarded copies (RFC 8617; being moved to Historic).
    pub arc: bool,
    /// `[[dkim.keys]]`: per-domain keys for submitted mail (signed with its From
    /// domain's key); the key above stays the one for DSNs and forwarded copies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<DkimDomainKey>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// `ip:port` of recursive resolvers; empty = the system's resolv.conf.
    pub nameservers: Vec<SocketAddr>,
    /// Wait for the answer to one DNS query (one try).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Tries per query (1 = no retry); a lookup waits at most `timeout` × `attempts`.
    pub attempts: usize,
    /// How long a lookup that timed out or failed is remembered as a temperror, so a
    /// flood of mail naming a broken domain does not ask again; "0s" disables it.
    #[serde(with = "humantime_serde")]
    pub temperror_cache: Duration,
    /// DNSSEC trust anchors for DANE (a file of DNSKEY records); default: the IANA
    /// root keys built into hickory.
    pub trust_anchor: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// STARTTLS when offered, certificate not verified, clear text if it fails.
    Opportunistic,
    /// STARTTLS must succeed, or the attempt is deferred.
    Required,
    /// STARTTLS must succeed with a certificate that chains to a trusted root and
    /// names the MX host (RFC 7817 / RFC 6125), or the attempt is deferred.
    Verify,
    /// Never STARTTLS.
    None,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Static next hops: domain → `host:port`; `"*"` matches every domain.
    pub routes: std::collections::BTreeMap<String, String>,
    /// Optional smart host (`host:port`) for all mail not matched by `routes`.
    pub relay_host: Option<String>,
    /// Port used for MX and A/AAAA delivery.
    pub port: u16,
    pub tls: TlsMode,
    /// Per destination domain TLS override.
    pub tls_domains: std::collections::BTreeMap<String, TlsMode>,
    /// Concurrent connections to one next-hop host.
    pub max_per_destination: usize,
    /// A message carrying more `Received:` headers than this is a loop (5.4.6).
    pub max_hops: usize,
    /// Maximum alias → alias chain depth.
    pub max_alias_depth: usize,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub data_timeout: Duration,
    /// An idle outbound connection is kept this long for reuse.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Total concurrent delivery attempts.
    pub max_concurrency: usize,
    /// PEM file of extra trusted roots for `verify`, MTA-STS and the policy fetch,
    /// added to the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Apply destinations' MTA-STS policies (RFC 8461).
    pub mta_sts: bool,
    /// Port of the MTA-STS policy host. 443 in the real world; tests only change it.
    pub mta_sts_port: u16,
    /// Apply DANE TLSA records (RFC 7672); needs a resolver path that passes DNSSEC
    /// records (validation is done by tenso, see `[dns] trust_anchor`).
    pub dane: bool,
}

/// TLS reporting (RFC 8460): daily aggregate reports to destinations that ask.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsReportConfig {
    /// Count TLS results per destination domain and send the reports.
    pub enabled: bool,
    /// `organization-name` of the reports (default: hostname).
    pub org_name: Option<String>,
    /// `contact-info` and the From: of the report mail (default: postmaster@hostname).
    pub contact: Option<String>,
    /// Destination domains counted per day; more are not counted (logged).
    pub max_domains: usize,
}

impl Default for TlsReportConfig {
    fn default() -> Self {
        TlsReportConfig {
            enabled: true,
            org_name: None,
            contact: None,
            max_domains: 10_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Delays between attempts; the last one repeats.
    #[serde(with = "humantime_serde_list")]
    pub retry: Vec<Duration>,
    /// After this, a message still undelivered fails (DSN).
    #[serde(with = "humantime_serde")]
    pub max_lifetime: Duration,
    /// A host that refused a connection is not tried again for this long.
    #[serde(with = "humantime_serde")]
    pub dead_host_ttl: Duration,
    /// Send a delay DSN after this long (off when absent).
    #[serde(with = "humantime_serde::option")]
    pub delay_warning: Option<Duration>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TableConfig {
    /// Where the shared table lives: `sled` (embedded, one node) or `postgres`.
    pub backend: TableBackend,
    /// sled page cache, bytes. Bounded so a million aliases stay cheap.
    pub cache_bytes: u64,
    /// PostgreSQL connection URL (`postgresql://tenso@host:5432/tenso`), without a
    /// password: a URL that holds one is refused.
    pub url: Option<String>,
    /// File holding the database password (first line), read at start.
    pub password_file: Option<PathBuf>,
    /// Connections per node.
    pub pool_size: usize,
    /// Deadline of a connection attempt.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Deadline of one table operation (waiting for a connection included).
    #[serde(with = "humantime_serde")]
    pub query_timeout: Duration,
    /// Aliases the in-memory view of a postgres table holds (LRU beyond that).
    pub view_entries: u64,
    /// How often the view checks the table's change counter (missed notifications).
    #[serde(with = "humantime_serde")]
    pub view_check: Duration,
    /// How long the view still answers after its change feed (LISTEN) was lost.
    #[serde(with = "humantime_serde")]
    pub view_grace: Duration,
}

/// Does a PostgreSQL URL (or key=value string) carry a password? Such a config would
/// put the secret where `config check` prints it and logs quote it.
pub fn url_has_password(url: &str) -> bool {
    let lower = url.to_ascii_lowercase();
    if lower.contains("password=") {
        return true;
    }
    let Some(rest) = lower
        .strip_prefix("postgresql://")
        .or_else(|| lower.strip_prefix("postgres://"))
    else {
        return false;
    };
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    authority
        .rsplit_once('@')
        .is_some_and(|(userinfo, _)| userinfo.contains(':'))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TableBackend {
    #[default]
    Sled,
    Postgres,
}

impl std::str::FromStr for TableBackend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sled" => Ok(TableBackend::Sled),
            "postgres" | "postgresql" => Ok(TableBackend::Postgres),
            _ => Err(format!(
                "unknown table store {s:?} (expected sled or postgres)"
            )),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Bounces kept per alias; the oldest are expired beyond this (logged, counted).
    pub max_messages: usize,
    /// Bytes kept per alias, same rule.
    pub max_bytes: u64,
    /// Mail each alias a digest of waiting bounces this often (off when absent).
    #[serde(with = "humantime_serde::option")]
    pub digest: Option<Duration>,
    /// With a shared (postgres) table: write the fleet's pool into this node's
    /// Maildir for an IMAP server, this often (off when absent; one node of a fleet).
    #[serde(with = "humantime_serde::option")]
    pub maildir_export: Option<Duration>,
    /// A group that may read the pools (e.g. Dovecot's): pool directories become 0750
    /// and pooled files 0640, owned by this group, and the data dir 0710 so the group
    /// can reach `pool/` but list nothing else. Unset: everything owner-only.
    pub group: Option<String>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_messages: 1000,
            max_bytes: 50 * 1024 * 1024,
            digest: None,
            maildir_export: None,
            group: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BounceConfig {
    /// How long the record of each forwarded copy is kept for correlating bounces.
    #[serde(with = "humantime_serde")]
    pub log_retention: Duration,
    /// Discard null-sender bounces that match no forwarded copy (likely backscatter).
    pub drop_uncorrelated: bool,
    /// Bounces forwarded per alias per hour under policy `forward`; more are pooled.
    pub forward_rate_per_hour: u32,
}

impl Default for BounceConfig {
    fn default() -> Self {
        BounceConfig {
            log_retention: Duration::from_secs(7 * 86400),
            drop_uncorrelated: false,
            forward_rate_per_hour: 30,
        }
    }
}

/// What happens to mail rspamd judges spam, per alias (`tenso user set --spam`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpamPolicy {
    /// Forward with the spam headers (and `[spam] subject_tag`).
    Tag,
    /// Keep it in the alias's pool, never forward it.
    Quarantine,
    /// 550 5.7.1 at DATA (quarantine when other recipients of the message accept it).
    Reject,
    /// No spam handling for this alias: forward untouched.
    Off,
}

impl std::fmt::Display for SpamPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SpamPolicy::Tag => "tag",
            SpamPolicy::Quarantine => "quarantine",
            SpamPolicy::Reject => "reject",
            SpamPolicy::Off => "off",
        })
    }
}

impl std::str::FromStr for SpamPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tag" => Ok(SpamPolicy::Tag),
            "quarantine" => Ok(SpamPolicy::Quarantine),
            "reject" => Ok(SpamPolicy::Reject),
            "off" => Ok(SpamPolicy::Off),
            _ => Err(format!(
                "unknown spam policy {s:?} (expected tag, quarantine, reject or off)"
            )),
        }
    }
}

/// What the gate does when rspamd cannot judge a message (down, slow, bad answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpamOnError {
    /// Mail flows unscanned (logged and counted).
    Accept,
    /// 451 4.7.1: the sender retries later.
    Tempfail,
}

/// The spam gate: rspamd judges each message before the 250 (off unless `rspamd_url`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpamConfig {
    /// rspamd's normal worker, `http://host:port` (`/checkv2` is appended).
    pub rspamd_url: Option<String>,
    /// Spam policy of aliases without their own (`--spam default`).
    pub default: SpamPolicy,
    /// Deadline of one rspamd call (connect, send, answer).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Larger messages are not scanned (counted as `spam_oversize`).
    pub max_size: usize,
    pub on_error: SpamOnError,
    /// Prefixed to the Subject of spam forwarded under policy `tag` (unset: unchanged).
    pub subject_tag: Option<String>,
    /// rspamd's controller, for `tenso spam learn-ham|learn-spam`.
    pub controller_url: Option<String>,
    /// File holding the controller password (sent as the `Password` header).
    pub controller_password_file: Option<PathBuf>,
}

impl Default for SpamConfig {
    fn default() -> Self {
        SpamConfig {
            rspamd_url: None,
            default: SpamPolicy::Tag,
            timeout: Duration::from_secs(10),
            max_size: 10 * 1024 * 1024,
            on_error: SpamOnError::Accept,
            subject_tag: None,
            controller_url: None,
            controller_password_file: None,
        }
    }
}

/// An `http://host[:port][/prefix]` URL of rspamd: (host, port, path prefix).
pub fn parse_http_url(s: &str) -> Result<(String, u16, String), String> {
    let uri: hyper::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("{s:?}: only http:// is supported"));
    }
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("{s:?} has no host"))?;
    if uri.query().is_some() {
        return Err(format!("{s:?}: no query string allowed"));
    }
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let prefix = uri.path().trim_end_matches('/').to_string();
    Ok((host, uri.port_u16().unwrap_or(80), prefix))
}

mod humantime_serde_list {
    use serde::{Deserialize, Deserializer, Serializer, ser::SerializeSeq};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(v: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for d in v {
            seq.serialize_element(&humantime::format_duration(*d).to_string())?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        let v = Vec::<humantime_serde::Serde<Duration>>::deserialize(d)?;
        Ok(v.into_iter().map(|x| x.into_inner()).collect())
    }
}

fn system_hostname() -> String {
    gethostname::gethostname()
        .into_string()
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hostname: system_hostname(),
            data_dir: PathBuf::from("./spool"),
            postmaster: Vec::new(),
            default_bounce: BouncePolicy::Pool,
            subaddress_separator: "+".into(),
            smtp: SmtpConfig::default(),
            dns: DnsConfig::default(),
            delivery: DeliveryConfig::default(),
            queue: QueueConfig::default(),
            table: TableConfig::default(),
            pool: PoolConfig::default(),
            bounce: BounceConfig::default(),
            auth: AuthConfig::default(),
            dkim: DkimConfig::default(),
            limits: LimitsConfig::default(),
            reputation: ReputationConfig::default(),
            tls: TlsConfig::default(),
            spam: SpamConfig::default(),
            submission: SubmissionConfig::default(),
            tls_report: TlsReportConfig::default(),
            metrics: MetricsConfig::default(),
        }
    }
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            listen: vec!["127.0.0.1:2525".parse().expect("literal")],
            max_message_size: 25 * 1024 * 1024,
            max_recipients: 100,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(180),
            max_connections: 10_000,
            unknown_recipient: UnknownRecipient::Reject,
            min_free_space: None,
            whole_message_memory: 64 * 1024 * 1024,
        }
    }
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            timeout: Duration::from_secs(5),
            attempts: 2,
            temperror_cache: Duration::from_secs(60),
            trust_anchor: None,
        }
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            routes: Default::default(),
            relay_host: None,
            port: 25,
            tls: TlsMode::Opportunistic,
            tls_domains: Default::default(),
            max_per_destination: 10,
            max_hops: 30,
            max_alias_depth: 8,
            connect_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
            idle_timeout: Duration::from_secs(5),
            max_concurrency: 100,
            ca_file: None,
            mta_sts: true,
            mta_sts_port: 443,
            dane: false,
        }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        let m = |x: u64| Duration::from_secs(60 * x);
        QueueConfig {
            retry: vec![m(5), m(10), m(20), m(40), m(60)],
            max_lifetime: Duration::from_secs(5 * 86400),
            dead_host_ttl: Duration::from_secs(60),
            delay_warning: None,
        }
    }
}

impl Default for TableConfig {
    fn default() -> Self {
        TableConfig {
            backend: TableBackend::Sled,
            cache_bytes: 128 * 1024 * 1024,
            url: None,
            password_file: None,
            pool_size: 8,
            connect_timeout: Duration::from_secs(3),
            query_timeout: Duration::from_secs(5),
            view_entries: 200_000,
            view_check: Duration::from_secs(30),
            view_grace: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config: {0}")]
    Invalid(String),
}

impl Config {
    /// Loads `path`, or the embedded defaults when `path` is None.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let cfg = match path {
            None => Config::default(),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_owned(),
                    source,
                })?;
                Config::from_toml(&text).map_err(|message| ConfigError::Parse {
                    path: p.to_owned(),
                    message,
                })?
            }
        };
        let mut cfg = cfg;
        cfg.validate()?;
        // Shown by `tenso config check` as the value in force, not as "unset".
        cfg.smtp.min_free_space = Some(cfg.smtp.min_free_space());
        Ok(cfg)
    }

    /// Parses TOML text; errors carry the line and column and name the key.
    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str::<Config>(text).map_err(|e| {
            let line = e.span().map(|s| {
                text.as_bytes()[..s.start.min(text.len())]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count()
                    + 1
            });
            let msg = e.message().trim().to_string();
            match line {
                Some(l) => format!("line {l}: {msg}"),
                None => msg,
            }
        })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.hostname.is_empty() || self.hostname.contains(char::is_whitespace) {
            return bad(format!("hostname {:?} is not a host name", self.hostname));
        }
        if self.smtp.listen.is_empty() {
            return bad("[smtp] listen is empty".into());
        }
        if self.smtp.max_recipients == 0 {
            return bad("[smtp] max_recipients must be at least 1".into());
        }
        if self.smtp.max_message_size < 1024 {
            return bad("[smtp] max_message_size must be at least 1024 bytes".into());
        }
        if !(1..=10).contains(&self.dns.attempts) {
            return bad("[dns] attempts must be between 1 and 10".into());
        }
        if self.dns.timeout.is_zero() {
            return bad("[dns] timeout must be more than 0s".into());
        }
        if self.auth.mail_deadline.is_zero() || self.auth.data_deadline.is_zero() {
            return bad("[auth] mail_deadline and data_deadline must be more than 0s".into());
        }
        if self.queue.retry.is_empty() {
            return bad("[queue] retry needs at least one duration".into());
        }
        if self.subaddress_separator.chars().count() > 1 {
            return bad("subaddress_separator must be one character or empty".into());
        }
        for (dom, hop) in &self.delivery.routes {
            if crate::smtp::address::split_host_port(hop).is_none() {
                return bad(format!(
                    "[delivery] routes: {dom:?} = {hop:?} is not host:port"
                ));
            }
        }
        if let Some(r) = &self.delivery.relay_host
            && crate::smtp::address::split_host_port(r).is_none()
        {
            return bad(format!("[delivery] relay_host {r:?} is not host:port"));
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return bad("[tls] needs cert and key together".into());
        }
        let d = &self.dkim;
        let set = [d.domain.is_some(), d.selector.is_some(), d.key.is_some()];
        if set.iter().any(|x| *x) && !set.iter().all(|x| *x) {
            return bad("[dkim] needs domain, selector and key together".into());
        }
        if let Some(g) = &self.pool.group
            && crate::disk::group_id(g).is_none()
        {
            return bad(format!("[pool] group {g:?}: no such group"));
        }
        self.validate_table()?;
        self.validate_spam()?;
        submission::validate_domain_keys(&self.dkim.keys).map_err(ConfigError::Invalid)?;
        self.submission
            .validate(&self.smtp.listen)
            .map_err(ConfigError::Invalid)?;
        if self.delivery.mta_sts_port == 0 {
            return bad("[delivery] mta_sts_port must not be 0".into());
        }
        if self.metrics.table_probe.is_zero() || self.metrics.table_probe_deadline.is_zero() {
            return bad("[metrics] table_probe and table_probe_deadline must be above 0".into());
        }
        if self.tls_report.max_domains == 0 {
            return bad("[tls_report] max_domains must be at least 1".into());
        }
        if let Some(c) = &self.tls_report.contact {
            crate::smtp::address::Mailbox::parse(c)
                .map_err(|e| ConfigError::Invalid(format!("[tls_report] contact {c:?}: {e}")))?;
        }
        for pm in &self.postmaster {
            crate::smtp::address::Mailbox::parse(pm)
                .map_err(|e| ConfigError::Invalid(format!("postmaster {pm:?}: {e}")))?;
        }
        Ok(())
    }

    fn validate_table(&self) -> Result<(), ConfigError> {
        let t = &self.table;
        let bad = |m: &str| Err(ConfigError::Invalid(format!("[table] {m}")));
        if t.backend == TableBackend::Sled {
            return Ok(());
        }
        let Some(url) = &t.url else {
            return bad("backend = \"postgres\" needs url");
        };
        if url_has_password(url) {
            return bad("url must not hold a password: put it in password_file");
        }
        if t.pool_size == 0 || t.pool_size > 1000 {
            return bad("pool_size must be between 1 and 1000");
        }
        if t.connect_timeout.is_zero() || t.query_timeout.is_zero() || t.view_check.is_zero() {
            return bad("connect_timeout, query_timeout and view_check must be more than 0s");
        }
        Ok(())
    }

    fn validate_spam(&self) -> Result<(), ConfigError> {
        let s = &self.spam;
        for (key, url) in [
            ("rspamd_url", &s.rspamd_url),
            ("controller_url", &s.controller_url),
        ] {
            if let Some(u) = url {
                parse_http_url(u)
                    .map_err(|e| ConfigError::Invalid(format!("[spam] {key}: {e}")))?;
            }
        }
        if let Some(t) = &s.subject_tag
            && (t.is_empty() || t.chars().any(char::is_control))
        {
            return Err(ConfigError::Invalid(
                "[spam] subject_tag must be non-empty text without control characters".into(),
            ));
        }
        if s.timeout.is_zero() {
            return Err(ConfigError::Invalid(
                "[spam] timeout must be above 0".into(),
            ));
        }
        Ok(())
    }

    /// The effective config as TOML (what `tenso config check` prints).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    pub fn queue_dir(&self) -> PathBuf {
        self.data_dir.join("queue")
    }
    pub fn table_dir(&self) -> PathBuf {
        self.data_dir.join("table")
    }
    pub fn pool_dir(&self) -> PathBuf {
        self.data_dir.join("pool")
    }
    pub fn authserv_id(&self) -> &str {
        self.auth.authserv_id.as_deref().unwrap_or(&self.hostname)
    }
    pub fn socket_path(&self) -> PathBuf {
        self.data_dir.join("tenso.sock")
    }
    /// Modes of the pool tree: owner-only, or group-readable with `[pool] group`.
    pub fn pool_modes(&self) -> crate::disk::Modes {
        match self.pool.group.as_deref().and_then(crate::disk::group_id) {
            Some(gid) => crate::disk::Modes::group_readable(gid),
            None => crate::disk::PRIVATE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_postgres_url_with_a_password_is_refused() {
        for (url, has) in [
            ("postgresql://tenso@127.0.0.1:5432/tenso", false),
            ("postgres://tenso@db/tenso?sslmode=disable", false),
            ("postgresql://db.example/tenso", false),
            ("postgresql://tenso:secret@db/tenso", true),
            ("postgresql://tenso:@db/tenso", true),
            ("postgresql://db/tenso?password=secret", true),
            ("host=db user=tenso password=secret", true),
            ("host=db user=tenso", false),
            // An '@' in the path is not user info.
            ("postgresql://db/ten:so@x", false),
        ] {
            assert_eq!(url_has_password(url), has, "{url}");
        }
        let mut c = Config::default();
        c.table.backend = TableBackend::Postgres;
        assert!(c.validate().is_err(), "postgres without url");
        c.table.url = Some("postgresql://tenso:pw@db/tenso".into());
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("password_file") && !err.contains("pw@"),
            "{err}"
        );
        c.table.url = Some("postgresql://tenso@db/tenso".into());
        c.validate().unwrap();
    }

    #[test]
    fn defaults_validate() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.smtp.listen[0].to_string(), "127.0.0.1:2525");
        assert_eq!(c.data_dir, PathBuf::from("./spool"));
    }

    #[test]
    fn durations_and_keys() {
        let c = Config::from_toml(
            "hostname = \"mx.example\"\n[smtp]\nlisten = [\"127.0.0.1:2525\"]\ncommand_timeout = \"30s\"\n[queue]\nretry = [\"1s\", \"2m\"]\nmax_lifetime = \"5d\"\n[dns]\nnameservers = [\"127.0.0.1:5353\"]\n",
        )
        .unwrap();
        assert_eq!(c.smtp.command_timeout, Duration::from_secs(30));
        assert_eq!(
            c.queue.retry,
            vec![Duration::from_secs(1), Duration::from_secs(120)]
        );
        assert_eq!(c.queue.max_lifetime, Duration::from_secs(5 * 86400));
        assert_eq!(c.dns.nameservers[0].port(), 5353);
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let e = Config::from_toml("hostname = \"a\"\n\n[smtp]\nlisten = []\nmax_recipents = 5\n")
            .unwrap_err();
        assert!(e.contains("line 5"), "{e}");
        assert!(e.contains("max_recipents"), "{e}");
    }

    #[test]
    fn spam_section() {
        let c = Config::default();
        assert!(c.spam.rspamd_url.is_none(), "no gate unless configured");
        assert_eq!(c.spam.default, SpamPolicy::Tag);
        assert_eq!(c.spam.on_error, SpamOnError::Accept);
        assert_eq!(c.spam.timeout, Duration::from_secs(10));
        let c = Config::from_toml(
            "[spam]\nrspamd_url = \"http://127.0.0.1:11333\"\ndefault = \"quarantine\"\ntimeout = \"2s\"\non_error = \"tempfail\"\nsubject_tag = \"[SPAM]\"\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.spam.default, SpamPolicy::Quarantine);
        assert_eq!(c.spam.on_error, SpamOnError::Tempfail);
        assert_eq!(
            parse_http_url("http://[::1]:11333/rspamd/").unwrap(),
            ("::1".to_string(), 11333, "/rspamd".to_string())
        );
        for bad in [
            "[spam]\nrspamd_url = \"https://x:1\"\n",
            "[spam]\nrspamd_url = \"127.0.0.1:11333\"\n",
            "[spam]\ncontroller_url = \"http://x/?a=b\"\n",
            "[spam]\nsubject_tag = \"a\\r\\nBcc: x\"\n",
            "[spam]\ntimeout = \"0s\"\n",
        ] {
            let c = Config::from_toml(bad).unwrap();
            assert!(c.validate().is_err(), "{bad}");
        }
        assert!(Config::from_toml("[spam]\non_error = \"drop\"\n").is_err());
        assert!(Config::from_toml("[spam]\ndefault = \"bounce\"\n").is_err());
    }

    #[test]
    fn outbound_tls_keys() {
        let c = Config::default();
        assert_eq!(c.delivery.tls, TlsMode::Opportunistic);
        assert!(c.delivery.mta_sts && !c.delivery.dane && c.tls_report.enabled);
        assert_eq!(c.delivery.mta_sts_port, 443);
        let c = Config::from_toml(
            "[delivery]\ntls = \"verify\"\nca_file = \"/etc/ca.pem\"\ndane = true\nmta_sts = false\n[delivery.tls_domains]\n\"a.test\" = \"verify\"\n[dns]\ntrust_anchor = \"/etc/root.key\"\n[tls_report]\ncontact = \"tls@example.test\"\n",
        )
        .unwrap();
        assert_eq!(c.delivery.tls, TlsMode::Verify);
        assert_eq!(c.delivery.tls_domains["a.test"], TlsMode::Verify);
        assert!(c.delivery.dane && !c.delivery.mta_sts);
        assert_eq!(c.dns.trust_anchor, Some(PathBuf::from("/etc/root.key")));
        c.validate().unwrap();
        let mut bad = c.clone();
        bad.tls_report.contact = Some("not an address".into());
        assert!(bad.validate().is_err());
        assert!(Config::from_toml("[delivery]\ntls = \"strict\"\n").is_err());
        assert!(Config::from_toml("[tls_report]\nsend = true\n").is_err());
    }

    #[test]
    fn round_trips_through_toml() {
        let c = Config::default();
        let again = Config::from_toml(&c.to_toml()).unwrap();
        assert_eq!(again.queue.retry, c.queue.retry);
        assert_eq!(again.smtp.max_message_size, c.smtp.max_message_size);
    }
}
