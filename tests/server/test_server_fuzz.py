"""Fuzz every operation of the OpenAPI document: no 5xx, no hang, errors are JSON."""
from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402


@pytest.fixture(scope="module")
def fuzz_app(engine, tmp_path_factory):
    from server.app import create_app
    from server.config import ServerConfig

    # small generations keep the fuzz fast; limits small enough that the fuzzer hits them
    config = ServerConfig(home=tmp_path_factory.mktemp("fuzz"), default_max_tokens=2, max_tokens=4, max_n=2,
                          timeout_s=10, max_prefix_chars=5000, tokens=["fuzz-token"])
    app = create_app(config, engine)
    yield app
    app.state.server.worker.stop()


OPERATIONS = [("/v1/completions", "POST"), ("/v1/models", "GET"), ("/v1/events", "POST"), ("/v1/health", "GET"), ("/v1/health", "POST"),
              ("/v1beta/server_setting", "GET"), ("/healthz", "GET"), ("/metrics", "GET")]


CASES = [(p, m, "positive") for p, m in OPERATIONS] + [
    ("/v1/completions", "POST", "negative"), ("/v1/events", "POST", "negative")]


@pytest.mark.parametrize("path,method,mode", CASES)
def test_openapi_fuzz(fuzz_app, path, method, mode):
    # schemathesis generates the cases from our OpenAPI document (its pytest plugin is not
    # compatible with this pytest, so hypothesis drives it directly)
    from hypothesis import given

    schema = schemathesis.openapi.from_asgi("/api-docs/openapi.json", fuzz_app)
    operation = schema[path][method]
    examples = 50 if path == "/v1/completions" else 10
    strategy = operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode))

    @given(case=strategy)
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case):
        for auth in (True, False):
            headers = {"Authorization": "Bearer fuzz-token"} if auth else {}
            response = case.call(headers=headers, timeout=20)
            assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
            if response.status_code >= 400:
                body = response.json()
                assert set(body) == {"error"} and {"type", "message"} <= set(body["error"]), body
            elif not auth and path.startswith("/v1"):
                raise AssertionError(f"{path} answered {response.status_code} without a token")

    run()
