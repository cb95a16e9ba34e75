//! The monitoring endpoint (`[metrics] listen`): `GET /metrics` in the Prometheus
//! text format (0.0.4) and `GET /health` — 200 when the node listens for SMTP and its
//! table is reachable, 503 (with the reason) otherwise.
//!
//! HTTP/1.1 through hyper's server. Read-only: it changes nothing, takes no request
//! body, and answers every other path 404 and every other method 405. It must not
//! let a client hold it: at most [`MAX_CONNECTIONS`] connections (more are closed at
//! once), request heads bounded by [`MAX_HEAD_BYTES`] and read within
//! [`HEAD_DEADLINE`], and a connection lives at most [`CONNECTION_DEADLINE`]. No
//! authentication and no TLS: bind it to loopback or a monitoring network.

use crate::metrics::metrics;
use crate::queue::QueueHandle;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Connections served at once (Prometheus and a load balancer need two or three).
pub const MAX_CONNECTIONS: usize = 16;
/// A request head must arrive within this.
pub const HEAD_DEADLINE: Duration = Duration::from_secs(5);
/// Largest request head; hyper answers 431 beyond it (8 KiB is hyper's floor).
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// A connection (keep-alive included) is closed after this.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(60);
/// How long a scrape waits for the queue manager's figures.
const QUEUE_DEADLINE: Duration = Duration::from_secs(2);

/// Binds the endpoint.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {addr} for metrics: {e}"),
        )
    })
}

/// Serves until the process ends.
pub async fn run(listener: TcpListener, queue: QueueHandle) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(client = %peer, limit = MAX_CONNECTIONS, "metrics: too many connections, closing");
            continue;
        };
        let queue = queue.clone();
        tokio::spawn(async move {
            serve_connection(sock, queue).await;
            drop(permit);
        });
    }
}

async fn serve_connection(sock: tokio::net::TcpStream, queue: QueueHandle) {
    let service = hyper::service::service_fn(move |req| {
        let queue = queue.clone();
        async move { Ok::<_, Infallible>(answer(&queue, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_DEADLINE)
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(TokioIo::new(sock), service);
    // Dropping the connection future closes the socket.
    let _ = tokio::time::timeout(CONNECTION_DEADLINE, conn).await;
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

async fn answer(queue: &QueueHandle, req: Request<Incoming>) -> Reply {
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "GET or HEAD only\n");
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => {
            refresh_queue_gauges(queue).await;
            reply(
                StatusCode::OK,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                metrics().encode(),
            )
        }
        "/health" => match metrics().health() {
            Ok(()) => reply(StatusCode::OK, TEXT, "ok\n"),
            Err(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                format!("unavailable: {why}\n"),
            ),
        },
        _ => reply(StatusCode::NOT_FOUND, TEXT, "try /metrics or /health\n"),
    }
}

/// The queue's size and oldest age, asked of its manager at scrape time (a stalled
/// manager leaves the last figures, after a bounded wait).
async fn refresh_queue_gauges(queue: &QueueHandle) {
    let Ok(Some(s)) = tokio::time::timeout(QUEUE_DEADLINE, queue.stats()).await else {
        tracing::warn!("metrics: the queue manager did not report in time");
        return;
    };
    let m = metrics();
    m.queue_messages.set(s.messages as i64);
    let age = s
        .oldest_arrival
        .map_or(0, |a| (crate::time::unix_now() - a).max(0));
    m.queue_oldest_seconds.set(age);
}
