//! The listener: accepts loopback connections under a connection cap, gives each to the
//! least loaded worker thread, which serves it with `conn.rs`, and shuts down gracefully: stop accepting, let in-flight requests finish up
//! to a grace period, then cut what is left.
//!
//! Owns no request policy and no HTTP: every request goes to [`Proxy::handle`] by way of
//! [`conn::serve`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

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
    /// Longest a response write may wait for a client that reads nothing
    /// (`--body-read-timeout`, the client-side silence limit both ways).
    pub client_write_stall: Duration,
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

/// A connection the accepting worker hands to another, with its place under the cap.
pub struct Handoff {
    stream: std::net::TcpStream,
    permit: OwnedSemaphorePermit,
}

/// Live connections per worker. The accepting worker gives each new connection to the
/// worker with the fewest (itself on a tie), so a burst of connections opened at once is
/// spread over every thread instead of landing on whichever woke first.
#[derive(Debug, Clone)]
pub struct Loads(Arc<[AtomicUsize]>);

impl Loads {
    /// Counters for `workers` workers.
    pub fn new(workers: usize) -> Self {
        Self((0..workers.max(1)).map(|_| AtomicUsize::new(0)).collect())
    }

    /// The least loaded worker, `me` on a tie with it; counted as one more from now.
    fn pick(&self, me: usize) -> usize {
        let load = |i: usize| {
            self.0
                .get(i)
                .map_or(usize::MAX, |c| c.load(Ordering::Relaxed))
        };
        let mut best = me;
        for i in 0..self.0.len() {
            if load(i) < load(best) {
                best = i;
            }
        }
        self.add(best);
        best
    }

    fn add(&self, i: usize) {
        if let Some(c) = self.0.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn done(&self, i: usize) {
        if let Some(c) = self.0.get(i) {
            c.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Where a worker's connections come from.
pub enum Intake {
    /// The accepting worker: the listener, and a channel to each other worker (worker
    /// `i` is `others[i - 1]`).
    Accept {
        /// The listening socket.
        listener: TcpListener,
        /// Hand-off channels to the other workers.
        others: Vec<mpsc::UnboundedSender<Handoff>>,
    },
    /// Any other worker: connections handed over by the accepting one.
    Handed(mpsc::UnboundedReceiver<Handoff>),
}

/// One worker (number `me`): serves the connections it accepts (or is handed) until
/// `shutdown` resolves with a grace period, then drains: idle connections close at once,
/// busy ones after their current response, and whatever is left when the grace period is
/// over is cut. Everything a connection needs, the upstream pool included, runs on the
/// calling thread.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    mut intake: Intake,
    me: usize,
    loads: Loads,
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
    let serve = |stream: TcpStream, permit: OwnedSemaphorePermit| {
        let ctx = Arc::clone(&ctx);
        let drain = drain_rx.clone();
        let live = live_tx.clone();
        let loads = loads.clone();
        tokio::spawn(async move {
            conn::serve(stream, ctx, drain).await;
            loads.done(me);
            drop(permit);
            drop(live);
        });
    };
    let mut accept_failures_logged = false;
    let mut handoffs_open = true;
    tokio::pin!(shutdown);
    let grace = loop {
        let (listener, others, handed) = match &mut intake {
            Intake::Accept { listener, others } => (Some(listener), others.as_slice(), None),
            Intake::Handed(rx) => (None, &[][..], Some(rx)),
        };
        tokio::select! {
            grace = &mut shutdown => break grace,
            handoff = next_handoff(handed), if handoffs_open => {
                let Some(Handoff { stream, permit }) = handoff else {
                    // The accepting worker has stopped; shutdown follows.
                    handoffs_open = false;
                    continue;
                };
                match TcpStream::from_std(stream) {
                    Ok(stream) => serve(stream, permit),
                    Err(_) => loads.done(me),
                }
            }
            accepted = accept(listener) => {
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
                let target = loads.pick(me);
                let to = if target == me { None } else { target.checked_sub(1).and_then(|i| others.get(i)) };
                let Some(to) = to else {
                    serve(stream, permit);
                    continue;
                };
                // Off this thread's event loop, onto the target's (which registers it).
                match stream.into_std() {
                    Ok(stream) => {
                        if let Err(mpsc::error::SendError(back)) = to.send(Handoff { stream, permit }) {
                            // That worker is gone: serve it here.
                            loads.done(target);
                            loads.add(me);
                            match TcpStream::from_std(back.stream) {
                                Ok(stream) => serve(stream, back.permit),
                                Err(_) => loads.done(me),
                            }
                        }
                    }
                    Err(_) => loads.done(target),
                }
            }
        }
    };
    drop(intake);
    let _ = drain_tx.send(true);
    drop(live_tx);
    tokio::select! {
        _ = live_rx.recv() => {}
        () = tokio::time::sleep(grace) => {
            logger.event(LogLevel::Warn, "shutdown grace period over; cutting the remaining connections", &[]);
        }
    }
}

/// The next connection from the listener (never, for a worker without one).
async fn accept(listener: Option<&mut TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// The next connection handed over (never, for the accepting worker).
async fn next_handoff(rx: Option<&mut mpsc::UnboundedReceiver<Handoff>>) -> Option<Handoff> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_connections_go_to_the_least_loaded_worker() {
        let loads = Loads::new(3);
        // A burst: round the workers, the accepting one first on a tie.
        let picks: Vec<usize> = (0..6).map(|_| loads.pick(0)).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        // Worker 1's connections end: it gets the next ones.
        loads.done(1);
        loads.done(1);
        assert_eq!(loads.pick(0), 1);
        assert_eq!(loads.pick(0), 1);
        assert_eq!(loads.pick(0), 0);
        // Out-of-range indexes are ignored, never a panic.
        loads.done(7);
        loads.add(7);
        assert_eq!(Loads::new(0).pick(0), 0);
    }
}
