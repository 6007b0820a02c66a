//! The real binary against a mock upstream: forwarding, streaming, limits, failures,
//! shutdown and the files it writes.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use tokio::sync::Notify;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_with_key_injected_and_headers_rewritten() {
    let up = MockUpstream::plain(|_| {
        Reply::json(200, r#"{"id":"resp_1"}"#)
            .header("x-request-id", "req_abc")
            .header("connection", "x-upstream-hop")
            .header("x-upstream-hop", "1")
            .header("keep-alive", "timeout=9")
    })
    .await;
    let url = format!("{}?api-version=2025-04-01-preview", up.url());
    let mut p = start_proxy(&["--upstream-url", &url]);
    let body = r#"{"model":"gpt-test","input":"hi","stream":false}"#;
    let req = Request::post("/v1/responses")
        .header("host", p.host())
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {}", p.token))
        .header("cookie", "session=1")
        .header("proxy-authorization", "Basic eA==")
        .header("x-forwarded-for", "10.0.0.1")
        .header("forwarded", "for=10.0.0.1")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "1")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("openai-beta", "responses=v1")
        .header("accept", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("req");
    let (status, headers, resp_body) = exchange(p.port, req).await;
    assert_eq!(status, 200);
    assert_eq!(resp_body, br#"{"id":"resp_1"}"#);
    assert_eq!(headers["x-request-id"], "req_abc");
    assert!(headers.get("x-upstream-hop").is_none() && headers.get("keep-alive").is_none());
    let reqs = up.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.target, "/v1/responses?api-version=2025-04-01-preview");
    assert_eq!(r.all("authorization"), [format!("Bearer {KEY}")]);
    assert_eq!(r.all("host"), [format!("127.0.0.1:{}", up.addr.port())]);
    for gone in [
        "x-proxy-token",
        "cookie",
        "proxy-authorization",
        "x-forwarded-for",
        "forwarded",
        "x-hop",
        "keep-alive",
        "te",
    ] {
        assert!(r.all(gone).is_empty(), "{gone} reached the upstream");
    }
    assert_eq!(r.all("openai-beta"), ["responses=v1"]);
    assert_eq!(r.all("content-type"), ["application/json"]);
    assert_eq!(r.body, body.as_bytes());
    let text = format!("{:?}{:?}", r.headers, String::from_utf8_lossy(&r.body));
    assert!(!text.contains(&p.token), "token reached the upstream");
    // The start-up line names the upstream without its query string.
    let log = p.stop_and_read_log();
    assert!(
        log.contains(&format!(
            "upstream=http://127.0.0.1:{}/v1/responses",
            up.addr.port()
        )),
        "{log}"
    );
    assert!(!log.contains("api-version"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_with_generated_ca() {
    let up = MockUpstream::tls(|_| Reply::json(200, "{}")).await;
    let dir = tempfile::tempdir().expect("dir");
    let ca = write_file(dir.path(), "ca.pem", up.ca_pem.as_deref().expect("ca"));
    // One worker thread: each worker keeps its own pool, and this checks pooling.
    let url = up.url();
    let base = [
        "--upstream-url",
        url.as_str(),
        "--upstream-ca",
        ca.to_str().expect("utf8"),
        "--worker-threads",
        "1",
    ];
    let p = start_proxy(&base);
    let (status, _, body) = exchange(p.port, p.responses_request("{}")).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let reqs = up.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(
        reqs[0].version,
        http::Version::HTTP_11,
        "the lean path offers only http/1.1, although the upstream offers h2 first"
    );
    assert_eq!(reqs[0].all("authorization"), [format!("Bearer {KEY}")]);
    // Two requests (on two client connections) share the pooled TLS connection.
    let (status, _, _) = exchange(p.port, p.responses_request("{}")).await;
    assert_eq!(status, 200);
    assert_eq!(*up.state.connections.lock().expect("lock"), 1);

    // With --upstream-http2, ALPN negotiates h2 and the connection is pooled too.
    let h2 = start_proxy(&[&base[..], &["--upstream-http2"]].concat());
    for _ in 0..2 {
        let (status, _, _) = exchange(h2.port, h2.responses_request("{}")).await;
        assert_eq!(status, 200);
    }
    let reqs = up.requests();
    assert_eq!(reqs.len(), 4);
    assert_eq!(reqs[3].version, http::Version::HTTP_2, "ALPN negotiates h2");
    assert_eq!(reqs[3].all("authorization"), [format!("Bearer {KEY}")]);
    assert_eq!(*up.state.connections.lock().expect("lock"), 2);

    // An upstream without h2: with --upstream-http2, ALPN falls back to http/1.1.
    let tls = TestTls::new().only_http1();
    let ca1 = write_file(dir.path(), "ca1.pem", &tls.ca_pem);
    let up1 = MockUpstream::tls_with(tls, |_| Reply::json(200, "{}")).await;
    let url1 = up1.url();
    let h1 = start_proxy(&[
        "--upstream-url",
        url1.as_str(),
        "--upstream-ca",
        ca1.to_str().expect("utf8"),
        "--worker-threads",
        "1",
        "--upstream-http2",
    ]);
    for _ in 0..2 {
        let (status, _, body) = exchange(h1.port, h1.responses_request("{}")).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }
    let reqs = up1.requests();
    assert_eq!(reqs.len(), 2);
    assert!(
        reqs.iter().all(|r| r.version == http::Version::HTTP_11),
        "no h2 offered: HTTP/1.1"
    );
    assert_eq!(reqs[1].all("authorization"), [format!("Bearer {KEY}")]);
    assert_eq!(*up1.state.connections.lock().expect("lock"), 1, "pooled");

    // Without the CA, the certificate is untrusted: 502, nothing forwarded, log says why.
    let p2 = start_proxy(&["--upstream-url", &up.url()]);
    let (status, _, body) = exchange(p2.port, p2.responses_request("{}")).await;
    assert_eq!(status, 502);
    assert_eq!(error_code(&body), "upstream_unavailable");
    assert_eq!(up.count(), 4);
    let log = poll_until(Duration::from_secs(5), "log line", || {
        let t = p2.stderr_text();
        t.contains("upstream request failed").then_some(t)
    });
    assert!(log.to_lowercase().contains("certificate"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_that_did_not_sign_the_certificate_is_not_trusted() {
    let tls = TestTls::for_names(&["not-this-host.example"]);
    let ca = tls.ca_pem.clone();
    drop(tls);
    // The mock's certificate is signed by its own CA; the proxy is given another one.
    // (A certificate for another host is tested in tests/faults.rs.)
    let up = MockUpstream::tls(|_| Reply::json(200, "{}")).await;
    let dir = tempfile::tempdir().expect("dir");
    // Trust a CA that did not sign the mock's certificate: still untrusted.
    let ca_path = write_file(dir.path(), "other-ca.pem", &ca);
    let p = start_proxy(&[
        "--upstream-url",
        &up.url(),
        "--upstream-ca",
        ca_path.to_str().expect("utf8"),
    ]);
    let (status, _, _) = exchange(p.port, p.responses_request("{}")).await;
    assert_eq!(status, 502);
    assert_eq!(up.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_events_are_not_batched() {
    let hold = Arc::new(Notify::new());
    let h = Arc::clone(&hold);
    let up = MockUpstream::plain(move |_| {
        Reply::sse(vec![
            Step::Data(Bytes::from_static(
                b"event: response.created\ndata: {\"n\":1}\n\n",
            )),
            Step::Wait(Arc::clone(&h)),
            Step::Data(Bytes::from_static(
                b"event: response.completed\ndata: {\"n\":2}\n\n",
            )),
        ])
    })
    .await;
    let p = start_proxy(&["--upstream-url", &up.url()]);
    let resp = send(p.port, p.responses_request(r#"{"stream":true}"#)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    // The first event arrives while the upstream still holds the second.
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("first event arrives while the second is held")
        .expect("frame")
        .expect("ok");
    assert_eq!(
        first.into_data().expect("data"),
        Bytes::from_static(b"event: response.created\ndata: {\"n\":1}\n\n")
    );
    hold.notify_one();
    let rest = tokio::time::timeout(Duration::from_secs(5), body.collect())
        .await
        .expect("rest")
        .expect("ok")
        .to_bytes();
    assert_eq!(
        rest,
        Bytes::from_static(b"event: response.completed\ndata: {\"n\":2}\n\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_body_limit() {
    let up = MockUpstream::plain(|_| Reply::json(200, "{}")).await;
    let p = start_proxy(&["--upstream-url", &up.url(), "--max-request-body", "1KiB"]);
    // Declared too large: refused before anything is sent.
    let big = "x".repeat(1025);
    let (status, _, body) = exchange(p.port, p.responses_request(&big)).await;
    assert_eq!(status, 413);
    assert_eq!(error_code(&body), "request_too_large");
    // Exactly at the limit: forwarded.
    let ok = "y".repeat(1024);
    let (status, _, _) = exchange(p.port, p.responses_request(&ok)).await;
    assert_eq!(status, 200);
    assert_eq!(up.count(), 1);
    // Chunked, no length, the whole body in hand at once: 413, and nothing of it goes
    // upstream (the pieces already received go out together, and the limit is crossed
    // among them).
    let chunked = |p: &ProxyProc, body: &str| {
        format!(
            "POST /v1/responses HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\n\
             x-proxy-token: {}\r\ntransfer-encoding: chunked\r\n\r\n{body}",
            p.host(),
            p.token,
        )
    };
    let two_chunks = format!(
        "400\r\n{}\r\n400\r\n{}\r\n0\r\n\r\n",
        "a".repeat(1024),
        "b".repeat(1024)
    );
    let out = raw_exchange(
        p.port,
        chunked(&p, &two_chunks).as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert_eq!(
        up.count(),
        1,
        "the oversized chunked body never completed upstream"
    );
    // The limit crossed mid-stream, after the first chunk went upstream: 413, and the
    // upstream's request is aborted, never completed. (A proxy of its own, so that the
    // upstream connection is a new one and its arrival says the first chunk went out.)
    let up = MockUpstream::plain(|_| Reply::json(200, "{}")).await;
    let p = start_proxy(&["--upstream-url", &up.url(), "--max-request-body", "1KiB"]);
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", p.port))
        .await
        .expect("connect");
    let first = format!("400\r\n{}\r\n", "a".repeat(1024));
    s.write_all(chunked(&p, &first).as_bytes())
        .await
        .expect("first");
    poll_until_async(Duration::from_secs(5), "the upstream connection", || {
        (*up.state.connections.lock().expect("lock") == 1).then_some(())
    })
    .await;
    s.write_all(format!("400\r\n{}\r\n0\r\n\r\n", "b".repeat(1024)).as_bytes())
        .await
        .expect("rest");
    assert_eq!(&status_line(&mut s).await, b"HTTP/1.1 413");
    poll_until_async(Duration::from_secs(5), "aborted upstream body", || {
        (*up.state.incomplete.lock().expect("lock") == 1).then_some(())
    })
    .await;
    assert_eq!(up.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_post_v1_responses_is_forwarded() {
    let up = MockUpstream::plain(|_| Reply::json(200, "{}")).await;
    let p = start_proxy(&["--upstream-url", &up.url()]);
    for (method, target) in [
        ("GET", "/v1/responses"),
        ("POST", "/v1/responses?x=1"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/responses/"),
        ("PUT", "/v1/responses"),
        ("DELETE", "/v1/responses"),
        ("OPTIONS", "/v1/responses"),
        ("GET", "/shutdown"),
        ("POST", "/"),
    ] {
        let req = Request::builder()
            .method(method)
            .uri(target)
            .header("host", p.host())
            .header("content-type", "application/json")
            .header("x-proxy-token", &p.token)
            .body(Full::new(Bytes::from_static(b"{}")))
            .expect("req");
        let (status, headers, body) = exchange(p.port, req).await;
        assert_eq!(status, 403, "{method} {target}");
        assert_eq!(error_code(&body), "route_not_allowed");
        assert!(
            headers
                .keys()
                .all(|k| !k.as_str().starts_with("access-control"))
        );
    }
    // An upgrade request is refused too.
    let raw = format!(
        "POST /v1/responses HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\nx-proxy-token: {}\r\nconnection: upgrade\r\nupgrade: websocket\r\ncontent-length: 2\r\n\r\n{{}}",
        p.host(),
        p.token
    );
    let out = raw_exchange(p.port, raw.as_bytes(), Duration::from_secs(2)).await;
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 403"));
    assert_eq!(up.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_502() {
    let port = closed_port();
    let plain = format!("http://127.0.0.1:{port}/v1/responses");
    let tls = format!("https://127.0.0.1:{port}/v1/responses");
    // The lean HTTP/1.1 client and the general one (HTTP/2): refused is 502, not a timeout,
    // and the log names the cause (the general client's is a source of its error).
    for args in [
        vec!["--upstream-url", plain.as_str()],
        vec!["--upstream-url", tls.as_str(), "--upstream-http2"],
    ] {
        let p = start_proxy(&args);
        let t0 = Instant::now();
        let (status, headers, body) = exchange(p.port, p.responses_request("{}")).await;
        assert_eq!(status, 502, "{args:?}");
        assert!(t0.elapsed() < Duration::from_secs(2), "fast");
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(error_code(&body), "upstream_unavailable");
        let log = poll_until(Duration::from_secs(5), "log", || {
            let t = p.stderr_text();
            t.contains("upstream request failed").then_some(t)
        });
        assert!(log.to_lowercase().contains("refused"), "{args:?}: {log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_silent_is_504_after_idle_timeout() {
    let up = MockUpstream::plain(|_| Reply::hanging()).await;
    let p = start_proxy(&[
        "--upstream-url",
        &up.url(),
        "--upstream-idle-timeout",
        "300ms",
    ]);
    let t0 = Instant::now();
    let (status, _, body) = exchange(p.port, p.responses_request("{}")).await;
    assert_eq!(status, 504);
    assert_eq!(error_code(&body), "upstream_timeout");
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert!(t0.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_upstream_never_answers_is_cancelled_with_its_connection() {
    // Reads the request, never answers, and reports when the proxy closes the connection.
    let closed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = Arc::clone(&closed);
    let (addr, _task) = raw_upstream(move |mut s| {
        let seen = Arc::clone(&seen);
        async move {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    })
    .await;
    let url = format!("http://127.0.0.1:{}/v1/responses", addr.port());
    let p = start_proxy(&["--upstream-url", &url, "--upstream-idle-timeout", "300ms"]);
    let (status, _, body) = exchange(p.port, p.responses_request("{}")).await;
    assert_eq!(status, 504);
    assert_eq!(error_code(&body), "upstream_timeout");
    // The unanswered request is dropped with the wait: its connection is closed, not
    // kept open or put back in the pool.
    poll_until_async(Duration::from_secs(2), "upstream connection closed", || {
        (closed.load(std::sync::atomic::Ordering::SeqCst) == 1).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_handshake_that_never_finishes_is_a_connect_timeout() {
    // Accepts TCP, never speaks TLS.
    let (addr, _task) = raw_upstream(|s| async move {
        let _hold = s;
        std::future::pending::<()>().await;
    })
    .await;
    let url = format!("https://127.0.0.1:{}/v1/responses", addr.port());
    let p = start_proxy(&[
        "--upstream-url",
        &url,
        "--upstream-connect-timeout",
        "300ms",
    ]);
    let t0 = Instant::now();
    let (status, _, body) = exchange(p.port, p.responses_request("{}")).await;
    assert_eq!(status, 504);
    assert_eq!(error_code(&body), "upstream_connect_timeout");
    assert!(t0.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_upstream_answer_is_502() {
    let (addr, _task) = raw_upstream(|mut s| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
        let _ = s.write_all(b"this is not HTTP\r\n\r\n").await;
    })
    .await;
    let url = format!("http://127.0.0.1:{}/v1/responses", addr.port());
    let p = start_proxy(&["--upstream-url", &url]);
    let (status, _, body) = exchange(p.port, p.responses_request("{}")).await;
    assert_eq!(status, 502);
    assert_eq!(error_code(&body), "upstream_unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_breaking_mid_stream_ends_the_client_stream_abnormally() {
    for tls in [false, true] {
        let script = |_: &Recorded| {
            Reply::sse(vec![
                Step::Data(Bytes::from_static(b"data: 1\n\n")),
                Step::Sleep(Duration::from_millis(100)),
                Step::Abort,
            ])
        };
        let up = if tls {
            MockUpstream::tls(script).await
        } else {
            MockUpstream::plain(script).await
        };
        let dir = tempfile::tempdir().expect("dir");
        let mut args = vec!["--upstream-url".to_string(), up.url()];
        if let Some(ca) = &up.ca_pem {
            args.push("--upstream-ca".into());
            args.push(
                write_file(dir.path(), "ca.pem", ca)
                    .to_string_lossy()
                    .into_owned(),
            );
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let p = start_proxy(&args);
        let resp = send(p.port, p.responses_request("{}")).await;
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let first = body
            .frame()
            .await
            .expect("frame")
            .expect("ok")
            .into_data()
            .expect("data");
        assert_eq!(first, Bytes::from_static(b"data: 1\n\n"));
        let result = tokio::time::timeout(Duration::from_secs(5), body.collect())
            .await
            .expect("in time");
        assert!(
            result.is_err(),
            "a broken upstream stream must not look complete (tls={tls})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_the_upstream_request() {
    // Mid-stream.
    let hold = Arc::new(Notify::new());
    let h = Arc::clone(&hold);
    let up = MockUpstream::plain(move |_| {
        Reply::sse(vec![
            Step::Data(Bytes::from_static(b"data: 1\n\n")),
            Step::Wait(Arc::clone(&h)),
        ])
    })
    .await;
    let p = start_proxy(&["--upstream-url", &up.url()]);
    let resp = send(p.port, p.responses_request("{}")).await;
    let mut body = resp.into_body();
    let _ = body.frame().await;
    let t0 = Instant::now();
    drop(body);
    poll_until_async(Duration::from_secs(1), "upstream cancellation", || {
        (!up.state.cancelled.lock().expect("lock").is_empty()).then_some(())
    })
    .await;
    assert!(t0.elapsed() < Duration::from_secs(1));

    // Before the response head: the client gives up while the upstream is thinking.
    let up2 = MockUpstream::plain(|_| Reply {
        head_delay: Duration::from_secs(30),
        ..Reply::json(200, "{}")
    })
    .await;
    let p2 = start_proxy(&["--upstream-url", &up2.url()]);
    let raw = format!(
        "POST /v1/responses HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\nx-proxy-token: {}\r\ncontent-length: 2\r\n\r\n{{}}",
        p2.host(),
        p2.token
    );
    {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", p2.port))
            .await
            .expect("connect");
        s.write_all(raw.as_bytes()).await.expect("write");
        poll_until_async(Duration::from_secs(5), "request upstream", || {
            (up2.count() == 1).then_some(())
        })
        .await;
    }
    let t0 = Instant::now();
    poll_until_async(Duration::from_secs(2), "upstream connection closed", || {
        let closed = p2.stderr_text().contains("outcome=client_closed");
        closed.then_some(())
    })
    .await;
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t0.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_shutdown_stops_cleanly() {
    let up = MockUpstream::plain(|_| Reply::json(200, "{}")).await;
    let mut p = start_proxy(&["--upstream-url", &up.url(), "--http-shutdown"]);
    let req = Request::get("/shutdown")
        .header("host", p.host())
        .header("x-proxy-token", &p.token)
        .body(Full::new(Bytes::new()))
        .expect("req");
    let t0 = Instant::now();
    let (status, _, _) = exchange(p.port, req).await;
    assert_eq!(status, 200);
    let st = p.wait_exit(Duration::from_secs(2));
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "exit within a second, took {:?}",
        t0.elapsed()
    );
    assert_eq!(st.code(), Some(0));
    assert!(!p.info_path.exists(), "server-info removed");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", p.port)).is_err(),
        "no longer listening"
    );
    // The access line names the route (only routes the proxy serves are named).
    poll_until(Duration::from_secs(5), "the shutdown's access line", || {
        p.stderr_text()
            .contains("access method=GET path=/shutdown status=200")
            .then_some(())
    });
    assert!(p.stderr_text().contains("outcome=shutdown"));
}

/// SIGTERM, and SIGHUP (the terminal went away) the same way: in-flight requests finish,
/// the server-info file (and its token) is removed, exit 0. (SIGHUP used to kill the proxy
/// outright.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_sighup_drain_in_flight_requests_then_exit_zero() {
    let up = MockUpstream::plain(|_| Reply {
        head_delay: Duration::from_millis(300),
        ..Reply::json(200, r#"{"late":true}"#)
    })
    .await;
    for sig in ["TERM", "HUP"] {
        let mut p = start_proxy(&["--upstream-url", &up.url()]);
        let port = p.port;
        let req = p.responses_request("{}");
        let before = up.count();
        let inflight = tokio::spawn(async move { exchange(port, req).await });
        poll_until_async(Duration::from_secs(5), "request upstream", || {
            (up.count() == before + 1).then_some(())
        })
        .await;
        p.signal(sig);
        let (status, _, body) = inflight.await.expect("join");
        assert_eq!(status, 200, "{sig}");
        assert_eq!(body, br#"{"late":true}"#);
        let st = p.wait_exit(Duration::from_secs(5));
        assert_eq!(st.code(), Some(0), "{sig}: {st}");
        assert!(!p.info_path.exists(), "{sig}");
        let log = poll_until(Duration::from_secs(5), "the last line", || {
            let t = p.stderr_text();
            t.contains("stopped").then_some(t)
        });
        assert!(
            log.contains(&format!("SIG{sig} received; shutting down")),
            "{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_with_a_stuck_request_exits_after_the_grace_period() {
    let up = MockUpstream::plain(|_| Reply::hanging()).await;
    let mut p = start_proxy(&["--upstream-url", &up.url(), "--shutdown-grace", "300ms"]);
    let port = p.port;
    let req = p.responses_request("{}");
    let _inflight = tokio::spawn(async move { send(port, req).await });
    poll_until_async(Duration::from_secs(5), "request upstream", || {
        (up.count() == 1).then_some(())
    })
    .await;
    let t0 = Instant::now();
    p.signal("INT");
    let st = p.wait_exit(Duration::from_secs(5));
    assert_eq!(st.code(), Some(0));
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert!(t0.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_info_content_and_mode() {
    let up = MockUpstream::plain(|_| Reply::json(200, "{}")).await;
    let mut p = start_proxy(&["--upstream-url", &up.url()]);
    let text = std::fs::read_to_string(&p.info_path).expect("read");
    assert!(text.ends_with('\n') && text.lines().count() == 1);
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(v["port"], p.port);
    assert_eq!(v["pid"], p.child.id());
    assert_eq!(v["auth_token"].as_str().expect("token").len(), 43);
    let mode = std::fs::metadata(&p.info_path)
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let log = p.stop_and_read_log();
    assert!(
        !log.contains(&p.token),
        "token not printed when --server-info is given"
    );
}

/// The proxy in front of `up` with `--dump-dir` (a fresh directory) and `extra` flags.
/// The first 12 bytes of the answer on `s` (`HTTP/1.1 NNN`), within 5 s.
async fn status_line(s: &mut tokio::net::TcpStream) -> [u8; 12] {
    use tokio::io::AsyncReadExt;
    let mut answer = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut answer))
        .await
        .expect("an answer in time")
        .expect("read");
    answer
}

fn proxy_with_dumps(
    up: &MockUpstream,
    extra: &[&str],
) -> (tempfile::TempDir, std::path::PathBuf, ProxyProc) {
    let dir = tempfile::tempdir().expect("dir");
    let dumps = dir.path().join("dumps");
    let mut args = vec!["--upstream-url".to_string(), up.url(), "--dump-dir".into()];
    args.push(dumps.to_str().expect("utf8").into());
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let p = start_proxy(&args);
    (dir, dumps, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dump_files_are_private_and_redacted() {
    let up = MockUpstream::plain(|_| {
        Reply::sse(vec![Step::Data(Bytes::from_static(
            b"data: {\"ok\":1}\n\n",
        ))])
        .header("set-cookie", "__cf_bm=secretcookie")
    })
    .await;
    let (_dir, dumps, p) = proxy_with_dumps(&up, &[]);
    let req = Request::post("/v1/responses")
        .header("host", p.host())
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {}", p.token))
        .header("api-key", "azure-secret")
        .header("cookie", "a=b")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"m","stream":true}"#,
        )))
        .expect("req");
    let (status, _, _) = exchange(p.port, req).await;
    assert_eq!(status, 200);
    let files = poll_until(Duration::from_secs(5), "two dump files", || {
        // Files under their own names only: a `.partial` one is renamed when complete.
        let mut v: Vec<_> = std::fs::read_dir(&dumps)
            .ok()?
            .map(|e| e.expect("entry").path())
            .filter(|f| !f.file_name().expect("n").to_string_lossy().starts_with('.'))
            .collect();
        v.sort();
        (v.len() == 2).then_some(v)
    });
    assert_eq!(
        std::fs::metadata(&dumps)
            .expect("meta")
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().expect("n").to_string_lossy().into_owned())
        .collect();
    assert!(
        names[0].starts_with("000001-") && names[0].ends_with("-request.json"),
        "{names:?}"
    );
    assert!(
        names[1].starts_with("000001-") && names[1].ends_with("-response.json"),
        "{names:?}"
    );
    for f in &files {
        assert_eq!(
            std::fs::metadata(f).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        // A file under its own name is complete: it was written under a hidden name first.
        let text = std::fs::read_to_string(f).expect("read");
        serde_json::from_str::<serde_json::Value>(&text).expect("complete JSON");
        for secret in [p.token.as_str(), KEY, "azure-secret", "secretcookie", "a=b"] {
            assert!(!text.contains(secret), "{secret} in {}", f.display());
        }
    }
    let req: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&files[0]).expect("r")).expect("j");
    assert_eq!(req["method"], "POST");
    assert_eq!(req["url"], "/v1/responses");
    assert_eq!(
        req["body"],
        serde_json::json!({"model": "m", "stream": true})
    );
    let redacted: Vec<_> = req["headers"]
        .as_array()
        .expect("arr")
        .iter()
        .filter(|h| h["value"] == "[REDACTED]")
        .map(|h| h["name"].as_str().expect("s").to_string())
        .collect();
    assert_eq!(redacted, ["authorization", "api-key", "cookie"]);
    let resp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&files[1]).expect("r")).expect("j");
    assert_eq!(resp["status"], 200);
    assert_eq!(resp["body"], "data: {\"ok\":1}\n\n");
}

/// The one response dump in `dumps`, once it is written.
fn response_dump(dumps: &std::path::Path) -> serde_json::Value {
    let file = poll_until(Duration::from_secs(5), "the response's dump", || {
        std::fs::read_dir(dumps)
            .ok()?
            .map(|e| e.expect("entry").path())
            .find(|f| f.to_string_lossy().ends_with("-response.json"))
    });
    serde_json::from_str(&std::fs::read_to_string(file).expect("read")).expect("json")
}

/// An answer whose declared bytes have all been passed on is complete, even when the
/// connection stops reading it there (a body larger than what is copied into one write, or
/// an HTTP/2 upstream whose end of stream comes after its last bytes): the access line says
/// `ok`, the dump is not marked cut, and over HTTP/2 the stream is read to its end in the
/// background instead of being cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_whose_declared_bytes_all_went_out_is_complete() {
    const LEN: usize = 20 << 10;
    let reply = || {
        let body = Bytes::from(vec![b'a'; LEN]);
        Reply {
            headers: vec![("content-length".into(), LEN.to_string())],
            // The end of the stream comes a while after the last bytes.
            steps: vec![Step::Data(body), Step::Sleep(Duration::from_millis(200))],
            ..Reply::json(200, "")
        }
    };
    let up = MockUpstream::plain(move |_| reply()).await;
    let (_dir, dumps, p) = proxy_with_dumps(&up, &[]);
    let (status, _, body) = exchange(p.port, p.responses_request("{}")).await;
    assert_eq!((status.as_u16(), body.len()), (200, LEN));
    logged_ok_and_dumped_whole(&p, &dumps, LEN);

    let up = MockUpstream::tls(move |_| reply()).await;
    let dir = tempfile::tempdir().expect("dir");
    let ca = write_file(dir.path(), "ca.pem", up.ca_pem.as_deref().expect("ca"));
    let (_dumps_dir, dumps, p) = proxy_with_dumps(
        &up,
        &[
            "--upstream-ca",
            ca.to_str().expect("utf8"),
            "--upstream-http2",
        ],
    );
    let (status, _, body) = exchange(p.port, p.responses_request("{}")).await;
    assert_eq!((status.as_u16(), body.len()), (200, LEN));
    assert_eq!(up.requests()[0].version, http::Version::HTTP_2);
    poll_until(
        Duration::from_secs(5),
        "the upstream's stream to end",
        || {
            let finished = *up.state.finished.lock().expect("lock");
            let cancelled = up.state.cancelled.lock().expect("lock").len();
            (finished + cancelled > 0).then_some(())
        },
    );
    assert!(
        up.state.cancelled.lock().expect("lock").is_empty(),
        "the stream was cancelled, not read to its end"
    );
    logged_ok_and_dumped_whole(&p, &dumps, LEN);
}

/// The exchange's access line says `ok` with `len` bytes out, and its response dump holds
/// them, not marked cut.
fn logged_ok_and_dumped_whole(p: &ProxyProc, dumps: &std::path::Path, len: usize) {
    let log = poll_until(Duration::from_secs(5), "the access line", || {
        let t = p.stderr_text();
        t.contains(" access ").then_some(t)
    });
    assert!(
        log.contains(&format!("bytes_out={len} ")) && log.contains("outcome=ok"),
        "{log}"
    );
    let dump = response_dump(dumps);
    assert_eq!(dump["body"].as_str().map(str::len), Some(len));
    assert!(dump.get("stream_error").is_none(), "{dump}");
}

/// An answer the proxy makes itself (here: the upstream said nothing in time) is dumped as
/// it went to the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxys_own_error_answers_are_dumped() {
    let up = MockUpstream::plain(|_| Reply::hanging()).await;
    let (_dir, dumps, p) = proxy_with_dumps(&up, &["--upstream-idle-timeout", "200ms"]);
    let (status, _, body) = exchange(p.port, p.responses_request("{}")).await;
    assert_eq!(status, 504);
    let dump = response_dump(&dumps);
    assert_eq!(dump["status"], 504);
    let sent: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(dump["body"], sent);
    assert!(dump.get("stream_error").is_none(), "{dump}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dumps_past_the_memory_budget_are_cut_and_marked_not_the_exchange() {
    let up =
        MockUpstream::plain(|r| Reply::json(200, &format!("{{\"got\":{}}}", r.body.len()))).await;
    let (_dir, dumps, mut p) =
        proxy_with_dumps(&up, &["--dump-max-memory", "64KiB", "--log-level", "warn"]);
    let body = format!("{{\"input\":\"{}\"}}", "a".repeat(200 << 10));
    let (status, _, answer) = exchange(p.port, p.responses_request(&body)).await;
    assert_eq!(status, 200);
    // The upstream got every byte: only the copy was cut.
    assert_eq!(answer, format!("{{\"got\":{}}}", body.len()).as_bytes());
    let file = poll_until(Duration::from_secs(5), "the request's dump", || {
        let f = std::fs::read_dir(&dumps)
            .ok()?
            .map(|e| e.expect("entry").path())
            .find(|f| f.to_string_lossy().ends_with("-request.json"))?;
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&f).ok()?).ok()
    });
    assert_eq!(file["body_truncated"], true, "{}", file["body"]);
    assert_eq!(file["body_bytes"], body.len());
    assert_eq!(file["body_truncated_by"], "--dump-max-memory");
    let kept = file["body"].as_str().expect("text");
    assert!(
        kept.len() < 64 << 10 && body.starts_with(kept),
        "{}",
        kept.len()
    );
    let log = poll_until(Duration::from_secs(5), "the warning", || {
        let t = p.stderr_text();
        t.contains("dumps are using all of --dump-max-memory")
            .then_some(t)
    });
    assert!(log.contains("max_memory=65536"), "{log}");
    // The response's dump was written, or (its head finding no room while the request's
    // was still queued) counted as not dumped.
    let log = p.stop_and_read_log();
    let responses = std::fs::read_dir(&dumps)
        .expect("ls")
        .filter(|e| {
            e.as_ref()
                .expect("entry")
                .path()
                .to_string_lossy()
                .ends_with("-response.json")
        })
        .count();
    let not_dumped = if responses == 1 { "" } else { "not_dumped=1" };
    assert_eq!(
        log.contains("some exchanges were not dumped"),
        !not_dumped.is_empty(),
        "{log}"
    );
    assert!(log.contains(not_dumped), "{log}");
}

/// Exchanges that begin while an unfinished upload's dump holds all of `--dump-max-memory`
/// are served but not dumped, and the proxy says how many when it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchanges_not_dumped_for_want_of_memory_are_counted_at_exit() {
    use tokio::io::AsyncWriteExt;
    let up =
        MockUpstream::plain(|r| Reply::json(200, &format!("{{\"got\":{}}}", r.body.len()))).await;
    let (_dir, dumps, mut p) = proxy_with_dumps(&up, &["--dump-max-memory", "64KiB"]);
    let (first, rest) = (100 << 10, 100 << 10);
    let mut upload = tokio::net::TcpStream::connect(("127.0.0.1", p.port))
        .await
        .expect("connect");
    let head = format!(
        "POST /v1/responses HTTP/1.1\r\nhost: {}\r\nx-proxy-token: {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        p.host(),
        p.token,
        first + rest
    );
    upload.write_all(head.as_bytes()).await.expect("head");
    upload
        .write_all("a".repeat(first).as_bytes())
        .await
        .expect("first half");
    poll_until(Duration::from_secs(5), "the budget in use", || {
        p.stderr_text()
            .contains("dumps are using all of --dump-max-memory")
            .then_some(())
    });
    for _ in 0..2 {
        let (status, _, answer) = exchange(p.port, p.responses_request("{}")).await;
        assert_eq!(status, 200);
        assert_eq!(answer, b"{\"got\":2}");
    }
    upload
        .write_all("b".repeat(rest).as_bytes())
        .await
        .expect("second half");
    assert_eq!(&status_line(&mut upload).await, b"HTTP/1.1 200");
    let log = p.stop_and_read_log();
    let names: Vec<String> = std::fs::read_dir(&dumps)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    // Only the upload was dumped: its request, and its response unless that head too came
    // before the request's file was written and its memory given back.
    let requests = names
        .iter()
        .filter(|n| n.ends_with("-request.json"))
        .count();
    let responses = names
        .iter()
        .filter(|n| n.ends_with("-response.json"))
        .count();
    assert_eq!(requests, 1, "{names:?}");
    let not_dumped = if responses == 1 { 2 } else { 3 };
    assert!(
        log.contains("some exchanges were not dumped")
            && log.contains(&format!("not_dumped={not_dumped}")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_dumps_are_written_before_the_proxy_exits() {
    let up = MockUpstream::plain(|_| Reply::json(200, "{}")).await;
    let (_dir, dumps, mut p) = proxy_with_dumps(&up, &[]);
    // Enough to keep the writer busy well past the moment the proxy is told to stop.
    let body = format!("{{\"input\":\"{}\"}}", "a".repeat(4 << 20));
    let n = 12;
    let tasks: Vec<_> = (0..n)
        .map(|_| tokio::spawn(exchange(p.port, p.responses_request(&body))))
        .collect();
    for t in tasks {
        assert_eq!(t.await.expect("task").0, 200);
    }
    // (Twelve are enough: in a debug build here the writer has written none or one of the 24
    // files by now, and takes about 1.6 s for the rest, well within the 5 s the proxy waits.)
    let before = std::fs::read_dir(&dumps).expect("ls").count();
    assert!(
        before < 2 * n,
        "the writer is still busy when the proxy is told to stop"
    );
    let log = p.stop_and_read_log();
    // No waiting here: the proxy has exited, so every file must be there, complete.
    let files: Vec<_> = std::fs::read_dir(&dumps)
        .expect("ls")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(files.len(), 2 * n, "{log}");
    for f in &files {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(f).expect("read")).expect("complete");
        if f.to_string_lossy().ends_with("-request.json") {
            assert_eq!(v["body"]["input"].as_str().map(str::len), Some(4 << 20));
        }
    }
    assert!(!log.contains("were not all written"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwritable_dump_dir_never_affects_proxying() {
    let up = MockUpstream::plain(|_| Reply::json(200, "{}")).await;
    let (_dir, dumps, p) = proxy_with_dumps(&up, &["--log-level", "warn"]);
    // Make the directory unusable after start-up: replace it with a file.
    std::fs::remove_dir(&dumps).expect("rmdir");
    std::fs::write(&dumps, "not a dir").expect("file");
    for _ in 0..3 {
        let (status, _, body) = exchange(p.port, p.responses_request("{}")).await;
        assert_eq!(status, 200);
        assert_eq!(body, b"{}");
    }
    let log = poll_until(Duration::from_secs(5), "dump failure log", || {
        let t = p.stderr_text();
        t.contains("writing a dump file failed").then_some(t)
    });
    assert_eq!(
        log.matches("writing a dump file failed").count(),
        1,
        "reported once: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_in_json() {
    let up = MockUpstream::plain(|_| Reply::json(200, "{}").header("x-request-id", "req_42")).await;
    let p = start_proxy(&["--upstream-url", &up.url(), "--log-format", "json"]);
    let (status, _, _) = exchange(p.port, p.responses_request("{}")).await;
    assert_eq!(status, 200);
    let line = poll_until(Duration::from_secs(5), "access line", || {
        p.stderr_text()
            .lines()
            .find(|l| l.contains("\"access\""))
            .map(str::to_string)
    });
    let v: serde_json::Value = serde_json::from_str(&line).expect("json line");
    assert_eq!(v["method"], "POST");
    assert_eq!(v["path"], "/v1/responses");
    assert_eq!(v["status"], 200);
    assert_eq!(v["bytes_in"], 2);
    assert_eq!(v["bytes_out"], 2);
    assert_eq!(v["upstream_request_id"], "req_42");
    assert_eq!(v["outcome"], "ok");
    assert!(v["time"].is_string());
    // Both timed (a loopback exchange takes microseconds, never none), the answer's head
    // no later than its end.
    let (duration, ttfb) = (v["duration_ms"].as_f64(), v["ttfb_ms"].as_f64());
    assert!(
        matches!((duration, ttfb), (Some(d), Some(t)) if t > 0.0 && t <= d),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_threads_flag_sets_the_serving_threads() {
    let up = MockUpstream::plain(|_| Reply::json(200, "{}")).await;
    for n in [1usize, 3] {
        let p = start_proxy(&[
            "--upstream-url",
            &up.url(),
            "--worker-threads",
            &n.to_string(),
        ]);
        // One event-loop thread per worker and the log writer, nothing else (no dump dir:
        // no file threads).
        let threads = std::fs::read_dir(format!("/proc/{}/task", p.child.id()))
            .expect("task dir")
            .count();
        assert_eq!(threads, n + 1);
        let tasks: Vec<_> = (0..24)
            .map(|_| tokio::spawn(exchange(p.port, p.responses_request("{}"))))
            .collect();
        for t in tasks {
            assert_eq!(t.await.expect("task").0, 200);
        }
    }
    assert_eq!(up.count(), 48);
}

/// The descriptors registered with each epoll instance of `pid` (an instance reached
/// through several descriptors, as mio keeps a duplicate, is listed once).
fn registered_per_event_loop(pid: u32) -> std::collections::BTreeSet<Vec<u64>> {
    let mut out = std::collections::BTreeSet::new();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return out;
    };
    for fd in fds.flatten() {
        let is_epoll = std::fs::read_link(fd.path())
            .map(|l| l.to_string_lossy().contains("eventpoll"))
            .unwrap_or(false);
        if is_epoll {
            let name = fd.file_name().to_string_lossy().into_owned();
            let info =
                std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{name}")).unwrap_or_default();
            let mut targets: Vec<u64> = info
                .lines()
                .filter_map(|l| l.strip_prefix("tfd:"))
                .filter_map(|l| l.split_whitespace().next()?.parse().ok())
                .collect();
            targets.sort_unstable();
            out.insert(targets);
        }
    }
    out
}

/// The threads of process `pid` (`Threads:` in `/proc/PID/status`).
fn threads_of(pid: u32) -> Option<usize> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))?
        .trim()
        .parse()
        .ok()
}

/// Two worker threads by default, one where the process may use only one CPU, and what
/// `--worker-threads` says when given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_threads_default_to_two_or_one_per_cpu() {
    let up = MockUpstream::plain(|_| Reply::json(200, "{}")).await;
    let url = up.url();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cases: [(&[&str], &[&str], usize); 3] = [
        (&[], &[], cpus.min(2)),
        (&["taskset", "-c", "0"], &[], 1),
        (&["taskset", "-c", "0"], &["--worker-threads", "3"], 3),
    ];
    for (wrapper, extra, expected) in cases {
        let args = [&["--upstream-url", url.as_str()][..], extra].concat();
        let p = if wrapper.is_empty() {
            start_proxy(&args)
        } else {
            start_proxy_under(wrapper, &args)
        };
        // Requests are served, and no thread is added for them.
        for _ in 0..3 {
            let (status, _, _) = exchange(p.port, p.responses_request("{}")).await;
            assert_eq!(status, 200);
        }
        let pid = p.child.id();
        let n = poll_until(Duration::from_secs(5), "thread count", || threads_of(pid));
        assert_eq!(
            n,
            expected + 1,
            "{wrapper:?} {extra:?}: workers and the log writer"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_opened_together_go_seven_to_one_over_the_workers() {
    let hold = Arc::new(Notify::new());
    let h = Arc::clone(&hold);
    let up = MockUpstream::plain(move |_| {
        Reply::sse(vec![
            Step::Data(Bytes::from_static(b"data: 1\n\n")),
            Step::Wait(Arc::clone(&h)),
        ])
    })
    .await;
    let p = start_proxy(&["--upstream-url", &up.url(), "--worker-threads", "2"]);
    let pid = p.child.id();
    let before = registered_per_event_loop(pid);
    // Eight streams opened at once, all held open by the upstream.
    let opened: Vec<_> = (0..8)
        .map(|_| tokio::spawn(send(p.port, p.responses_request("{}"))))
        .collect();
    let mut streams = Vec::new();
    for t in opened {
        let mut body = t.await.expect("task").into_body();
        let _ = body.frame().await;
        streams.push(body);
    }
    // Each client socket and its upstream connection are registered with the event loop
    // of the worker serving them: the accepting worker keeps seven of the eight, the other
    // gets one, so both event loops have grown, by 14 and 2 sockets.
    let before_all: std::collections::BTreeSet<u64> = before.iter().flatten().copied().collect();
    let grown = |now: &std::collections::BTreeSet<Vec<u64>>| -> Vec<usize> {
        now.iter()
            .map(|fds| fds.iter().filter(|fd| !before_all.contains(fd)).count())
            .filter(|&g| g > 0)
            .collect()
    };
    let after = poll_until_async(Duration::from_secs(5), "sockets registered", || {
        let now = registered_per_event_loop(pid);
        (grown(&now).iter().sum::<usize>() >= 16).then_some(now)
    })
    .await;
    let mut g = grown(&after);
    g.sort_unstable();
    assert_eq!(
        g,
        [2, 14],
        "new sockets per event loop (before {before:?}, after {after:?})"
    );
    drop(streams);
}

/// The HTTP/2 client (`--upstream-http2`, hyper's) meets the same upstream faults as the
/// lean HTTP/1.1 path, with the same outcomes: no head in time is a 504, a silent stream is
/// cut at the idle timeout, a reset stream ends the client's abnormally, and a client that
/// leaves cancels its stream upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http2_upstream_faults_end_as_on_http1() {
    let hold = Arc::new(Notify::new());
    let h = Arc::clone(&hold);
    let up = MockUpstream::tls(move |r| {
        let first = Step::Data(Bytes::from_static(b"data: 1\n\n"));
        match &r.body[..] {
            b"\"big\"" => Reply::json(200, "{}").header("x-big", &"a".repeat(20 << 10)),
            b"\"hang\"" => Reply::hanging(),
            b"\"silent\"" => Reply::sse(vec![first, Step::Sleep(Duration::from_secs(30))]),
            b"\"abort\"" => Reply::sse(vec![
                first,
                Step::Sleep(Duration::from_millis(100)),
                Step::Abort,
            ]),
            _ => Reply::sse(vec![first, Step::Wait(Arc::clone(&h))]),
        }
    })
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let ca = write_file(dir.path(), "ca.pem", up.ca_pem.as_deref().expect("ca"));
    let url = up.url();
    let p = start_proxy(&[
        "--upstream-url",
        &url,
        "--upstream-ca",
        ca.to_str().expect("utf8"),
        "--upstream-http2",
        "--upstream-idle-timeout",
        "500ms",
    ]);

    // A response head over hyper's HTTP/2 limit (16 KiB) is refused like an oversized one
    // on HTTP/1.1.
    let (status, _, body) = exchange(p.port, p.responses_request("\"big\"")).await;
    assert_eq!(status, 502);
    assert_eq!(error_code(&body), "upstream_unavailable");

    let t0 = Instant::now();
    let (status, _, body) = exchange(p.port, p.responses_request("\"hang\"")).await;
    assert_eq!(status, 504);
    assert_eq!(error_code(&body), "upstream_timeout");
    assert!(t0.elapsed() >= Duration::from_millis(500));

    // A client that leaves cancels its stream upstream.
    let resp = send(p.port, p.responses_request("\"hold\"")).await;
    let mut body = resp.into_body();
    let _ = body.frame().await;
    drop(body);
    poll_until_async(Duration::from_secs(2), "upstream stream cancelled", || {
        (up.state.cancelled.lock().expect("lock").len() == 1).then_some(())
    })
    .await;
    poll_until(Duration::from_secs(5), "client_closed", || {
        p.stderr_text()
            .contains("outcome=client_closed")
            .then_some(())
    });

    for (what, log) in [
        ("\"silent\"", "outcome=upstream_idle_timeout"),
        ("\"abort\"", "outcome=upstream_broke"),
    ] {
        let resp = send(p.port, p.responses_request(what)).await;
        assert_eq!(resp.status(), 200, "{what}");
        let mut body = resp.into_body();
        let first = body.frame().await.expect("frame").expect("ok");
        assert_eq!(
            first.into_data().ok(),
            Some(Bytes::from_static(b"data: 1\n\n"))
        );
        let rest = tokio::time::timeout(Duration::from_secs(5), body.collect())
            .await
            .expect("in time");
        assert!(rest.is_err(), "{what}: a cut stream must not look complete");
        poll_until(Duration::from_secs(5), log, || {
            p.stderr_text().contains(log).then_some(())
        });
        if what == "\"silent\"" {
            // The stream cut at the idle timeout is cancelled upstream too.
            poll_until_async(Duration::from_secs(2), "silent stream cancelled", || {
                (up.state.cancelled.lock().expect("lock").len() == 2).then_some(())
            })
            .await;
        }
    }
    // Every request went over HTTP/2.
    assert!(
        up.requests()
            .iter()
            .all(|r| r.version == http::Version::HTTP_2)
    );
    drop(hold);
}
