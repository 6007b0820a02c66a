#!/usr/bin/env python3
"""A fake OpenAI Responses API upstream for the end-to-end suite.

POST /v1/responses with "stream": true answers a realistic SSE sequence (response.created,
response.in_progress, output_item.added, content_part.added, several output_text.delta,
output_text.done, content_part.done, output_item.done, response.completed with usage, each
with sequence_number), with --delay-ms between events; without "stream", a JSON response
object; gzip when the client accepts it and the answer is not streamed; any other request is
recorded and answered 404 (so a control copy can prove what a browser sent). Every request
(method, target, headers with case and duplicates, body) is appended to --record as JSONL.

    fake_upstream.py --port-file F --record R.jsonl [--delay-ms 20] [--tls-cert C --tls-key K]
"""
import argparse
import gzip
import json
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ANSWER = "Hello from the fake upstream."


def events(delay_s: float, model: str):
    rid = "resp_fake_0001"
    base = {"id": rid, "object": "response", "created_at": int(time.time()), "model": model,
            "status": "in_progress", "output": [], "usage": None}
    item = {"id": "msg_fake_0001", "type": "message", "role": "assistant", "status": "in_progress", "content": []}
    part = {"type": "output_text", "text": "", "annotations": []}
    words = ["Hello ", "from ", "the ", "fake ", "upstream."]
    seq = 0

    def ev(kind, **fields):
        nonlocal seq
        payload = {"type": kind, "sequence_number": seq, **fields}
        seq += 1
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode()

    yield ev("response.created", response=base)
    yield ev("response.in_progress", response=base)
    yield ev("response.output_item.added", output_index=0, item=item)
    yield ev("response.content_part.added", item_id=item["id"], output_index=0, content_index=0, part=part)
    for w in words:
        yield ev("response.output_text.delta", item_id=item["id"], output_index=0, content_index=0, delta=w, logprobs=[])
    done_part = {"type": "output_text", "text": ANSWER, "annotations": []}
    yield ev("response.output_text.done", item_id=item["id"], output_index=0, content_index=0, text=ANSWER, logprobs=[])
    yield ev("response.content_part.done", item_id=item["id"], output_index=0, content_index=0, part=done_part)
    done_item = dict(item, status="completed", content=[done_part])
    yield ev("response.output_item.done", output_index=0, item=done_item)
    final = dict(base, status="completed", output=[done_item],
                 usage={"input_tokens": 12, "input_tokens_details": {"cached_tokens": 0},
                        "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 17})
    yield ev("response.completed", response=final)


def response_object(model: str):
    part = {"type": "output_text", "text": ANSWER, "annotations": []}
    return {"id": "resp_fake_0002", "object": "response", "created_at": int(time.time()), "model": model,
            "status": "completed", "output": [{"id": "msg_fake_0002", "type": "message", "role": "assistant",
                                               "status": "completed", "content": [part]}],
            "usage": {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 5,
                      "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 17},
            "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--record", required=True)
    ap.add_argument("--delay-ms", type=float, default=20)
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    args = ap.parse_args()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def record(self, body: bytes):
            entry = {"t": time.time(), "method": self.command, "target": self.path,
                     "headers": [[k, v] for k, v in self.headers.raw_items()],
                     "body": body.decode("utf-8", "replace")}
            with lock, open(args.record, "a") as f:
                f.write(json.dumps(entry) + "\n")

        def read_body(self) -> bytes:
            n = int(self.headers.get("content-length") or 0)
            if self.headers.get("transfer-encoding", "").lower() == "chunked":
                out = b""
                while True:
                    size = int(self.rfile.readline().strip().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(n) if n else b""

        def handle_any(self):
            body = self.read_body()
            self.record(body)
            if self.command != "POST" or self.path.split("?")[0] != "/v1/responses":
                msg = b'{"error":{"message":"not found","type":"invalid_request_error"}}'
                self.send_response(404)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(msg)))
                self.end_headers()
                self.wfile.write(msg)
                return
            try:
                req = json.loads(body or b"{}")
            except ValueError:
                req = {}
            model = req.get("model", "gpt-test")
            if req.get("stream"):
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("x-request-id", "req_fake_stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                for chunk in events(args.delay_ms / 1000.0, model):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                    time.sleep(args.delay_ms / 1000.0)
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
                return
            data = json.dumps(response_object(model)).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("x-request-id", "req_fake_json")
            if "gzip" in self.headers.get("accept-encoding", ""):
                data = gzip.compress(data)
                self.send_header("content-encoding", "gzip")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_POST = do_GET = do_PUT = do_DELETE = do_OPTIONS = do_PATCH = handle_any

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    if args.tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    with open(args.port_file + ".tmp", "w") as f:
        f.write(str(srv.server_address[1]))
    import os
    os.replace(args.port_file + ".tmp", args.port_file)
    srv.serve_forever()


if __name__ == "__main__":
    main()
