//! Admin edge cases (issue 11, points 2 and 6):
//! - queue ids are checked before they name a file: `tenso queue remove ../x` (and
//!   show, hold, release, flush) is refused in direct mode and through the daemon, and
//!   the file it named is still there;
//! - a closed output pipe (`tenso user list | head -1`) ends the CLI quietly with
//!   status 0 — no panic, no backtrace — through the daemon and in direct mode;
//! - text from mail in pool listings and `pool show` reaches the terminal escaped,
//!   and `--json` gives it back exactly.

mod bounce_support;
mod common;

use bounce_support::*;
use common::daemon::Tenso;
use common::sink::TestSink;

fn fail_text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

async fn assert_bad_ids_refused(t: &Tenso, mode: &str) {
    let victim = t.data_dir().join("x.msg");
    let victim2 = t.dir().join("victim.msg");
    std::fs::write(&victim, b"not a queue file").unwrap();
    std::fs::write(&victim2, b"not a queue file").unwrap();
    for args in [
        vec!["queue", "remove", "../x"],
        vec!["queue", "remove", "../../victim"],
        vec!["queue", "show", "../x"],
        vec!["queue", "hold", "../x"],
        vec!["queue", "release", "/etc/passwd"],
        vec!["queue", "flush", ".."],
        vec!["queue", "remove", ""],
        vec!["queue", "remove", "0123abcdef"],
    ] {
        let out = t.cli_async(&args).await;
        let err = fail_text(&out);
        assert_eq!(out.status.code(), Some(1), "{mode}: tenso {args:?}: {err}");
        assert!(
            err.contains("invalid queue id"),
            "{mode}: tenso {args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    assert!(
        victim.exists() && victim2.exists(),
        "{mode}: a file outside the queue was removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_ids_cannot_name_files_outside_the_spool() {
    let t = Tenso::prepare("");
    // Direct mode (no daemon): the spool itself refuses.
    t.cli_ok(&["user", "add", "a@alias.test", "a@dest.test"])
        .await;
    assert_bad_ids_refused(&t, "direct mode").await;
    let mut t = t;
    t.launch().await;
    assert_bad_ids_refused(&t, "through the daemon").await;
}

/// `tenso ARGS | head -1` under `bash -o pipefail`: the pipeline's status is tenso's.
fn piped_to_head(t: &Tenso, args: &str) -> (i32, String, String) {
    let err = t.dir().join("pipe.err");
    let script = format!(
        "set -o pipefail; {} --config {} {args} 2>{} | head -1",
        common::daemon::tenso_bin().display(),
        t.config_path().display(),
        err.display()
    );
    let out = std::process::Command::new("bash")
        .args(["-c", &script])
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        std::fs::read_to_string(&err).unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_output_pipe_ends_the_cli_quietly() {
    let mut t = Tenso::prepare("");
    // Enough output (about 400 KB) that the pipe fills and head closes it mid-write.
    let mut table = String::new();
    for i in 0..6000 {
        table.push_str(&format!("user{i:05}@alias.test  dest{i:05}@dest.test\n"));
    }
    let file = t.dir().join("virtual");
    std::fs::write(&file, table).unwrap();
    t.cli_ok(&["import", file.to_str().unwrap()]).await;
    for mode in ["direct mode", "through the daemon"] {
        if mode == "through the daemon" {
            t.launch().await;
        }
        for args in ["user list", "user list --json", "export"] {
            let (code, out, err) = piped_to_head(&t, args);
            assert_eq!(
                code, 0,
                "{mode}: tenso {args} | head -1: status {code}, stderr {err}"
            );
            assert_eq!(out.lines().count(), 1, "{out}");
            assert!(
                !err.contains("panicked")
                    && !err.contains("Broken pipe")
                    && !err.contains("backtrace"),
                "{mode}: tenso {args} | head -1 said: {err}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_text_is_escaped_for_the_terminal_and_exact_in_json() {
    let dns = dns().await;
    let sink = TestSink::start().await;
    let t = Tenso::start(&config(&dns, sink.port(), "")).await;
    let alias = "esc@alias.test";
    add_alias(&t, alias, &["x@dest.test"], "pool").await;
    let evil = "Undelivered Mail Returned to Sender \u{1b}]0;pwned\u{7}\u{1b}[2J";
    let msg = format!(
        "From: MAILER-DAEMON@dest.test\r\nTo: {alias}\r\nSubject: {evil}\r\n\r\nbody \u{1b}[31mred\u{9b}1m\r\n"
    );
    send(&t, "", &[alias], msg.as_bytes()).await;
    let files = wait_pool(&t, alias, 1).await;
    let id = maildir_id(&files[0].0);

    for args in [
        vec!["pool", "show", id.as_str()],
        vec!["pool", "list"],
        vec!["pool", "list", alias],
    ] {
        let out = t.cli_ok(&args).await;
        assert!(
            !out.chars()
                .any(|c| c.is_control() && c != '\n' && c != '\t'),
            "tenso {args:?} printed a raw control character: {out:?}"
        );
    }
    let shown = t.cli_ok(&["pool", "show", &id]).await;
    assert!(shown.contains("\\x1b]0;pwned\\x07\\x1b[2J"), "{shown}");
    assert!(shown.contains("\\x9b1m"), "{shown}");

    // --json: the very same bytes as stored, and no raw C1 character on the wire.
    let raw = t.cli_async(&["pool", "show", &id, "--json"]).await;
    let text = String::from_utf8(raw.stdout).unwrap();
    assert!(
        !text.contains('\u{9b}') && !text.contains('\u{1b}'),
        "{text:?}"
    );
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let stored = String::from_utf8(files[0].1.clone()).unwrap();
    assert_eq!(v["message"].as_str(), Some(stored.as_str()));
    assert!(stored.contains(evil));
}
