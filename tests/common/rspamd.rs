//! A private rspamd (Debian's package) for tests and benchmarks: Debian's stock rules
//! with `tests/rspamd/` as its local config, its own ports on 127.0.0.1, its own
//! run/db/log dirs in a temporary directory, no Redis. Started with `-f` in a process
//! group of its own; stopping (or dropping) the handle signals the whole group, so the
//! workers rspamd forks go with it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// rspamd compiles its rules at start: seconds, more on a cold cache.
pub const START_TIMEOUT: Duration = Duration::from_secs(90);

pub const BIN: &str = "/usr/bin/rspamd";

pub struct Rspamd {
    dir: TempDir,
    child: Option<Child>,
    /// The normal worker (`/checkv2`).
    pub normal: SocketAddr,
    /// The controller (`/learnspam`, `/learnham`).
    pub controller: SocketAddr,
    /// The proxy worker in milter mode.
    pub proxy: SocketAddr,
    pub password: String,
}

fn conf_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/rspamd")
}

impl Rspamd {
    pub fn is_available() -> bool {
        Path::new(BIN).exists()
    }

    /// Starts an instance and waits until its normal worker and controller answer.
    pub async fn start() -> Rspamd {
        assert!(
            Self::is_available(),
            "{BIN} is missing: run .ci/install-test-deps (Debian package rspamd)"
        );
        let dir = tempfile::Builder::new()
            .prefix("tenso-rspamd-")
            .tempdir()
            .expect("tempdir");
        let port = || SocketAddr::from(([127, 0, 0, 1], super::closed_port()));
        let (normal, controller, proxy) = (port(), port(), port());
        // rspamd's own DNS goes to a closed port: lookups fail at once.
        let dns = port();
        let password = "tenso-test-password".to_string();
        let d = dir.path().display().to_string();
        let mut cmd = Command::new(BIN);
        cmd.arg("-f");
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            // Workers would refuse to run as root; a test instance has nothing to guard.
            cmd.arg("-i");
        }
        cmd.arg("-c").arg(conf_dir().join("rspamd.conf"));
        for (k, v) in [
            ("LOCAL_CONFDIR", conf_dir().display().to_string()),
            ("RUNDIR", d.clone()),
            ("DBDIR", d.clone()),
            ("LOGDIR", d.clone()),
            ("NORMAL_PORT", normal.port().to_string()),
            ("CONTROLLER_PORT", controller.port().to_string()),
            ("PROXY_PORT", proxy.port().to_string()),
            ("DNS", dns.to_string()),
            ("PASSWORD", password.clone()),
        ] {
            cmd.arg("--var").arg(format!("{k}={v}"));
        }
        let out = std::fs::File::create(dir.path().join("out.log")).expect("log file");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone().expect("dup")))
            .stderr(Stdio::from(out));
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().expect("spawn rspamd");
        let mut r = Rspamd {
            dir,
            child: Some(child),
            normal,
            controller,
            proxy,
            password,
        };
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if ping(r.normal).await && ping(r.controller).await {
                return r;
            }
            if let Some(status) = r.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                r.child = None;
                panic!("rspamd exited with {status}; log:\n{}", r.log());
            }
            if tokio::time::Instant::now() >= deadline {
                let log = r.log();
                r.stop();
                panic!("rspamd did not answer within {START_TIMEOUT:?}; log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.normal)
    }

    pub fn controller_url(&self) -> String {
        format!("http://{}", self.controller)
    }

    /// SIGTERM to the process group, then SIGKILL after 10 s; reaps the main process.
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let pgid = c.id() as libc::pid_t;
        // SAFETY: kill(2) on the process group we created for our own child.
        unsafe { libc::kill(-pgid, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if matches!(c.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Workers still alive (or a main process that ignored SIGTERM) go now.
        // SAFETY: as above.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = c.wait();
    }

    /// rspamd's own log and its stdout/stderr.
    pub fn log(&self) -> String {
        let read = |n: &str| std::fs::read_to_string(self.dir.path().join(n)).unwrap_or_default();
        format!(
            "--- rspamd.log ---\n{}--- out.log ---\n{}",
            read("rspamd.log"),
            read("out.log")
        )
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Rspamd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `GET /ping` answered `pong` within 2 s.
pub async fn ping(addr: SocketAddr) -> bool {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /ping HTTP/1.0\r\n\r\n").await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        Some(String::from_utf8_lossy(&buf).contains("pong"))
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}
