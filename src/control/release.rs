//! Admin actions on pooled messages beyond listing: `tenso pool release ID` (the "not
//! spam" button: forward to the alias's destinations) and `tenso spam learn-ham|
//! learn-spam ID` (feed rspamd's classifier through its controller).
//!
//! A release commits a new queue file through the same `Spool::commit` as received
//! mail, then removes the pool entry: a crash in between leaves both (a duplicate,
//! never a loss). Without a running daemon the committed copy waits in the spool until
//! the next `tenso serve` picks it up.

use super::Ctx;
use crate::smtp::header::header_section;
use crate::spool::{Envelope, MessageKind};
use serde_json::{Value, json};
use std::sync::Arc;

/// The lines tenso put on top of a pooled copy, and what they say.
struct Pooled<'a> {
    /// The message without tenso's `Return-Path:` / `X-Tenso-Pool-Reason:` lines.
    msg: &'a [u8],
    /// The original reverse-path: Some("") for `<>`, None when not recorded.
    sender: Option<String>,
    /// Kept for a reason (spam, DMARC pre-flight); None for a pooled bounce.
    reason: Option<String>,
}

fn unwrap_pooled(bytes: &[u8]) -> Pooled<'_> {
    let mut rest = bytes;
    let mut sender = None;
    let mut reason = None;
    while let Some(end) = rest.windows(2).position(|w| w == b"\r\n") {
        let line = String::from_utf8_lossy(&rest[..end]);
        if let Some(v) = line
            .strip_prefix("Return-Path: ")
            .filter(|_| sender.is_none())
        {
            sender = Some(
                v.trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_string(),
            );
        } else if let Some(v) = line
            .strip_prefix("X-Tenso-Pool-Reason: ")
            .filter(|_| reason.is_none())
        {
            reason = Some(v.trim().to_string());
        } else {
            break;
        }
        rest = &rest[end + 2..];
    }
    Pooled {
        msg: rest,
        sender,
        reason,
    }
}

pub(super) async fn release(ctx: &Ctx<'_>, id: &str) -> Result<Value, String> {
    let (entry, bytes) = ctx.pool.read(id).map_err(|e| e.to_string())?;
    let pooled = unwrap_pooled(&bytes);
    // A pooled bounce (no reason line) keeps its null sender; other mail is sent as
    // it would have been forwarded: MAIL FROM the alias (proposal 2).
    let null = match (&pooled.sender, &pooled.reason) {
        (Some(s), _) => s.is_empty(),
        (None, reason) => reason.is_none(),
    };
    let reverse_path = if null {
        String::new()
    } else {
        pooled.sender.clone().unwrap_or_else(|| entry.alias.clone())
    };
    let state = ctx
        .table
        .get(&entry.alias)
        .map_err(|e| format!("cannot release {id}: {e}"))?
        .state;
    if !state.is_active() {
        return Err(format!(
            "cannot release {id}: alias {} is in state {state} (tenso user set --state active first)",
            entry.alias
        ));
    }
    let rcpts: Vec<_> =
        crate::forward::expand_alias(ctx.table, ctx.cfg, &entry.alias, &reverse_path)
            .map_err(|e| format!("cannot release {id}: {e}"))?
            .into_iter()
            .filter(|r| r.is_pending() && !r.dest.is_empty())
            .collect();
    if rcpts.is_empty() {
        return Err(format!(
            "cannot release {id}: alias {} has no destination to forward to",
            entry.alias
        ));
    }
    // Signed with the forwarder's key like every forwarded copy ([dkim]).
    let msg = match crate::signing::Signer::from_config(&ctx.cfg.dkim)? {
        Some(signer) => signer.sign_prepend(pooled.msg.to_vec()),
        None => pooled.msg.to_vec(),
    };
    let env = Envelope {
        id: ctx.spool.new_id(),
        kind: MessageKind::Relay,
        arrival: crate::time::unix_now(),
        client_ip: None,
        helo: ctx.cfg.hostname.clone(),
        reverse_path,
        env_id: None,
        smtputf8: !header_section(&msg).is_ascii(),
        eight_bit: !msg.is_ascii(),
        size: msg.len() as u64,
        held: false,
        rcpts,
        notes: vec![format!("released from the pool of {} ({id})", entry.alias)],
    };
    let body = Arc::new(msg);
    ctx.spool
        .commit(&env, body.clone())
        .await
        .map_err(|e| format!("cannot queue {id}: {e}"))?;
    let queue_id = env.id.clone();
    let dests: Vec<String> = env.rcpts.iter().map(|r| r.dest.clone()).collect();
    if let Some(q) = ctx.queue {
        q.enqueue(env, Some(body));
    }
    ctx.pool
        .remove(id)
        .map_err(|e| format!("queued as {queue_id}, but cannot remove {id} from the pool: {e}"))?;
    tracing::info!(pool_id = id, alias = %entry.alias, %queue_id, dests = ?dests, reason = ?pooled.reason, "pooled message released by admin");
    Ok(json!({
        "released": id,
        "alias": entry.alias,
        "queue_id": queue_id,
        "dests": dests,
        "daemon": ctx.queue.is_some(),
    }))
}

pub(super) async fn learn(ctx: &Ctx<'_>, id: &str, spam: bool) -> Result<Value, String> {
    let cfg = &ctx.cfg.spam;
    let url = cfg
        .controller_url
        .as_deref()
        .ok_or("[spam] controller_url is not set: nowhere to send the message")?;
    let password = match &cfg.controller_password_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| format!("cannot read {}: {e}", p.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let (entry, bytes) = ctx.pool.read(id).map_err(|e| e.to_string())?;
    // Learn from the message as it arrived: without tenso's pool lines and spam headers.
    let pooled = unwrap_pooled(&bytes);
    let msg =
        crate::policy::spam::strip_spam_headers(pooled.msg).unwrap_or_else(|| pooled.msg.to_vec());
    let rspamd = crate::policy::spam::Rspamd::new(url, cfg.timeout)?;
    let answer = rspamd
        .learn(spam, password.as_deref(), msg.into())
        .await
        .map_err(|e| format!("rspamd did not learn {id}: {e}"))?;
    let class = if spam { "spam" } else { "ham" };
    tracing::info!(pool_id = id, alias = %entry.alias, class, "pooled message fed to rspamd's classifier");
    Ok(json!({ "learned": class, "id": id, "alias": entry.alias, "rspamd": answer }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooled_lines_are_read_once_and_only_on_top() {
        let p = unwrap_pooled(b"Return-Path: <s@o.test>\r\nX-Tenso-Pool-Reason: spam\r\nReturn-Path: <x>\r\nSubject: a\r\n\r\nb");
        assert_eq!(p.sender.as_deref(), Some("s@o.test"));
        assert_eq!(p.reason.as_deref(), Some("spam"));
        assert_eq!(p.msg, b"Return-Path: <x>\r\nSubject: a\r\n\r\nb");
        let p = unwrap_pooled(b"Return-Path: <>\r\nX-Tenso-Pool-Reason: spam\r\n\r\n");
        assert_eq!(p.sender.as_deref(), Some(""));
        let p = unwrap_pooled(b"From: MAILER-DAEMON\r\n\r\nbounce");
        assert!(p.sender.is_none() && p.reason.is_none());
        assert_eq!(p.msg, b"From: MAILER-DAEMON\r\n\r\nbounce");
    }
}
