//! Listeners: an IPv4 and an IPv6 wildcard on the same port can both be configured
//! (the sample config does exactly that). Without IPV6_V6ONLY, Linux makes `[::]`
//! take IPv4 too and the second bind fails. Traffic stays on loopback.

mod common;

use common::daemon::Tenso;
use common::dns::TestDns;
use common::smtp_client::RawSmtp;

#[tokio::test]
async fn ipv4_and_ipv6_wildcards_share_a_port() {
    let dns = TestDns::builder().start().await;
    // A port free right now on both wildcards (bound and released; the daemon binds it
    // twice), taken below the kernel's ephemeral range so that no outgoing connection
    // of a concurrent test can be given it in between.
    let port = wildcard_port();
    let cfg = format!(
        "[dns]\n{}\n[smtp]\nlisten = [\"0.0.0.0:{port}\", \"[::]:{port}\"]\n",
        dns.resolver_config_toml()
    );
    let t = Tenso::start(&cfg).await;
    let addrs = t.listen_addrs().to_vec();
    assert_eq!(
        addrs.len(),
        2,
        "both listeners announced: {addrs:?}\n{}",
        t.log()
    );
    for target in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
        let c = RawSmtp::connect(target.parse().unwrap()).await;
        assert_eq!(c.greeting.0, 220, "{target}: {:?}", c.greeting);
    }
}

fn wildcard_port() -> u16 {
    use std::net::TcpListener;
    for _ in 0..1000 {
        let port = 20000 + rand_u16() % 12000;
        let v4 = TcpListener::bind(("0.0.0.0", port));
        let v6 = TcpListener::bind(("::1", port));
        if v4.is_ok() && v6.is_ok() {
            return port;
        }
    }
    panic!("no free port below the ephemeral range");
}

fn rand_u16() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    h.finish() as u16
}
