//! Holds the dependency direction of ARCHITECTURE.md: a module uses only modules of
//! lower layers. The two same-layer uses the design allows are listed, with why.

use std::collections::BTreeSet;

fn layer(module: &str) -> Option<u8> {
    Some(match module {
        "smtp" | "config" | "time" | "disk" | "metrics" => 0,
        "spool" | "table" | "rate" | "signing" | "dns" => 1,
        "forward" | "policy" | "delivery" | "bounce" => 2,
        "inbound" | "queue" | "control" => 3,
        "daemon" | "cli" => 4,
        _ => return None,
    })
}

/// Same-layer uses that are part of the design.
const ALLOWED: &[(&str, &str, &str)] = &[
    (
        "inbound",
        "queue",
        "services talk through *Handle: a committed message is enqueued",
    ),
    (
        "bounce",
        "forward",
        "bounces under 2b follow alias chains exactly as mail does",
    ),
    (
        "control",
        "queue",
        "services talk through *Handle: admin queue commands",
    ),
    (
        "config",
        "smtp",
        "validation parses the addresses and host:port values it holds",
    ),
    (
        "config",
        "disk",
        "validation resolves `[pool] group` to a gid, as the pool will",
    ),
    (
        "cli",
        "daemon",
        "`tenso serve` runs the daemon; direct mode opens the stores its way",
    ),
];

#[test]
fn modules_use_only_lower_layers() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let mut stack = vec![src.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    let mut violations = BTreeSet::new();
    let mut seen = 0;
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let me = first.trim_end_matches(".rs").to_string();
        let Some(my_layer) = layer(&me) else { continue };
        let text = std::fs::read_to_string(&f).unwrap();
        for (i, _) in text.match_indices("crate::") {
            let rest = &text[i + "crate::".len()..];
            let target: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let Some(their_layer) = layer(&target) else {
                continue;
            };
            seen += 1;
            if target == me {
                continue;
            }
            let allowed = ALLOWED.iter().any(|(a, b, _)| *a == me && *b == target);
            if their_layer > my_layer || (their_layer == my_layer && !allowed) {
                violations.insert(format!("{} uses crate::{target}", rel.display()));
            }
        }
    }
    assert!(
        seen > 50,
        "the scan found only {seen} crate:: uses; is it reading src/?"
    );
    assert!(
        violations.is_empty(),
        "layer violations:\n{}",
        violations.into_iter().collect::<Vec<_>>().join("\n")
    );
}
