//! The message checks at the end of DATA: DKIM, ARC and DMARC together, so their DNS
//! lookups run at once: every DKIM and ARC key of the message and the DMARC policy
//! record in parallel, then (only when `np=` needs it) the author domain's existence
//! test. Nothing waits longer than the resolver's timeout per lookup; the stage as a
//! whole is bounded by the caller.
//!
//! The result is the `Authentication-Results` clauses and the two decisions built on
//! them: the DMARC pre-flight (forwarding would fail DMARC at the destination) and
//! the `dmarc_reject` refusal. Both count only DKIM signatures that cover the whole
//! body (see [`super::dmarc`]).

use super::arc::{self, ArcResult, ArcVerdict};
use super::dkim::{self, BodyHashKey, BodyHasher, BodyHashes, DkimResult, DkimVerdict, Message};
use super::dmarc::{self, DmarcResult, DmarcVerdict, Inputs, Policy};
use super::lookup;
use crate::dns::Resolver;
use crate::smtp::Reply;
use std::net::IpAddr;

/// The identity SPF authenticated, as DMARC needs it.
pub struct SpfIdentity<'a> {
    /// The MAIL FROM domain, or the HELO domain for `<>`.
    pub domain: &'a str,
    pub pass: bool,
}

/// Everything the content checks found.
#[derive(Debug, Clone)]
pub struct Checks {
    pub dkim: Vec<DkimVerdict>,
    /// Signatures beyond [`dkim::MAX_SIGNATURES`], not verified.
    pub dkim_overflow: usize,
    pub dmarc: DmarcVerdict,
    pub arc: ArcVerdict,
    /// The body hashes the checks used (an ARC seal reuses one).
    pub bodies: BodyHashes,
}

/// Every body hash the checks of `m` need; with `seal`, the one an ARC seal carries.
fn body_hash_keys(m: &Message, seal: bool) -> Vec<BodyHashKey> {
    let (cands, _) = dkim::candidates(m);
    let mut keys: Vec<BodyHashKey> = dkim::body_hash_keys(&cands).collect();
    keys.extend(arc::body_hash_keys(&arc::prepare(m)));
    if seal {
        keys.push(super::seal::SEALED_BODY);
    }
    keys
}

/// The hasher for the body of a message that did not stay in memory: `head` is the
/// start of the message that did (its header section, or as much of it as was kept);
/// the caller feeds what follows `head` and passes the result to [`check`].
pub fn body_hasher(head: &[u8], seal: bool) -> BodyHasher {
    let m = Message::parse(head);
    let mut h = BodyHasher::new(body_hash_keys(&m, seal));
    if !m.header_ended {
        h = h.after_header();
    }
    h.write(m.body);
    h
}

/// What the checks read of the message.
pub enum Body<'a> {
    /// The whole message.
    Whole(&'a [u8]),
    /// The start of a message (at least as much of its header section as was kept)
    /// and the hashes of its body, from [`body_hasher`] with the same `seal`.
    Hashed(&'a [u8], BodyHashes),
}

impl<'a> Body<'a> {
    /// The bytes in memory: the whole message, or its start.
    pub fn head(&self) -> &'a [u8] {
        match self {
            Body::Whole(m) | Body::Hashed(m, _) => m,
        }
    }
}

/// Runs DKIM, ARC and DMARC (Unix time `now`); with `seal`, the body hash an ARC
/// seal needs is made too.
pub async fn check(
    resolver: &Resolver,
    msg: Body<'_>,
    seal: bool,
    spf: &SpfIdentity<'_>,
    now: i64,
) -> Checks {
    let (m, bodies) = match msg {
        Body::Whole(msg) => {
            let m = Message::parse(msg);
            let bodies = BodyHashes::of(m.body, body_hash_keys(&m, seal));
            (m, bodies)
        }
        Body::Hashed(head, bodies) => (Message::parse(head), bodies),
    };
    let (cands, dkim_overflow) = dkim::candidates(&m);
    let chain = arc::prepare(&m);
    let author = dmarc::author_domain(&m);
    let mut names = dkim::key_names(&cands);
    names.extend(arc::key_names(&chain));
    let discovery = async {
        match &author {
            Ok(a) => Ok((a.as_str(), dmarc::discover(resolver, a).await)),
            Err(why) => Err(*why),
        }
    };
    let (keys, discovery) = tokio::join!(lookup::txt_many(resolver, names), discovery);
    let dkim = dkim::verify_all(&m, &cands, &keys, &bodies, now);
    let arc = arc::verify(&m, &chain, &keys, &bodies, now);
    let dmarc = match discovery {
        Ok((a, d)) => {
            let exists = !dmarc::needs_existence(&d, a) || lookup::domain_exists(resolver, a).await;
            let inputs = Inputs {
                dkim: &dkim,
                spf_domain: spf.domain,
                spf_pass: spf.pass,
            };
            dmarc::evaluate(&d, a, &inputs, exists, rand::random_range(0..100))
        }
        Err(why) => DmarcVerdict::no_author(why),
    };
    Checks {
        dkim,
        dkim_overflow,
        dmarc,
        arc,
        bodies,
    }
}

/// What tenso does about the DMARC result.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decisions {
    /// The pre-flight's reason when forwarding would fail DMARC at the destination.
    pub doomed: Option<String>,
    /// The refusal under `dmarc_reject`.
    pub reject: Option<Reply>,
}

impl Checks {
    /// The resinfo clauses, in the order dkim (one per signature, `none` without any),
    /// dmarc, arc.
    pub fn clauses(&self, client: IpAddr) -> Vec<String> {
        let mut out: Vec<String> = self.dkim.iter().map(dkim::clause).collect();
        if self.dkim_overflow > 0 {
            out.push(dkim::overflow_clause(self.dkim_overflow));
        }
        if out.is_empty() {
            out.push("dkim=none".into());
        }
        out.push(self.dmarc.clause());
        out.push(self.arc.clause(client));
        out
    }

    /// `dkim=1/2 dmarc=pass arc=none` for the log line.
    pub fn summary(&self) -> String {
        let pass = self
            .dkim
            .iter()
            .filter(|d| d.result == DkimResult::Pass)
            .count();
        let mut s = format!(
            "dkim={pass}/{} dmarc={}",
            self.dkim.len() + self.dkim_overflow,
            self.dmarc.result.as_str()
        );
        if self.arc.result != ArcResult::None {
            s.push_str(&format!(" arc={}", self.arc.result.as_str()));
        }
        s
    }

    /// The pre-flight and the refusal. `quarantine_too` treats `p=quarantine` like
    /// `p=reject` for the pre-flight; `reject` is `[auth] dmarc_reject`.
    pub fn decide(&self, quarantine_too: bool, reject: bool) -> Decisions {
        let d = &self.dmarc;
        if d.record.is_none() || !matches!(d.result, DmarcResult::Pass | DmarcResult::Fail) {
            return Decisions::default();
        }
        let predicted = d.predicted_policy();
        let strict =
            predicted == Policy::Reject || (quarantine_too && predicted == Policy::Quarantine);
        let partial_only = d.dkim_aligned && !d.dkim_aligned_whole;
        let doomed = (strict && !d.dkim_aligned_whole).then(|| {
            format!(
                "DMARC pre-flight: {} publishes p={} and the message has no valid DKIM signature aligned with From{}; forwarding would fail DMARC at the destination",
                d.author,
                predicted.as_str(),
                if partial_only { " that covers the whole body" } else { "" }
            )
        });
        let refuse =
            (reject && d.applied == Policy::Reject && !d.passes_for_decisions()).then(|| {
                Reply::new(
                    550,
                    "5.7.1",
                    format!(
                        "DMARC policy of {} rejects this message{}",
                        d.author,
                        if partial_only {
                            " (its aligned DKIM signature leaves part of the body unsigned)"
                        } else {
                            ""
                        }
                    ),
                )
            });
        Decisions {
            doomed,
            reject: refuse,
        }
    }
}
