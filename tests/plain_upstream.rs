//! The lean upstream path (`src/upstream_h1.rs`), over plain TCP and over TLS (the default
//! for https): every response framing relayed exactly, ambiguous upstream framing refused,
//! keep-alive reuse and its limits, idle connections closed, stale ones not reused, early
//! answers ending the connection, large and chunked request bodies.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A raw upstream for one test, over TCP or TLS, and the proxy flags that reach it.
struct Raw {
    url: String,
    ca: Option<(tempfile::TempDir, String)>,
    _task: tokio::task::JoinHandle<()>,
}

impl Raw {
    /// Runs `f` on every connection; over TLS when `tls` (the server offers h2 and
    /// http/1.1, as real ones do; the proxy must pick http/1.1).
    async fn start<F, Fut>(tls: bool, f: F) -> Self
    where
        F: Fn(Box<dyn RawIo>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let test_tls = tls.then(TestTls::new);
        let (addr, task) = raw_upstream_io(test_tls.as_ref().map(TestTls::acceptor), f).await;
        let ca = test_tls.map(|t| {
            let dir = tempfile::tempdir().expect("dir");
            let path = write_file(dir.path(), "ca.pem", &t.ca_pem);
            (dir, path.to_string_lossy().into_owned())
        });
        let scheme = if tls { "https" } else { "http" };
        Self {
            url: format!("{scheme}://127.0.0.1:{}/v1/responses", addr.port()),
            ca,
            _task: task,
        }
    }

    /// `--upstream-url` (and `--upstream-ca` over TLS), then `extra`.
    fn args<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec!["--upstream-url", self.url.as_str()];
        if let Some((_, ca)) = &self.ca {
            args.extend(["--upstream-ca", ca.as_str()]);
        }
        args.extend_from_slice(extra);
        args
    }
}

/// Reads one request (head, then a `content-length` or chunked body) from `s`; `None` at
/// end of stream.
async fn read_request(s: &mut (impl AsyncRead + Unpin), pending: &mut Vec<u8>) -> Option<Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..end]).to_lowercase();
            let body_len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse::<usize>().ok());
            let total = match body_len {
                Some(n) => end + 4 + n,
                None if head.contains("transfer-encoding: chunked") => {
                    match pending.windows(5).position(|w| w == b"0\r\n\r\n") {
                        Some(p) => p + 5,
                        None => usize::MAX,
                    }
                }
                None => end + 4,
            };
            if pending.len() >= total {
                return Some(pending.drain(..total).collect());
            }
        }
        let mut buf = [0u8; 65536];
        let n = tokio::time::timeout_at(deadline.into(), s.read(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        pending.extend_from_slice(&buf[..n]);
    }
}

/// Sends `body` through the proxy and checks the answer is `200` with body `ok`.
async fn expect_ok(p: &ProxyProc, body: &str, what: &str) {
    let (status, _, got) = exchange(p.port, p.responses_request(body)).await;
    assert_eq!(
        (status.as_u16(), got.as_slice()),
        (200, &b"ok"[..]),
        "{what}: {}",
        p.stderr_text()
    );
}

/// An upstream that answers the i-th request it reads (over all connections) with
/// `answers[i]`, keeping each connection open for more (an empty answer closes the
/// connection without a word); counts connections.
struct Scripted {
    up: Raw,
    connections: Arc<AtomicUsize>,
    requests: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
}

async fn scripted(tls: bool, answers: Vec<&'static [u8]>) -> Scripted {
    let connections = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (c, r) = (Arc::clone(&connections), Arc::clone(&requests));
    let answers = Arc::new(answers);
    let up = Raw::start(tls, move |mut s| {
        let (c, r, answers) = (Arc::clone(&c), Arc::clone(&r), Arc::clone(&answers));
        async move {
            c.fetch_add(1, Ordering::SeqCst);
            let mut pending = Vec::new();
            while let Some(req) = read_request(&mut s, &mut pending).await {
                let i = {
                    let mut r = r.lock().expect("lock");
                    r.push(req);
                    r.len() - 1
                };
                let Some(answer) = answers.get(i) else { return };
                if answer.is_empty() {
                    return;
                }
                if s.write_all(answer).await.is_err() || s.flush().await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    Scripted {
        up,
        connections,
        requests,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_framing_is_relayed_exactly() {
    for tls in [false, true] {
        every_response_framing_is_relayed_exactly_over(tls).await;
    }
}

async fn every_response_framing_is_relayed_exactly_over(tls: bool) {
    let up = scripted(
        tls,
        vec![
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 7\r\n\r\n{\"a\":1}",
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n\
          5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: t\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 4\r\nretry-after: 1\r\n\r\nslow",
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\ncontent-length: 3\r\n\r\nold",
    ],
    )
    .await;
    let p = start_proxy(&up.up.args(&["--worker-threads", "1"]));
    // Status, body, and the framing the client is given: its `content-length`, or none
    // (chunked, or no body by the status).
    let want: [(u16, &[u8], Option<&str>); 7] = [
        (200, b"{\"a\":1}", Some("7")),
        (200, b"hello world", None),
        (201, b"ok", Some("2")),
        (204, b"", None),
        (429, b"slow", Some("4")),
        (200, b"", Some("0")),
        (200, b"old", Some("3")),
    ];
    for (status, body, length) in want {
        let (s, headers, b) = exchange(p.port, p.responses_request("{}")).await;
        assert_eq!((s.as_u16(), b.as_slice()), (status, body), "tls {tls}");
        let te = headers.get("transfer-encoding");
        let cl = headers
            .get("content-length")
            .map(|v| v.to_str().expect("ascii"));
        assert_eq!(cl, length, "tls {tls}: {status} {headers:?}");
        let chunked = length.is_none() && status != 204;
        assert_eq!(
            te.is_some_and(|v| v == "chunked"),
            chunked,
            "tls {tls}: {headers:?}"
        );
        assert!(te.is_none() || chunked, "tls {tls}: {headers:?}");
    }
    // Keep-alive: one connection for the first six; the HTTP/1.0 answer is the last on it.
    assert_eq!(up.connections.load(Ordering::SeqCst), 1, "tls {tls}");
    let reqs = up.requests.lock().expect("lock").clone();
    let first = String::from_utf8_lossy(&reqs[0]);
    assert!(
        first.starts_with("POST /v1/responses HTTP/1.1\r\nhost: 127.0.0.1:"),
        "{first}"
    );
    assert!(
        first.contains(&format!("authorization: Bearer {KEY}\r\n")),
        "{first}"
    );
    assert!(first.ends_with("content-length: 2\r\n\r\n{}"), "{first}");
}

/// An upstream that answers one request with a 200 whose body (`body`) ends with the
/// connection: shut down properly when `close_notify` (over TLS, the alert goes first),
/// otherwise just dropped.
async fn until_close(tls: bool, body: &'static str, close_notify: bool) -> Raw {
    Raw::start(tls, move |mut s| async move {
        let mut pending = Vec::new();
        if read_request(&mut s, &mut pending).await.is_some() {
            let answer = format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n{body}");
            let _ = s.write_all(answer.as_bytes()).await;
            let _ = s.flush().await;
            if close_notify {
                let _ = s.shutdown().await;
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_without_length_ends_with_the_connection() {
    for tls in [false, true] {
        let up = until_close(tls, "until the end", true).await;
        let p = start_proxy(&up.args(&[]));
        let (status, _, body) = exchange(p.port, p.responses_request("{}")).await;
        assert_eq!(
            (status.as_u16(), body.as_slice()),
            (200, &b"until the end"[..]),
            "tls {tls}"
        );
    }
}

/// Over TLS, a connection that ends without the upstream's close_notify may have been cut
/// by someone on the path: a body framed by the connection's end is then not complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_a_body_cut_without_close_notify_is_not_a_clean_end() {
    // Dropped: the TCP connection closes with no close_notify.
    let up = until_close(true, "cut here", false).await;
    let p = start_proxy(&up.args(&[]));
    let resp = send(p.port, p.responses_request("{}")).await;
    assert_eq!(resp.status(), 200);
    let end = tokio::time::timeout(
        Duration::from_secs(10),
        http_body_util::BodyExt::collect(resp.into_body()),
    )
    .await
    .expect("in time");
    assert!(end.is_err(), "a truncated body must not end cleanly");
    let log = poll_until(Duration::from_secs(5), "access line", || {
        let t = p.stderr_text();
        t.contains("outcome=upstream_broke").then_some(t)
    });
    // The log says why.
    assert!(
        log.lines().any(
            |l| l.contains("warn the upstream broke off a response stream")
                && l.contains("close_notify")
        ),
        "{log}"
    );
}

/// A request body far larger than socket and TLS buffers arrives whole (over TLS the last
/// records are flushed, not left in the TLS layer), and the connection is reused after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_request_body_arrives_whole() {
    for tls in [false, true] {
        let up = scripted(
            tls,
            vec![
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            ],
        )
        .await;
        let p = start_proxy(&up.up.args(&["--worker-threads", "1"]));
        let big = format!("{{\"input\":\"{}\"}}", "y".repeat(16 << 20));
        for _ in 0..2 {
            expect_ok(&p, &big, &format!("tls {tls}")).await;
        }
        let reqs = up.requests.lock().expect("lock").clone();
        assert_eq!(reqs.len(), 2);
        for r in &reqs {
            assert!(r.ends_with(big.as_bytes()), "tls {tls}: the body was cut");
        }
        assert_eq!(up.connections.load(Ordering::SeqCst), 1, "tls {tls}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_or_unsupported_upstream_framing_is_502() {
    for answer in [
        &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nxx",
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nx: a\r\n folded\r\n\r\n",
        // More interim answers than any server sends (17), then a final one.
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n\
          HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n\
          HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n\
          HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n\
          HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n\
          HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n\
          HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
    ] {
        let up = scripted(false, vec![answer]).await;
        let p = start_proxy(&up.up.args(&[]));
        let (status, _, body) = exchange(p.port, p.responses_request("{}")).await;
        assert_eq!(status, 502, "{}", String::from_utf8_lossy(answer));
        assert_eq!(error_code(&body), "upstream_unavailable");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_interim_answers_before_the_final_one_are_skipped() {
    // The bound on interim (1xx) answers is 16: that many are skipped (the 17th is refused,
    // above).
    let answer = format!(
        "{}HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        "HTTP/1.1 100 Continue\r\n\r\n".repeat(16)
    );
    let answer: &'static [u8] = Box::leak(answer.into_bytes().into_boxed_slice());
    let up = scripted(false, vec![answer]).await;
    let p = start_proxy(&up.up.args(&[]));
    expect_ok(&p, "{}", "16 interim answers").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_cut_by_the_upstreams_close_is_not_a_clean_end() {
    for tls in [false, true] {
        for (framing, part) in [
            ("transfer-encoding: chunked", "5\r\nhello\r\n"),
            ("content-length: 10", "hello"),
        ] {
            a_body_cut_by_the_upstreams_close_is_not_a_clean_end_with(tls, framing, part).await;
        }
    }
}

async fn a_body_cut_by_the_upstreams_close_is_not_a_clean_end_with(
    tls: bool,
    framing: &'static str,
    part: &'static str,
) {
    // The upstream closes properly (over TLS, with close_notify) but short of the end its
    // framing declared: the client must not be given a complete answer.
    let up = Raw::start(tls, move |mut s| async move {
        let mut pending = Vec::new();
        if read_request(&mut s, &mut pending).await.is_some() {
            let answer = format!("HTTP/1.1 200 OK\r\n{framing}\r\n\r\n{part}");
            let _ = s.write_all(answer.as_bytes()).await;
            let _ = s.flush().await;
            let _ = s.shutdown().await;
        }
    })
    .await;
    let p = start_proxy(&up.args(&[]));
    let resp = send(p.port, p.responses_request("{}")).await;
    assert_eq!(resp.status(), 200, "tls {tls}, {framing}");
    let collected = tokio::time::timeout(
        Duration::from_secs(10),
        http_body_util::BodyExt::collect(resp.into_body()),
    )
    .await
    .expect("in time");
    assert!(
        collected.is_err(),
        "tls {tls}, {framing}: a clean end of a cut body: {:?}",
        collected.map(|c| c.to_bytes())
    );
    let log = poll_until(Duration::from_secs(5), "the reason logged", || {
        let t = p.stderr_text();
        t.contains("outcome=upstream_broke").then_some(t)
    });
    assert!(
        log.contains(
            "reason=\"the upstream closed the connection before the end of the response body\""
        ),
        "tls {tls}, {framing}: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunked_body_breaks_the_client_stream() {
    let up = scripted(
        false,
        vec![b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nZZ\r\n"],
    )
    .await;
    let p = start_proxy(&up.up.args(&[]));
    let mut c = TcpStream::connect(("127.0.0.1", p.port))
        .await
        .expect("connect");
    let req = format!(
        "POST /v1/responses HTTP/1.1\r\nhost: {}\r\nx-proxy-token: {}\r\ncontent-type: \
         application/json\r\ncontent-length: 2\r\n\r\n{{}}",
        p.host(),
        p.token
    );
    c.write_all(req.as_bytes()).await.expect("write");
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the proxy must close the client connection");
    // Either nothing or a 200 head, but never a clean end of the chunked body.
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 200"),
        "{text}"
    );
    assert!(!text.contains("0\r\n\r\n"), "{text}");
    // The log says why.
    let log = poll_until(Duration::from_secs(5), "the reason logged", || {
        let t = p.stderr_text();
        t.contains("outcome=upstream_broke").then_some(t)
    });
    assert!(
        log.contains(
            "warn the upstream broke off a response stream reason=\"the upstream sent a \
             malformed chunked body\""
        ),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_close_and_early_answers_are_not_reused() {
    for tls in [false, true] {
        connection_close_and_early_answers_are_not_reused_over(tls).await;
    }
}

async fn connection_close_and_early_answers_are_not_reused_over(tls: bool) {
    // 1: `connection: close`. 2: a 413 sent before the request body was read.
    let up = scripted(
        tls,
        vec![
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\na",
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nb",
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nc",
        ],
    )
    .await;
    let p = start_proxy(&up.up.args(&["--worker-threads", "1"]));
    for want in [&b"a"[..], b"b", b"c"] {
        let (status, _, body) = exchange(p.port, p.responses_request("{}")).await;
        assert_eq!((status.as_u16(), body.as_slice()), (200, want));
    }
    // The first connection was closed after "a"; "b" and "c" shared the second.
    assert_eq!(up.connections.load(Ordering::SeqCst), 2, "tls {tls}");

    // An upstream that answers after the head, without reading a large body.
    let seen = Arc::new(AtomicUsize::new(0));
    let s2 = Arc::clone(&seen);
    let early = Raw::start(tls, move |mut s| {
        let seen = Arc::clone(&s2);
        async move {
            seen.fetch_add(1, Ordering::SeqCst);
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            let _ = s
                .write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 3\r\n\r\nbig")
                .await;
            let _ = s.flush().await;
            // Hold the connection without reading: the request body cannot all be sent.
            tokio::time::sleep(Duration::from_secs(3)).await;
            drop(s);
        }
    })
    .await;
    let p = start_proxy(&early.args(&["--worker-threads", "1"]));
    // Larger than what loopback socket buffers can hold between the proxy and the upstream.
    let big = format!("{{\"input\":\"{}\"}}", "x".repeat(32 << 20));
    for _ in 0..2 {
        // A raw client: it keeps writing while it reads, as the early answer arrives.
        let c = TcpStream::connect(("127.0.0.1", p.port))
            .await
            .expect("connect");
        let (mut rd, mut wr) = c.into_split();
        let head = format!(
            "POST /v1/responses HTTP/1.1\r\nhost: {}\r\nx-proxy-token: {}\r\ncontent-type: \
             application/json\r\ncontent-length: {}\r\n\r\n",
            p.host(),
            p.token,
            big.len()
        );
        let body = big.clone();
        let writer = tokio::spawn(async move {
            let _ = wr.write_all(head.as_bytes()).await;
            let _ = wr.write_all(body.as_bytes()).await;
        });
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 4096];
        while !got.ends_with(b"\r\n\r\nbig") {
            match tokio::time::timeout_at(deadline.into(), rd.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        writer.abort();
        let text = String::from_utf8_lossy(&got);
        assert!(
            text.starts_with("HTTP/1.1 413"),
            "tls {tls}: {text}\n{}",
            p.stderr_text()
        );
        assert!(text.ends_with("\r\n\r\nbig"), "{text}");
    }
    assert_eq!(
        seen.load(Ordering::SeqCst),
        2,
        "a half-sent request's connection was reused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_close_and_stale_ones_are_not_reused() {
    for tls in [false, true] {
        idle_connections_close_and_stale_ones_are_not_reused_over(tls).await;
    }
}

async fn idle_connections_close_and_stale_ones_are_not_reused_over(tls: bool) {
    // The upstream answers one request per connection, then waits for the proxy to close
    // (recording when) or closes itself on the second connection.
    let closed_after = Arc::new(std::sync::Mutex::new(Vec::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let (ca, cc) = (Arc::clone(&closed_after), Arc::clone(&count));
    let up = Raw::start(tls, move |mut s| {
        let (closed_after, count) = (Arc::clone(&ca), Arc::clone(&cc));
        async move {
            let nth = count.fetch_add(1, Ordering::SeqCst);
            let mut pending = Vec::new();
            if read_request(&mut s, &mut pending).await.is_none() {
                return;
            }
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
            let _ = s.flush().await;
            let answered = Instant::now();
            if nth == 1 {
                // Closes at once (over TLS with a close_notify first): the proxy must not
                // reuse this one.
                let _ = s.shutdown().await;
                return;
            }
            let mut buf = [0u8; 64];
            let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
            // The proxy's close: the end of the stream (over TLS, with no close_notify,
            // which rustls reports as an unexpected end).
            if matches!(&r, Ok(Ok(0)))
                || matches!(&r, Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof)
            {
                closed_after.lock().expect("lock").push(answered.elapsed());
            }
        }
    })
    .await;
    let p = start_proxy(&up.args(&[
        "--worker-threads",
        "1",
        "--upstream-pool-idle-timeout",
        "1s",
    ]));
    // First connection: idles out and is closed by the proxy within about 1-1.5 s.
    let (status, _, _) = exchange(p.port, p.responses_request("{}")).await;
    assert_eq!(status, 200);
    let idle = poll_until_async(Duration::from_secs(5), "idle close", || {
        closed_after.lock().expect("lock").first().copied()
    })
    .await;
    assert!(
        idle >= Duration::from_millis(900) && idle < Duration::from_secs(3),
        "tls {tls}: {idle:?}"
    );
    // Second connection: the upstream closes it right after answering.
    let (status, _, _) = exchange(p.port, p.responses_request("{}")).await;
    assert_eq!(status, 200);
    poll_until(Duration::from_secs(5), "second connection", || {
        (count.load(Ordering::SeqCst) >= 2).then_some(())
    });
    // The next request must notice the close and use a fresh connection, not fail.
    expect_ok(&p, "{}", &format!("tls {tls}")).await;
    assert_eq!(count.load(Ordering::SeqCst), 3, "tls {tls}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_upstream_closes_while_idle_is_not_reused() {
    for tls in [false, true] {
        a_pooled_connection_the_upstream_closes_while_idle_is_not_reused_over(tls).await;
    }
}

async fn a_pooled_connection_the_upstream_closes_while_idle_is_not_reused_over(tls: bool) {
    // The upstream closes its first connection (over TLS with a close_notify) only once
    // the proxy has put it back in its pool, and the close has reached the proxy's socket
    // before the next request: the proxy must see it at checkout (the socket has news that
    // rustls has not read yet) and open a new connection instead of sending into a closed
    // one, which would fail the request (it is not retried).
    let close_now = Arc::new(tokio::sync::Notify::new());
    let count = Arc::new(AtomicUsize::new(0));
    let (cn, cc) = (Arc::clone(&close_now), Arc::clone(&count));
    let up = Raw::start(tls, move |mut s| {
        let (close_now, nth) = (Arc::clone(&cn), cc.fetch_add(1, Ordering::SeqCst));
        async move {
            let mut pending = Vec::new();
            while read_request(&mut s, &mut pending).await.is_some() {
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                if s.write_all(answer).await.is_err() || s.flush().await.is_err() {
                    return;
                }
                if nth == 0 {
                    close_now.notified().await;
                    let _ = s.shutdown().await;
                    // Held until the proxy closes its side, so nothing is reset.
                    let mut rest = [0u8; 64];
                    let _ = tokio::time::timeout(Duration::from_secs(10), s.read(&mut rest)).await;
                    return;
                }
            }
        }
    })
    .await;
    let up_port: u16 = up
        .url
        .rsplit(':')
        .next()
        .and_then(|rest| rest.split('/').next())
        .and_then(|p| p.parse().ok())
        .expect("the upstream's port");
    let p = start_proxy(&up.args(&["--worker-threads", "1"]));
    // The connection goes back to the pool before the last bytes of the answer are passed
    // on, so it is idle in the pool once the client has them.
    expect_ok(&p, "{}", &format!("tls {tls}: first")).await;
    close_now.notify_one();
    poll_until(
        Duration::from_secs(5),
        "the upstream's close at the proxy",
        || {
            tcp_sockets()
                .iter()
                .any(|r| r.remote_port == up_port && r.state == CLOSE_WAIT)
                .then_some(())
        },
    );
    expect_ok(&p, "{}", &format!("tls {tls}: after the close")).await;
    assert_eq!(
        count.load(Ordering::SeqCst),
        2,
        "tls {tls}: a new connection"
    );
}

/// Over TLS, a record that carries no data arriving on an idle pooled connection (here a
/// TLS 1.3 `KeyUpdate` asking for one back, sent by the upstream once the proxy has passed
/// on the response) is taken in at checkout, and the connection is reused: the proxy's own
/// `KeyUpdate` goes out ahead of the next request, under the new keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_a_record_without_data_on_an_idle_connection_keeps_it() {
    let test_tls = TestTls::new();
    let acceptor = test_tls.acceptor();
    let dir = tempfile::tempdir().expect("dir");
    let ca = write_file(dir.path(), "ca.pem", &test_tls.ca_pem);
    let connections = Arc::new(AtomicUsize::new(0));
    // Key updates sent (and flushed), and the go-ahead for the next one.
    let updates = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(tokio::sync::Notify::new());
    let (c, u, a) = (
        Arc::clone(&connections),
        Arc::clone(&updates),
        Arc::clone(&answered),
    );
    let (addr, _task) = raw_upstream(move |s| {
        let (acceptor, c, u, a) = (
            acceptor.clone(),
            Arc::clone(&c),
            Arc::clone(&u),
            Arc::clone(&a),
        );
        async move {
            let Ok(mut s) = acceptor.accept(s).await else {
                return;
            };
            c.fetch_add(1, Ordering::SeqCst);
            let mut pending = Vec::new();
            while read_request(&mut s, &mut pending).await.is_some() {
                if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await
                    .is_err()
                    || s.flush().await.is_err()
                {
                    return;
                }
                // Once the client has the response, the proxy has read all of it: the key
                // update then arrives on an idle connection.
                a.notified().await;
                if s.get_mut().1.refresh_traffic_keys().is_err() || s.flush().await.is_err() {
                    return;
                }
                u.fetch_add(1, Ordering::SeqCst);
            }
        }
    })
    .await;
    let url = format!("https://127.0.0.1:{}/v1/responses", addr.port());
    let p = start_proxy(&[
        "--upstream-url",
        &url,
        "--upstream-ca",
        &ca.to_string_lossy(),
        "--worker-threads",
        "1",
    ]);
    for i in 1..=3 {
        expect_ok(&p, "{}", &format!("request {i}")).await;
        answered.notify_one();
        // On loopback a flushed write is in the peer's receive queue when it returns.
        poll_until(Duration::from_secs(5), "key update sent", || {
            (updates.load(Ordering::SeqCst) >= i).then_some(())
        });
    }
    assert_eq!(connections.load(Ordering::SeqCst), 1, "{}", p.stderr_text());
}

/// A request sent on a pooled connection that the upstream closes without answering (as
/// when its close of an idle connection crosses the request) is a 502 and is not retried:
/// the upstream may have acted on it. The next request gets a fresh connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_upstream_drops_on_a_reused_connection_is_not_retried() {
    for tls in [false, true] {
        const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        let up = scripted(tls, vec![OK, b"", OK]).await;
        let p = start_proxy(&up.up.args(&["--worker-threads", "1"]));
        let mut statuses = Vec::new();
        for _ in 0..3 {
            let (status, _, body) = exchange(p.port, p.responses_request("{}")).await;
            statuses.push(status.as_u16());
            if status == 502 {
                assert_eq!(error_code(&body), "upstream_unavailable");
            }
        }
        assert_eq!(statuses, [200, 502, 200], "tls {tls}: {}", p.stderr_text());
        assert_eq!(up.requests.lock().expect("lock").len(), 3, "tls {tls}");
        assert_eq!(up.connections.load(Ordering::SeqCst), 2, "tls {tls}");
    }
}

/// An upstream named by host name (`localhost`: resolved, tried address by address, over
/// TLS verified against the name the certificate carries, sent as SNI).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_named_localhost_is_reached() {
    for tls in [false, true] {
        let up = scripted(tls, vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]).await;
        let url = up.up.url.replace("127.0.0.1", "localhost");
        let mut args = up.up.args(&[]);
        args[1] = url.as_str();
        let p = start_proxy(&args);
        expect_ok(&p, "{}", &format!("tls {tls}")).await;
        let reqs = up.requests.lock().expect("lock").clone();
        let head = String::from_utf8_lossy(&reqs[0]).to_string();
        assert!(head.contains("\r\nhost: localhost:"), "{head}");
    }
}

/// A request body of two chunks, `{"` and `}"`... sent with chunked framing.
struct TwoChunks(u8);

impl http_body::Body for TwoChunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.0 += 1;
        std::task::Poll::Ready(match self.0 {
            1 => Some(Ok(http_body::Frame::data(Bytes::from_static(b"{\"a\":")))),
            2 => Some(Ok(http_body::Frame::data(Bytes::from_static(b"1}")))),
            _ => None,
        })
    }
}

/// The payload of a chunked body (no extensions, no trailers).
fn dechunk(wire: &[u8]) -> Vec<u8> {
    chunks_of(wire).concat()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_request_body_is_forwarded_chunked() {
    for tls in [false, true] {
        a_chunked_request_body_is_forwarded_chunked_over(tls).await;
    }
}

async fn a_chunked_request_body_is_forwarded_chunked_over(tls: bool) {
    let up = scripted(tls, vec![b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"]).await;
    let p = start_proxy(&up.up.args(&[]));
    let req = Request::post("/v1/responses")
        .header("host", p.host())
        .header("content-type", "application/json")
        .header("x-proxy-token", &p.token)
        .body(TwoChunks(0))
        .expect("req");
    let mut sender = http1_sender(p.port).await;
    let resp = sender.send_request(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    let reqs = up.requests.lock().expect("lock").clone();
    let raw = &reqs[0];
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4;
    let head = String::from_utf8_lossy(&raw[..head_end]).to_string();
    assert!(
        head.ends_with("transfer-encoding: chunked\r\n\r\n"),
        "{head}"
    );
    assert!(!head.contains("content-length"), "{head}");
    assert_eq!(dechunk(&raw[head_end..]), b"{\"a\":1}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_request_bodies_are_forwarded_exactly() {
    for tls in [false, true] {
        empty_request_bodies_are_forwarded_exactly_over(tls).await;
    }
}

async fn empty_request_bodies_are_forwarded_exactly_over(tls: bool) {
    // An empty chunked body is still ended (or the upstream waits for it for ever), and a
    // `content-length: 0` request has nothing after its head (anything there would be
    // taken for the start of the next request on the connection).
    let ok: &'static [u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
    let up = scripted(tls, vec![ok, ok, ok]).await;
    let p = start_proxy(&up.up.args(&["--worker-threads", "1"]));
    let head = |framing: &str| {
        format!(
            "POST /v1/responses HTTP/1.1\r\nhost: {}\r\nx-proxy-token: {}\r\n\
             content-type: application/json\r\nconnection: close\r\n{framing}\r\n",
            p.host(),
            p.token
        )
    };
    for raw in [
        head("transfer-encoding: chunked\r\n") + "0\r\n\r\n",
        head("content-length: 0\r\n"),
        head("content-length: 2\r\n") + "{}",
    ] {
        let answer = raw_exchange(p.port, raw.as_bytes(), Duration::from_secs(10)).await;
        assert!(
            answer.starts_with(b"HTTP/1.1 200 "),
            "tls {tls}: {}",
            String::from_utf8_lossy(&answer)
        );
    }
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        1,
        "tls {tls}: one connection"
    );
    let reqs = up.requests.lock().expect("lock").clone();
    let text: Vec<String> = reqs
        .iter()
        .map(|r| String::from_utf8_lossy(r).into_owned())
        .collect();
    assert_eq!(text.len(), 3, "tls {tls}: {text:?}");
    assert!(
        text[0].starts_with("POST ")
            && text[0].ends_with("transfer-encoding: chunked\r\n\r\n0\r\n\r\n"),
        "tls {tls}: {:?}",
        text[0]
    );
    assert!(
        text[1].starts_with("POST ") && text[1].ends_with("content-length: 0\r\n\r\n"),
        "tls {tls}: {:?}",
        text[1]
    );
    assert!(
        text[2].starts_with("POST ") && text[2].ends_with("\r\n\r\n{}"),
        "tls {tls}: {:?}",
        text[2]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_worker_reaches_an_https_upstream_over_tls() {
    // Each worker has a pool of its own, made from the first one's settings. The accepting
    // worker keeps a new connection while it holds fewer than 7 for each one the other
    // holds, so with 7 client connections open the 8th is served by the second worker:
    // its requests too must go over TLS (a plain connection to a TLS upstream would fail).
    let ok: &'static [u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    let up = scripted(true, vec![ok; 8]).await;
    let p = start_proxy(&up.up.args(&["--worker-threads", "2"]));
    let mut open = Vec::new();
    for i in 0..8 {
        let mut sender = http1_sender(p.port).await;
        let resp = tokio::time::timeout(
            Duration::from_secs(10),
            sender.send_request(p.responses_request("{}")),
        )
        .await
        .expect("in time")
        .expect("response");
        assert_eq!(resp.status(), 200, "connection {i}: {}", p.stderr_text());
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(body.as_ref(), b"ok", "connection {i}");
        // Kept open, so that the worker holding it counts it.
        open.push(sender);
    }
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        2,
        "one upstream connection per worker"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_trailers_are_not_passed_on() {
    let up = scripted(
        false,
        vec![b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx-trailer: t\r\n\r\n"],
    )
    .await;
    let p = start_proxy(&up.up.args(&[]));
    let resp = send(p.port, p.responses_request("{}")).await;
    assert_eq!(resp.status(), 200);
    let collected = tokio::time::timeout(
        Duration::from_secs(10),
        http_body_util::BodyExt::collect(resp.into_body()),
    )
    .await
    .expect("in time")
    .expect("clean end");
    assert!(collected.trailers().is_none());
    assert_eq!(collected.to_bytes().as_ref(), b"ok");
}

/// The chunks of a chunked body (no extensions, no trailers), the end excluded; the framing
/// is checked as it goes.
fn chunks_of(mut wire: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = wire
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("size line");
        let size = usize::from_str_radix(std::str::from_utf8(&wire[..line_end]).expect("hex"), 16)
            .expect("size");
        wire = &wire[line_end + 2..];
        if size == 0 {
            assert_eq!(wire, b"\r\n");
            return out;
        }
        out.push(wire[..size].to_vec());
        assert_eq!(&wire[size..size + 2], b"\r\n");
        wire = &wire[size + 2..];
    }
}

/// An upstream that records every byte as it arrives and answers 200 once a chunked body
/// has ended.
async fn recording_upstream() -> (Raw, Arc<std::sync::Mutex<Vec<u8>>>) {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s2 = Arc::clone(&seen);
    let up = Raw::start(false, move |mut s| {
        let seen = Arc::clone(&s2);
        async move {
            let mut buf = [0u8; 65536];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    return;
                }
                let done = {
                    let mut seen = seen.lock().expect("lock");
                    seen.extend_from_slice(&buf[..n]);
                    seen.ends_with(b"\r\n0\r\n\r\n")
                };
                if done {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    let _ = s.flush().await;
                }
            }
        }
    })
    .await;
    (up, seen)
}

fn chunked_head(p: &ProxyProc) -> String {
    format!(
        "POST /v1/responses HTTP/1.1\r\nhost: {}\r\nx-proxy-token: {}\r\n\
         content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n",
        p.host(),
        p.token
    )
}

/// A body sent as ten thousand one-byte chunks reaches the upstream whole, in a few large
/// chunks: each chunk used to cost the proxy a write of its own (4.6 s of its time for a
/// million).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_request_chunks_that_are_waiting_go_upstream_together() {
    let (up, seen) = recording_upstream().await;
    let p = start_proxy(&up.args(&[]));
    let mut wire = chunked_head(&p).into_bytes();
    for _ in 0..10_000 {
        wire.extend_from_slice(b"1\r\na\r\n");
    }
    wire.extend_from_slice(b"0\r\n\r\n");
    let mut s = TcpStream::connect(("127.0.0.1", p.port))
        .await
        .expect("connect");
    s.write_all(&wire).await.expect("send");
    let mut answer = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut b = [0u8; 1024];
        let n = tokio::time::timeout_at(deadline.into(), s.read(&mut b))
            .await
            .expect("an answer in time")
            .expect("read");
        assert!(n > 0, "closed");
        answer.extend_from_slice(&b[..n]);
    }
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    let raw = seen.lock().expect("lock").clone();
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4;
    let chunks = chunks_of(&raw[head_end..]);
    assert_eq!(chunks.concat(), vec![b'a'; 10_000]);
    assert!(chunks.len() <= 100, "{} chunks upstream", chunks.len());
}

/// Gathering takes only what is there: a chunk goes upstream before the client sends the
/// next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_chunk_is_not_held_back_for_the_next() {
    let (up, seen) = recording_upstream().await;
    let p = start_proxy(&up.args(&[]));
    let mut s = TcpStream::connect(("127.0.0.1", p.port))
        .await
        .expect("connect");
    let mut wire = chunked_head(&p).into_bytes();
    wire.extend_from_slice(b"5\r\nhello\r\n");
    s.write_all(&wire).await.expect("first");
    poll_until_async(Duration::from_secs(5), "the first chunk upstream", || {
        let seen = seen.lock().expect("lock");
        seen.windows(5).any(|w| w == b"hello").then_some(())
    })
    .await;
    s.write_all(b"6\r\n world\r\n0\r\n\r\n")
        .await
        .expect("rest");
    let mut answer = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut answer))
        .await
        .expect("an answer in time")
        .expect("read");
    assert_eq!(&answer, b"HTTP/1.1 200");
    let raw = seen.lock().expect("lock").clone();
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4;
    assert_eq!(chunks_of(&raw[head_end..]).concat(), b"hello world");
}
