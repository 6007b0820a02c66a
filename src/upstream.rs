//! The client side, for the one upstream origin: the lean HTTP/1.1 path of
//! `upstream_h1.rs` (plain http to a loopback host, or over TLS: the default for https), or
//! with `--upstream-http2` one pooled hyper client speaking HTTP/2. Both use rustls with the
//! bundled web PKI roots (plus `--upstream-ca`), a connect timeout that covers the TLS
//! handshake, no redirects and no ambient `HTTP(S)_PROXY`.
//!
//! It knows nothing about clients: it is handed a finished request and returns the
//! upstream's response or a classified error.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Method, Uri, Version};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};

use crate::body::{GatheredBody, UpstreamRequestBody};
use crate::config::UpstreamTarget;
use crate::fields::Fields;
use crate::headers;
use crate::upstream_h1::{H1Body, H1Failure, H1Pool, H1Tls};

/// Why the upstream client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamSetupError {
    /// The `--upstream-ca` file could not be read or parsed.
    #[error("cannot use --upstream-ca {path}: {reason}")]
    Ca {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The TLS configuration was refused by rustls.
    #[error("cannot set up TLS for the upstream: {0}")]
    Tls(rustls::Error),
    /// The host cannot be a TLS server name.
    #[error("--upstream-url host `{0}` is not a valid TLS server name")]
    Name(String),
}

/// The connect timeout elapsed (TCP connect plus TLS handshake).
#[derive(Debug)]
pub struct ConnectTimeout;

impl fmt::Display for ConnectTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("timed out connecting to the upstream")
    }
}

impl StdError for ConnectTimeout {}

/// Wraps a connector so that the whole connect (including TLS) has one deadline.
#[derive(Clone)]
pub struct TimeoutConnector<C> {
    inner: C,
    timeout: Duration,
}

type BoxError = Box<dyn StdError + Send + Sync>;

impl<C> tower_service::Service<Uri> for TimeoutConnector<C>
where
    C: tower_service::Service<Uri> + Send + 'static,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
    C::Response: Send + 'static,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let fut = self.inner.call(dst);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, fut).await {
                Ok(r) => r.map_err(Into::into),
                Err(_) => Err(Box::new(ConnectTimeout) as BoxError),
            }
        })
    }
}

/// The connector stack.
pub type Connector = TimeoutConnector<HttpsConnector<HttpConnector>>;

/// How requests reach the upstream.
#[derive(Clone)]
enum Transport {
    /// `--upstream-http2`: the general pooled client (HTTP/2 over TLS).
    Pooled(Box<Pooled>),
    /// The lean HTTP/1.1 path, plain or over TLS.
    H1(Arc<H1Pool>),
}

/// The general client and the connector it was built with.
#[derive(Clone)]
struct Pooled {
    client: Client<Connector, GatheredBody>,
    connector: Connector,
}

/// The upstream client (one per worker thread) and its one target.
#[derive(Clone)]
pub struct Upstream {
    transport: Transport,
    connect_timeout: Duration,
    pool_idle_timeout: Duration,
    uri: Uri,
}

/// Why an upstream request failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// From the general pooled client.
    #[error(transparent)]
    Pooled(#[from] hyper_util::client::legacy::Error),
    /// From the lean HTTP/1.1 path.
    #[error(transparent)]
    H1(#[from] H1Failure),
}

/// The upstream's answer: its status, its header fields as sent, its body streaming.
pub struct UpstreamResponse {
    /// The status.
    pub status: http::StatusCode,
    /// The header fields.
    pub fields: Fields,
    /// The body.
    pub body: UpstreamBody,
}

/// The upstream's response body, from either transport.
pub enum UpstreamBody {
    /// From the general pooled client.
    Pooled(hyper::body::Incoming),
    /// From the lean HTTP/1.1 path.
    H1(H1Body),
}

impl http_body::Body for UpstreamBody {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::Pooled(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            UpstreamBody::H1(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Pooled(b) => b.is_end_stream(),
            UpstreamBody::H1(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            UpstreamBody::Pooled(b) => b.size_hint(),
            UpstreamBody::H1(b) => b.size_hint(),
        }
    }
}

/// How an upstream request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// Could not connect in time.
    ConnectTimeout,
    /// Anything else: refused, reset, TLS, malformed answer.
    Unavailable,
}

/// Reads the `--upstream-ca` file, refusing one that another user could have written: its
/// certificates decide who may receive the key. The file (a link to it included) must be
/// this user's or root's and writable neither by others nor by a group not this user's
/// own, and so must the directories on the way to it (`paths`). The bytes are read from
/// the file that was judged.
fn read_trusted(path: &Path) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
    let me = crate::paths::Me::now();
    let refuse = |c: crate::paths::Changeable| {
        format!(
            "{c}; its certificates decide who may receive the key, so it must be a file that \
             only you or root can change, in directories only you or root can change"
        )
    };
    let refuse_way = |e: crate::paths::WayError| match e {
        crate::paths::WayError::Changeable(c) => refuse(c),
        other => other.to_string(),
    };
    if let Ok(l) = std::fs::symlink_metadata(path)
        && l.file_type().is_symlink()
    {
        crate::paths::judge_link(path, l.uid(), me).map_err(refuse)?;
    }
    crate::paths::check_the_way(&crate::paths::parent_dir(path), me).map_err(refuse_way)?;
    let real = match std::fs::canonicalize(path) {
        Ok(real) => {
            crate::paths::check_the_way(&crate::paths::parent_dir(&real), me)
                .map_err(refuse_way)?;
            real
        }
        // A pipe the operator's shell made (`--upstream-ca <(…)`, `/dev/fd/63`) names no
        // file to resolve; its way was checked above and the pipe itself is judged below.
        Err(_) if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo()) => {
            path.to_path_buf()
        }
        Err(e) => {
            return Err(format!(
                "cannot resolve the path ({e}); give the path of a regular file"
            ));
        }
    };
    // Opened without waiting: a named pipe no one writes to would otherwise hold the
    // start-up for ever (a regular file is read the same either way).
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&real)
        .map_err(|e| e.to_string())?;
    let m = file.metadata().map_err(|e| e.to_string())?;
    let acl = crate::sys::fd_has_extended_acl(std::os::fd::AsFd::as_fd(&file))
        .map_err(|e| format!("reading its access ACL: {e}"))?;
    crate::paths::judge_file(&real, crate::paths::Facts::of(&m, acl), me).map_err(refuse)?;
    read_bounded(&file, !m.file_type().is_file(), CA_PIPE_WAIT)
}

/// The most `--upstream-ca` may hold (a pipe or a device could go on for ever).
const MAX_CA_FILE: u64 = 16 << 20;
/// The longest a pipe given as `--upstream-ca` may take to deliver its certificates and end.
const CA_PIPE_WAIT: Duration = Duration::from_secs(10);

/// Reads `file` (opened non-blocking) to its end: at most `MAX_CA_FILE` bytes and, unless it
/// is a regular file (`pipe`: a pipe, or anything else that can keep a reader waiting),
/// within `wait` all told, since a pipe's writer may be late, slow, or missing.
fn read_bounded(file: &std::fs::File, pipe: bool, wait: Duration) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let deadline = std::time::Instant::now() + wait;
    let mut pem = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    // Bounded: each round reads bytes (at most MAX_CA_FILE + 1 in all), reaches the end, or
    // waits for the pipe, which ends at the deadline.
    loop {
        if pipe {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let ready = !left.is_zero()
                && crate::sys::wait_readable(std::os::fd::AsFd::as_fd(file), left)
                    .map_err(|e| e.to_string())?;
            if !ready {
                return Err(format!(
                    "the pipe did not deliver its certificates and end within {wait:?} (no writer, or \
                     one that did not finish); give a file of PEM certificates, or a pipe whose \
                     writer writes them and closes it"
                ));
            }
        }
        match (&*file).read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                pem.extend_from_slice(&chunk[..n]);
                if pem.len() as u64 > MAX_CA_FILE {
                    return Err(format!(
                        "larger than {} MiB; give a file of PEM certificates (a system bundle is well under 1 MiB)",
                        MAX_CA_FILE >> 20
                    ));
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                ) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(pem)
}

fn load_roots(ca: Option<&Path>) -> Result<RootCertStore, UpstreamSetupError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca {
        let ca_err = |reason: String| UpstreamSetupError::Ca {
            path: path.to_path_buf(),
            reason,
        };
        let pem = read_trusted(path).map_err(ca_err)?;
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| ca_err(format!("not a PEM certificate file ({e})")))?;
            roots
                .add(cert)
                .map_err(|e| ca_err(format!("unusable certificate ({e})")))?;
            added += 1;
        }
        if added == 0 {
            return Err(ca_err(
                "no PEM certificate (-----BEGIN CERTIFICATE-----) found".into(),
            ));
        }
    }
    Ok(roots)
}

impl Upstream {
    /// Builds the client. Reads `ca` if given.
    pub fn new(
        target: &UpstreamTarget,
        ca: Option<&Path>,
        http2: bool,
        connect_timeout: Duration,
        pool_idle_timeout: Duration,
    ) -> Result<Self, UpstreamSetupError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(UpstreamSetupError::Tls)?
            .with_root_certificates(load_roots(ca)?)
            .with_no_client_auth();
        if !(target.tls && http2) {
            let h1_tls = if target.tls {
                let mut tls = tls;
                tls.alpn_protocols = vec![b"http/1.1".to_vec()];
                let host = target
                    .uri
                    .host()
                    .unwrap_or("")
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                let name = ServerName::try_from(host.to_string())
                    .map_err(|_| UpstreamSetupError::Name(host.to_string()))?;
                Some(H1Tls::new(Arc::new(tls), name))
            } else {
                None
            };
            return Ok(Self {
                transport: Transport::H1(Arc::new(H1Pool::new(
                    &target.uri,
                    h1_tls,
                    connect_timeout,
                    pool_idle_timeout,
                ))),
                connect_timeout,
                pool_idle_timeout,
                uri: target.uri.clone(),
            });
        }
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        // ALPN offers h2 first and http/1.1 for an upstream without HTTP/2.
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_all_versions()
            .wrap_connector(http);
        let connector = TimeoutConnector {
            inner: https,
            timeout: connect_timeout,
        };
        Ok(Self {
            transport: Transport::Pooled(Box::new(Pooled {
                client: build_client(connector.clone(), pool_idle_timeout),
                connector,
            })),
            connect_timeout,
            pool_idle_timeout,
            uri: target.uri.clone(),
        })
    }

    /// The same client with a pool of its own (TLS configuration and roots are shared),
    /// for a worker thread: its upstream connections are driven on that thread only.
    pub fn with_own_pool(&self) -> Self {
        let transport = match &self.transport {
            Transport::Pooled(p) => Transport::Pooled(Box::new(Pooled {
                client: build_client(p.connector.clone(), self.pool_idle_timeout),
                connector: p.connector.clone(),
            })),
            Transport::H1(pool) => Transport::H1(Arc::new(H1Pool::new(
                &self.uri,
                pool.tls().cloned(),
                self.connect_timeout,
                self.pool_idle_timeout,
            ))),
        };
        Self {
            transport,
            ..self.clone()
        }
    }

    /// The URL requests go to.
    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// Sends one POST to [`Upstream::uri`]: the client's fields as rewriting lets them
    /// through (see [`crate::headers`]), `authorization` set to the operator's key, `body`.
    pub async fn request(
        &self,
        fields: Fields,
        authorization: HeaderValue,
        body: UpstreamRequestBody,
    ) -> Result<UpstreamResponse, UpstreamError> {
        match &self.transport {
            Transport::Pooled(p) => {
                let mut req = http::Request::new(GatheredBody::new(body));
                *req.method_mut() = Method::POST;
                *req.uri_mut() = self.uri.clone();
                *req.version_mut() = Version::HTTP_11;
                *req.headers_mut() = headers::to_upstream(&fields, authorization);
                drop(fields);
                let (parts, body) = p.client.request(req).await?.into_parts();
                Ok(UpstreamResponse {
                    status: parts.status,
                    fields: Fields::from_header_map(&parts.headers),
                    body: UpstreamBody::Pooled(body),
                })
            }
            Transport::H1(pool) => {
                // Pinned where it is made (awaited by value, it is copied once more).
                let (status, fields, body) =
                    std::pin::pin!(pool.send(fields, authorization, body)).await?;
                Ok(UpstreamResponse {
                    status,
                    fields,
                    body: UpstreamBody::H1(body),
                })
            }
        }
    }
}

fn build_client(
    connector: Connector,
    pool_idle_timeout: Duration,
) -> Client<Connector, GatheredBody> {
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(pool_idle_timeout)
        // h2 closes a connection after this many streams reset by our side; clients that
        // hang up mid-stream cancel theirs, and a long-lived connection must not be torn
        // down (failing every request on it) because of that.
        .http2_max_local_error_reset_streams(Some(1 << 16))
        .build(connector)
}

/// Classifies a client error, for the status and the log.
pub fn classify(err: &UpstreamError) -> UpstreamFailure {
    if let UpstreamError::H1(H1Failure::ConnectTimeout) = err {
        return UpstreamFailure::ConnectTimeout;
    }
    let mut source: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = source {
        if e.is::<ConnectTimeout>() {
            return UpstreamFailure::ConnectTimeout;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            return UpstreamFailure::ConnectTimeout;
        }
        source = e.source();
    }
    UpstreamFailure::Unavailable
}

/// The error and its causes on one line, for the log. hyper, rustls and io errors carry no
/// header values, so this never contains the key.
pub fn describe(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let s = e.to_string();
        if !out.ends_with(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        source = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn reader(r: std::io::PipeReader) -> std::fs::File {
        std::fs::File::from(std::os::fd::OwnedFd::from(r))
    }

    #[test]
    fn a_pipe_is_read_to_its_end() {
        let (r, mut w) = std::io::pipe().expect("pipe");
        let writer = std::thread::spawn(move || {
            w.write_all(b"-----BEGIN CERTIFICATE-----\n")
                .expect("write");
        });
        let got = read_bounded(&reader(r), true, Duration::from_secs(10)).expect("read");
        writer.join().expect("writer");
        assert_eq!(got, b"-----BEGIN CERTIFICATE-----\n");
    }

    #[test]
    fn a_pipe_that_does_not_end_in_time_is_refused_with_what_to_do() {
        let (r, mut w) = std::io::pipe().expect("pipe");
        // Some bytes, then a writer that neither writes more nor closes.
        w.write_all(b"-----BEGIN").expect("write");
        let started = std::time::Instant::now();
        let err =
            read_bounded(&reader(r), true, Duration::from_millis(200)).expect_err("timed out");
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(
            err.contains("within 200ms") && err.contains("closes it"),
            "{err}"
        );
        drop(w);
    }

    #[test]
    fn a_regular_file_is_read_without_waiting_and_bounded() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, b"pem").expect("write");
        let file = std::fs::File::open(&path).expect("open");
        // A zero wait: a regular file is never waited for.
        assert_eq!(
            read_bounded(&file, false, Duration::ZERO).expect("read"),
            b"pem"
        );
        std::fs::write(&path, vec![b'x'; MAX_CA_FILE as usize + 1]).expect("write");
        let file = std::fs::File::open(&path).expect("open");
        let err = read_bounded(&file, false, Duration::ZERO).expect_err("too large");
        assert!(err.contains("larger than 16 MiB"), "{err}");
    }
}
