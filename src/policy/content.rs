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

/// Distinct body hashes made for one message: each is a pass over the whole body, and
/// a message can ask for many (ten DKIM signatures and fifty ARC sets, each with its
/// own `l=`) before any key is fetched. A signature whose hash was not made fails
/// with "body not hashed".
pub const MAX_BODY_HASHES: usize = 8;

/// The body hashes the checks of `m` need, at most [`MAX_BODY_HASHES`]: the one an ARC
/// seal carries (with `seal`), the DKIM signatures' top first, then the ARC message
/// signatures' newest first.
fn body_hash_keys(m: &Message, seal: bool) -> Vec<BodyHashKey> {
    let (cands, _) = dkim::candidates(m);
    let mut ams = arc::body_hash_keys(&arc::prepare(m));
    ams.reverse();
    let mut keys: Vec<BodyHashKey> = Vec::new();
    let all = seal
        .then_some(super::seal::SEALED_BODY)
        .into_iter()
        .chain(dkim::body_hash_keys(&cands))
        .chain(ams);
    for k in all {
        if keys.len() == MAX_BODY_HASHES {
            break;
        }
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys
}

/// The hasher for the body of a message that did not stay in memory: `head` is the
/// start of the message that did, its whole header section at least; the caller
/// feeds what follows `head` and passes the result to [`check`].
pub fn body_hasher(head: &[u8], seal: bool) -> BodyHasher {
    let m = Message::parse(head);
    let mut h = BodyHasher::new(body_hash_keys(&m, seal));
    h.write(m.body);
    h
}

/// What the checks read of the message.
pub enum Body<'a> {
    /// The whole message.
    Whole(&'a [u8]),
    /// The start of a message (its whole header section at least) and the hashes of
    /// its body, from [`body_hasher`] with the same `seal`.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_hashes_asked_are_bounded_and_the_seal_and_top_signatures_come_first() {
        let mut msg = String::new();
        for l in 0..12 {
            msg.push_str(&format!(
                "DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=x.test; s=s; \
                 h=from; l={l}; bh=AAAA; b=AAAA\r\n"
            ));
        }
        msg.push_str("From: a@x.test\r\n\r\nbody\r\n");
        let m = Message::parse(msg.as_bytes());
        let keys = body_hash_keys(&m, false);
        assert_eq!(keys.len(), MAX_BODY_HASHES);
        assert_eq!(keys[0].limit, Some(0), "the top signature first");
        let sealed = body_hash_keys(&m, true);
        assert_eq!(sealed.len(), MAX_BODY_HASHES);
        assert_eq!(sealed[0], super::super::seal::SEALED_BODY);
        // Repeated keys count once.
        let one = "DKIM-Signature: v=1; a=rsa-sha256; d=x.test; s=s; h=from; bh=AAAA; b=AAAA\r\n";
        let twice = format!("{one}{one}From: a@x.test\r\n\r\nbody\r\n");
        assert_eq!(
            body_hash_keys(&Message::parse(twice.as_bytes()), false).len(),
            1
        );
    }
}
