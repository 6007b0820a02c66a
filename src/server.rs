//! The listener: accepts loopback connections under a connection cap, keeps most of them
//! and gives the rest to the least loaded other worker thread (each serves its own with
//! `conn.rs`), and shuts down gracefully: stop accepting, let in-flight requests finish up
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
use crate::upstream_h1::MAX_IDLE;

/// Limits applied per connection and across connections.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
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

/// File descriptors the proxy holds besides its connections: the standard streams, the
/// listener and the signal pipe, with room for name lookups and files being written (16),
/// and per worker its event loop and wake-up descriptors (4). (The sockets of 503 answers
/// come on top; when they run out, accepting backs off.)
fn fixed_descriptors(workers: usize) -> u64 {
    16 + 4 * workers as u64
}

/// File descriptors needed to serve `connections` client connections at once with
/// `workers` threads: each client connection and the upstream connection carrying its
/// request, the idle pooled upstream connections (at most [`MAX_IDLE`] per worker, and a
/// worker never keeps more than were busy at once), and [`fixed_descriptors`].
pub fn descriptors_needed(connections: usize, workers: usize) -> u64 {
    let c = connections as u64;
    let idle = c.min(MAX_IDLE as u64).saturating_mul(workers as u64);
    c.saturating_mul(2)
        .saturating_add(idle)
        .saturating_add(fixed_descriptors(workers))
}

/// The most client connections (up to `max`) that `limit` descriptors serve with `workers`
/// threads; 0 when `limit` does not even cover the fixed ones and one connection.
pub fn connections_within(limit: u64, workers: usize, max: usize) -> usize {
    // `descriptors_needed` grows with the count: the largest fitting count, by bisection.
    let (mut fits, mut over) = (0usize, max.saturating_add(1));
    if descriptors_needed(max, workers) <= limit {
        return max;
    }
    while over - fits > 1 {
        let mid = fits + (over - fits) / 2;
        if descriptors_needed(mid, workers) <= limit {
            fits = mid;
        } else {
            over = mid;
        }
    }
    fits
}

/// What to do about the open-files limit (`RLIMIT_NOFILE`, soft and hard) before serving
/// `max_connections` connections with `workers` threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DescriptorPlan {
    /// The soft limit to raise to (never above the hard one), when it must rise.
    pub raise_to: Option<u64>,
    /// How many connections the limit serves once raised: `max_connections`, or fewer when
    /// the hard limit is too low for it.
    pub connections: usize,
}

/// Raise the soft limit as far as `max_connections` needs (and the hard limit allows),
/// and serve only as many connections as fit: past the cap a client gets a clear 503, where
/// running out of descriptors would leave it waiting in the backlog or cut its request.
pub fn descriptor_plan(
    max_connections: usize,
    workers: usize,
    soft: u64,
    hard: u64,
) -> DescriptorPlan {
    let need = descriptors_needed(max_connections, workers);
    if soft >= need {
        return DescriptorPlan {
            raise_to: None,
            connections: max_connections,
        };
    }
    let limit = need.min(hard).max(soft);
    DescriptorPlan {
        raise_to: (limit > soft).then_some(limit),
        connections: connections_within(limit, workers, max_connections),
    }
}

/// How long to wait before accepting again after `accept` fails (e.g. out of descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A connection the accepting worker hands to another, with its place under the cap.
pub struct Handoff {
    stream: std::net::TcpStream,
    permit: OwnedSemaphorePermit,
}

/// Of every `HOT_SHARE + 1` connections opened together, the accepting worker keeps
/// `HOT_SHARE` and hands one to the least loaded other worker.
///
/// The proxy's clients are always on the same machine (it listens on loopback), so its
/// workers never have the cores to themselves. A worker with many connections finds more
/// work each time it wakes and sleeps less per request; one that serves a few sleeps after
/// almost every request, and each sleep and wake-up costs CPU on both sides. With 16 busy
/// connections on 2 cores, keeping 14 on one worker and 2 on the other took about 7 % less
/// CPU per request than 8 and 8, and no less throughput (README, Benchmark); 16 and 0
/// (one worker) took less CPU still but left a core's share unused under load.
pub const HOT_SHARE: usize = 7;

/// Live connections per worker, for choosing who serves a new one: the accepting worker
/// keeps it while it has fewer than `HOT_SHARE` times (one more than) the least loaded
/// other worker's, which gets it otherwise. A burst is thus split `HOT_SHARE` to one, and
/// no worker is left idle by it.
#[derive(Debug, Clone)]
pub struct Loads(Arc<[AtomicUsize]>);

impl Loads {
    /// Counters for `workers` workers.
    pub fn new(workers: usize) -> Self {
        Self((0..workers.max(1)).map(|_| AtomicUsize::new(0)).collect())
    }

    /// The worker to serve a connection accepted by `me`; counted as one more from now.
    fn pick(&self, me: usize) -> usize {
        let load = |c: &AtomicUsize| c.load(Ordering::Relaxed);
        let mine = self.0.get(me).map_or(0, load);
        // The least loaded other worker, the first on a tie.
        let other = self
            .0
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != me)
            .min_by_key(|&(_, c)| load(c));
        let target = match other {
            Some((i, c)) if mine >= load(c).saturating_add(1).saturating_mul(HOT_SHARE) => i,
            _ => me,
        };
        self.add(target);
        target
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

    #[cfg(test)]
    fn load(&self, i: usize) -> usize {
        self.0.get(i).map_or(0, |c| c.load(Ordering::Relaxed))
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
    fn descriptors_cover_both_sides_of_each_connection_and_the_idle_pool() {
        // The default: 1024 connections, 2 workers.
        assert_eq!(descriptors_needed(1024, 2), 2048 + 512 + 16 + 8);
        // Few connections: the idle pool never holds more than were busy.
        assert_eq!(descriptors_needed(10, 1), 20 + 10 + 16 + 4);
        assert_eq!(descriptors_needed(0, 1), 20);
        assert_eq!(descriptors_needed(usize::MAX, 64), u64::MAX);
        // `connections_within` is the inverse: the largest count that fits, for any limit.
        for workers in [1, 2, 3, 64] {
            for limit in (0..3000).step_by(7).chain([u64::MAX]) {
                let c = connections_within(limit, workers, 1 << 20);
                if c < 1 << 20 {
                    assert!(
                        descriptors_needed(c + 1, workers) > limit,
                        "{limit} {workers}"
                    );
                }
                if c > 0 {
                    assert!(descriptors_needed(c, workers) <= limit, "{limit} {workers}");
                }
            }
        }
        assert_eq!(connections_within(22, 1, 1024), 0);
        assert_eq!(connections_within(23, 1, 1024), 1);
        assert_eq!(connections_within(1 << 40, 2, 1024), 1024);
    }

    #[test]
    fn the_open_files_limit_is_raised_as_far_as_needed_and_the_cap_fits_what_is_left() {
        let need = descriptors_needed(1024, 2);
        // Enough already: nothing changes.
        let plan = descriptor_plan(1024, 2, need, need);
        assert_eq!(plan.raise_to, None);
        assert_eq!(plan.connections, 1024);
        // The common case (soft 1024, hard much higher): raised to what is needed, no more.
        let plan = descriptor_plan(1024, 2, 1024, 524_288);
        assert_eq!(plan.raise_to, Some(need));
        assert_eq!(plan.connections, 1024);
        // A hard limit below the need: raised to it, and the cap lowered to what fits.
        let plan = descriptor_plan(1024, 2, 256, 1024);
        assert_eq!(plan.raise_to, Some(1024));
        assert_eq!(plan.connections, connections_within(1024, 2, 1024));
        assert_eq!(plan.connections, 250);
        // Soft already at the hard limit: nothing to raise; the cap fits the limit.
        let plan = descriptor_plan(1024, 2, 1024, 1024);
        assert_eq!(plan.raise_to, None);
        assert_eq!(plan.connections, connections_within(1024, 2, 1024));
        // A soft limit above a reported hard one (never lowered here).
        assert_eq!(descriptor_plan(1024, 2, 2000, 1000).raise_to, None);
        // Too few for even one connection.
        assert_eq!(descriptor_plan(8, 1, 20, 20).connections, 0);
        assert_eq!(descriptor_plan(8, 1, 64, 64).connections, 8);
    }

    #[test]
    fn the_accepting_worker_keeps_most_new_connections_and_hands_on_the_rest() {
        // Two workers, a burst of 16 (and then 64) connections: 7 of every 8 stay.
        let loads = Loads::new(2);
        let picks: Vec<usize> = (0..16).map(|_| loads.pick(0)).collect();
        let mut expected = vec![0; 7];
        expected.push(1);
        expected.extend([0; 7]);
        expected.push(1);
        assert_eq!(picks, expected);
        for _ in 16..64 {
            loads.pick(0);
        }
        assert_eq!(loads.load(0), 56);
        assert_eq!(loads.load(1), 8);
        // The other worker's connections end: it gets the next ones until back at its share.
        for _ in 0..4 {
            loads.done(1);
        }
        let picks: Vec<usize> = (0..5).map(|_| loads.pick(0)).collect();
        assert_eq!(picks, [1, 1, 1, 1, 0]);
        // The accepting worker's own connections end: it takes the next ones.
        for _ in 0..10 {
            loads.done(0);
        }
        assert_eq!(loads.pick(0), 0);

        // Three workers: the others take turns with the overflow, the least loaded first.
        let loads = Loads::new(3);
        let picks: Vec<usize> = (0..18).map(|_| loads.pick(0)).collect();
        let mut expected = vec![0; 7];
        expected.extend([1, 2]);
        expected.extend([0; 7]);
        expected.extend([1, 2]);
        assert_eq!(picks, expected);
        // One worker: always itself.
        let one = Loads::new(1);
        assert!((0..100).all(|_| one.pick(0) == 0));
        // Out-of-range indexes are ignored, never a panic.
        let loads = Loads::new(2);
        loads.done(7);
        loads.add(7);
        assert_eq!(Loads::new(0).pick(0), 0);
    }
}
