use super::*;
use aws_lc_rs::digest;
use proptest::prelude::*;

fn crlf(s: &str) -> Vec<u8> {
    s.replace("\r\n", "\n").replace('\n', "\r\n").into_bytes()
}

/// RFC 6376 §3.4.5.
#[test]
fn canonicalization_example_of_rfc6376() {
    let msg = b"A: X\r\nB : Y\t\r\n\tZ  \r\n\r\n C \r\nD \t E\r\n\r\n\r\n";
    let m = Message::parse(msg);
    assert_eq!(m.fields.len(), 2);
    let mut relaxed = Vec::new();
    let mut simple = Vec::new();
    for f in &m.fields {
        canon_header(Canon::Relaxed, f.raw, &mut relaxed);
        canon_header(Canon::Simple, f.raw, &mut simple);
    }
    assert_eq!(relaxed, b"a:X\r\nb:Y Z\r\n");
    assert_eq!(simple, b"A: X\r\nB : Y\t\r\n\tZ  \r\n");
    assert_eq!(canon_body(Canon::Relaxed, m.body), b" C\r\nD E\r\n");
    assert_eq!(canon_body(Canon::Simple, m.body), b" C \r\nD \t E\r\n");
}

#[test]
fn body_canonicalization_table() {
    // (body, simple, relaxed)
    let cases: &[(&[u8], &[u8], &[u8])] = &[
        (b"", b"\r\n", b""),
        (b"\r\n", b"\r\n", b""),
        (b"\r\n\r\n\r\n", b"\r\n", b""),
        (b"  \r\n\t\r\n", b"  \r\n\t\r\n", b""),
        (b"abc", b"abc\r\n", b"abc\r\n"),
        (b"abc\r\n\r\n\r\n", b"abc\r\n", b"abc\r\n"),
        (
            b"abc\r\n  \r\n \t \r\n",
            b"abc\r\n  \r\n \t \r\n",
            b"abc\r\n",
        ),
        (b"a  b\t\tc  \r\n", b"a  b\t\tc  \r\n", b"a b c\r\n"),
        (b"\r\nx\r\n", b"\r\nx\r\n", b"\r\nx\r\n"),
        (b"x\r\n\r\ny\r\n\r\n", b"x\r\n\r\ny\r\n", b"x\r\n\r\ny\r\n"),
    ];
    for (body, simple, relaxed) in cases {
        assert_eq!(
            canon_body(Canon::Simple, body),
            *simple,
            "simple {:?}",
            String::from_utf8_lossy(body)
        );
        assert_eq!(
            canon_body(Canon::Relaxed, body),
            *relaxed,
            "relaxed {:?}",
            String::from_utf8_lossy(body)
        );
    }
}

#[test]
fn message_split() {
    let m = Message::parse(b"From: a\r\n b\r\nbogus line\r\n c\r\nTo: x\r\n\r\nbody\r\n");
    let names: Vec<&[u8]> = m.fields.iter().map(|f| f.name).collect();
    assert_eq!(names, [&b"From"[..], b"To"]);
    assert_eq!(m.fields[0].raw, b"From: a\r\n b\r\n");
    assert_eq!(m.body, b"body\r\n");
    let m = Message::parse(b"From: a\r\n");
    assert_eq!((m.fields.len(), m.body), (1, &b""[..]));
    let m = Message::parse(b"\r\nbody");
    assert_eq!((m.fields.len(), m.body), (0, &b"body"[..]));
}

#[test]
fn tag_lists() {
    let ok = tag_list(b" v=1; a = rsa-sha256 ;\r\n\th=from :\r\n to; ").unwrap();
    assert_eq!(ok.get("v"), Some("1"));
    assert_eq!(ok.get("a"), Some("rsa-sha256"));
    assert_eq!(ok.get("h"), Some("from :\r\n to"));
    for bad in [
        &b"v=1; v=1"[..],
        b"v=1;; a=b",
        b"v",
        b"1v=1",
        b"v=1; a-b=c",
        b"v=\x01",
    ] {
        assert!(tag_list(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
    }
    assert_eq!(tag_list(b"").unwrap(), Tags::default());
}

#[test]
fn b_value_is_removed_and_nothing_else() {
    let cases: &[(&[u8], &[u8])] = &[
        (
            b"DKIM-Signature: a=x; bh=AAA=; b=QUJD\r\n",
            b"DKIM-Signature: a=x; bh=AAA=; b=\r\n",
        ),
        (
            b"DKIM-Signature: b=QU\r\n JD; bh=AAA=\r\n",
            b"DKIM-Signature: b=; bh=AAA=\r\n",
        ),
        (
            b"DKIM-Signature: b = QUJD ; d=x\r\n",
            b"DKIM-Signature: b = ; d=x\r\n",
        ),
        (
            b"DKIM-Signature: bh=AAA=; d=x\r\n",
            b"DKIM-Signature: bh=AAA=; d=x\r\n",
        ),
        (
            b"DKIM-Signature: d=b; b=\r\n",
            b"DKIM-Signature: d=b; b=\r\n",
        ),
    ];
    for (raw, want) in cases {
        assert_eq!(
            String::from_utf8_lossy(&strip_b_value(raw)),
            String::from_utf8_lossy(want)
        );
    }
}

const GOOD: &str =
    "v=1; a=rsa-sha256; c=relaxed/simple; d=example.org; s=sel; h=from:to; bh=AAAA; b=AAAA";

#[test]
fn signature_tags() {
    let s = parse_signature(GOOD.as_bytes()).unwrap();
    assert_eq!(
        (s.header_canon, s.body_canon),
        (Canon::Relaxed, Canon::Simple)
    );
    assert_eq!(s.h, ["from", "to"]);
    assert_eq!(s.key_name(), "sel._domainkey.example.org");
    // (edit of GOOD, the reason)
    let cases: &[(&str, &str)] = &[
        ("v=1; ", "missing required tag v="),
        ("bh=AAAA; ", "missing required tag bh="),
        ("h=from:to; ", "missing required tag h="),
        ("d=example.org; ", "missing required tag d="),
        ("s=sel; ", "missing required tag s="),
        ("a=rsa-sha256; ", "missing required tag a="),
    ];
    for (cut, why) in cases {
        let v = GOOD.replace(cut, "");
        assert_eq!(
            parse_signature(v.as_bytes()).unwrap_err().reason,
            *why,
            "{v}"
        );
    }
    let without_b = GOOD.replace("; b=AAAA", "");
    assert_eq!(
        parse_signature(without_b.as_bytes()).unwrap_err().reason,
        "missing required tag b="
    );
    let changed: &[(&str, &str, &str)] = &[
        ("v=1", "v=2", "unsupported version in v="),
        ("a=rsa-sha256", "a=rsa-sha512", "unknown algorithm in a="),
        (
            "c=relaxed/simple",
            "c=loose",
            "unknown canonicalization in c=",
        ),
        ("h=from:to", "h=to:subject", "h= does not include From"),
        ("bh=AAAA", "bh=!!", "malformed bh="),
        ("b=AAAA", "b=", "malformed b="),
        ("d=example.org", "d=exa mple.org", "malformed d="),
        ("d=example.org", "d=ex;ample", "tag without '='"),
        ("s=sel", "s=sel; s=two", "duplicate tag"),
        ("s=sel", "s=sel; l=12x", "malformed l="),
        ("s=sel", "s=sel; t=20; x=10", "x= is before t="),
        ("s=sel", "s=sel; q=http", "unsupported query method in q="),
        ("s=sel", "s=sel; i=joe@other.org", "i= is not within d="),
        ("s=sel", "s=sel; i=nobody", "malformed i="),
    ];
    for (from, to, why) in changed {
        let v = GOOD.replace(from, to);
        assert_eq!(
            parse_signature(v.as_bytes()).unwrap_err().reason,
            *why,
            "{v}"
        );
    }
    for fine in [
        "s=sel; i=@mail.example.org",
        "s=sel; i=joe@EXAMPLE.org",
        "s=sel; q=dns/txt",
        "s=sel; l=0",
    ] {
        let v = GOOD.replace("s=sel", fine);
        assert!(parse_signature(v.as_bytes()).is_ok(), "{v}");
    }
}

#[test]
fn key_records() {
    let rsa = "MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDkHlOQoBTzWRiGs5V6NpP3idY6Wk08a5qhdR6wy5bdOKb2jLQiY/J16JYi0Qvx/byYzCNb3W91y3FutACDfzwQ/BC/e/8uBsCR+yz1Lxj+PL6lHvqMKrM3rG4hstT5QjvHO9PzoxZyVYLzBfO2EeC3Ip3G+2kryOTIKT+l/K4w3QIDAQAB";
    let k = parse_key(format!("v=DKIM1; k=rsa; t=y:s; p={rsa}").as_bytes()).unwrap();
    assert!(k.testing && k.strict && matches!(k.key, PublicKey::Rsa(_)));
    let cases: &[(&str, KeyError)] = &[
        ("v=DKIM1; p=", (DkimResult::PermError, "key revoked")),
        (
            "v=DKIM1; k=rsa",
            (DkimResult::PermError, "key record without p="),
        ),
        (
            "v=DKIM2; p=AAAA",
            (DkimResult::PermError, "unsupported key record version"),
        ),
        (
            "k=dsa; p=AAAA",
            (DkimResult::PermError, "unknown key type in k="),
        ),
        (
            "k=ed25519; p=AAAA",
            (DkimResult::PermError, "malformed Ed25519 key"),
        ),
        (
            "s=tlsrpt; p=AAAA",
            (DkimResult::PermError, "key not for email (s=)"),
        ),
        (
            "p=!!!",
            (DkimResult::PermError, "malformed p= in key record"),
        ),
        ("p", (DkimResult::PermError, "malformed key record")),
    ];
    for (txt, want) in cases {
        assert_eq!(parse_key(txt.as_bytes()).unwrap_err(), *want, "{txt}");
    }
    let sig = parse_signature(GOOD.as_bytes()).unwrap();
    let found = |t: &str| Txt::Found(vec![t.as_bytes().to_vec()]);
    assert!(key_for(Some(&found(&format!("p={rsa}"))), &sig).is_ok());
    assert_eq!(
        key_for(Some(&found(&format!("h=sha1; p={rsa}"))), &sig)
            .unwrap_err()
            .1,
        "key does not allow this hash (h=)"
    );
    assert_eq!(
        key_for(
            Some(&found(
                "k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
            )),
            &sig
        )
        .unwrap_err()
        .1,
        "key type does not match a="
    );
    assert_eq!(
        key_for(Some(&Txt::NotFound), &sig).unwrap_err(),
        (DkimResult::PermError, "no key for signature")
    );
    assert_eq!(
        key_for(Some(&Txt::TempError("x".into())), &sig)
            .unwrap_err()
            .0,
        DkimResult::TempError
    );
    // A 512-bit RSA key (RFC 8301 §3.2 wants at least 1024).
    let short = "MFwwDQYJKoZIhvcNAQEBBQADSwAwSAJBAMx2JcO+3heAWJmf3+1LsyP4tCea/uW83XSRIyx6OQ44TOaJ9F3TmUc0Isxh15884mkG0wq632VdTsd3tx3ieoUCAwEAAQ==";
    assert_eq!(
        key_for(Some(&found(&format!("p={short}"))), &sig).map_err(|e| e.0),
        Err(DkimResult::Policy)
    );
}

#[test]
fn oversigned_and_repeated_names_select_bottom_up() {
    let m = Message::parse(b"From: 1\r\nX: a\r\nFrom: 2\r\nX: b\r\n\r\n");
    let names: Vec<String> = ["x", "from", "x", "x", "from", "from"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let got: Vec<&[u8]> = select_fields(&m.fields, &names);
    assert_eq!(
        got,
        [
            &b"X: b\r\n"[..],
            b"From: 2\r\n",
            b"X: a\r\n",
            b"From: 1\r\n"
        ]
    );
}

/// The example of RFC 8463 Appendix A: one Ed25519 and one RSA signature over the
/// same message, both valid, with the keys it publishes.
fn rfc8463() -> (Vec<u8>, HashMap<String, Txt>) {
    let msg = crlf(
        "DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;
 d=football.example.com; i=@football.example.com;
 q=dns/txt; s=brisbane; t=1528637909; h=from : to :
 subject : date : message-id : from : subject : date;
 bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;
 b=/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11Bus
 Fa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw==
DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;
 d=football.example.com; i=@football.example.com;
 q=dns/txt; s=test; t=1528637909; h=from : to : subject :
 date : message-id : from : subject : date;
 bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;
 b=F45dVWDfMbQDGHJFlXUNB2HKfbCeLRyhDXgFpEL8GwpsRe0IeIixNTe3
 DhCVlUrSjV4BwcVcOF6+FF3Zo9Rpo1tFOeS9mPYQTnGdaSGsgeefOsk2Jz
 dA+L10TeYt9BgDfQNZtKdN1WO//KgIqXP7OdEFE4LjFYNcUxZQ4FADY+8=
From: Joe SixPack <joe@football.example.com>
To: Suzie Q <suzie@shopping.example.net>
Subject: Is dinner ready?
Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)
Message-ID: <20030712040037.46341.5F8J@football.example.com>

Hi.

We lost the game.  Are you hungry yet?

Joe.
",
    );
    let mut keys = HashMap::new();
    keys.insert(
        "brisbane._domainkey.football.example.com".to_string(),
        Txt::Found(vec![
            b"v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=".to_vec(),
        ]),
    );
    keys.insert(
        "test._domainkey.football.example.com".to_string(),
        Txt::Found(vec![b"v=DKIM1; k=rsa; p=MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDkHlOQoBTzWRiGs5V6NpP3idY6Wk08a5qhdR6wy5bdOKb2jLQiY/J16JYi0Qvx/byYzCNb3W91y3FutACDfzwQ/BC/e/8uBsCR+yz1Lxj+PL6lHvqMKrM3rG4hstT5QjvHO9PzoxZyVYLzBfO2EeC3Ip3G+2kryOTIKT+l/K4w3QIDAQAB".to_vec()]),
    );
    (msg, keys)
}

const NOW: i64 = 1_700_000_000;

fn run(msg: &[u8], keys: &HashMap<String, Txt>) -> Vec<DkimVerdict> {
    let m = Message::parse(msg);
    let (cands, extra) = candidates(&m);
    assert_eq!(extra, 0);
    let whole = BodyHashes::of(m.body, body_hash_keys(&cands));
    let verdicts = verify_all(&m, &cands, keys, &whole, NOW);
    // The same verdicts when the body arrives in pieces of 3 octets (CRLFs and
    // blank runs cut everywhere).
    let mut pieces = BodyHasher::new(body_hash_keys(&cands));
    for p in m.body.chunks(3) {
        pieces.write(p);
    }
    assert_eq!(
        verify_all(&m, &cands, keys, &pieces.finish(), NOW),
        verdicts
    );
    verdicts
}

#[test]
fn rfc8463_example_verifies_both_signatures() {
    let (msg, keys) = rfc8463();
    let v = run(&msg, &keys);
    assert_eq!(v.len(), 2);
    for x in &v {
        assert_eq!((x.result, x.reason), (DkimResult::Pass, None), "{x:?}");
    }
    assert_eq!(v[0].a.as_deref(), Some("ed25519-sha256"));
    assert_eq!(
        clause(&v[1]),
        "dkim=pass header.d=football.example.com header.i=@football.example.com header.s=test header.a=rsa-sha256 header.b=F45dVWDf"
    );
}

#[test]
fn rfc8463_example_changed_fails_for_the_right_reason() {
    let (msg, keys) = rfc8463();
    let text = String::from_utf8(msg).unwrap();
    let body = text.replace("We lost the game.", "We won the game.");
    assert!(
        run(body.as_bytes(), &keys)
            .iter()
            .all(|v| v.result == DkimResult::Fail && v.reason == Some("body hash mismatch"))
    );
    let subject = text.replace("Subject: Is dinner ready?", "Subject: Is lunch ready?");
    assert!(
        run(subject.as_bytes(), &keys)
            .iter()
            .all(|v| v.result == DkimResult::Fail && v.reason == Some("signature did not verify"))
    );
    // Relaxed header canonicalization forgives refolding and case in names.
    let refolded = text.replace(
        "Subject: Is dinner ready?",
        "SUBJECT:   Is dinner\r\n  ready?",
    );
    assert!(
        run(refolded.as_bytes(), &keys)
            .iter()
            .all(|v| v.result == DkimResult::Pass)
    );
    // Relaxed body canonicalization forgives added blank and whitespace-only lines.
    let blank = format!("{text}\r\n  \r\n\t\r\n");
    assert!(
        run(blank.as_bytes(), &keys)
            .iter()
            .all(|v| v.result == DkimResult::Pass)
    );
    // The signatures oversign Subject: a second one on top breaks them.
    let added = format!("Subject: Free dinner\r\n{text}");
    let v = run(added.as_bytes(), &keys);
    assert!(v.iter().all(|v| v.result == DkimResult::Fail), "{v:?}");
    // They do not oversign To: a second To does not.
    let added = format!("To: someone@else.example\r\n{text}");
    assert!(
        run(added.as_bytes(), &keys)
            .iter()
            .all(|v| v.result == DkimResult::Pass)
    );
}

#[test]
fn key_problems_are_classed() {
    let (msg, mut keys) = rfc8463();
    keys.insert("test._domainkey.football.example.com".into(), Txt::NotFound);
    keys.insert(
        "brisbane._domainkey.football.example.com".into(),
        Txt::TempError("SERVFAIL".into()),
    );
    let v = run(&msg, &keys);
    assert_eq!(
        (v[0].result, v[0].reason),
        (DkimResult::TempError, Some("key lookup failed"))
    );
    assert_eq!(
        (v[1].result, v[1].reason),
        (DkimResult::PermError, Some("no key for signature"))
    );
    keys.insert(
        "test._domainkey.football.example.com".into(),
        Txt::Found(vec![b"v=DKIM1; p=".to_vec()]),
    );
    assert_eq!(run(&msg, &keys)[1].reason, Some("key revoked"));
}

#[test]
fn expiry_and_future_timestamps_are_policy() {
    let (msg, keys) = rfc8463();
    let text = String::from_utf8(msg).unwrap();
    // Changing t= breaks b=, but time is judged first: the class shows which.
    let expired = text.replace(
        "t=1528637909;",
        &format!("t=1528637909; x={};", NOW - 86_400),
    );
    let v = run(expired.as_bytes(), &keys);
    assert!(
        v.iter()
            .all(|v| v.result == DkimResult::Policy && v.reason == Some("signature expired"))
    );
    let future = text.replace("t=1528637909;", &format!("t={};", NOW + 2 * 86_400));
    let v = run(future.as_bytes(), &keys);
    assert!(
        v.iter()
            .all(|v| v.reason == Some("signature timestamp in the future"))
    );
}

#[test]
fn unparsable_signature_still_gets_a_result() {
    let (msg, keys) = rfc8463();
    let text = String::from_utf8(msg).unwrap();
    let broken = text.replacen(
        " bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n",
        "",
        1,
    );
    let v = run(broken.as_bytes(), &keys);
    assert_eq!(v.len(), 2);
    assert_eq!(
        (v[0].result, v[0].reason),
        (DkimResult::PermError, Some("missing required tag bh="))
    );
    assert_eq!(
        clause(&v[0]),
        "dkim=permerror (missing required tag bh=) header.d=football.example.com header.s=brisbane header.b=\"/gCrinpc\""
    );
    assert_eq!(v[1].result, DkimResult::Pass);
}

#[test]
fn too_many_signatures_are_bounded() {
    let (msg, keys) = rfc8463();
    let text = String::from_utf8(msg).unwrap();
    let extra = "DKIM-Signature: v=1; bogus\r\n".repeat(MAX_SIGNATURES + 3);
    let m_text = format!("{extra}{text}");
    let m = Message::parse(m_text.as_bytes());
    let (cands, overflow) = candidates(&m);
    assert_eq!((cands.len(), overflow), (MAX_SIGNATURES, 5));
    assert!(
        verify_all(&m, &cands, &keys, &BodyHashes::default(), NOW)
            .iter()
            .all(|v| v.result == DkimResult::PermError)
    );
    assert_eq!(
        overflow_clause(5),
        "dkim=policy (5 more signatures not verified: at most 10 per message)"
    );
}

#[test]
fn pvalues_are_safe() {
    assert_eq!(pvalue("example.org"), "example.org");
    assert_eq!(pvalue("@example.org"), "@example.org");
    assert_eq!(pvalue("joe@example.org"), "joe@example.org");
    assert_eq!(pvalue("a b;c"), "\"a b;c\"");
    assert_eq!(pvalue("x\r\n\"y\\"), "\"x\\\"y\\\\\"");
}

/// A reference relaxed body canonicalization written the way the RFC reads, on
/// strings: split into lines, squeeze every WSP run to one space, trim line ends,
/// drop empty lines at the end, terminate every line.
fn relaxed_reference(body: &[u8]) -> Vec<u8> {
    let text = String::from_utf8(body.to_vec()).unwrap();
    let mut lines: Vec<&str> = text.split("\r\n").collect();
    if lines.last() == Some(&"") {
        lines.pop();
    }
    let mut out: Vec<String> = lines
        .iter()
        .map(|l| {
            let squeezed: Vec<&str> = l.split([' ', '\t']).collect();
            let joined = squeezed
                .iter()
                .enumerate()
                .map(|(i, w)| if w.is_empty() && i > 0 { "" } else { w })
                .collect::<Vec<_>>();
            // Runs of separators became empty words: rebuild with one space each.
            let mut s = String::new();
            let mut gap = false;
            for (i, w) in joined.iter().enumerate() {
                if i > 0 {
                    gap = true;
                }
                if !w.is_empty() {
                    if gap {
                        s.push(' ');
                    }
                    s.push_str(w);
                    gap = false;
                }
            }
            s.trim_end_matches(' ').to_string()
        })
        .collect();
    while out.last().is_some_and(|l| l.is_empty()) {
        out.pop();
    }
    out.iter()
        .map(|l| format!("{l}\r\n"))
        .collect::<String>()
        .into_bytes()
}

/// The whole-buffer canonical body, as tenso computed it before it streamed
/// (RFC 6376 §3.4.3, §3.4.4): for simple, trailing empty lines
/// dropped and a final CRLF ensured (an empty body is one CRLF); for relaxed, in
/// addition WSP at line ends dropped and WSP runs squeezed to one space, and an
/// empty body stays empty.
fn canon_body_reference(c: Canon, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 2);
    match c {
        Canon::Simple => out.extend_from_slice(body),
        Canon::Relaxed => {
            let mut rest = body;
            while !rest.is_empty() {
                let (line, crlf, next) = match rest.windows(2).position(|w| w == b"\r\n") {
                    Some(p) => (&rest[..p], true, &rest[p + 2..]),
                    None => (rest, false, &rest[rest.len()..]),
                };
                let line = trim_wsp_end(line);
                let mut in_wsp = false;
                for &ch in line {
                    if is_wsp(ch) {
                        in_wsp = true;
                    } else {
                        if in_wsp {
                            out.push(b' ');
                            in_wsp = false;
                        }
                        out.push(ch);
                    }
                }
                if crlf {
                    out.extend_from_slice(b"\r\n");
                }
                rest = next;
            }
        }
    }
    while out.ends_with(b"\r\n") {
        out.truncate(out.len() - 2);
    }
    if !out.is_empty() || c == Canon::Simple {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Any octets, mostly the ones canonicalization cares about (bare CR and LF too).
fn raw_body_bytes() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        prop_oneof![
            Just(b' '),
            Just(b'\t'),
            Just(b'a'),
            Just(b'\r'),
            Just(b'\n'),
            Just(b'\r'),
            Just(b'\n'),
            any::<u8>()
        ],
        0..200,
    )
}

/// `body` cut at the given points (taken modulo its length, in order).
fn pieces(body: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
    at.sort_unstable();
    let mut out = Vec::new();
    let mut from = 0;
    for a in at.into_iter().chain([body.len()]) {
        out.push(body[from..a].to_vec());
        from = a;
    }
    out
}

fn body_bytes() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        prop_oneof![
            Just(b' '),
            Just(b'\t'),
            Just(b'a'),
            Just(b'z'),
            Just(b'\r'),
            Just(b'\n'),
            Just(b'.')
        ],
        0..60,
    )
    .prop_map(|v| {
        // Lines end in CRLF only, as tenso accepts them.
        let s: Vec<u8> = v.into_iter().filter(|c| *c != b'\r').collect();
        String::from_utf8(s)
            .unwrap()
            .replace('\n', "\r\n")
            .into_bytes()
    })
}

/// Bodies larger than the digest buffer, in pieces larger and smaller than it, with
/// `l=` falling inside a buffered block and inside a piece hashed directly.
#[test]
fn large_bodies_hash_like_the_whole_buffer() {
    let mut body = Vec::new();
    for i in 0..7u8 {
        body.extend(std::iter::repeat_n(b'a' + i, 20_000 + usize::from(i) * 777));
        body.extend_from_slice(b" \t \r\n\r\n");
        body.extend(std::iter::repeat_n(b' ', 300));
        body.extend_from_slice(b"x y\r\n");
    }
    for piece in [1usize, 5_000, 16 * 1024, 40_000, body.len()] {
        for limit in [None, Some(12_345), Some(40_001), Some(150_000)] {
            for canon in [Canon::Simple, Canon::Relaxed] {
                let key = BodyHashKey {
                    canon,
                    sha1: false,
                    limit,
                };
                let mut h = BodyHasher::new([key]);
                for p in body.chunks(piece) {
                    h.write(p);
                }
                let got = h.finish();
                let canonical = canon_body_reference(canon, &body);
                let signed = limit.map_or(canonical.len(), |l| (l as usize).min(canonical.len()));
                let want = digest::digest(&digest::SHA256, &canonical[..signed]);
                assert_eq!(
                    got.digest(&key),
                    Some(want.as_ref()),
                    "{key:?} piece {piece}"
                );
                assert_eq!(got.len(canon), Some(canonical.len() as u64));
            }
        }
    }
}

proptest! {
    /// Invariant: however the body is cut into pieces, each canonical form's length
    /// and each digest (whole, or over the first `l` octets) are those of the
    /// whole-buffer canonical body.
    #[test]
    fn body_hashes_in_pieces_are_those_of_the_whole(
        body in raw_body_bytes(),
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
        limit in 0u64..220,
    ) {
        let keys: Vec<BodyHashKey> = [Canon::Simple, Canon::Relaxed]
            .into_iter()
            .flat_map(|canon| {
                [None, Some(limit)].map(|limit| BodyHashKey { canon, sha1: false, limit })
            })
            .chain([BodyHashKey { canon: Canon::Relaxed, sha1: true, limit: None }])
            .collect();
        let mut h = BodyHasher::new(keys.clone());
        for p in pieces(&body, &cuts) {
            h.write(&p);
        }
        let got = h.finish();
        for key in &keys {
            let canonical = canon_body_reference(key.canon, &body);
            prop_assert_eq!(got.len(key.canon), Some(canonical.len() as u64));
            let signed = key.limit.map_or(canonical.len(), |l| (l as usize).min(canonical.len()));
            let alg = if key.sha1 { &digest::SHA1_FOR_LEGACY_USE_ONLY } else { &digest::SHA256 };
            let want = digest::digest(alg, &canonical[..signed]);
            prop_assert_eq!(got.digest(key), Some(want.as_ref()), "{:?}", key);
        }
    }

    #[test]
    fn canonical_body_matches_the_whole_buffer_rule(body in raw_body_bytes()) {
        for c in [Canon::Simple, Canon::Relaxed] {
            prop_assert_eq!(canon_body(c, &body), canon_body_reference(c, &body));
        }
    }

    #[test]
    fn relaxed_body_matches_the_reference(body in body_bytes()) {
        prop_assert_eq!(canon_body(Canon::Relaxed, &body), relaxed_reference(&body));
    }

    #[test]
    fn canonical_bodies_are_fixed_points_and_ignore_trailing_blank_lines(body in body_bytes(), blank in 0usize..4) {
        for c in [Canon::Simple, Canon::Relaxed] {
            let once = canon_body(c, &body);
            prop_assert_eq!(canon_body(c, &once), once.clone());
            let mut more = body.clone();
            if !more.is_empty() && !more.ends_with(b"\r\n") {
                more.extend_from_slice(b"\r\n");
            }
            more.extend_from_slice(&b"\r\n".repeat(blank));
            prop_assert_eq!(canon_body(c, &more), once);
        }
    }

    #[test]
    fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = parse_signature(&bytes);
        let _ = parse_key(&bytes);
        let _ = strip_b_value(&bytes);
        let m = Message::parse(&bytes);
        let mut out = Vec::new();
        for f in &m.fields {
            canon_header(Canon::Relaxed, f.raw, &mut out);
        }
    }

    #[test]
    fn tag_lists_round_trip(pairs in proptest::collection::btree_map("[a-z][a-z0-9_]{0,5}", "[!-:<-~]{0,12}", 0..6)) {
        let text: String = pairs.iter().map(|(k, v)| format!(" {k} =\r\n\t{v} ;")).collect();
        let tags = tag_list(text.as_bytes()).unwrap();
        let want: Vec<(String, String)> = pairs.into_iter().collect();
        prop_assert_eq!(tags.0, want);
    }
}

#[test]
fn long_tag_values_are_folded() {
    let long = "a".repeat(60);
    let d = [long.as_str(); 4].join(".");
    let v = DkimVerdict {
        result: DkimResult::Pass,
        reason: None,
        d: Some(d.clone()),
        s: Some(d.clone()),
        i: Some(format!("{}@{d}", "x".repeat(60))),
        a: Some("rsa-sha256".into()),
        b: Some("abcdefgh".into()),
        body_length: None,
        testing: false,
    };
    let c = clause(&v);
    assert!(c.split("\r\n\t").all(|line| line.len() <= 400), "{c}");
    assert!(c.contains("\r\n\theader.s="), "{c}");
    assert_eq!(c.replace("\r\n\t", " ").split(' ').count(), 6);
}
