"""Heavy and hostile traffic against a real uvicorn server on 127.0.0.1 (issue 15).

Every test is bounded in count and time: small limits (a 0.5 s head timeout, 50 connections)
stand in for the defaults, so that the same mechanisms are tried in seconds. Each test also
checks that the server logged no error: a client's fault is never a traceback.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import time

import httpx
import pytest

from srvutil import eventually, serve_live, sse_events, wait_done

PY = {"language": "python", "segments": {"prefix": "import os\n\ndef main():\n    ", "suffix": "\n"}}
# decodes until max_tokens: no stop strings, greedy
LONG = {"debug_options": {"raw_prompt": "<fim_prefix>def fib(n):\n    <fim_suffix>\n<fim_middle>"},
        "temperature": 0}


@pytest.fixture
def serve(make_app):
    """serve(**config) -> (base_url, app): the app under uvicorn as `kodkod serve` runs it, its
    uvicorn records going to pytest's log capture."""
    stack = contextlib.ExitStack()

    def start(**kw):
        app = make_app(**kw)
        return stack.enter_context(serve_live(app, log_config=None)), app

    with stack:
        yield start


@pytest.fixture(autouse=True)
def no_errors_logged(caplog):
    caplog.set_level(logging.WARNING)
    yield
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [f"{r.name}: {r.getMessage()}" for r in bad]


# ---------------------------------------------------------------- raw HTTP helpers
def addr(url):
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def connect(url, timeout=5.0) -> socket.socket:
    s = socket.create_connection(addr(url), timeout=timeout)
    return s


def read_all(s: socket.socket, limit_s=5.0) -> bytes:
    """Everything the server sends until it closes the connection (or limit_s passes)."""
    s.settimeout(limit_s)
    out = b""
    with contextlib.suppress(socket.timeout, ConnectionResetError):
        while chunk := s.recv(65536):
            out += chunk
    return out


def parse(raw: bytes):
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
    return status, headers, body


def json_error(raw: bytes, status: int, type_: str | None = None) -> dict:
    got, headers, body = parse(raw)
    assert got == status, raw[:300]
    assert headers["content-type"].startswith("application/json")
    err = json.loads(body)["error"]
    if type_ is not None:
        assert err["type"] == type_, err
    return err


def metric_lines(url, name):
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return [l for l in text.splitlines() if l.startswith(name)]


def until(cond, limit_s=5.0, what="condition"):
    deadline = time.monotonic() + limit_s
    while not cond():
        assert time.monotonic() < deadline, f"{what} not reached within {limit_s} s"
        time.sleep(0.01)


def no_500(url):
    assert not any('status="500"' in l for l in metric_lines(url, "kodkod_http_requests_total"))


# ---------------------------------------------------------------- slow heads and bodies
def test_slow_head_and_idle_connection_are_cut_off(serve):
    url, _ = serve(head_timeout_s=0.5)
    idle = connect(url)
    slow = connect(url)
    t0 = time.monotonic()
    slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the head never ends
    json_error(read_all(slow), 408, "request_timeout")
    assert read_all(idle) == b""  # sent nothing: closed without a word
    assert 0.4 < time.monotonic() - t0 < 3
    # a kept-alive connection that starts its next head and stalls is cut off too
    keep = connect(url)
    keep.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert keep.recv(4096).startswith(b"HTTP/1.1 200")
    keep.sendall(b"GET /healthz HTTP/1.1\r\n")
    t0 = time.monotonic()
    json_error(read_all(keep), 408, "request_timeout")
    assert time.monotonic() - t0 < 3
    drops = " ".join(metric_lines(url, "kodkod_connection_drops_total"))
    assert 'reason="head_timeout"' in drops and 'reason="idle_timeout"' in drops


def test_slow_body_is_cut_off(serve):
    url, app = serve(body_timeout_s=0.5)
    s = connect(url)
    t0 = time.monotonic()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100\r\n\r\n{\"segm")
    json_error(read_all(s), 408, "request_timeout")
    assert 0.4 < time.monotonic() - t0 < 3
    assert not app.state.server.jobs  # nothing ran
    no_500(url)


def test_early_answer_then_idle_connection_is_closed(serve):
    """An answer sent before the body was all in (415 here) leaves the connection timed."""
    url, _ = serve(keep_alive_s=0.5, body_timeout_s=30)
    for then_get in (False, True):
        s = connect(url)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n"
                  b"Content-Length: 20\r\n\r\n0123456789")
        s.settimeout(5)
        assert s.recv(4096).startswith(b"HTTP/1.1 415")
        s.sendall(b"0123456789")  # the rest of the body: the connection is idle now
        if then_get:  # and still usable
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        assert read_all(s) == b""
        assert time.monotonic() - t0 < 3


def test_body_disconnect_is_a_quiet_499(serve):
    url, app = serve()
    for path in ("/v1/completions", "/v1/events"):
        s = connect(url)
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  "Content-Length: 1000\r\n\r\n{\"a\": ".encode())
        time.sleep(0.1)
        s.close()
    until(lambda: sum('status="499"' in l for l in metric_lines(url, "kodkod_http_requests_total")) == 2,
          what="two 499s")
    no_500(url)  # and the autouse fixture: no traceback in the log


# ---------------------------------------------------------------- connections
def test_many_idle_and_stalled_sockets_leave_healthz_answering(serve):
    url, _ = serve(max_connections=50, head_timeout_s=30)
    fds_before = len(os.listdir("/proc/self/fd"))
    socks, worst = [], 0.0
    with httpx.Client(timeout=5) as c:
        for i in range(400):
            s = connect(url)
            if i % 2:  # a stalled head
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            socks.append(s)
            if i % 40 == 39:
                t0 = time.monotonic()
                r = c.get(f"{url}/healthz", headers={"connection": "close"})
                worst = max(worst, time.monotonic() - t0)
                assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert worst < 1.0, worst
    # the server closed the oldest to make room: it holds about max_connections sockets, not 400
    until(lambda: len(os.listdir("/proc/self/fd")) - fds_before <= 400 + 50 + 10, what="server fds bounded")
    evicted = [l for l in metric_lines(url, "kodkod_connection_drops_total") if 'reason="evicted"' in l]
    assert evicted and float(evicted[0].split()[-1]) >= 400 - 50 - 10
    for s in socks:
        s.close()


def test_full_server_refuses_new_connections_with_json_503(serve):
    url, app = serve(max_connections=8, queue_size=16, max_tokens=400)
    busy = []
    for i in range(8):  # 8 complete requests in progress: none of them may be closed to make room
        s = connect(url)
        b = json.dumps({**LONG, "max_tokens": 400, "user": f"u{i}"}).encode()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(b) + b)
        busy.append(s)
    srv = app.state.server
    until(lambda: len(srv.jobs) == 8, what="8 jobs")
    extra = connect(url)
    err = json_error(read_all(extra), 503, "overloaded")
    assert "8 open connections" in err["message"]
    for s in busy:
        s.close()
    for job in list(srv.jobs.values()):
        wait_done(job)
    assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200


# ---------------------------------------------------------------- errors uvicorn would produce
def test_transport_errors_are_json(serve):
    url, _ = serve(max_head_bytes=2048)
    s = connect(url)
    s.sendall(b"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n{}")
    json_error(read_all(s), 400, "invalid_http")
    s = connect(url)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 4000 + b"\r\n\r\n")
    json_error(read_all(s), 431, "head_too_large")
    s = connect(url)  # a head that grows without end, in small pieces
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    with contextlib.suppress(OSError):
        for _ in range(100):
            s.sendall(b"X-Pad: " + b"b" * 100 + b"\r\n")
    json_error(read_all(s), 431, "head_too_large")


def test_invented_methods_do_not_grow_metrics(serve):
    url, _ = serve()
    size_before = len(httpx.get(f"{url}/metrics").content)
    for i in range(100):  # methods the HTTP parser refuses
        s = connect(url)
        s.sendall(b"X%05d%s /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % (i, b"Q" * 2000))
        json_error(read_all(s), 400, "invalid_http")
    with httpx.Client(timeout=5) as c:  # methods it knows, that no route takes
        for m in ("PROPFIND", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK", "SEARCH", "PURGE", "REPORT", "PATCH") * 5:
            assert c.request(m, f"{url}/v1/events").status_code == 405
        for i in range(50):
            assert c.get(f"{url}/no/such/path/{i}").status_code == 404
    methods = set(re.findall(r'method="([^"]*)"', httpx.get(f"{url}/metrics").text))
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}, methods
    routes = set(re.findall(r'route="([^"]*)"', httpx.get(f"{url}/metrics").text))
    assert "other" in routes and not any("/no/such" in r for r in routes)
    assert len(httpx.get(f"{url}/metrics").content) < size_before + 20_000


# ---------------------------------------------------------------- bodies
def test_hostile_json_is_a_400(serve):
    url, app = serve()
    huge = "1" * 5000
    bodies = [
        '{"segments": {"prefix": "x"}, "max_tokens": %s}' % huge,  # over Python's 4,300 digits
        '{"segments": {"prefix": "x"}, "temperature": 0.%s}' % huge,
        '{"segments": {"prefix": "x"}, "seed": NaN}',
        '{"a": ' + "[" * 5000 + "]" * 5000 + "}",
        '{"a": ' + "[" * 40 + "]" * 40 + "}",  # past max_json_depth (32)
        json.dumps({"segments": {"prefix": "x"}, "stop": ["a"] * 20_000}),
    ]
    with httpx.Client(timeout=10, headers={"content-type": "application/json"}) as c:
        for path in ("/v1/completions", "/v1/events"):
            for b in bodies:
                r = c.post(f"{url}{path}", content=b)
                assert r.status_code == 400, (path, b[:60], r.text)
                err = r.json()["error"]
                assert err["type"] == "invalid_json" and "Traceback" not in err["message"]
                assert len(err["message"]) < 200
    assert not app.state.server.jobs
    no_500(url)


def test_strict_field_types(serve):
    url, _ = serve()
    with httpx.Client(timeout=10) as c:
        for bad in ({"n": True}, {"stream": "yes"}, {"max_tokens": "3"}, {"stream": 1}, {"temperature": True}):
            for body in ({**PY, **bad}, {"prompt": "def f", "suffix": "", **bad}):
                r = c.post(f"{url}/v1/completions", json=body)
                assert r.status_code == 422, (body, r.text)
                assert r.json()["error"]["type"] == "invalid_request"


# ---------------------------------------------------------------- superseding and the queue
async def _first_event(lines):
    async for line in lines:
        if line.startswith("data:"):
            return json.loads(line[5:])


def test_cross_token_supersede_is_impossible(serve):
    url, app = serve(tokens=["tok-a", "tok-b"], max_tokens=400)
    srv = app.state.server

    async def main():
        a = httpx.AsyncClient(timeout=30, headers={"authorization": "Bearer tok-a"})
        b = httpx.AsyncClient(timeout=30, headers={"authorization": "Bearer tok-b"})
        # the same token from another address, without `user`
        a2 = httpx.AsyncClient(timeout=30, headers={"authorization": "Bearer tok-a"},
                               transport=httpx.AsyncHTTPTransport(local_address="127.0.0.2"))
        async with a, b, a2, a.stream("POST", f"{url}/v1/completions",
                                      json={**LONG, "max_tokens": 40, "stream": True, "user": "alice"}) as r:
            lines = r.aiter_lines()
            first = await _first_event(lines)
            other = await asyncio.gather(
                b.post(f"{url}/v1/completions", json={**PY, "max_tokens": 2, "user": "alice"}),
                b.post(f"{url}/v1/completions", json={**PY, "max_tokens": 2}),
                a2.post(f"{url}/v1/completions", json={**PY, "max_tokens": 2}),
                _rest(lines))
        return first, other

    first, (by_b, by_b_anon, by_a2, rest) = asyncio.run(main())
    assert by_b.status_code == by_b_anon.status_code == by_a2.status_code == 200
    assert rest[-1] == "[DONE]" and not any("error" in e for e in rest[:-1])
    job = wait_done(srv.jobs[first["id"]])
    assert job.cancel_reason is None and job.tokens == 40


async def _rest(lines):
    return [e async for e in _events(lines)]


async def _events(lines):
    async for line in lines:
        if line.startswith("data:"):
            data = line[5:].strip()
            yield data if data == "[DONE]" else json.loads(data)


def test_full_queue_never_cancels_the_running_request(serve):
    url, app = serve(queue_size=1, max_tokens=400)
    srv, worker = app.state.server, app.state.server.worker

    async def main():
        async with httpx.AsyncClient(timeout=30) as c, c.stream(
                "POST", f"{url}/v1/completions", json={**LONG, "max_tokens": 40, "stream": True, "user": "a"}) as r:
            lines = r.aiter_lines()
            first = await _first_event(lines)
            queued = asyncio.create_task(c.post(f"{url}/v1/completions", json={**PY, "max_tokens": 2, "user": "b"}))
            await eventually(lambda: worker.depth == 1)
            newer_a = await c.post(f"{url}/v1/completions", json={**PY, "max_tokens": 2, "user": "a"})
            other = await c.post(f"{url}/v1/completions", json={**PY, "max_tokens": 2, "user": "c"})
            newer_b = asyncio.create_task(c.post(f"{url}/v1/completions", json={**PY, "max_tokens": 2, "user": "b"}))
            rest = await _rest(lines)
            return first, newer_a, other, await queued, await newer_b, rest

    first, newer_a, other, queued, newer_b, rest = asyncio.run(main())
    # refused, and the running request of the same user went on to its end
    assert newer_a.status_code == other.status_code == 503
    assert newer_a.json()["error"]["type"] == "overloaded"
    assert rest[-1] == "[DONE]" and not any("error" in e for e in rest[:-1])
    job = wait_done(srv.jobs[first["id"]])
    assert job.cancel_reason is None and job.tokens == 40
    # a newer request of b took the queued one's place
    assert queued.status_code == 409 and queued.json()["error"]["type"] == "superseded"
    assert newer_b.status_code == 200


def test_cancelled_jobs_leave_the_queue_at_once(serve):
    url, app = serve(queue_size=2, max_tokens=400)
    srv, worker = app.state.server, app.state.server.worker
    with httpx.Client(timeout=30) as c, c.stream(
            "POST", f"{url}/v1/completions", json={**LONG, "max_tokens": 400, "stream": True}) as r:
        events = sse_events(r.iter_lines())  # kept: a dropped generator would close the stream
        first = next(events)  # it runs (seconds of decoding) while the others wait
        waiting = []
        for _ in range(2):
            s = connect(url)
            b = json.dumps({**PY, "max_tokens": 2}).encode()
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(b) + b)
            waiting.append(s)
        until(lambda: worker.depth == 2, what="two queued")
        for s in waiting:
            s.close()
        until(lambda: worker.depth == 0, limit_s=1.0, what="cancelled jobs gone from the queue")
        # the queue has room again at once
        ok = [s for s in (connect(url), connect(url))]
        for s in ok:
            b = json.dumps({**PY, "max_tokens": 2}).encode()
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(b) + b)
        until(lambda: worker.depth == 2, what="two queued again")
    wait_done(srv.jobs[first["id"]])  # the stream closed: the running job ends
    for s in ok:
        assert parse(read_all(s, 20))[0] == 200
    # the two that left never ran (no prompt was built for them)
    assert sum(j.cancel_reason == "disconnected" and j.started is None for j in srv.jobs.values()) == 2


# ---------------------------------------------------------------- the events log
def test_events_log_caps_fields_and_rotates(serve, tmp_path):
    url, app = serve(log_file=tmp_path / "events.jsonl", log_max_bytes=20_000, log_files=3, log_field_chars=100)
    log = app.state.server.log
    with httpx.Client(timeout=10) as c:
        for i in range(150):
            r = c.post(f"{url}/v1/events", json={"type": "view", "completion_id": "c" * 50_000,
                                                 "choice_index": 0, "view_id": f"v{i}\u2028\x85" + "x" * 50_000})
            assert r.status_code == 200
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["events.jsonl", "events.jsonl.1", "events.jsonl.2"]
    total = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert total <= 20_000 + 1_000, total
    lines = log.read(rotated=True)
    assert lines and all(len(l["completion_id"]) <= 101 and len(l["view_id"]) <= 101 for l in lines)
    # split on "\n" only: U+2028 and U+0085 stay inside their field
    assert lines[-1]["view_id"].startswith("v149\u2028\x85")
    assert [int(l["view_id"][1:].split("\u2028")[0]) for l in lines] == list(range(150 - len(lines), 150))


# ---------------------------------------------------------------- browsers
def test_cross_origin_text_plain_and_foreign_host_are_refused(serve):
    url, app = serve(allowed_hosts=[])  # the defaults: localhost names, IP addresses, this machine
    srv = app.state.server
    port = addr(url)[1]
    with httpx.Client(timeout=10) as c:
        # what any web page can send without asking (a "simple" cross-origin request)
        r = c.post(f"{url}/v1/completions", content=json.dumps(PY), headers={
            "content-type": "text/plain;charset=UTF-8", "origin": "https://evil.example"})
        assert r.status_code == 415 and r.json()["error"]["type"] == "unsupported_media_type"
        r = c.post(f"{url}/v1/events", content='{"type": "view", "completion_id": "x", "choice_index": 0}',
                   headers={"content-type": "text/plain"})
        assert r.status_code == 415
        assert not srv.jobs and not srv.log.read()
        # DNS rebinding: a page on another name that resolves to 127.0.0.1
        for path in ("/v1/health", "/healthz", "/swagger-ui"):
            r = c.get(f"{url}{path}", headers={"host": f"rebind.evil.example:{port}"})
            assert r.status_code == 421 and r.json()["error"]["type"] == "misdirected_request"
        r = c.post(f"{url}/v1/completions", json=PY, headers={"host": "evil.example"})
        assert r.status_code == 421 and not srv.jobs
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "app.localhost"):
            assert c.get(f"{url}/v1/health", headers={"host": host}).status_code == 200, host
        # no CORS: a preflight is not granted, an answer carries no Access-Control header
        pre = c.options(f"{url}/v1/completions", headers={
            "origin": "https://evil.example", "access-control-request-method": "POST",
            "access-control-request-headers": "content-type"})
        assert "access-control-allow-origin" not in pre.headers
        r = c.get(f"{url}/v1/health", headers={"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        # security headers on the Swagger pages; no redirect built from the Host header
        for path in ("/swagger-ui", "/swagger-ui/static/swagger-ui.css"):
            h = c.get(f"{url}{path}").headers
            assert "frame-ancestors 'none'" in h["content-security-policy"], path
            assert h["x-frame-options"] == "DENY" and h["x-content-type-options"] == "nosniff"
        r = c.post(f"{url}/v1/completions/", json=PY, headers={"host": "localhost"})
        assert r.status_code == 404 and "location" not in r.headers and r.json()["error"]["type"] == "not_found"


def test_host_check_is_off_with_tokens_and_cors_on_request(serve):
    url, _ = serve(tokens=["t"], cors_origins=["https://editor.example"])
    with httpx.Client(timeout=10, headers={"authorization": "Bearer t"}) as c:
        assert c.get(f"{url}/v1/health", headers={"host": "kodkod.internal:8080"}).status_code == 200
        pre = c.options(f"{url}/v1/completions", headers={
            "origin": "https://editor.example", "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type"})
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == "https://editor.example"
        pre = c.options(f"{url}/v1/completions", headers={
            "origin": "https://evil.example", "access-control-request-method": "POST"})
        assert pre.headers.get("access-control-allow-origin") != "https://evil.example"


# ---------------------------------------------------------------- one 504
def test_one_timeout_message(serve):
    url, _ = serve(timeout_s=0.3, max_tokens=1000)
    with httpx.Client(timeout=30) as c:
        plain = c.post(f"{url}/v1/completions", json={**LONG, "max_tokens": 1000})
        with c.stream("POST", f"{url}/v1/completions", json={**LONG, "max_tokens": 1000, "stream": True}) as r:
            events = list(sse_events(r.iter_lines()))
    assert plain.status_code == 504
    assert events[-2]["error"] == plain.json()["error"]
    assert plain.json()["error"]["message"] == "the request took longer than the server's time limit of 0.3 s"
