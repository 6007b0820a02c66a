//! responses-api-proxy: a strict, hardened loopback proxy for the OpenAI Responses API.
//!
//! A privileged operator pipes an API key in on stdin; local clients holding the per-launch
//! proxy token send `POST /v1/responses` to 127.0.0.1; the proxy injects
//! `Authorization: Bearer <key>` and streams the upstream's answer back. The key stays in
//! one locked page and never reaches a log, file, error or response.
//!
//! Layout (one responsibility per module; pure decisions import no IO):
//!
//! | module | owns |
//! |---|---|
//! | [`config`] | flags → validated [`config::Config`] |
//! | [`sys`] | the only `unsafe`: syscalls behind safe signatures |
//! | [`hardening`] | process hardening policy |
//! | [`secret`] | reading, validating and locking the key |
//! | [`token`] | the per-launch client token |
//! | [`gate`] | pure: request head → allow or refusal |
//! | [`headers`] | pure: header rewriting both ways |
//! | [`mask`] | pure: overwriting a reflected key in headers and streams |
//! | [`upstream`] | the choice of upstream path; the HTTP/2 client of `--upstream-http2`; TLS roots, connect timeout |
//! | [`fields`] | pure: header fields located in a head buffer, recognised by name |
//! | [`h1`] | pure: HTTP/1.1 heads, framing and chunked decoding, both sides |
//! | [`upstream_h1`] | the default upstream path, HTTP/1.1 over TCP or TLS: per-worker keep-alive pool, streaming body |
//! | [`body`] | the streaming request and response bodies, their limits and timers |
//! | [`proxy`] | one request: gate → forward → stream back |
//! | [`conn`] | one client connection: request heads in, responses out, keep-alive |
//! | [`server`] | listener, connection cap, sharing connections between workers, graceful shutdown |
//! | [`server_info`], [`dump`] | the files the proxy writes |
//! | [`log`] | access and event lines on stderr |
#![deny(unsafe_code)]

pub mod body;
pub mod config;
pub mod conn;
pub mod dump;
pub mod fields;
pub mod gate;
pub mod h1;
pub mod hardening;
pub mod headers;
pub mod log;
pub mod mask;
pub mod paths;
pub mod proxy;
pub mod secret;
pub mod server;
pub mod server_info;
pub mod sys;
pub mod token;
pub mod upstream;
pub mod upstream_h1;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{Config, LogLevel};
use crate::log::Logger;
use crate::proxy::{Proxy, StopReason};
use crate::secret::ApiKey;
use crate::token::ProxyToken;
use crate::upstream::Upstream;

/// Longest drain after `GET /shutdown`, so the process is gone within about a second.
const HTTP_SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

/// Why the proxy stopped with an error; each maps to a documented exit code.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A flag value cannot be used (exit 2).
    #[error("{0}")]
    Usage(String),
    /// A usage error already reported by the argument parser (exit 2).
    #[error("invalid command line")]
    UsageReported,
    /// The key is missing, invalid or too long (exit 3).
    #[error(transparent)]
    Key(#[from] secret::KeyError),
    /// Hardening failed (exit 4).
    #[error(transparent)]
    Hardening(#[from] hardening::HardeningError),
    /// The listener could not be bound (exit 5).
    #[error(
        "cannot listen on {addr}: {source}; choose another --port or omit it for an ephemeral port"
    )]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The server-info file cannot be written safely (exit 6).
    #[error(transparent)]
    ServerInfo(#[from] server_info::ServerInfoError),
    /// Anything else at run time (exit 1).
    #[error("{0}")]
    Runtime(String),
}

impl RunError {
    /// The documented exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Runtime(_) => 1,
            Self::Usage(_) | Self::UsageReported => 2,
            Self::Key(_) => 3,
            Self::Hardening(_) => 4,
            Self::Listen { .. } => 5,
            Self::ServerInfo(_) => 6,
        }
    }
}

/// Everything prepared before the runtime starts (single-threaded, after hardening).
pub struct Prepared {
    config: Config,
    key: ApiKey,
    token: ProxyToken,
    upstream: Upstream,
    dumper: Option<Arc<dump::Dumper>>,
    logger: Logger,
}

impl Prepared {
    /// Logs a warning found before logging started, in the configured format. Written even
    /// at `--log-level error`: these say how the key is exposed (in the environment, not
    /// locked), as the plain lines they replace always did.
    pub fn warn(&self, msg: &str, fields: &[(&str, &str)]) {
        let level = self.config.log_level.max(LogLevel::Warn);
        Logger::new(self.config.log_format, level).event(LogLevel::Warn, msg, fields);
    }
}

/// Validates files named by flags, generates the token and builds the upstream client.
/// Runs on the main thread after the hardening, the key's read and the environment's
/// scrub; the only thread it starts is the log writer (`log::start`), which touches
/// nothing but its queue and stderr.
pub fn prepare(config: Config, key: ApiKey) -> Result<Prepared, RunError> {
    let logger = Logger::new(config.log_format, config.log_level);
    crate::log::start(config.log_format);
    let token = ProxyToken::generate().map_err(|e| RunError::Runtime(e.to_string()))?;
    match &config.server_info {
        Some(path) => server_info::preflight(path)?,
        // The token will be printed to standard error: not into a file others can read.
        None => {
            use std::os::fd::AsFd;
            let stderr = std::io::stderr();
            if let Some((file, mode, who)) =
                crate::paths::open_file_readers(stderr.as_fd(), "/proc/self/fd/2")
            {
                return Err(server_info::ServerInfoError::OpenStderr { file, mode, who }.into());
            }
        }
    }
    let upstream = Upstream::new(
        &config.upstream,
        config.upstream_ca.as_deref(),
        config.upstream_http2,
        config.upstream_connect_timeout,
        config.upstream_pool_idle_timeout,
    )
    .map_err(|e| RunError::Usage(e.to_string()))?;
    let dumper = match &config.dump_dir {
        Some(dir) => Some(
            dump::Dumper::new(dir, config.dump_max_body, config.dump_max_memory, logger)
                .map(Arc::new)
                .map_err(|e| RunError::Runtime(e.to_string()))?,
        ),
        None => None,
    };
    Ok(Prepared {
        config,
        key,
        token,
        upstream,
        dumper,
        logger,
    })
}

/// A single-threaded event loop: one per worker thread, and one for the main thread
/// (which is also worker 0 and handles signals).
fn event_loop() -> Result<tokio::runtime::Runtime, RunError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(8)
        .build()
        .map_err(|e| RunError::Runtime(format!("cannot start the async runtime: {e}")))
}

/// Resolves with the grace period once shutdown has been decided (at once, with no grace,
/// if the deciding side is gone).
async fn drain_signal(mut rx: watch::Receiver<Option<Duration>>) -> Duration {
    match rx.wait_for(Option::is_some).await {
        Ok(grace) => grace.unwrap_or_default(),
        Err(_) => Duration::ZERO,
    }
}

/// Binds, announces, serves until SIGTERM/SIGINT/SIGHUP or `GET /shutdown`, then cleans up.
///
/// `--worker-threads` threads serve connections, the calling thread being the first. Each
/// runs its own single-threaded event loop and keeps its own upstream pool, so a request is
/// handled start to end on one thread with no cross-thread wake-ups. The calling thread
/// accepts, keeps most new connections and hands the rest to the least loaded other worker
/// (see [`server::HOT_SHARE`]).
pub fn serve(p: Prepared) -> Result<(), RunError> {
    let Prepared {
        config,
        key,
        token,
        upstream,
        dumper,
        logger,
    } = p;
    let worker_threads = config
        .workers(std::thread::available_parallelism().map_or(config::DEFAULT_WORKERS, |n| n.get()));
    let max_connections = open_files_for(config.max_connections, worker_threads, &logger)?;
    let main_loop = event_loop()?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, config.port));
    let listener =
        std::net::TcpListener::bind(addr).map_err(|source| RunError::Listen { addr, source })?;
    let port = listener
        .local_addr()
        .and_then(|a| listener.set_nonblocking(true).map(|()| a.port()))
        .map_err(|source| RunError::Listen { addr, source })?;

    // SIGHUP (the terminal the proxy ran in has gone) stops it as SIGTERM does, rather than
    // killing it with the server-info file left behind: there is nothing to reload.
    let signals = {
        let _in_loop = main_loop.enter();
        let sig = |kind, name: &str| {
            tokio::signal::unix::signal(kind)
                .map_err(|e| RunError::Runtime(format!("cannot handle {name}: {e}")))
        };
        Signals {
            term: sig(tokio::signal::unix::SignalKind::terminate(), "SIGTERM")?,
            int: sig(tokio::signal::unix::SignalKind::interrupt(), "SIGINT")?,
            hup: sig(tokio::signal::unix::SignalKind::hangup(), "SIGHUP")?,
        }
    };

    let (stop_tx, stop_rx) = watch::channel(None);
    let (drain_tx, drain_rx) = watch::channel(None::<Duration>);
    let limits = server::ServerLimits {
        header_read_timeout: config.header_read_timeout,
        max_header_size: config.max_header_size,
        client_write_stall: config.body_read_timeout,
    };
    let cap = server::ConnectionCap::new(max_connections);
    let upstream_text = upstream_for_log(upstream.uri());
    let proxy = Arc::new(Proxy::new(
        &config,
        port,
        token,
        key,
        dumper.clone(),
        stop_tx,
    ));

    let loads = server::Loads::new(worker_threads);
    let mut workers = Vec::with_capacity(worker_threads.saturating_sub(1));
    let mut handoffs = Vec::with_capacity(worker_threads.saturating_sub(1));
    for i in 1..worker_threads {
        let event_loop = event_loop()?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        handoffs.push(tx);
        let (proxy, upstream) = (Arc::clone(&proxy), upstream.with_own_pool());
        let (cap, drain, loads) = (cap.clone(), drain_rx.clone(), loads.clone());
        let worker = std::thread::Builder::new()
            .name(format!("worker-{i}"))
            .spawn(move || {
                event_loop.block_on(server::run(
                    server::Intake::Handed(rx),
                    i,
                    loads,
                    proxy,
                    upstream,
                    limits,
                    cap,
                    drain_signal(drain),
                ));
                event_loop.shutdown_timeout(Duration::from_millis(200));
            })
            .map_err(|e| RunError::Runtime(format!("cannot start a worker thread: {e}")))?;
        workers.push(worker);
    }

    let written = match &config.server_info {
        Some(path) => {
            let info = server_info::ServerInfo {
                port,
                pid: std::process::id(),
                auth_token: proxy.token().as_str(),
            };
            Some(server_info::write(path, &info)?)
        }
        None => {
            // The one place the token is printed: labelled, on its own line, only when
            // there is no server-info file to carry it.
            crate::log::flush(Duration::from_millis(200));
            // Nobody could ever learn the token: not worth serving.
            crate::log::stderr_line(&["proxy token: ", proxy.token().as_str()]).map_err(|e| {
                RunError::Runtime(format!(
                    "cannot print the proxy token to stderr ({e}); use --server-info"
                ))
            })?;
            None
        }
    };
    logger.event(
        LogLevel::Info,
        "listening",
        &[
            ("addr", &format!("127.0.0.1:{port}")),
            ("upstream", &upstream_text),
        ],
    );

    let grace = config.shutdown_grace;
    let result = main_loop.block_on(async move {
        let listener = TcpListener::from_std(listener)
            .map_err(|e| RunError::Runtime(format!("cannot use the listener: {e}")))?;
        let shutdown = async move {
            let grace = shutdown_requested(signals, stop_rx, grace, logger).await;
            let _ = drain_tx.send(Some(grace));
            grace
        };
        let intake = server::Intake::Accept {
            listener,
            others: handoffs,
        };
        server::run(intake, 0, loads, proxy, upstream, limits, cap, shutdown).await;
        Ok(())
    });
    // Each worker drains within the same grace period.
    for worker in workers {
        if worker.join().is_err() {
            logger.event(LogLevel::Error, "a worker thread panicked", &[]);
        }
    }
    main_loop.shutdown_timeout(Duration::from_millis(200));
    if let Some(d) = dumper {
        if !d.close(dump::WRITE_ON_EXIT) {
            logger.event(
                LogLevel::Warn,
                "dump files still queued at exit were not all written (the disk is slow)",
                &[],
            );
        }
        if d.skipped() > 0 {
            logger.event(
                LogLevel::Warn,
                "some exchanges were not dumped: --dump-max-memory was in use by earlier dumps",
                &[("not_dumped", &d.skipped().to_string())],
            );
        }
    }
    if let Some(w) = written {
        w.remove();
    }
    logger.event(LogLevel::Info, "stopped", &[]);
    result
}

/// Raises the soft open-files limit as far as `max_connections` needs (within the hard
/// limit) and returns how many connections to serve: `max_connections`, or fewer, with a
/// warning, when the hard limit is too low for it. None at all is an error.
fn open_files_for(
    max_connections: usize,
    workers: usize,
    logger: &Logger,
) -> Result<usize, RunError> {
    let Ok((soft, hard)) = sys::open_files_limit() else {
        // Not knowable: serve as configured (running out is still handled, by backing off).
        return Ok(max_connections);
    };
    // No soft limit above `fs.nr_open` is accepted, whatever the hard limit says (it may be
    // unlimited).
    let ceiling = hard.min(nr_open());
    let plan = server::descriptor_plan(max_connections, workers, soft, ceiling);
    let (limit, connections) = match plan.raise_to {
        Some(to) if sys::set_open_files_limit(to, hard).is_ok() => (to, plan.connections),
        Some(_) => (
            soft,
            server::connections_within(soft, workers, max_connections),
        ),
        None => (soft, plan.connections),
    };
    if connections == 0 {
        return Err(RunError::Runtime(format!(
            "the open-files limit ({limit}) leaves no room for a connection; raise it \
             (`ulimit -n {}`)",
            server::descriptors_needed(max_connections, workers)
        )));
    }
    if connections < max_connections {
        let needed = server::descriptors_needed(max_connections, workers).to_string();
        logger.event(
            LogLevel::Warn,
            "the open-files limit is too low for --max-connections; serving fewer connections \
             (raise the limit with `ulimit -n` or lower --max-connections)",
            &[
                ("max_connections", &max_connections.to_string()),
                ("serving", &connections.to_string()),
                ("open_files_limit", &limit.to_string()),
                ("needed", &needed),
            ],
        );
    }
    Ok(connections)
}

/// The most descriptors Linux lets a process have (`fs.nr_open`; its default when unreadable).
fn nr_open() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(config::MAX_CONNECTIONS as u64)
}

/// Scheme, authority and path only: a query string may carry something private.
fn upstream_for_log(uri: &http::Uri) -> String {
    format!(
        "{}://{}{}",
        uri.scheme_str().unwrap_or(""),
        uri.authority().map_or("", |a| a.as_str()),
        uri.path()
    )
}

/// The signals that stop the proxy.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

/// Waits for SIGTERM, SIGINT, SIGHUP or an authorised `GET /shutdown`; returns the grace
/// period.
async fn shutdown_requested(
    mut signals: Signals,
    mut stop_rx: watch::Receiver<Option<StopReason>>,
    grace: Duration,
    logger: Logger,
) -> Duration {
    let stopped_by = |name: &str| {
        logger.event(
            LogLevel::Info,
            &format!("{name} received; shutting down"),
            &[],
        );
        grace
    };
    tokio::select! {
        _ = signals.term.recv() => stopped_by("SIGTERM"),
        _ = signals.int.recv() => stopped_by("SIGINT"),
        _ = signals.hup.recv() => stopped_by("SIGHUP"),
        _ = stop_rx.wait_for(|r| *r == Some(StopReason::HttpShutdown)) => {
            logger.event(LogLevel::Info, "GET /shutdown received; shutting down", &[]);
            grace.min(HTTP_SHUTDOWN_GRACE)
        }
    }
}
