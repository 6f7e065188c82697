"""The HTTP API in-process (direct ASGI calls) with the real tiny model."""
from __future__ import annotations

import asyncio
import re

import httpx
import pytest
from srvutil import eventually
from starlette.testclient import TestClient

JSON_TYPE = {"content-type": "application/json"}
PY = {"language": "python", "segments": {"prefix": "def fib(n):\n    ", "suffix": "\n\nprint(fib(3))\n"}}

# a raw FIM prompt without stop strings: the tiny model decodes it to max_tokens
RAW_LONG = {"debug_options": {"raw_prompt": "<fim_prefix>def fib(n):\n    <fim_suffix>\n<fim_middle>"}, "temperature": 0}


def is_error(r, status, type_=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
    assert body["error"]["message"]
    if type_:
        assert body["error"]["type"] == type_, body
    return body["error"]


def test_completion_tabby_shape(client):
    r = client.post("/v1/completions", json=PY)
    assert r.status_code == 200, r.text
    body = r.json()
    assert re.fullmatch(r"cmpl-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}", body["id"])
    assert [c["index"] for c in body["choices"]] == [0]
    assert isinstance(body["choices"][0]["text"], str)


def test_extensions_n_max_tokens_stop(client, engine):
    before = engine.decode_steps
    r = client.post("/v1/completions", json={**PY, "n": 3, "max_tokens": 4, "temperature": 1.0, "seed": 7})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    # three generations of at most 4 tokens: prefill + at most 3 decode steps each
    assert engine.decode_steps - before <= 3 * 4
    r = client.post("/v1/completions", json={**PY, "max_tokens": 30, "stop": ["e"], "temperature": 0})
    assert r.status_code == 200
    assert "e" not in r.json()["choices"][0]["text"]


def test_tiny_top_p_keeps_the_likeliest_token(client):
    # 5e-324 is 0 in float32: the engine's nucleus filter then dropped every token (a 500, found by the fuzzer)
    greedy = client.post("/v1/completions", json={**PY, "max_tokens": 6, "temperature": 0}).json()
    for top_p in (5e-324, 1e-9):
        r = client.post("/v1/completions", json={**PY, "max_tokens": 6, "temperature": 0.8, "top_p": top_p, "seed": 1})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == greedy["choices"][0]["text"]


def test_same_seed_same_text(client):
    req = {**PY, "max_tokens": 12, "temperature": 0.8, "seed": 123}
    a = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    b = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    assert a == b


def test_raw_prompt_and_debug_prompt(client):
    r = client.post("/v1/completions", json={"debug_options": {"raw_prompt": "<fim_prefix>x = <fim_suffix>\n<fim_middle>",
                                                               "return_prompt": True}, "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["debug_data"]["prompt"] == "<fim_prefix>x = <fim_suffix>\n<fim_middle>"
    r = client.post("/v1/completions", json={**PY, "debug_options": {"return_prompt": True}, "max_tokens": 2})
    prompt = r.json()["debug_data"]["prompt"]
    assert "def fib(n):" in prompt and "print(fib(3))" in prompt


def test_unknown_and_missing_language_served(client):
    for lang in ("no-such-language", None):
        body = {"segments": {"prefix": "hello "}, "max_tokens": 3}
        if lang:
            body["language"] = lang
        assert client.post("/v1/completions", json=body).status_code == 200


@pytest.mark.parametrize("content,status,type_", [
    (b"{bad json", 400, "invalid_json"),
    (b"", 400, "invalid_json"),
    (b'{"segments": {"prefix": "\xff\xfe"}}', 400, "invalid_utf8"),
    (b'{"segments": {"prefix": "\\ud800"}}', 400, "invalid_utf8"),
    (b"[1, 2]", 422, "invalid_request"),
    (b'"text"', 422, "invalid_request"),
    (b"{}", 400, "invalid_request"),  # neither segments nor raw_prompt
    (b'{"segments": {}}', 422, "invalid_request"),  # missing prefix
    (b'{"segments": {"prefix": 5}}', 422, "invalid_request"),
    (b'{"segments": "x"}', 422, "invalid_request"),
    (b'{"segments": {"prefix": "a"}, "temperature": "hot"}', 422, "invalid_request"),
    (b'{"segments": {"prefix": "a"}, "n": 100000}', 422, "invalid_request"),
    (b'{"segments": {"prefix": "a"}, "n": 5}', 422, "invalid_request"),  # over max_n = 4
    (b'{"segments": {"prefix": "a"}, "max_tokens": 99999}', 422, "invalid_request"),
    (b'{"segments": {"prefix": "a"}, "max_tokens": 0}', 422, "invalid_request"),
    (b'{"segments": {"prefix": "a"}, "stop": [""]}', 422, "invalid_request"),
    (b'{"segments": {"prefix": "a"}, "mode": "chat"}', 422, "invalid_request"),
    (b"[" * 100000 + b"]" * 100000, 400, "invalid_json"),
])
def test_bad_input_is_a_json_error(client, content, status, type_):
    r = client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    is_error(r, status, type_)


def test_size_limits_413(make_app):
    with TestClient(make_app(max_prefix_chars=1000, max_body_bytes=50_000)) as c:
        is_error(c.post("/v1/completions", json={"segments": {"prefix": "x" * 1001}}), 413, "too_large")
        is_error(c.post("/v1/completions", json={"segments": {"prefix": "a", "suffix": "x" * 1001}}), 413)
        is_error(c.post("/v1/completions", json={"segments": {"prefix": "a", "clipboard": "x" * 60_000}}), 413)
        assert c.post("/v1/completions", json={"segments": {"prefix": "x" * 1000}, "max_tokens": 1}).status_code == 200


def test_routes_not_found_and_method_are_json(client):
    is_error(client.get("/nope"), 404, "not_found")
    is_error(client.get("/v1/completions"), 405, "method_not_allowed")


def test_auth(make_app):
    with TestClient(make_app(tokens=["s3cret", "other"])) as c:
        for path in ("/v1/health",):
            is_error(c.get(path), 401, "unauthorized")
            is_error(c.get(path, headers={"Authorization": "Bearer wrong"}), 401)
            is_error(c.get(path, headers={"Authorization": "Basic s3cret"}), 401)
            assert c.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
            assert c.get(path, headers={"Authorization": "Bearer other"}).status_code == 200
        is_error(c.post("/v1/completions", json=PY), 401)
        is_error(c.post("/v1/events", json={"type": "view", "completion_id": "c", "choice_index": 0}), 401)
        is_error(c.get("/v1beta/server_setting"), 401)
        ok = c.post("/v1/completions", json={**PY, "max_tokens": 2}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert c.get("/healthz").json() == {"status": "ok"}  # no auth for load balancers


def test_health_server_setting_docs(client):
    h = client.post("/v1/health").json()
    for k in ("model", "device", "arch", "cpu_info", "cpu_count", "cuda_devices", "version", "models"):
        assert k in h
    assert h["model"] == "llama-tiny-4.0bpw" and h["device"] == "cpu"
    assert "git_describe" in h["version"] and "build_date" in h["version"]
    assert client.get("/v1/health").status_code == 200
    assert client.get("/v1beta/server_setting").json() == {"disable_client_side_telemetry": False}
    doc = client.get("/api-docs/openapi.json").json()
    assert {"/v1/completions", "/v1/events", "/v1/health", "/healthz"} <= set(doc["paths"])
    assert "CompletionRequest" in doc["components"]["schemas"]
    page = client.get("/swagger-ui").text
    assert "swagger-ui" in page and "https://" not in page  # works offline: assets are served here
    js = client.get("/swagger-ui/static/swagger-ui-bundle.js")
    assert js.status_code == 200 and "SwaggerUIBundle" in js.text


def test_no_model_501(make_app):
    with TestClient(make_app(engine_=None)) as c:
        is_error(c.post("/v1/completions", json=PY), 501, "no_model")
        assert c.get("/v1/health").status_code == 200


def test_events_and_jsonl_log(make_app):
    app = make_app()
    srv = app.state.server
    with TestClient(app) as c:
        cid = c.post("/v1/completions", json={**PY, "max_tokens": 3}).json()["id"]
        assert c.post("/v1/events", json={"type": "view", "completion_id": cid, "choice_index": 0}).status_code == 200
        assert c.post("/v1/events?select_kind=line",
                      json={"type": "select", "completion_id": cid, "choice_index": 0, "elapsed": 12}).status_code == 200
        is_error(c.post("/v1/events", json={"type": "explode", "completion_id": cid, "choice_index": 0}), 400)
        is_error(c.post("/v1/events", content=b"nope", headers=JSON_TYPE), 400)
    lines = srv.log.read()
    comp = [l for l in lines if l["kind"] == "completion"]
    assert comp[0]["id"] == cid and comp[0]["language"] == "python" and comp[0]["cancelled"] is False
    assert comp[0]["prompt_chars"] > 0 and "latency_ms" in comp[0]
    assert "prompt" not in comp[0] and "def fib" not in str(lines)  # no source text without --log-prompts
    ev = [l for l in lines if l["kind"] == "event"]
    assert [e["type"] for e in ev] == ["view", "select"] and ev[1]["select_kind"] == "line"
    assert srv.log.path.parent.parent == srv.config.home


def test_one_console_line_per_completion(client, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="kodkod.server"):
        cid = client.post("/v1/completions", json={**RAW_LONG, "max_tokens": 3}).json()["id"]
        client.post("/v1/completions", json={**RAW_LONG, "max_tokens": 3, "stream": True})
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("completion ")]
    assert len(lines) == 2
    assert lines[0] == f"completion {cid[5:13]} ok: 3 tokens, {lines[0].rsplit(', ', 1)[1]}"
    assert re.fullmatch(r"completion [0-9a-f]{8} ok: 3 tokens, \d+ ms \(stream\)", lines[1]), lines[1]


def test_log_prompts(make_app):
    app = make_app(log_prompts=True)
    with TestClient(app) as c:
        c.post("/v1/completions", json={**PY, "max_tokens": 2})
    comp = [l for l in app.state.server.log.read() if l["kind"] == "completion"][0]
    assert "def fib" in comp["prompt"] and isinstance(comp["completions"], list)


def test_metrics(client):
    client.post("/v1/completions", json={**PY, "max_tokens": 3})
    client.post("/v1/completions", content=b"{", headers=JSON_TYPE)
    text = client.get("/metrics").text
    assert 'kodkod_http_requests_total{method="POST",route="/v1/completions",status="200"} 1.0' in text
    assert 'status="400"' in text
    assert "kodkod_http_request_duration_seconds_bucket" in text
    assert re.search(r"kodkod_tokens_generated_total [1-9]", text)
    assert "kodkod_queue_depth" in text and "kodkod_cancellations" in text


async def _post(c, body):
    return await c.post("/v1/completions", json=body)


def test_queue_full_503_and_supersede_queued(make_app):
    app = make_app(queue_size=1, max_tokens=400)
    worker = app.state.server.worker

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as c:
            long = asyncio.create_task(_post(c, {**RAW_LONG, "max_tokens": 400, "user": "a"}))
            await eventually(lambda: worker.busy and worker.depth == 0)  # `long` runs now
            queued = asyncio.create_task(_post(c, {**PY, "max_tokens": 2, "user": "b"}))
            await eventually(lambda: worker.depth == 1)
            full = await _post(c, {**PY, "max_tokens": 2, "user": "c"})
            # a newer request of user b takes the place of the queued one
            newer = asyncio.create_task(_post(c, {**PY, "max_tokens": 2, "user": "b"}))
            return await long, await queued, full, await newer

    long, queued, full, newer = asyncio.run(main())
    err = is_error(full, 503, "overloaded")
    assert full.headers["retry-after"] == "1" and "waiting" in err["message"]
    assert long.status_code == 200
    is_error(queued, 409, "superseded")
    assert newer.status_code == 200


def test_timeout(make_app):
    with TestClient(make_app(timeout_s=0.3, max_tokens=1000)) as c:
        r = c.post("/v1/completions", json={**RAW_LONG, "max_tokens": 1000})
    err = is_error(r, 504, "timeout")
    assert "0.3 s" in err["message"]


def test_same_token_supersedes_without_user(make_app):
    app = make_app(tokens=["tok-a", "tok-b"], max_tokens=400)
    worker = app.state.server.worker

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as c:
            def post(body, token):
                return c.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {token}"})
            first = asyncio.create_task(post({**RAW_LONG, "max_tokens": 40}, "tok-a"))
            for _ in range(500):
                if worker.busy:
                    break
                await asyncio.sleep(0.01)
            other = await post({**PY, "max_tokens": 2}, "tok-b")  # another token: waits its turn
            return first, other

    async def run():
        first, other = await main()
        return await first, other

    first, other = asyncio.run(run())
    # tok-b did not supersede tok-a: it waited until tok-a finished
    assert first.status_code == 200 and other.status_code == 200

    async def main2():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as c:
            def post(body):
                return c.post("/v1/completions", json=body, headers={"Authorization": "Bearer tok-a"})
            first = asyncio.create_task(post({**RAW_LONG, "max_tokens": 400}))
            for _ in range(500):
                if worker.busy:
                    break
                await asyncio.sleep(0.01)
            second = await post({**PY, "max_tokens": 2})
            return await first, second

    first, second = asyncio.run(main2())
    is_error(first, 409, "superseded")
    assert second.status_code == 200
