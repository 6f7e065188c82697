"""Prompt building per keystroke, with and without the memos kept across builds (languages/memo.py).

    python benchmarks/prompt_bench.py [MODEL_DIR] [--memo both|on|off] [--against REV] [--keys 40] [--file PATH] [--budget 2048]

Replays the keystroke trace of benchmarks/reuse_bench.py (a real file retyped a character at a
time, a switch elsewhere, back) through the server's CompletionService up to the prompt: what a
request pays before the engine runs (validation, FIM template, budget, context, token ids). Only
the model directory's tokenizer is loaded, no weights (default: the cached Qwen2.5-Coder 0.5B).

`--memo both` answers every keystroke twice in turn, memos off (each build starts empty: every
line encoded, every signature parsed, as before the memos) then on, so that a shared machine's
load falls on both alike, checks the two prompts are identical, and prints a markdown table of
milliseconds per keystroke over `--rounds` replays of the trace (memos emptied before each).
`--against REV` adds the languages/ package of a git revision (e.g. the commit before the memos),
exported to a temporary folder and imported under another name, as one more row timed in turn.
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT_MODEL = Path.home() / ".cache" / "kodkod" / "models" / "qwen2.5-coder-0.5b" / "exl2-4bpw"


def _service(model_dir: str, budget: int, template: str | None):
    from engine.tokenizer import Tokenizer
    from server.completion import CompletionService
    from server.config import ServerConfig

    # The service needs the engine only for its tokenizer and context length before generating.
    engine = SimpleNamespace(tokenizer=Tokenizer.from_dir(model_dir), max_seq_len=1 << 20)
    return CompletionService(engine, ServerConfig(prompt_budget_tokens=budget, fim_template=template))


def _languages_at(rev: str, folder: Path):
    """The languages/ package as it was at git revision `rev` (its imports inside are relative)."""
    repo = Path(__file__).resolve().parent.parent
    archive = subprocess.run(["git", "-C", str(repo), "archive", rev, "languages"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    (folder / "languages").rename(folder / "languages_at_rev")
    sys.path.insert(0, str(folder))
    return importlib.import_module("languages_at_rev")


def main() -> int:
    from benchmarks.reuse_bench import _request, keystroke_trace
    from languages import memo

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=str(DEFAULT_MODEL), help="a model directory (its tokenizer.json)")
    ap.add_argument("--memo", choices=["both", "on", "off"], default="both")
    ap.add_argument("--file", default=None, help="the file retyped (default: Python's json/decoder.py)")
    ap.add_argument("--language", default=None, help="the request's language id (default: from the file name)")
    ap.add_argument("--keys", type=int, default=40, help="keys typed at the main place")
    ap.add_argument("--switch-keys", type=int, default=8, help="keys typed at the other place")
    ap.add_argument("--budget", type=int, default=2048, help="prompt token budget (the server's default)")
    ap.add_argument("--template", default=None, help="FIM template (default: detected)")
    ap.add_argument("--rounds", type=int, default=3, help="replays of the whole trace")
    ap.add_argument("--against", default=None, help="also time languages/ at this git revision")
    args = ap.parse_args()

    if args.file is None:
        import json.decoder
        args.file = json.decoder.__file__
    from languages import resolve_language

    path = Path(args.file)
    language = args.language or resolve_language(None, path.name).name
    trace = keystroke_trace(path.read_text(encoding="utf-8"), args.keys, args.switch_keys)
    svc = _service(args.model, args.budget, args.template)
    import server.completion as completion

    ours = (completion.build_prompt, completion.resolve_language)
    modes: list = {"both": [False, True], "on": [True], "off": [False]}[args.memo]
    label = {False: "off", True: "on"}
    if args.against:
        rev = _languages_at(args.against, Path(tempfile.mkdtemp(prefix="prompt_bench_")))
        modes.insert(0, args.against)
        label[args.against] = f"languages/ at {args.against}"
    times: dict = {m: [] for m in modes}
    differ = 0
    for _ in range(args.rounds):
        memo.clear_all()
        for prefix, suffix in trace:
            out = []
            for mode in modes:
                if mode is True or mode is False:
                    completion.build_prompt, completion.resolve_language = ours
                    memo.set_enabled(mode)
                else:
                    completion.build_prompt, completion.resolve_language = rev.build_prompt, rev.resolve_language
                t0 = time.perf_counter()
                req = _request(prefix, suffix, path.name, language=language)
                svc.validate(req)
                info, _plan = svc._prepare(req)
                times[mode].append((time.perf_counter() - t0) * 1e3)
                out.append((info.prompt.ids, info.prompt.text))
            differ += any(o != out[0] for o in out)
    memo.set_enabled(True)
    completion.build_prompt, completion.resolve_language = ours

    print(f"{path.name} ({language}), {len(trace)} keystrokes x {args.rounds} rounds, budget {args.budget}, "
          f"tokenizer {Path(args.model).parent.name}/{Path(args.model).name}\n")
    print("| memos | median ms | p90 ms | mean ms | max ms |")
    print("|---|---|---|---|---|")
    for mode in modes:
        ts = sorted(times[mode])
        print(f"| {label[mode]} | {statistics.median(ts):.2f} | {ts[int(0.9 * (len(ts) - 1))]:.2f} | "
              f"{statistics.fmean(ts):.2f} | {ts[-1]:.2f} |")
    if len(modes) > 1:
        print(f"\nprompts (ids and text) identical in every row: {'yes' if not differ else f'NO ({differ} keys differ)'}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
