//! The listener: accepts loopback connections under a connection cap, hands each to
//! `conn.rs`, and shuts down gracefully: stop accepting, let in-flight requests finish up
//! to a grace period, then cut what is left.
//!
//! Owns no request policy and no HTTP: every request goes to [`Proxy::handle`] by way of
//! [`conn::serve`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};

use crate::config::LogLevel;
use crate::conn::{self, ConnContext};
use crate::proxy::{Proxy, error_body};
use crate::upstream::Upstream;

/// Limits applied per connection and across connections.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Most client connections served at once.
    pub max_connections: usize,
    /// Time to receive a request head (and idle keep-alive time).
    pub header_read_timeout: Duration,
    /// Largest request head.
    pub max_header_size: usize,
}

/// Most connections being turned away (503) at once; beyond that they are just closed.
const MAX_REJECTING: usize = 64;

/// The connection cap, shared by every worker thread.
#[derive(Debug, Clone)]
pub struct ConnectionCap {
    permits: Arc<Semaphore>,
    rejecting: Arc<Semaphore>,
}

impl ConnectionCap {
    /// At most `max_connections` served at once, across all workers.
    pub fn new(max_connections: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_connections)),
            rejecting: Arc::new(Semaphore::new(MAX_REJECTING)),
        }
    }
}

/// How long to wait before accepting again after `accept` fails (e.g. out of descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// One worker: serves the connections it accepts from `listener` (a descriptor it may
/// share with other workers) until `shutdown` resolves with a grace period, then drains:
/// idle connections close at once, busy ones after their current response, and whatever is
/// left when the grace period is over is cut. Everything a connection needs, the upstream
/// pool included, runs on the calling thread.
pub async fn run(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    upstream: Upstream,
    limits: ServerLimits,
    cap: ConnectionCap,
    shutdown: impl Future<Output = Duration>,
) {
    let logger = proxy.logger();
    let ctx = Arc::new(ConnContext {
        proxy,
        upstream,
        limits,
    });
    let ConnectionCap { permits, rejecting } = cap;
    // Every connection task holds a sender; all of them gone means every connection ended.
    let (live_tx, mut live_rx) = mpsc::channel::<()>(1);
    let (drain_tx, drain_rx) = watch::channel(false);
    let mut accept_failures_logged = false;
    tokio::pin!(shutdown);
    let grace = loop {
        tokio::select! {
            grace = &mut shutdown => break grace,
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // EMFILE/ENFILE and friends: back off instead of spinning, keep
                        // serving the connections we have, and say so once per episode.
                        if !accept_failures_logged {
                            accept_failures_logged = true;
                            let reason = e.to_string();
                            logger.event(LogLevel::Warn, "accepting connections failed; backing off", &[("reason", &reason)]);
                        }
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                accept_failures_logged = false;
                let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                    if let Ok(slot) = Arc::clone(&rejecting).try_acquire_owned() {
                        tokio::spawn(async move {
                            reject_busy(stream).await;
                            drop(slot);
                        });
                    }
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let ctx = Arc::clone(&ctx);
                let drain = drain_rx.clone();
                let live = live_tx.clone();
                tokio::spawn(async move {
                    conn::serve(stream, ctx, drain).await;
                    drop(permit);
                    drop(live);
                });
            }
        }
    };
    drop(listener);
    let _ = drain_tx.send(true);
    drop(live_tx);
    tokio::select! {
        _ = live_rx.recv() => {}
        () = tokio::time::sleep(grace) => {
            logger.event(LogLevel::Warn, "shutdown grace period over; cutting the remaining connections", &[]);
        }
    }
}

/// Answers a connection over the cap with a fixed 503 and closes it.
async fn reject_busy(mut stream: TcpStream) {
    let body = error_body(
        "the proxy is serving its maximum number of connections (--max-connections); retry shortly",
        "server_error",
        "too_many_connections",
    );
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let work = async {
        // Read what the client sent first, so closing does not reset the connection before
        // the answer is read; a bounded read, and no wait beyond the timeout below.
        let mut buf = [0u8; 4096];
        let _ = tokio::time::timeout(Duration::from_millis(50), stream.read(&mut buf)).await;
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&body).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), work).await;
}
