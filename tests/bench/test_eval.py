"""`kodkod eval`: tasks from HumanEval, the configurations' rules, the sandbox inside the eval,
and the whole command on the real tiny model (reports, cache, resume)."""
from __future__ import annotations

import json
import threading

import pytest

from tests.conftest import fixture_dir

from server.bench.configs import Stopper, completion_text, stop_points
from server.bench.evaluate import EvalSettings, Evaluator, edit_similarity, summarize
from server.bench.humaneval import TASK_TYPES, build_tasks, load_problems, sample_tasks
from server.bench.tabby_rules import tabby_postprocess

TINY = "llama-tiny-4.0bpw"


@pytest.fixture(scope="module")
def problems():
    return load_problems()


@pytest.fixture(scope="module")
def tasks(problems):
    return build_tasks(problems)


def test_all_problems_and_task_types(problems, tasks):
    assert len(problems) == 164
    counts = {t: sum(x.type == t for x in tasks) for t in TASK_TYPES}
    # every non-blank solution line, every block, one span per problem
    assert counts["single-line"] == sum(
        sum(1 for l in p["canonical_solution"].rstrip("\n").split("\n") if l.strip()) for p in problems.values())
    assert counts["multi-line"] > 164 and counts["random-span"] == 164
    assert len({t.id for t in tasks}) == len(tasks)


def test_the_masked_text_puts_the_solution_back(problems, tasks):
    for t in tasks:
        p = problems[t.problem]
        assert (t.prefix + t.expected + t.suffix).strip() == (p["prompt"] + p["canonical_solution"]).strip(), t.id


def test_the_expected_completions_pass_in_the_sandbox(problems, tasks):
    """Scoring works: a sample of tasks filled with their own masked text pass their tests."""
    from concurrent.futures import ThreadPoolExecutor

    from server.bench.sandbox import run_program

    sample = sample_tasks(tasks, 24, seed=3)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda t: run_program(t.program(t.expected, problems[t.problem])), sample))
    assert all(r.passed for r in results), [(t.id, r.detail) for t, r in zip(sample, results) if not r.passed]
    # and a wrong one fails
    t = sample[0]
    assert not run_program(t.program("raise ValueError('no')", problems[t.problem])).passed


def test_limit_and_seed_draw_the_same_tasks(tasks):
    a, b = sample_tasks(tasks, 30, seed=1), sample_tasks(tasks, 30, seed=1)
    assert [t.id for t in a] == [t.id for t in b] and len(a) == 30
    assert {t.type for t in a} == set(TASK_TYPES)
    assert [t.id for t in sample_tasks(tasks, 30, seed=2)] != [t.id for t in a]


def test_edit_similarity():
    assert edit_similarity("abc", "abc") == 1.0
    assert edit_similarity("", "") == 1.0
    assert edit_similarity("abcd", "abce") == pytest.approx(0.75)
    assert edit_similarity("", "xy") == 0.0


def test_tabby_rules():
    from languages import resolve_language

    py = resolve_language("python", "a.py")
    # a blank line stops it, even inside a function
    assert tabby_postprocess("x = 1\n\n    y = 2", "def f():\n    ", "\n", py) == "x = 1"
    # column-0 keywords and comments stop it
    assert tabby_postprocess("return 1\ndef g():", "def f():\n    ", "\n", py) == "return 1"
    assert tabby_postprocess("return 1\n# done", "def f():\n    ", "\n", py) == "return 1"
    # mid-line: one line; before closing brackets only: more lines are allowed
    assert tabby_postprocess("a, b\n    c", "f(", "x)\n", py) == "a, b"
    assert tabby_postprocess("a,\n    b", "f(", ")\n", py) == "a,\n    b"


class ScriptedCompleter:
    """Real prompts (the tiny model's CompletionService), scripted model output: the sandbox under test."""

    def __init__(self, local, answers: dict[str, str]):
        self.local, self.answers = local, answers
        self.generated = 0

    def describe(self):
        return {"model": "scripted"}

    def prepare(self, task, variant, max_tokens):
        self._task = task
        return self.local.prepare(task, variant, max_tokens)

    def stream(self, prepared, cancel):
        self.generated += 1
        yield self.answers[self._task.id]


@pytest.fixture(scope="module")
def local():
    from engine import load_model
    from server.bench.completers import LocalCompleter
    from server.config import ServerConfig

    return LocalCompleter(load_model(fixture_dir(TINY), device="cpu"), ServerConfig(default_max_tokens=8))


def test_hostile_completions_fail_only_their_own_tasks(problems, tasks, local, tmp_path):
    """In one eval run: a completion that loops, one that allocates without bound, one that forks,
    one that writes outside its directory; the right completions beside them still pass."""
    singles = [t for t in tasks if t.type == "single-line" and t.expected.startswith("return ")][:8]
    escape = tmp_path / "escaped.txt"
    hostile = ["while True: pass", "x = [bytearray(1 << 24) for _ in iter(int, 1)]",
               "__import__('os').fork()", f"open({str(escape)!r}, 'w').write('x')"]
    answers = {t.id: t.expected for t in singles}
    for t, bad in zip(singles[::2], hostile):
        answers[t.id] = bad
    completer = ScriptedCompleter(local, answers)
    ev = Evaluator(completer, problems, tmp_path / "cache",
                   EvalSettings(configs=("raw",), workers=4, timeout_s=2.0, memory_mb=256, progress=False))
    scored = {s.task.id: s for s in ev.run(singles)}
    for t in singles:
        assert scored[t.id].passed == (answers[t.id] == t.expected), (t.id, scored[t.id].detail)
    assert scored[singles[0].id].status == "timeout"
    assert not escape.exists()


def test_stop_points_follow_each_configurations_rules(local, tasks):
    """kodkod stops at its stop strings (a new top-level definition), Tabby at its first blank line,
    raw at the end."""
    t = next(x for x in tasks if x.type == "single-line" and x.expected.startswith("return "))
    prepared = local.prepare(t, "default", 64)
    pieces = [t.expected, "\n", "\n", "def g():\n", "    return 2\n"]
    stops = stop_points(pieces, prepared.info, {"raw", "tabby", "kodkod"})
    assert stops["raw"] == len(pieces)
    assert stops["tabby"] == 3  # "\n\n" is complete at the third piece
    assert stops["kodkod"] == 4
    assert completion_text("tabby", pieces, stops["tabby"], prepared.info) == t.expected
    from server.completion import CompletionService
    from server.config import ServerConfig

    text = completion_text("kodkod", pieces, stops["kodkod"], prepared.info, CompletionService(None, ServerConfig()))
    assert text == t.expected


def test_eval_command_reports_and_resumes(tmp_path, capsys):
    """`kodkod eval` end to end on the real tiny model: reports with sane fields, then a second run
    that finds every generation in the cache."""
    from server.cli import main

    out = tmp_path / "out"
    argv = ["eval", "--model", str(fixture_dir(TINY)), "--device", "cpu", "--limit", "6", "--max-tokens", "8",
            "--configs", "raw,tabby,kodkod,kodkod-no-ts-context", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    data = json.loads((out / "eval.json").read_text())
    assert data["meta"]["tasks"] == 6 and data["meta"]["commit"] is not None
    rows = {(r["config"], r["type"]): r for r in data["summary"]}
    for c in ("raw", "tabby", "kodkod", "kodkod-no-ts-context"):
        for t in (*TASK_TYPES, "all"):
            r = rows[(c, t)]
            assert 0 <= r["pass_at_1"] <= 1 and 0 <= r["edit_similarity"] <= 1 and 0 < r["mean_tokens"] <= 8
    assert rows[("raw", "all")]["n"] == 6 and len(data["tasks"]) == 24
    assert "| task type |" in (out / "eval.md").read_text()
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG"
    gens = next((out / "cache").glob("generations-*.jsonl"))
    lines = gens.read_text().count("\n")
    assert lines == 6  # the variants' prompts are equal here: one generation per task
    capsys.readouterr()
    assert main(argv) == 0
    assert gens.read_text().count("\n") == lines  # nothing generated again
    assert json.loads((out / "eval.json").read_text())["summary"] == data["summary"]


def test_eval_against_a_running_server(tmp_path, capsys):
    """--url: kodkod's answers come from a real uvicorn server, the raw tokens from a raw_prompt stream."""
    from engine import load_model
    from server.app import create_app
    from server.cli import main
    from server.config import ServerConfig
    from tests.server.srvutil import serve_live

    app = create_app(ServerConfig(home=tmp_path / "home", default_max_tokens=8),
                     load_model(fixture_dir(TINY), device="cpu"))
    out = tmp_path / "out"
    try:
        with serve_live(app) as url:
            assert main(["eval", "--url", url, "--limit", "3", "--max-tokens", "8", "--out", str(out),
                         "--no-progress"]) == 0
    finally:
        app.state.server.worker.stop()
    data = json.loads((out / "eval.json").read_text())
    assert data["meta"]["url"] == url and data["meta"]["configs"] == ["tabby", "kodkod"]
    assert {r["config"] for r in data["summary"]} == {"tabby", "kodkod"}
    assert all(r["n"] == 3 for r in data["summary"] if r["type"] == "all")
    assert all(t["latency_s"] is not None and t["latency_s"] > 0 for t in data["tasks"])
