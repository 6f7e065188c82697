"""Streaming, disconnects and superseding against a real uvicorn server on 127.0.0.1."""
from __future__ import annotations

import json
import socket
import time

import httpx

from srvutil import sse_events, wait_done

PY = {"language": "python", "segments": {"prefix": "import os\n\ndef main():\n    ", "suffix": "\n"}}
# ~3 s of decoding on the tiny model, no stop strings: it never ends on its own within a test's patience
LONG = {"debug_options": {"raw_prompt": "<fim_prefix>def fib(n):\n    <fim_suffix>\n<fim_middle>"},
        "max_tokens": 400, "temperature": 0}


def _job(app, job_id):
    return app.state.server.jobs[job_id]


def _stream_choices(url, body):
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r.iter_lines()))
    assert events[-1] == "[DONE]"
    body = events[:-1]
    assert len({e["id"] for e in body}) == 1 and body[0]["id"].startswith("cmpl-")
    by_index = {}
    for e in body:
        (c,) = e["choices"]
        by_index.setdefault(c["index"], []).append(c)
    return body[0]["id"], by_index


# The seed is pinned: this test used to leave it to the server, which draws a random one, and at
# the default temperature 0.1 the tiny model samples its end-of-text token first for about one
# seed in forty (seeds 56, 57, 91, 92, 122...). That choice then ends at once: a single, empty
# "stop" event, which is right, but the test expected text, so it failed about once in twenty runs.
SEEDED = {**PY, "max_tokens": 12, "n": 2, "temperature": 0.1, "seed": 1}


def test_stream_events_and_done(live):
    url, app = live(max_tokens=1000)
    for raw in (False, True):
        cid, by_index = _stream_choices(url, {**SEEDED, "stream_raw": raw})
        assert sorted(by_index) == [0, 1]
        for mine in by_index.values():
            assert all(c.get("finish_reason") is None and "completion" not in c for c in mine[:-1])
            last = mine[-1]
            assert last["finish_reason"] in ("stop", "length")
            assert last["completion"]  # this seed makes text
            streamed = "".join(c["text"] for c in mine)
            if raw:
                assert len(mine) >= 2  # one event per text delta, then the final one
            else:
                assert streamed == last["completion"]  # nothing streamed is taken back
        job = wait_done(_job(app, cid))
        assert job.tokens <= 24 and job.cancel_reason is None
    # the same request as JSON gives the same completions
    r = httpx.post(f"{url}/v1/completions", json=SEEDED, timeout=30)
    assert [c["text"] for c in r.json()["choices"]] == [by_index[i][-1]["completion"] for i in (0, 1)]


def test_stream_disconnect_stops_engine_within_one_step(live, engine):
    url, app = live(max_tokens=1000)
    with httpx.stream("POST", f"{url}/v1/completions", json={**LONG, "stream": True}, timeout=30) as r:
        first = next(sse_events(r.iter_lines()))
        steps_at_first = engine.decode_steps
    # leaving the block closed the connection after the first event
    job = wait_done(_job(app, first["id"]))
    assert job.cancel_reason == "disconnected"
    assert job.steps_at_cancel is not None
    # from the moment the server saw the disconnect, the engine took at most one more step
    assert job.steps_at_end - job.steps_at_cancel <= 1, (job.steps_at_cancel, job.steps_at_end)
    # and it stopped long before max_tokens: tokens are produced only as they are sent
    assert job.tokens < 200, job.tokens
    assert job.steps_at_end - job.steps_at_start < 200
    time.sleep(0.3)
    assert engine.decode_steps == job.steps_at_end  # nothing more ran afterwards
    assert steps_at_first <= job.steps_at_end
    line = [l for l in app.state.server.log.read() if l["kind"] == "completion"][-1]
    assert line["id"] == first["id"] and line["cancelled"] is True and line["cancel_reason"] == "disconnected"


def test_nonstream_disconnect_cancels(live, engine):
    url, app = live(max_tokens=1000)
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(LONG).encode()
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body) + body)
    srv = app.state.server
    deadline = time.monotonic() + 10
    while not any(j.started for j in srv.jobs.values()):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.2)
    s.close()
    job = wait_done(next(iter(srv.jobs.values())))
    assert job.cancel_reason == "disconnected"
    assert job.steps_at_end - job.steps_at_cancel <= 1
    assert job.tokens < 300


def test_newer_request_supersedes_running_one(live):
    url, app = live(max_tokens=1000)
    with httpx.Client(timeout=30) as c, c.stream("POST", f"{url}/v1/completions",
                                                  json={**LONG, "stream": True, "user": "alice"}) as r:
        lines = r.iter_lines()
        events = sse_events(lines)
        first = next(events)
        newer = c.post(f"{url}/v1/completions", json={**PY, "max_tokens": 3, "user": "alice"})
        rest = list(events)
    assert newer.status_code == 200, newer.text
    assert rest[-1] == "[DONE]"
    last = rest[-2]
    assert last["choices"][0]["finish_reason"] == "cancelled"
    assert last["error"]["type"] == "superseded"
    job = _job(app, first["id"])
    assert job.cancel_reason == "superseded" and job.tokens < 300
    assert job.steps_at_end - job.steps_at_cancel <= 1
    # another user's request does not supersede
    with httpx.Client(timeout=30) as c:
        a = c.post(f"{url}/v1/completions", json={**PY, "max_tokens": 3, "user": "bob"})
        b = c.post(f"{url}/v1/completions", json={**PY, "max_tokens": 3, "user": "carol"})
    assert a.status_code == b.status_code == 200
    text = httpx.get(f"{url}/metrics").text
    assert 'kodkod_cancellations_total{reason="superseded"} 1.0' in text


def test_stream_timeout_ends_with_error_event(live):
    url, app = live(max_tokens=1000, timeout_s=0.4)
    with httpx.stream("POST", f"{url}/v1/completions", json={**LONG, "stream": True}, timeout=30) as r:
        events = list(sse_events(r.iter_lines()))
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["type"] == "timeout"
    job = wait_done(_job(app, events[0]["id"]))
    assert job.cancel_reason == "timeout" and job.steps_at_end - job.steps_at_cancel <= 1
    line = [l for l in app.state.server.log.read() if l["kind"] == "completion"][-1]
    assert line["outcome"] == "timeout"
