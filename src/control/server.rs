//! The admin socket: a Unix socket in the data dir, owner-only, one request per
//! connection. Also the client side the CLI uses to reach a running daemon.

use super::{Ctx, Envelope, PROTOCOL_VERSION, Request, Response};
use crate::config::Config;
use crate::queue::QueueHandle;
use crate::spool::Spool;
use crate::table::Table;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// Largest accepted request line (an import of a million aliases fits).
const MAX_REQUEST: usize = 512 * 1024 * 1024;

pub struct Server {
    pub cfg: Arc<Config>,
    pub table: Table,
    pub spool: Spool,
    pub queue: QueueHandle,
    pub pool: Arc<crate::bounce::pool::Pool>,
    pub status: Arc<dyn Fn() -> serde_json::Value + Send + Sync>,
}

/// Binds the socket with mode 0600. A stale socket file from a killed daemon is
/// replaced; the data-dir lock (sled) already proved no other daemon is alive.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

pub async fn run(server: Arc<Server>, listener: UnixListener) {
    let me = unsafe { libc::geteuid() };
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        let server = server.clone();
        tokio::spawn(async move {
            let uid = sock.peer_cred().map(|c| c.uid()).ok();
            if uid != Some(0) && uid != Some(me) {
                tracing::warn!(peer_uid = ?uid, "admin socket: refused peer (not root, not the daemon's uid)");
                // Read the request (bounded) before answering: closing while the peer
                // still writes would leave it a broken pipe instead of the refusal.
                let mut reader = BufReader::new(sock);
                let mut line = Vec::new();
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    (&mut reader).take(64 * 1024).read_until(b'\n', &mut line),
                )
                .await;
                let mut sock = reader.into_inner();
                let resp = Response::err(
                    "permission denied: only root or the daemon's user may administer tenso",
                );
                let _ = write_response(&mut sock, &resp).await;
                return;
            }
            if let Err(e) = serve_one(&server, sock).await {
                tracing::warn!(error = %e, "admin socket request failed");
            }
        });
    }
}

async fn write_response(sock: &mut UnixStream, resp: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(resp)?;
    line.push(b'\n');
    sock.write_all(&line).await?;
    sock.shutdown().await
}

async fn serve_one(server: &Server, sock: UnixStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(sock);
    let mut line = Vec::new();
    (&mut reader)
        .take(MAX_REQUEST as u64)
        .read_until(b'\n', &mut line)
        .await?;
    let mut sock = reader.into_inner();
    let resp = match serde_json::from_slice::<Envelope>(&line) {
        Err(e) => Response::err(format!("bad request: {e}")),
        Ok(env) if env.v != PROTOCOL_VERSION => Response::err(format!(
            "protocol version {} not supported by this daemon (speaks {PROTOCOL_VERSION})",
            env.v
        )),
        Ok(env) => {
            let cmd = format!("{:?}", env.req);
            let ctx = Ctx {
                cfg: &server.cfg,
                table: &server.table,
                spool: &server.spool,
                queue: Some(&server.queue),
                pool: &server.pool,
                status: Some((server.status)()),
            };
            // Table changes fsync (sled flush) before they are acknowledged: run the
            // request off the async workers so sessions are never stalled by it.
            let resp = tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(super::execute(&ctx, env.req))
            });
            tracing::info!(
                command = %cmd.chars().take(80).collect::<String>(),
                ok = resp.ok,
                "admin command"
            );
            resp
        }
    };
    write_response(&mut sock, &resp).await
}

use tokio::io::AsyncReadExt;

/// Sends one request to a running daemon. `Ok(None)` means no daemon listens there.
pub async fn call(socket: &Path, req: &Request) -> std::io::Result<Option<Response>> {
    let mut sock = match UnixStream::connect(socket).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let mut line = serde_json::to_vec(&Envelope {
        v: PROTOCOL_VERSION,
        req: req.clone(),
    })?;
    line.push(b'\n');
    sock.write_all(&line).await?;
    let mut buf = Vec::new();
    sock.read_to_end(&mut buf).await?;
    let resp = serde_json::from_slice(&buf).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("bad response from daemon: {e}"),
        )
    })?;
    Ok(Some(resp))
}
