"""The remote engine: a kodkod server in remote mode in front of a kodkod server with the tiny
model, both real uvicorn servers on 127.0.0.1."""
from __future__ import annotations

import time

import httpx

from srvutil import free_port, sse_events, wait_done

PY = {"language": "python", "segments": {"prefix": "import os\n\ndef main():\n    ", "suffix": "\n"}}
# ~3 s of decoding on the tiny model, no stop strings: it never ends on its own within a test's patience
LONG = {"debug_options": {"raw_prompt": "<fim_prefix>def fib(n):\n    <fim_suffix>\n<fim_middle>"},
        "max_tokens": 400, "temperature": 0}


def _texts(url, body):
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return [c["text"] for c in r.json()["choices"]]


def _streamed(url, body):
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=30) as r:
        assert r.status_code == 200
        events = list(sse_events(r.iter_lines()))
    assert events[-1] == "[DONE]"
    return events[:-1]


def _metric(url, line_start):
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_remote_gives_the_same_completion(live, remote):
    first, _ = live(max_tokens=1000)
    second, app = remote([first], max_tokens=1000)
    for body in ({**PY, "max_tokens": 16, "temperature": 0, "seed": 0},
                 {**PY, "max_tokens": 16, "temperature": 0.8, "seed": 3, "n": 2},
                 {**LONG, "max_tokens": 12},
                 {"language": "python", "segments": {"prefix": "def fib(n):\n    ", "suffix": "\n\nprint(fib(3))\n"},
                  "max_tokens": 24, "temperature": 0, "stop": ["return"]}):
        direct = _texts(first, body)
        assert _texts(second, body) == direct, body
        events = _streamed(second, body)
        ends = [c for e in events for c in e["choices"] if c.get("finish_reason")]
        assert [c["completion"] for c in ends] == direct
    health = httpx.get(f"{second}/v1/health").json()
    assert health["device"] == "remote"
    assert health["models"]["completion"]["upstreams"][0]["alive"] is True


def test_client_disconnect_stops_the_upstream_within_one_step(live, remote, engine):
    first, first_app = live(max_tokens=1000)
    second, _ = remote([first], max_tokens=1000)
    before = _metric(first, 'kodkod_cancellations_total{reason="disconnected"}')
    with httpx.stream("POST", f"{second}/v1/completions", json={**LONG, "stream": True}, timeout=30) as r:
        first_event = next(sse_events(r.iter_lines()))
    assert first_event["choices"][0]["text"]
    # leaving the block closed the client's connection; the remote server closes its upstream one
    jobs = first_app.state.server.jobs
    deadline = time.monotonic() + 10
    while not jobs:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    job = wait_done(next(iter(jobs.values())))
    assert job.cancel_reason == "disconnected"
    assert job.steps_at_end - job.steps_at_cancel <= 1, (job.steps_at_cancel, job.steps_at_end)
    assert job.tokens < 200
    assert _metric(first, 'kodkod_cancellations_total{reason="disconnected"}') == before + 1
    time.sleep(0.3)
    assert engine.decode_steps == job.steps_at_end  # nothing more ran on the upstream


def test_superseded_request_closes_its_upstream(live, remote):
    first, first_app = live(max_tokens=1000)
    second, _ = remote([first], max_tokens=1000)
    with httpx.Client(timeout=30) as c, c.stream("POST", f"{second}/v1/completions",
                                                  json={**LONG, "stream": True, "user": "alice"}) as r:
        events = sse_events(r.iter_lines())
        next(events)
        newer = c.post(f"{second}/v1/completions", json={**PY, "max_tokens": 3, "user": "alice"})
        rest = list(events)
    assert newer.status_code == 200, newer.text
    assert rest[-2]["error"]["type"] == "superseded"
    upstream_jobs = list(first_app.state.server.jobs.values())
    old = wait_done(upstream_jobs[0])
    assert old.cancel_reason == "disconnected" and old.tokens < 200
    assert old.steps_at_end - old.steps_at_cancel <= 1


def test_dead_upstream_fails_over_to_a_live_one(live, remote):
    first, _ = live(max_tokens=1000)
    dead = f"http://127.0.0.1:{free_port()}"
    second, app = remote([dead, first], max_tokens=1000)
    body = {**PY, "max_tokens": 8, "temperature": 0}
    want = _texts(first, body)
    for _ in range(3):  # round robin starts some of these at the dead one
        assert _texts(second, body) == want
    ups = {u.url: u for u in app.state.server.engine.pool.upstreams}
    assert ups[dead].alive is False and ups[first].alive is True


def test_all_upstreams_dead_is_a_clear_error(remote):
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    second, _ = remote(dead)
    r = httpx.post(f"{second}/v1/completions", json={**PY, "max_tokens": 4}, timeout=30)
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["type"] == "upstream_unavailable" and all(d in err["message"] for d in dead)
    events = _streamed(second, {**PY, "max_tokens": 4})
    assert events[-1]["error"]["type"] == "upstream_unavailable"


def test_stop_string_closes_the_upstream(live, remote):
    first, first_app = live(max_tokens=1000)
    second, _ = remote([first], max_tokens=1000)
    direct = _texts(first, {**LONG, "max_tokens": 40})[0]
    stop = direct[10:14]  # text the upstream writes early on
    assert stop and direct.find(stop) >= 10
    jobs = first_app.state.server.jobs
    before = set(jobs)
    got = _texts(second, {**LONG, "stop": [stop]})
    assert got == [direct[: direct.find(stop)]]
    (new,) = set(jobs) - before
    job = wait_done(jobs[new])
    # the remote server closed the connection at the stop string: the upstream did not go on to 400 tokens
    assert job.cancel_reason == "disconnected" and job.tokens < 60, (job.cancel_reason, job.tokens)


def test_upstream_5xx_fails_over(live, remote):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from srvutil import serve_live

    async def broken(request):
        return JSONResponse({"error": {"message": "out of memory"}}, status_code=500)

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "broken", "object": "model"}]})

    failing = Starlette(routes=[Route("/v1/completions", broken, methods=["POST"]), Route("/v1/models", models)])
    first, _ = live(max_tokens=1000)
    body = {**PY, "max_tokens": 8, "temperature": 0}
    want = _texts(first, body)
    with serve_live(failing) as bad:
        second, _ = remote([bad, first], max_tokens=1000)
        assert _texts(second, body) == want  # the first try went to the broken one
        only_bad, _ = remote([bad])
        r = httpx.post(f"{only_bad}/v1/completions", json=body, timeout=30)
    assert r.status_code == 502, r.text
    err = r.json()["error"]
    assert err["type"] == "upstream_error" and "out of memory" in err["message"]


def test_health_checks_bring_an_upstream_back(live, remote):
    first, _ = live()
    second, app = remote([first])
    (up,) = app.state.server.engine.pool.upstreams
    up.dead("marked dead by the test")
    deadline = time.monotonic() + 10
    while not up.alive:  # the fixture checks every 0.5 s
        assert time.monotonic() < deadline, up
        time.sleep(0.05)
    assert up.error is None and up.model == "llama-tiny-4.0bpw"
