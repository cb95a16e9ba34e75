//! Permissions that do not depend on the umask (issue 11, point 3).
//!
//! The daemon and the CLI run under `umask 022` (a shell wrapper around the real
//! binary); every directory under the data dir must still be 0700 and every file 0600
//! (the admin socket too), sled's files included; DKIM keys 0600. `[pool] group` makes
//! the pool 0750/0640 in that group and the data dir 0710, nothing else. `tenso serve`
//! refuses a world-writable data dir and warns about a world-readable one. Direct mode
//! as root runs as the data dir's owner (files stay the daemon's); another user is
//! refused. Chown and other users need root: without it these tests say so and pass.

mod bounce_support;
mod common;

use bounce_support::*;
use common::daemon::Tenso;
use common::sink::{Reply, TestSink};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

fn is_root() -> bool {
    // SAFETY: geteuid(2) cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A wrapper that runs the real binary under `umask 022`.
fn umask_wrapper(dir: &Path) -> PathBuf {
    let w = dir.join("tenso-umask022");
    std::fs::write(
        &w,
        format!(
            "#!/bin/sh\numask 022\nexec {} \"$@\"\n",
            common::daemon::tenso_bin().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&w, std::fs::Permissions::from_mode(0o755)).unwrap();
    w
}

/// Every entry under `root` (root included) with its mode, uid and gid.
fn walk(root: &Path) -> Vec<(PathBuf, std::fs::Metadata)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = std::fs::symlink_metadata(&p).unwrap();
        if md.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
        out.push((p, md));
    }
    out
}

/// Entries whose mode is not `dir`/`file`, described.
fn wrong_modes(root: &Path, dir: u32, file: u32, skip: &[&str]) -> Vec<String> {
    walk(root)
        .into_iter()
        .filter(|(p, _)| !skip.iter().any(|s| p.starts_with(root.join(s))))
        .filter_map(|(p, md)| {
            let mode = md.mode() & 0o7777;
            let want = if md.is_dir() { dir } else { file };
            (mode != want).then(|| format!("{} is {mode:04o}, want {want:04o}", p.display()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn umask_022_leaves_nothing_readable_by_others() {
    let dns = dns().await;
    let sink = TestSink::builder()
        .rcpt_policy(|_, _| Reply::new(451, "4.3.0 try later"))
        .start()
        .await;
    let wrapper_dir = tempfile::tempdir().unwrap();
    let wrapper = umask_wrapper(wrapper_dir.path());
    let mut t = Tenso::prepare(&config(&dns, sink.port(), "")).with_bin(&wrapper);
    // The daemon creates the data dir itself, under the wrapper's umask.
    std::fs::remove_dir(t.data_dir()).unwrap();
    t.launch().await;
    add_alias(&t, "held@alias.test", &["someone@dest.test"], "pool").await;
    add_alias(&t, "pooled@alias.test", &["victim@dest.test"], "pool").await;
    // A message that stays queued (the next hop says 451): ID.msg, then ID.env.
    send(
        &t,
        "sender@origin.test",
        &["held@alias.test"],
        &original("held-1@origin.test", "held@alias.test", "held"),
    )
    .await;
    // A bounce that lands in the pool.
    send(
        &t,
        "",
        &["pooled@alias.test"],
        b"From: MAILER-DAEMON@dest.test\r\nSubject: Undelivered Mail Returned to Sender\r\n\r\nno\r\n",
    )
    .await;
    wait_pool(&t, "pooled@alias.test", 1).await;
    wait_counter(&t, "queue", "deferred", 1).await;
    let key = t.dir().join("dkim.pem");
    t.cli_ok(&[
        "dkim",
        "keygen",
        "--algorithm",
        "ed25519",
        "--out",
        key.to_str().unwrap(),
    ])
    .await;

    let data = t.data_dir().to_path_buf();
    for sub in ["queue", "table", "pool", "tls"] {
        assert!(data.join(sub).is_dir(), "{sub} missing");
    }
    assert!(
        std::fs::read_dir(data.join("queue")).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".env")),
        "no ID.env was written"
    );
    let bad = wrong_modes(&data, 0o700, 0o600, &[]);
    assert!(
        bad.is_empty(),
        "under umask 022, with the daemon running: {bad:#?}"
    );
    assert_eq!(std::fs::metadata(&key).unwrap().mode() & 0o7777, 0o600);

    // Direct mode under the same umask: sled writes and snapshots as the CLI.
    t.stop().await;
    t.cli_ok(&["user", "add", "later@alias.test", "x@dest.test"])
        .await;
    t.cli_ok(&["queue", "list"]).await;
    let bad = wrong_modes(&data, 0o700, 0o600, &[]);
    assert!(bad.is_empty(), "under umask 022, direct mode: {bad:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_group_makes_only_the_pool_group_readable() {
    if !is_root() {
        println!("SKIPPED pool_group_makes_only_the_pool_group_readable: needs root (chgrp)");
        return;
    }
    let gid = tenso::disk::group_id("mail").expect("group mail exists on Debian");
    let dns = dns().await;
    let sink = TestSink::start().await;
    let t = Tenso::start(&config(&dns, sink.port(), "[pool]\ngroup = \"mail\"\n")).await;
    add_alias(&t, "pooled@alias.test", &["victim@dest.test"], "pool").await;
    send(
        &t,
        "",
        &["pooled@alias.test"],
        b"From: MAILER-DAEMON@dest.test\r\nSubject: Undelivered Mail Returned to Sender\r\n\r\nno\r\n",
    )
    .await;
    wait_pool(&t, "pooled@alias.test", 1).await;
    let data = t.data_dir();
    let md = std::fs::metadata(data).unwrap();
    assert_eq!((md.mode() & 0o7777, md.gid()), (0o710, gid));
    let bad = wrong_modes(&data.join("pool"), 0o750, 0o640, &[]);
    assert!(bad.is_empty(), "{bad:#?}");
    assert!(walk(&data.join("pool")).iter().all(|(_, m)| m.gid() == gid));
    for sub in ["queue", "table", "tls"] {
        let bad = wrong_modes(&data.join(sub), 0o700, 0o600, &[]);
        assert!(bad.is_empty(), "{sub}: {bad:#?}");
    }
}

#[tokio::test]
async fn serve_refuses_world_writable_and_warns_world_readable() {
    let t = Tenso::prepare("");
    std::fs::set_permissions(t.data_dir(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = t.cli_async(&["serve"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "started on a world-writable data dir"
    );
    assert!(err.contains("world-writable"), "{err}");

    std::fs::set_permissions(t.data_dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut t = t;
    t.launch().await;
    assert!(
        t.wait_for_log(
            "data dir is accessible to other users",
            std::time::Duration::from_secs(5)
        )
        .await,
        "{}",
        t.log()
    );
    // What tenso creates below it is owner-only all the same.
    let bad = wrong_modes(t.data_dir(), 0o700, 0o600, &[]);
    assert_eq!(
        bad.len(),
        1,
        "only the admin's own data dir mode differs: {bad:#?}"
    );
}

#[tokio::test]
async fn direct_mode_writes_as_the_data_dir_owner() {
    if !is_root() {
        println!("SKIPPED direct_mode_writes_as_the_data_dir_owner: needs root (chown, setuid)");
        return;
    }
    const OWNER: u32 = 65534; // nobody
    const OTHER: u32 = 65533;
    let t = Tenso::prepare("");
    // The daemon's user owns the data dir; its parents must let it through.
    std::fs::set_permissions(t.dir(), std::fs::Permissions::from_mode(0o711)).unwrap();
    std::os::unix::fs::chown(t.data_dir(), Some(OWNER), Some(OWNER)).unwrap();
    std::fs::set_permissions(t.data_dir(), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(t.config_path(), std::fs::Permissions::from_mode(0o644)).unwrap();

    // Root in direct mode: runs as the owner, so everything it creates is the owner's.
    t.cli_ok(&["user", "add", "a@alias.test", "a@dest.test"])
        .await;
    t.cli_ok(&["queue", "list"]).await;
    let not_owned: Vec<String> = walk(t.data_dir())
        .into_iter()
        .filter(|(_, md)| md.uid() != OWNER)
        .map(|(p, md)| format!("{} uid {}", p.display(), md.uid()))
        .collect();
    assert!(not_owned.is_empty(), "{not_owned:#?}");
    assert!(t.data_dir().join("table").is_dir());

    // Another (non-root) user who can reach the data dir is refused, and changes
    // nothing. (Through a running daemon the daemon refuses it: tests/admin_cli.rs.)
    std::fs::set_permissions(t.data_dir(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let out = std::process::Command::new(common::daemon::tenso_bin())
        .arg("--config")
        .arg(t.config_path())
        .args(["user", "add", "b@alias.test", "b@dest.test"])
        .uid(OTHER)
        .gid(OTHER)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("belongs to uid 65534"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // The daemon started as someone else than the owner refuses, with the reason.
    let out = t.cli_async(&["serve"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("belongs to uid 65534"), "{err}");
}
