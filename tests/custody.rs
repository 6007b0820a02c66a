//! Secret custody under real traffic: one copy of the key in memory, locked and out of
//! dumps, unreadable by the same unprivileged user, never written out, never reflected.
//! Run as root (CI does): reading another process's memory needs it.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::memscan;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use tokio::sync::Notify;

/// A random fake key for this run, so no other process or file on the machine holds it.
fn random_key() -> String {
    let mut raw = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut raw))
        .expect("urandom");
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    format!("sk-test-{hex}")
}

/// The mock upstream for the mixed run: the request body says what to do.
fn mixed_reply(r: &Recorded, hold: &Arc<Notify>) -> Reply {
    let body = String::from_utf8_lossy(&r.body);
    let auth = r.all("authorization").join(",");
    if body.contains("\"sse\"") {
        let mut steps: Vec<Step> = (0..5)
            .map(|i| {
                Step::Data(Bytes::from(format!(
                    "event: response.output_text.delta\ndata: {{\"i\":{i}}}\n\n"
                )))
            })
            .collect();
        steps.push(Step::Data(Bytes::from_static(
            b"event: response.completed\ndata: {}\n\n",
        )));
        Reply::sse(steps)
    } else if body.contains("\"big\"") {
        Reply::json(200, &format!("{{\"blob\":\"{}\"}}", "z".repeat(1 << 20)))
    } else if body.contains("\"4xx\"") {
        Reply::json(429, r#"{"error":{"message":"slow down"}}"#)
    } else if body.contains("\"5xx\"") {
        Reply::json(500, r#"{"error":{"message":"boom"}}"#)
    } else if body.contains("\"hold\"") {
        Reply::sse(vec![
            Step::Data(Bytes::from_static(b"data: 1\n\n")),
            Step::Wait(Arc::clone(hold)),
            Step::Data(Bytes::from_static(b"data: 2\n\n")),
        ])
    } else if body.contains("\"break\"") {
        Reply::sse(vec![
            Step::Data(Bytes::from_static(b"data: 1\n\n")),
            Step::Sleep(Duration::from_millis(5)),
            Step::Abort,
        ])
    } else if body.contains("\"echo\"") {
        // A misbehaving upstream that reflects the credential it received.
        Reply::json(200, &format!("{{\"you_sent\":\"{auth}\"}}")).header("x-echo", &auth)
    } else {
        Reply::json(200, r#"{"id":"resp_1","status":"completed"}"#)
    }
}

async fn one_exchange(p_port: u16, token: &str, host: &str, kind: usize) {
    let body = match kind % 9 {
        0 => r#"{"mode":"sse","stream":true}"#.to_string(),
        1 => format!("{{\"mode\":\"big\",\"pad\":\"{}\"}}", "q".repeat(256 << 10)),
        2 => r#"{"mode":"4xx"}"#.to_string(),
        3 => r#"{"mode":"5xx"}"#.to_string(),
        4 => r#"{"mode":"break"}"#.to_string(),
        5 => r#"{"mode":"echo"}"#.to_string(),
        6 => r#"{"mode":"hold"}"#.to_string(),
        _ => r#"{"mode":"plain"}"#.to_string(),
    };
    let mut req = Request::post("/v1/responses")
        .header("host", host)
        .header("content-type", "application/json");
    if kind % 9 != 8 {
        req = req.header("x-proxy-token", token);
    }
    let req = req.body(Full::new(Bytes::from(body))).expect("req");
    let resp = tokio::time::timeout(Duration::from_secs(20), try_send(p_port, req))
        .await
        .expect("answer in time");
    let resp = match resp {
        Ok(r) => r,
        // An upstream that breaks off at once may take the client's connection down before
        // the head is out: an abnormal end, which is what that case is about.
        Err(_) if kind % 9 == 4 => return,
        Err(e) => panic!("exchange {kind}: {e}"),
    };
    let mut b = resp.into_body();
    if kind % 9 == 6 {
        // A client that disconnects mid-stream.
        let _ = b.frame().await;
        drop(b);
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(20), b.collect())
        .await
        .expect("body in time");
}

/// How the proxy reaches the mock upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// Plain http: the lean HTTP/1.1 path.
    Plain,
    /// https, the default: the lean HTTP/1.1 path over TLS.
    Tls,
    /// https with `--upstream-http2`: the general client.
    TlsH2,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_copy_of_the_key_at_rest_after_mixed_traffic() {
    one_copy_at_rest(Path::Tls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_copy_of_the_key_at_rest_after_mixed_traffic_over_http2() {
    one_copy_at_rest(Path::TlsH2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_copy_of_the_key_at_rest_after_mixed_traffic_over_plain_http() {
    one_copy_at_rest(Path::Plain).await;
}

/// 1,008 mixed exchanges through an upstream reached by `path`, then scans of the proxy's
/// memory: exactly one copy of the key once idle, and on the lean paths (which free the
/// request head as soon as it is written) also while 50 streams are open.
async fn one_copy_at_rest(path: Path) {
    if !is_root() {
        eprintln!("skipped: reading another process's memory needs root (CI runs as root)");
        return;
    }
    let key = random_key();
    let hold = Arc::new(Notify::new());
    let h = Arc::clone(&hold);
    let up = if path != Path::Plain {
        MockUpstream::tls(move |r| mixed_reply(r, &h)).await
    } else {
        MockUpstream::plain(move |r| mixed_reply(r, &h)).await
    };
    let dir = tempfile::tempdir().expect("dir");
    let url = up.url();
    let mut args = vec!["--upstream-url", &url, "--upstream-pool-idle-timeout", "1s"];
    let ca;
    if let Some(pem) = up.ca_pem.as_deref() {
        ca = write_file(dir.path(), "ca.pem", pem)
            .to_string_lossy()
            .into_owned();
        args.extend(["--upstream-ca", ca.as_str()]);
    }
    if path == Path::TlsH2 {
        args.push("--upstream-http2");
    }
    let mut p = start_proxy_with(&args, &format!("{key}\n"), &[]);
    println!("upstream: {path:?}");
    let pid = p.child.id();
    let bearer = format!("Bearer {key}");
    let huffman = memscan::hpack_huffman_of(&bearer).await;
    let needles: Vec<&[u8]> = vec![key.as_bytes(), &huffman];

    // 1,008 mixed exchanges, 8 at a time.
    let done = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..8 {
        let (token, host, done) = (p.token.clone(), p.host(), Arc::clone(&done));
        let port = p.port;
        workers.push(tokio::spawn(async move {
            for i in 0..126 {
                one_exchange(port, &token, &host, w * 126 + i).await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for w in workers {
        w.await.expect("worker");
    }
    assert_eq!(done.load(Ordering::Relaxed), 1008);
    // Release anything the disconnected clients left waiting upstream.
    for _ in 0..200 {
        hold.notify_one();
    }

    // In flight: 50 open streams (asserted on the lean paths, reported for HTTP/2, whose
    // connection keeps its last encoded head in its write buffer).
    let hold2 = Arc::new(Notify::new());
    let _ = &hold2;
    let mut open = Vec::new();
    for _ in 0..50 {
        let req = Request::post("/v1/responses")
            .header("host", p.host())
            .header("content-type", "application/json")
            .header("x-proxy-token", &p.token)
            .body(Full::new(Bytes::from_static(br#"{"mode":"hold"}"#)))
            .expect("req");
        let resp = send(p.port, req).await;
        let mut b = resp.into_body();
        let _ = b.frame().await;
        open.push(b);
    }
    let in_flight = memscan::scan(pid, &needles);
    println!(
        "key copies with 50 streams in flight: {} (raw {}, hpack-huffman {})",
        in_flight.len(),
        in_flight.iter().filter(|h| h.needle == 0).count(),
        in_flight.iter().filter(|h| h.needle == 1).count()
    );
    if path != Path::TlsH2 {
        let report: Vec<String> = in_flight.iter().map(ToString::to_string).collect();
        assert_eq!(
            in_flight.len(),
            1,
            "stray copies with streams in flight:\n{}",
            report.join("\n")
        );
    }
    for _ in 0..50 {
        hold.notify_one();
    }
    for b in open {
        let _ = tokio::time::timeout(Duration::from_secs(10), b.collect()).await;
    }

    // At rest: once pooled upstream connections have idled out, exactly one copy remains,
    // in the locked page.
    let t0 = Instant::now();
    let mut hits;
    let mut first = true;
    loop {
        hits = memscan::scan(pid, &needles);
        if first {
            println!(
                "key copies right after the traffic, pooled connections still open: {}",
                hits.len()
            );
            first = false;
        }
        if hits.len() == 1 || t0.elapsed() > Duration::from_secs(15) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let report: Vec<String> = hits.iter().map(ToString::to_string).collect();
    println!(
        "key copies at rest after {:?}: {}\n{}",
        t0.elapsed(),
        hits.len(),
        report.join("\n")
    );
    assert_eq!(
        hits.len(),
        1,
        "stray copies of the key:\n{}",
        report.join("\n")
    );
    let only = &hits[0];
    assert_eq!(only.needle, 0);
    assert!(
        only.mapping.vm_flags.iter().any(|f| f == "lo"),
        "the key's page is not locked: {only}"
    );
    assert!(
        only.mapping.vm_flags.iter().any(|f| f == "dd"),
        "the key's page is not excluded from dumps: {only}"
    );
    assert!(memscan::vm_locked_kb(pid) > 0, "VmLck is 0");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("core");
    assert_eq!(core.split_whitespace().nth(4), Some("0"), "{core}");
    assert!(!p.stop_and_read_log().contains(&key));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_unprivileged_user_cannot_read_it() {
    if !is_root() {
        eprintln!("skipped: switching to the user nobody needs root (CI runs as root)");
        return;
    }
    let key = random_key();
    let up = MockUpstream::plain(|_| Reply::json(200, "{}")).await;
    let dir = tempfile::tempdir().expect("dir");
    std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).expect("chown");
    let info = dir.path().join("info.json");
    let child = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            bin(),
            "--upstream-url",
            &up.url(),
            "--server-info",
        ])
        .arg(&info)
        .env("LEAKED_KEY", &key)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("setpriv");
    let mut child = KillOnDrop(child);
    let child = &mut child.0;
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(format!("{key}\n").as_bytes())
            .expect("key");
    }
    let err = capture(child.stderr.take().expect("stderr"));
    let pid: u32 = poll_until(Duration::from_secs(10), "server-info", || {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&info).ok()?).ok()?;
        v["pid"].as_u64().map(|p| p as u32)
    });
    // As nobody, the proxy's own user: memory, environment and ptrace are all refused.
    let probe = r#"
import ctypes, os, sys
pid = int(sys.argv[1])
res = []
for path in (f"/proc/{pid}/mem", f"/proc/{pid}/environ"):
    try:
        with open(path, "rb") as f:
            f.read(1)
        res.append(path + ": READABLE")
    except OSError as e:
        res.append(path + ": refused " + str(e.errno))
libc = ctypes.CDLL(None, use_errno=True)
r = libc.ptrace(16, pid, None, None)
res.append("ptrace: " + ("ATTACHED" if r == 0 else "refused " + str(ctypes.get_errno())))
print("\n".join(res))
"#;
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            probe,
            &pid.to_string(),
        ])
        .output()
        .expect("probe");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "probe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.matches("refused").count(), 3, "{text}");
    assert!(
        !text.contains("READABLE") && !text.contains("ATTACHED"),
        "{text}"
    );
    // Read as root: the launching environment no longer holds the key.
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("environ as root");
    assert!(
        !environ.windows(key.len()).any(|w| w == key.as_bytes()),
        "key in /proc/PID/environ"
    );
    let stderr_text = String::from_utf8_lossy(&err.lock().expect("lock")).into_owned();
    assert!(
        stderr_text.contains("LEAKED_KEY"),
        "warned about the variable: {stderr_text}"
    );
}

/// Kills the child when the test ends, pass or fail.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflected_keys_are_masked_in_headers_and_split_chunks() {
    let key = random_key();
    let k = key.clone();
    let (a, b) = key.split_at(10);
    let (a, b) = (a.to_string(), b.to_string());
    let hold = Arc::new(Notify::new());
    let h = Arc::clone(&hold);
    let up = MockUpstream::plain(move |_| {
        Reply::sse(vec![
            Step::Data(Bytes::from(format!("data: {{\"whole\":\"{k}\"}}\n\n"))),
            Step::Wait(Arc::clone(&h)),
            Step::Data(Bytes::from(format!("data: {{\"split\":\"{a}"))),
            Step::Data(Bytes::from(format!("{b}\"}}\n\n"))),
            Step::Data(Bytes::from(format!("data: tail {}", &k[..5]))),
        ])
        .header("x-echo", &format!("Bearer {k}"))
        .header("x-request-id", &k)
    })
    .await;
    let p = start_proxy_with(
        &["--upstream-url", &up.url(), "--log-format", "json"],
        &format!("{key}\n"),
        &[],
    );
    let resp = send(p.port, p.responses_request("{}")).await;
    let stars = "*".repeat(key.len());
    assert_eq!(resp.headers()["x-echo"], format!("Bearer {stars}"));
    assert_eq!(resp.headers()["x-request-id"], stars.as_str());
    let mut body = resp.into_body();
    // The first event is not held back by masking.
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("first event in time")
        .expect("f")
        .expect("ok");
    assert_eq!(
        first.into_data().expect("data"),
        Bytes::from(format!("data: {{\"whole\":\"{stars}\"}}\n\n"))
    );
    hold.notify_one();
    let rest = body.collect().await.expect("rest").to_bytes();
    let want = format!(
        "data: {{\"split\":\"{stars}\"}}\n\ndata: tail {}",
        &key[..5]
    );
    assert_eq!(
        String::from_utf8_lossy(&rest),
        want,
        "same length, key overwritten, an unfinished prefix released at the end"
    );
    let log = poll_until(Duration::from_secs(5), "access line", || {
        let t = p.stderr_text();
        t.contains("\"access\"").then_some(t)
    });
    assert!(!log.contains(&key), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neither_key_nor_token_appears_in_anything_written() {
    for level in ["error", "warn", "info", "debug"] {
        let key = random_key();
        let hold = Arc::new(Notify::new());
        let h = Arc::clone(&hold);
        let up = MockUpstream::plain(move |r| mixed_reply(r, &h)).await;
        let dir = tempfile::tempdir().expect("dir");
        let dumps = dir.path().join("dumps");
        let mut p = start_proxy_with(
            &[
                "--upstream-url",
                &up.url(),
                "--dump-dir",
                dumps.to_str().expect("utf8"),
                "--log-format",
                "json",
                "--log-level",
                level,
            ],
            &format!("{key}\n"),
            &[],
        );
        let mut seen = Vec::new();
        for mode in ["plain", "sse", "4xx", "5xx", "echo", "break"] {
            let req = p.responses_request(&format!("{{\"mode\":\"{mode}\"}}"));
            let resp = send(p.port, req).await;
            seen.extend_from_slice(format!("{:?}", resp.headers()).as_bytes());
            if let Ok(b) = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
                .await
                .expect("in time")
            {
                seen.extend_from_slice(&b.to_bytes());
            }
        }
        // Refusals, and an upstream that is down.
        let refused = Request::post("/v1/responses")
            .header("host", p.host())
            .header("content-type", "application/json")
            .header("authorization", "Bearer wrong")
            .body(Full::new(Bytes::from_static(b"{}")))
            .expect("req");
        let (_, headers, body) = exchange(p.port, refused).await;
        seen.extend_from_slice(format!("{headers:?}").as_bytes());
        seen.extend_from_slice(&body);
        drop(up);
        let (_, headers, body) = exchange(p.port, p.responses_request("{}")).await;
        seen.extend_from_slice(format!("{headers:?}").as_bytes());
        seen.extend_from_slice(&body);

        let seen = String::from_utf8_lossy(&seen).into_owned();
        assert!(!seen.contains(&key), "{level}: key sent to a client");
        assert!(!seen.contains(&p.token), "{level}: token sent to a client");
        let files = poll_until(Duration::from_secs(5), "dumps", || {
            // Files under their own names only: a `.partial` one is renamed when complete.
            let v: Vec<_> = std::fs::read_dir(&dumps)
                .ok()?
                .map(|e| e.expect("e").path())
                .filter(|f| !f.file_name().expect("n").to_string_lossy().starts_with('.'))
                .collect();
            (v.len() >= 12).then_some(v)
        });
        for f in files {
            let text = std::fs::read_to_string(&f).expect("dump");
            assert!(!text.contains(&key), "{level}: key in {}", f.display());
            assert!(
                !text.contains(&p.token),
                "{level}: token in {}",
                f.display()
            );
        }
        let info = std::fs::read_to_string(&p.info_path).expect("info");
        assert!(!info.contains(&key));
        let log = p.stop_and_read_log();
        assert!(!log.contains(&key), "{level}: key in the log");
        assert!(!log.contains(&p.token), "{level}: token in the log");
        if level == "info" || level == "debug" {
            assert!(log.contains("\"access\""), "{level}: access lines written");
        } else {
            assert!(!log.contains("\"access\""), "{level}: no access lines");
        }
    }
}
