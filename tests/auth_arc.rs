//! ARC through tenso (issue 12): inbound chains are verified and recorded as
//! `arc=pass|fail|none` in tenso's `Authentication-Results`, and dkimpy's
//! `arc_verify` (an independent implementation) judges the same bytes the same way.
//! - A two-hop chain sealed by dkimpy's `arc_sign`: `arc=pass (i=2)`, with
//!   `header.oldest-pass=0` and the `smtp.remote-ip` the first hop recorded; the
//!   body changed after sealing, or the first hop's results rewritten: `arc=fail`;
//!   no ARC headers: `arc=none`; a chain over a body ending in whitespace-only lines:
//!   `arc=pass` (mail-auth 0.13.3's verifier, printed for the record, fails it).
//! - tenso's own sealer (`[dkim] arc = true`, key from `tenso dkim keygen`): a message
//!   forwarded twice through tenso carries two sets that dkimpy verifies, and tenso
//!   itself verifies its first set on the second pass (`arc=pass`, the original
//!   client's address as `smtp.remote-ip`); a tampered copy fails for both; a copy
//!   too large to stay in memory (sealed from its body hash made from the spool
//!   draft) verifies with dkimpy.

mod auth_support;
mod common;

use auth_support::*;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::daemon::{Tenso, toml_string};
use common::dns::TestDns;
use common::sink::TestSink;
use serde_json::json;
use std::collections::BTreeMap;

const ORIGIN_SPF: &str = "v=spf1 ip4:127.0.0.1 -all";

fn plain(id: &str) -> Vec<u8> {
    format!(
        "From: Sender <sender@origin.test>\r\nTo: list@lists.test\r\nSubject: arc {id}\r\n\
         Date: Tue, 03 Mar 2026 10:00:00 +0000\r\nMessage-ID: <{id}@origin.test>\r\n\r\n\
         Hello list.\r\n\r\n"
    )
    .into_bytes()
}

/// tenso's `arc=` clause of a forwarded copy.
fn arc_clause(data: &[u8]) -> String {
    let ar = our_ar(data, "tenso.test");
    ar_clauses(&ar)
        .into_iter()
        .find(|c| c.starts_with("arc="))
        .unwrap_or_else(|| panic!("no arc clause: {ar}"))
}

/// dkimpy's chain verdict for each copy ("pass", "fail", "none" or "None").
async fn dkimpy_arc(dns: &TestDns, copies: &BTreeMap<String, Vec<u8>>) -> BTreeMap<String, String> {
    let input = json!(
        copies
            .iter()
            .map(|(k, v)| (k.clone(), STANDARD.encode(v)))
            .collect::<BTreeMap<_, _>>()
    );
    let out = dkimpy_script(&["arc-verify", &dns.addr().port().to_string()], &input).await;
    copies
        .keys()
        .map(|k| {
            let cv = out[k]["cv"].as_str().unwrap_or("None").to_string();
            (k.clone(), cv)
        })
        .collect()
}

#[tokio::test]
async fn chains_sealed_by_dkimpy_are_verified() {
    // A body whose last lines hold only whitespace (relaxed canonicalization drops
    // them; mail-auth's does not).
    let ws = String::from_utf8(plain("ws")).unwrap().replace(
        "Hello list.\r\n\r\n",
        "Hello  list. \r\n \t \r\nx  y\t\r\n   \r\n\t\r\n",
    );
    let sealed = dkimpy_script(
        &["arc-sign"],
        &json!({
            "messages": [STANDARD.encode(plain("chain")), STANDARD.encode(&ws)],
            "hops": [
                {"srv_id": "lists.test", "domain": "lists.test", "selector": "arc",
                 "results": "lists.test; spf=pass smtp.mailfrom=sender@origin.test;\r\n\tiprev=pass smtp.remote-ip=192.0.2.7"},
                {"srv_id": "relay.test", "domain": "relay.test", "selector": "arc",
                 "results": "relay.test; arc=pass"},
            ]
        }),
    )
    .await;
    let key = sealed["keys"]["rsa2048"].as_str().unwrap();
    let signed: Vec<String> = sealed["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| String::from_utf8(STANDARD.decode(m.as_str().unwrap()).unwrap()).unwrap())
        .collect();
    let chain = signed[0].clone();
    let dns = spf_zone()
        .txt("origin.test", ORIGIN_SPF)
        .txt("arc._domainkey.lists.test", key)
        .txt("arc._domainkey.relay.test", key)
        .start()
        .await;
    let dest = TestSink::start().await;
    let senders = TestSink::start().await;
    let t = Tenso::start(&config(&dns, &routes(&dest, &senders), "", "", "")).await;
    cli_ok(&t, &["user", "add", "alice@alias.test", "alice@dest.test"]).await;

    let cases: Vec<(&str, String)> = vec![
        ("arc chain", chain.clone()),
        (
            "arc body changed",
            chain.replace("Hello list.", "Hello world."),
        ),
        (
            "arc results rewritten",
            chain.replacen("smtp.remote-ip=192.0.2.7", "smtp.remote-ip=192.0.2.8", 1),
        ),
        ("arc none", String::from_utf8(plain("none")).unwrap()),
        ("arc whitespace lines", signed[1].clone()),
    ];
    for (subject, text) in &cases {
        // Which case it is, in a field no signature covers.
        let text = format!("X-Case: {subject}\r\n{text}");
        submit_ok(
            &t,
            "127.0.0.1",
            "mx.relay.test",
            "sender@origin.test",
            &["alice@alias.test"],
            text.as_bytes(),
        )
        .await;
    }
    dest.wait_for(cases.len(), WAIT).await;
    let copies: BTreeMap<String, Vec<u8>> = dest
        .messages()
        .into_iter()
        .map(|d| (header_values(&d.data, "X-Case")[0].clone(), d.data))
        .collect();
    let clauses: BTreeMap<&str, String> = copies
        .iter()
        .map(|(k, v)| (k.as_str(), arc_clause(v)))
        .collect();
    assert_eq!(
        clauses["arc chain"],
        "arc=pass (i=2) header.oldest-pass=0 smtp.remote-ip=192.0.2.7"
    );
    assert_eq!(
        clauses["arc body changed"],
        "arc=fail (ARC-Message-Signature i=2: body hash mismatch)"
    );
    assert_eq!(
        clauses["arc results rewritten"],
        "arc=fail (ARC-Seal i=2: signature did not verify)"
    );
    assert_eq!(clauses["arc none"], "arc=none smtp.remote-ip=127.0.0.1");
    assert!(
        clauses["arc whitespace lines"].starts_with("arc=pass (i=2)"),
        "{clauses:?}"
    );
    let py = dkimpy_arc(&dns, &copies).await;
    for (id, clause) in &clauses {
        let ours = clause["arc=".len()..].split_whitespace().next().unwrap();
        assert_eq!(ours, py[*id], "{id}: tenso {clause}, dkimpy {}", py[*id]);
        // For the record: what mail-auth 0.13.3's verifier says about the same bytes.
        println!(
            "{id}: tenso {ours}, dkimpy {}, mail-auth {}",
            py[*id],
            mail_auth_arc(&dns, &copies[*id]).await
        );
    }
}

async fn mail_auth_arc(dns: &TestDns, msg: &[u8]) -> String {
    let auth = mail_auth::MessageAuthenticator(dns.resolver());
    let parsed = mail_auth::AuthenticatedMessage::parse(msg).expect("message parses");
    format!("{:?}", auth.verify_arc(&parsed).await.result())
}

#[tokio::test]
async fn tensos_own_seals_verify_with_dkimpy_and_with_tenso() {
    let keydir = tempfile::tempdir().expect("tempdir");
    let (key_path, txt) = tenso_keygen(keydir.path(), "rsa", "fwd1", "fwd.test").await;
    let dns = spf_zone()
        .txt("origin.test", ORIGIN_SPF)
        .txt("fwd1._domainkey.fwd.test", &txt)
        .start()
        .await;
    let dest = TestSink::start().await;
    let senders = TestSink::start().await;
    let dkim = format!(
        "[dkim]\ndomain = \"fwd.test\"\nselector = \"fwd1\"\nkey = {}\narc = true\n",
        toml_string(&key_path.to_string_lossy())
    );
    let t = Tenso::start(&config(&dns, &routes(&dest, &senders), "", "", &dkim)).await;
    for u in ["alice", "bob", "carol"] {
        cli_ok(
            &t,
            &[
                "user",
                "add",
                &format!("{u}@alias.test"),
                &format!("{u}@dest.test"),
            ],
        )
        .await;
    }
    submit_ok(
        &t,
        "127.0.0.1",
        "mx.origin.test",
        "sender@origin.test",
        &["alice@alias.test"],
        &plain("own"),
    )
    .await;
    let first = dest.wait_for(1, WAIT).await[0].data.clone();
    assert_eq!(arc_clause(&first), "arc=none smtp.remote-ip=127.0.0.1");
    assert_eq!(
        header_values(&first, "ARC-Seal").len(),
        1,
        "{}",
        String::from_utf8_lossy(&first)
    );
    assert!(header_values(&first, "ARC-Seal")[0].contains("cv=none"));

    // The copy comes back (a second hop through tenso, from another client).
    submit_ok(
        &t,
        "127.0.0.2",
        "mx.dest.test",
        "alice@dest.test",
        &["bob@alias.test"],
        &first,
    )
    .await;
    let second = dest
        .wait_for(2, WAIT)
        .await
        .into_iter()
        .find(|d| d.rcpts == ["bob@dest.test"])
        .unwrap()
        .data;
    assert_eq!(
        arc_clause(&second),
        "arc=pass (i=1) header.oldest-pass=0 smtp.remote-ip=127.0.0.1"
    );
    let seals = header_values(&second, "ARC-Seal");
    assert_eq!(seals.len(), 2);
    assert!(
        seals[0].contains("i=2") && seals[0].contains("cv=pass"),
        "{seals:?}"
    );

    let text = String::from_utf8(second.clone()).unwrap();
    let tampered = text.replace("Hello list.", "Hello, changed.");
    submit_ok(
        &t,
        "127.0.0.2",
        "mx.dest.test",
        "bob@dest.test",
        &["carol@alias.test"],
        tampered.as_bytes(),
    )
    .await;
    let third = dest
        .wait_for(3, WAIT)
        .await
        .into_iter()
        .find(|d| d.rcpts == ["carol@dest.test"])
        .unwrap()
        .data;
    assert_eq!(
        arc_clause(&third),
        "arc=fail (ARC-Message-Signature i=2: body hash mismatch)"
    );
    assert_eq!(
        header_values(&third, "ARC-Seal").len(),
        2,
        "a failed chain is not extended"
    );

    // A body past what a session keeps in memory: sealed from its hash made in
    // pieces from the spool draft.
    let mut large = plain("own-large");
    for i in 0..8000 {
        large.extend_from_slice(format!("line {i}  with \t blanks \r\n").as_bytes());
    }
    large.extend_from_slice(b" \r\n\r\n");
    assert!(large.len() > 200 * 1024);
    submit_ok(
        &t,
        "127.0.0.1",
        "mx.origin.test",
        "sender@origin.test",
        &["bob@alias.test"],
        &large,
    )
    .await;
    let large = dest
        .wait_for(4, WAIT)
        .await
        .into_iter()
        .find(|d| d.data.windows(9).any(|w| w == b"own-large"))
        .unwrap()
        .data;
    assert_eq!(arc_clause(&large), "arc=none smtp.remote-ip=127.0.0.1");

    let copies: BTreeMap<String, Vec<u8>> = [
        ("first".to_string(), first),
        ("large".to_string(), large),
        ("second".to_string(), second),
        ("tampered".to_string(), tampered.into_bytes()),
    ]
    .into_iter()
    .collect();
    let py = dkimpy_arc(&dns, &copies).await;
    assert_eq!(
        py.into_iter().collect::<Vec<_>>(),
        [
            ("first".to_string(), "pass".to_string()),
            ("large".to_string(), "pass".to_string()),
            ("second".to_string(), "pass".to_string()),
            ("tampered".to_string(), "fail".to_string()),
        ]
    );
}
