//! Runs the real `tenso` binary as a child process with a temporary data directory.
//!
//! Config assembly ([`assemble_config`]): the caller passes the config *without*
//! `data_dir`; the kit prepends `data_dir = "<tmp>/data"` and `hostname = "tenso.test"`
//! (unless the caller sets `hostname` at top level). If the caller's text has no `[smtp]`
//! table, the kit appends `[smtp]` with `listen = ["127.0.0.1:0"]`; if it has one, the
//! caller must put `listen = ["127.0.0.1:0"]` in it. Top-level keys of the caller must
//! come before its first table, as TOML requires.
//!
//! The daemon is run as `tenso --config FILE serve` with `RUST_LOG=info`; stdout and stderr
//! go to files in the temporary directory ([`Tenso::log`]). After binding, tenso writes
//! `<data_dir>/tenso.listen` with one `ip:port` per line; the kit waits for that file.
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use tempfile::TempDir;

/// How long `start`/`restart` wait for `tenso.listen`.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `stop` waits after SIGTERM before SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Name of the file the daemon writes into its data dir once it listens.
pub const LISTEN_FILE: &str = "tenso.listen";

/// Path of the tenso binary built by cargo for this test run.
pub fn tenso_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tenso"))
}

/// A TOML basic string literal for `s` (quotes and escapes added).
pub fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\u{:04X}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// True if a line is a table header `[name]` (spaces allowed inside the brackets).
fn is_table_header(line: &str, name: &str) -> bool {
    let t = line.trim();
    t.strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .is_some_and(|inner| !inner.starts_with('[') && inner.trim() == name)
}

/// True if `key = ...` appears at top level (before the first table header).
fn has_top_level_key(user: &str, key: &str) -> bool {
    for line in user.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            return false;
        }
        if let Some((k, _)) = t.split_once('=')
            && k.trim().trim_matches('"') == key
        {
            return true;
        }
    }
    false
}

/// Builds the full config text from the caller's part (see the module docs for the rules).
pub fn assemble_config(data_dir: &Path, user: &str) -> String {
    assert!(
        !has_top_level_key(user, "data_dir"),
        "the test config must not set data_dir: the kit sets it"
    );
    let mut out = String::new();
    out.push_str("# written by tests/common/daemon.rs\n");
    out.push_str(&format!(
        "data_dir = {}\n",
        toml_string(&data_dir.to_string_lossy())
    ));
    if !has_top_level_key(user, "hostname") {
        out.push_str("hostname = \"tenso.test\"\n");
    }
    out.push('\n');
    out.push_str(user);
    if !user.ends_with('\n') {
        out.push('\n');
    }
    if !user.lines().any(|l| is_table_header(l, "smtp")) {
        out.push_str("\n[smtp]\nlisten = [\"127.0.0.1:0\"]\n");
    }
    out
}

/// Reads `data_dir` from a config file (for [`spawn_with_config_file`]).
fn data_dir_of(config: &Path) -> PathBuf {
    let text = std::fs::read_to_string(config)
        .unwrap_or_else(|e| panic!("read config {}: {e}", config.display()));
    let table: toml::Table =
        toml::from_str(&text).unwrap_or_else(|e| panic!("parse config {}: {e}", config.display()));
    let dir = table
        .get("data_dir")
        .and_then(|v| v.as_str())
        .unwrap_or_else(|| panic!("config {} has no data_dir string", config.display()));
    let p = PathBuf::from(dir);
    if p.is_absolute() {
        p
    } else {
        config.parent().unwrap_or(Path::new(".")).join(p)
    }
}

/// A tenso daemon (or a prepared one) with its temporary directory; killed when dropped.
pub struct Tenso {
    tmp: TempDir,
    config_path: PathBuf,
    data_dir: PathBuf,
    child: Option<Child>,
    addrs: Vec<SocketAddr>,
    env: Vec<(String, String)>,
    bin: PathBuf,
}

impl Drop for Tenso {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Tenso {
    /// Writes the assembled config into a fresh tempdir, without starting anything.
    pub fn prepare(config_toml: &str) -> Tenso {
        let tmp = tempfile::Builder::new()
            .prefix("tenso-test-")
            .tempdir()
            .expect("create tempdir");
        let data_dir = tmp.path().join("data");
        std::fs::create_dir_all(&data_dir).expect("create data dir");
        let config_path = tmp.path().join("tenso.toml");
        std::fs::write(&config_path, assemble_config(&data_dir, config_toml))
            .expect("write config");
        Tenso {
            tmp,
            config_path,
            data_dir,
            child: None,
            addrs: Vec::new(),
            env: Vec::new(),
            bin: tenso_bin(),
        }
    }

    /// Uses another executable instead of the tenso binary (for testing the kit itself).
    pub fn with_bin(mut self, bin: &Path) -> Tenso {
        self.bin = bin.to_path_buf();
        self
    }

    /// Prepares and starts the daemon; panics (with the log) unless it listens within 30 s.
    pub async fn start(config_toml: &str) -> Tenso {
        let mut t = Self::prepare(config_toml);
        t.launch().await;
        t
    }

    /// Like `start`, with extra environment variables for the daemon and its CLI calls.
    pub async fn start_with_env(config_toml: &str, env: &[(&str, &str)]) -> Tenso {
        let mut t = Self::prepare(config_toml);
        t.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        t.launch().await;
        t
    }

    /// Starts a daemon expected to fail (e.g. a bad config): returns its exit status and log
    /// if it exits within `timeout`, or `Ok(Tenso)` if it came up and listens instead.
    pub async fn try_start(
        config_toml: &str,
        timeout: Duration,
    ) -> Result<Tenso, (ExitStatus, String)> {
        let mut t = Self::prepare(config_toml);
        match t.try_launch(timeout).await {
            Ok(()) => Ok(t),
            Err(Some(status)) => Err((status, t.log())),
            Err(None) => panic!(
                "tenso neither listened nor exited within {timeout:?}; log:\n{}",
                t.log()
            ),
        }
    }

    fn log_file(&self, name: &str) -> File {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.tmp.path().join(name))
            .expect("open log file")
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--config").arg(&self.config_path);
        cmd.env("RUST_LOG", "info");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Spawns `tenso serve` and waits for a fresh `tenso.listen`; panics on failure.
    pub async fn launch(&mut self) {
        match self.try_launch(START_TIMEOUT).await {
            Ok(()) => {}
            Err(Some(status)) => panic!("tenso exited early with {status}; log:\n{}", self.log()),
            Err(None) => panic!(
                "tenso did not write {LISTEN_FILE} within {START_TIMEOUT:?}; log:\n{}",
                self.log()
            ),
        }
    }

    /// Spawns and waits up to `timeout`: `Err(Some(status))` if it exited, `Err(None)` on timeout
    /// (the process is then killed).
    async fn try_launch(&mut self, timeout: Duration) -> Result<(), Option<ExitStatus>> {
        assert!(self.child.is_none(), "tenso is already running");
        let listen = self.data_dir.join(LISTEN_FILE);
        let _ = std::fs::remove_file(&listen);
        self.addrs.clear();
        let mut out = self.log_file("stdout.log");
        let mut err = self.log_file("stderr.log");
        let _ = writeln!(out, "=== kit: starting tenso serve ===");
        let _ = writeln!(err, "=== kit: starting tenso serve ===");
        let child = self
            .command()
            .arg("serve")
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
        self.child = Some(child);

        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(text) = std::fs::read_to_string(&listen) {
                let addrs: Vec<SocketAddr> = text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .filter_map(|l| l.parse().ok())
                    .collect();
                if !addrs.is_empty() {
                    self.addrs = addrs;
                    return Ok(());
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(Some(status));
            }
            if tokio::time::Instant::now() >= deadline {
                if let Some(mut c) = self.child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(None);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The first listening address from `tenso.listen`.
    pub fn smtp_addr(&self) -> SocketAddr {
        *self
            .addrs
            .first()
            .expect("tenso is not running (no listen address)")
    }

    /// All listening addresses from `tenso.listen`, in file order.
    pub fn listen_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The daemon's process id, if running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// True while the child process has not exited.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    /// SIGKILL and reap (no-op if not running).
    pub async fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.addrs.clear();
    }

    /// SIGTERM, wait up to 10 s, then SIGKILL; returns the exit status (None if not running).
    pub async fn stop(&mut self) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        self.addrs.clear();
        // SAFETY: plain kill(2) on our own child's pid, which is not yet reaped.
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = c.kill();
                return c.wait().ok();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the daemon if running (SIGTERM), then starts it again with the same config and
    /// data dir, waiting for a fresh `tenso.listen`.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.launch().await;
    }

    /// Runs `tenso --config FILE <args>` to completion (blocking) and returns its output.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.command()
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run tenso {args:?}: {e}"))
    }

    /// Like `cli` without blocking the async runtime (bounded by 60 s).
    pub async fn cli_async(&self, args: &[&str]) -> Output {
        let mut cmd = tokio::process::Command::from(self.command());
        cmd.args(args).kill_on_drop(true);
        tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .unwrap_or_else(|_| panic!("tenso {args:?} did not finish within 60 s"))
            .unwrap_or_else(|e| panic!("run tenso {args:?}: {e}"))
    }

    /// `tenso <args>`'s stdout; panics with stdout, stderr and the daemon log when the
    /// command fails.
    pub async fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli_async(args).await;
        assert!(
            out.status.success(),
            "tenso {args:?} failed ({}): stdout={} stderr={}\nlog:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// [`Tenso::cli_ok`] parsed as JSON (for `--json` commands).
    pub async fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.cli_ok(args).await;
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("tenso {args:?}: not JSON ({e}): {out}"))
    }

    /// The counters of `tenso status --json` (inbound, queue, bounce, pool).
    pub async fn counters(&self) -> serde_json::Value {
        let v = self.cli_json(&["status", "--json"]).await;
        assert!(
            v["counters"].is_object(),
            "tenso status has no counters (is the daemon running?): {v}"
        );
        v["counters"].clone()
    }

    /// `tenso queue list --json`.
    pub async fn queue_list(&self) -> Vec<serde_json::Value> {
        let v = self.cli_json(&["queue", "list", "--json"]).await;
        v.as_array()
            .unwrap_or_else(|| panic!("queue list --json is not an array: {v}"))
            .clone()
    }

    /// Waits until the queue is empty; panics after `timeout` with the queue and log.
    pub async fn wait_queue_empty(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let list = self.queue_list().await;
            if list.is_empty() {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "waited {timeout:?} for an empty queue; queue: {}\nlog:\n{}",
                    serde_json::to_string_pretty(&list).unwrap_or_default(),
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Everything the daemon wrote so far: stdout then stderr, across restarts.
    pub fn log(&self) -> String {
        let read = |n: &str| std::fs::read_to_string(self.tmp.path().join(n)).unwrap_or_default();
        format!(
            "--- stdout ---\n{}--- stderr ---\n{}",
            read("stdout.log"),
            read("stderr.log")
        )
    }

    /// Waits until the log contains `needle`; returns false after `timeout`.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        super::wait_until(timeout, || async {
            self.log().contains(needle).then_some(())
        })
        .await
        .is_some()
    }

    /// The data directory (inside the tempdir).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The config file path.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The temporary directory holding config, logs and data dir.
    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }
}

/// Starts `tenso --config <path> serve` for a config file written by the caller (which must
/// set `data_dir`); logs go to a fresh tempdir. Same waiting and Drop rules as [`Tenso::start`].
pub async fn spawn_with_config_file(path: &Path) -> Tenso {
    let tmp = tempfile::Builder::new()
        .prefix("tenso-test-")
        .tempdir()
        .expect("create tempdir");
    let data_dir = data_dir_of(path);
    std::fs::create_dir_all(&data_dir).expect("create data dir");
    let mut t = Tenso {
        tmp,
        config_path: path.to_path_buf(),
        data_dir,
        child: None,
        addrs: Vec::new(),
        env: Vec::new(),
        bin: tenso_bin(),
    };
    t.launch().await;
    t
}
