//! The client-facing HTTP/1.1 side (`src/conn.rs`), byte by byte: keep-alive after refusals,
//! bodies that never arrive, malformed and oversized heads, `HEAD`, trickled heads,
//! `100 Continue` only when the body is wanted, HTTP/1.0 streams, pipelined chunked
//! requests, a large response written in parts to a client that pauses, a client that
//! resets mid-write, a head still arriving when shutdown begins. Each test reads the
//! proxy's answers off a raw socket.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

fn head(p: &ProxyProc, token: &str, extra: &str) -> String {
    format!(
        "POST /v1/responses HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\nx-proxy-token: {token}\r\n{extra}",
        p.host(),
    )
}

/// One response read off `s`: status, lowercased head text, body (by `Content-Length` or
/// chunked framing, decoded).
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> (u16, String, Vec<u8>) {
    tokio::time::timeout(Duration::from_secs(5), async {
        let end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            fill(s, buf).await;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        buf.drain(..end);
        let status = head[9..12].parse().expect("status");
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map(|v| v.trim().parse::<usize>().expect("length"));
        let body = if let Some(n) = length {
            while buf.len() < n {
                fill(s, buf).await;
            }
            buf.drain(..n).collect()
        } else {
            assert!(head.contains("transfer-encoding: chunked"), "{head}");
            let mut body = Vec::new();
            loop {
                let line_end = loop {
                    if let Some(at) = buf.windows(2).position(|w| w == b"\r\n") {
                        break at;
                    }
                    fill(s, buf).await;
                };
                let size = usize::from_str_radix(
                    std::str::from_utf8(&buf[..line_end]).expect("size line"),
                    16,
                )
                .expect("hex size");
                while buf.len() < line_end + 2 + size + 2 {
                    fill(s, buf).await;
                }
                body.extend_from_slice(&buf[line_end + 2..line_end + 2 + size]);
                buf.drain(..line_end + 2 + size + 2);
                if size == 0 {
                    break body;
                }
            }
        };
        (status, head, body)
    })
    .await
    .expect("a whole response in time")
}

async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) {
    let mut chunk = [0u8; 4096];
    let n = s.read(&mut chunk).await.expect("read");
    assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(buf));
    buf.extend_from_slice(&chunk[..n]);
}

/// Whether the proxy closes `s` (reads to the end) within a few seconds.
async fn closes(s: &mut TcpStream) -> bool {
    closes_within(s, Duration::from_secs(3)).await
}

/// Whether the proxy closes `s` (reads to the end) within `limit`.
async fn closes_within(s: &mut TcpStream, limit: Duration) -> bool {
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

async fn connect(p: &ProxyProc) -> TcpStream {
    TcpStream::connect(("127.0.0.1", p.port))
        .await
        .expect("connect")
}

/// Sends `raw` on a new connection: the answer must have `status` and say
/// `connection: close`, and the proxy must close the connection after it.
async fn answered_then_closed(p: &ProxyProc, raw: &str, status: u16) {
    let mut s = connect(p).await;
    let mut buf = Vec::new();
    s.write_all(raw.as_bytes()).await.expect("write");
    let (got, answer, _) = read_response(&mut s, &mut buf).await;
    assert_eq!(got, status, "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    // The proxy ends its side at once (a half close), then reads what the client may still
    // send for up to 1 s before it closes: the end must come well before that second is over.
    assert!(
        closes_within(&mut s, Duration::from_millis(800)).await,
        "the proxy ended its side of the connection after the answer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_whose_body_is_in_hand_keeps_the_connection() {
    let up =
        MockUpstream::plain(|r| Reply::json(200, &format!("{{\"n\":{}}}", r.body.len()))).await;
    let p = start_proxy(&["--upstream-url", &up.url()]);
    let mut s = connect(&p).await;
    let mut buf = Vec::new();
    // Wrong token, whole body sent: 401, and the connection carries the next request.
    s.write_all(head(&p, "wrong", "content-length: 5\r\n\r\n{\"a\"}").as_bytes())
        .await
        .expect("write");
    let (status, _, body) = read_response(&mut s, &mut buf).await;
    assert_eq!(status, 401);
    assert_eq!(error_code(&body), "invalid_proxy_token");
    // The same with a chunked body.
    s.write_all(
        head(
            &p,
            "wrong",
            "transfer-encoding: chunked\r\n\r\n3\r\n{\"a\r\n2\r\n\"}\r\n0\r\n\r\n",
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let (status, _, _) = read_response(&mut s, &mut buf).await;
    assert_eq!(status, 401);
    s.write_all(head(&p, &p.token, "content-length: 3\r\n\r\n{ }").as_bytes())
        .await
        .expect("write");
    let (status, head, body) = read_response(&mut s, &mut buf).await;
    assert_eq!(status, 200, "{head}");
    assert_eq!(body, b"{\"n\":3}");
    assert!(!head.contains("connection: close"), "{head}");
    assert_eq!(up.count(), 1, "only the authorised request went upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_whose_body_has_not_arrived_ends_the_connection() {
    let up = MockUpstream::plain(|_| Reply::json(200, "{}")).await;
    let p = start_proxy(&["--upstream-url", &up.url()]);
    let mut s = connect(&p).await;
    let mut buf = Vec::new();
    s.write_all(head(&p, "wrong", "content-length: 100000\r\n\r\n{\"partial\":").as_bytes())
        .await
        .expect("write");
    let (status, answer, _) = read_response(&mut s, &mut buf).await;
    assert_eq!(status, 401);
    assert!(answer.contains("connection: close"), "{answer}");
    // The rest of the body is read and discarded while the proxy closes, not taken for a
    // request head.
    let _ = s.write_all(&[b'x'; 4096]).await;
    assert!(closes(&mut s).await, "closed after the answer");
    // The same with a chunked body cut off after its first chunk: what is in hand is no
    // proof of where the body ends.
    let cut = head(
        &p,
        "wrong",
        "transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
    );
    answered_then_closed(&p, &cut, 401).await;
    assert_eq!(up.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_close_and_ambiguous_heads_end_the_connection() {
    let up = MockUpstream::plain(|_| Reply::json(200, "{}")).await;
    let p = start_proxy(&["--upstream-url", &up.url()]);
    // Asked for: the answer says so, and the proxy closes after it.
    let asked = head(
        &p,
        &p.token,
        "connection: close\r\ncontent-length: 2\r\n\r\n{}",
    );
    answered_then_closed(&p, &asked, 200).await;
    // A head with bare line feeds is refused, and what follows it is never read as a
    // request, however well its length is declared.
    let bare = head(&p, &p.token, "content-length: 2\r\n\r\n{}").replace("\r\n", "\n");
    answered_then_closed(&p, &bare, 400).await;
    assert_eq!(up.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_that_cannot_be_served_get_json_errors_and_access_lines() {
    let up = MockUpstream::plain(|_| Reply::json(200, "{}")).await;
    let p = start_proxy(&["--upstream-url", &up.url(), "--max-header-size", "8KiB"]);
    let many: String = (0..200).map(|i| format!("x-h{i}: 1\r\n")).collect();
    for (raw, status, code) in [
        (
            "\x16\x03\x01\x02\x00garbage\r\n\r\n".to_string(),
            400,
            "malformed_request",
        ),
        (
            head(
                &p,
                &p.token,
                "x-folded: a\r\n  b\r\ncontent-length: 2\r\n\r\n{}",
            ),
            400,
            "malformed_request",
        ),
        (
            head(
                &p,
                &p.token,
                &format!("{many}content-length: 2\r\n\r\n{{}}"),
            ),
            431,
            "request_header_fields_too_large",
        ),
        (
            head(
                &p,
                &p.token,
                &format!("x-big: {}\r\n\r\n", "a".repeat(9000)),
            ),
            431,
            "request_header_fields_too_large",
        ),
        (
            // Over the limit and never finished: refused without waiting for the end.
            format!("POST /v1/responses HTTP/1.1\r\nx-big: {}", "a".repeat(9000)),
            431,
            "request_header_fields_too_large",
        ),
    ] {
        let out = raw_exchange(p.port, raw.as_bytes(), Duration::from_secs(3)).await;
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.starts_with(&format!("HTTP/1.1 {status} ")),
            "{code}: {text}"
        );
        assert!(text.contains("connection: close"), "{text}");
        assert!(
            text.contains("\r\ndate: "),
            "errors the proxy makes are dated: {text}"
        );
        let body = &out[text.find("\r\n\r\n").expect("head end") + 4..];
        assert_eq!(error_code(body), code);
    }
    poll_until(Duration::from_secs(3), "access lines", || {
        let log = p.stderr_text();
        (log.contains("status=400 ") && log.contains("outcome=malformed_request")).then_some(())
    });
    // No method or path is known for a head that could not be read: the line says so.
    assert!(
        p.stderr_text()
            .contains(" access method=- path=- status=400 "),
        "{}",
        p.stderr_text()
    );
    let log = p.stderr_text();
    assert!(
        log.contains("outcome=request_header_fields_too_large"),
        "{log}"
    );
    assert!(
        !log.contains("garbage") && !log.contains("x-folded"),
        "nothing echoed: {log}"
    );
    assert_eq!(up.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_request_gets_a_head_without_a_body() {
    let up = MockUpstream::plain(|_| Reply::json(200, "{\"ok\":1}")).await;
    let p = start_proxy(&["--upstream-url", &up.url()]);
    let mut s = connect(&p).await;
    let raw = format!(
        "HEAD /v1/responses HTTP/1.1\r\nhost: {}\r\nx-proxy-token: {}\r\n\r\n",
        p.host(),
        p.token
    );
    s.write_all(raw.as_bytes()).await.expect("write");
    // The head alone: read up to its end, then the next request must be answered next.
    let mut buf = Vec::new();
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        fill(&mut s, &mut buf).await;
    }
    let text = String::from_utf8_lossy(&buf).to_string();
    assert!(text.starts_with("HTTP/1.1 403 "), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("content-length: "),
        "{text}"
    );
    assert!(text.ends_with("\r\n\r\n"), "no body bytes: {text}");
    buf.clear();
    s.write_all(head(&p, &p.token, "content-length: 2\r\n\r\n{}").as_bytes())
        .await
        .expect("write");
    let (status, _, body) = read_response(&mut s, &mut buf).await;
    assert_eq!((status, body.as_slice()), (200, &b"{\"ok\":1}"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_trickled_byte_by_byte_is_served_exactly() {
    let up = MockUpstream::plain(|_| Reply::json(200, "{}")).await;
    let p = start_proxy(&["--upstream-url", &up.url()]);
    let mut s = connect(&p).await;
    let body = "{\"input\":\"trickle\"}";
    let raw = head(
        &p,
        &p.token,
        &format!("content-length: {}\r\n\r\n{body}", body.len()),
    );
    for b in raw.as_bytes() {
        s.write_all(&[*b]).await.expect("write");
        // A pause between bytes so each arrives in its own segment.
        tokio::time::sleep(Duration::from_micros(300)).await;
    }
    let mut buf = Vec::new();
    let (status, _, _) = read_response(&mut s, &mut buf).await;
    assert_eq!(status, 200);
    let reqs = up.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].body, body.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continue_is_sent_only_when_the_body_is_wanted() {
    let up = MockUpstream::plain(|_| Reply::json(200, "{}")).await;
    let p = start_proxy(&["--upstream-url", &up.url()]);
    let mut s = connect(&p).await;
    s.write_all(
        head(
            &p,
            "wrong",
            "content-length: 2\r\nexpect: 100-continue\r\n\r\n",
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let mut buf = Vec::new();
    let (status, _, _) = read_response(&mut s, &mut buf).await;
    assert_eq!(status, 401, "the refusal comes first, without a 100");
    assert!(
        closes(&mut s).await,
        "the unsent body leaves the connection unusable"
    );
    assert_eq!(up.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_client_gets_a_stream_delimited_by_close() {
    let up = MockUpstream::plain(|_| {
        Reply::sse(vec![
            Step::Data(Bytes::from_static(b"data: 1\n\n")),
            Step::Data(Bytes::from_static(b"data: 2\n\n")),
        ])
    })
    .await;
    let p = start_proxy(&["--upstream-url", &up.url()]);
    let raw = format!(
        "POST /v1/responses HTTP/1.0\r\nhost: {}\r\ncontent-type: application/json\r\nx-proxy-token: {}\r\ncontent-length: 2\r\n\r\n{{}}",
        p.host(),
        p.token
    );
    let out = raw_exchange(p.port, raw.as_bytes(), Duration::from_secs(3)).await;
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text.split_once("\r\n\r\n").expect("head");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(
        !lower.contains("transfer-encoding") && !lower.contains("content-length"),
        "{head}"
    );
    assert!(lower.contains("connection: close"), "{head}");
    assert_eq!(body, "data: 1\n\ndata: 2\n\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_of_every_framing_are_answered_in_order() {
    let up = MockUpstream::plain(|r| {
        Reply::json(
            200,
            &format!("{{\"got\":{:?}}}", String::from_utf8_lossy(&r.body)),
        )
    })
    .await;
    let p = start_proxy(&["--upstream-url", &up.url()]);
    let mut s = connect(&p).await;
    let all = [
        head(
            &p,
            &p.token,
            "transfer-encoding: chunked\r\n\r\n1\r\n1\r\n0\r\n\r\n",
        ),
        head(&p, &p.token, "content-length: 1\r\n\r\n2"),
        head(&p, "wrong", "content-length: 1\r\n\r\nx"),
        head(
            &p,
            &p.token,
            "transfer-encoding: chunked\r\n\r\n2;ext=1\r\n33\r\n0\r\nx-t: 1\r\n\r\n",
        ),
    ]
    .concat();
    s.write_all(all.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let mut got = Vec::new();
    for _ in 0..4 {
        let (status, _, body) = read_response(&mut s, &mut buf).await;
        got.push((status, String::from_utf8_lossy(&body).to_string()));
    }
    assert_eq!(got[0], (200, "{\"got\":\"1\"}".to_string()));
    assert_eq!(got[1], (200, "{\"got\":\"2\"}".to_string()));
    assert_eq!(got[2].0, 401);
    assert_eq!(got[3], (200, "{\"got\":\"33\"}".to_string()));
    // And one connection carries many requests.
    for i in 0..50 {
        let body = format!("{{\"i\":{i}}}");
        s.write_all(
            head(
                &p,
                &p.token,
                &format!("content-length: {}\r\n\r\n{body}", body.len()),
            )
            .as_bytes(),
        )
        .await
        .expect("write");
        let (status, _, _) = read_response(&mut s, &mut buf).await;
        assert_eq!(status, 200);
    }
    assert_eq!(up.count(), 53);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunked_body_is_refused_and_not_completed_upstream() {
    let up = MockUpstream::plain(|_| Reply::json(200, "{}")).await;
    let p = start_proxy(&["--upstream-url", &up.url()]);
    let raw = head(
        &p,
        &p.token,
        "transfer-encoding: chunked\r\n\r\n2\r\n{}\r\nzz\r\n",
    );
    let out = raw_exchange(p.port, raw.as_bytes(), Duration::from_secs(3)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
    assert!(text.contains("request_body_error"), "{text}");
    assert_eq!(up.count(), 0, "no complete request upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_nothing_is_cut_off_after_the_body_read_timeout() {
    // Far more than every socket buffer between the upstream and the client holds.
    let chunk = Bytes::from(vec![b'x'; 1 << 20]);
    let up = MockUpstream::plain(move |_| {
        Reply::sse((0..48).map(|_| Step::Data(chunk.clone())).collect())
    })
    .await;
    let p = start_proxy(&["--upstream-url", &up.url(), "--body-read-timeout", "300ms"]);
    let mut s = connect(&p).await;
    s.write_all(head(&p, &p.token, "content-length: 2\r\n\r\n{}").as_bytes())
        .await
        .expect("write");
    // The client never reads: once the buffers are full the proxy waits 300 ms, then
    // closes the connection and cancels the upstream request.
    poll_until_async(
        Duration::from_secs(15),
        "upstream request cancelled",
        || (!up.state.cancelled.lock().expect("lock").is_empty()).then_some(()),
    )
    .await;
    poll_until(Duration::from_secs(5), "access line", || {
        p.stderr_text()
            .contains("outcome=client_closed")
            .then_some(())
    });
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_head_deadline_restarts_with_each_request() {
    // The connection's timer is left armed at the first request's deadline and moved on
    // only when it fires: a later request must still get its own full --header-read-timeout.
    let up = MockUpstream::plain(|_| Reply::json(200, "{}")).await;
    let p = start_proxy(&[
        "--upstream-url",
        &up.url(),
        "--header-read-timeout",
        "800ms",
    ]);
    let mut s = connect(&p).await;
    let mut buf = Vec::new();
    let first = head(&p, &p.token, "content-length: 2\r\n\r\n{}");
    let (part, rest) = first.split_at(20);
    s.write_all(part.as_bytes()).await.expect("write");
    // Deliberate pauses: what is tested is elapsed time. The first head completes 0.6 s in
    // (its deadline is at 0.8 s); the second is sent 1.1 s in, past the first deadline and
    // within its own (0.6 + 0.8 s).
    tokio::time::sleep(Duration::from_millis(600)).await;
    s.write_all(rest.as_bytes()).await.expect("write");
    let (status, _, _) = read_response(&mut s, &mut buf).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.write_all(first.as_bytes()).await.expect("write");
    let (status, _, _) = read_response(&mut s, &mut buf).await;
    assert_eq!(status, 200, "the second request had its own deadline");
    // And a head that then stalls still gets its 408.
    s.write_all(part.as_bytes()).await.expect("write");
    let (status, _, _) = read_response(&mut s, &mut buf).await;
    assert_eq!(status, 408);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_timer_serves_the_head_wait_and_the_upstream_wait() {
    // The connection's one timer is left at the head deadline (0.4 s) while the upstream
    // takes 1 s to answer: it fires early then and must be moved on to the upstream idle
    // deadline (30 s), not taken for it. The next head's wait must then move it back.
    let up = MockUpstream::plain(|_| Reply {
        head_delay: Duration::from_secs(1),
        ..Reply::json(200, "{}")
    })
    .await;
    let p = start_proxy(&[
        "--upstream-url",
        &up.url(),
        "--header-read-timeout",
        "400ms",
        "--upstream-idle-timeout",
        "30s",
    ]);
    let mut s = connect(&p).await;
    let mut buf = Vec::new();
    let request = head(&p, &p.token, "content-length: 2\r\n\r\n{}");
    for _ in 0..2 {
        s.write_all(request.as_bytes()).await.expect("write");
        let (status, _, body) = read_response(&mut s, &mut buf).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }
    // A head that stalls gets its 408 at the head deadline, long before the idle one.
    let t0 = std::time::Instant::now();
    s.write_all(&request.as_bytes()[..20]).await.expect("write");
    let (status, _, _) = read_response(&mut s, &mut buf).await;
    assert_eq!(status, 408);
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "408 after {:?}: the timer stayed at the upstream deadline",
        t0.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_end_of_a_body_that_comes_late_restarts_the_upstream_idle_clock() {
    // The chunked body's last data comes at once, its end 1 s later; the upstream answers
    // 0.6 s after the end. Counted from the data, 1.6 s is past the 1.5 s idle limit
    // (whatever the machine's pace: the answer cannot come sooner); counted from the end,
    // as it must be, 0.6 s is well within it.
    let up = MockUpstream::plain(|r| Reply {
        head_delay: Duration::from_millis(600),
        ..Reply::json(200, &format!("{{\"n\":{}}}", r.body.len()))
    })
    .await;
    let p = start_proxy(&[
        "--upstream-url",
        &up.url(),
        "--upstream-idle-timeout",
        "1500ms",
    ]);
    let mut s = connect(&p).await;
    let mut buf = Vec::new();
    let start = head(
        &p,
        &p.token,
        "transfer-encoding: chunked\r\n\r\n2\r\n{}\r\n",
    );
    s.write_all(start.as_bytes()).await.expect("write");
    // Deliberate pause: what is tested is elapsed time.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    s.write_all(b"0\r\n\r\n").await.expect("write");
    let (status, _, body) = read_response(&mut s, &mut buf).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(body, b"{\"n\":2}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_an_idle_kept_alive_connection_at_once() {
    // A client that keeps its connection open between requests must not hold the proxy's
    // shutdown for the grace period: the idle connection is closed when draining starts.
    let up = MockUpstream::plain(|_| Reply::json(200, "{}")).await;
    let mut p = start_proxy(&["--upstream-url", &up.url(), "--shutdown-grace", "20s"]);
    let mut s = connect(&p).await;
    let mut buf = Vec::new();
    s.write_all(head(&p, &p.token, "content-length: 2\r\n\r\n{}").as_bytes())
        .await
        .expect("write");
    let (status, _, _) = read_response(&mut s, &mut buf).await;
    assert_eq!(status, 200);
    let t0 = std::time::Instant::now();
    p.signal("TERM");
    let mut rest = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut rest))
        .await
        .expect("the idle connection was not closed at shutdown");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let st = p.wait_exit(Duration::from_secs(5));
    assert_eq!(st.code(), Some(0));
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_half_closes_counts_as_gone_and_its_stream_is_cancelled() {
    // A read of end-of-stream cannot be told from a close: like nginx and hyper's default,
    // the proxy takes a client that shuts its sending side as gone.
    let never = Arc::new(Notify::new());
    let hold = Arc::clone(&never);
    let up = MockUpstream::plain(move |_| {
        Reply::sse(vec![
            Step::Data(Bytes::from_static(b"data: first\n\n")),
            Step::Wait(Arc::clone(&hold)),
        ])
    })
    .await;
    let p = start_proxy(&["--upstream-url", &up.url()]);
    let mut s = connect(&p).await;
    s.write_all(head(&p, &p.token, "content-length: 2\r\n\r\n{}").as_bytes())
        .await
        .expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("data: first") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("the first event in time")
            .expect("read");
        assert!(n > 0, "closed before the first event");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(up.state.cancelled.lock().expect("lock").is_empty());
    s.shutdown().await.expect("half-close");
    poll_until_async(Duration::from_secs(5), "upstream request cancelled", || {
        (!up.state.cancelled.lock().expect("lock").is_empty()).then_some(())
    })
    .await;
    // The client's read side sees the end of the cut stream, not a clean last chunk.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("closed in time")
        .expect("read to the end");
    assert!(
        !String::from_utf8_lossy(&rest).contains("0\r\n\r\n"),
        "{rest:?}"
    );
    poll_until(Duration::from_secs(5), "access line", || {
        p.stderr_text()
            .contains("outcome=client_closed")
            .then_some(())
    });
    drop(never);
}

/// A pattern with no short period, so a byte skipped or repeated anywhere shows.
fn pattern(len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect()
}

/// `bytes` as an upstream's script: data steps of `size` bytes (the last one shorter).
fn steps_of(bytes: &[u8], size: usize) -> Vec<Step> {
    bytes
        .chunks(size)
        .map(|c| Step::Data(Bytes::copy_from_slice(c)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_response_to_a_client_that_pauses_arrives_byte_for_byte() {
    // A response many times larger than the socket buffers, read in bursts with pauses in
    // between: the buffers fill again and again, so the proxy's writes are taken in part
    // and must resume exactly where the socket stopped them.
    let expected = pattern(12 << 20);
    let steps = steps_of(&expected, 100_003);
    let up = MockUpstream::plain(move |_| Reply::sse(steps.clone())).await;
    let p = start_proxy(&["--upstream-url", &up.url()]);
    let mut s = connect(&p).await;
    s.write_all(head(&p, &p.token, "content-length: 2\r\n\r\n{}").as_bytes())
        .await
        .expect("write");
    let mut raw = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut since_pause = 0usize;
    // Bounded by the response's size: each round reads at least one byte.
    while !raw.ends_with(b"\r\n0\r\n\r\n") {
        assert!(raw.len() < 2 * expected.len(), "more than was sent");
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .expect("the whole response in time")
            .expect("read");
        assert!(n > 0, "closed after {} bytes", raw.len());
        raw.extend_from_slice(&chunk[..n]);
        since_pause += n;
        if since_pause >= 512 << 10 {
            since_pause = 0;
            // Not a wait for anything: the pause is the load pattern.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let (status, _, body) = read_response(&mut s, &mut raw).await;
    assert_eq!(status, 200);
    assert_eq!(body.len(), expected.len());
    assert!(
        body == expected,
        "the body differs from what the upstream sent"
    );
    assert!(raw.is_empty(), "{} bytes after the response", raw.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_resets_during_a_long_write_ends_its_connection() {
    // The client resets the connection while the proxy is writing a long response to it:
    // the failed write ends the connection (it is not taken for a full socket and retried)
    // and the upstream request is cancelled.
    let never = Arc::new(Notify::new());
    let hold = Arc::clone(&never);
    let chunk = Bytes::from(pattern(1 << 20));
    let up = MockUpstream::plain(move |_| {
        let mut steps: Vec<Step> = (0..48).map(|_| Step::Data(chunk.clone())).collect();
        steps.push(Step::Wait(Arc::clone(&hold)));
        Reply::sse(steps)
    })
    .await;
    let p = start_proxy(&["--upstream-url", &up.url()]);
    let mut s = connect(&p).await;
    s.write_all(head(&p, &p.token, "content-length: 2\r\n\r\n{}").as_bytes())
        .await
        .expect("write");
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 << 10];
    while got < 256 << 10 {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("data in time")
            .expect("read");
        assert!(n > 0, "closed early");
        got += n;
    }
    assert!(up.state.cancelled.lock().expect("lock").is_empty());
    // Closing a socket with unread data in its receive buffer resets the connection.
    let mut one = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), s.peek(&mut one))
        .await
        .expect("more data in time")
        .expect("peek");
    assert_eq!(n, 1);
    drop(s);
    poll_until_async(Duration::from_secs(5), "upstream request cancelled", || {
        (!up.state.cancelled.lock().expect("lock").is_empty()).then_some(())
    })
    .await;
    poll_until(Duration::from_secs(5), "access line", || {
        p.stderr_text()
            .contains("outcome=client_closed")
            .then_some(())
    });
    drop(never);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_response_of_known_length_arrives_whole_and_keeps_the_connection() {
    // An upstream answer with a `Content-Length`, larger than any one read: the proxy
    // passes it on in many pieces, all of them, under the same length, and the connection
    // carries the next request.
    let expected = pattern(3 << 20);
    let steps = steps_of(&expected, 65_537);
    let length = expected.len().to_string();
    let up = MockUpstream::plain(move |_| Reply {
        status: 200,
        headers: vec![
            ("content-type".into(), "application/octet-stream".into()),
            ("content-length".into(), length.clone()),
        ],
        steps: steps.clone(),
        head_delay: Duration::ZERO,
        hang: false,
    })
    .await;
    let p = start_proxy(&["--upstream-url", &up.url()]);
    let mut s = connect(&p).await;
    let mut buf = Vec::new();
    for round in 0..2 {
        s.write_all(head(&p, &p.token, "content-length: 2\r\n\r\n{}").as_bytes())
            .await
            .expect("write");
        let (status, head, body) = read_response(&mut s, &mut buf).await;
        assert_eq!(status, 200, "round {round}");
        assert!(
            head.contains(&format!("content-length: {}", expected.len())),
            "{head}"
        );
        assert!(body == expected, "round {round}: the body differs");
    }
    assert_eq!(up.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_came_before_the_upstream_broke_off_is_passed_on() {
    // The upstream sends an event and breaks off in the same breath: the event, already
    // gathered for the client's next write, is written before the connection is closed
    // (without the last chunk, so the client sees the stream cut).
    let (addr, _task) = raw_upstream(|mut s| async move {
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        while !got.ends_with(b"\r\n\r\n{}") {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
        let answer = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
            transfer-encoding: chunked\r\n\r\nc\r\ndata: last\n\n\r\n";
        let _ = s.write_all(answer).await;
        // Dropped: the stream ends before its last chunk.
    })
    .await;
    let url = format!("http://127.0.0.1:{}/v1/responses", addr.port());
    let p = start_proxy(&["--upstream-url", &url]);
    let mut s = connect(&p).await;
    s.write_all(head(&p, &p.token, "content-length: 2\r\n\r\n{}").as_bytes())
        .await
        .expect("write");
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
        .await
        .expect("closed in time")
        .expect("read to the end");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("data: last\n\n"), "{text}");
    assert!(!text.ends_with("0\r\n\r\n"), "{text}");
    poll_until(Duration::from_secs(5), "access line", || {
        p.stderr_text()
            .contains("outcome=upstream_broke")
            .then_some(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_after_its_body_while_the_upstream_thinks_is_noticed() {
    // While the request body is being read for the upstream the connection's watch for
    // the client leaving stands aside; once the body has ended it must take the watch up
    // again, or a client leaving before the answer's head goes unnoticed until the upstream
    // answers. Over HTTP/2 the body is read by another task than the connection's, which
    // must then be woken.
    for http2 in [false, true] {
        let slow = |_: &Recorded| Reply {
            head_delay: Duration::from_secs(30),
            ..Reply::json(200, "{}")
        };
        let up = if http2 {
            MockUpstream::tls(slow).await
        } else {
            MockUpstream::plain(slow).await
        };
        let dir = tempfile::tempdir().expect("dir");
        let mut args = vec!["--upstream-url".to_string(), up.url()];
        if let Some(ca) = &up.ca_pem {
            let ca = write_file(dir.path(), "ca.pem", ca);
            args.extend(["--upstream-ca".into(), ca.to_string_lossy().into_owned()]);
            args.push("--upstream-http2".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let p = start_proxy(&args);
        let mut s = connect(&p).await;
        s.write_all(
            head(
                &p,
                &p.token,
                "content-length: 10\r\nexpect: 100-continue\r\n\r\n",
            )
            .as_bytes(),
        )
        .await
        .expect("write");
        // `100 Continue` comes when the upstream side first asks for the body: it is being
        // read now, and the connection's watch stands aside.
        let mut got = Vec::new();
        while !got.ends_with(b"\r\n\r\n") {
            fill(&mut s, &mut got).await;
        }
        assert!(got.starts_with(b"HTTP/1.1 100 Continue"), "{got:?}");
        s.write_all(b"0123456789").await.expect("write");
        poll_until_async(Duration::from_secs(5), "the whole body upstream", || {
            (up.count() == 1).then_some(())
        })
        .await;
        drop(s);
        poll_until(Duration::from_secs(5), "access line", || {
            p.stderr_text()
                .contains("outcome=client_closed")
                .then_some(())
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_that_have_no_body_are_passed_on_without_framing() {
    // 204 and 304 from the upstream have no body: neither a length nor chunking is written
    // for them (RFC 9110 forbids both), and the connection carries the next request.
    let up = MockUpstream::plain(|r| {
        let status = match &r.body[..] {
            b"204" => 204,
            b"304" => 304,
            _ => 200,
        };
        Reply {
            steps: Vec::new(),
            ..Reply::json(status, "")
        }
    })
    .await;
    let p = start_proxy(&["--upstream-url", &up.url()]);
    let mut s = connect(&p).await;
    let mut buf = Vec::new();
    for status in [204u16, 304] {
        let body = status.to_string();
        s.write_all(head(&p, &p.token, &format!("content-length: 3\r\n\r\n{body}")).as_bytes())
            .await
            .expect("write");
        let end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            tokio::time::timeout(Duration::from_secs(5), fill(&mut s, &mut buf))
                .await
                .expect("an answer in time");
        };
        let answer = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        buf.drain(..end);
        assert!(
            answer.starts_with(&format!("http/1.1 {status}")),
            "{answer}"
        );
        assert!(
            !answer.contains("content-length") && !answer.contains("transfer-encoding"),
            "{answer}"
        );
        assert!(!answer.contains("connection: close"), "{answer}");
    }
    s.write_all(head(&p, &p.token, "content-length: 2\r\n\r\n{}").as_bytes())
        .await
        .expect("write");
    let (status, _, _) = read_response(&mut s, &mut buf).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_pipelined_after_a_large_body_is_answered() {
    // A large body makes the connection read in large pieces; going back to small ones
    // before the next head must keep what has already been read of it.
    let up =
        MockUpstream::plain(|r| Reply::json(200, &format!("{{\"n\":{}}}", r.body.len()))).await;
    let p = start_proxy(&["--upstream-url", &up.url()]);
    let mut s = connect(&p).await;
    let large = format!("\"{}\"", "x".repeat(1 << 20));
    let mut both = head(
        &p,
        &p.token,
        &format!("content-length: {}\r\n\r\n", large.len()),
    );
    both.push_str(&large);
    both.push_str(&head(&p, &p.token, "content-length: 2\r\n\r\n{}"));
    s.write_all(both.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let (status, _, body) = read_response(&mut s, &mut buf).await;
    assert_eq!(status, 200);
    assert_eq!(body, format!("{{\"n\":{}}}", large.len()).as_bytes());
    let (status, _, body) = read_response(&mut s, &mut buf).await;
    assert_eq!(status, 200);
    assert_eq!(body, b"{\"n\":2}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_client_still_sending_its_body_sees_an_orderly_close() {
    // The proxy refuses at the head while the body is still on its way. A socket closed
    // with bytes still coming answers them with a reset, and a client that sends its whole
    // body before it reads (as most do) then fails on a write and never reads the answer;
    // so the proxy ends its side and reads and discards what still comes (for a second,
    // up to 1 MiB), and the client's writes go through and it reads a clean end.
    let up = MockUpstream::plain(|_| Reply::json(200, "{}")).await;
    let p = start_proxy(&["--upstream-url", &up.url()]);
    let mut s = connect(&p).await;
    s.write_all(head(&p, "wrong", "content-length: 1000000\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut buf = Vec::new();
    let (status, _, _) = read_response(&mut s, &mut buf).await;
    assert_eq!(status, 401);
    // The proxy has answered and ended its side; the client goes on sending, spread over
    // a little time as a body is (well within the proxy's second), so that a proxy that
    // closed at once would have answered the first bytes with a reset.
    for i in 0..8 {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let sent = tokio::time::timeout(Duration::from_secs(5), s.write_all(&[b'x'; 4096]))
            .await
            .expect("written in time");
        assert!(sent.is_ok(), "write {i} after the answer failed: {sent:?}");
    }
    let mut rest = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("closed in time");
    assert!(end.is_ok(), "a reset instead of a clean end: {end:?}");
    assert!(
        rest.is_empty() && buf.is_empty(),
        "nothing after the answer"
    );
    // What is discarded is bounded: a client that goes on sending is cut off after 1 MiB
    // (a reset then), long before 32 MiB, whatever the socket buffers hold.
    let mut s = connect(&p).await;
    s.write_all(head(&p, "wrong", "content-length: 100000000\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut buf = Vec::new();
    let (status, _, _) = read_response(&mut s, &mut buf).await;
    assert_eq!(status, 401);
    let chunk = vec![b'x'; 64 << 10];
    let mut written = 0usize;
    let cut = tokio::time::timeout(Duration::from_secs(10), async {
        while written < 32 << 20 {
            if s.write_all(&chunk).await.is_err() {
                return true;
            }
            written += chunk.len();
        }
        false
    })
    .await
    .expect("written or cut off in time");
    assert!(cut, "all of {written} bytes taken after the answer");
    assert_eq!(up.count(), 0);
}

/// Bytes the kernel holds for the proxy, not yet read by it, on the proxy's side of the
/// client connection from local port `client`; `None` when there is no such socket.
fn unread_by_proxy(proxy: u16, client: u16) -> Option<u64> {
    tcp_sockets()
        .into_iter()
        .find(|r| r.local_port == proxy && r.remote_port == client)
        .map(|r| r.unread)
}

/// Writes `bytes` on `s` and waits until the proxy has read them.
async fn sent_and_read(p: &ProxyProc, s: &mut TcpStream, bytes: &[u8]) {
    s.write_all(bytes).await.expect("write");
    let client = s.local_addr().expect("local address").port();
    poll_until_async(Duration::from_secs(5), "the proxy read the bytes", || {
        (unread_by_proxy(p.port, client) == Some(0)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_still_arriving_when_shutdown_begins_is_answered_then_closed() {
    // Draining closes idle connections, not one whose request has begun: its head is read
    // to the end and answered, saying `connection: close`, and the connection then ends.
    let up = MockUpstream::plain(|_| Reply::json(200, r#"{"late":1}"#)).await;
    // One worker, so that the idle connection's close shows this connection's worker has
    // begun draining.
    let mut p = start_proxy(&[
        "--upstream-url",
        &up.url(),
        "--worker-threads",
        "1",
        "--shutdown-grace",
        "20s",
    ]);
    let raw = head(&p, &p.token, "content-length: 2\r\n\r\n{}");
    let (first, rest) = raw.as_bytes().split_at(24);
    let (second, third) = rest.split_at(24);
    let mut s = connect(&p).await;
    // Accepted in order: once the second connection has been answered, both are.
    let mut idle = connect(&p).await;
    let mut idle_buf = Vec::new();
    idle.write_all(head(&p, &p.token, "content-length: 2\r\n\r\n{}").as_bytes())
        .await
        .expect("write");
    assert_eq!(read_response(&mut idle, &mut idle_buf).await.0, 200);
    sent_and_read(&p, &mut s, first).await;
    p.signal("TERM");
    assert!(closes(&mut idle).await, "the idle connection closed");
    // Read while draining, the head still incomplete: it must go on being read.
    sent_and_read(&p, &mut s, second).await;
    s.write_all(third).await.expect("write");
    let mut buf = Vec::new();
    let (status, answer, body) = read_response(&mut s, &mut buf).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(body, br#"{"late":1}"#);
    assert!(answer.contains("connection: close"), "{answer}");
    assert!(closes(&mut s).await, "closed after the answer");
    assert_eq!(p.wait_exit(Duration::from_secs(5)).code(), Some(0));
}

/// The current UTC time to the minute, as log lines begin (`YYYY-MM-DDTHH:MM`).
fn utc_minute() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Every log line begins with the time it was written (UTC, `YYYY-MM-DDTHH:MM:SS.mmmZ`),
/// access lines and events alike; `--log-level warn` leaves out access lines and `info`
/// events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_carry_the_time_and_follow_the_level() {
    let up = MockUpstream::plain(|_| Reply::json(200, "{}")).await;
    let before = utc_minute();
    let mut p = start_proxy(&["--upstream-url", &up.url()]);
    assert_eq!(exchange(p.port, p.responses_request("{}")).await.0, 200);
    let log = p.stop_and_read_log();
    let after = utc_minute();
    for kind in [" info listening ", " info access ", " info stopped"] {
        let line = log
            .lines()
            .find(|l| l.contains(kind))
            .unwrap_or_else(|| panic!("{kind}: {log}"));
        let (time, _) = line.split_once(' ').expect("a time first");
        // Digits, but for the separators at their places.
        let marks = [
            (4, b'-'),
            (7, b'-'),
            (10, b'T'),
            (13, b':'),
            (16, b':'),
            (19, b'.'),
        ];
        let well_formed = time.len() == 24
            && time.ends_with('Z')
            && time.bytes().enumerate().take(23).all(|(i, c)| {
                marks
                    .iter()
                    .find(|&&(at, _)| at == i)
                    .map_or(c.is_ascii_digit(), |&(_, mark)| c == mark)
            });
        assert!(well_formed, "{line}");
        let minute = &time[..16];
        assert!(
            before.as_str() <= minute && minute <= after.as_str(),
            "{line}: not between {before} and {after}"
        );
    }
    let mut p = start_proxy(&["--upstream-url", &up.url(), "--log-level", "warn"]);
    assert_eq!(exchange(p.port, p.responses_request("{}")).await.0, 200);
    let log = p.stop_and_read_log();
    assert!(
        !log.contains(" access ") && !log.contains(" info "),
        "{log}"
    );
}
