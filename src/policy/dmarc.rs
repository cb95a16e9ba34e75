//! DMARC evaluation (RFC 7489, with DMARCbis's `np=` and `t=`): the author domain
//! from the single From field, policy discovery at `_dmarc.<author>` and then at the
//! Organizational Domain (the Public Suffix List through the `psl` crate), relaxed or
//! strict identifier alignment (`adkim=`, `aspf=`), and the policy that applies:
//! `p=` for the organizational domain itself, `sp=` for its subdomains, `np=` for
//! subdomains that do not exist (no A, AAAA or MX), lowered one step for a message
//! `pct=` does not select or under `t=y`.
//!
//! Results follow RFC 7489 §11.2: `pass` (an aligned SPF or DKIM pass), `fail`,
//! `none` (no usable record, or more than one), `temperror` (the record could not be
//! fetched), `permerror` (no single author domain: no From, several From fields, or
//! addresses in several domains).
//!
//! The recorded result is the RFC's. tenso's own decisions (the pre-flight, the
//! `dmarc_reject` refusal) are stricter in one respect: a DKIM pass whose `l=`
//! leaves part of the body unsigned does not count, because that part could be
//! anything ([`DmarcVerdict::passes_for_decisions`]).
//!
//! This module decides and renders; the lookups are in [`discover`] and
//! [`super::lookup::domain_exists`].

use super::dkim::{DkimResult, DkimVerdict, Field, Message, Tags, pvalue, tag_list};
use super::lookup::{self, Txt};
use crate::dns::Resolver;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    None,
    Quarantine,
    Reject,
}

impl Policy {
    fn parse(v: &str) -> Option<Policy> {
        match v.to_ascii_lowercase().as_str() {
            "none" => Some(Policy::None),
            "quarantine" => Some(Policy::Quarantine),
            "reject" => Some(Policy::Reject),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::None => "none",
            Policy::Quarantine => "quarantine",
            Policy::Reject => "reject",
        }
    }
    /// The next policy down (RFC 7489 §6.6.4, for a message `pct=` does not select).
    pub fn lower(self) -> Policy {
        match self {
            Policy::Reject => Policy::Quarantine,
            _ => Policy::None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alignment {
    Relaxed,
    Strict,
}

/// A DMARC policy record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub p: Policy,
    pub sp: Option<Policy>,
    pub np: Option<Policy>,
    pub adkim: Alignment,
    pub aspf: Alignment,
    /// 0..=100
    pub pct: u8,
    /// DMARCbis `t=y`: the owner is testing; apply one step lower.
    pub testing: bool,
}

/// Parses a TXT record; None when it is not a DMARC record (does not start with
/// `v=DMARC1`). Bad values are read as DMARCbis says: a missing or unknown `p=` is
/// `none`; an unknown `sp=`/`np=` is ignored; a bad `pct=` is 100; a bad
/// `adkim=`/`aspf=` is relaxed.
pub fn parse_record(txt: &[u8]) -> Option<Record> {
    let tags: Tags = tag_list(txt).ok()?;
    match tags.0.first() {
        Some((n, v)) if n == "v" && v == "DMARC1" => {}
        _ => return None,
    }
    let policy = |n: &str| tags.get(n).and_then(Policy::parse);
    let align = |n: &str| match tags.get(n).map(str::to_ascii_lowercase).as_deref() {
        Some("s") => Alignment::Strict,
        _ => Alignment::Relaxed,
    };
    let pct = tags
        .get("pct")
        .and_then(|v| v.parse::<u8>().ok())
        .filter(|p| *p <= 100)
        .unwrap_or(100);
    Some(Record {
        p: policy("p").unwrap_or(Policy::None),
        sp: policy("sp"),
        np: policy("np"),
        adkim: align("adkim"),
        aspf: align("aspf"),
        pct,
        testing: tags.get("t").is_some_and(|t| t.eq_ignore_ascii_case("y")),
    })
}

/// The Organizational Domain (RFC 7489 §3.2): the public suffix plus one label, by
/// the Public Suffix List; a name that is itself a public suffix stands for itself.
pub fn organizational_domain(domain: &str) -> String {
    let d = domain.trim_end_matches('.').to_ascii_lowercase();
    psl::domain_str(&d).map_or_else(|| d.clone(), str::to_string)
}

/// Identifier alignment (RFC 7489 §3.1).
pub fn aligned(a: &str, b: &str, mode: Alignment) -> bool {
    let a = a.trim_end_matches('.').to_ascii_lowercase();
    let b = b.trim_end_matches('.').to_ascii_lowercase();
    match mode {
        Alignment::Strict => a == b,
        Alignment::Relaxed => organizational_domain(&a) == organizational_domain(&b),
    }
}

/// The author domain (RFC 7489 §6.6.1): the one domain of the one From field.
pub fn author_domain(msg: &Message) -> Result<String, &'static str> {
    let from: Vec<&Field> = msg.fields.iter().filter(|f| f.is("from")).collect();
    let field = match from.as_slice() {
        [] => return Err("no From field"),
        [one] => one,
        _ => return Err("several From fields"),
    };
    let parsed = mail_parser::MessageParser::new()
        .parse_headers(field.raw)
        .ok_or("unreadable From field")?;
    let mut domains: Vec<String> = parsed
        .from()
        .map(|a| {
            a.iter()
                .filter_map(|addr| addr.address.as_deref())
                .filter_map(|x| x.rsplit_once('@').map(|(_, d)| d))
                .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
                .filter(|d| !d.is_empty())
                .collect()
        })
        .unwrap_or_default();
    domains.sort();
    domains.dedup();
    match domains.len() {
        0 => Err("no domain in From"),
        1 => Ok(domains.remove(0)),
        _ => Err("From addresses in several domains"),
    }
}

/// What policy discovery found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    /// The record and the domain it was published at.
    Found {
        record: Record,
        at: String,
    },
    None,
    /// More than one DMARC record at one name: DMARC is not applied (RFC 7489
    /// §6.6.3).
    Ambiguous {
        at: String,
    },
    TempError,
}

fn from_answer(answer: &Txt, at: &str) -> Option<Discovery> {
    match answer {
        Txt::TempError(_) => Some(Discovery::TempError),
        Txt::NotFound => None,
        Txt::Found(records) => {
            let mut dmarc: Vec<Record> = records.iter().filter_map(|r| parse_record(r)).collect();
            match dmarc.len() {
                0 => None,
                1 => Some(Discovery::Found {
                    record: dmarc.remove(0),
                    at: at.to_string(),
                }),
                _ => Some(Discovery::Ambiguous { at: at.to_string() }),
            }
        }
    }
}

/// Policy discovery (RFC 7489 §6.6.3): `_dmarc.<author>`, then
/// `_dmarc.<organizational domain>` when the author domain has none. Both are asked
/// at once (the second answer is used only when the first finds nothing), so a
/// subdomain sender costs one round trip, not two.
pub async fn discover(resolver: &Resolver, author: &str) -> Discovery {
    let author = author.trim_end_matches('.').to_ascii_lowercase();
    let org = organizational_domain(&author);
    let (own_name, org_name) = (format!("_dmarc.{author}"), format!("_dmarc.{org}"));
    let own = lookup::txt(resolver, &own_name);
    if org == author {
        return from_answer(&own.await, &author).unwrap_or(Discovery::None);
    }
    let (own, parent) = tokio::join!(own, lookup::txt(resolver, &org_name));
    from_answer(&own, &author)
        .or_else(|| from_answer(&parent, &org))
        .unwrap_or(Discovery::None)
}

/// Whether the `np=` question arises: the record came from the organizational
/// domain, the author domain is below it, and the record has `np=`.
pub fn needs_existence(d: &Discovery, author: &str) -> bool {
    match d {
        Discovery::Found { record, at } => record.np.is_some() && !at.eq_ignore_ascii_case(author),
        _ => false,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmarcResult {
    None,
    Pass,
    Fail,
    TempError,
    PermError,
}

impl DmarcResult {
    pub fn as_str(self) -> &'static str {
        match self {
            DmarcResult::None => "none",
            DmarcResult::Pass => "pass",
            DmarcResult::Fail => "fail",
            DmarcResult::TempError => "temperror",
            DmarcResult::PermError => "permerror",
        }
    }
}

/// The authenticated identifiers DMARC weighs.
pub struct Inputs<'a> {
    pub dkim: &'a [DkimVerdict],
    /// The RFC5321.MailFrom domain SPF checked (the HELO domain for `<>`).
    pub spf_domain: &'a str,
    pub spf_pass: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmarcVerdict {
    pub result: DmarcResult,
    pub reason: Option<&'static str>,
    /// header.from (empty when there is no single author domain).
    pub author: String,
    pub record: Option<Record>,
    /// The policy for this author domain (`p`, `sp` or `np`).
    pub policy: Policy,
    /// After `pct=` and `t=` (`policy.dmarc`).
    pub applied: Policy,
    pub spf_aligned: bool,
    pub dkim_aligned: bool,
    /// An aligned DKIM pass that covers the whole body.
    pub dkim_aligned_whole: bool,
}

impl DmarcVerdict {
    fn bare(result: DmarcResult, reason: Option<&'static str>, author: &str) -> DmarcVerdict {
        DmarcVerdict {
            result,
            reason,
            author: author.to_string(),
            record: None,
            policy: Policy::None,
            applied: Policy::None,
            spf_aligned: false,
            dkim_aligned: false,
            dkim_aligned_whole: false,
        }
    }

    /// An error before discovery (no single author domain).
    pub fn no_author(why: &'static str) -> DmarcVerdict {
        DmarcVerdict::bare(DmarcResult::PermError, Some(why), "")
    }

    /// Passes when only whole-body DKIM signatures count (see the module doc).
    pub fn passes_for_decisions(&self) -> bool {
        self.spf_aligned || self.dkim_aligned_whole
    }

    /// The policy the destination may apply, for the pre-flight: the applicable one,
    /// or one lower when `pct=0` or `t=y` say it is never applied.
    pub fn predicted_policy(&self) -> Policy {
        match &self.record {
            Some(r) if r.pct == 0 || r.testing => self.policy.lower(),
            Some(_) => self.policy,
            None => Policy::None,
        }
    }

    /// The `dmarc=` resinfo (without the leading `;`).
    pub fn clause(&self) -> String {
        let mut out = format!("dmarc={}", self.result.as_str());
        let mut comments: Vec<String> = Vec::new();
        if let Some(r) = self.reason {
            comments.push(r.to_string());
        }
        if let Some(r) = &self.record {
            let mut tags = format!("p={}", r.p.as_str());
            if let Some(sp) = r.sp {
                tags.push_str(&format!(" sp={}", sp.as_str()));
            }
            if let Some(np) = r.np {
                tags.push_str(&format!(" np={}", np.as_str()));
            }
            if r.pct != 100 {
                tags.push_str(&format!(" pct={}", r.pct));
            }
            if r.testing {
                tags.push_str(" t=y");
            }
            comments.push(tags);
            if self.result == DmarcResult::Pass && !self.passes_for_decisions() {
                comments.push("aligned only by a DKIM signature with unsigned body content".into());
            }
        }
        if !comments.is_empty() {
            out.push_str(&format!(" ({})", comments.join(", ")));
        }
        if !self.author.is_empty() {
            out.push_str(&format!(" header.from={}", pvalue(&self.author)));
        }
        if self.record.is_some() {
            out.push_str(&format!(" policy.dmarc={}", self.applied.as_str()));
        }
        out
    }
}

/// Evaluates DMARC for `author` after discovery. `author_exists` answers the `np=`
/// question (only consulted when [`needs_existence`]); `sample` is a number in
/// 0..100 drawn per message for `pct=`.
pub fn evaluate(
    disc: &Discovery,
    author: &str,
    inputs: &Inputs,
    author_exists: bool,
    sample: u8,
) -> DmarcVerdict {
    let (record, at) = match disc {
        Discovery::Found { record, at } => (record, at),
        Discovery::None => return DmarcVerdict::bare(DmarcResult::None, None, author),
        Discovery::Ambiguous { .. } => {
            return DmarcVerdict::bare(DmarcResult::None, Some("several DMARC records"), author);
        }
        Discovery::TempError => {
            return DmarcVerdict::bare(
                DmarcResult::TempError,
                Some("DMARC record lookup failed"),
                author,
            );
        }
    };
    let dkim_ok = |d: &&DkimVerdict| {
        d.result == DkimResult::Pass
            && d.d
                .as_deref()
                .is_some_and(|dom| aligned(dom, author, record.adkim))
    };
    let dkim_aligned = inputs.dkim.iter().any(|d| dkim_ok(&d));
    let dkim_aligned_whole = inputs
        .dkim
        .iter()
        .filter(dkim_ok)
        .any(DkimVerdict::passes_whole_body);
    let spf_aligned = inputs.spf_pass
        && !inputs.spf_domain.is_empty()
        && aligned(inputs.spf_domain, author, record.aspf);
    let policy = if at.eq_ignore_ascii_case(author) {
        record.p
    } else {
        match record.np {
            Some(np) if !author_exists => np,
            _ => record.sp.unwrap_or(record.p),
        }
    };
    let selected = !record.testing && sample < record.pct;
    DmarcVerdict {
        result: if dkim_aligned || spf_aligned {
            DmarcResult::Pass
        } else {
            DmarcResult::Fail
        },
        reason: None,
        author: author.to_string(),
        record: Some(record.clone()),
        policy,
        applied: if selected { policy } else { policy.lower() },
        spf_aligned,
        dkim_aligned,
        dkim_aligned_whole,
    }
}

#[cfg(test)]
mod tests;
