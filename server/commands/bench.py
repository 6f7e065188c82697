"""`kodkod bench SUB`: benchmarks. Each sub-command is an (add_arguments, run) pair in SUBCOMMANDS,
so another one (`bench engine`, say) is one function pair and one line in the table."""
from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

HTTP_COLUMNS = [("requests", "requests", "str"), ("completed", "completed", "str"),
                ("cancelled_fraction", "cancelled", "pct"), ("p50_s", "p50 ms", "ms"), ("p95_s", "p95 ms", "ms"),
                ("p99_s", "p99 ms", "ms"), ("first_event_p50_s", "first event p50 ms", "ms"),
                ("tokens_generated", "tokens", "int"), ("tokens_after_cancel", "tokens after cancel", "int"),
                ("saturation_requests_per_s", "req/s at saturation", "f2")]


# ---------------------------------------------------------------- bench http
def add_http_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="the server, e.g. http://127.0.0.1:8080")
    p.add_argument("--token", help="bearer token")
    p.add_argument("--traces", type=int, default=4, help="traces typed one after another (default 4)")
    p.add_argument("--chars", type=int, default=200, help="characters typed per trace (default 200)")
    p.add_argument("--file", action="append", metavar="LANG:PATH",
                   help="type this file instead of the defaults (repeatable), e.g. python:foo.py")
    p.add_argument("--speed", type=float, default=1.0, help="typing speed factor (default 1: about 8 keys/s)")
    p.add_argument("--debounce-ms", type=float, default=150.0, help="pause before a request goes out (default 150)")
    p.add_argument("--max-tokens", type=int, help="max_tokens per request (default: the server's)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request at most (default 30)")
    p.add_argument("--saturation-requests", type=int, default=32,
                   help="requests in the saturation phase (default 32; 0 skips it)")
    p.add_argument("--saturation-seconds", type=float, default=60.0, help="time limit of that phase (default 60)")
    p.add_argument("--concurrency", type=int, default=4, help="clients in the saturation phase (default 4)")
    p.add_argument("--seed", type=int, default=0, help="chooses the regions and the keystroke gaps (default 0)")
    p.add_argument("--out", default="bench-results/http", help="report folder (default bench-results/http)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_http(args) -> int:
    from server.bench import report
    from server.bench.trace import BenchSettings, run_bench

    sources = None
    if args.file:
        sources = []
        for spec in args.file:
            lang, sep, path = spec.partition(":")
            if not sep or not Path(path).is_file():
                print(f"kodkod bench http: --file wants LANG:PATH of an existing file, not {spec!r}", file=sys.stderr)
                return 2
            sources.append((lang, Path(path)))
    settings = BenchSettings(traces=args.traces, chars=args.chars, speed=args.speed, debounce_s=args.debounce_ms / 1000,
                             max_tokens=args.max_tokens, timeout_s=args.timeout,
                             saturation_requests=args.saturation_requests, saturation_seconds=args.saturation_seconds,
                             concurrency=args.concurrency, seed=args.seed, token=args.token,
                             progress=not args.no_progress)
    made = report.run_meta()  # the commit and date the run starts from
    try:
        result = asyncio.run(run_bench(args.url, settings, sources))
    except OSError as exc:
        print(f"kodkod bench http: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    result["meta"] = made
    out = Path(args.out)
    report.write_json(out / "http.json", result)
    s, meta = result["summary"], result["meta"]
    table = report.markdown_table([s], HTTP_COLUMNS)
    md = (f"# kodkod bench http: {result['server']['model']} on {result['server']['device']}\n\n"
          f"{s['keystrokes']} keystrokes in {len(result['traces'])} traces "
          f"({', '.join(sorted({t['language'] for t in result['traces']}))}), `{meta['command']}`, "
          f"commit {meta['commit']}, {meta['machine']}, {meta['date']}\n\n{table}\n")
    (out / "http.md").write_text(md, encoding="utf-8")
    series = {"typing (completed)": [r["latency_s"] for r in result["requests"] if r["status"] == "completed"],
              "first event": [r["first_event_s"] for r in result["requests"]
                              if r["status"] == "completed" and r["first_event_s"] is not None]}
    if result["saturation"]:
        series["saturation"] = [x for x in result["saturation"]["latency_s"] if x is not None]
    report.latency_chart(series, out / "http.png", f"latency, {result['server']['model']} ({meta['machine']})")
    print(table)
    print(f"kodkod bench http: wrote {out / 'http.json'}, {out / 'http.md'}, {out / 'http.png'}", file=sys.stderr)
    return 0


# name -> (add_arguments, run, one-line help)
# ---------------------------------------------------------------- bench engine
def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", default="0.5b,1.5b,7b",
                   help="Qwen2.5-Coder shapes at 4.0 bpw EXL2, with -8bpw at 8.0 bpw, or with -fp16 for dense "
                        "fp16 weights (what a GPU serves by default), e.g. 0.5b,0.5b-8bpw,0.5b-fp16 "
                        "(default 0.5b,1.5b,7b)")
    p.add_argument("--backends", default="cuda,torch", help="engine backends to compare (default cuda,torch)")
    p.add_argument("--max-len", type=int, default=4608, help="context (KV cache) length (default 4608)")
    p.add_argument("--work", help="folder for the random models (default: a temporary folder)")
    p.add_argument("--out", default="bench-results/engine", help="report folder (default bench-results/engine)")


def run_engine(args) -> int:
    import torch

    from engine.convert.synthetic import parse_model_name

    shapes = tuple(args.shapes.split(","))
    try:
        for name in shapes:
            parse_model_name(name)
    except ValueError as exc:
        print(f"kodkod bench engine: {exc}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("kodkod bench engine: needs a CUDA GPU (it times the GPU engine)", file=sys.stderr)
        return 2
    from engine import bench

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = bench.run(shapes=shapes, backends=tuple(args.backends.split(",")),
                     work=args.work, max_len=args.max_len, out=str(out / "engine.json"))
    (out / "engine.md").write_text(bench.markdown(rows) + "\n")
    bench.chart(rows, out / "engine.png")
    print(f"kodkod: report in {out}/engine.json, engine.md, engine.png")
    return 0


SUBCOMMANDS = {
    "http": (add_http_arguments, run_http, "replay keystroke traces against a running server (latency as an editor sees it)"),
    "engine": (add_engine_arguments, run_engine, "decode and prefill speed of the engine on random models in real "
                                                 "shapes, fast path and torch path side by side (GPU)"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", metavar="BENCH")
    for name, (add, run_, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        add(sp)
        sp.set_defaults(_bench_run=run_)
    p.set_defaults(_bench_parser=p)


def run(args) -> int:
    if getattr(args, "_bench_run", None) is None:
        args._bench_parser.print_help()
        return 2
    return args._bench_run(args)
