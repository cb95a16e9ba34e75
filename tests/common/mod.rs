//! Integration-test kit for tenso: real servers and clients over real TCP on 127.0.0.1.
//!
//! Include it from a test file with `mod common;` and use the parts you need:
//! - [`dns`]: an in-process authoritative DNS server (hickory-server) with a builder API;
//! - [`dnssec`]: a DNSSEC-signed test zone and its trust anchor (DANE tests);
//! - [`tls`]: a throw-away PKI (rcgen) and rustls configs;
//! - [`sink`]: a recording SMTP server with configurable capabilities and replies;
//! - [`smtp_client`]: a raw SMTP client for byte-exact conversations;
//! - [`daemon`]: runs the real `tenso` binary with a temporary data directory;
//! - [`postfix_sink`]: Postfix's `smtp-sink` as an independent peer.
//! - [`rspamd`]: a private rspamd (Debian package) with its own ports and dirs.
//!
//! Every server binds 127.0.0.1 on an ephemeral port, every wait is bounded by a
//! timeout, and everything is stopped when its handle is dropped.
#![allow(dead_code)]

pub mod daemon;
pub mod dns;
pub mod dnssec;
pub mod postfix_sink;
pub mod rspamd;
pub mod sink;
pub mod smtp_client;
pub mod tls;

use std::future::Future;
use std::time::Duration;

/// A 127.0.0.1 port nothing listens on (bound and released), for destinations that
/// must refuse connections.
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Polls `check` every 20 ms until it returns `Some`, or gives up after `timeout`.
pub async fn wait_until<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
