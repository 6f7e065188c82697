"""`kodkod eval`'s work: generate (once per task and prompt), score every configuration, summarise.

Generations are cached (JSONL, one line per finished task) under the cache folder,
keyed by the model, the task, the prompt and the token cap, so an interrupted run
resumes where it stopped and a second run only re-scores. A cached generation keeps
the raw text of each token, so changing post-processing needs no new generation:
only the prompt (or the model) does. Sandbox results are cached by program text.
"""
from __future__ import annotations

import hashlib
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .configs import CONFIGS, RULES, VARIANT, Stopper, completion_text, stop_points
from .humaneval import Task
from .sandbox import run_program


@dataclass
class EvalSettings:
    configs: tuple[str, ...] = CONFIGS
    max_tokens: int = 64
    workers: int = 2            # sandbox runs in parallel (generation is one at a time)
    timeout_s: float = 10.0     # per program
    memory_mb: int = 1024
    progress: bool = True
    time_limit_s: float | None = None  # stop generating new tasks after this long (the cache keeps them)


@dataclass
class Scored:
    task: Task
    config: str
    text: str
    passed: bool
    status: str
    detail: str
    exact: bool
    edit_similarity: float
    tokens: int
    latency_s: float | None
    prompt_tokens: int
    extra: dict = field(default_factory=dict)


class JsonlCache:
    """Append-only JSONL records by key; the last record of a key wins."""

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[str, dict] = {}
        self._lock = threading.Lock()
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    self.records[rec["key"]] = rec
                except (json.JSONDecodeError, KeyError):
                    continue  # a line cut short by an interruption
        path.parent.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def put(self, rec: dict) -> None:
        with self._lock:
            self.records[rec["key"]] = rec
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")


def normalize(text: str) -> str:
    return "\n".join(l.rstrip() for l in text.strip().split("\n"))


def edit_similarity(a: str, b: str) -> float:
    """1 - Levenshtein distance / the longer length (1.0 for two empty strings)."""
    if not a and not b:
        return 1.0
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return 1.0 - prev[-1] / max(len(a), len(b))


class Evaluator:
    def __init__(self, completer, problems: dict, cache_dir: Path, settings: EvalSettings):
        from server.completion import CompletionService
        from server.config import ServerConfig

        self.completer = completer
        self.problems = problems
        self.s = settings
        self.model = completer.describe()
        tag = hashlib.sha1(json.dumps(self.model, sort_keys=True, default=str).encode()).hexdigest()[:12]
        self.generations = JsonlCache(cache_dir / f"generations-{tag}.jsonl")
        self.runs = JsonlCache(cache_dir / "sandbox-runs.jsonl")
        self.finisher = CompletionService(None, ServerConfig())  # post-processing only

    # ---- generation ----
    def _generate(self, task: Task, variant: str, wanted: set[str], cached_only: bool = False):
        prepared = self.completer.prepare(task, variant, self.s.max_tokens)
        # equal prompts (the variants often build the same one) share one generation
        key = f"{task.id}|{prepared.prompt_sha}|{self.s.max_tokens}"
        rec = self.generations.get(key)
        if prepared.server_text is not None:  # a server answered for kodkod already (--url)
            wanted = wanted - {"kodkod"}
        if rec is not None and (rec["complete"] or wanted <= set(rec["settled"])):
            return prepared, rec, True
        if cached_only:
            return prepared, None, False
        cancel = threading.Event()
        stopper = Stopper(prepared.info, wanted - {"raw"})
        pieces, times, raw = [], [], ""
        start = time.monotonic()
        gen = self.completer.stream(prepared, cancel) if wanted else iter(())
        for piece in gen:
            pieces.append(piece)
            times.append(round(time.monotonic() - start, 4))
            raw += piece
            stopper.feed(raw, len(pieces))
            if "raw" not in wanted and stopper.done:
                cancel.set()  # every configuration has its text: nobody reads more
                break
        getattr(gen, "close", lambda: None)()
        rec = {"key": key, "task": task.id, "variant": variant, "pieces": pieces, "times": times,
               "prompt_tokens": prepared.prompt_tokens,
               "complete": bool(wanted) and not cancel.is_set(),  # ran to its end: any configuration can use it
               "settled": sorted(stopper.stops), "server_text": prepared.server_text,
               "server_seconds": prepared.server_seconds}
        self.generations.put(rec)
        return prepared, rec, False

    # ---- scoring ----
    def _run(self, program: str) -> dict:
        key = hashlib.sha256(program.encode()).hexdigest()
        rec = self.runs.get(key)
        if rec is None:
            r = run_program(program, self.s.timeout_s, self.s.memory_mb)
            rec = {"key": key, "passed": r.passed, "status": r.status, "detail": r.detail}
            self.runs.put(rec)
        return rec

    def _score(self, task: Task, config: str, prepared, rec: dict) -> Scored:
        pieces, times, rules = rec["pieces"], rec["times"], RULES[config]
        stop = stop_points(pieces, prepared.info, {rules})[rules]
        latency = times[stop - 1] if stop and stop <= len(times) else None
        if config == "kodkod" and rec.get("server_text") is not None:  # a server's own answer (--url)
            text, latency = rec["server_text"], rec.get("server_seconds")
        else:
            text = completion_text(config, pieces, stop, prepared.info, self.finisher)
        run = self._run(task.program(text, self.problems[task.problem]))
        return Scored(task=task, config=config, text=text, passed=run["passed"], status=run["status"],
                      detail=run["detail"], exact=normalize(text) == normalize(task.expected),
                      edit_similarity=edit_similarity(normalize(text), normalize(task.expected)),
                      tokens=stop, latency_s=latency, prompt_tokens=rec["prompt_tokens"])

    def run(self, tasks: list[Task]) -> list[Scored]:
        variants: dict[str, set[str]] = {}
        for c in self.s.configs:
            variants.setdefault(VARIANT[c], set()).add(RULES[c])
        deadline = time.monotonic() + self.s.time_limit_s if self.s.time_limit_s is not None else None
        scored: list[Scored] = []
        pool = ThreadPoolExecutor(max(1, self.s.workers))
        futures = []
        bar = tqdm(total=len(tasks) * len(variants), desc="eval", unit="task", disable=not self.s.progress,
                   dynamic_ncols=True)
        cached = 0
        skipped = 0
        for task in tasks:
            for variant, wanted in variants.items():
                late = deadline is not None and time.monotonic() > deadline  # past it: cached work only
                prepared, rec, hit = self._generate(task, variant, wanted, cached_only=late)
                bar.update(1)
                if rec is None:
                    skipped += 1
                    continue
                cached += hit
                for config in self.s.configs:
                    if VARIANT[config] == variant:
                        futures.append(pool.submit(self._score, task, config, prepared, rec))
                bar.set_postfix(cached=cached, refresh=False)
        bar.close()
        if skipped:
            print(f"kodkod eval: time limit reached; {skipped} generations left for a later run "
                  "(the cache keeps what is done)", file=sys.stderr)
        for f in tqdm(futures, desc="sandbox", unit="run", disable=not self.s.progress, dynamic_ncols=True):
            scored.append(f.result())
        pool.shutdown()
        return scored


def summarize(scored: list[Scored], max_tokens: int) -> list[dict]:
    """One row per (configuration, task type): pass@1, exact match, edit similarity, tokens, latency."""
    rows = []
    groups: dict[tuple[str, str], list[Scored]] = {}
    for s in scored:
        groups.setdefault((s.config, s.task.type), []).append(s)
        groups.setdefault((s.config, "all"), []).append(s)
    for (config, type_), items in groups.items():
        lat = [s.latency_s for s in items if s.latency_s is not None]
        rows.append({
            "config": config, "type": type_, "n": len(items),
            "pass_at_1": sum(s.passed for s in items) / len(items),
            "exact_match": sum(s.exact for s in items) / len(items),
            "edit_similarity": statistics.fmean(s.edit_similarity for s in items),
            "mean_tokens": statistics.fmean(s.tokens for s in items),
            "at_cap": sum(s.tokens >= max_tokens for s in items) / len(items),
            "p50_latency_s": statistics.median(lat) if lat else None,
        })
    order = {c: i for i, c in enumerate(CONFIGS)}
    types = {"single-line": 0, "multi-line": 1, "random-span": 2, "all": 3}
    rows.sort(key=lambda r: (types.get(r["type"], 9), order.get(r["config"], 9)))
    return rows
