//! Human-readable rendering of admin responses (`--json` prints them as JSON), and the
//! two rules for everything the CLI prints:
//!
//! - Nothing from mail reaches a terminal raw. Health texts, subjects, addresses and
//!   pooled messages come from strangers: control characters (C0, DEL, C1), bidi
//!   overrides and line separators are shown as escapes ([`clean`]). `--json` stays
//!   exact JSON: the same characters are written as `\uXXXX` escapes, which every JSON
//!   parser reads back as the very same string ([`json_text`]).
//! - A closed output pipe (`tenso user list | head -1`) ends the CLI quietly with its
//!   normal status: output is written with [`emit`], which treats EPIPE as "the reader
//!   has what it wanted", never with `println!` (which panics on it).

use crate::control::Response;
use serde_json::Value;
use std::fmt::Write as _;
use std::io::Write as _;
use std::process::ExitCode;

pub enum Kind {
    Alias,
    AliasList,
    Lines,
    Import,
    Export,
    QueueList,
    QueueShow,
    PoolList,
    PoolShow,
    Dns,
    TlsReport,
    Done,
    Json,
}

/// A character a terminal would act on instead of showing.
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}'
            | '\u{2066}'..='\u{2069}' | '\u{2028}' | '\u{2029}')
}

fn escape_into(out: &mut String, c: char) {
    if (c as u32) < 0x100 {
        let _ = write!(out, "\\x{:02x}", c as u32);
    } else {
        let _ = write!(out, "\\u{{{:x}}}", c as u32);
    }
}

/// `s` with every unsafe character escaped (`\x1b`, `\u{202e}`); a backslash is
/// doubled so an escape cannot be forged.
pub fn clean(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if is_unsafe(c) => escape_into(&mut out, c),
            c => out.push(c),
        }
    }
    out
}

/// Like [`clean`], for a whole message: line breaks (CRLF or LF) and tabs stay.
pub fn clean_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' | '\t' => out.push(c),
            c if is_unsafe(c) => escape_into(&mut out, c),
            c => out.push(c),
        }
    }
    out
}

/// Serialized JSON with the unsafe characters JSON allows raw (DEL, C1, bidi) written
/// as `\uXXXX`. They can only occur inside strings, where the escape means the same.
pub fn json_text(v: &Value) -> String {
    let raw = serde_json::to_string_pretty(v).unwrap_or_default();
    let mut out = String::with_capacity(raw.len());
    for c in raw.chars() {
        if is_unsafe(c) && !matches!(c, '\n' | ' ') {
            let mut buf = [0u16; 2];
            for u in c.encode_utf16(&mut buf) {
                let _ = write!(out, "\\u{u:04x}");
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Writes `text` to stdout. A reader that went away (EPIPE) is not an error: the
/// status is `ok`. Any other failure is one line on stderr and status 1.
pub fn emit(text: &str, ok: ExitCode) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Ok(()) => ok,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ok,
        Err(e) => {
            warn(&format!("cannot write output: {e}"));
            ExitCode::from(1)
        }
    }
}

/// One `tenso: …` line on stderr, escaped; never panics.
pub fn warn(msg: &str) {
    let _ = writeln!(std::io::stderr(), "tenso: {}", clean(msg));
}

fn s(v: &Value) -> String {
    match v {
        Value::String(x) => clean(x),
        Value::Null => "-".into(),
        other => clean(&other.to_string()),
    }
}

fn dests(v: &Value) -> String {
    v.as_array()
        .map(|a| a.iter().map(s).collect::<Vec<_>>().join(", "))
        .unwrap_or_default()
}

pub fn print(resp: Response, json: bool, kind: Kind) -> ExitCode {
    if !resp.ok {
        warn(resp.error.as_deref().unwrap_or("request failed"));
        return ExitCode::from(1);
    }
    let d = &resp.data;
    if json || matches!(kind, Kind::Json) {
        // `tenso dns --json` in scripts: a problem must show in the exit status too.
        let status = if matches!(kind, Kind::Dns) && d["ok"].as_bool() != Some(true) {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        };
        return emit(&format!("{}\n", json_text(d)), status);
    }
    let mut out = String::new();
    let status = render(&mut out, d, kind);
    emit(&out, status)
}

fn render(out: &mut String, d: &Value, kind: Kind) -> ExitCode {
    match kind {
        Kind::Alias => alias(out, d),
        Kind::AliasList => {
            for a in d.as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "{}\t{}\t{}\t{}\t{}",
                    s(&a["alias"]),
                    s(&a["bounce"]),
                    s(&a["spam"]),
                    s(&a["state"]),
                    dests(&a["dests"])
                );
            }
        }
        Kind::Lines => {
            for x in d.as_array().into_iter().flatten() {
                let _ = writeln!(out, "{}", s(x));
            }
        }
        Kind::Import => return import(out, d),
        Kind::Export => out.push_str(&clean_text(d["text"].as_str().unwrap_or(""))),
        Kind::QueueList => queue_list(out, d),
        Kind::QueueShow => {
            let _ = writeln!(out, "{}", json_text(d));
        }
        Kind::PoolList => {
            let _ = writeln!(out, "{:<44} {:>8} {:<32} alias", "id", "size", "date");
            for e in d.as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "{:<44} {:>8} {:<32} {}",
                    s(&e["id"]),
                    s(&e["size"]),
                    crate::time::rfc5322_date(e["time"].as_i64().unwrap_or(0)),
                    s(&e["alias"])
                );
            }
        }
        Kind::PoolShow => out.push_str(&clean_text(d["message"].as_str().unwrap_or(""))),
        Kind::Dns => return dns(out, d),
        Kind::TlsReport => tls_report(out, d),
        Kind::Done => out.push_str("ok\n"),
        Kind::Json => unreachable!("printed as JSON above"),
    }
    ExitCode::SUCCESS
}

fn alias(out: &mut String, d: &Value) {
    let _ = writeln!(out, "alias:    {}", s(&d["alias"]));
    let _ = writeln!(out, "dests:    {}", dests(&d["dests"]));
    let _ = writeln!(out, "bounce:   {}", s(&d["bounce"]));
    if !d["dmarc_preflight"].is_null() {
        let _ = writeln!(out, "dmarc-preflight: {}", s(&d["dmarc_preflight"]));
    }
    match (s(&d["spam"]).as_str(), &d["spam_effective"]) {
        ("default", eff) if !eff.is_null() => {
            let _ = writeln!(out, "spam:     default ({})", s(eff));
        }
        (p, _) => {
            let _ = writeln!(out, "spam:     {p}");
        }
    }
    let _ = writeln!(out, "state:    {}", s(&d["state"]));
    if let Some(l) = d["login"].as_bool() {
        let l = if l {
            "yes (may send on the submission ports)"
        } else {
            "no"
        };
        let _ = writeln!(out, "login:    {l}");
    }
    if let Some(h) = d["health"].as_array().filter(|h| !h.is_empty()) {
        out.push_str("destination health:\n");
        for e in h {
            let _ = writeln!(
                out,
                "  {}: {} {} — {} ({}, {} time(s))",
                s(&e["dest"]),
                s(&e["status"]),
                s(&e["meaning"]),
                s(&e["diagnostic"]),
                crate::time::rfc5322_date(e["at"].as_i64().unwrap_or(0)),
                e["count"].as_u64().unwrap_or(1)
            );
        }
    }
    if !d["pool"].is_null() {
        let _ = writeln!(out, "pool:     {} bounce(s) waiting", s(&d["pool"]));
    }
}

fn import(out: &mut String, d: &Value) -> ExitCode {
    for b in d["bad"].as_array().into_iter().flatten() {
        let _ = writeln!(
            std::io::stderr(),
            "line {}: {}",
            s(&b["line"]),
            s(&b["reason"])
        );
    }
    if d["imported"].as_bool() == Some(true) {
        let _ = writeln!(
            out,
            "imported: {} added, {} replaced, {} domains",
            s(&d["added"]),
            s(&d["replaced"]),
            s(&d["domains"])
        );
        return ExitCode::SUCCESS;
    }
    warn(&format!(
        "nothing imported: {} bad lines (fix them, or pass --skip-bad)",
        d["bad"].as_array().map_or(0, |a| a.len())
    ));
    ExitCode::from(1)
}

fn queue_list(out: &mut String, d: &Value) {
    let _ = writeln!(
        out,
        "{:<18} {:>8} {:>5} {:<8} {:<30} recipients",
        "id", "size", "age", "next", "sender"
    );
    let now = crate::time::unix_now() * 1000;
    for m in d.as_array().into_iter().flatten() {
        let next = match (m["held"].as_bool(), m["next_attempt"].as_i64()) {
            (Some(true), _) => "held".to_string(),
            (_, Some(t)) if t > now => crate::time::age((t - now) / 1000),
            (_, Some(_)) => "now".to_string(),
            _ => "-".to_string(),
        };
        let rcpts: Vec<String> = m["recipients"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| format!("{} ({})", s(&r["dest"]), s(&r["state"])))
            .collect();
        let sender = match s(&m["sender"]) {
            x if x.is_empty() => "<>".to_string(),
            x => x,
        };
        let _ = writeln!(
            out,
            "{:<18} {:>8} {:>5} {:<8} {:<30} {}",
            s(&m["id"]),
            s(&m["size"]),
            crate::time::age(m["age"].as_i64().unwrap_or(0)),
            next,
            sender,
            rcpts.join(", ")
        );
    }
}

fn dns(out: &mut String, d: &Value) -> ExitCode {
    let ips: Vec<String> = d["outbound_ips"]
        .as_array()
        .into_iter()
        .flatten()
        .map(s)
        .collect();
    let _ = writeln!(
        out,
        "forwarder outbound addresses: {}",
        if ips.is_empty() {
            "unknown".into()
        } else {
            ips.join(", ")
        }
    );
    for c in d["checks"].as_array().into_iter().flatten() {
        let optional = c["optional"].as_bool() == Some(true);
        let found = c["found"].as_array().is_some_and(|f| !f.is_empty());
        let status = match (c["ok"].as_bool() == Some(true), optional, found) {
            (false, _, _) => "PROBLEM",
            (true, true, false) => "optional",
            _ => "ok",
        };
        let _ = writeln!(out, "{:<5} {:<40} {status}", s(&c["kind"]), s(&c["name"]));
        let _ = writeln!(
            out,
            "      want:  {}",
            clean_text(c["want"].as_str().unwrap_or("-"))
                .trim_end()
                .replace('\n', "\n             ")
        );
        for f in c["found"].as_array().into_iter().flatten() {
            let _ = writeln!(out, "      found: {}", s(f));
        }
        if !c["problem"].is_null() {
            let _ = writeln!(out, "      problem: {}", s(&c["problem"]));
        }
    }
    if d["ok"].as_bool() != Some(true) {
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

/// `tenso tls report`: one block per destination domain and policy.
fn tls_report(out: &mut String, d: &Value) {
    if let Some(ids) = d["queued"].as_array() {
        let _ = writeln!(out, "{} report(s) queued", ids.len());
        for id in ids {
            let _ = writeln!(out, "  {}", s(id));
        }
        return;
    }
    let _ = writeln!(out, "TLS sessions on {} (UTC):", s(&d["day"]));
    let reports = d["reports"].as_array().cloned().unwrap_or_default();
    if reports.is_empty() {
        out.push_str("  none counted yet\n");
    }
    for r in &reports {
        for p in r["policies"].as_array().into_iter().flatten() {
            let pol = &p["policy"];
            let _ = writeln!(
                out,
                "{}  policy {}  successful {}  failed {}",
                s(&pol["policy-domain"]),
                s(&pol["policy-type"]),
                s(&p["summary"]["total-successful-session-count"]),
                s(&p["summary"]["total-failure-session-count"]),
            );
            for f in p["failure-details"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "  {:>6} × {} at {} ({})",
                    s(&f["failed-session-count"]),
                    s(&f["result-type"]),
                    s(&f["receiving-mx-hostname"]),
                    s(&f["failure-reason-code"]),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_controls_are_escaped() {
        assert_eq!(clean("a\x1b[2Jb"), "a\\x1b[2Jb");
        assert_eq!(clean("x\u{9b}31m"), "x\\x9b31m");
        assert_eq!(clean("evil\u{202e}txt.exe"), "evil\\u{202e}txt.exe");
        assert_eq!(clean("a\\x1b"), "a\\\\x1b", "an escape cannot be forged");
        assert_eq!(clean("line\r\nnext\ttab"), "line\\x0d\\x0anext\\x09tab");
        assert_eq!(clean("jörg@bücher.example"), "jörg@bücher.example");
        assert_eq!(clean_text("a\r\nb\n\tc\x07"), "a\nb\n\tc\\x07");
    }

    #[test]
    fn json_stays_exact() {
        let v = serde_json::json!({"t": "a\x1b[31m\u{9b}\u{7f}\u{202e}é\n\"", "n": 1});
        let text = json_text(&v);
        assert!(
            text.chars().all(|c| !is_unsafe(c) || c == '\n' || c == ' '),
            "{text:?}"
        );
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, v);
    }

    proptest::proptest! {
        #[test]
        fn clean_output_is_terminal_safe(s in "\\PC*|[\\x00-\\x1f\\x7f-\\u{9f}\\u{202a}-\\u{202e}a-z\\\\]*") {
            let c = clean(&s);
            proptest::prop_assert!(c.chars().all(|x| !is_unsafe(x)));
            let v = serde_json::json!([s]);
            let back: Value = serde_json::from_str(&json_text(&v)).unwrap();
            proptest::prop_assert_eq!(back, v);
        }
    }
}
