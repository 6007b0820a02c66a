//! The listener: accepts loopback connections under a connection cap, serves each with
//! hyper's HTTP/1.1 server (header size and header-read timeout bounded), and shuts down
//! gracefully: stop accepting, let in-flight requests finish up to a grace period, then
//! cut what is left.
//!
//! Owns no request policy: every request goes to [`Proxy::handle`].

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::io::Write as _;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::body::{BoxError, ProxyBody};
use crate::config::LogLevel;
use crate::framing::{HeadSniffer, Verdict};
use crate::gate::AmbiguousFraming;
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
/// share with other workers) until `shutdown` resolves with a grace period, then drains.
/// Everything a connection needs, the upstream pool included, runs on the calling thread.
pub async fn run(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    upstream: Upstream,
    limits: ServerLimits,
    cap: ConnectionCap,
    shutdown: impl Future<Output = Duration>,
) {
    let logger = proxy.logger();
    let graceful = GracefulShutdown::new();
    let upstream = Arc::new(upstream);
    let ConnectionCap { permits, rejecting } = cap;
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // The exact limit (431 with a JSON error) is checked per request in `proxy.rs`;
        // hyper's own, at twice that, is the backstop for heads too large to parse.
        .max_buf_size(limits.max_header_size.saturating_mul(2).max(8192) + 8192)
        .max_header_size(limits.max_header_size.saturating_mul(2))
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
                // A second descriptor for the same socket, so a 408 can still be written
                // after hyper has given up on a slow request head and dropped its stream.
                let spare = stream.as_fd().try_clone_to_owned().ok().map(std::net::TcpStream::from);
                let stats = Arc::new(ConnStats::default());
                let proxy = Arc::clone(&proxy);
                let upstream = Arc::clone(&upstream);
                let svc_stats = Arc::clone(&stats);
                let service = service_fn(move |req| {
                    let proxy = Arc::clone(&proxy);
                    let upstream = Arc::clone(&upstream);
                    let stats = Arc::clone(&svc_stats);
                    async move {
                        let mut req = req;
                        if stats.ambiguous.swap(false, Ordering::Relaxed) {
                            req.extensions_mut().insert(AmbiguousFraming);
                        }
                        let resp = proxy.handle(&upstream, req).await;
                        Ok::<_, Infallible>(resp.map(|body| MarkOnEnd { body, stats: Some(stats) }))
                    }
                });
                let io = CountingIo {
                    inner: stream,
                    stats: Arc::clone(&stats),
                    sniffer: HeadSniffer::default(),
                    responses_seen: 0,
                };
                let conn = builder.serve_connection(TokioIo::new(io), service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await
                        && e.is_timeout()
                        && stats.read.load(Ordering::Relaxed) > stats.mark.load(Ordering::Relaxed)
                        && let Some(spare) = spare
                    {
                        // Part of a request head arrived, then nothing for
                        // --header-read-timeout: say so. (An idle keep-alive connection
                        // that times out is closed silently, as HTTP expects.)
                        request_timeout(spare);
                    }
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

/// Per-connection byte accounting, to tell a slow request head from an idle connection.
#[derive(Debug, Default)]
struct ConnStats {
    /// Bytes read from the client so far.
    read: AtomicU64,
    /// `read` when the last response finished.
    mark: AtomicU64,
    /// Responses finished (the sniffer re-arms for the next head when this moves).
    responses: AtomicU64,
    /// The last request head had an ambiguous framing shape.
    ambiguous: AtomicBool,
}

/// The client socket, counting bytes read and checking each request head's framing.
struct CountingIo {
    inner: TcpStream,
    stats: Arc<ConnStats>,
    sniffer: HeadSniffer,
    responses_seen: u64,
}

impl AsyncRead for CountingIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        let new = &buf.filled()[before..];
        this.stats
            .read
            .fetch_add(new.len() as u64, Ordering::Relaxed);
        let responses = this.stats.responses.load(Ordering::Relaxed);
        if responses != this.responses_seen {
            this.responses_seen = responses;
            this.sniffer.rearm();
        }
        if this.sniffer.feed(new) == Some(Verdict::Ambiguous) {
            this.stats.ambiguous.store(true, Ordering::Relaxed);
        }
        r
    }
}

impl AsyncWrite for CountingIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A response body that marks the connection's read count when it is done with, so bytes
/// that arrive afterwards are known to belong to the next request head.
struct MarkOnEnd {
    body: ProxyBody,
    stats: Option<Arc<ConnStats>>,
}

impl Drop for MarkOnEnd {
    fn drop(&mut self) {
        if let Some(stats) = self.stats.take() {
            stats
                .mark
                .store(stats.read.load(Ordering::Relaxed), Ordering::Relaxed);
            stats.responses.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Body for MarkOnEnd {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Writes a 408 on a connection whose request head never completed, then closes it.
fn request_timeout(mut spare: std::net::TcpStream) {
    let body = error_body(
        "the request head was not received within --header-read-timeout",
        "invalid_request_error",
        "request_timeout",
    );
    let head = format!(
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    // Small enough for the socket buffer: a non-blocking write, best effort.
    if spare.set_nonblocking(true).is_ok() {
        let _ = spare
            .write_all(head.as_bytes())
            .and_then(|()| spare.write_all(&body));
    }
    let _ = spare.shutdown(std::net::Shutdown::Both);
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
