//! `tenso import` / `tenso export` (issue 2) with Postfix virtual(5) and aliases(5) files
//! holding good and bad lines: atomic without `--skip-bad` (every bad line reported with
//! its number), good lines only with it, and an export that imports back to the same
//! table. Also `tenso config check` and the unknown-key error.

mod common;

use common::daemon::{Tenso, tenso_bin};
use common::dns::TestDns;
use common::smtp_client::RawSmtp;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
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

async fn ok(t: &Tenso, args: &[&str]) -> Output {
    let o = t.cli_async(args).await;
    assert!(
        o.status.success(),
        "tenso {args:?} failed ({}): {}",
        o.status,
        text(&o.stderr)
    );
    o
}

async fn json(t: &Tenso, args: &[&str]) -> Value {
    let o = ok(t, args).await;
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("tenso {args:?}: not JSON ({e}): {}", text(&o.stdout)))
}

/// alias → (destinations, bounce policy), from `user list --json`.
async fn table(t: &Tenso) -> BTreeMap<String, (Vec<String>, String)> {
    let list = json(t, &["user", "list", "--json"]).await;
    list.as_array()
        .expect("array")
        .iter()
        .map(|a| {
            let dests = a["dests"]
                .as_array()
                .expect("dests")
                .iter()
                .map(|d| d.as_str().expect("dest").to_string())
                .collect();
            (
                a["alias"].as_str().expect("alias").to_string(),
                (dests, a["bounce"].as_str().expect("bounce").to_string()),
            )
        })
        .collect()
}

async fn domains(t: &Tenso) -> BTreeSet<String> {
    json(t, &["domain", "list", "--json"])
        .await
        .as_array()
        .expect("array")
        .iter()
        .map(|d| d.as_str().expect("domain").to_string())
        .collect()
}

/// A table file under construction, with what each of its lines should do.
#[derive(Default)]
struct File {
    lines: Vec<String>,
    /// For each bad entry, the line numbers that may name it (its first line, or the
    /// physical line holding the bad value).
    bad: Vec<Vec<usize>>,
    good: BTreeMap<String, Vec<String>>,
    domains: BTreeSet<String>,
}

impl File {
    fn push(&mut self, line: &str) -> usize {
        self.lines.push(line.to_string());
        self.lines.len()
    }
    fn other(&mut self, line: &str) {
        self.push(line);
    }
    fn good(&mut self, lines: &[&str], alias: &str, dests: &[&str]) {
        for l in lines {
            self.push(l);
        }
        let old = self.good.insert(
            alias.to_string(),
            dests.iter().map(|d| d.to_string()).collect(),
        );
        assert!(old.is_none(), "test bug: {alias} twice");
    }
    fn domain(&mut self, line: &str, domain: &str) {
        self.push(line);
        self.domains.insert(domain.to_string());
    }
    /// A bad entry; `at` is the index in `lines` of the physical line at fault.
    fn bad(&mut self, lines: &[&str], at: usize) {
        let first = self.lines.len() + 1;
        for l in lines {
            self.push(l);
        }
        let mut may = vec![first];
        if at > 0 {
            may.push(first + at);
        }
        self.bad.push(may);
    }
    fn text(&self) -> String {
        let mut s = self.lines.join("\n");
        s.push('\n');
        s
    }
    fn write(&self, dir: &Path, name: &str) -> String {
        let p = dir.join(name);
        std::fs::write(&p, self.text()).expect("write table file");
        p.to_string_lossy().into_owned()
    }
}

fn virtual_file() -> File {
    let mut f = File::default();
    f.other("# virtual(5) table for the import test");
    f.other("");
    f.domain("alias.test    anything", "alias.test");
    f.domain("empty.test    virtual-domain", "empty.test");
    f.good(
        &["@catch.test    catchall@dest.test"],
        "@catch.test",
        &["catchall@dest.test"],
    );
    for i in 1..=12 {
        let (a, d) = (format!("a{i:02}@alias.test"), format!("a{i:02}@dest.test"));
        f.good(&[&format!("{a}\t{d}")], &a, &[&d]);
    }
    f.bad(&["pipe@alias.test   |/usr/bin/procmail"], 0);
    f.good(
        &["multi@alias.test  m1@dest.test, m2@dest.test,m3@dest.test"],
        "multi@alias.test",
        &["m1@dest.test", "m2@dest.test", "m3@dest.test"],
    );
    f.bad(&["include@alias.test  :include:/etc/mail/staff"], 0);
    f.good(
        &["spaced@alias.test m1@dest.test   m2@dest.test"],
        "spaced@alias.test",
        &["m1@dest.test", "m2@dest.test"],
    );
    f.bad(&["file@alias.test   /var/mail/file"], 0);
    f.other("# a comment between entries");
    f.good(
        &["carol@ALIAS.Test  carol@Dest.TEST"],
        "carol@alias.test",
        &["carol@dest.test"],
    );
    f.bad(&["bare    bare@dest.test"], 0);
    f.good(
        &["chain@alias.test  a01@alias.test"],
        "chain@alias.test",
        &["a01@alias.test"],
    );
    f.good(
        &["fwd@alias.test  later@alias.test"],
        "fwd@alias.test",
        &["later@alias.test"],
    );
    f.bad(&["a03@alias.test   again@dest.test"], 0);
    f.good(
        &["cont@alias.test  c1@dest.test,", "    c2@dest.test"],
        "cont@alias.test",
        &["c1@dest.test", "c2@dest.test"],
    );
    f.bad(&["mixed@alias.test  ok@dest.test, |/bin/cat"], 0);
    f.bad(&["contbad@alias.test  ok@dest.test,", "\t/tmp/file"], 1);
    f.bad(&["nodest@alias.test"], 0);
    f.good(
        &["dupdest@alias.test  d@dest.test, d@dest.test"],
        "dupdest@alias.test",
        &["d@dest.test"],
    );
    f.good(
        &["later@alias.test  l@dest.test"],
        "later@alias.test",
        &["l@dest.test"],
    );
    f.other("");
    f
}

fn aliases_file() -> File {
    let mut f = File::default();
    f.other("# aliases(5) file for the import test");
    f.good(
        &["postmaster: pm@dest.test"],
        "postmaster@list.test",
        &["pm@dest.test"],
    );
    for i in 1..=12 {
        let d = format!("b{i:02}@dest.test");
        f.good(
            &[&format!("b{i:02}: {d}")],
            &format!("b{i:02}@list.test"),
            &[&d],
        );
    }
    f.bad(&["cmd: \"|/usr/bin/vacation b01\""], 0);
    f.good(
        &["team: b01, b02, extern@dest.test"],
        "team@list.test",
        &["b01@list.test", "b02@list.test", "extern@dest.test"],
    );
    f.bad(&["inc: :include:/etc/mail/inc.list"], 0);
    f.good(
        &["long: l1@dest.test,", "\tl2@dest.test,", "  l3@dest.test"],
        "long@list.test",
        &["l1@dest.test", "l2@dest.test", "l3@dest.test"],
    );
    f.other("# comment");
    f.bad(&["file: /var/spool/mail/file"], 0);
    f.bad(&["b01: dup@dest.test"], 0);
    f.bad(&["virt@list.test: x@dest.test"], 0);
    f.bad(&["nocolon x@dest.test"], 0);
    f.bad(&["mbox: \\mbox"], 0);
    f.bad(&["contbad: ok@dest.test,", "    |/bin/evil"], 1);
    f.good(
        &["last: last@dest.test"],
        "last@list.test",
        &["last@dest.test"],
    );
    f
}

/// The line numbers the CLI reports: the number after the first word "line" of each
/// stderr line.
fn reported_lines(stderr: &str) -> BTreeSet<usize> {
    let mut out = BTreeSet::new();
    for l in stderr.lines() {
        let words: Vec<&str> = l
            .split(|c: char| !c.is_ascii_alphanumeric())
            .filter(|w| !w.is_empty())
            .collect();
        if let Some(i) = words.iter().position(|w| w.eq_ignore_ascii_case("line"))
            && let Some(n) = words.get(i + 1).and_then(|w| w.parse().ok())
        {
            out.insert(n);
        }
    }
    out
}

fn check_reported(f: &File, stderr: &str) {
    let got = reported_lines(stderr);
    for may in &f.bad {
        assert!(
            may.iter().any(|n| got.contains(n)),
            "bad entry at line(s) {may:?} not reported:\n{stderr}"
        );
    }
    for n in &got {
        assert!(
            f.bad.iter().any(|may| may.contains(n)),
            "line {n} reported but it is good:\n{stderr}"
        );
    }
}

fn with_policy(
    good: &BTreeMap<String, Vec<String>>,
    policy: &str,
) -> BTreeMap<String, (Vec<String>, String)> {
    good.iter()
        .map(|(a, d)| (a.clone(), (d.clone(), policy.to_string())))
        .collect()
}

async fn rcpt_code(t: &Tenso, rcpt: &str) -> u16 {
    let mut c = RawSmtp::connect(t.smtp_addr()).await;
    c.expect("EHLO import.test", 250).await;
    c.expect("MAIL FROM:<s@origin.test>", 250).await;
    let (code, _) = c.cmd(&format!("RCPT TO:<{rcpt}>")).await;
    c.quit().await;
    code
}

#[tokio::test]
async fn import_virtual_and_aliases_then_export_round_trip() {
    let dns = TestDns::builder().start().await;
    let t = Tenso::start(&config(&dns)).await;
    let dir = t.dir().to_path_buf();
    let vf = virtual_file();
    assert!(vf.lines.len() >= 30, "a few dozen lines");
    let vpath = vf.write(&dir, "virtual");
    let af = aliases_file();
    let apath = af.write(&dir, "aliases");

    // virtual(5), atomic: nothing imported, every bad line named.
    let o = t.cli_async(&["import", &vpath]).await;
    assert!(!o.status.success(), "import with bad lines must fail");
    check_reported(&vf, &text(&o.stderr));
    assert!(table(&t).await.is_empty(), "nothing imported");
    assert!(domains(&t).await.is_empty(), "no domain imported");

    // --skip-bad: exactly the good lines.
    ok(&t, &["import", &vpath, "--format", "virtual", "--skip-bad"]).await;
    let mut want = with_policy(&vf.good, "pool");
    assert_eq!(table(&t).await, want);
    let mut want_domains: BTreeSet<String> = vf.domains.clone();
    want_domains.insert("catch.test".into());
    assert_eq!(domains(&t).await, want_domains);

    // aliases(5) needs a domain for its names: without one nothing is imported.
    let before = table(&t).await;
    let o = t
        .cli_async(&["import", &apath, "--format", "aliases"])
        .await;
    assert!(!o.status.success(), "aliases(5) without --domain");
    assert!(!text(&o.stderr).is_empty());
    assert_eq!(table(&t).await, before);

    // aliases(5), atomic.
    let o = t
        .cli_async(&[
            "import",
            &apath,
            "--format",
            "aliases",
            "--domain",
            "list.test",
        ])
        .await;
    assert!(!o.status.success(), "import with bad lines must fail");
    check_reported(&af, &text(&o.stderr));
    assert_eq!(table(&t).await, before, "nothing imported");

    // aliases(5) --skip-bad, with a bounce policy for the new aliases.
    ok(
        &t,
        &[
            "import",
            &apath,
            "--format",
            "aliases",
            "--domain",
            "list.test",
            "--skip-bad",
            "--bounce",
            "forward",
        ],
    )
    .await;
    want.extend(with_policy(&af.good, "forward"));
    assert_eq!(table(&t).await, want);
    want_domains.insert("list.test".into());
    assert_eq!(domains(&t).await, want_domains);

    // The running daemon uses the imported table at once.
    for (rcpt, code) in [
        ("a01@alias.test", 250),
        ("carol@alias.test", 250),
        ("cont@alias.test", 250),
        ("pipe@alias.test", 550),
        ("contbad@alias.test", 550),
        ("anyone@catch.test", 250),
        ("x@empty.test", 550),
        ("team@list.test", 250),
        ("cmd@list.test", 550),
        ("x@elsewhere.test", 554),
    ] {
        assert_eq!(rcpt_code(&t, rcpt).await, code, "RCPT TO:<{rcpt}>");
    }

    // Export, then import the export into a fresh data dir: the same table comes back.
    let exported = text(&ok(&t, &["export"]).await.stdout);
    let epath = dir.join("exported");
    std::fs::write(&epath, &exported).unwrap();
    let fresh = Tenso::prepare(&config(&dns));
    let o = ok(&fresh, &["import", &epath.to_string_lossy()]).await;
    assert!(
        text(&o.stderr).trim().is_empty(),
        "the export has no bad line: {}",
        text(&o.stderr)
    );
    let back = table(&fresh).await;
    let orig = table(&t).await;
    assert_eq!(
        back.iter()
            .map(|(a, (d, _))| (a.clone(), d.clone()))
            .collect::<Vec<_>>(),
        orig.iter()
            .map(|(a, (d, _))| (a.clone(), d.clone()))
            .collect::<Vec<_>>(),
        "aliases and destinations round-trip:\n{exported}"
    );
    assert_eq!(
        domains(&fresh).await,
        domains(&t).await,
        "local domains round-trip:\n{exported}"
    );
    // Exporting again gives the same text.
    assert_eq!(text(&ok(&fresh, &["export"]).await.stdout), exported);
}

/// Runs the binary with `args` in `cwd`, bounded by 30 s.
async fn run(cwd: &Path, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(tenso_bin());
    cmd.args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("tenso finished within 30 s")
        .expect("run tenso")
}

#[tokio::test]
async fn config_check_prints_the_effective_config() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // Embedded defaults.
    let o = run(d, &["config", "check"]).await;
    assert!(o.status.success(), "{}", text(&o.stderr));
    let eff: toml::Table = toml::from_str(&text(&o.stdout)).expect("config check prints TOML");
    assert_eq!(eff["smtp"]["listen"][0].as_str(), Some("127.0.0.1:2525"));
    assert_eq!(eff["data_dir"].as_str(), Some("./spool"));
    assert!(
        eff["hostname"].as_str().is_some_and(|h| !h.is_empty()),
        "{eff:#?}"
    );

    // A file: given values win, the rest is filled in.
    let cfg = d.join("tenso.toml");
    std::fs::write(
        &cfg,
        "hostname = \"mx.example.test\"\ndata_dir = \"/var/lib/tenso-test\"\n\n\
         [smtp]\nlisten = [\"127.0.0.1:2526\", \"[::1]:2526\"]\nmax_message_size = 4096\n\n\
         [dns]\nnameservers = [\"127.0.0.1:5353\"]\n\n[queue]\nretry = [\"30s\", \"5m\"]\n",
    )
    .unwrap();
    let cfg_s = cfg.to_string_lossy().into_owned();
    let o = run(d, &["--config", &cfg_s, "config", "check"]).await;
    assert!(o.status.success(), "{}", text(&o.stderr));
    let printed = text(&o.stdout);
    let eff: toml::Table = toml::from_str(&printed).expect("TOML");
    assert_eq!(eff["hostname"].as_str(), Some("mx.example.test"));
    assert_eq!(eff["data_dir"].as_str(), Some("/var/lib/tenso-test"));
    assert_eq!(eff["smtp"]["max_message_size"].as_integer(), Some(4096));
    assert_eq!(eff["smtp"]["listen"].as_array().map(|a| a.len()), Some(2));
    assert_eq!(eff["smtp"]["max_recipients"].as_integer(), Some(100));
    assert_eq!(
        eff["dns"]["nameservers"][0].as_str(),
        Some("127.0.0.1:5353")
    );
    assert!(eff["queue"]["retry"].is_array(), "{printed}");
    // The effective config is itself a valid config that means the same.
    let again = d.join("effective.toml");
    std::fs::write(&again, &printed).unwrap();
    let o = run(
        d,
        &["--config", &again.to_string_lossy(), "config", "check"],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), printed);
}

#[tokio::test]
async fn unknown_config_key_is_an_error_naming_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases = [
        (
            "hostname = \"a.test\"\nhostnme = \"b.test\"\n",
            "hostnme",
            2,
        ),
        (
            "hostname = \"a.test\"\n\n[smtp]\nlisten = [\"127.0.0.1:0\"]\nmax_mesage_size = 10\n",
            "max_mesage_size",
            5,
        ),
        (
            "[smtp]\nlisten = [\"127.0.0.1:0\"]\n\n[queue]\nretry = [\"1m\"]\nretyr = [\"1m\"]\n",
            "retyr",
            6,
        ),
        ("[smpt]\nlisten = [\"127.0.0.1:0\"]\n", "smpt", 1),
    ];
    for (i, (body, key, line)) in cases.iter().enumerate() {
        let p = d.join(format!("bad{i}.toml"));
        std::fs::write(&p, body).unwrap();
        let o = run(d, &["--config", &p.to_string_lossy(), "config", "check"]).await;
        let err = text(&o.stderr);
        assert!(!o.status.success(), "{key}: config check accepted it");
        assert!(err.contains(key), "the error names {key}: {err}");
        assert!(
            reported_lines(&err).contains(line),
            "the error names line {line}: {err}"
        );
        assert!(o.stdout.is_empty(), "nothing printed as effective config");
    }

    // `serve` refuses such a config too, and says why.
    match Tenso::try_start(
        "[smtp]\nlisten = [\"127.0.0.1:0\"]\nmax_recipents = 5\n",
        Duration::from_secs(30),
    )
    .await
    {
        Ok(_) => panic!("tenso serve started with an unknown key"),
        Err((status, log)) => {
            assert!(!status.success());
            assert!(log.contains("max_recipents"), "{log}");
        }
    }
}
