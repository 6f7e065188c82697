"""`kodkod eval`: fill-in-the-middle quality on HumanEval (pass@1, exact match, edit similarity)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

EVAL_COLUMNS = [("type", "task type", "str"), ("config", "configuration", "str"), ("n", "tasks", "str"),
                ("pass_at_1", "pass@1", "pct"), ("exact_match", "exact", "pct"),
                ("edit_similarity", "edit sim.", "f3"), ("mean_tokens", "tokens", "f1"),
                ("at_cap", "at cap", "pct"), ("p50_latency_s", "p50 ms", "ms")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from server.bench.configs import CONFIGS, DEFAULT_CONFIGS
    from server.bench.humaneval import TASK_TYPES

    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="model directory or known model name (default: the default model)")
    src.add_argument("--url", help="evaluate a running kodkod server instead of a local model")
    p.add_argument("--token", help="bearer token for --url")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="where a local model runs")
    p.add_argument("--types", default=",".join(TASK_TYPES),
                   help=f"comma-separated task types (default: all of {', '.join(TASK_TYPES)})")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help=f"comma-separated configurations, of {', '.join(CONFIGS)} (default: "
                        f"{','.join(DEFAULT_CONFIGS)}; 'raw' makes every generation run to the token cap, "
                        "several times slower)")
    p.add_argument("--limit", type=int, help="at most this many tasks in all, drawn with --seed across the types "
                                             "(default: every task)")
    p.add_argument("--seed", type=int, default=0, help="draws the tasks and the random spans (default 0)")
    p.add_argument("--workers", type=int, default=2, help="sandboxed test runs in parallel (default 2)")
    p.add_argument("--max-tokens", type=int, default=64, help="token cap per completion (default 64, as the server)")
    p.add_argument("--budget", type=int, help="prompt token budget (default: the server's, 2048)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds each test program may run (default 10)")
    p.add_argument("--time-limit", type=float, help="stop generating after this many seconds; what is done is "
                                                     "cached, so a second run resumes")
    p.add_argument("--out", default="bench-results/eval", help="report folder (default bench-results/eval)")
    p.add_argument("--cache", help="cache folder (default: OUT/cache)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _split(text: str, allowed, what: str) -> tuple[str, ...]:
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise SystemExit(f"kodkod eval: unknown {what} {', '.join(bad) or '(none given)'}; "
                         f"choose from {', '.join(allowed)}")
    return items


def make_completer(args):
    if args.url:
        from server.bench.completers import HttpCompleter

        return HttpCompleter(args.url, args.token)
    from engine import load_model
    from server.bench.completers import LocalCompleter
    from server.commands.serve import resolve_model
    from server.config import load_config

    config = load_config({"model": args.model, "device": args.device})
    if args.budget:
        config = config.model_copy(update={"prompt_budget_tokens": args.budget})
    path = resolve_model(config.model, config.home, device=config.device)
    print(f"kodkod eval: loading {path} on {config.device} ...", file=sys.stderr, flush=True)
    return LocalCompleter(load_model(path, device=config.device, dtype=config.dtype), config)


def run(args) -> int:
    from server.bench import report
    from server.bench.configs import CONFIGS
    from server.bench.evaluate import EvalSettings, Evaluator, summarize
    from server.bench.humaneval import TASK_TYPES, build_tasks, load_problems, sample_tasks

    types = _split(args.types, TASK_TYPES, "task type")
    configs = _split(args.configs, CONFIGS, "configuration")
    if args.url and "kodkod-no-ts-context" in configs:
        configs = tuple(c for c in configs if c != "kodkod-no-ts-context")
        print("kodkod eval: --url: leaving out kodkod-no-ts-context (it needs a local model)", file=sys.stderr)
    problems = load_problems()
    tasks = sample_tasks(build_tasks(problems, types, args.seed), args.limit, args.seed)
    out = Path(args.out)
    settings = EvalSettings(configs=configs, max_tokens=args.max_tokens, workers=args.workers,
                            timeout_s=args.timeout, progress=not args.no_progress, time_limit_s=args.time_limit)
    completer = make_completer(args)
    evaluator = Evaluator(completer, problems, Path(args.cache) if args.cache else out / "cache", settings)
    print(f"kodkod eval: {len(tasks)} tasks ({', '.join(types)}) x {', '.join(configs)}", file=sys.stderr)
    made = report.run_meta()  # the commit and date the run starts from
    start = time.monotonic()
    scored = evaluator.run(tasks)
    seconds = time.monotonic() - start
    rows = summarize(scored, args.max_tokens)
    meta = {**made, **evaluator.model, "tasks": len({s.task.id for s in scored}),
            "limit": args.limit, "seed": args.seed, "max_tokens": args.max_tokens, "types": list(types),
            "configs": list(configs), "seconds": round(seconds, 1)}
    report.write_json(out / "eval.json", {"meta": meta, "summary": rows,
                                          "tasks": [_task_row(s) for s in scored]})
    table = report.markdown_table(rows, EVAL_COLUMNS)
    quant = meta.get("quantization")
    form = f"EXL2 {quant.get('bits')} bpw" if isinstance(quant, dict) else "dense"
    md = (f"# kodkod eval: {meta['model']} ({form}, {meta.get('dtype') or 'dtype unknown'}, {meta.get('device')})\n\n"
          f"{meta['tasks']} tasks in {seconds / 60:.1f} min, `{meta['command']}`, commit {meta['commit']}, "
          f"{meta['machine']}, {meta['date']}\n\n{table}\n")
    (out / "eval.md").write_text(md, encoding="utf-8")
    report.pass_at_1_chart(rows, out / "eval.png", f"pass@1, {meta['model']} ({meta['tasks']} tasks)")
    print(table)
    print(f"kodkod eval: wrote {out / 'eval.json'}, {out / 'eval.md'}, {out / 'eval.png'}", file=sys.stderr)
    return 0


def _task_row(s) -> dict:
    return {"id": s.task.id, "type": s.task.type, "config": s.config, "passed": s.passed, "status": s.status,
            "detail": s.detail, "exact": s.exact, "edit_similarity": round(s.edit_similarity, 4),
            "tokens": s.tokens, "latency_s": s.latency_s, "text": s.text, "expected": s.task.expected}
