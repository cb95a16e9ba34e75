use super::*;
use crate::policy::seal::{SEALED_BODY, Sealer};

const NOW: i64 = 1_700_000_000;

/// A sealer for `d=example.org s=<selector>` with a fresh key, and its key record.
fn sealer(dir: &std::path::Path, selector: &str, ed25519: bool) -> (Sealer, (String, Txt)) {
    let alg = if ed25519 {
        &rcgen::PKCS_ED25519
    } else {
        &rcgen::PKCS_RSA_SHA256
    };
    let pair = rcgen::KeyPair::generate_for(alg).unwrap();
    let path = dir.join(format!("{selector}.pem"));
    std::fs::write(&path, pair.serialize_pem()).unwrap();
    let (k, p) = if ed25519 {
        ("ed25519", pair.public_key_raw().to_vec())
    } else {
        ("rsa", rcgen::PublicKeyData::subject_public_key_info(&pair))
    };
    use base64::Engine;
    let txt = format!(
        "v=DKIM1; k={k}; p={}",
        base64::engine::general_purpose::STANDARD.encode(p)
    );
    (
        Sealer::load(&path, "example.org", selector).unwrap(),
        (
            format!("{selector}._domainkey.example.org"),
            Txt::Found(vec![txt.into_bytes()]),
        ),
    )
}

const MSG: &str = "From: Joe <joe@origin.example>\r\nTo: list@example.org\r\nSubject: hello\r\nDate: Tue, 03 Mar 2026 10:00:00 +0000\r\nMessage-ID: <1@origin.example>\r\n\r\nHello.\r\n\r\n \r\n";

fn check(msg: &[u8], keys: &HashMap<String, Txt>) -> ArcVerdict {
    let m = Message::parse(msg);
    let p = prepare(&m);
    let names = key_names(&p);
    for n in &names {
        assert!(
            keys.contains_key(&n.to_ascii_lowercase()),
            "no key {n} in the test"
        );
    }
    let bodies = BodyHashes::of(m.body, body_hash_keys(&p));
    verify(&m, &p, keys, &bodies, NOW)
}

/// `s.seal` with the body hash it needs.
fn seal(s: &Sealer, msg: &[u8], v: &ArcVerdict, results: &str) -> Option<Vec<u8>> {
    let bodies = BodyHashes::of(Message::parse(msg).body, [SEALED_BODY]);
    s.seal(msg, &bodies, v, results, NOW).unwrap()
}

/// Seals `msg` with `s` after checking it; returns the sealed message.
fn hop(s: &Sealer, msg: &[u8], keys: &HashMap<String, Txt>, results: &str) -> Vec<u8> {
    let v = check(msg, keys);
    let set = seal(s, msg, &v, results).expect("sealed");
    [set, msg.to_vec()].concat()
}

#[test]
fn two_hops_pass_and_tampering_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (first, k1) = sealer(dir.path(), "one", false);
    let (second, k2) = sealer(dir.path(), "two", true);
    let keys: HashMap<String, Txt> = [k1, k2].into_iter().collect();
    assert_eq!(check(MSG.as_bytes(), &keys), ArcVerdict::none());

    let one = hop(
        &first,
        MSG.as_bytes(),
        &keys,
        "lists.example.org;\r\n\tspf=pass smtp.mailfrom=joe@origin.example;\r\n\tiprev=pass smtp.remote-ip=192.0.2.7",
    );
    let v = check(&one, &keys);
    assert_eq!(
        (v.result, v.instances, v.oldest_pass),
        (ArcResult::Pass, 1, Some(0)),
        "{v:?}"
    );
    assert_eq!(v.remote_ip, Some("192.0.2.7".parse().unwrap()));

    let two = hop(&second, &one, &keys, "fwd.example.org; arc=pass");
    let v = check(&two, &keys);
    assert_eq!(
        (v.result, v.instances, v.oldest_pass),
        (ArcResult::Pass, 2, Some(0)),
        "{v:?}"
    );
    assert_eq!(
        v.remote_ip,
        Some("192.0.2.7".parse().unwrap()),
        "from the oldest set"
    );
    assert_eq!(
        v.clause("127.0.0.1".parse().unwrap()),
        "arc=pass (i=2) header.oldest-pass=0 smtp.remote-ip=192.0.2.7"
    );

    let text = String::from_utf8(two.clone()).unwrap();
    // The body changed after the last hop: the newest AMS fails.
    let body = text.replace("Hello.", "Hullo.");
    let v = check(body.as_bytes(), &keys);
    assert_eq!(v.result, ArcResult::Fail);
    assert_eq!(
        v.reason.as_deref(),
        Some("ARC-Message-Signature i=2: body hash mismatch")
    );
    // The first hop's results rewritten: its seal fails.
    let aar = text.replace(
        "iprev=pass smtp.remote-ip=192.0.2.7",
        "iprev=pass smtp.remote-ip=192.0.2.8",
    );
    let v = check(aar.as_bytes(), &keys);
    assert_eq!(
        v.reason.as_deref(),
        Some("ARC-Seal i=2: signature did not verify")
    );
    // Moving sets around in the header does not matter: instances order them.
    let fields = Message::parse(&two);
    let mut reordered: Vec<u8> = Vec::new();
    for f in fields.fields.iter().rev() {
        reordered.extend_from_slice(f.raw);
    }
    reordered.extend_from_slice(b"\r\n");
    reordered.extend_from_slice(fields.body);
    assert_eq!(check(&reordered, &keys).result, ArcResult::Pass);
}

#[test]
fn the_body_changed_before_the_last_hop_shows_in_oldest_pass() {
    let dir = tempfile::tempdir().unwrap();
    let (first, k1) = sealer(dir.path(), "one", true);
    let (second, k2) = sealer(dir.path(), "two", false);
    let keys: HashMap<String, Txt> = [k1, k2].into_iter().collect();
    let one = hop(
        &first,
        MSG.as_bytes(),
        &keys,
        "lists.example.org; spf=pass smtp.mailfrom=joe@origin.example",
    );
    // A mailing list checks the chain, adds a footer, then seals: AMS 1 no longer
    // verifies, the list's own AMS does.
    let at_list = check(&one, &keys);
    let footer = [one, b"-- \r\nthe list\r\n".to_vec()].concat();
    let set = seal(&second, &footer, &at_list, "list.example.org; arc=pass").unwrap();
    let two = [set, footer].concat();
    let v = check(&two, &keys);
    assert_eq!(
        (v.result, v.oldest_pass, v.remote_ip),
        (ArcResult::Pass, Some(2), None),
        "{v:?}"
    );
}

fn set(i: u32, cv: &str) -> String {
    format!(
        "ARC-Seal: i={i}; cv={cv}; a=rsa-sha256; d=example.org; s=one; b=AAAA\r\n\
         ARC-Message-Signature: i={i}; a=rsa-sha256; d=example.org; s=one; h=from; bh=AAAA; b=AAAA\r\n\
         ARC-Authentication-Results: i={i}; example.org; arc=none\r\n"
    )
}

#[test]
fn structure_failures() {
    let body = "From: a@example.org\r\n\r\nx\r\n";
    let cases: &[(String, &str)] = &[
        (set(2, "none"), "ARC set i=1 incomplete"),
        (
            format!("{}{}", set(1, "none"), set(1, "none")),
            "two arc-seal with i=1",
        ),
        (set(1, "pass"), "ARC-Seal i=1 has cv=pass, not none"),
        (
            format!("{}{}", set(2, "none"), set(1, "none")),
            "ARC-Seal i=2 has cv=none, not pass",
        ),
        (
            format!("{}{}", set(2, "fail"), set(1, "none")),
            "the newest ARC-Seal says cv=fail",
        ),
        (set(51, "pass"), "arc-seal without a valid i="),
        (
            set(1, "none").replace(
                "ARC-Authentication-Results: i=1",
                "ARC-Authentication-Results: i=x",
            ),
            "arc-authentication-results without a valid i=",
        ),
        (
            set(1, "none").replace("; b=AAAA\r\nARC-Message", "; h=from; b=AAAA\r\nARC-Message"),
            "ARC-Seal with h=",
        ),
        (
            set(1, "none").replace("cv=none; ", ""),
            "ARC-Seal missing a required tag",
        ),
    ];
    for (headers, why) in cases {
        let msg = format!("{headers}{body}");
        match prepare(&Message::parse(msg.as_bytes())) {
            Prepared::Done(v) => {
                assert_eq!(
                    (v.result, v.reason.as_deref()),
                    (ArcResult::Fail, Some(*why)),
                    "{headers}"
                )
            }
            Prepared::Chain(_) => panic!("accepted: {headers}"),
        }
    }
}

#[test]
fn missing_keys_fail_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let (first, k1) = sealer(dir.path(), "one", false);
    let keys: HashMap<String, Txt> = [k1.clone()].into_iter().collect();
    let one = hop(&first, MSG.as_bytes(), &keys, "lists.example.org; spf=pass");
    let gone: HashMap<String, Txt> = [(k1.0.clone(), Txt::NotFound)].into_iter().collect();
    assert_eq!(
        check(&one, &gone).reason.as_deref(),
        Some("ARC-Message-Signature i=1: no key for signature")
    );
    let temp: HashMap<String, Txt> = [(k1.0, Txt::TempError("timeout".into()))]
        .into_iter()
        .collect();
    let v = check(&one, &temp);
    assert_eq!(v.result, ArcResult::Fail);
    assert_eq!(
        v.clause("127.0.0.1".parse().unwrap()),
        "arc=fail (ARC-Message-Signature i=1: key lookup failed)"
    );
}

#[test]
fn a_failed_chain_is_not_extended() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = sealer(dir.path(), "one", true);
    let failed = ArcVerdict::fail(1, "x");
    assert_eq!(seal(&s, MSG.as_bytes(), &failed, "a; none"), None);
    let full = ArcVerdict {
        result: ArcResult::Pass,
        reason: None,
        instances: MAX_INSTANCES,
        oldest_pass: Some(0),
        remote_ip: None,
    };
    assert_eq!(seal(&s, MSG.as_bytes(), &full, "a; none"), None);
}

#[test]
fn remote_ip_properties() {
    assert_eq!(
        remote_ip(b" i=1; a.example; iprev=pass smtp.remote-ip=2001:db8::1"),
        Some("2001:db8::1".parse().unwrap())
    );
    assert_eq!(
        remote_ip(b" i=1; a.example; iprev=pass policy.iprev=192.0.2.1 (x)"),
        Some("192.0.2.1".parse().unwrap())
    );
    assert_eq!(
        remote_ip(b" i=1; a.example; spf=pass smtp.mailfrom=a@b"),
        None
    );
    assert_eq!(
        remote_ip(b" i=1; a.example; iprev=pass smtp.remote-ip=nonsense"),
        None
    );
}

proptest::proptest! {
    /// Any header section made of ARC-looking fields: a verdict, never a panic, and
    /// never `pass` without keys.
    #[test]
    fn prepare_and_verify_never_panic(
        fields in proptest::collection::vec(
            (0usize..3, 0u32..5, proptest::sample::select(vec!["none", "pass", "fail", "x"]), "[ -~]{0,20}"),
            0..8,
        )
    ) {
        let names = ["ARC-Seal", "ARC-Message-Signature", "ARC-Authentication-Results"];
        let mut msg = String::new();
        for (k, i, cv, junk) in &fields {
            msg.push_str(&format!("{}: i={i}; cv={cv}; a=rsa-sha256; d=x.test; s=s; h=from; bh=AAAA; b=AAAA; {junk}\r\n", names[*k]));
        }
        msg.push_str("From: a@x.test\r\n\r\nbody\r\n");
        let m = Message::parse(msg.as_bytes());
        let p = prepare(&m);
        let bodies = BodyHashes::of(m.body, body_hash_keys(&p));
        let v = verify(&m, &p, &HashMap::new(), &bodies, NOW);
        proptest::prop_assert!(v.result != ArcResult::Pass);
        proptest::prop_assert_eq!(v.result == ArcResult::None, fields.is_empty());
    }
}
