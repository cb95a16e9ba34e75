//! A private PostgreSQL 15 cluster (Debian's `postgresql` package) for tests and
//! benchmarks: `initdb` into a temporary directory, `pg_ctl start` listening on
//! 127.0.0.1 at a free port (and a Unix socket in the same directory), stopped by
//! [`PgCluster::stop`] or when the handle is dropped. As root, the server runs as the
//! `postgres` user (PostgreSQL refuses to run as root); otherwise as the caller.
//!
//! Local (socket) connections are trusted, so the kit can create roles and databases
//! with `psql`; TCP connections need a password (scram-sha-256), so tenso's
//! `[table] password_file` is exercised for real.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tempfile::TempDir;

pub const BIN: &str = "/usr/lib/postgresql/15/bin";

pub struct PgCluster {
    dir: TempDir,
    pub port: u16,
    running: bool,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `prog args` as the cluster's owner; returns the output (never panics).
fn as_owner(prog: &str, args: &[&str]) -> Output {
    let path = format!("{BIN}/{prog}");
    let mut cmd = if is_root() {
        let mut line = shell_quote(&path);
        for a in args {
            line.push(' ');
            line.push_str(&shell_quote(a));
        }
        let mut c = Command::new("su");
        c.args(["postgres", "-s", "/bin/sh", "-c", &line]);
        c
    } else {
        let mut c = Command::new(&path);
        c.args(args);
        c
    };
    cmd.output().expect("run a PostgreSQL program")
}

/// A 127.0.0.1 port nothing listens on (bound and released). Own copy, so that
/// benches can include this file alone.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn check(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl PgCluster {
    pub fn is_available() -> bool {
        Path::new(BIN).join("initdb").exists()
    }

    /// initdb + start. Panics with the server's own words when anything fails.
    pub fn start() -> PgCluster {
        assert!(
            Self::is_available(),
            "{BIN}/initdb is missing: run .ci/install-test-deps (Debian package postgresql)"
        );
        let dir = tempfile::Builder::new()
            .prefix("tenso-pg-")
            .tempdir()
            .expect("tempdir");
        if is_root() {
            let ok = Command::new("chown")
                .args(["postgres:postgres", &dir.path().display().to_string()])
                .status()
                .expect("chown");
            assert!(ok.success(), "chown of the cluster dir failed");
        }
        let pw = dir.path().join("superpw");
        std::fs::write(&pw, "tenso-test-super\n").unwrap();
        if is_root() {
            Command::new("chown")
                .args(["postgres", &pw.display().to_string()])
                .status()
                .unwrap();
        }
        let data = dir.path().join("data").display().to_string();
        check(
            "initdb",
            as_owner(
                "initdb",
                &[
                    "-D",
                    &data,
                    "-U",
                    "postgres",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    &format!("--pwfile={}", pw.display()),
                    "--no-sync",
                    "-E",
                    "UTF8",
                    "--locale=C",
                ],
            ),
        );
        let mut c = PgCluster {
            port: free_port(),
            dir,
            running: false,
        };
        c.start_server();
        c
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// Starts the (stopped) server again on the same port and data.
    pub fn start_server(&mut self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=60",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log").display().to_string();
        check(
            "pg_ctl start",
            as_owner(
                "pg_ctl",
                &[
                    "-D",
                    &self.data(),
                    "-o",
                    &opts,
                    "-l",
                    &log,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
            ),
        );
        self.running = true;
    }

    /// Stops the server at once (clients see their connections cut).
    pub fn stop(&mut self) {
        if self.running {
            let _ = as_owner(
                "pg_ctl",
                &[
                    "-D",
                    &self.data(),
                    "-m",
                    "immediate",
                    "-w",
                    "-t",
                    "30",
                    "stop",
                ],
            );
            self.running = false;
        }
    }

    /// Runs SQL as the superuser over the Unix socket.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        check(
            "psql",
            as_owner(
                "psql",
                &[
                    "-X",
                    "-q",
                    "-A",
                    "-t",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-h",
                    &self.dir.path().display().to_string(),
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                    "-d",
                    db,
                    "-c",
                    sql,
                ],
            ),
        )
    }

    /// A new database owned by a new login role `name` with password `password`;
    /// returns tenso's `[table] url` for it (no password in it).
    pub fn create_db(&self, name: &str, password: &str) -> String {
        self.psql(
            "postgres",
            &format!("CREATE ROLE {name} LOGIN PASSWORD '{password}'"),
        );
        self.psql("postgres", &format!("CREATE DATABASE {name} OWNER {name}"));
        format!("postgresql://{name}@127.0.0.1:{}/{name}", self.port)
    }

    /// The server's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
    }
}
