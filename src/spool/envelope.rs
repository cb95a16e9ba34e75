//! The envelope file of a queued message: who sent it, and for each outgoing
//! recipient where it goes and how far delivery got. Stored as JSON: readable by a
//! postmaster with `cat`, and tolerant of fields added by later versions.

use crate::config::BouncePolicy;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// Where a queued message came from; decides what its failures may produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MessageKind {
    /// Mail received for an alias and forwarded with MAIL FROM = the alias.
    #[default]
    Relay,
    /// A delivery status notification tenso generated; sent with `MAIL FROM:<>`.
    Dsn,
    /// A bounce received for an alias, forwarded with `MAIL FROM:<>` (policy 2b).
    ForwardedBounce,
    /// Mail a user submitted (587/465) as their alias, to recipients outside tenso's
    /// domains: sent with MAIL FROM = the alias and without `Delivered-To:` (it was
    /// delivered to no mailbox here); its bounces correlate like forwarded copies.
    Submission,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RcptState {
    Pending,
    Delivered,
    /// Permanently failed (or expired); the DSN, if any is due, was already queued.
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rcpt {
    /// The forward-path as the client wrote it in RCPT (DSN Original-Recipient).
    pub orig: String,
    /// The table entry that matched (`alice@d` or `@d`), for policy and correlation.
    pub alias: String,
    /// The outgoing reverse-path: the alias address (proposal 2), or "" for `<>`.
    pub mail_from: String,
    /// The destination mailbox; empty when the copy goes to a local pool.
    pub dest: String,
    /// Deliver into this local pool (Maildir) instead of over SMTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    pub policy: BouncePolicy,
    pub state: RcptState,
    #[serde(default)]
    pub attempts: u32,
    /// Unix time in milliseconds of the next attempt (0 = now).
    #[serde(default)]
    pub next_attempt: i64,
    /// Last reply or failure reason, for `queue show` and DSNs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<String>,
    /// RFC 3463 status of the last outcome (`4.4.1`, `5.1.1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_mta: Option<String>,
    /// A delay DSN was already sent for this recipient.
    #[serde(default)]
    pub warned: bool,
    /// The failure of this recipient has been reported (DSN stored, or none due).
    #[serde(default)]
    pub reported: bool,
    /// Proposal 1b: an unknown recipient accepted under `unknown_recipient =
    /// "accept"`; its failure is reported to the original sender, not to an alias.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unknown: bool,
}

impl MessageKind {
    /// Copies whose bounces are correlated with what was sent (the log of
    /// forwarded copies): mail relayed for an alias and mail an alias submitted.
    pub fn correlated(self) -> bool {
        matches!(self, MessageKind::Relay | MessageKind::Submission)
    }
}

impl Rcpt {
    pub fn is_pending(&self) -> bool {
        self.state == RcptState::Pending
    }

    /// Pending, or failed without its failure reported yet.
    pub fn needs_work(&self) -> bool {
        self.is_pending() || (self.state == RcptState::Failed && !self.reported)
    }

    /// The address this copy was forwarded for, as written into `Delivered-To:` and
    /// checked for loops: the alias, or for a catch-all the address actually used.
    pub fn trace_id(&self) -> String {
        if self.alias.starts_with('@') {
            self.orig.to_lowercase()
        } else {
            self.alias.clone()
        }
    }

    /// The destination's domain (the next-hop key).
    pub fn dest_domain(&self) -> &str {
        self.dest.rsplit_once('@').map_or("", |(_, d)| d)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: String,
    #[serde(default)]
    pub kind: MessageKind,
    /// Unix time the message was accepted.
    pub arrival: i64,
    pub client_ip: Option<IpAddr>,
    pub helo: String,
    /// The reverse-path the client gave ("" for `<>`).
    pub reverse_path: String,
    /// ENVID given by the client (RFC 3461), decoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_id: Option<String>,
    #[serde(default)]
    pub smtputf8: bool,
    #[serde(default)]
    pub eight_bit: bool,
    /// Body size in bytes as stored.
    pub size: u64,
    /// Held by the admin: not delivered until released.
    #[serde(default)]
    pub held: bool,
    pub rcpts: Vec<Rcpt>,
    /// Free-form notes (flags such as an uncorrelated bounce), kept for the admin.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl Envelope {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("envelope serializes");
        v.push(b'\n');
        v
    }

    pub fn from_bytes(b: &[u8]) -> Result<Envelope, String> {
        serde_json::from_slice(b).map_err(|e| e.to_string())
    }

    pub fn is_done(&self) -> bool {
        self.rcpts.iter().all(|r| !r.needs_work())
    }

    /// Earliest time some recipient needs work (an attempt, or a failure to report).
    pub fn next_due(&self) -> Option<i64> {
        self.rcpts
            .iter()
            .filter(|r| r.needs_work())
            .map(|r| r.next_attempt)
            .min()
    }

    #[doc(hidden)]
    pub fn new_for_test(id: &str) -> Envelope {
        Envelope {
            id: id.to_string(),
            kind: MessageKind::Relay,
            arrival: 0,
            client_ip: None,
            helo: "test".into(),
            reverse_path: "s@origin.test".into(),
            env_id: None,
            smtputf8: false,
            eight_bit: false,
            size: 3,
            held: false,
            rcpts: vec![Rcpt {
                orig: "a@alias.test".into(),
                alias: "a@alias.test".into(),
                mail_from: "a@alias.test".into(),
                dest: "a@dest.test".into(),
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
            }],
            notes: Vec::new(),
        }
    }
}
