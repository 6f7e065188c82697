"""`kodkod ppl`: a model's perplexity on held-out code or a text file."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="+", help="model directories (HF or EXL2)")
    parser.add_argument("--text", metavar="FILE",
                        help="text/JSONL/Parquet file; default: held-out Python stdlib package sources")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens to score (default 16384)")
    parser.add_argument("--length", type=int, default=1024, help="window length (default 1024)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from engine.convert.calibration import eval_rows
    from engine.convert.ppl import perplexity
    from server.commands.common import load_engine

    for path in args.model:
        eng = load_engine(path, device=args.device)
        rows = eval_rows(eng.tokenizer.encode, args.tokens, args.length, args.text)
        n = sum(len(r) - 1 for r in rows)
        print(f"{path}: perplexity {perplexity(eng, rows, not args.no_progress):.4f} ({n} tokens)")
        del eng
    return 0
