//! The command line: parses argv, runs the daemon or sends one admin request.
//!
//! Admin commands go to a running daemon over its socket; when none answers, the CLI
//! opens the stores itself and runs the same executor (`control::execute`). The CLI
//! never reads or writes the table or spool in any other way. Exit status 0 on
//! success, 1 on a refused request (one clear line on stderr), 2 on usage errors.
//!
//! Files: the process umask is 077 from the first instruction (no thread exists yet),
//! so even files other code creates (sled's) are owner-only. Direct mode writes the
//! stores as their owner: root becomes the data dir's owner first (`setuid`), anyone
//! else who is not the owner is refused — never a file the daemon cannot write.

mod output;

use crate::config::{BouncePolicy, Config};
use crate::control::{self, Request, Response};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "tenso",
    version,
    about = "A forwarding mail relay for alias domains"
)]
pub struct Cli {
    /// Config file (TOML). Without it, embedded defaults are used.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the relay daemon.
    Serve,
    /// Configuration commands.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Manage aliases (users).
    User {
        #[command(subcommand)]
        cmd: UserCmd,
    },
    /// Manage local domains.
    Domain {
        #[command(subcommand)]
        cmd: DomainCmd,
    },
    /// Import a Postfix virtual(5) or aliases(5) table.
    Import {
        file: PathBuf,
        #[arg(long, default_value = "virtual")]
        format: String,
        /// Domain for aliases(5) names and bare virtual(5) users.
        #[arg(long)]
        domain: Option<String>,
        /// Import the good lines even if some are bad.
        #[arg(long)]
        skip_bad: bool,
        /// Bounce policy for new aliases (default: `default_bounce` of the config).
        #[arg(long)]
        bounce: Option<BouncePolicy>,
    },
    /// Write the table as a virtual(5) file to stdout.
    Export {
        #[arg(long, default_value = "virtual")]
        format: String,
    },
    /// Inspect and manage the queue.
    Queue {
        #[command(subcommand)]
        cmd: QueueCmd,
    },
    /// The local bounce pools (policy 2a).
    Pool {
        #[command(subcommand)]
        cmd: PoolCmd,
    },
    /// The DNS records each local domain needs, checked against what is published.
    Dns {
        #[arg(long)]
        domain: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Outbound TLS: reports (RFC 8460).
    Tls {
        #[command(subcommand)]
        cmd: TlsCmd,
    },
    /// DKIM key management.
    Dkim {
        #[command(subcommand)]
        cmd: DkimCmd,
    },
    /// Train rspamd's classifier with a pooled message ([spam] controller_url).
    Spam {
        #[command(subcommand)]
        cmd: SpamCmd,
    },
    /// Counters and sizes.
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum TlsCmd {
    /// Today's TLS-RPT aggregate per destination domain, as its report would say.
    Report {
        #[arg(long)]
        domain: Option<String>,
        /// Send every report due now, today's included (then today starts afresh).
        #[arg(long)]
        send: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// Validate the config and print the effective values.
    Check,
}

#[derive(Subcommand, Debug)]
pub enum UserCmd {
    /// Add an alias: `tenso user add alice@alias.example alice@dest.example`.
    Add {
        alias: String,
        #[arg(required = true)]
        dests: Vec<String>,
        #[arg(long)]
        bounce: Option<BouncePolicy>,
    },
    /// Change an alias.
    Set {
        alias: String,
        #[arg(long = "dest", num_args = 1..)]
        dests: Option<Vec<String>>,
        #[arg(long)]
        bounce: Option<BouncePolicy>,
        /// off | pool | forward | default
        #[arg(long)]
        dmarc_preflight: Option<String>,
        /// What happens to spam for this alias: tag | quarantine | reject | off | default
        #[arg(long)]
        spam: Option<String>,
        /// Whether the alias takes mail: active | discard | defer | reject
        #[arg(long)]
        state: Option<String>,
    },
    Remove {
        alias: String,
    },
    /// Set the submission password of ALIAS (its login is the alias itself): read
    /// from stdin's first line, or generated and printed once when stdin is a
    /// terminal or with --generate. --disable removes the login.
    Passwd {
        alias: String,
        #[arg(long, conflicts_with = "generate")]
        disable: bool,
        #[arg(long)]
        generate: bool,
    },
    Show {
        alias: String,
        #[arg(long)]
        json: bool,
    },
    List {
        #[arg(long)]
        domain: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum DomainCmd {
    Add {
        domain: String,
    },
    Remove {
        domain: String,
    },
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum DkimCmd {
    /// Write a new private key (PEM) and print the DNS TXT record to publish.
    Keygen {
        /// rsa (2048 bits) or ed25519.
        #[arg(long, default_value = "rsa")]
        algorithm: String,
        /// Where to write the private key (mode 0600); refuses to overwrite.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "tenso")]
        selector: String,
        /// The signing domain (d=); default: the [dkim] domain or the hostname.
        #[arg(long)]
        domain: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum PoolCmd {
    /// Pooled bounces, of one alias or all.
    List {
        alias: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// One pooled bounce, whole.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    Remove {
        id: String,
    },
    /// Forward a pooled message to its alias's destinations (e.g. "not spam").
    Release {
        id: String,
    },
    /// Remove pooled bounces (all, or older than a humantime age like `30d`).
    Purge {
        #[arg(long)]
        older_than: Option<String>,
        #[arg(long)]
        alias: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum SpamCmd {
    /// The pooled message is not spam.
    LearnHam { id: String },
    /// The pooled message is spam.
    LearnSpam { id: String },
}

#[derive(Subcommand, Debug)]
pub enum QueueCmd {
    List {
        #[arg(long)]
        json: bool,
    },
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Attempt delivery now (one message, or all).
    Flush {
        id: Option<String>,
    },
    Remove {
        id: String,
    },
    Hold {
        id: String,
    },
    Release {
        id: String,
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    // SAFETY: umask(2) before any thread exists; every later create is owner-only
    // unless it sets a mode of its own (the group-readable pool does, explicitly).
    unsafe { libc::umask(0o077) };
    let cli = Cli::parse();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cfg = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            output::warn(&e.to_string());
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            output::warn(&format!("cannot start runtime: {e}"));
            return ExitCode::from(1);
        }
    };
    rt.block_on(run(cli.command, cfg))
}

async fn run(cmd: Command, cfg: Config) -> ExitCode {
    let (req, json, kind) = match cmd {
        Command::Serve => {
            init_logging();
            return match crate::daemon::run(cfg).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    output::warn(&format!("{e:#}"));
                    ExitCode::from(1)
                }
            };
        }
        Command::Config {
            cmd: ConfigCmd::Check,
        } => {
            return output::emit(
                &format!("# config is valid\n{}", cfg.to_toml()),
                ExitCode::SUCCESS,
            );
        }
        Command::User { cmd } => match cmd {
            UserCmd::Add {
                alias,
                dests,
                bounce,
            } => (
                Request::UserAdd {
                    alias,
                    dests,
                    bounce,
                },
                false,
                output::Kind::Alias,
            ),
            UserCmd::Set {
                alias,
                dests,
                bounce,
                dmarc_preflight,
                spam,
                state,
            } => (
                Request::UserSet {
                    alias,
                    dests,
                    bounce,
                    dmarc_preflight,
                    spam,
                    state,
                },
                false,
                output::Kind::Alias,
            ),
            UserCmd::Remove { alias } => (Request::UserRemove { alias }, false, output::Kind::Done),
            UserCmd::Passwd {
                alias,
                disable,
                generate,
            } => return passwd(&cfg, alias, disable, generate).await,
            UserCmd::Show { alias, json } => {
                (Request::UserShow { alias }, json, output::Kind::Alias)
            }
            UserCmd::List { domain, json } => {
                (Request::UserList { domain }, json, output::Kind::AliasList)
            }
        },
        Command::Domain { cmd } => match cmd {
            DomainCmd::Add { domain } => (Request::DomainAdd { domain }, false, output::Kind::Done),
            DomainCmd::Remove { domain } => {
                (Request::DomainRemove { domain }, false, output::Kind::Done)
            }
            DomainCmd::List { json } => (Request::DomainList, json, output::Kind::Lines),
        },
        Command::Import {
            file,
            format,
            domain,
            skip_bad,
            bounce,
        } => {
            let text = match std::fs::read_to_string(&file) {
                Ok(t) => t,
                Err(e) => {
                    output::warn(&format!("cannot read {}: {e}", file.display()));
                    return ExitCode::from(1);
                }
            };
            (
                Request::Import {
                    text,
                    format,
                    domain,
                    skip_bad,
                    bounce,
                },
                false,
                output::Kind::Import,
            )
        }
        Command::Export { format } => {
            if format != "virtual" {
                output::warn("export supports only --format virtual");
                return ExitCode::from(2);
            }
            (Request::Export, false, output::Kind::Export)
        }
        Command::Queue { cmd } => match cmd {
            QueueCmd::List { json } => (Request::QueueList, json, output::Kind::QueueList),
            QueueCmd::Show { id, json } => {
                (Request::QueueShow { id }, json, output::Kind::QueueShow)
            }
            QueueCmd::Flush { id } => (Request::QueueFlush { id }, false, output::Kind::Done),
            QueueCmd::Remove { id } => (Request::QueueRemove { id }, false, output::Kind::Done),
            QueueCmd::Hold { id } => (Request::QueueHold { id }, false, output::Kind::Done),
            QueueCmd::Release { id } => (Request::QueueRelease { id }, false, output::Kind::Done),
        },
        Command::Pool { cmd } => match cmd {
            PoolCmd::List { alias, json } => {
                (Request::PoolList { alias }, json, output::Kind::PoolList)
            }
            PoolCmd::Show { id, json } => (Request::PoolShow { id }, json, output::Kind::PoolShow),
            PoolCmd::Remove { id } => (Request::PoolRemove { id }, false, output::Kind::Done),
            PoolCmd::Release { id } => (Request::PoolRelease { id }, false, output::Kind::Json),
            PoolCmd::Purge { older_than, alias } => {
                let older_than = match older_than
                    .map(|s| humantime::parse_duration(&s))
                    .transpose()
                {
                    Ok(d) => d.map(|d| d.as_secs()),
                    Err(e) => {
                        output::warn(&format!("--older-than: {e}"));
                        return ExitCode::from(2);
                    }
                };
                (
                    Request::PoolPurge { older_than, alias },
                    false,
                    output::Kind::Json,
                )
            }
        },
        Command::Dns { domain, json } => (Request::DnsCheck { domain }, json, output::Kind::Dns),
        Command::Tls {
            cmd: TlsCmd::Report { domain, send, json },
        } => (
            Request::TlsReport { domain, send },
            json,
            output::Kind::TlsReport,
        ),
        Command::Dkim {
            cmd:
                DkimCmd::Keygen {
                    algorithm,
                    out,
                    selector,
                    domain,
                },
        } => {
            let domain = domain
                .or_else(|| cfg.dkim.domain.clone())
                .unwrap_or_else(|| cfg.hostname.clone());
            // The [dkim] key signs DSNs and forwarded copies; a key for another
            // domain is a [[dkim.keys]] entry, for mail its users submit.
            let snippet = match cfg.dkim.domain.as_deref() {
                Some(d) if d.eq_ignore_ascii_case(&domain) => Snippet::Default,
                Some(_) => Snippet::PerDomain,
                None => Snippet::Either,
            };
            return keygen(&algorithm, &out, &selector, &domain, snippet);
        }
        Command::Spam { cmd } => {
            let (id, spam) = match cmd {
                SpamCmd::LearnHam { id } => (id, false),
                SpamCmd::LearnSpam { id } => (id, true),
            };
            (Request::SpamLearn { id, spam }, false, output::Kind::Json)
        }
        Command::Status { json } => (Request::Status, json, output::Kind::Json),
    };
    let resp = match send(&cfg, req).await {
        Ok(r) => r,
        Err(e) => {
            output::warn(&format!("{e:#}"));
            return ExitCode::from(1);
        }
    };
    output::print(resp, json, kind)
}

/// Which config lines `tenso dkim keygen` suggests.
enum Snippet {
    Default,
    PerDomain,
    Either,
}

fn keygen(
    algorithm: &str,
    out: &std::path::Path,
    selector: &str,
    domain: &str,
    snippet: Snippet,
) -> ExitCode {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let (pem, txt) = match crate::signing::keygen(algorithm) {
        Ok(x) => x,
        Err(e) => {
            output::warn(&e.to_string());
            return ExitCode::from(2);
        }
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out);
    // The mode given to open(2) is filtered by the umask; fchmod is not.
    let written = file.and_then(|mut f| {
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        f.write_all(pem.as_bytes())?;
        f.sync_all()
    });
    if let Err(e) = written {
        output::warn(&format!("cannot write {}: {e}", out.display()));
        return ExitCode::from(1);
    }
    let path = out.display();
    let keys =
        format!("#   domain = \"{domain}\"\n#   selector = \"{selector}\"\n#   key = \"{path}\"\n");
    let default = format!("# add to the config, as the forwarder's key:\n#   [dkim]\n{keys}");
    let per_domain = format!(
        "# add to the config, as the key of mail submitted from {domain}:\n#   [[dkim.keys]]\n{keys}"
    );
    let config = match snippet {
        Snippet::Default => default,
        Snippet::PerDomain => per_domain,
        Snippet::Either => format!("{default}{}", per_domain.replacen("# add", "# or add", 1)),
    };
    let text = format!(
        "# private key written to {path} (mode 0600)\n{config}\
         # publish this record:\n{selector}._domainkey.{domain}. IN TXT \"{txt}\"\n"
    );
    output::emit(&output::clean_text(&text), ExitCode::SUCCESS)
}

/// `tenso user passwd`: the password is hashed here (Argon2id, `[submission]`
/// cost), so only the hash reaches the daemon and the table.
async fn passwd(cfg: &Config, alias: String, disable: bool, generate: bool) -> ExitCode {
    use crate::table::logins;
    let hash = if disable {
        None
    } else {
        let generated = generate || std::io::IsTerminal::is_terminal(&std::io::stdin());
        let password = if generated {
            logins::generate_password()
        } else {
            match read_password() {
                Ok(p) => p,
                Err(e) => {
                    output::warn(&e);
                    return ExitCode::from(2);
                }
            }
        };
        if let Err(e) = logins::check_password(&password) {
            output::warn(&e);
            return ExitCode::from(2);
        }
        let s = &cfg.submission;
        let cost = (
            s.argon2_memory_kib,
            s.argon2_iterations,
            s.argon2_parallelism,
        );
        let pw = password.clone();
        let hashed = tokio::task::spawn_blocking(move || {
            logins::hash_password(&logins::hasher(cost.0, cost.1, cost.2)?, pw.as_bytes())
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        match hashed {
            Ok(h) => Some((h, generated.then_some(password))),
            Err(e) => {
                output::warn(&e);
                return ExitCode::from(1);
            }
        }
    };
    let req = Request::UserPasswd {
        alias: alias.clone(),
        hash: hash.as_ref().map(|(h, _)| h.clone()),
    };
    let resp = match send(cfg, req).await {
        Ok(r) if r.ok => r,
        Ok(r) => {
            output::warn(r.error.as_deref().unwrap_or("refused"));
            return ExitCode::from(1);
        }
        Err(e) => {
            output::warn(&format!("{e:#}"));
            return ExitCode::from(1);
        }
    };
    let name = resp.data["alias"].as_str().unwrap_or(&alias).to_string();
    let text = match hash {
        None => format!("login of {name} removed\n"),
        Some((_, Some(pw))) => format!(
            "password set for {name}\ngenerated password (shown once, stored only as a hash): {pw}\n"
        ),
        Some((_, None)) => format!("password set for {name}\n"),
    };
    output::emit(&output::clean_text(&text), ExitCode::SUCCESS)
}

/// The first line of stdin, without its line end.
fn read_password() -> Result<String, String> {
    use std::io::Read;
    let mut buf = Vec::new();
    std::io::stdin()
        .lock()
        .take(4096)
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot read the password from stdin: {e}"))?;
    let line = buf.split(|&b| b == b'\n').next().unwrap_or(&[]);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() {
        return Err("no password on stdin (pipe one in, or use --generate)".into());
    }
    String::from_utf8(line.to_vec()).map_err(|_| "the password is not UTF-8".to_string())
}

/// Sends a request to the daemon, or runs it here when no daemon is running.
pub async fn send(cfg: &Config, req: Request) -> anyhow::Result<Response> {
    if let Some(resp) = control::server::call(&cfg.socket_path(), &req).await? {
        return Ok(resp);
    }
    become_data_dir_owner(cfg)?;
    crate::daemon::prepare_data_dir(cfg)?;
    let table = match crate::daemon::open_table(cfg) {
        Ok(t) => t,
        Err(crate::table::TableError::Locked(_)) => anyhow::bail!(
            "the table is locked by a running tenso, but its admin socket {} does not answer",
            cfg.socket_path().display()
        ),
        Err(e) => return Err(e.into()),
    };
    let spool = crate::daemon::open_spool(cfg)?;
    let pool = crate::bounce::pool::Pool::new(
        cfg.pool_dir(),
        cfg.pool_modes(),
        &cfg.hostname,
        cfg.pool.max_messages,
        cfg.pool.max_bytes,
    );
    let ctx = control::Ctx {
        cfg,
        table: &table,
        spool: &spool,
        pool: &pool,
        queue: None,
        status: None,
    };
    Ok(control::execute(&ctx, req).await)
}

/// Only root and the data dir's owner (the daemon's user) administer tenso: the
/// daemon refuses other peers on its socket (that is the boundary), and direct mode
/// would leave files the daemon cannot write — refused here, before anything is
/// touched.
fn refuse_other_users(cfg: &Config) -> anyhow::Result<()> {
    let Ok((uid, _, _)) = crate::disk::owner_and_mode(&cfg.data_dir) else {
        return Ok(());
    };
    // SAFETY: geteuid(2) cannot fail.
    let me = unsafe { libc::geteuid() };
    if uid != me && me != 0 {
        anyhow::bail!(
            "the data dir {} belongs to uid {uid}, not to you (uid {me}): run this command as \
             that user (or root), so nothing it writes is left unwritable for the daemon",
            cfg.data_dir.display()
        );
    }
    Ok(())
}

/// Direct mode writes the stores itself, so it runs as the data dir's owner (the
/// daemon's user): root switches to that user (its primary group and supplementary
/// groups); anyone else was refused by [`refuse_other_users`]. A data dir that does
/// not exist yet is created by whoever runs the command.
fn become_data_dir_owner(cfg: &Config) -> anyhow::Result<()> {
    let Ok((uid, dir_gid, _)) = crate::disk::owner_and_mode(&cfg.data_dir) else {
        return Ok(());
    };
    // SAFETY: geteuid(2) cannot fail.
    let me = unsafe { libc::geteuid() };
    if uid == me {
        return Ok(());
    }
    refuse_other_users(cfg)?;
    let (name, gid) = user_of(uid).unwrap_or((None, dir_gid));
    // SAFETY: plain credential syscalls; glibc applies them to every thread. Their
    // results are checked: continuing as root is exactly what must not happen.
    let ok = unsafe {
        let groups_ok = match &name {
            Some(n) => libc::initgroups(n.as_ptr(), gid) == 0,
            None => libc::setgroups(0, std::ptr::null()) == 0,
        };
        groups_ok && libc::setgid(gid) == 0 && libc::setuid(uid) == 0 && libc::geteuid() == uid
    };
    if !ok {
        anyhow::bail!(
            "cannot switch to uid {uid} (the owner of {}): {}",
            cfg.data_dir.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// The login name and primary group of `uid`, from the password database.
fn user_of(uid: u32) -> Option<(Option<std::ffi::CString>, u32)> {
    // SAFETY: getpwuid_r with buffers we own; the result is checked before use.
    unsafe {
        let mut pw: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut out);
        if rc != 0 || out.is_null() {
            return None;
        }
        let name = std::ffi::CStr::from_ptr(pw.pw_name).to_owned();
        Some((Some(name), pw.pw_gid))
    }
}
