//! DMARC by the book through real DNS (issue 12): policy discovery at the
//! organizational domain (Public Suffix List), `sp=` for subdomains, DMARCbis `np=`
//! for subdomains that do not exist, `pct=0` and `t=y` lowering the policy, relaxed
//! and strict DKIM alignment, relaxed SPF alignment, and a DKIM pass whose `l=`
//! leaves appended content unsigned, which is recorded as a pass but counts for
//! nothing in tenso's decisions. DKIM signatures are made by dkimpy.
//!
//! - Pre-flight (`dmarc_preflight = "pool"`): which messages are pooled, which are
//!   forwarded, and what tenso's `Authentication-Results` says about each.
//! - `dmarc_reject = true`: which messages get `550 5.7.1` at the end of DATA.

mod auth_support;
mod common;

use auth_support::*;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::daemon::Tenso;
use common::dns::{TestDns, TestDnsBuilder};
use common::sink::TestSink;
use serde_json::json;
use std::collections::BTreeMap;

const PASS_SPF: &str = "v=spf1 ip4:127.0.0.1 -all";

/// Signing domains (DKIM d=) whose keys the zone publishes.
const SIGNERS: [&str; 4] = [
    "mail.relaxed.test",
    "mail.strict.test",
    "partial.test",
    "whole.test",
];

fn zone(ed25519_txt: &str) -> TestDnsBuilder {
    let mut z = spf_zone()
        // The envelope sender of most messages: SPF passes, but it is not aligned.
        .txt("bounce.other.test", PASS_SPF)
        .txt("mail.spfal.test", PASS_SPF)
        .txt("_dmarc.org.test", "v=DMARC1; p=none; sp=reject")
        .a("sub.org.test", "127.0.0.9")
        .txt("_dmarc.np.test", "v=DMARC1; p=none; sp=none; np=reject")
        .a("real.np.test", "127.0.0.9")
        .txt("_dmarc.pct0.test", "v=DMARC1; p=reject; pct=0")
        .txt("_dmarc.testing.test", "v=DMARC1; p=reject; t=y")
        .txt("_dmarc.relaxed.test", "v=DMARC1; p=reject")
        .txt("_dmarc.strict.test", "v=DMARC1; p=reject; adkim=s")
        .txt("_dmarc.spfal.test", "v=DMARC1; p=reject")
        .txt("_dmarc.partial.test", "v=DMARC1; p=reject")
        .txt("_dmarc.whole.test", "v=DMARC1; p=reject");
    for d in SIGNERS {
        z = z.txt(&format!("ed25519._domainkey.{d}"), ed25519_txt);
    }
    z
}

/// A message case: From domain, envelope sender, DKIM signing domain (with l=?),
/// content appended after signing.
struct Msg {
    id: &'static str,
    from: &'static str,
    sender: &'static str,
    dkim: Option<(&'static str, bool)>,
    append: &'static str,
}

fn msg(id: &'static str, from: &'static str) -> Msg {
    Msg {
        id,
        from,
        sender: "bounce@bounce.other.test",
        dkim: None,
        append: "",
    }
}

fn messages() -> Vec<Msg> {
    vec![
        msg("org", "org.test"),
        msg("sub-org", "sub.org.test"),
        msg("np-real", "real.np.test"),
        msg("np-ghost", "ghost.np.test"),
        msg("pct0", "pct0.test"),
        msg("testing", "testing.test"),
        Msg {
            dkim: Some(("mail.relaxed.test", false)),
            ..msg("relaxed", "relaxed.test")
        },
        Msg {
            dkim: Some(("mail.strict.test", false)),
            ..msg("strict", "strict.test")
        },
        Msg {
            sender: "x@mail.spfal.test",
            ..msg("spf-aligned", "spfal.test")
        },
        Msg {
            dkim: Some(("partial.test", true)),
            append: "\r\n-- \r\nAppended after signing, outside l=.\r\n",
            ..msg("partial", "partial.test")
        },
        Msg {
            dkim: Some(("whole.test", true)),
            ..msg("whole", "whole.test")
        },
        msg("relaxed-unsigned", "relaxed.test"),
    ]
}

/// Every case signed as it says (by dkimpy, Ed25519), with its addition after
/// signing; and the key's TXT value.
async fn signed(cases: &[Msg]) -> (BTreeMap<&'static str, Vec<u8>>, String) {
    let body = |m: &Msg| {
        format!(
            "From: Someone <someone@{}>\r\nTo: alice@alias.test\r\nSubject: dmarc {}\r\n\
             Date: Tue, 03 Mar 2026 10:00:00 +0000\r\nMessage-ID: <{}@test>\r\n\r\nHello.\r\n",
            m.from, m.id, m.id
        )
    };
    let spec = json!({"cases": cases.iter().map(|m| json!({
        "id": m.id,
        "message": STANDARD.encode(body(m)),
        "steps": m.dkim.iter().map(|(d, l)| json!({
            "key": "ed25519", "selector": "ed25519", "domain": d, "canon": "relaxed/relaxed",
            "headers": ["from", "to", "subject", "date", "message-id"], "length": l,
        })).collect::<Vec<_>>(),
    })).collect::<Vec<_>>()});
    let out = dkimpy_script(&["sign"], &spec).await;
    let msgs = cases
        .iter()
        .map(|m| {
            let mut b = STANDARD
                .decode(out["signed"][m.id].as_str().unwrap())
                .unwrap();
            b.extend_from_slice(m.append.as_bytes());
            (m.id, b)
        })
        .collect();
    (msgs, out["keys"]["ed25519"].as_str().unwrap().to_string())
}

async fn start(dns: &TestDns, dest: &TestSink, senders: &TestSink, auth: &str) -> Tenso {
    let mut routes = routes(dest, senders);
    routes.extend([
        ("other.test", senders.port()),
        ("spfal.test", senders.port()),
    ]);
    let t = Tenso::start(&config(dns, &routes, "", auth, "")).await;
    cli_ok(&t, &["user", "add", "alice@alias.test", "alice@dest.test"]).await;
    t
}

/// (result, policy.dmarc) of the dmarc clause, and the whole clause.
fn dmarc_clause(data: &[u8]) -> (String, String, String) {
    let ar = our_ar(data, "tenso.test");
    let clause = ar_clauses(&ar)
        .into_iter()
        .find(|c| c.starts_with("dmarc="))
        .unwrap_or_else(|| panic!("no dmarc clause: {ar}"));
    let result = clause["dmarc=".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let policy = clause
        .split_whitespace()
        .find_map(|w| w.strip_prefix("policy.dmarc="))
        .unwrap_or("-")
        .to_string();
    (result, policy, clause)
}

fn subject_id(data: &[u8]) -> String {
    header_values(data, "Subject")[0]
        .strip_prefix("dmarc ")
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn preflight_follows_sp_np_pct_alignment_and_partial_signatures() {
    let cases = messages();
    let (msgs, key) = signed(&cases).await;
    let dns = zone(&key).start().await;
    let dest = TestSink::start().await;
    let senders = TestSink::start().await;
    let t = start(&dns, &dest, &senders, "dmarc_preflight = \"pool\"").await;
    for m in &cases {
        submit_ok(
            &t,
            "127.0.0.1",
            "client.test",
            m.sender,
            &["alice@alias.test"],
            &msgs[m.id],
        )
        .await;
    }
    // (id, forwarded?, dmarc result, policy.dmarc)
    let want: BTreeMap<&str, (bool, &str, &str)> = [
        ("org", (true, "fail", "none")),
        ("sub-org", (false, "fail", "reject")),
        ("np-real", (true, "fail", "none")),
        ("np-ghost", (false, "fail", "reject")),
        ("pct0", (true, "fail", "quarantine")),
        ("testing", (true, "fail", "quarantine")),
        ("relaxed", (true, "pass", "reject")),
        ("strict", (false, "fail", "reject")),
        ("spf-aligned", (false, "pass", "reject")),
        ("partial", (false, "pass", "reject")),
        ("whole", (true, "pass", "reject")),
        ("relaxed-unsigned", (false, "fail", "reject")),
    ]
    .into_iter()
    .collect();
    let forwarded_n = want.values().filter(|w| w.0).count();
    let delivered = dest.wait_for(forwarded_n, WAIT).await;
    wait_queue_empty(&t).await;
    let mut seen: BTreeMap<String, (bool, String, String, String)> = BTreeMap::new();
    for d in dest.messages() {
        let (r, p, c) = dmarc_clause(&d.data);
        seen.insert(subject_id(&d.data), (true, r, p, c));
    }
    assert_eq!(delivered.len(), forwarded_n);
    for m in pool_messages(&t, "alice@alias.test") {
        let (r, p, c) = dmarc_clause(&m);
        let reason = header_values(&m, "X-Tenso-Pool-Reason")[0].clone();
        assert!(reason.starts_with("DMARC pre-flight"), "{reason}");
        if subject_id(&m) == "partial" {
            assert!(reason.contains("that covers the whole body"), "{reason}");
            let ar = our_ar(&m, "tenso.test");
            assert!(
                ar.contains("dkim=pass (l=") && ar.contains("body octets after it not signed"),
                "the l= pass is recorded with its unsigned remainder: {ar}"
            );
        }
        seen.insert(subject_id(&m), (false, r, p, c));
    }
    let got: BTreeMap<&str, (bool, &str, &str)> = seen
        .iter()
        .map(|(k, (f, r, p, _))| (k.as_str(), (*f, r.as_str(), p.as_str())))
        .collect();
    assert_eq!(
        got,
        want,
        "clauses: {:#?}",
        seen.values().map(|v| &v.3).collect::<Vec<_>>()
    );
    // tenso asked whether ghost.np.test exists (np=), and not for names that did not need it.
    assert!(dns.query_count("ghost.np.test", hickory_server::proto::rr::RecordType::MX) >= 1);
    assert_eq!(
        dns.query_count("sub.org.test", hickory_server::proto::rr::RecordType::MX),
        0
    );
    // Discovery went from the author domain to the organizational domain.
    assert!(
        dns.query_count(
            "_dmarc.sub.org.test",
            hickory_server::proto::rr::RecordType::TXT
        ) >= 1
    );
    assert!(
        dns.query_count(
            "_dmarc.org.test",
            hickory_server::proto::rr::RecordType::TXT
        ) >= 1
    );
}

#[tokio::test]
async fn dmarc_reject_refuses_only_what_the_policy_rejects() {
    let cases = messages();
    let (msgs, key) = signed(&cases).await;
    let dns = zone(&key).start().await;
    let dest = TestSink::start().await;
    let senders = TestSink::start().await;
    let t = start(
        &dns,
        &dest,
        &senders,
        "dmarc_reject = true\ndmarc_preflight = \"off\"",
    )
    .await;
    let mut refused = BTreeMap::new();
    for m in &cases {
        match submit(
            &t,
            "127.0.0.1",
            "client.test",
            m.sender,
            &["alice@alias.test"],
            &msgs[m.id],
        )
        .await
        {
            Ok((250, _)) => {}
            Ok(other) => panic!("{}: {other:?}", m.id),
            Err(e) => {
                assert_eq!((e.stage, e.code), ("DOT", 550), "{}: {e}", m.id);
                assert!(e.text.contains("5.7.1"), "{e}");
                refused.insert(m.id, e.text);
            }
        }
    }
    let ids: Vec<&str> = refused.keys().copied().collect();
    assert_eq!(
        ids,
        [
            "np-ghost",
            "partial",
            "relaxed-unsigned",
            "strict",
            "sub-org"
        ],
        "{refused:#?}"
    );
    assert!(
        refused["partial"].contains("leaves part of the body unsigned"),
        "{}",
        refused["partial"]
    );
    dest.wait_for(cases.len() - refused.len(), WAIT).await;
}
