//! The listener: accepts loopback connections under a connection cap, serves each with
//! hyper's HTTP/1.1 server (header size and header-read timeout bounded), and shuts down
//! gracefully: stop accepting, let in-flight requests finish up to a grace period, then
//! cut what is left.
//!
//! Owns no request policy: every request goes to [`Proxy::handle`].

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::config::LogLevel;
use crate::proxy::{Proxy, error_body};

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

/// How long to wait before accepting again after `accept` fails (e.g. out of descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `listener` until `shutdown` resolves with a grace period, then drains.
pub async fn run(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    limits: ServerLimits,
    shutdown: impl Future<Output = Duration>,
) {
    let logger = proxy.logger();
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let rejecting = Arc::new(Semaphore::new(MAX_REJECTING));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_size.max(8192) + 8192)
        .max_header_size(limits.max_header_size)
        .keep_alive(true);
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
                let proxy = Arc::clone(&proxy);
                let service = service_fn(move |req| {
                    let proxy = Arc::clone(&proxy);
                    async move { Ok::<_, Infallible>(proxy.handle(req).await) }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = conn.await;
                    drop(permit);
                });
            }
        }
    };
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
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
