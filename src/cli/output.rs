//! Human-readable rendering of admin responses (`--json` prints them raw).

use crate::control::Response;
use serde_json::Value;
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

fn s(v: &Value) -> String {
    match v {
        Value::String(x) => x.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn dests(v: &Value) -> String {
    v.as_array()
        .map(|a| a.iter().map(s).collect::<Vec<_>>().join(", "))
        .unwrap_or_default()
}

pub fn print(resp: Response, json: bool, kind: Kind) -> ExitCode {
    if !resp.ok {
        eprintln!(
            "tenso: {}",
            resp.error.as_deref().unwrap_or("request failed")
        );
        return ExitCode::from(1);
    }
    let d = &resp.data;
    if json || matches!(kind, Kind::Json) {
        println!("{}", serde_json::to_string_pretty(d).unwrap_or_default());
        // `tenso dns --json` in scripts: a problem must show in the exit status too.
        if matches!(kind, Kind::Dns) && d["ok"].as_bool() != Some(true) {
            return ExitCode::from(1);
        }
        return ExitCode::SUCCESS;
    }
    match kind {
        Kind::Alias => {
            println!("alias:    {}", s(&d["alias"]));
            println!("dests:    {}", dests(&d["dests"]));
            println!("bounce:   {}", s(&d["bounce"]));
            if !d["dmarc_preflight"].is_null() {
                println!("dmarc-preflight: {}", s(&d["dmarc_preflight"]));
            }
            match (s(&d["spam"]).as_str(), &d["spam_effective"]) {
                ("default", eff) if !eff.is_null() => println!("spam:     default ({})", s(eff)),
                (p, _) => println!("spam:     {p}"),
            }
            println!("state:    {}", s(&d["state"]));
            if let Some(h) = d["health"].as_array().filter(|h| !h.is_empty()) {
                println!("destination health:");
                for e in h {
                    println!(
                        "  {}: {} {} — {} ({})",
                        s(&e["dest"]),
                        s(&e["status"]),
                        s(&e["meaning"]),
                        s(&e["diagnostic"]),
                        crate::time::rfc5322_date(e["at"].as_i64().unwrap_or(0))
                    );
                }
            }
            if !d["pool"].is_null() {
                println!("pool:     {} bounce(s) waiting", s(&d["pool"]));
            }
        }
        Kind::AliasList => {
            for a in d.as_array().into_iter().flatten() {
                println!(
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
                println!("{}", s(x));
            }
        }
        Kind::Import => {
            for b in d["bad"].as_array().into_iter().flatten() {
                eprintln!("line {}: {}", s(&b["line"]), s(&b["reason"]));
            }
            if d["imported"].as_bool() == Some(true) {
                println!(
                    "imported: {} added, {} replaced, {} domains",
                    s(&d["added"]),
                    s(&d["replaced"]),
                    s(&d["domains"])
                );
            } else {
                eprintln!(
                    "tenso: nothing imported: {} bad lines (fix them, or pass --skip-bad)",
                    d["bad"].as_array().map_or(0, |a| a.len())
                );
                return ExitCode::from(1);
            }
        }
        Kind::Export => print!("{}", s(&d["text"])),
        Kind::QueueList => {
            println!(
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
                println!(
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
        Kind::QueueShow => {
            println!("{}", serde_json::to_string_pretty(d).unwrap_or_default());
        }
        Kind::PoolList => {
            println!("{:<44} {:>8} {:<32} alias", "id", "size", "date");
            for e in d.as_array().into_iter().flatten() {
                println!(
                    "{:<44} {:>8} {:<32} {}",
                    s(&e["id"]),
                    s(&e["size"]),
                    crate::time::rfc5322_date(e["time"].as_i64().unwrap_or(0)),
                    s(&e["alias"])
                );
            }
        }
        Kind::PoolShow => print!("{}", s(&d["message"])),
        Kind::Dns => {
            let ips: Vec<String> = d["outbound_ips"]
                .as_array()
                .into_iter()
                .flatten()
                .map(s)
                .collect();
            println!(
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
                println!("{:<5} {:<40} {status}", s(&c["kind"]), s(&c["name"]));
                println!(
                    "      want:  {}",
                    s(&c["want"]).trim_end().replace('\n', "\n             ")
                );
                for f in c["found"].as_array().into_iter().flatten() {
                    println!("      found: {}", s(f));
                }
                if !c["problem"].is_null() {
                    println!("      problem: {}", s(&c["problem"]));
                }
            }
            if d["ok"].as_bool() != Some(true) {
                return ExitCode::from(1);
            }
        }
        Kind::TlsReport => tls_report(d),
        Kind::Done => println!("ok"),
        Kind::Json => unreachable!(),
    }
    ExitCode::SUCCESS
}

/// `tenso tls report`: one block per destination domain and policy.
fn tls_report(d: &Value) {
    if let Some(ids) = d["queued"].as_array() {
        println!("{} report(s) queued", ids.len());
        for id in ids {
            println!("  {}", s(id));
        }
        return;
    }
    println!("TLS sessions on {} (UTC):", s(&d["day"]));
    let reports = d["reports"].as_array().cloned().unwrap_or_default();
    if reports.is_empty() {
        println!("  none counted yet");
    }
    for r in &reports {
        for p in r["policies"].as_array().into_iter().flatten() {
            let pol = &p["policy"];
            println!(
                "{}  policy {}  successful {}  failed {}",
                s(&pol["policy-domain"]),
                s(&pol["policy-type"]),
                s(&p["summary"]["total-successful-session-count"]),
                s(&p["summary"]["total-failure-session-count"]),
            );
            for f in p["failure-details"].as_array().into_iter().flatten() {
                println!(
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
