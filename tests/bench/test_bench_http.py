"""`kodkod bench http` in CI size: short traces typed fast against a real uvicorn server running
the real tiny model; the report must have sane fields."""
from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest

from tests.conftest import fixture_dir
from tests.server.srvutil import serve_live

from server.bench.trace import BenchSettings, TypingModel, default_sources, make_trace, run_bench


@pytest.fixture(scope="module")
def live_url(tmp_path_factory):
    from engine import load_model
    from server.app import create_app
    from server.config import ServerConfig

    engine = load_model(fixture_dir("llama-tiny-4.0bpw"), device="cpu")
    app = create_app(ServerConfig(home=tmp_path_factory.mktemp("home"), default_max_tokens=16), engine)
    with serve_live(app) as url:
        yield url
    app.state.server.worker.stop()


def test_default_sources_cover_several_languages():
    langs = {lang for lang, _ in default_sources()}
    assert {"python", "c", "cpp"} <= langs


def test_a_trace_retypes_a_region_of_the_file():
    lang, path = default_sources()[0]
    tr = make_trace(lang, path, 50, random.Random(0), TypingModel())
    assert tr.before + tr.typed + tr.after == path.read_text(encoding="utf-8", errors="replace")
    assert len(tr.times) == len(tr.typed) >= 50
    assert all(b > a for a, b in zip(tr.times, tr.times[1:]))


def test_trace_benchmark_report_is_sane(live_url):
    # Gaps near the debounce interval, so that some requests are aborted by the next key.
    typing = TypingModel(median_s=0.1, sigma=0.6, pause_p=0.25, pause_s=(0.15, 0.3))
    settings = BenchSettings(traces=2, chars=16, speed=1.0, debounce_s=0.05, max_tokens=16, timeout_s=20,
                             saturation_requests=8, saturation_seconds=20, concurrency=2, progress=False,
                             typing=typing)
    res = asyncio.run(run_bench(live_url, settings))
    s = res["summary"]
    assert s["requests"] == s["completed"] + s["cancelled"] + s["errors"] and s["requests"] > 0
    assert s["errors"] == 0 and s["completed"] >= 1
    assert 0 <= s["cancelled_fraction"] <= 1
    assert 0 < s["p50_s"] <= s["p95_s"] <= s["p99_s"] < 20
    assert 0 < s["first_event_p50_s"] <= s["p99_s"]
    assert s["tokens_generated"] > 0
    # a cancel stops the engine within a step or so (the server may count a few more cancels than
    # the client made: a stream whose client leaves right after [DONE] counts as disconnected)
    assert s["server_cancellations"] >= 0
    assert 0 <= s["tokens_after_cancel"] <= 2 * max(1, s["cancelled"], s["server_cancellations"])
    sat = res["saturation"]
    assert sat["completed"] == 8 and sat["requests_per_s"] > 0 and not sat["errors"]
    assert {t["language"] for t in res["traces"]} == {"python"}  # the first two default files


def test_bench_http_command_writes_its_reports(live_url, tmp_path, capsys):
    from server.cli import main

    out = tmp_path / "out"
    src = Path(__file__)
    assert main(["bench", "http", live_url, "--traces", "1", "--chars", "20", "--speed", "4",
                 "--saturation-requests", "4", "--max-tokens", "8", "--file", f"python:{src}",
                 "--out", str(out), "--no-progress"]) == 0
    data = json.loads((out / "http.json").read_text())
    assert data["traces"][0]["path"] == str(src) and data["meta"]["command"].startswith("kodkod ")
    assert "| requests |" in (out / "http.md").read_text()
    assert (out / "http.png").read_bytes()[:4] == b"\x89PNG"
    assert "p50 ms" in capsys.readouterr().out


def test_bench_without_a_subcommand_shows_help(capsys):
    from server.cli import main

    assert main(["bench"]) == 2
    assert "http" in capsys.readouterr().out
