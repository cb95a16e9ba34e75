//! Table-driven cases from RFC 7208's grammar, and properties: no input makes the
//! parser panic; every record built from valid terms parses to exactly those terms;
//! one byte outside printable ASCII anywhere makes any record a syntax error.

use super::*;
use proptest::prelude::*;

fn rec(terms: &str) -> Result<Record, SyntaxError> {
    parse(format!("v=spf1 {terms}").as_bytes())
}

#[test]
fn valid_terms() {
    for t in [
        "",
        "-all",
        "~all  ",
        "?all +all all",
        "a a/24 a//64 a/24//64 a:example.com a:example.com/0//0 a:%{d}",
        "mx mx:foo:bar/baz.example.com mx//0",
        "ptr ptr:example.com",
        "ip4:192.0.2.1 ip4:192.0.2.0/24 ip4:0.0.0.0/0",
        "ip6:::1 ip6:2001:db8::/32 ip6:::1.1.1.1/0 ip6:Cafe:Babe:8000::/33",
        "exists:%{ir}.%{v}._spf.%{d2} include:_spf.example.com",
        "a:foo.example.xn--zckzah a:example.com. a:%{l}.%%.%_.%-",
        "redirect=_spf.example.com exp=explain._spf.%{d}",
        "moo.cow-far_out=man:dog/cat default=+ foo= x=%{c}%{r}%{t}",
    ] {
        assert!(rec(t).is_ok(), "{t:?}: {:?}", rec(t));
    }
    let r = rec("-ip4:1.2.3.4 ~a:x.example/24//64 redirect=r.example").unwrap();
    assert_eq!(r.directives[0].qualifier, Qualifier::Fail);
    assert_eq!(
        r.directives[1].mechanism,
        Mechanism::A {
            domain: Some(MacroString(vec![Token::Literal("x.example".into())])),
            cidr4: 24,
            cidr6: 64
        }
    );
    assert!(r.redirect.is_some() && r.exp.is_none());
}

#[test]
fn syntax_errors() {
    for t in [
        "moo",
        "-all.",
        "-all:foobar",
        "all/8",
        "ip4",
        "ip4:1.2.3",
        "ip4:1.2.3.4:8080",
        "ip4:1.2.3.4/33",
        "ip4:1.2.3.4/032",
        "ip4:1.2.3.4//32",
        "ip4:01.2.3.4",
        "ip6",
        "ip6::CAFE::BABE",
        "ip6:::1/129",
        "ip6:::1//33",
        "a:",
        "a/33",
        "a//129",
        "a/24/64",
        "a:museum",
        "a:museum.",
        "a:111.222.33.44",
        "a:abc.123",
        "a:example.-com",
        "a:example.com:8080",
        "mx:",
        "ptr:",
        "ptr/0",
        "include",
        "include:",
        "include:ip5.example.com/24",
        "exists",
        "exists:",
        "exists:mail.example.com/24",
        "redirect:t2.example.com",
        "redirect= -all",
        "exp=",
        "exp=-all",
        "exp=a.example exp=b.example",
        "redirect=a.example redirect=b.example",
        "1up=foo",
        "=all",
        "foo=%abc",
        "moo.cow/far_out=man:dog/cat",
        "exists:%(ir).sbl.example.com",
        "exists:foo%.sbl.example.com",
        "a:%{a}.example.com",
        "exp=%{r}.example.com",
        "a:%{d0}.example.com",
        "a:%{d*}.example.com",
        "a:%{d",
    ] {
        assert!(rec(t).is_err(), "{t:?} parsed: {:?}", rec(t));
    }
    assert!(parse(b"v=spf1 a:foo.example.com\0").is_err());
    assert!(parse(b"v=spf1 a:ctrl.example.com\rptr -all").is_err());
    assert!(parse("v=spf1 a:\u{ef}garbage.example.net -all".as_bytes()).is_err());
}

#[test]
fn selection() {
    let t = |v: &[&str]| v.iter().map(|s| s.as_bytes().to_vec()).collect::<Vec<_>>();
    assert_eq!(
        select(&t(&["v=spf10", "v=spf1 mx"])).unwrap(),
        Some(&b"v=spf1 mx"[..])
    );
    assert_eq!(select(&t(&["v=spf1mx"])).unwrap(), None);
    assert_eq!(select(&t(&["V=SpF1"])).unwrap(), Some(&b"V=SpF1"[..]));
    assert_eq!(select(&t(&["hello", "\u{96}"])).unwrap(), None);
    assert!(select(&t(&["v=spf1 -all", "v=spf1 +all"])).is_err());
    assert_eq!(select(&[]).unwrap(), None);
}

/// Terms that are valid by construction, with mechanisms and modifiers mixed.
fn valid_term() -> impl Strategy<Value = String> {
    let label = "[a-z][a-z0-9-]{0,8}[a-z0-9]";
    let domain = (label, label).prop_map(|(a, b)| format!("{a}.{b}x"));
    let qual = prop_oneof![Just(""), Just("+"), Just("-"), Just("~"), Just("?")];
    let mech = prop_oneof![
        Just("all".to_string()),
        domain.clone().prop_map(|d| format!("include:{d}")),
        (proptest::option::of(domain.clone()), 0u8..=32, 0u8..=128).prop_map(|(d, c4, c6)| {
            format!(
                "a{}/{c4}//{c6}",
                d.map(|d| format!(":{d}")).unwrap_or_default()
            )
        }),
        proptest::option::of(domain.clone())
            .prop_map(|d| format!("mx{}", d.map(|d| format!(":{d}")).unwrap_or_default())),
        proptest::option::of(domain.clone())
            .prop_map(|d| format!("ptr{}", d.map(|d| format!(":{d}")).unwrap_or_default())),
        (any::<[u8; 4]>(), 0u8..=32)
            .prop_map(|(a, l)| format!("ip4:{}/{l}", std::net::Ipv4Addr::from(a))),
        (any::<[u8; 16]>(), 0u8..=128)
            .prop_map(|(a, l)| format!("ip6:{}/{l}", std::net::Ipv6Addr::from(a))),
        domain.clone().prop_map(|d| format!("exists:%{{ir}}.{d}")),
    ];
    prop_oneof![
        4 => (qual, mech).prop_map(|(q, m)| format!("{q}{m}")),
        1 => ("[a-z][a-z0-9._-]{0,6}", "[!-$&-~]{0,8}")
            .prop_filter("known modifiers have their own rules", |(n, _)| {
                !n.eq_ignore_ascii_case("redirect") && !n.eq_ignore_ascii_case("exp")
            })
            .prop_map(|(n, v)| format!("{n}={v}")),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any bytes after the version: a record or a syntax error, never a panic.
    #[test]
    fn parse_never_panics(tail in proptest::collection::vec(
        prop_oneof![
            4 => proptest::sample::select(b" :/%{}.-+~?=aAdilr0123456789".to_vec()),
            1 => any::<u8>(),
        ],
        0..80,
    )) {
        let mut r = b"v=spf1 ".to_vec();
        r.extend(tail);
        let _ = parse(&r);
    }

    /// A record of valid terms parses to exactly those directives, in order.
    #[test]
    fn valid_records_parse_to_their_terms(terms in proptest::collection::vec(valid_term(), 0..12),
                                         spaces in 1usize..3) {
        let text = format!("v=spf1{}{}", " ".repeat(spaces), terms.join(&" ".repeat(spaces)));
        let r = parse(text.as_bytes());
        prop_assert!(r.is_ok(), "{text}: {r:?}");
        let got: Vec<String> = r.unwrap().directives.into_iter().map(|d| d.text).collect();
        let want: Vec<String> = terms.into_iter().filter(|t| !t.contains('=')).collect();
        prop_assert_eq!(got, want);
    }

    /// One byte that is neither printable ASCII nor a space, anywhere after the
    /// version, makes any record a syntax error.
    #[test]
    fn a_control_or_8bit_byte_is_always_an_error(terms in proptest::collection::vec(valid_term(), 1..6),
                                                 at in any::<prop::sample::Index>(),
                                                 bad in prop_oneof![0u8..0x20, 0x7fu8..=0xff]) {
        let text = format!("v=spf1 {}", terms.join(" "));
        let mut bytes = text.into_bytes();
        let pos = 6 + at.index(bytes.len() - 6);
        bytes.insert(pos, bad);
        prop_assert!(parse(&bytes).is_err());
    }

    /// The transformers against an obvious reference: split on the delimiters,
    /// optionally reverse, keep the last N, join with dots.
    #[test]
    fn transformers_match_the_reference(parts in proptest::collection::vec("[a-z0-9]{0,4}", 1..8),
                                        seps in proptest::collection::vec(proptest::sample::select(vec!['.', '-', '+']), 8),
                                        keep in proptest::option::of(1usize..10),
                                        reverse in any::<bool>()) {
        let mut value = String::new();
        for (i, p) in parts.iter().enumerate() {
            if i > 0 { value.push(seps[i - 1]); }
            value.push_str(p);
        }
        let m = Macro { letter: 'l', escape: false, keep, reverse, delimiters: vec!['.', '-', '+'] };
        let mut want: Vec<&str> = parts.iter().map(String::as_str).collect();
        if reverse { want.reverse(); }
        if let Some(k) = keep { while want.len() > k { want.remove(0); } }
        prop_assert_eq!(crate::policy::spf::macros::transform(&value, &m), want.join("."));
    }
}
