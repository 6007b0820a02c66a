//! Test harness: a scriptable mock upstream (plain HTTP, or HTTPS with a CA generated here),
//! raw-socket upstreams that misbehave, the real proxy binary run as a child process, and a
//! small HTTP client. Every wait is bounded by a deadline; nothing sleeps for readiness.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};

/// Whether the tests run as root (CI does; some tests switch to the user nobody).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// The fake key used by every test.
pub const KEY: &str = "sk-test-0123456789abcdefghijklmnopqrstuvwxyzABCDEF";

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_responses-api-proxy")
}

/// Polls `f` every 5 ms until it returns `Some`, or panics after `limit`.
pub fn poll_until<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Async variant of [`poll_until`].
pub async fn poll_until_async<T>(
    limit: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Mock upstream
// ---------------------------------------------------------------------------------------

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub target: String,
    pub version: http::Version,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn all(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    }
}

/// One step of a scripted response body.
#[derive(Clone)]
pub enum Step {
    /// Send these bytes as one frame.
    Data(Bytes),
    /// Wait until the test calls `notify_one` on this.
    Wait(Arc<Notify>),
    /// Wait this long.
    Sleep(Duration),
    /// Break the stream (the connection is reset / the h2 stream aborted).
    Abort,
}

/// A scripted reply.
#[derive(Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub steps: Vec<Step>,
    /// Wait this long before sending the head.
    pub head_delay: Duration,
    /// Never send the head.
    pub hang: bool,
}

impl Reply {
    pub fn json(status: u16, body: &str) -> Self {
        Self {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            steps: vec![Step::Data(Bytes::copy_from_slice(body.as_bytes()))],
            head_delay: Duration::ZERO,
            hang: false,
        }
    }

    /// An upstream that takes the request and never answers.
    pub fn hanging() -> Self {
        Self {
            hang: true,
            ..Self::json(200, "{}")
        }
    }

    pub fn sse(steps: Vec<Step>) -> Self {
        Self {
            status: 200,
            headers: vec![("content-type".into(), "text/event-stream".into())],
            steps,
            head_delay: Duration::ZERO,
            hang: false,
        }
    }

    pub fn header(mut self, n: &str, v: &str) -> Self {
        self.headers.push((n.into(), v.into()));
        self
    }
}

type Handler = Arc<dyn Fn(&Recorded) -> Reply + Send + Sync>;

/// What the mock saw and did.
#[derive(Default)]
pub struct MockState {
    pub requests: Mutex<Vec<Recorded>>,
    /// Response bodies dropped before their script finished (the proxy went away).
    pub cancelled: Mutex<Vec<Instant>>,
    /// Response bodies sent to their end (the end of stream included).
    pub finished: Mutex<usize>,
    pub connections: Mutex<usize>,
    /// Requests whose body broke off before the end.
    pub incomplete: Mutex<usize>,
}

pub struct MockUpstream {
    pub addr: SocketAddr,
    pub state: Arc<MockState>,
    /// PEM of the CA that signed the server's certificate (HTTPS mocks only).
    pub ca_pem: Option<String>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MockUpstream {
    pub fn url(&self) -> String {
        let scheme = if self.ca_pem.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}/v1/responses", self.addr.port())
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().expect("lock").clone()
    }

    pub fn count(&self) -> usize {
        self.state.requests.lock().expect("lock").len()
    }

    pub async fn plain(handler: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) -> Self {
        Self::start(Arc::new(handler), None).await
    }

    pub async fn tls(handler: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) -> Self {
        let tls = TestTls::new();
        Self::start(Arc::new(handler), Some(tls)).await
    }

    pub async fn tls_with(
        tls: TestTls,
        handler: impl Fn(&Recorded) -> Reply + Send + Sync + 'static,
    ) -> Self {
        Self::start(Arc::new(handler), Some(tls)).await
    }

    async fn start(handler: Handler, tls: Option<TestTls>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind mock");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(MockState::default());
        let ca_pem = tls.as_ref().map(|t| t.ca_pem.clone());
        let acceptor = tls.map(|t| t.acceptor());
        let st = Arc::clone(&state);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                *st.connections.lock().expect("lock") += 1;
                let handler = Arc::clone(&handler);
                let st = Arc::clone(&st);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let handler = Arc::clone(&handler);
                        let st = Arc::clone(&st);
                        async move { Ok::<_, Infallible>(serve_one(req, handler, st).await) }
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    match acceptor {
                        Some(acc) => {
                            if let Ok(tls) = acc.accept(stream).await {
                                let _ = builder
                                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                                    .await;
                            }
                        }
                        None => {
                            let _ = builder
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                                .await;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            state,
            ca_pem,
            task,
        }
    }
}

async fn serve_one(
    req: Request<hyper::body::Incoming>,
    handler: Handler,
    st: Arc<MockState>,
) -> Response<ScriptBody> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes().to_vec(),
        Err(_) => {
            // The proxy aborted the request body: never a whole request.
            *st.incomplete.lock().expect("lock") += 1;
            return Response::new(ScriptBody {
                rx: mpsc::channel(1).1,
                done: true,
                st,
            });
        }
    };
    let rec = Recorded {
        method: parts.method.to_string(),
        target: parts.uri.to_string(),
        version: parts.version,
        headers: parts.headers,
        body,
    };
    let reply = handler(&rec);
    st.requests.lock().expect("lock").push(rec);
    if reply.hang {
        std::future::pending::<()>().await;
    }
    if !reply.head_delay.is_zero() {
        tokio::time::sleep(reply.head_delay).await;
    }
    let (tx, rx) = mpsc::channel(1);
    let steps = reply.steps.clone();
    tokio::spawn(async move {
        for step in steps {
            match step {
                Step::Data(b) => {
                    if tx.send(Ok(Frame::data(b))).await.is_err() {
                        return;
                    }
                }
                Step::Wait(n) => n.notified().await,
                Step::Sleep(d) => tokio::time::sleep(d).await,
                Step::Abort => {
                    let _ = tx.send(Err(std::io::Error::other("scripted abort"))).await;
                    return;
                }
            }
        }
    });
    let mut resp = Response::new(ScriptBody {
        rx,
        done: false,
        st,
    });
    *resp.status_mut() = StatusCode::from_u16(reply.status).expect("status");
    for (n, v) in reply.headers {
        resp.headers_mut().append(
            http::HeaderName::from_bytes(n.as_bytes()).expect("name"),
            http::HeaderValue::from_str(&v).expect("value"),
        );
    }
    resp
}

/// A response body fed by the script task; records when it is dropped unfinished.
pub struct ScriptBody {
    rx: mpsc::Receiver<Result<Frame<Bytes>, std::io::Error>>,
    done: bool,
    st: Arc<MockState>,
}

impl Body for ScriptBody {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let r = self.rx.poll_recv(cx);
        if let Poll::Ready(None) = r
            && !self.done
        {
            self.done = true;
            *self.st.finished.lock().expect("lock") += 1;
        }
        r
    }
}

impl Drop for ScriptBody {
    fn drop(&mut self) {
        if !self.done {
            self.st.cancelled.lock().expect("lock").push(Instant::now());
        }
    }
}

/// A CA and a server certificate for 127.0.0.1 / localhost, generated per test.
pub struct TestTls {
    pub ca_pem: String,
    cert: rustls_pki_types::CertificateDer<'static>,
    key: rustls_pki_types::PrivateKeyDer<'static>,
    /// ALPN protocols the server offers, in its order of preference.
    alpn: Vec<Vec<u8>>,
}

impl TestTls {
    pub fn new() -> Self {
        Self::for_names(&["localhost", "127.0.0.1"])
    }

    pub fn for_names(names: &[&str]) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().expect("ca key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "responses-api-proxy test CA");
        let ca = ca_params.self_signed(&ca_key).expect("ca");
        let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
        let leaf_key = KeyPair::generate().expect("leaf key");
        let leaf_params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("leaf params");
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).expect("leaf");
        Self {
            ca_pem: ca.pem(),
            cert: leaf.der().clone(),
            key: rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
            alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        }
    }

    /// The same, but the server offers only `http/1.1` (as servers without HTTP/2 do).
    pub fn only_http1(mut self) -> Self {
        self.alpn = vec![b"http/1.1".to_vec()];
        self
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![self.cert.clone()], self.key.clone_key())
            .expect("server config");
        cfg.alpn_protocols = self.alpn.clone();
        tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
    }
}

/// A raw upstream: runs `f` on every accepted connection.
pub async fn raw_upstream<F, Fut>(f: F) -> (SocketAddr, tokio::task::JoinHandle<()>)
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind raw");
    let addr = listener.local_addr().expect("addr");
    let f = Arc::new(f);
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(f(s));
        }
    });
    (addr, task)
}

/// A connection a raw upstream speaks on: plain TCP or TLS.
pub trait RawIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> RawIo for T {}

/// A raw upstream over TCP, or over TLS with `tls` (a failed handshake is dropped): runs
/// `f` on every connection.
pub async fn raw_upstream_io<F, Fut>(
    tls: Option<tokio_rustls::TlsAcceptor>,
    f: F,
) -> (SocketAddr, tokio::task::JoinHandle<()>)
where
    F: Fn(Box<dyn RawIo>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let f = Arc::new(f);
    raw_upstream(move |s| {
        let (f, tls) = (Arc::clone(&f), tls.clone());
        async move {
            match tls {
                None => f(Box::new(s)).await,
                Some(acceptor) => {
                    if let Ok(s) = acceptor.accept(s).await {
                        f(Box::new(s)).await;
                    }
                }
            }
        }
    })
    .await
}

/// One IPv4 TCP socket of this machine, as `/proc/net/tcp` shows it: the kernel's view,
/// which tests use to order their steps against what a peer has done (read the bytes sent
/// to it; received a close) without sleeping.
#[derive(Debug, Clone, Copy)]
pub struct TcpRow {
    pub local_port: u16,
    pub remote_port: u16,
    /// The TCP state as the kernel numbers it (`08`: `CLOSE_WAIT`, the peer has closed).
    pub state: u8,
    /// Bytes received and not yet read by the socket's owner.
    pub unread: u64,
}

pub const CLOSE_WAIT: u8 = 0x08;

/// The IPv4 TCP sockets of this machine (`/proc/net/tcp`).
pub fn tcp_sockets() -> Vec<TcpRow> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let port = |addr: &str| {
        addr.rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            Some(TcpRow {
                local_port: port(cols.get(1)?)?,
                remote_port: port(cols.get(2)?)?,
                state: u8::from_str_radix(cols.get(3)?, 16).ok()?,
                unread: u64::from_str_radix(cols.get(4)?.split(':').nth(1)?, 16).ok()?,
            })
        })
        .collect()
}

/// An address on which nothing listens.
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

// ---------------------------------------------------------------------------------------
// The proxy binary
// ---------------------------------------------------------------------------------------

pub struct ProxyProc {
    pub child: Child,
    pub port: u16,
    pub token: String,
    pub dir: tempfile::TempDir,
    pub info_path: PathBuf,
    pub stderr: Arc<Mutex<Vec<u8>>>,
    /// Set once all of stderr has been read (the proxy has exited).
    pub stderr_ended: Arc<std::sync::atomic::AtomicBool>,
}

/// Starts the proxy with `args`, the test key on stdin, and a server-info file in a fresh
/// directory; returns once the file is there.
pub fn start_proxy(args: &[&str]) -> ProxyProc {
    start_proxy_with(args, &format!("{KEY}\n"), &[])
}

pub fn start_proxy_with(args: &[&str], stdin: &str, env: &[(&str, &str)]) -> ProxyProc {
    start_proxy_cmd(Command::new(bin()), args, stdin, env)
}

/// Starts the proxy through a wrapper, e.g. `["taskset", "-c", "0"]` (which `exec`s it, so
/// the PID is the proxy's).
pub fn start_proxy_under(wrapper: &[&str], args: &[&str]) -> ProxyProc {
    let (first, rest) = wrapper.split_first().expect("a wrapper command");
    let mut cmd = Command::new(first);
    cmd.args(rest).arg(bin());
    start_proxy_cmd(cmd, args, &format!("{KEY}\n"), &[])
}

fn start_proxy_cmd(
    mut cmd: Command,
    args: &[&str],
    stdin: &str,
    env: &[(&str, &str)],
) -> ProxyProc {
    let dir = tempfile::tempdir().expect("tempdir");
    let info_path = dir.path().join("server-info.json");
    cmd.args(args)
        .arg("--server-info")
        .arg(&info_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn proxy");
    {
        let mut stdin_pipe = child.stdin.take().expect("stdin");
        stdin_pipe.write_all(stdin.as_bytes()).expect("write key");
    }
    let (stderr, stderr_ended) = capture_to_end(child.stderr.take().expect("stderr"));
    let info = poll_until(Duration::from_secs(10), "server-info file", || {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "proxy exited early with {status}: {}",
                String::from_utf8_lossy(&stderr.lock().expect("lock"))
            );
        }
        let text = std::fs::read_to_string(&info_path).ok()?;
        serde_json::from_str::<serde_json::Value>(&text).ok()
    });
    let port = info["port"].as_u64().expect("port") as u16;
    let token = info["auth_token"].as_str().expect("token").to_string();
    ProxyProc {
        child,
        port,
        token,
        dir,
        info_path,
        stderr,
        stderr_ended,
    }
}

/// A child process that is killed and reaped when dropped: a test that fails (a bounded wait
/// runs out) while the proxy still runs leaves no process behind, holding the test
/// harness's pipes open.
pub struct Reaped(pub Child);

impl std::ops::Deref for Reaped {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `cmd` with piped stdin, writes `key` and a newline to it, and closes it.
pub fn spawn_with_key(cmd: &mut Command, key: &str) -> Reaped {
    let mut child = Reaped(cmd.stdin(Stdio::piped()).spawn().expect("spawn"));
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(format!("{key}\n").as_bytes())
        .expect("write key");
    child
}

/// Reads a pipe to the end in a thread.
pub fn capture(r: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    capture_to_end(r).0
}

/// Reads a pipe to the end in a thread; the flag is set once the end has been read.
pub fn capture_to_end(
    mut r: impl Read + Send + 'static,
) -> (Arc<Mutex<Vec<u8>>>, Arc<std::sync::atomic::AtomicBool>) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (b, e) = (Arc::clone(&buf), Arc::clone(&ended));
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            b.lock().expect("lock").extend_from_slice(&chunk[..n]);
        }
        e.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    (buf, ended)
}

impl ProxyProc {
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().expect("lock")).into_owned()
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Sends a signal with kill(1).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(ok.success());
    }

    /// Stops the proxy (SIGTERM) and returns all it wrote to stderr: lines are written by a
    /// thread of their own, so only once stderr has ended is it certain that every line
    /// logged so far is there (for checks that something is absent).
    pub fn stop_and_read_log(&mut self) -> String {
        self.signal("TERM");
        let status = self.wait_exit(Duration::from_secs(10));
        assert!(status.success(), "{status}");
        let ended = Arc::clone(&self.stderr_ended);
        poll_until(Duration::from_secs(5), "the end of stderr", || {
            ended
                .load(std::sync::atomic::Ordering::SeqCst)
                .then_some(())
        });
        self.stderr_text()
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let child = &mut self.child;
        poll_until(limit, "proxy exit", || child.try_wait().expect("try_wait"))
    }

    /// A POST /v1/responses request carrying the token, ready to send.
    pub fn responses_request(&self, body: &str) -> Request<Full<Bytes>> {
        Request::post("/v1/responses")
            .header("host", self.host())
            .header("content-type", "application/json")
            .header("x-proxy-token", &self.token)
            .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
            .expect("request")
    }
}

impl Drop for ProxyProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary to completion with `stdin`; returns (exit code, stderr).
pub fn run_to_exit(args: &[&str], stdin: &[u8]) -> (Option<i32>, String) {
    let mut child = Reaped(
        Command::new(bin())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn"),
    );
    let mut pipe = child.stdin.take().expect("stdin");
    let _ = pipe.write_all(stdin);
    drop(pipe);
    let stderr = capture(child.stderr.take().expect("stderr"));
    let stdout = capture(child.stdout.take().expect("stdout"));
    let status = poll_until(Duration::from_secs(10), "exit", || {
        child.try_wait().expect("wait")
    });
    // Give the capture threads a bounded moment to drain the closed pipes.
    poll_until(Duration::from_secs(2), "pipes drained", || {
        (Arc::strong_count(&stderr) == 1 && Arc::strong_count(&stdout) == 1).then_some(())
    });
    let mut err = String::from_utf8_lossy(&stderr.lock().expect("lock")).into_owned();
    err.push_str(&String::from_utf8_lossy(&stdout.lock().expect("lock")));
    (status.code(), err)
}

// ---------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------

/// Sends one request on a fresh connection; returns the response head and streaming body.
pub async fn send(port: u16, req: Request<Full<Bytes>>) -> Response<hyper::body::Incoming> {
    try_send(port, req).await.expect("send")
}

/// Like [`send`], but a connection the proxy closes without an answer is an `Err`.
pub async fn try_send(
    port: u16,
    req: Request<Full<Bytes>>,
) -> Result<Response<hyper::body::Incoming>, hyper::Error> {
    http1_sender(port).await.send_request(req).await
}

/// A new HTTP/1.1 client connection to `port` (the proxy), driven by a task of its own; it
/// stays open while the sender lives.
pub async fn http1_sender<B>(port: u16) -> hyper::client::conn::http1::SendRequest<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect proxy");
    let _ = stream.set_nodelay(true);
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    sender
}

/// Sends and collects; returns status, headers and body.
pub async fn exchange(port: u16, req: Request<Full<Bytes>>) -> (StatusCode, HeaderMap, Vec<u8>) {
    let resp = send(port, req).await;
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .expect("body in time")
        .expect("body ok")
        .to_bytes()
        .to_vec();
    (parts.status, parts.headers, body)
}

/// Writes raw bytes and reads until the peer closes (or `limit`); returns what was read.
pub async fn raw_exchange(port: u16, raw: &[u8], limit: Duration) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    s.write_all(raw).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 8192];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    out
}

/// The parsed `error` object of an OpenAI-shaped error body.
pub fn error_code(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|_| panic!("JSON error body, got {:?}", String::from_utf8_lossy(body)));
    v["error"]["code"].as_str().expect("code").to_string()
}

pub fn write_file(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, contents).expect("write");
    p
}

/// A queue of steps handed out one per request (for scripting several requests).
pub struct Queue<T>(pub Mutex<VecDeque<T>>);
pub mod memscan;
