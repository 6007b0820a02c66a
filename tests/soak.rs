//! Soak: 10,000 sequential and 10,000 concurrent (64 at a time) exchanges. None lost, none
//! duplicated upstream, memory flat, descriptors back to baseline.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use tokio::net::TcpStream;

fn rss_kb(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .count()
}

/// One keep-alive connection sending `ids` one after another.
async fn worker(port: u16, host: String, token: String, ids: Vec<usize>) {
    let s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let _ = s.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
        .await
        .expect("hs");
    let conn = tokio::spawn(conn);
    for id in ids {
        let req = Request::post("/v1/responses")
            .header("host", &host)
            .header("content-type", "application/json")
            .header("x-proxy-token", &token)
            .body(Full::new(Bytes::from(format!("{{\"id\":{id}}}"))))
            .expect("req");
        sender
            .ready()
            .await
            .expect("connection ready for the next request");
        let resp = tokio::time::timeout(Duration::from_secs(30), sender.send_request(req))
            .await
            .expect("in time")
            .expect("send");
        assert_eq!(resp.status(), 200, "request {id}");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(body, Bytes::from(format!("{{\"echo\":{id}}}")));
    }
    drop(sender);
    let _ = conn.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_sequential_and_ten_thousand_concurrent() {
    let up = MockUpstream::plain(|r| {
        let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
        Reply::json(200, &format!("{{\"echo\":{}}}", v["id"]))
    })
    .await;
    let p = start_proxy(&[
        "--upstream-url",
        &up.url(),
        "--upstream-pool-idle-timeout",
        "1s",
        "--log-level",
        "warn",
    ]);
    let pid = p.child.id();
    let baseline_fds = fds(pid);
    let t0 = Instant::now();

    // Sequential, in two halves of 5,000 on one keep-alive connection each.
    worker(p.port, p.host(), p.token.clone(), (0..5000).collect()).await;
    let rss_first = rss_kb(pid);
    worker(p.port, p.host(), p.token.clone(), (5000..10_000).collect()).await;
    let rss_second = rss_kb(pid);

    // Concurrent: 64 connections, 10,000 requests.
    let mut tasks = Vec::new();
    for w in 0..64usize {
        let ids: Vec<usize> = (10_000..20_000).filter(|i| i % 64 == w).collect();
        tasks.push(tokio::spawn(worker(p.port, p.host(), p.token.clone(), ids)));
    }
    for t in tasks {
        t.await.expect("worker");
    }
    let rss_concurrent = rss_kb(pid);
    let elapsed = t0.elapsed();

    let reqs = up.requests();
    assert_eq!(reqs.len(), 20_000, "lost or duplicated upstream");
    let ids: HashSet<u64> = reqs
        .iter()
        .map(|r| {
            serde_json::from_slice::<serde_json::Value>(&r.body).expect("json")["id"]
                .as_u64()
                .expect("id")
        })
        .collect();
    assert_eq!(ids.len(), 20_000, "duplicated upstream");
    assert!(
        reqs.iter()
            .all(|r| r.all("authorization") == [format!("Bearer {KEY}")])
    );

    let opened = *up.state.connections.lock().expect("lock");
    println!("soak: upstream connections opened: {opened}");
    // 64 clients at once can briefly need more connections than 64 (a connection goes
    // back to the pool just after its response ends), but nowhere near one per request.
    assert!(
        opened <= 1000,
        "upstream connections are pooled, not opened per request: {opened}"
    );
    println!(
        "soak: 20,000 exchanges in {elapsed:?}; RSS after 5k {rss_first} kB, after 10k {rss_second} kB, after 20k {rss_concurrent} kB; fds baseline {baseline_fds}"
    );
    assert!(
        rss_second as f64 <= rss_first as f64 * 1.10,
        "RSS grew from {rss_first} kB to {rss_second} kB over the second 5,000"
    );
    // Client connections are closed; pooled upstream connections idle out after 1 s.
    let fds_now = Arc::new(std::sync::Mutex::new(0));
    let f = Arc::clone(&fds_now);
    poll_until_async(
        Duration::from_secs(10),
        "descriptors back to baseline",
        move || {
            let n = fds(pid);
            *f.lock().expect("lock") = n;
            (n <= baseline_fds).then_some(())
        },
    )
    .await;
}
