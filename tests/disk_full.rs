//! A full disk is a clean, temporary refusal (issue 11, points 4 and 5).
//!
//! The data dir is a small tmpfs the test mounts itself (root needed; skipped with a
//! message otherwise):
//! - short of `[smtp] min_free_space`: MAIL gets `452 4.3.1` before any DATA is read,
//!   and mail flows again as soon as space returns;
//! - a really full disk (`min_free_space = 0`): the commit meets ENOSPC, the client
//!   gets `452 4.3.1`, and no `ID.msg.tmp` stays behind; a bounce for a pool alias gets
//!   `452 4.3.1` too and leaves nothing in the pool's `tmp/`; the message accepted
//!   before the disk filled is delivered once the next hop takes it; after space
//!   returns the refused mail goes through.
//! - every new pool directory is fsynced in its parent before a message is written
//!   into it (traced with strace when it is installed).

mod bounce_support;
mod common;
mod tmpfs_support;

use bounce_support::*;
use common::daemon::Tenso;
use common::sink::{Reply, TestSink};
use common::smtp_client::RawSmtp;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tmpfs_support::Tmpfs;

const MIB: u64 = 1024 * 1024;

fn smtp(extra: &str) -> String {
    format!("[smtp]\nlisten = [\"127.0.0.1:0\"]\nmax_message_size = 4194304\n{extra}\n")
}

/// MAIL … RCPT … DATA of `msg`; returns the first non-2xx/3xx reply, or the final one.
async fn try_send(t: &Tenso, from: &str, rcpt: &str, msg: &[u8]) -> (u16, String) {
    let mut c = RawSmtp::connect(t.smtp_addr()).await;
    let r = match c.send_message(from, &[rcpt], msg).await {
        Ok(r) => r,
        Err(e) => (e.code, e.text),
    };
    c.quit().await;
    r
}

fn names(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn big(id: &str, to: &str, kib: usize) -> Vec<u8> {
    let mut m = original(id, to, "big").to_vec();
    for i in 0..kib * 16 {
        m.extend_from_slice(format!("{i:08} {}\r\n", "y".repeat(52)).as_bytes());
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_of_min_free_space_refuses_at_mail_then_flows_again() {
    let dns = dns().await;
    let sink = TestSink::start().await;
    let cfg = format!(
        "{}\n{}",
        config(&dns, sink.port(), ""),
        smtp(&format!("min_free_space = {}", 16 * MIB))
    );
    let mut t = Tenso::prepare(&cfg);
    let Some(fs) = Tmpfs::mount(t.data_dir(), 48) else {
        return;
    };
    t.launch().await;
    add_alias(&t, "a@alias.test", &["a@dest.test"], "pool").await;
    let m1 = original("m1@origin.test", "a@alias.test", "before");
    assert_eq!(
        try_send(&t, "s@origin.test", "a@alias.test", &m1).await.0,
        250
    );

    let filler = fs.fill(8 * MIB);
    let mut c = RawSmtp::connect(t.smtp_addr()).await;
    c.ehlo("client.test").await;
    let (code, text) = c.cmd("MAIL FROM:<s@origin.test>").await;
    println!("disk short of min_free_space: MAIL → {code} {text}");
    assert_eq!(code, 452, "{text}");
    assert!(text.starts_with("4.3.1"), "{text}");
    // The session goes on: no transaction, nothing read, the client may retry.
    assert_eq!(c.cmd("NOOP").await.0, 250);

    std::fs::remove_file(&filler).unwrap();
    let (code, text) = c.cmd("MAIL FROM:<s@origin.test>").await;
    assert_eq!(code, 250, "space is back: {text}");
    c.cmd("RSET").await;
    c.quit().await;
    let m2 = original("m2@origin.test", "a@alias.test", "after");
    assert_eq!(
        try_send(&t, "s@origin.test", "a@alias.test", &m2).await.0,
        250
    );
    wait_queue_empty(&t).await;
    assert_eq!(sink.messages().len(), 2);
    let c = counters(&t).await;
    assert_eq!(counter(&c, "inbound", "no_space"), 1, "{c}");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enospc_at_commit_is_452_and_leaves_no_partial_file() {
    let dns = dns().await;
    let open = Arc::new(AtomicBool::new(false));
    let o = open.clone();
    let sink = TestSink::builder()
        .rcpt_policy(move |_, _| {
            if o.load(Ordering::SeqCst) {
                Reply::ok()
            } else {
                Reply::new(451, "4.3.0 not now")
            }
        })
        .start()
        .await;
    let cfg = format!(
        "{}\n{}",
        config(&dns, sink.port(), ""),
        smtp("min_free_space = 0")
    );
    let mut t = Tenso::prepare(&cfg);
    let Some(fs) = Tmpfs::mount(t.data_dir(), 24) else {
        return;
    };
    t.launch().await;
    add_alias(&t, "a@alias.test", &["a@dest.test"], "pool").await;
    add_alias(&t, "b@alias.test", &["b@dest.test"], "pool").await;
    // Accepted before the disk fills; the next hop says 451 for now.
    let held = original("held@origin.test", "a@alias.test", "held");
    assert_eq!(
        try_send(&t, "s@origin.test", "a@alias.test", &held).await.0,
        250
    );
    wait_counter(&t, "queue", "deferred", 1).await;

    let filler = fs.fill(0);
    // 96 KB stays in memory until the commit; 512 KB spills to a draft on arrival.
    for (kib, when) in [(96, "during the commit"), (512, "while spilling to disk")] {
        let m = big("big@origin.test", "a@alias.test", kib);
        let (code, text) = try_send(&t, "s@origin.test", "a@alias.test", &m).await;
        println!("disk full {when}: DATA → {code} {text}");
        assert_eq!(code, 452, "{text}\n{}", t.log());
        assert!(text.starts_with("4.3.1"), "{text}");
        let left: Vec<String> = names(&t.data_dir().join("queue"))
            .into_iter()
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "partial files left {when}: {left:?}");
    }

    // A bounce for a pool alias: the pool write fails, nothing stays in tmp/. (Under
    // the 128 KB a session keeps in memory: a larger one would fail earlier, when it
    // spills to the spool while arriving, and never reach the pool.)
    let mut bounce_msg = b"From: MAILER-DAEMON@dest.test\r\nTo: b@alias.test\r\n\
        Subject: Undelivered Mail Returned to Sender\r\n\r\n"
        .to_vec();
    for i in 0..96 * 16 {
        bounce_msg.extend_from_slice(format!("{i:08} {}\r\n", "z".repeat(52)).as_bytes());
    }
    let (code, text) = try_send(&t, "", "b@alias.test", &bounce_msg).await;
    println!("disk full while pooling a bounce: DATA → {code} {text}");
    assert_eq!(code, 452, "{text}\n{}", t.log());
    assert!(text.starts_with("4.3.1"), "{text}");
    let tmp = t.data_dir().join("pool/b@alias.test/tmp");
    assert!(names(&tmp).is_empty(), "pool tmp/ keeps {:?}", names(&tmp));
    assert!(
        tmp.is_dir(),
        "the bounce was not handled as one (no pool dir)"
    );

    // Space returns: everything flows; the held message was never lost.
    std::fs::remove_file(&filler).unwrap();
    open.store(true, Ordering::SeqCst);
    t.cli_ok(&["queue", "flush"]).await;
    let m = big("big@origin.test", "a@alias.test", 512);
    assert_eq!(
        try_send(&t, "s@origin.test", "a@alias.test", &m).await.0,
        250
    );
    assert_eq!(try_send(&t, "", "b@alias.test", &bounce_msg).await.0, 250);
    wait_queue_empty(&t).await;
    let got: Vec<String> = sink
        .messages()
        .iter()
        .filter_map(|d| d.header("Message-ID"))
        .collect();
    assert!(
        got.iter().any(|m| m.contains("held@origin.test")),
        "{got:?}"
    );
    assert!(got.iter().any(|m| m.contains("big@origin.test")), "{got:?}");
    assert_eq!(pool_files(&t, "b@alias.test").len(), 1);
    let c = counters(&t).await;
    assert_eq!(counter(&c, "inbound", "no_space"), 3, "{c}");
    t.stop().await;
}

/// strace's view of the daemon writing into a brand-new pool: every `mkdir` of a pool
/// directory is followed by an fsync of its parent before the message file is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_pool_directories_are_durable_before_use() {
    let Ok(strace) = which("strace") else {
        println!("SKIPPED new_pool_directories_are_durable_before_use: strace not installed");
        return;
    };
    let dns = dns().await;
    let sink = TestSink::start().await;
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace");
    let wrapper = dir.path().join("traced-tenso");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nif [ \"$3\" = serve ]; then exec {} -f -y -qq -e trace=mkdir,mkdirat,fsync,openat -o {} {} \"$@\"; fi\nexec {} \"$@\"\n",
            strace.display(),
            trace.display(),
            common::daemon::tenso_bin().display(),
            common::daemon::tenso_bin().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut t = Tenso::prepare(&config(&dns, sink.port(), "")).with_bin(&wrapper);
    t.launch().await;
    // The kit's child is strace; killing it would leave the traced daemon running.
    let _daemon = TracedDaemon::of(&trace);
    add_alias(&t, "fresh@alias.test", &["x@dest.test"], "pool").await;
    send(
        &t,
        "",
        &["fresh@alias.test"],
        b"From: MAILER-DAEMON@dest.test\r\nSubject: Undelivered Mail Returned to Sender\r\n\r\nno\r\n",
    )
    .await;
    wait_pool(&t, "fresh@alias.test", 1).await;
    let text = std::fs::read_to_string(&trace).unwrap();
    let pool = t.data_dir().join("pool");
    let lines: Vec<&str> = text.lines().collect();
    let pos = |pred: &dyn Fn(&str) -> bool| lines.iter().position(|l| pred(l));
    let created = pos(&|l: &str| {
        l.contains("openat(") && l.contains("/pool/fresh@alias.test/tmp/") && l.contains("O_CREAT")
    })
    .unwrap_or_else(|| panic!("no message file created in the new pool:\n{text}"));
    for (dir, parent) in [
        (pool.clone(), t.data_dir().to_path_buf()),
        (pool.join("fresh@alias.test"), pool.clone()),
        (
            pool.join("fresh@alias.test/tmp"),
            pool.join("fresh@alias.test"),
        ),
        (
            pool.join("fresh@alias.test/new"),
            pool.join("fresh@alias.test"),
        ),
        (
            pool.join("fresh@alias.test/cur"),
            pool.join("fresh@alias.test"),
        ),
    ] {
        let d = dir.display().to_string();
        let mk = pos(&|l: &str| l.contains("mkdir") && l.contains(&format!("\"{d}\"")))
            .unwrap_or_else(|| panic!("no mkdir of {d}:\n{text}"));
        let p = format!("<{}>", parent.display());
        let synced = lines[mk..]
            .iter()
            .position(|l| l.contains("fsync(") && l.contains(&p));
        assert!(
            synced.is_some_and(|s| mk + s < created),
            "{d}: its parent was not fsynced between the mkdir and the first message:\n{text}"
        );
    }
}

fn which(cmd: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
        .ok_or(())
}

/// The daemon strace runs (the first pid in its `-f` output), killed when dropped:
/// strace 6.1 has no `--kill-on-exit`, and its tracee outlives it.
struct TracedDaemon(libc::pid_t);

impl TracedDaemon {
    fn of(trace: &std::path::Path) -> TracedDaemon {
        let text = std::fs::read_to_string(trace).unwrap_or_default();
        let pid = text
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no pid in the strace output:\n{text:.500}"));
        TracedDaemon(pid)
    }
}

impl Drop for TracedDaemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) of the daemon this test started (through strace).
        unsafe {
            libc::kill(self.0, libc::SIGKILL);
        }
    }
}
