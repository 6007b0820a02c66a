#!/usr/bin/env python3
"""End-to-end suite: real clients we did not write (the OpenAI Python SDK, the Codex CLI,
headless Chromium) against the real proxy binary, which talks to a fake Responses API
upstream that records everything it receives.

    run.py --proxy BIN --python VENV_PYTHON --codex CODEX_BIN --chromium CHROMIUM

Runs inside a fresh network namespace with only loopback (it re-executes itself under
`unshare -n` when it is not in one), so nothing leaves the machine and nothing waits on a
timeout. Prints `N passed, N failed` last and exits non-zero on any failure.
"""
import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ANSWER = "Hello from the fake upstream."
results = []


def check(name, ok, detail=""):
    results.append((name, bool(ok)))
    print(f"{'PASS' if ok else 'FAIL'} {name}" + ("" if ok else f": {detail}"), flush=True)


def wait_for(what, fn, limit=20.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.02)
    raise SystemExit(f"timed out waiting for {what}")


def only_loopback() -> bool:
    names = [l.split(":")[0].strip() for l in Path("/proc/net/dev").read_text().splitlines()[2:]]
    return names == ["lo"]


def records(path):
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()]


def header_values(rec, name):
    return [v for k, v in rec["headers"] if k.lower() == name.lower()]


class Upstream:
    def __init__(self, tmp, name, delay_ms):
        self.record = str(tmp / f"{name}.jsonl")
        port_file = tmp / f"{name}.port"
        self.proc = subprocess.Popen([sys.executable, str(HERE / "fake_upstream.py"), "--port-file", str(port_file),
                                      "--record", self.record, "--delay-ms", str(delay_ms)])
        self.port = int(wait_for(f"{name} port", lambda: port_file.exists() and port_file.read_text()))

    def records(self):
        return records(self.record)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--proxy", required=True)
    ap.add_argument("--python", required=True)
    ap.add_argument("--codex", required=True)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()

    if not only_loopback():
        if os.environ.get("RAP_E2E_NETNS") == "1":
            raise SystemExit("e2e: still not in a private network namespace; refusing to run")
        # Re-run inside a fresh network namespace with only loopback, up.
        cmd = ["unshare", "-n", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", sys.executable, *sys.argv]
        env = dict(os.environ, RAP_E2E_NETNS="1")
        sys.exit(subprocess.call(cmd, env=env))

    tmp = Path(tempfile.mkdtemp(prefix="rap-e2e-"))
    key = "sk-test-e2e-" + secrets.token_hex(16)
    up = Upstream(tmp, "upstream", delay_ms=60)
    control = Upstream(tmp, "control", delay_ms=0)
    info = tmp / "server-info.json"
    stderr_path = tmp / "proxy.stderr"
    proxy = subprocess.Popen([args.proxy, "--upstream-url", f"http://127.0.0.1:{up.port}/v1/responses",
                              "--server-info", str(info), "--log-format", "json", "--http-shutdown"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(stderr_path, "wb"))
    proxy.stdin.write((key + "\n").encode())
    proxy.stdin.close()
    si = wait_for("server-info", lambda: info.exists() and json.loads(info.read_text() or "null"))
    port, token = si["port"], si["auth_token"]
    base = f"http://127.0.0.1:{port}/v1"
    procs = [up.proc, control.proc, proxy]
    try:
        run_suite(args, tmp, key, token, port, base, up, control, proxy, info, stderr_path)
    finally:
        for p in procs:
            p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    passed = sum(1 for _, ok in results if ok)
    failed = len(results) - passed
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


def run_suite(args, tmp, key, token, port, base, up, control, proxy, info, stderr_path):
    # --- OpenAI Python SDK -------------------------------------------------------------
    r = subprocess.run([args.python, str(HERE / "sdk_client.py"), base, token], capture_output=True, text=True, timeout=120)
    check("sdk: ran", r.returncode == 0, r.stderr[-2000:])
    sdk = json.loads(r.stdout) if r.returncode == 0 else {}
    check("sdk: responses.create", sdk.get("plain_text") == ANSWER, sdk.get("plain_text"))
    check("sdk: responses.create(stream=True)", sdk.get("stream_text") == ANSWER, sdk.get("stream_text"))
    check("sdk: responses.stream() helper", sdk.get("helper_text") == ANSWER, sdk.get("helper_text"))
    check("sdk: dummy api_key + X-Proxy-Token", sdk.get("header_plain_text") == ANSWER and sdk.get("header_stream_text") == ANSWER, sdk)
    check("sdk: wrong token refused with 401", sdk.get("wrong_token", "").endswith("401"), sdk.get("wrong_token"))
    first, last = sdk.get("stream_first_delta_s"), sdk.get("stream_completed_s")
    check("sdk: events not batched (first delta well before the end)", first is not None and last is not None and last - first > 0.3,
          f"first {first} last {last}")
    sdk_records = up.records()
    check("sdk: 5 exchanges reached the upstream", len(sdk_records) == 5, len(sdk_records))
    # The same calls straight to a fake upstream show the bytes the SDK sends.
    r = subprocess.run([args.python, str(HERE / "sdk_client.py"), f"http://127.0.0.1:{control.port}/v1", "direct"],
                       capture_output=True, text=True, timeout=120)
    direct = [rec["body"] for rec in control.records() if rec["method"] == "POST"][:5]
    got = [rec["body"] for rec in sdk_records]
    check("sdk: bodies byte-identical upstream", len(direct) == 5 and direct == got, f"{direct} vs {got}")
    control_before_browser = len(control.records())
    check("sdk: \"stream\": true preserved", sum('"stream": true' in b or '"stream":true' in b for b in got) == 3, got)

    # --- Codex CLI ----------------------------------------------------------------------
    before = len(up.records())
    for variant in ["env_key", "http_headers"]:
        home = tmp / f"codex-{variant}"
        home.mkdir()
        auth = 'env_key = "RAP_PROXY_TOKEN"' if variant == "env_key" else f'http_headers = {{ "X-Proxy-Token" = "{token}" }}'
        (home / "config.toml").write_text(f'''model = "gpt-test"
model_provider = "proxy"

[model_providers.proxy]
name = "responses-api-proxy"
base_url = "{base}"
wire_api = "responses"
{auth}
request_max_retries = 0
stream_max_retries = 0
stream_idle_timeout_ms = 20000
''')
        env = dict(os.environ, CODEX_HOME=str(home), RAP_PROXY_TOKEN=token, HOME=str(home), NO_COLOR="1")
        env.pop("OPENAI_API_KEY", None)
        work = tmp / f"work-{variant}"
        work.mkdir()
        try:
            r = subprocess.run([args.codex, "exec", "--skip-git-repo-check", "--ephemeral", "Say hello"], cwd=work, env=env,
                               capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
            out = r.stdout + r.stderr
            check(f"codex ({variant}): exit 0", r.returncode == 0, out[-3000:])
            check(f"codex ({variant}): prints the upstream's answer", ANSWER in r.stdout, out[-3000:])
        except subprocess.TimeoutExpired as e:
            check(f"codex ({variant}): finished", False, f"timed out: {str(e.stdout)[-1500:]} {str(e.stderr)[-1500:]}")
    codex_records = up.records()[before:]
    check("codex: reached the upstream", len(codex_records) >= 2, len(codex_records))

    # --- Headless Chromium: cross-site attempts -------------------------------------------
    before_browser = len(up.records())
    pages = tmp / "pages"
    pages.mkdir()
    shutil.copy(HERE / "attack.html", pages / "attack.html")
    origins = []
    for name in ["origin-a", "origin-b"]:
        pf = tmp / f"{name}.port"
        origins.append(subprocess.Popen([sys.executable, "-c",
            "import http.server,functools,sys,os\n"
            "h=functools.partial(http.server.SimpleHTTPRequestHandler,directory=sys.argv[2])\n"
            "h.log_message=lambda *a:None\n"
            "s=http.server.ThreadingHTTPServer(('127.0.0.1',0),h)\n"
            "open(sys.argv[1]+'.tmp','w').write(str(s.server_address[1]));os.replace(sys.argv[1]+'.tmp',sys.argv[1])\n"
            "s.serve_forever()", str(pf), str(pages)], stderr=subprocess.DEVNULL))
        origins[-1].port = int(wait_for(name, lambda pf=pf: pf.exists() and pf.read_text()))
    try:
        hosts = [f"http://127.0.0.1:{origins[0].port}", f"http://localhost:{origins[1].port}"]
        for target_name, target in [("control", f"http://127.0.0.1:{control.port}"), ("proxy", f"http://127.0.0.1:{port}"),
                                    ("proxy-localhost", f"http://localhost:{port}")]:
            for origin in hosts:
                profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp)
                url = f"{origin}/attack.html?target={target}"
                r = subprocess.run([args.chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                                    f"--user-data-dir={profile}", "--virtual-time-budget=8000", "--dump-dom", url],
                                   capture_output=True, text=True, timeout=90)
                check(f"chromium: page from {origin.split(':')[1][2:]} attacked {target_name}", "DONE" in r.stdout,
                      (r.stdout + r.stderr)[-1500:])
    finally:
        for o in origins:
            o.kill()
    ctl = control.records()[control_before_browser:]
    kinds = {(rec["method"], rec["target"].split("?")[0]) for rec in ctl}
    check("chromium: the browser really sent them (control recorded POSTs, a preflight and /shutdown)",
          ("POST", "/v1/responses") in kinds and ("OPTIONS", "/v1/responses") in kinds and ("GET", "/shutdown") in kinds,
          sorted(kinds))
    posts = [dict((k.lower(), v) for k, v in rec["headers"]).get("content-type", "") for rec in ctl if rec["method"] == "POST"]
    check("chromium: control saw at least 6 POSTs per page, every form encoding among them",
          len(posts) >= 2 * 6 and all(any(ct.startswith(enc) for ct in posts) for enc in ["application/x-www-form-urlencoded", "multipart/form-data", "text/plain"]),
          posts)
    check("chromium: nothing reached the upstream behind the proxy", len(up.records()) == before_browser,
          up.records()[before_browser:])
    check("chromium: the proxy still runs", proxy.poll() is None)
    r = subprocess.run([args.python, "-c",
                        "import sys;from openai import OpenAI;print(OpenAI(base_url=sys.argv[1],api_key=sys.argv[2],max_retries=0).responses.create(model='m',input='x').output_text)",
                        base, token], capture_output=True, text=True, timeout=60)
    check("chromium: the proxy still serves", r.stdout.strip() == ANSWER, r.stderr[-1000:])

    # --- What the upstream received, overall ------------------------------------------------
    recs = up.records()
    check("upstream: exactly one Authorization, the operator key, on every request",
          all(header_values(rec, "authorization") == [f"Bearer {key}"] for rec in recs), [header_values(rec, "authorization") for rec in recs][:3])
    check("upstream: no X-Proxy-Token, no dummy SDK key, token nowhere",
          all(not header_values(rec, "x-proxy-token") and token not in json.dumps(rec) and "sk-dummy-sdk" not in json.dumps(rec) for rec in recs))
    log_lines = [json.loads(l) for l in stderr_path.read_text().splitlines() if l.startswith("{")]
    forwarded = [l for l in log_lines if l.get("msg") == "access" and "ttfb_ms" in l]
    check("upstream: requests == legitimate exchanges forwarded", len(recs) == len(forwarded), f"{len(recs)} vs {len(forwarded)}")
    # Stop through /shutdown and look at what the proxy wrote.
    subprocess.run([args.python, "-c", "import sys,urllib.request as u;u.urlopen(u.Request(sys.argv[1],headers={'X-Proxy-Token':sys.argv[2]})).read()",
                    f"http://127.0.0.1:{port}/shutdown", token], timeout=30)
    try:
        proxy.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    check("proxy: exited 0 after /shutdown", proxy.returncode == 0, proxy.returncode)
    written = stderr_path.read_text() + (proxy.stdout.read().decode() if proxy.stdout else "")
    check("proxy: key never in stderr/stdout", key not in written)
    check("proxy: token never in stderr/stdout", token not in written)
    check("proxy: server-info removed on exit", not info.exists())


if __name__ == "__main__":
    main()
