//! Command-line flags (clap derive) turned once into a validated [`Config`]: parse, don't
//! validate twice. No IO happens here; files named by flags are opened by their owners.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use http::Uri;

/// The default upstream.
pub const DEFAULT_UPSTREAM_URL: &str = "https://api.openai.com/v1/responses";
/// Worker threads by default (fewer when fewer CPUs are available).
pub const DEFAULT_WORKERS: usize = 2;

/// A strict, hardened loopback proxy for the OpenAI Responses API.
///
/// Reads the API key from standard input, listens on 127.0.0.1, and forwards
/// `POST /v1/responses` from clients that present the per-launch proxy token, adding
/// `Authorization: Bearer <key>`.
#[derive(Debug, Parser)]
#[command(
    name = "responses-api-proxy",
    version,
    about,
    long_about = None,
    after_help = "Durations: a number with ms, s, m or h (a bare number is seconds), at most 8760h. \
                  Sizes: a number with B, KiB, MiB or GiB (a bare number is bytes)."
)]
pub struct Args {
    /// Port to listen on (127.0.0.1); an ephemeral port when omitted.
    #[arg(long)]
    pub port: Option<u16>,

    /// Write {"port","pid","auth_token"} as one JSON line to FILE (mode 0600) once listening;
    /// removed on clean exit. Without it the proxy token is printed once to stderr.
    #[arg(long, value_name = "FILE")]
    pub server_info: Option<PathBuf>,

    /// Serve `GET /shutdown` (token required) to stop the proxy.
    #[arg(long)]
    pub http_shutdown: bool,

    /// Where requests are POSTed, query string included. https is required unless the host
    /// is loopback.
    #[arg(long, value_name = "URL", default_value = DEFAULT_UPSTREAM_URL)]
    pub upstream_url: String,

    /// PEM file of extra root certificates to trust for the upstream, on top of the bundled
    /// web PKI roots.
    #[arg(long, value_name = "PEM_FILE")]
    pub upstream_ca: Option<PathBuf>,

    /// Speak HTTP/2 to an https upstream: every request multiplexed over one pooled TLS
    /// connection per worker, through the general HTTP client. Without it, HTTP/1.1 over
    /// TLS on the proxy's own lean path: one pooled connection per request in flight, about
    /// half the CPU per request.
    #[arg(long)]
    pub upstream_http2: bool,

    /// Write each exchange as NNNNNN-<unix_ms>-request.json / -response.json in DIR
    /// (created 0700, files 0600, credentials redacted).
    #[arg(long, value_name = "DIR")]
    pub dump_dir: Option<PathBuf>,

    /// Largest body copied into one dump file; longer bodies are cut and marked.
    #[arg(long, value_name = "SIZE", default_value = "16MiB", value_parser = parse_size)]
    pub dump_max_body: u64,

    /// Most memory all dumps in progress or waiting to be written may hold together;
    /// past it bodies are cut and marked, and exchanges may go undumped.
    #[arg(long, value_name = "SIZE", default_value = "256MiB", value_parser = parse_size)]
    pub dump_max_memory: u64,

    /// Largest request body accepted (413 above it).
    #[arg(long, value_name = "SIZE", default_value = "64MiB", value_parser = parse_size)]
    pub max_request_body: u64,

    /// Largest request head (request line and headers) accepted (431 above it).
    #[arg(long, value_name = "SIZE", default_value = "64KiB", value_parser = parse_size)]
    pub max_header_size: u64,

    /// Most client connections open at once (503 above it); at most 1048576.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub max_connections: usize,

    /// Threads serving connections [default: 2, or 1 where only one CPU is available].
    /// Each runs its own event loop and keeps its own upstream connection pool, so a
    /// request never hops between threads.
    #[arg(long, value_name = "N")]
    pub worker_threads: Option<usize>,

    /// Time allowed to connect to the upstream, TLS handshake included (504 after it).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub upstream_connect_timeout: Duration,

    /// Longest wait for the next byte from the upstream, headers or body (504, or the
    /// stream is cut, after it). There is no limit on a stream's total duration.
    #[arg(long, value_name = "DURATION", default_value = "15m", value_parser = parse_duration)]
    pub upstream_idle_timeout: Duration,

    /// How long an idle pooled upstream connection is kept open. Its HTTP/TLS buffers may
    /// still hold the last request head (and so the key) until it closes.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub upstream_pool_idle_timeout: Duration,

    /// Time a client has to send a request head; also how long an idle keep-alive
    /// connection is kept open.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,

    /// Longest wait for the next byte of a request body from the client (408 after it), and
    /// for a client to read any of a response (the connection is closed after it).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub body_read_timeout: Duration,

    /// On SIGTERM/SIGINT/SIGHUP, how long in-flight requests may run before they are cut.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Access-log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Least severe log line written to stderr.
    #[arg(long, value_enum, default_value_t = LogLevel::Info)]
    pub log_level: LogLevel,
}

/// Format of the lines written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `key=value` pairs.
    Text,
    /// One JSON object per line.
    Json,
}

/// Log severity, most severe first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum LogLevel {
    /// Only failures of the proxy itself.
    Error,
    /// Also upstream failures and refused configurations.
    Warn,
    /// Also one access line per request.
    Info,
    /// Also connection-level events.
    Debug,
}

/// The validated upstream target.
#[derive(Debug, Clone)]
pub struct UpstreamTarget {
    /// The full URL requests are POSTed to.
    pub uri: Uri,
    /// Whether the scheme is https.
    pub tls: bool,
    /// Whether the host is loopback.
    pub loopback: bool,
}

/// Everything the proxy needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// Port to bind on 127.0.0.1 (0 = ephemeral).
    pub port: u16,
    /// Where to write the server-info file.
    pub server_info: Option<PathBuf>,
    /// Whether `GET /shutdown` is served.
    pub http_shutdown: bool,
    /// The upstream.
    pub upstream: UpstreamTarget,
    /// Extra roots for the upstream.
    pub upstream_ca: Option<PathBuf>,
    /// HTTP/2 (the general client) to an https upstream instead of the lean HTTP/1.1 path.
    pub upstream_http2: bool,
    /// Dump directory.
    pub dump_dir: Option<PathBuf>,
    /// Largest body copied into a dump file.
    pub dump_max_body: usize,
    /// Most memory held in dumps at a time.
    pub dump_max_memory: usize,
    /// Largest request body.
    pub max_request_body: u64,
    /// Largest request head.
    pub max_header_size: usize,
    /// Most open client connections.
    pub max_connections: usize,
    /// Threads serving connections (1..=64); `None`: the default, see [`Config::workers`].
    pub worker_threads: Option<usize>,
    /// Upstream connect (TCP + TLS) timeout.
    pub upstream_connect_timeout: Duration,
    /// Upstream idle timeout.
    pub upstream_idle_timeout: Duration,
    /// Idle pooled upstream connections are closed after this.
    pub upstream_pool_idle_timeout: Duration,
    /// Client header read (and keep-alive idle) timeout.
    pub header_read_timeout: Duration,
    /// Client body idle timeout.
    pub body_read_timeout: Duration,
    /// Shutdown grace period.
    pub shutdown_grace: Duration,
    /// Log format.
    pub log_format: LogFormat,
    /// Log level.
    pub log_level: LogLevel,
}

/// A flag value that parses but cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `--upstream-url` is not an absolute http(s) URL.
    #[error(
        "--upstream-url must be an absolute http:// or https:// URL with a host (got an unparsable value)"
    )]
    UpstreamUnparsable,
    /// Scheme other than http/https.
    #[error("--upstream-url must use https (or http for a loopback host)")]
    UpstreamScheme,
    /// `http` to a non-loopback host.
    #[error(
        "--upstream-url uses plain http for a host that is not loopback; use https (http is allowed only for 127.0.0.0/8, ::1 and localhost)"
    )]
    UpstreamPlainHttp,
    /// user:password@ in the URL.
    #[error(
        "--upstream-url must not contain user info (user:password@); the proxy adds the credentials itself"
    )]
    UpstreamUserInfo,
    /// A fragment (`#...`).
    #[error("--upstream-url must not contain a fragment (#...)")]
    UpstreamFragment,
    /// A zero limit.
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    /// A limit outside what the HTTP layer accepts.
    #[error("{0}")]
    OutOfRange(&'static str),
    /// `--upstream-http2` with a plain-http upstream.
    #[error(
        "--upstream-http2 applies to https upstreams only; drop it for an http:// (loopback) upstream"
    )]
    Http2WithoutTls,
}

/// Whether `host` (as written in a URI authority) is loopback.
pub fn is_loopback_host(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner.parse::<Ipv6Addr>().is_ok_and(|a| a.is_loopback());
    }
    host.parse::<Ipv4Addr>().is_ok_and(|a| a.is_loopback())
}

/// Validates `--upstream-url`.
pub fn parse_upstream(url: &str) -> Result<UpstreamTarget, ConfigError> {
    if url.contains('#') {
        return Err(ConfigError::UpstreamFragment);
    }
    let uri: Uri = url.parse().map_err(|_| ConfigError::UpstreamUnparsable)?;
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return Err(ConfigError::UpstreamUnparsable);
    };
    if authority.as_str().contains('@') {
        return Err(ConfigError::UpstreamUserInfo);
    }
    if authority.host().is_empty() {
        return Err(ConfigError::UpstreamUnparsable);
    }
    let loopback = is_loopback_host(authority.host());
    let tls = match scheme {
        "https" => true,
        "http" if loopback => false,
        "http" => return Err(ConfigError::UpstreamPlainHttp),
        _ => return Err(ConfigError::UpstreamScheme),
    };
    Ok(UpstreamTarget { uri, tls, loopback })
}

/// Parses a duration: a number with a unit `ms`, `s`, `m` or `h` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration: use e.g. 500ms, 30s, 15m or 1h"))?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(format!("`{s}` has an unknown unit: use ms, s, m or h")),
    };
    // Every wait is a deadline of now plus the duration: an absurd one would not be
    // representable (each connection would fail on its first wait), and none is useful.
    if d > MAX_DURATION {
        return Err(format!("`{s}` is longer than a year: use at most 8760h"));
    }
    Ok(d)
}

/// The most connections `--max-connections` allows: Linux's default limit on the file
/// descriptors of one process (`fs.nr_open`).
pub const MAX_CONNECTIONS: usize = 1 << 20;

/// The longest duration a flag takes: a year.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Parses a size: a number with an optional unit `B`, `KiB`/`K`, `MiB`/`M`, `GiB`/`G`
/// (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size: use e.g. 65536, 64KiB or 16MiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        _ => return Err(format!("`{s}` has an unknown unit: use B, KiB, MiB or GiB")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

impl Config {
    /// Worker threads to start on a machine that lets the process use `cpus` CPUs:
    /// `--worker-threads` when given; otherwise 2, or 1 on a single CPU (where a second
    /// event loop could never run beside the first and would only add context switches).
    pub fn workers(&self, cpus: usize) -> usize {
        self.worker_threads
            .unwrap_or(cpus.clamp(1, DEFAULT_WORKERS))
    }

    /// Validates parsed flags.
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        let upstream = parse_upstream(&args.upstream_url)?;
        let nonzero = |d: Duration, flag: &'static str| {
            if d.is_zero() {
                Err(ConfigError::Zero(flag))
            } else {
                Ok(d)
            }
        };
        if args.max_connections == 0 {
            return Err(ConfigError::Zero("--max-connections"));
        }
        // Each connection holds descriptors (two); Linux allows a process at most
        // `fs.nr_open` of them, 1048576 unless raised. (Far larger values also overflow
        // the connection cap's semaphore.)
        if args.max_connections > MAX_CONNECTIONS {
            return Err(ConfigError::OutOfRange(
                "--max-connections must be at most 1048576 (each connection holds file descriptors)",
            ));
        }
        if args.worker_threads.is_some_and(|n| !(1..=64).contains(&n)) {
            return Err(ConfigError::OutOfRange(
                "--worker-threads must be between 1 and 64",
            ));
        }
        if args.upstream_http2 && !upstream.tls {
            return Err(ConfigError::Http2WithoutTls);
        }
        if args.max_request_body == 0 {
            return Err(ConfigError::Zero("--max-request-body"));
        }
        // hyper needs room for at least a minimal head and refuses buffers under 8 KiB.
        if !(1024..=(16 << 20)).contains(&args.max_header_size) {
            return Err(ConfigError::OutOfRange(
                "--max-header-size must be between 1KiB and 16MiB",
            ));
        }
        // Room for at least a head and a first piece of body.
        if args.dump_max_memory < 64 << 10 {
            return Err(ConfigError::OutOfRange(
                "--dump-max-memory must be at least 64KiB",
            ));
        }
        Ok(Self {
            port: args.port.unwrap_or(0),
            server_info: args.server_info,
            http_shutdown: args.http_shutdown,
            upstream,
            upstream_ca: args.upstream_ca,
            upstream_http2: args.upstream_http2,
            dump_dir: args.dump_dir,
            dump_max_body: usize::try_from(args.dump_max_body).unwrap_or(usize::MAX),
            dump_max_memory: usize::try_from(args.dump_max_memory).unwrap_or(usize::MAX),
            max_request_body: args.max_request_body,
            max_header_size: args.max_header_size as usize,
            max_connections: args.max_connections,
            worker_threads: args.worker_threads,
            upstream_connect_timeout: nonzero(
                args.upstream_connect_timeout,
                "--upstream-connect-timeout",
            )?,
            upstream_idle_timeout: nonzero(args.upstream_idle_timeout, "--upstream-idle-timeout")?,
            upstream_pool_idle_timeout: nonzero(
                args.upstream_pool_idle_timeout,
                "--upstream-pool-idle-timeout",
            )?,
            header_read_timeout: nonzero(args.header_read_timeout, "--header-read-timeout")?,
            body_read_timeout: nonzero(args.body_read_timeout, "--body-read-timeout")?,
            shutdown_grace: args.shutdown_grace,
            log_format: args.log_format,
            log_level: args.log_level,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls() {
        use ConfigError::*;
        let ok: &[(&str, bool, bool)] = &[
            ("https://api.openai.com/v1/responses", true, false),
            (
                "https://x.openai.azure.com/openai/responses?api-version=2025-04-01-preview",
                true,
                false,
            ),
            ("http://127.0.0.1:8080/v1/responses", false, true),
            ("http://127.9.9.9/v1/responses", false, true),
            ("http://localhost:1/v1/responses", false, true),
            ("http://LOCALHOST:1/x", false, true),
            ("http://[::1]:9/v1/responses", false, true),
            ("https://127.0.0.1:9/v1/responses", true, true),
        ];
        for (url, tls, loopback) in ok {
            let t = parse_upstream(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!((t.tls, t.loopback), (*tls, *loopback), "{url}");
            assert_eq!(t.uri.to_string(), *url);
        }
        let bad: &[(&str, ConfigError)] = &[
            ("http://api.openai.com/v1/responses", UpstreamPlainHttp),
            ("http://128.0.0.1/v1/responses", UpstreamPlainHttp),
            ("http://localhost.evil.com/v1", UpstreamPlainHttp),
            ("http://[::2]/v1", UpstreamPlainHttp),
            ("http://0.0.0.0/v1", UpstreamPlainHttp),
            ("ftp://127.0.0.1/v1", UpstreamScheme),
            (
                "https://user:pw@api.openai.com/v1/responses",
                UpstreamUserInfo,
            ),
            ("http://user@127.0.0.1/v1", UpstreamUserInfo),
            ("/v1/responses", UpstreamUnparsable),
            ("api.openai.com/v1/responses", UpstreamUnparsable),
            ("not a url", UpstreamUnparsable),
            ("", UpstreamUnparsable),
            ("https://api.openai.com/v1/responses#frag", UpstreamFragment),
        ];
        for (url, want) in bad {
            assert_eq!(parse_upstream(url).err().as_ref(), Some(want), "{url}");
        }
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("1d").is_err());
        assert!(parse_duration("1.5s").is_err());
        assert_eq!(parse_duration("8760h"), Ok(MAX_DURATION));
        for too_long in ["8761h", "525601m", "31536001s", "18446744073709551615s"] {
            let err = parse_duration(too_long).expect_err(too_long);
            assert!(err.contains("at most 8760h"), "{too_long}: {err}");
        }
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("16M"), Ok(16 << 20));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("100"), Ok(100));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(parse_size("1TiB").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }

    #[test]
    fn config_validation() {
        let args = |extra: &[&str]| {
            let mut v = vec!["responses-api-proxy"];
            v.extend_from_slice(extra);
            Args::try_parse_from(v).expect("parses")
        };
        let c = Config::from_args(args(&[])).expect("defaults are valid");
        assert_eq!(c.port, 0);
        assert_eq!(c.max_request_body, 64 << 20);
        assert_eq!(c.upstream_idle_timeout, Duration::from_secs(900));
        assert_eq!(c.upstream.uri, DEFAULT_UPSTREAM_URL);
        assert_eq!(
            Config::from_args(args(&["--max-connections", "0"])).err(),
            Some(ConfigError::Zero("--max-connections"))
        );
        for bad in ["1048577", "2305843009213693952", "18446744073709551615"] {
            assert!(matches!(
                Config::from_args(args(&["--max-connections", bad])),
                Err(ConfigError::OutOfRange(_))
            ));
        }
        assert_eq!(
            Config::from_args(args(&["--max-connections", "1048576"]))
                .map(|c| c.max_connections)
                .ok(),
            Some(MAX_CONNECTIONS)
        );
        assert_eq!(
            Config::from_args(args(&["--upstream-idle-timeout", "0s"])).err(),
            Some(ConfigError::Zero("--upstream-idle-timeout"))
        );
        assert!(Config::from_args(args(&["--max-header-size", "10"])).is_err());
        assert_eq!(c.dump_max_memory, 256 << 20);
        assert!(Config::from_args(args(&["--dump-max-memory", "65535"])).is_err());
        assert_eq!(
            Config::from_args(args(&["--dump-max-memory", "64KiB"]))
                .map(|c| c.dump_max_memory)
                .ok(),
            Some(64 << 10)
        );
        assert_eq!(c.worker_threads, None);
        assert_eq!(c.workers(2), 2);
        assert_eq!(c.workers(1), 1, "one CPU: one event loop");
        assert_eq!(c.workers(16), 2);
        assert_eq!(c.workers(0), 1);
        for bad in ["0", "65"] {
            assert!(matches!(
                Config::from_args(args(&["--worker-threads", bad])),
                Err(ConfigError::OutOfRange(_))
            ));
        }
        assert_eq!(
            Config::from_args(args(&["--worker-threads", "1"]))
                .map(|c| c.workers(8))
                .ok(),
            Some(1)
        );
        assert_eq!(
            Config::from_args(args(&["--worker-threads", "5"]))
                .map(|c| c.workers(1))
                .ok(),
            Some(5),
            "an explicit count is kept"
        );
        assert!(!c.upstream_http2, "HTTP/1.1 is the default");
        assert_eq!(
            Config::from_args(args(&["--upstream-http2"]))
                .map(|c| c.upstream_http2)
                .ok(),
            Some(true)
        );
        assert_eq!(
            Config::from_args(args(&[
                "--upstream-http2",
                "--upstream-url",
                "http://127.0.0.1:9/v1/responses"
            ]))
            .err(),
            Some(ConfigError::Http2WithoutTls)
        );
        assert!(Args::try_parse_from(["x", "--port", "70000"]).is_err());
        assert!(Args::try_parse_from(["x", "--log-format", "xml"]).is_err());
        assert!(Args::try_parse_from(["x", "--bogus"]).is_err());
    }
}
