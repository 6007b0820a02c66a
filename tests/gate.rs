//! Caller authentication and browser hardening, end to end: every refusal is checked
//! against the real binary, and the mock upstream must have seen nothing.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;

fn post(p: &ProxyProc) -> http::request::Builder {
    Request::post("/v1/responses").header("host", p.host())
}

fn body() -> Full<Bytes> {
    Full::new(Bytes::from_static(b"{}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_never_reach_the_upstream() {
    let up = MockUpstream::plain(|_| Reply::json(200, "{}")).await;
    let mut p = start_proxy(&["--upstream-url", &up.url(), "--http-shutdown"]);
    let t = p.token.clone();
    let json = "application/json";
    let cases: Vec<(&str, http::request::Builder, u16, &str)> = vec![
        (
            "no token",
            post(&p).header("content-type", json),
            401,
            "missing_proxy_token",
        ),
        (
            "wrong token",
            post(&p)
                .header("content-type", json)
                .header("x-proxy-token", "x".repeat(43)),
            401,
            "invalid_proxy_token",
        ),
        (
            "wrong bearer",
            post(&p)
                .header("content-type", json)
                .header("authorization", "Bearer sk-dummy"),
            401,
            "invalid_proxy_token",
        ),
        (
            "basic",
            post(&p)
                .header("content-type", json)
                .header("authorization", format!("Basic {t}")),
            401,
            "malformed_proxy_token",
        ),
        (
            "empty bearer",
            post(&p)
                .header("content-type", json)
                .header("authorization", "Bearer "),
            401,
            "malformed_proxy_token",
        ),
        (
            "origin with token",
            post(&p)
                .header("content-type", json)
                .header("x-proxy-token", &t)
                .header("origin", "http://127.0.0.1:1"),
            403,
            "browser_request_refused",
        ),
        (
            "ORIGIN null",
            post(&p)
                .header("content-type", json)
                .header("x-proxy-token", &t)
                .header("ORIGIN", "null"),
            403,
            "browser_request_refused",
        ),
        (
            "origin evil no token",
            post(&p)
                .header("content-type", "text/plain")
                .header("Origin", "https://evil.example"),
            403,
            "browser_request_refused",
        ),
        (
            "fetch metadata",
            post(&p)
                .header("content-type", json)
                .header("x-proxy-token", &t)
                .header("sec-fetch-site", "same-origin"),
            403,
            "browser_request_refused",
        ),
        (
            "rebinding host",
            Request::post("/v1/responses")
                .header("host", format!("attacker.example:{}", p.port))
                .header("content-type", json)
                .header("x-proxy-token", &t),
            403,
            "invalid_host",
        ),
        (
            "other port",
            Request::post("/v1/responses")
                .header("host", format!("127.0.0.1:{}", p.port.wrapping_add(1)))
                .header("content-type", json)
                .header("x-proxy-token", &t),
            403,
            "invalid_host",
        ),
        (
            "text/plain",
            post(&p)
                .header("content-type", "text/plain")
                .header("x-proxy-token", &t),
            415,
            "unsupported_media_type",
        ),
        (
            "form",
            post(&p)
                .header("content-type", "application/x-www-form-urlencoded")
                .header("x-proxy-token", &t),
            415,
            "unsupported_media_type",
        ),
        (
            "multipart",
            post(&p)
                .header("content-type", "multipart/form-data; boundary=zz")
                .header("x-proxy-token", &t),
            415,
            "unsupported_media_type",
        ),
        (
            "no content-type",
            post(&p).header("x-proxy-token", &t),
            415,
            "unsupported_media_type",
        ),
        (
            "text/plain no token",
            post(&p).header("content-type", "text/plain;charset=UTF-8"),
            415,
            "unsupported_media_type",
        ),
        (
            "options preflight",
            Request::options("/v1/responses")
                .header("host", p.host())
                .header("x-proxy-token", &t)
                .header("content-type", json),
            403,
            "route_not_allowed",
        ),
        (
            "shutdown no token",
            Request::get("/shutdown").header("host", p.host()),
            401,
            "missing_proxy_token",
        ),
        (
            "shutdown origin",
            Request::get("/shutdown")
                .header("host", p.host())
                .header("x-proxy-token", &t)
                .header("origin", "http://localhost"),
            403,
            "browser_request_refused",
        ),
        (
            "unknown path no token",
            Request::get("/admin").header("host", p.host()),
            401,
            "missing_proxy_token",
        ),
    ];
    for (name, builder, status, code) in cases {
        let body = if name.starts_with("shutdown") || name.starts_with("unknown") {
            Full::new(Bytes::new())
        } else {
            body()
        };
        let (got, headers, resp_body) = exchange(p.port, builder.body(body).expect("req")).await;
        assert_eq!(got, status, "{name}");
        assert_eq!(error_code(&resp_body), code, "{name}");
        assert!(
            headers
                .keys()
                .all(|k| !k.as_str().starts_with("access-control-")),
            "{name}: CORS header"
        );
        let text = String::from_utf8_lossy(&resp_body);
        assert!(
            !text.contains(&t)
                && !text.contains("evil")
                && !text.contains("attacker")
                && !text.contains("sk-dummy"),
            "{name} echoed: {text}"
        );
        if status == 401 {
            assert!(
                text.contains("server-info"),
                "{name}: the 401 says where the token is"
            );
        }
    }
    assert_eq!(up.count(), 0, "nothing reached the upstream");
    // The proxy still serves, and /shutdown without a token did not stop it.
    let (status, _, _) = exchange(p.port, p.responses_request("{}")).await;
    assert_eq!(status, 200);
    assert!(!p.stop_and_read_log().contains(&t), "token in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_in_either_header_is_accepted_and_stripped() {
    let up = MockUpstream::plain(|_| Reply::json(200, "{}")).await;
    let p = start_proxy(&["--upstream-url", &up.url()]);
    let t = p.token.clone();
    let reqs = vec![
        post(&p)
            .header("content-type", "application/json")
            .header("x-proxy-token", &t),
        post(&p)
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {t}")),
        post(&p)
            .header("content-type", "Application/JSON; charset=utf-8")
            .header("X-Proxy-Token", &t)
            .header("authorization", "Bearer sk-dummy-sdk-key"),
        Request::post("/v1/responses")
            .header("host", format!("localhost:{}", p.port))
            .header("content-type", "application/json")
            .header("x-proxy-token", &t),
        Request::post("/v1/responses")
            .header("host", format!("[::1]:{}", p.port))
            .header("content-type", "application/json")
            .header("x-proxy-token", &t),
    ];
    for (i, b) in reqs.into_iter().enumerate() {
        let (status, _, _) = exchange(p.port, b.body(body()).expect("req")).await;
        assert_eq!(status, 200, "case {i}");
    }
    let seen = up.requests();
    assert_eq!(seen.len(), 5);
    for r in seen {
        assert_eq!(r.all("authorization"), [format!("Bearer {KEY}")]);
        assert!(r.all("x-proxy-token").is_empty());
        let all = format!(
            "{:?} {} {}",
            r.headers,
            r.target,
            String::from_utf8_lossy(&r.body)
        );
        assert!(!all.contains(&t) && !all.contains("sk-dummy"), "{all}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_needs_the_token() {
    let up = MockUpstream::plain(|_| Reply::json(200, "{}")).await;
    let mut p = start_proxy(&["--upstream-url", &up.url(), "--http-shutdown"]);
    let get = |tok: Option<&str>| {
        let mut b = Request::get("/shutdown").header("host", p.host());
        if let Some(t) = tok {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        b.body(Full::new(Bytes::new())).expect("req")
    };
    let (status, _, _) = exchange(p.port, get(None)).await;
    assert_eq!(status, 401);
    let (status, _, _) = exchange(p.port, get(Some("wrong"))).await;
    assert_eq!(status, 401);
    let (status, _, _) = exchange(p.port, p.responses_request("{}")).await;
    assert_eq!(status, 200, "still serving");
    let tok = p.token.clone();
    let (status, _, _) = exchange(p.port, get(Some(&tok))).await;
    assert_eq!(status, 200);
    assert_eq!(p.wait_exit(Duration::from_secs(2)).code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_authorised_and_fifty_unauthorised_concurrent_requests() {
    let up = MockUpstream::plain(|_| Reply::json(200, "{}")).await;
    let p = start_proxy(&["--upstream-url", &up.url()]);
    let mut tasks = Vec::new();
    for i in 0..100 {
        let req = if i % 2 == 0 {
            p.responses_request("{}")
        } else {
            let mut r = p.responses_request("{}");
            r.headers_mut()
                .insert("x-proxy-token", http::HeaderValue::from_static("nope"));
            r
        };
        let port = p.port;
        tasks.push(tokio::spawn(async move {
            (i % 2 == 0, exchange(port, req).await.0)
        }));
    }
    let t0 = Instant::now();
    for t in tasks {
        let (authorised, status) = t.await.expect("join");
        assert_eq!(status, if authorised { 200 } else { 401 });
    }
    assert!(t0.elapsed() < Duration::from_secs(30));
    assert_eq!(up.count(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_browser_shaped_requests_are_refused() {
    let up = MockUpstream::plain(|_| Reply::json(200, "{}")).await;
    let p = start_proxy(&["--upstream-url", &up.url(), "--http-shutdown"]);
    let h = p.host();
    let raws = [
        // A simple cross-origin text/plain POST, as fetch(no-cors) sends it.
        format!(
            "POST /v1/responses HTTP/1.1\r\nHost: {h}\r\nOrigin: http://evil.example\r\nContent-Type: text/plain;charset=UTF-8\r\nContent-Length: 2\r\n\r\n{{}}"
        ),
        // sendBeacon.
        format!(
            "POST /v1/responses HTTP/1.1\r\nHost: {h}\r\nOrigin: null\r\nSec-Fetch-Site: cross-site\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n{{}}"
        ),
        // A preflight.
        format!(
            "OPTIONS /v1/responses HTTP/1.1\r\nHost: {h}\r\nOrigin: http://evil.example\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: content-type,x-proxy-token\r\n\r\n"
        ),
        // An <img src> to /shutdown: no Origin, no token.
        format!("GET /shutdown HTTP/1.1\r\nHost: {h}\r\nSec-Fetch-Dest: image\r\n\r\n"),
        format!("GET /shutdown HTTP/1.1\r\nHost: {h}\r\n\r\n"),
    ];
    for raw in raws {
        let out = raw_exchange(p.port, raw.as_bytes(), Duration::from_millis(500)).await;
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 40"), "{raw}\n=> {text}");
        assert!(
            !text.to_ascii_lowercase().contains("access-control-allow"),
            "{text}"
        );
    }
    assert_eq!(up.count(), 0);
    let (status, _, _) = exchange(p.port, p.responses_request("{}")).await;
    assert_eq!(status, 200, "still serving");
}
