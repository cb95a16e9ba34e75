//! The queue CLI against a running daemon (issue 3): `tenso queue list|show ID|
//! flush [ID]|remove ID|hold ID|release ID`, with `--json` on list and show. A held
//! message is not delivered until released; flush makes a deferred message go now; a
//! removed message is never delivered.

mod common;
mod delivery_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::daemon::Tenso;
use common::dns::TestDns;
use common::sink::{Reply, TestSink};
use delivery_support::*;

/// Subjects of the messages the sink accepted, in arrival order.
fn subjects(sink: &TestSink) -> Vec<String> {
    sink.messages()
        .iter()
        .filter_map(|m| m.header("Subject"))
        .collect()
}

/// Runs a queue command that may race with an attempt in progress ("being delivered
/// right now; try again"): retries that answer only, within `WAIT`.
async fn cli_retry_busy(t: &Tenso, args: &[&str]) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let out = t.cli_async(args).await;
        if out.status.success() {
            return;
        }
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            err.contains("being delivered") && tokio::time::Instant::now() < deadline,
            "tenso {args:?} failed: {err}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn queue_list_show_hold_release_flush_remove() {
    let dns = TestDns::builder()
        .mx("dest.test", 10, "mx.dest.test")
        .a("mx.dest.test", "127.0.0.1")
        .start()
        .await;
    let accept = Arc::new(AtomicBool::new(false));
    let a = accept.clone();
    let sink = TestSink::builder()
        .rcpt_policy(move |_, _| {
            if a.load(Ordering::SeqCst) {
                Reply::new(250, "2.1.5 OK")
            } else {
                Reply::new(451, "4.3.0 not now")
            }
        })
        .start()
        .await;
    // One hour between attempts: after the first deferral only `flush` sends again.
    let queue = "retry = [\"1h\"]\ndead_host_ttl = \"1s\"";
    let t = Tenso::start(&config(&dns, sink.port(), "", queue, "")).await;
    add_alias(&t, "alice@alias.test", &["bob@dest.test"], "pool").await;

    let held = send(
        &t,
        "sender@origin.test",
        &["alice@alias.test"],
        &simple_message("held"),
    )
    .await;
    let flushed = send(
        &t,
        "sender@origin.test",
        &["alice@alias.test"],
        &simple_message("flushed"),
    )
    .await;
    let removed = send(
        &t,
        "sender@origin.test",
        &["alice@alias.test"],
        &simple_message("removed"),
    )
    .await;
    let ids = vec![held.clone(), flushed.clone(), removed.clone()];

    // list --json: all three, deferred after one attempt, not held.
    let list = wait_attempted(&t, &ids).await;
    assert_eq!(list.len(), 3, "{list:?}");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    for id in &ids {
        let e = find_in(&list, id).unwrap();
        assert_eq!(e["sender"], "sender@origin.test", "{e}");
        assert_eq!(e["held"], false, "{e}");
        let r = &e["recipients"][0];
        assert_eq!(r["dest"], "bob@dest.test", "{e}");
        assert_eq!(r["mail_from"], "alice@alias.test", "{e}");
        assert_eq!(r["state"], "pending", "{e}");
        assert!(
            r["next_attempt"].as_i64().unwrap_or(0) > now_ms + 30 * 60 * 1000,
            "not deferred by the 1 h retry: {e}"
        );
    }
    // list without --json: one line per message, naming it.
    let human = cli_ok(&t, &["queue", "list"]).await;
    for id in &ids {
        assert!(human.contains(id.as_str()), "{id} not in:\n{human}");
    }

    // show --json: the message with its last reply and its headers.
    let shown = queue_show(&t, &flushed).await;
    assert_eq!(shown["id"], flushed.as_str());
    let last = shown["recipients"][0]["last"].as_str().unwrap_or_default();
    assert!(last.contains("451"), "last reply {last:?}: {shown}");
    assert_eq!(shown["recipients"][0]["status"], "4.3.0", "{shown}");
    let headers = shown["headers"].as_str().unwrap_or_default();
    assert!(headers.contains("Subject: flushed"), "{headers}");
    let bad = t.cli_async(&["queue", "show", "NOSUCHID", "--json"]).await;
    assert!(!bad.status.success(), "show of an unknown id succeeded");

    // hold: marked held in the queue.
    cli_retry_busy(&t, &["queue", "hold", &held]).await;
    assert_eq!(queue_show(&t, &held).await["held"], true);

    // remove: gone from the queue.
    cli_retry_busy(&t, &["queue", "remove", &removed]).await;
    let list = queue_list(&t).await;
    assert!(find_in(&list, &removed).is_none(), "{list:?}");
    let bad = t.cli_async(&["queue", "show", &removed, "--json"]).await;
    assert!(
        !bad.status.success(),
        "a removed message can still be shown"
    );

    // The destination now accepts. Flush one id: that message goes now (the retry
    // would be an hour away), the others stay.
    accept.store(true, Ordering::SeqCst);
    cli_ok(&t, &["queue", "flush", &flushed]).await;
    sink.wait_for(1, WAIT).await;
    assert_eq!(subjects(&sink), vec!["flushed".to_string()]);

    // Flush everything: the held message must not go.
    cli_ok(&t, &["queue", "flush"]).await;
    // Barrier: a fresh message goes straight through the same scheduler and host.
    send(
        &t,
        "sender@origin.test",
        &["alice@alias.test"],
        &simple_message("barrier"),
    )
    .await;
    sink.wait_for(2, WAIT).await;
    // The delivered ones leave the queue just after the sink's 250: wait for that.
    let list = common::wait_until(WAIT, || async {
        let l = queue_list(&t).await;
        (l.len() <= 1).then_some(l)
    })
    .await
    .expect("delivered messages left in the queue");
    assert_eq!(list.len(), 1, "only the held message is left: {list:?}");
    let e = find_in(&list, &held).expect("held message still queued");
    assert_eq!(e["held"], true, "{e}");
    assert_eq!(min_attempts(e), 1, "a held message was attempted: {e}");
    assert_eq!(
        subjects(&sink),
        vec!["flushed".to_string(), "barrier".to_string()]
    );

    // release: delivered now. (The flush above may already have made it due; if not,
    // flush it. Either way it may be gone by the time the flush runs.)
    cli_retry_busy(&t, &["queue", "release", &held]).await;
    let out = t.cli_async(&["queue", "flush", &held]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() || err.contains("no such message"),
        "flush after release: {err}"
    );
    sink.wait_for(3, WAIT).await;
    wait_queue_empty(&t).await;
    let got = subjects(&sink);
    assert_eq!(
        got,
        vec![
            "flushed".to_string(),
            "barrier".to_string(),
            "held".to_string()
        ]
    );
    // The removed message never went out.
    assert!(!got.contains(&"removed".to_string()));
    let bad = t.cli_async(&["queue", "flush", "NOSUCHID"]).await;
    assert!(!bad.status.success(), "flush of an unknown id succeeded");
}
