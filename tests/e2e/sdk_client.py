"""Runs the OpenAI Python SDK against BASE_URL; prints one JSON object of observations.
The same script run directly against the fake upstream gives the bodies the SDK sends, to
compare byte for byte with what the upstream behind the proxy received.

    python sdk_client.py BASE_URL TOKEN
"""
import json
import sys
import time

from openai import OpenAI

base_url, token = sys.argv[1], sys.argv[2]


def client(**kw):
    return OpenAI(base_url=base_url, max_retries=0, timeout=30, **kw)


out = {}
# The token as the API key.
c = client(api_key=token)
r = c.responses.create(model="gpt-test", input="Say hello")
out["plain_text"] = r.output_text
t0 = time.monotonic()
first = last = None
deltas = []
for ev in c.responses.create(model="gpt-test", input="Say hello", stream=True):
    if ev.type == "response.output_text.delta":
        deltas.append(ev.delta)
        first = first or time.monotonic() - t0
    if ev.type == "response.completed":
        last = time.monotonic() - t0
out["stream_text"] = "".join(deltas)
out["stream_first_delta_s"] = first
out["stream_completed_s"] = last
with c.responses.stream(model="gpt-test", input="Say hello") as s:
    for _ in s:
        pass
    out["helper_text"] = s.get_final_response().output_text
# A dummy API key plus the token in its own header: the dummy must not reach the upstream.
d = client(api_key="sk-dummy-sdk-not-the-key", default_headers={"X-Proxy-Token": token})
out["header_plain_text"] = d.responses.create(model="gpt-test", input="Say hello").output_text
out["header_stream_text"] = "".join(
    ev.delta for ev in d.responses.create(model="gpt-test", input="Say hello", stream=True)
    if ev.type == "response.output_text.delta")
# A wrong token is refused with a helpful 401.
try:
    client(api_key="not-the-token").responses.create(model="gpt-test", input="x")
    out["wrong_token"] = "accepted"
except Exception as e:  # openai.AuthenticationError
    out["wrong_token"] = f"{type(e).__name__}: {getattr(e, 'status_code', '')}"
print(json.dumps(out))
