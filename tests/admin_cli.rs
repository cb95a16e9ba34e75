//! The admin CLI (issue 2): the same commands work with the daemon running (through the
//! admin socket) and stopped (the CLI opens the stores itself); bad input fails with one
//! line on stderr and changes nothing; the socket refuses other users; a second daemon on
//! the same data dir refuses to start.

mod common;

use common::daemon::{Tenso, tenso_bin};
use common::dns::TestDns;
use common::smtp_client::RawSmtp;
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use common::closed_port;

/// DNS goes to the kit's server (no records), never to the machine's resolver.
fn config(dns: &TestDns) -> String {
    format!(
        "[dns]\n{}\n\n[smtp]\nlisten = [\"127.0.0.1:0\"]\n\n\
         [delivery]\nroutes = {{ \"*\" = \"127.0.0.1:{}\" }}\n\n\
         [queue]\nretry = [\"1h\"]\n",
        dns.resolver_config_toml(),
        closed_port()
    )
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

async fn ok(t: &Tenso, args: &[&str]) -> String {
    let o = t.cli_async(args).await;
    assert!(
        o.status.success(),
        "tenso {args:?} failed ({}): {}",
        o.status,
        text(&o.stderr)
    );
    text(&o.stdout)
}

async fn json(t: &Tenso, args: &[&str]) -> Value {
    let out = ok(t, args).await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("tenso {args:?}: not JSON ({e}): {out}"))
}

/// Runs a command that must fail: non-zero exit, exactly one line on stderr. Returns it.
async fn fails(t: &Tenso, args: &[&str]) -> String {
    let o = t.cli_async(args).await;
    let err = text(&o.stderr);
    assert!(
        !o.status.success(),
        "tenso {args:?} should fail; stdout: {}",
        text(&o.stdout)
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "tenso {args:?}: one line on stderr, got {err:?}"
    );
    lines[0].to_string()
}

/// The whole table, as the CLI shows it.
async fn snapshot(t: &Tenso) -> (Value, Value) {
    (
        json(t, &["user", "list", "--json"]).await,
        json(t, &["domain", "list", "--json"]).await,
    )
}

fn aliases(list: &Value) -> Vec<String> {
    let mut v: Vec<String> = list
        .as_array()
        .expect("array")
        .iter()
        .map(|a| a["alias"].as_str().expect("alias").to_string())
        .collect();
    v.sort();
    v
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_str().expect("string").to_string())
        .collect()
}

async fn rcpt_code(t: &Tenso, rcpt: &str) -> u16 {
    let mut c = RawSmtp::connect(t.smtp_addr()).await;
    c.expect("EHLO admin.test", 250).await;
    c.expect("MAIL FROM:<s@origin.test>", 250).await;
    let (code, _) = c.cmd(&format!("RCPT TO:<{rcpt}>")).await;
    c.quit().await;
    code
}

/// One full round of admin commands; `tag` keeps the two rounds' names apart.
async fn exercise(t: &Tenso, tag: &str) {
    let dom = format!("{tag}.test");
    let alice = format!("alice@{dom}");
    let bob = format!("bob@{dom}");

    ok(t, &["user", "add", &alice, "alice@dest.test"]).await;
    ok(
        t,
        &[
            "user",
            "add",
            &bob.to_uppercase(),
            "bob1@dest.test",
            "bob2@dest.test",
            "--bounce",
            "forward",
        ],
    )
    .await;
    let show = json(t, &["user", "show", &alice, "--json"]).await;
    assert_eq!(show["alias"], alice.as_str(), "{show:#}");
    assert_eq!(strs(&show["dests"]), ["alice@dest.test"]);
    assert_eq!(show["bounce"], "pool", "default_bounce is pool: {show:#}");
    // Aliases are case-insensitive: shown by any spelling, stored lowercase.
    let show = json(t, &["user", "show", &bob.to_uppercase(), "--json"]).await;
    assert_eq!(show["alias"], bob.as_str());
    assert_eq!(strs(&show["dests"]), ["bob1@dest.test", "bob2@dest.test"]);
    assert_eq!(show["bounce"], "forward");

    // set: destinations and policy.
    ok(
        t,
        &[
            "user",
            "set",
            &alice,
            "--dest",
            "a1@dest.test",
            "a2@dest.test",
            "--bounce",
            "forward",
        ],
    )
    .await;
    let show = json(t, &["user", "show", &alice, "--json"]).await;
    assert_eq!(strs(&show["dests"]), ["a1@dest.test", "a2@dest.test"]);
    assert_eq!(show["bounce"], "forward");
    ok(t, &["user", "set", &alice, "--bounce", "pool"]).await;
    let show = json(t, &["user", "show", &alice, "--json"]).await;
    assert_eq!(strs(&show["dests"]), ["a1@dest.test", "a2@dest.test"]);
    assert_eq!(show["bounce"], "pool");
    // The human form names the alias and its destinations too.
    let human = ok(t, &["user", "show", &alice]).await;
    assert!(
        human.contains(&alice) && human.contains("a2@dest.test"),
        "{human}"
    );

    // list, and list --domain.
    let all = json(t, &["user", "list", "--json"]).await;
    assert!(aliases(&all).contains(&alice) && aliases(&all).contains(&bob));
    let mine = json(t, &["user", "list", "--domain", &dom, "--json"]).await;
    assert_eq!(aliases(&mine), [alice.clone(), bob.clone()]);
    let other = json(t, &["user", "list", "--domain", "nowhere.test", "--json"]).await;
    assert_eq!(aliases(&other), Vec::<String>::new());

    // domains: alias domains are listed; explicit ones can be added and removed.
    let extra = format!("extra-{tag}.test");
    let doms = strs(&json(t, &["domain", "list", "--json"]).await);
    assert!(doms.contains(&dom) && !doms.contains(&extra), "{doms:?}");
    ok(t, &["domain", "add", &extra.to_uppercase()]).await;
    let doms = strs(&json(t, &["domain", "list", "--json"]).await);
    assert!(doms.contains(&extra), "{doms:?}");

    // Bad input: one line on stderr, non-zero exit, table unchanged.
    let before = snapshot(t).await;
    let bad: Vec<Vec<String>> = vec![
        vec!["user", "add", "not-an-address", "x@dest.test"],
        vec!["user", "add", &format!("carol@{dom}"), "not an address"],
        vec!["user", "add", &format!("carol@{dom}"), "x@dest.test", "x@"],
        vec!["user", "add", &format!("u%x@{dom}"), "x@dest.test"],
        vec!["user", "add", "u@[127.0.0.1]", "x@dest.test"],
        vec!["user", "add", &alice, "other@dest.test"],
        vec!["user", "add", &alice.to_uppercase(), "other@dest.test"],
        vec!["user", "show", &format!("ghost@{dom}")],
        vec!["user", "show", "bad@@address"],
        vec!["user", "remove", &format!("ghost@{dom}")],
        vec!["user", "set", &format!("ghost@{dom}"), "--bounce", "pool"],
        vec!["user", "set", &alice, "--dest", "not an address"],
        vec!["domain", "remove", "never-added.test"],
        vec!["domain", "add", "bad domain"],
    ]
    .into_iter()
    .map(|v| v.into_iter().map(str::to_string).collect())
    .collect();
    for args in &bad {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let line = fails(t, &args).await;
        assert!(line.len() > 10, "a clear message for {args:?}: {line}");
        assert_eq!(
            snapshot(t).await,
            before,
            "tenso {args:?} changed the table"
        );
    }

    // remove
    ok(t, &["user", "remove", &bob]).await;
    let line = fails(t, &["user", "show", &bob]).await;
    assert!(line.contains(&bob), "the message names the alias: {line}");
    ok(t, &["domain", "remove", &extra]).await;
    let doms = strs(&json(t, &["domain", "list", "--json"]).await);
    assert!(doms.contains(&dom) && !doms.contains(&extra), "{doms:?}");
    let all = json(t, &["user", "list", "--json"]).await;
    assert!(aliases(&all).contains(&alice) && !aliases(&all).contains(&bob));
}

#[tokio::test]
async fn admin_cli_with_daemon_running_and_stopped() {
    let dns = TestDns::builder().start().await;
    let mut t = Tenso::start(&config(&dns)).await;
    exercise(&t, "live").await;
    assert!(
        t.log().contains("admin command"),
        "commands went through the socket"
    );
    // Changes made through the socket take effect in the running daemon at once.
    assert_eq!(rcpt_code(&t, "alice@live.test").await, 250);
    assert_eq!(rcpt_code(&t, "bob@live.test").await, 550);
    ok(&t, &["user", "add", "bob@live.test", "b@dest.test"]).await;
    assert_eq!(rcpt_code(&t, "bob@live.test").await, 250);
    ok(&t, &["user", "remove", "bob@live.test"]).await;
    assert_eq!(rcpt_code(&t, "bob@live.test").await, 550);
    let live = snapshot(&t).await;

    // Stopped: the CLI opens the table itself and sees what the daemon wrote.
    t.stop().await;
    assert_eq!(snapshot(&t).await, live);
    exercise(&t, "offline").await;
    let offline = snapshot(&t).await;

    // The daemon sees what the CLI wrote while it was stopped.
    t.launch().await;
    assert_eq!(snapshot(&t).await, offline);
    assert_eq!(rcpt_code(&t, "alice@offline.test").await, 250);
    assert_eq!(rcpt_code(&t, "alice@live.test").await, 250);
    assert_eq!(rcpt_code(&t, "bob@offline.test").await, 550);
}

/// Makes `p` and every parent up to `/` traversable by others.
fn open_path_for_others(p: &Path) {
    let mut cur = Some(p);
    while let Some(d) = cur {
        let mode = std::fs::metadata(d).expect("stat").permissions().mode();
        if mode & 0o001 == 0 {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o005))
                .unwrap_or_else(|e| panic!("chmod {}: {e}", d.display()));
        }
        cur = d.parent();
    }
}

const NOBODY: u32 = 65534;

/// Runs the CLI binary as uid/gid 65534 with the daemon's config; bounded by 30 s.
async fn cli_as_nobody(t: &Tenso, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(tenso_bin());
    cmd.arg("--config")
        .arg(t.config_path())
        .args(args)
        .current_dir("/")
        .stdin(Stdio::null())
        .uid(NOBODY)
        .gid(NOBODY);
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("CLI as nobody finished within 30 s")
        .expect("spawn CLI as nobody")
}

#[tokio::test]
async fn socket_refuses_other_users() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test runs the CLI as uid {NOBODY} and so must run as root (as .ci/run does)"
    );
    let dns = TestDns::builder().start().await;
    let t = Tenso::start(&config(&dns)).await;
    ok(&t, &["user", "add", "alice@alias.test", "alice@dest.test"]).await;
    let before = snapshot(&t).await;

    // nobody may read the config and reach the data dir, but not use the socket.
    open_path_for_others(t.data_dir());
    std::fs::set_permissions(t.config_path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let sock = t.data_dir().join("tenso.sock");
    let mode = std::fs::metadata(&sock)
        .expect("socket exists")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the admin socket is owner-only");

    // Default mode 0600: the connect itself is refused by the kernel.
    let o = cli_as_nobody(&t, &["user", "list", "--json"]).await;
    assert!(
        !o.status.success(),
        "nobody used the socket: {}",
        text(&o.stdout)
    );
    let err = text(&o.stderr);
    assert!(
        err.to_lowercase().contains("permission denied") && err.contains("os error 13"),
        "EACCES from connect(2): {err}"
    );
    let o = cli_as_nobody(&t, &["user", "add", "evil@alias.test", "evil@dest.test"]).await;
    assert!(!o.status.success());
    assert!(
        !t.log().contains("refused peer"),
        "with mode 0600 nobody cannot even connect: {}",
        t.log()
    );

    // Socket opened to everyone: the daemon itself refuses the peer by its uid.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    for args in [
        &["user", "list", "--json"][..],
        &["user", "add", "evil@alias.test", "evil@dest.test"],
        &["user", "remove", "alice@alias.test"],
        &["queue", "list"],
    ] {
        let o = cli_as_nobody(&t, args).await;
        let err = text(&o.stderr);
        assert!(
            !o.status.success(),
            "nobody ran {args:?}: {}",
            text(&o.stdout)
        );
        assert!(
            err.to_lowercase().contains("permission denied") && !err.contains("os error"),
            "the daemon's refusal for {args:?}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    assert!(
        t.log().contains("refused peer"),
        "the daemon logged the refusal: {}",
        t.log()
    );
    assert_eq!(snapshot(&t).await, before, "the table is unchanged");
}

#[tokio::test]
async fn second_daemon_on_the_same_data_dir_refuses_to_start() {
    let dns = TestDns::builder().start().await;
    let mut t = Tenso::start(&config(&dns)).await;
    ok(&t, &["user", "add", "alice@alias.test", "alice@dest.test"]).await;
    let listen = std::fs::read_to_string(t.data_dir().join("tenso.listen")).unwrap();

    let mut second = tokio::process::Command::new(tenso_bin());
    second
        .arg("--config")
        .arg(t.config_path())
        .arg("serve")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let o = tokio::time::timeout(Duration::from_secs(30), second.output())
        .await
        .expect("the second daemon exits instead of running")
        .expect("spawn second daemon");
    let err = text(&o.stderr);
    assert!(
        !o.status.success(),
        "second daemon exited with {}",
        o.status
    );
    assert!(
        err.contains("already running") && err.contains(&t.data_dir().display().to_string()),
        "a clear message naming the data dir: {err}"
    );

    // The first daemon is untouched: same listen file, socket and SMTP still serve.
    assert!(t.is_running());
    assert_eq!(
        std::fs::read_to_string(t.data_dir().join("tenso.listen")).unwrap(),
        listen
    );
    let list = json(&t, &["user", "list", "--json"]).await;
    assert_eq!(aliases(&list), ["alice@alias.test"]);
    assert_eq!(rcpt_code(&t, "alice@alias.test").await, 250);
    // Once the first daemon stops, the data dir is free and intact.
    t.stop().await;
    t.launch().await;
    assert_eq!(rcpt_code(&t, "alice@alias.test").await, 250);
}
