//! Self-tests of the integration-test kit in `tests/common/`.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::time::{Duration, Instant};

use common::daemon::assemble_config;
use common::dns::TestDns;
use common::postfix_sink::PostfixSink;
use common::sink::{Reply, TestSink};
use common::smtp_client::{RawSmtp, dot_stuff};
use common::tls::TestPki;
use hickory_resolver::proto::rr::{RData, RecordType};

const WAIT: Duration = Duration::from_secs(5);

async fn test_dns() -> TestDns {
    let long_txt = format!("v=DKIM1; k=rsa; p={}", "A".repeat(400));
    TestDns::builder()
        .mx("alias.test", 10, "mx1.dest.test")
        .mx("alias.test", 20, "mx2.dest.test")
        .a("mx1.dest.test", "127.0.0.1")
        .aaaa("mx1.dest.test", "::1")
        .txt("alias.test", "v=spf1 ip4:127.0.0.1 ~all")
        .txt("sel._domainkey.alias.test", &long_txt)
        .null_mx("nullmx.test")
        .cname("www.alias.test", "mx1.dest.test")
        .ptr("192.0.2.9", "host9.test")
        .blackhole("slow.test")
        .servfail("broken.test")
        .start()
        .await
}

#[tokio::test]
async fn dns_answers_mx_a_aaaa_txt_cname_ptr() {
    let dns = test_dns().await;
    assert_eq!(
        dns.resolver_config_toml(),
        format!("nameservers = [\"127.0.0.1:{}\"]", dns.addr().port())
    );
    let r = dns.resolver();

    let mx = r.mx_lookup("alias.test.").await.expect("MX alias.test");
    let mut got: Vec<(u16, String)> = mx
        .answers()
        .iter()
        .filter_map(|rec| match &rec.data {
            RData::MX(m) => Some((m.preference, m.exchange.to_string())),
            _ => None,
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            (10, "mx1.dest.test.".to_string()),
            (20, "mx2.dest.test.".to_string())
        ]
    );

    let a = r.ipv4_lookup("mx1.dest.test.").await.expect("A");
    let ips: Vec<IpAddr> = a
        .answers()
        .iter()
        .filter_map(|rec| match &rec.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        })
        .collect();
    assert_eq!(ips, vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]);

    let aaaa = r.ipv6_lookup("mx1.dest.test.").await.expect("AAAA");
    assert!(
        aaaa.answers()
            .iter()
            .any(|rec| matches!(&rec.data, RData::AAAA(x) if x.0 == Ipv6Addr::LOCALHOST))
    );

    let txt = r.txt_lookup("alias.test.").await.expect("TXT");
    let values: Vec<String> = txt
        .answers()
        .iter()
        .filter_map(|rec| match &rec.data {
            RData::TXT(t) => Some(t.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(values, vec!["v=spf1 ip4:127.0.0.1 ~all".to_string()]);

    // A value over 255 bytes comes back as several character-strings that join to the original.
    let long = r
        .txt_lookup("sel._domainkey.alias.test.")
        .await
        .expect("long TXT");
    let RData::TXT(t) = &long.answers()[0].data else {
        panic!("not TXT")
    };
    let parts: Vec<&[u8]> = t.txt_data.iter().map(|b| &b[..]).collect();
    assert_eq!(parts.len(), 2);
    assert_eq!(parts[0].len(), 255);
    assert_eq!(
        parts.concat(),
        format!("v=DKIM1; k=rsa; p={}", "A".repeat(400)).into_bytes()
    );

    let cname = r
        .lookup("www.alias.test.", RecordType::A)
        .await
        .expect("A via CNAME");
    assert!(
        cname
            .answers()
            .iter()
            .any(|rec| matches!(&rec.data, RData::A(a) if a.0 == Ipv4Addr::LOCALHOST))
    );

    // (hickory-resolver answers PTR for 127.0.0.0/8 itself with "localhost.", so use TEST-NET-1.)
    let ptr = r
        .reverse_lookup(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 9)))
        .await
        .expect("PTR");
    assert!(
        ptr.answers()
            .iter()
            .any(|rec| matches!(&rec.data, RData::PTR(p) if p.0.to_string() == "host9.test."))
    );

    assert!(dns.query_count("alias.test", RecordType::MX) >= 1);
}

#[tokio::test]
async fn dns_nxdomain_nodata_null_mx_servfail_blackhole() {
    let dns = test_dns().await;
    let r = dns.resolver();

    let err = r.mx_lookup("nothere.test.").await.expect_err("NXDOMAIN");
    assert!(err.is_nx_domain(), "expected NXDOMAIN, got {err:?}");

    // mx1.dest.test has A/AAAA but no MX: NODATA, not NXDOMAIN.
    let err = r.mx_lookup("mx1.dest.test.").await.expect_err("NODATA");
    assert!(err.is_no_records_found() && !err.is_nx_domain(), "{err:?}");
    // An empty non-terminal (dest.test exists only as a parent) is NODATA too.
    let err = r.ipv4_lookup("dest.test.").await.expect_err("ENT");
    assert!(err.is_no_records_found() && !err.is_nx_domain(), "{err:?}");

    let null = r.mx_lookup("nullmx.test.").await.expect("null MX");
    let recs: Vec<(u16, String)> = null
        .answers()
        .iter()
        .filter_map(|rec| match &rec.data {
            RData::MX(m) => Some((m.preference, m.exchange.to_string())),
            _ => None,
        })
        .collect();
    assert_eq!(recs, vec![(0, ".".to_string())]);

    let started = Instant::now();
    let err = r.mx_lookup("broken.test.").await.expect_err("SERVFAIL");
    assert!(!err.is_nx_domain(), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "SERVFAIL should be fast"
    );

    let quick = dns.resolver_with_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let err = quick
        .mx_lookup("x.slow.test.")
        .await
        .expect_err("blackhole must time out");
    assert!(!err.is_nx_domain(), "{err:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "blackhole answered too fast: {err:?}"
    );
    assert!(dns.query_count("x.slow.test", RecordType::MX) >= 1);

    // Records can be added while running.
    dns.insert("late.test", common::dns::ip_rdata("127.0.0.5"))
        .await;
    let late = r.ipv4_lookup("late.test.").await.expect("late A");
    assert!(
        late.answers()
            .iter()
            .any(|rec| matches!(&rec.data, RData::A(a) if a.0 == Ipv4Addr::new(127, 0, 0, 5)))
    );
}

#[tokio::test]
async fn sink_records_messages_exactly() {
    let sink = TestSink::start().await;
    let mut c = RawSmtp::connect(sink.addr()).await;
    assert_eq!(c.greeting.0, 220);
    let (code, ehlo) = c.ehlo("client.example").await;
    assert_eq!(code, 250);
    for cap in ["PIPELINING", "SIZE", "8BITMIME", "SMTPUTF8", "DSN"] {
        assert!(ehlo.contains(cap), "EHLO lacks {cap}: {ehlo}");
    }
    assert!(!ehlo.contains("STARTTLS"));

    // Message 1: leading dots are stuffed by the client and unstuffed by the sink.
    let body1 = b"Subject: one\r\n\r\n.hidden\r\n..two\r\nlast line\r\n";
    let (code, text) = c
        .send_message("a@origin.test", &["x@alias.test", "y@alias.test"], body1)
        .await
        .expect("message 1");
    assert_eq!((code, text.as_str()), (250, "2.0.0 queued as 1"));

    // RSET between transactions; message 2 with the null sender and raw params, pipelined.
    c.expect("RSET", 250).await;
    c.send(
        b"MAIL FROM:<> SIZE=30 BODY=8BITMIME\r\nRCPT TO:<z@alias.test> NOTIFY=FAILURE ORCPT=rfc822;z@alias.test\r\nDATA\r\n",
    )
    .await;
    assert_eq!(c.read_reply().await.0, 250);
    assert_eq!(c.read_reply().await.0, 250);
    assert_eq!(c.read_reply().await.0, 354);
    c.send(b"Subject: two\r\n\r\nbody\r\n.\r\n").await;
    assert_eq!(c.read_reply().await.0, 250);
    c.expect("QUIT", 221).await;
    assert!(c.is_closed().await);

    let msgs = sink.wait_for(2, WAIT).await;
    assert_eq!(msgs.len(), 2);
    let m1 = &msgs[0];
    assert_eq!(m1.helo, "client.example");
    assert_eq!(m1.mail_from, "a@origin.test");
    assert_eq!(m1.mail_params, "");
    assert_eq!(m1.rcpts, vec!["x@alias.test", "y@alias.test"]);
    assert_eq!(m1.data, body1.to_vec());
    assert!(!m1.tls);
    assert_eq!(m1.peer.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert_eq!(m1.header("subject").as_deref(), Some("one"));
    let m2 = &msgs[1];
    assert_eq!(m2.mail_from, "");
    assert_eq!(m2.mail_params, "SIZE=30 BODY=8BITMIME");
    assert_eq!(m2.rcpts, vec!["z@alias.test"]);
    assert_eq!(
        m2.rcpt_params,
        vec!["NOTIFY=FAILURE ORCPT=rfc822;z@alias.test"]
    );
    assert_eq!(m2.data, b"Subject: two\r\n\r\nbody\r\n".to_vec());
    assert_eq!(m1.conn_id, m2.conn_id);
    assert_eq!(sink.connections(), 1);
    assert_eq!(sink.transactions(), 2);
}

#[tokio::test]
async fn sink_handles_concurrent_connections_and_source_address() {
    let sink = TestSink::start().await;
    let mut tasks = Vec::new();
    for i in 0..5 {
        let addr = sink.addr();
        tasks.push(tokio::spawn(async move {
            let mut c = RawSmtp::connect(addr).await;
            c.send_message(
                &format!("s{i}@origin.test"),
                &["r@alias.test"],
                format!("Subject: {i}\r\n\r\nhello").as_bytes(),
            )
            .await
            .expect("send");
            c.quit().await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let msgs = sink.wait_for(5, WAIT).await;
    assert_eq!(sink.connections(), 5);
    // The client adds the missing final CRLF.
    assert!(msgs.iter().all(|m| m.data.ends_with(b"hello\r\n")));

    // A chosen 127.0.0.x source address is seen by the server.
    let mut c = RawSmtp::connect_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 7)), sink.addr()).await;
    c.send_message("a@origin.test", &["r@alias.test"], b"x\r\n")
        .await
        .unwrap();
    let msgs = sink.wait_for(6, WAIT).await;
    assert_eq!(msgs[5].peer.ip(), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 7)));
}

#[tokio::test]
async fn sink_reply_policies() {
    let sink = TestSink::builder()
        .rcpt_policy(|rcpt, attempt| {
            if rcpt.starts_with("bad") {
                Reply::reject()
            } else if rcpt.starts_with("slow") && attempt == 1 {
                Reply::new(450, "4.2.0 try later")
            } else {
                Reply::new(250, "2.1.5 OK")
            }
        })
        .data_policy(|d, _| {
            if d.text().contains("spam") {
                Reply::new(554, "5.7.1 rejected as spam")
            } else {
                Reply::ok()
            }
        })
        .size(Some(1000))
        .dsn(false)
        .start()
        .await;
    let mut c = RawSmtp::connect(sink.addr()).await;
    let (_, ehlo) = c.ehlo("c.test").await;
    assert!(
        ehlo.contains("SIZE 1000") && !ehlo.contains("DSN"),
        "{ehlo}"
    );
    c.expect("MAIL FROM:<a@origin.test>", 250).await;
    assert_eq!(c.cmd("RCPT TO:<bad@alias.test>").await.0, 550);
    assert_eq!(
        c.cmd("RCPT TO:<slow@alias.test>").await,
        (450, "4.2.0 try later".to_string())
    );
    assert_eq!(c.cmd("RCPT TO:<good@alias.test>").await.0, 250);
    assert_eq!(c.cmd("RCPT TO:<slow@alias.test>").await.0, 250);
    c.expect("DATA", 354).await;
    c.send(b"Subject: spam\r\n\r\n.\r\n").await;
    assert_eq!(c.read_reply().await.0, 554);
    assert_eq!(sink.rcpt_attempts("slow@alias.test"), 2);
    // Rejected at DATA: recorded as a transaction, not as a message.
    assert_eq!(sink.transactions(), 1);
    assert!(sink.messages().is_empty());
    assert_eq!(
        sink.all_transactions()[0].rcpts,
        vec!["good@alias.test", "slow@alias.test"]
    );

    // SIZE is enforced on MAIL; DATA without accepted recipients is refused.
    assert_eq!(c.cmd("MAIL FROM:<a@origin.test> SIZE=5000").await.0, 552);
    c.expect("MAIL FROM:<a@origin.test>", 250).await;
    assert_eq!(c.cmd("RCPT TO:<bad2@alias.test>").await.0, 550);
    assert_eq!(c.cmd("DATA").await.0, 554);
    c.expect("RSET", 250).await;
    c.send_message("a@origin.test", &["ok@alias.test"], b"fine")
        .await
        .unwrap();
    assert_eq!(sink.wait_for(1, WAIT).await[0].rcpts, vec!["ok@alias.test"]);

    // A fixed MAIL reply and a hang-up.
    let sink2 = TestSink::builder()
        .mail_reply(Reply::new(451, "4.7.1 greylisted"))
        .start()
        .await;
    let mut c2 = RawSmtp::connect(sink2.addr()).await;
    let err = c2
        .send_message("a@origin.test", &["r@alias.test"], b"x")
        .await
        .expect_err("MAIL refused");
    assert_eq!((err.stage, err.code), ("MAIL", 451));

    let sink3 = TestSink::builder()
        .rcpt_policy(|_, _| Reply::hangup())
        .start()
        .await;
    let mut c3 = RawSmtp::connect(sink3.addr()).await;
    c3.ehlo("c.test").await;
    c3.expect("MAIL FROM:<a@origin.test>", 250).await;
    c3.send(b"RCPT TO:<r@alias.test>\r\n").await;
    assert!(c3.try_read_reply().await.is_err());
}

#[tokio::test]
#[should_panic(expected = "waited")]
async fn sink_wait_for_times_out_with_message() {
    let sink = TestSink::start().await;
    sink.wait_for(1, Duration::from_millis(100)).await;
}

#[tokio::test]
async fn tls_starttls_with_test_pki() {
    let pki = TestPki::new(&["localhost", "mx1.dest.test", "127.0.0.1"]);
    let sink = TestSink::builder()
        .starttls(pki.server_config())
        .start()
        .await;
    let mut c = RawSmtp::connect(sink.addr()).await;
    let (_, ehlo) = c.ehlo("c.test").await;
    assert!(ehlo.contains("STARTTLS"), "{ehlo}");
    c.starttls(pki.client_config(), "mx1.dest.test")
        .await
        .expect("TLS handshake");
    assert!(c.is_tls());
    let (_, ehlo) = c.ehlo("c.test").await;
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    c.send_message(
        "a@origin.test",
        &["r@alias.test"],
        b"Subject: tls\r\n\r\nhi\r\n",
    )
    .await
    .unwrap();
    let msgs = sink.wait_for(1, WAIT).await;
    assert!(msgs[0].tls);
    assert_eq!(msgs[0].helo, "c.test");

    // A client trusting another CA, or asking for a name not in the cert, fails the handshake.
    let other = TestPki::new(&["localhost"]);
    let mut c = RawSmtp::connect(sink.addr()).await;
    c.ehlo("c.test").await;
    assert!(
        c.starttls(other.client_config(), "localhost")
            .await
            .is_err()
    );
    let mut c = RawSmtp::connect(sink.addr()).await;
    c.ehlo("c.test").await;
    assert!(c.starttls(pki.client_config(), "wrong.test").await.is_err());

    // Files for tenso's config.
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = pki.write_to_dir(dir.path());
    assert!(
        std::fs::read_to_string(cert)
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    assert!(
        std::fs::read_to_string(key)
            .unwrap()
            .contains("PRIVATE KEY")
    );
    assert!(dir.path().join("ca.pem").exists());
}

#[tokio::test]
async fn tls_broken_sink_fails_handshake() {
    let pki = TestPki::new(&["localhost"]);
    let sink = TestSink::builder().tls_broken().start().await;
    let mut c = RawSmtp::connect(sink.addr()).await;
    let (_, ehlo) = c.ehlo("c.test").await;
    assert!(ehlo.contains("STARTTLS"));
    let err = c
        .starttls(pki.client_config(), "localhost")
        .await
        .expect_err("handshake must fail");
    assert!(!err.to_string().contains("refused"), "{err}");
}

#[test]
fn dot_stuffing() {
    assert_eq!(
        dot_stuff(b".a\r\nb\r\n.\r\n"),
        b"..a\r\nb\r\n..\r\n".to_vec()
    );
    assert_eq!(dot_stuff(b"no newline"), b"no newline\r\n".to_vec());
}

#[test]
fn daemon_config_assembly() {
    let dir = Path::new("/tmp/x \"y\"/data");
    let cfg = assemble_config(dir, "[dns]\nnameservers = [\"127.0.0.1:53\"]\n");
    let t: toml::Table = toml::from_str(&cfg).expect("valid TOML");
    assert_eq!(t["data_dir"].as_str(), Some("/tmp/x \"y\"/data"));
    assert_eq!(t["hostname"].as_str(), Some("tenso.test"));
    assert_eq!(
        t["smtp"]["listen"].as_array().unwrap()[0].as_str(),
        Some("127.0.0.1:0")
    );
    assert_eq!(
        t["dns"]["nameservers"].as_array().unwrap()[0].as_str(),
        Some("127.0.0.1:53")
    );

    // Caller's own hostname and [smtp] table are kept, not duplicated.
    let cfg = assemble_config(
        dir,
        "hostname = \"relay.test\"\n\n[smtp]\nlisten = [\"127.0.0.1:0\"]\nmax_message_size = 1000\n",
    );
    let t: toml::Table = toml::from_str(&cfg).expect("valid TOML");
    assert_eq!(t["hostname"].as_str(), Some("relay.test"));
    assert_eq!(t["smtp"]["max_message_size"].as_integer(), Some(1000));
    assert_eq!(cfg.matches("[smtp]").count(), 1);

    // A sub-table alone still gets the [smtp] listen table (valid TOML after it).
    let cfg = assemble_config(dir, "[smtp.tls]\ncert = \"c.pem\"\n");
    let t: toml::Table = toml::from_str(&cfg).expect("valid TOML");
    assert_eq!(t["smtp"]["tls"]["cert"].as_str(), Some("c.pem"));
    assert!(t["smtp"]["listen"].is_array());
}

#[tokio::test]
async fn postfix_smtp_sink_counts_and_dumps() {
    let ps = PostfixSink::start_with_dump().await;
    let mut c = RawSmtp::connect(ps.addr()).await;
    assert_eq!(c.greeting.0, 220);
    c.send_message(
        "a@origin.test",
        &["r1@alias.test"],
        b"Subject: 1\r\n\r\none\r\n",
    )
    .await
    .unwrap();
    c.send_message(
        "a@origin.test",
        &["r2@alias.test"],
        b"Subject: 2\r\n\r\ntwo\r\n",
    )
    .await
    .unwrap();
    c.quit().await;
    assert_eq!(ps.wait_for(2, WAIT).await, 2);
    let dumps = ps.dumps();
    assert_eq!(dumps.len(), 2);
    let mut rcpts: Vec<String> = dumps.iter().map(|d| d.rcpt_args.join(",")).collect();
    rcpts.sort();
    assert_eq!(rcpts, vec!["<r1@alias.test>", "<r2@alias.test>"]);
    assert!(dumps.iter().any(|d| d.message == "Subject: 1\n\none\n"));
    assert_eq!(dumps[0].mail_args, "<a@origin.test>");
    assert_eq!(dumps[0].helo, "client.test");
}

/// A stand-in for the tenso binary: writes tenso.listen on `serve` and exits 0 on SIGTERM.
const FAKE_DAEMON: &str = r#"#!/bin/sh
cfg="$2"
dd=$(sed -n 's/^data_dir = "\(.*\)"$/\1/p' "$cfg")
if [ "$3" = serve ]; then
  echo "fake starting RUST_LOG=$RUST_LOG" >&2
  trap 'echo "got TERM" >&2; exit 0' TERM
  printf '127.0.0.1:2525\n127.0.0.1:2526\n' > "$dd/tenso.listen.tmp"
  mv "$dd/tenso.listen.tmp" "$dd/tenso.listen"
  while true; do sleep 0.05; done
else
  echo "cli $*"
fi
"#;

#[tokio::test]
async fn daemon_lifecycle_with_fake_binary() {
    use std::os::unix::fs::PermissionsExt;
    let bin_dir = tempfile::tempdir().unwrap();
    let bin = bin_dir.path().join("fake-tenso");
    std::fs::write(&bin, FAKE_DAEMON).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();

    let mut t = common::daemon::Tenso::prepare("[dns]\nnameservers = []\n").with_bin(&bin);
    t.launch().await;
    assert_eq!(t.smtp_addr(), "127.0.0.1:2525".parse().unwrap());
    assert_eq!(t.listen_addrs().len(), 2);
    assert!(t.is_running());
    assert!(
        t.wait_for_log("fake starting RUST_LOG=info", WAIT).await,
        "{}",
        t.log()
    );

    let out = t.cli(&["queue", "list"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("cli --config") && stdout.ends_with("queue list\n"),
        "{stdout}"
    );
    let out = t.cli_async(&["status"]).await;
    assert!(out.status.success());

    let status = t.stop().await.expect("was running");
    assert!(status.success(), "{status}");
    assert!(t.log().contains("got TERM"), "{}", t.log());

    t.restart().await;
    assert!(t.is_running());
    t.kill9().await;
    assert!(!t.is_running());
    assert!(t.dir().join("tenso.toml").exists());
}
