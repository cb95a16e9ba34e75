//! Postfix's `smtp-sink` (Debian package `postfix`) as an independent SMTP peer.
//!
//! Started as `smtp-sink -4 [-u nobody] -c [-d DIR/msg.] [extra args] 127.0.0.1:PORT 100`
//! on a free ephemeral port; `-c` makes it print running counters (`sess=N quit=N mesg=N`)
//! to stdout, which the kit reads to count messages. With a dump dir, each transaction is
//! also written to a file ([`PostfixSink::dumps`]). Killed on Drop.
#![allow(dead_code)]

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

/// Where Debian installs smtp-sink.
pub const SMTP_SINK: &str = "/usr/sbin/smtp-sink";

/// One transaction dumped by `smtp-sink -d` (its text format uses LF line ends).
#[derive(Clone, Debug)]
pub struct PostfixDump {
    /// The `X-Helo-Args` value ("" if absent).
    pub helo: String,
    /// The `X-Mail-Args` value, e.g. `<a@b> SIZE=12`.
    pub mail_args: String,
    /// The `X-Rcpt-Args` values, in order.
    pub rcpt_args: Vec<String>,
    /// The message as received (LF line ends), after smtp-sink's own header block.
    pub message: String,
    /// The dump file.
    pub path: PathBuf,
}

/// A running `smtp-sink` process.
pub struct PostfixSink {
    child: Child,
    addr: SocketAddr,
    tmp: TempDir,
    dump_dir: Option<PathBuf>,
}

impl Drop for PostfixSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// True if a socket listens on 127.0.0.1:`port` (read from /proc/net/tcp; no connection made).
fn listening_on(port: u16) -> bool {
    let want = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .map(|t| {
            t.lines().skip(1).any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[1] == want && f[3] == "0A"
            })
        })
        .unwrap_or(false)
}

/// Returns a port that was free on 127.0.0.1 a moment ago.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind probe port");
    l.local_addr().expect("probe local_addr").port()
}

impl PostfixSink {
    /// True if `/usr/sbin/smtp-sink` exists.
    pub fn is_available() -> bool {
        Path::new(SMTP_SINK).exists()
    }

    /// Starts smtp-sink counting messages only.
    pub async fn start() -> PostfixSink {
        Self::start_with(&[], false).await
    }

    /// Starts smtp-sink that also dumps each transaction into a file.
    pub async fn start_with_dump() -> PostfixSink {
        Self::start_with(&[], true).await
    }

    /// Starts smtp-sink with extra options (e.g. `["-r", "RCPT"]`, see `man smtp-sink`).
    pub async fn start_with(extra_args: &[&str], dump: bool) -> PostfixSink {
        assert!(
            Self::is_available(),
            "{SMTP_SINK} not found: install the Debian package `postfix` \
             (DEBIAN_FRONTEND=noninteractive apt-get install -y postfix)"
        );
        let tmp = tempfile::Builder::new()
            .prefix("smtp-sink-")
            .tempdir()
            .expect("tempdir");
        let dump_dir = if dump {
            let d = tmp.path().join("dump");
            std::fs::create_dir_all(&d).expect("create dump dir");
            // smtp-sink writes as `nobody` after dropping privileges.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777))
                .expect("chmod dump dir");
            std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
                .expect("chmod tempdir");
            Some(d)
        } else {
            None
        };
        // SAFETY: geteuid has no preconditions.
        let is_root = unsafe { libc::geteuid() } == 0;

        let mut last_err = String::new();
        for _ in 0..5 {
            let port = free_port();
            let stdout = File::create(tmp.path().join("stdout")).expect("create stdout file");
            let stderr = File::create(tmp.path().join("stderr")).expect("create stderr file");
            let mut cmd = Command::new(SMTP_SINK);
            cmd.arg("-4");
            if is_root {
                cmd.args(["-u", "nobody"]);
            }
            cmd.arg("-c");
            if let Some(d) = &dump_dir {
                cmd.arg("-d").arg(format!("{}/msg.", d.display()));
            }
            cmd.args(extra_args)
                .arg(format!("127.0.0.1:{port}"))
                .arg("100")
                .stdin(Stdio::null())
                .stdout(Stdio::from(stdout))
                .stderr(Stdio::from(stderr));
            let mut child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {SMTP_SINK}: {e}"));
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            loop {
                if listening_on(port) {
                    return PostfixSink {
                        child,
                        addr: SocketAddr::from(([127, 0, 0, 1], port)),
                        tmp,
                        dump_dir,
                    };
                }
                if let Ok(Some(status)) = child.try_wait() {
                    last_err = format!(
                        "exited with {status}: {}",
                        std::fs::read_to_string(tmp.path().join("stderr")).unwrap_or_default()
                    );
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_err = format!("did not listen on 127.0.0.1:{port} within 5 s");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        panic!("could not start smtp-sink: {last_err}");
    }

    /// The listening address (127.0.0.1:PORT).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The last counters line printed by `-c`: (sessions, quits, messages).
    fn counters(&self) -> (u64, u64, u64) {
        let text = std::fs::read_to_string(self.tmp.path().join("stdout")).unwrap_or_default();
        let last = text
            .split(['\r', '\n'])
            .rfind(|s| s.contains("mesg="))
            .unwrap_or("");
        let get = |k: &str| {
            last.split_whitespace()
                .find_map(|f| f.strip_prefix(k))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (get("sess="), get("quit="), get("mesg="))
    }

    /// Messages received so far (counted when the final `.` arrives).
    pub fn message_count(&self) -> u64 {
        self.counters().2
    }

    /// Sessions ended so far.
    pub fn session_count(&self) -> u64 {
        self.counters().0
    }

    /// Waits until at least `n` messages arrived; panics after `timeout` with the count.
    pub async fn wait_for(&self, n: u64, timeout: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let got = self.message_count();
            if got >= n {
                return got;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "smtp-sink {}: waited {timeout:?} for {n} message(s), got {got}",
                    self.addr
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The dumped transactions (needs `start_with_dump`), oldest file first.
    pub fn dumps(&self) -> Vec<PostfixDump> {
        let dir = self
            .dump_dir
            .as_ref()
            .expect("dumps() needs PostfixSink::start_with_dump()");
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| {
                        let t = e
                            .metadata()
                            .and_then(|m| m.modified())
                            .unwrap_or(std::time::UNIX_EPOCH);
                        (t, e.path())
                    })
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
            .into_iter()
            .map(|(_, p)| parse_dump(&p, &std::fs::read_to_string(&p).unwrap_or_default()))
            .collect()
    }
}

/// Splits a dump file into smtp-sink's header block and the message.
fn parse_dump(path: &Path, text: &str) -> PostfixDump {
    let mut d = PostfixDump {
        helo: String::new(),
        mail_args: String::new(),
        rcpt_args: Vec::new(),
        message: String::new(),
        path: path.to_path_buf(),
    };
    let mut lines = text.split_inclusive('\n');
    let mut in_received = false;
    let mut rest_start = 0;
    let mut consumed = 0;
    for line in lines.by_ref() {
        consumed += line.len();
        let l = line.trim_end_matches('\n');
        if in_received {
            if l.starts_with([' ', '\t']) {
                rest_start = consumed;
                continue;
            }
            break;
        }
        if let Some(v) = l.strip_prefix("X-Helo-Args: ") {
            d.helo = v.to_string();
        } else if let Some(v) = l.strip_prefix("X-Mail-Args: ") {
            d.mail_args = v.to_string();
        } else if let Some(v) = l.strip_prefix("X-Rcpt-Args: ") {
            d.rcpt_args.push(v.to_string());
        } else if l.starts_with("Received: ") {
            in_received = true;
            rest_start = consumed;
        }
    }
    let msg = &text[rest_start.min(text.len())..];
    // smtp-sink appends one empty line after the message.
    d.message = msg.strip_suffix('\n').unwrap_or(msg).to_string();
    d
}
