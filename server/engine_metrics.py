"""The engine's own counters in /metrics: prompt reuse and speculation (engine.Engine.stats).

The engine counts as it works (on the worker thread); this collector reads the counters when
/metrics is scraped, so nothing on the request path touches the Prometheus registry.
"""
from __future__ import annotations

from prometheus_client.core import CounterMetricFamily

# (engine stat, metric name without _total, help)
ENGINE_COUNTERS = (
    ("prompt_tokens_cached", "kodkod_prompt_tokens_cached",
     "prompt tokens whose keys/values came from a cache (the last prompt's or the KV pool), not a prefill"),
    ("prompt_tokens_prefilled", "kodkod_prompt_tokens_prefilled", "prompt tokens the engine prefilled"),
    ("verify_steps", "kodkod_speculative_steps", "forward passes that verified a prompt-lookup draft"),
    ("draft_tokens", "kodkod_draft_tokens", "draft tokens verified (speculative decoding)"),
    ("accepted_tokens", "kodkod_draft_tokens_accepted",
     "draft tokens accepted (per speculative step: this over kodkod_speculative_steps_total)"),
)


class EngineStatsCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        stats = getattr(self.engine, "stats", None) or {}
        for key, name, doc in ENGINE_COUNTERS:
            yield CounterMetricFamily(name, doc, value=stats.get(key, 0))
