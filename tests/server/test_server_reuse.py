"""The server's switches for prompt reuse and speculation, and their counters in /metrics."""
from __future__ import annotations

import re

import pytest
from starlette.testclient import TestClient

from server.config import ConfigError, load_config
from srvutil import fixture_dir

TINY = "llama-tiny-4.0bpw"


def test_reuse_switches_from_every_source(tmp_path):
    c = load_config({}, env={})
    assert (c.kv_pool_mb, c.draft_tokens) == (512, None)  # None: the engine's default for its device
    c = load_config({}, env={"KODKOD_KV_POOL_MB": "64", "KODKOD_DRAFT_TOKENS": "6"})
    assert (c.kv_pool_mb, c.draft_tokens) == (64, 6)
    c = load_config({"kv_pool_mb": 0, "draft_tokens": None}, env={"KODKOD_DRAFT_TOKENS": "6"})
    assert (c.kv_pool_mb, c.draft_tokens) == (0, 6)
    with pytest.raises(ConfigError, match="draft_tokens.*KODKOD_DRAFT_TOKENS"):
        load_config({}, env={"KODKOD_DRAFT_TOKENS": "-1"})


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def test_metrics_count_cached_prefilled_drafted_and_accepted_tokens(make_config):
    from engine import load_model
    from server.app import create_app

    # an engine of its own: the counters start at zero
    eng = load_model(fixture_dir(TINY), device="cpu", draft_tokens=4)
    app = create_app(make_config(default_max_tokens=24, draft_tokens=4), eng)
    try:
        with TestClient(app) as client:
            before = client.get("/metrics").text
            assert metric(before, "kodkod_prompt_tokens_cached_total") == 0
            prefix = "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n\ndef fab(n):\n"
            for typed in ("    ", "    i", "    if"):  # keystrokes: each prompt extends the last one's start
                r = client.post("/v1/completions", json={"language": "python", "temperature": 0,
                                                         "segments": {"prefix": prefix + typed, "suffix": "\n"}})
                assert r.status_code == 200
            text = client.get("/metrics").text
    finally:
        app.state.server.worker.stop()
    cached, prefilled = metric(text, "kodkod_prompt_tokens_cached_total"), metric(text, "kodkod_prompt_tokens_prefilled_total")
    assert cached == eng.stats["prompt_tokens_cached"] > 0 and prefilled == eng.stats["prompt_tokens_prefilled"]
    assert cached > prefilled  # the second and third prompts came mostly from the cache
    assert metric(text, "kodkod_draft_tokens_total") == eng.stats["draft_tokens"]
    assert metric(text, "kodkod_draft_tokens_accepted_total") == eng.stats["accepted_tokens"]
    assert metric(text, "kodkod_speculative_steps_total") == eng.stats["verify_steps"] > 0
