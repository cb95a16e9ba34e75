//! The SMTP server: listeners, connection permits, and one [`session`] per client.
//!
//! Accepts connections, applies the connection limits, and runs the RFC 5321 state
//! machine. It decides relay/unknown-user per RCPT through the table, and answers 250
//! to DATA only after [`crate::spool::Spool::commit`] returned — never before the
//! message is on stable storage. It never delivers anything itself: committed
//! messages are handed to the queue through its handle.

mod data;
mod mail;
mod session;
pub mod stream;

use crate::config::Config;
use crate::queue::QueueHandle;
use crate::spool::Spool;
use crate::table::Table;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

/// Counters for the admin (`tenso status`) and tests.
#[derive(Default, Debug)]
pub struct Counters {
    pub sessions: AtomicU64,
    pub accepted: AtomicU64,
    pub rejected_rcpt: AtomicU64,
    pub relay_denied: AtomicU64,
    pub refused_data: AtomicU64,
    pub busy: AtomicU64,
}

impl Counters {
    pub fn snapshot(&self) -> serde_json::Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "sessions": g(&self.sessions),
            "accepted": g(&self.accepted),
            "rejected_rcpt": g(&self.rejected_rcpt),
            "relay_denied": g(&self.relay_denied),
            "refused_data": g(&self.refused_data),
            "busy": g(&self.busy),
        })
    }
}

/// Everything a session needs, shared by all sessions.
pub struct Inbound {
    pub cfg: Arc<Config>,
    pub table: Table,
    pub spool: Spool,
    pub queue: QueueHandle,
    pub counters: Counters,
    permits: Arc<Semaphore>,
}

impl Inbound {
    pub fn new(cfg: Arc<Config>, table: Table, spool: Spool, queue: QueueHandle) -> Arc<Inbound> {
        Arc::new(Inbound {
            permits: Arc::new(Semaphore::new(cfg.smtp.max_connections)),
            cfg,
            table,
            spool,
            queue,
            counters: Counters::default(),
        })
    }
}

/// Binds every configured listener; returns them with their actual addresses (a
/// configured port 0 becomes the ephemeral port the kernel chose).
pub async fn bind(cfg: &Config) -> std::io::Result<Vec<(TcpListener, SocketAddr)>> {
    let mut out = Vec::new();
    for addr in &cfg.smtp.listen {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
        let local = l.local_addr()?;
        out.push((l, local));
    }
    Ok(out)
}

/// Accepts clients until `shutdown` flips to true.
pub async fn run(
    inbound: Arc<Inbound>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (sock, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = sock.set_nodelay(true);
        let inbound = inbound.clone();
        match inbound.permits.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(async move {
                    session::run(inbound, sock, peer).await;
                    drop(permit);
                });
            }
            Err(_) => {
                inbound.counters.busy.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(client = %peer.ip(), limit = inbound.cfg.smtp.max_connections, "too many connections, refusing");
                tokio::spawn(session::refuse_busy(inbound, sock));
            }
        }
    }
}
