use super::*;
use crate::policy::dkim::BodyLength;

#[test]
fn organizational_domains_follow_the_public_suffix_list() {
    let cases = [
        ("example.com", "example.com"),
        ("mail.example.com", "example.com"),
        ("a.b.c.example.com", "example.com"),
        ("Example.COM.", "example.com"),
        ("example.co.uk", "example.co.uk"),
        ("news.bbc.co.uk", "bbc.co.uk"),
        ("co.uk", "co.uk"),
        ("foo.blogspot.com", "foo.blogspot.com"),
        ("a.foo.blogspot.com", "foo.blogspot.com"),
        // Names outside the list fall under its implicit `*` rule.
        ("mx.origin.test", "origin.test"),
        ("test", "test"),
    ];
    for (d, org) in cases {
        assert_eq!(organizational_domain(d), org, "{d}");
    }
}

#[test]
fn alignment_modes() {
    let cases = [
        ("example.com", "example.com", Alignment::Strict, true),
        ("mail.example.com", "example.com", Alignment::Strict, false),
        ("mail.example.com", "example.com", Alignment::Relaxed, true),
        ("a.example.com", "b.example.com", Alignment::Relaxed, true),
        ("example.co.uk", "other.co.uk", Alignment::Relaxed, false),
        ("EXAMPLE.com.", "example.com", Alignment::Strict, true),
        ("example.net", "example.com", Alignment::Relaxed, false),
    ];
    for (a, b, mode, want) in cases {
        assert_eq!(aligned(a, b, mode), want, "{a} {b} {mode:?}");
    }
}

#[test]
fn records() {
    let r =
        parse_record(b"v=DMARC1; p=reject; sp=quarantine; np=reject; adkim=s; aspf=s; pct=20; t=y")
            .unwrap();
    assert_eq!(
        r,
        Record {
            p: Policy::Reject,
            sp: Some(Policy::Quarantine),
            np: Some(Policy::Reject),
            adkim: Alignment::Strict,
            aspf: Alignment::Strict,
            pct: 20,
            testing: true,
        }
    );
    let lenient = parse_record(b"v=DMARC1; p=bogus; sp=x; pct=300; adkim=q").unwrap();
    assert_eq!(
        (lenient.p, lenient.sp, lenient.pct, lenient.adkim),
        (Policy::None, None, 100, Alignment::Relaxed)
    );
    for not_dmarc in [
        &b"v=spf1 -all"[..],
        b"p=reject; v=DMARC1",
        b"v=DMARC2; p=reject",
        b"v=DMARC1; p=reject; p=none",
    ] {
        assert!(
            parse_record(not_dmarc).is_none(),
            "{:?}",
            String::from_utf8_lossy(not_dmarc)
        );
    }
}

#[test]
fn author_domains() {
    let cases: &[(&str, Result<&str, &str>)] = &[
        ("From: Joe <joe@Example.org>\r\n", Ok("example.org")),
        ("From: a@x.org, b@x.org\r\n", Ok("x.org")),
        (
            "From: a@x.org, b@y.org\r\n",
            Err("From addresses in several domains"),
        ),
        (
            "From: a@x.org\r\nFrom: b@x.org\r\n",
            Err("several From fields"),
        ),
        ("To: a@x.org\r\n", Err("no From field")),
        ("From: undisclosed\r\n", Err("no domain in From")),
    ];
    for (headers, want) in cases {
        let raw = format!("{headers}\r\nbody\r\n");
        let got = author_domain(&Message::parse(raw.as_bytes()));
        assert_eq!(got.as_deref().map_err(|e| *e), *want, "{headers}");
    }
}

fn dkim(d: &str, result: DkimResult, partial: bool) -> DkimVerdict {
    DkimVerdict {
        result,
        reason: None,
        d: Some(d.into()),
        s: Some("s".into()),
        i: None,
        a: None,
        b: None,
        body_length: partial.then_some(BodyLength {
            signed: 10,
            unsigned: 5,
        }),
        testing: false,
    }
}

fn found(record: &str, at: &str) -> Discovery {
    Discovery::Found {
        record: parse_record(record.as_bytes()).unwrap(),
        at: at.into(),
    }
}

struct Case {
    name: &'static str,
    record: &'static str,
    /// Where the record was found.
    at: &'static str,
    author: &'static str,
    dkim: Vec<DkimVerdict>,
    spf: (&'static str, bool),
    exists: bool,
    sample: u8,
    result: DmarcResult,
    policy: Policy,
    applied: Policy,
    for_decisions: bool,
}

fn case(name: &'static str) -> Case {
    Case {
        name,
        record: "v=DMARC1; p=reject",
        at: "example.com",
        author: "example.com",
        dkim: vec![],
        spf: ("", false),
        exists: true,
        sample: 0,
        result: DmarcResult::Fail,
        policy: Policy::Reject,
        applied: Policy::Reject,
        for_decisions: false,
    }
}

#[test]
fn evaluation_table() {
    let cases = vec![
        Case {
            ..case("nothing authenticated")
        },
        Case {
            dkim: vec![dkim("example.com", DkimResult::Pass, false)],
            result: DmarcResult::Pass,
            for_decisions: true,
            ..case("aligned DKIM")
        },
        Case {
            dkim: vec![dkim("mail.example.com", DkimResult::Pass, false)],
            result: DmarcResult::Pass,
            for_decisions: true,
            ..case("relaxed DKIM alignment")
        },
        Case {
            record: "v=DMARC1; p=reject; adkim=s",
            dkim: vec![dkim("mail.example.com", DkimResult::Pass, false)],
            ..case("strict DKIM alignment refuses a subdomain")
        },
        Case {
            dkim: vec![
                dkim("other.org", DkimResult::Pass, false),
                dkim("example.com", DkimResult::Fail, false),
            ],
            ..case("unaligned pass and aligned fail")
        },
        Case {
            dkim: vec![dkim("example.com", DkimResult::Pass, true)],
            result: DmarcResult::Pass,
            for_decisions: false,
            ..case("aligned DKIM with l= leaving content unsigned")
        },
        Case {
            dkim: vec![
                dkim("example.com", DkimResult::Pass, true),
                dkim("example.com", DkimResult::Pass, false),
            ],
            result: DmarcResult::Pass,
            for_decisions: true,
            ..case("a whole-body signature beside the partial one")
        },
        Case {
            spf: ("bounce.example.com", true),
            result: DmarcResult::Pass,
            for_decisions: true,
            ..case("relaxed SPF alignment")
        },
        Case {
            record: "v=DMARC1; p=reject; aspf=s",
            spf: ("bounce.example.com", true),
            ..case("strict SPF alignment")
        },
        Case {
            spf: ("example.com", false),
            ..case("SPF aligned but not passing")
        },
        Case {
            record: "v=DMARC1; p=reject; sp=quarantine",
            author: "sub.example.com",
            policy: Policy::Quarantine,
            applied: Policy::Quarantine,
            ..case("sp= for a subdomain")
        },
        Case {
            record: "v=DMARC1; p=reject; sp=quarantine",
            author: "sub.example.com",
            at: "sub.example.com",
            ..case("a subdomain's own record uses p=")
        },
        Case {
            record: "v=DMARC1; p=quarantine",
            author: "sub.example.com",
            policy: Policy::Quarantine,
            applied: Policy::Quarantine,
            ..case("no sp=: the subdomain gets p=")
        },
        Case {
            record: "v=DMARC1; p=none; sp=quarantine; np=reject",
            author: "ghost.example.com",
            exists: false,
            ..case("np= for a subdomain that does not exist")
        },
        Case {
            record: "v=DMARC1; p=none; sp=quarantine; np=reject",
            author: "ghost.example.com",
            exists: true,
            policy: Policy::Quarantine,
            applied: Policy::Quarantine,
            ..case("np= does not apply to an existing subdomain")
        },
        Case {
            record: "v=DMARC1; p=none; sp=quarantine",
            author: "ghost.example.com",
            exists: false,
            policy: Policy::Quarantine,
            applied: Policy::Quarantine,
            ..case("no np=: sp= for a missing subdomain")
        },
        Case {
            record: "v=DMARC1; p=reject; pct=50",
            sample: 49,
            ..case("pct= selects the message")
        },
        Case {
            record: "v=DMARC1; p=reject; pct=50",
            sample: 50,
            applied: Policy::Quarantine,
            ..case("pct= does not: one step lower")
        },
        Case {
            record: "v=DMARC1; p=quarantine; pct=0",
            sample: 0,
            policy: Policy::Quarantine,
            applied: Policy::None,
            ..case("pct=0 quarantine: none")
        },
        Case {
            record: "v=DMARC1; p=reject; t=y",
            applied: Policy::Quarantine,
            ..case("t=y: one step lower")
        },
    ];
    for c in cases {
        let inputs = Inputs {
            dkim: &c.dkim,
            spf_domain: c.spf.0,
            spf_pass: c.spf.1,
        };
        let v = evaluate(
            &found(c.record, c.at),
            c.author,
            &inputs,
            c.exists,
            c.sample,
        );
        assert_eq!(
            (v.result, v.policy, v.applied, v.passes_for_decisions()),
            (c.result, c.policy, c.applied, c.for_decisions),
            "{}",
            c.name
        );
    }
}

#[test]
fn results_without_a_record() {
    let inputs = Inputs {
        dkim: &[],
        spf_domain: "example.com",
        spf_pass: true,
    };
    let none = evaluate(&Discovery::None, "example.com", &inputs, true, 0);
    assert_eq!(none.clause(), "dmarc=none header.from=example.com");
    let two = evaluate(
        &Discovery::Ambiguous {
            at: "example.com".into(),
        },
        "example.com",
        &inputs,
        true,
        0,
    );
    assert_eq!(
        two.clause(),
        "dmarc=none (several DMARC records) header.from=example.com"
    );
    let temp = evaluate(&Discovery::TempError, "example.com", &inputs, true, 0);
    assert_eq!(
        temp.clause(),
        "dmarc=temperror (DMARC record lookup failed) header.from=example.com"
    );
    assert_eq!(
        DmarcVerdict::no_author("no From field").clause(),
        "dmarc=permerror (no From field)"
    );
}

#[test]
fn clauses_and_predictions() {
    let dk = [dkim("example.com", DkimResult::Pass, true)];
    let inputs = Inputs {
        dkim: &dk,
        spf_domain: "",
        spf_pass: false,
    };
    let v = evaluate(
        &found("v=DMARC1; p=reject; sp=none; pct=0", "example.com"),
        "example.com",
        &inputs,
        true,
        0,
    );
    assert_eq!(
        v.clause(),
        "dmarc=pass (p=reject sp=none pct=0, aligned only by a DKIM signature with unsigned body content) header.from=example.com policy.dmarc=quarantine"
    );
    assert_eq!(v.predicted_policy(), Policy::Quarantine);
    let v = evaluate(
        &found("v=DMARC1; p=reject", "example.com"),
        "example.com",
        &inputs,
        true,
        99,
    );
    assert_eq!(v.predicted_policy(), Policy::Reject);
}

#[test]
fn existence_question_only_for_np_at_the_organizational_domain() {
    let d = found("v=DMARC1; p=none; np=reject", "example.com");
    assert!(needs_existence(&d, "ghost.example.com"));
    assert!(!needs_existence(&d, "example.com"));
    assert!(!needs_existence(
        &found("v=DMARC1; p=none", "example.com"),
        "ghost.example.com"
    ));
    assert!(!needs_existence(&Discovery::None, "ghost.example.com"));
}
