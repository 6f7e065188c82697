"""`kodkod generate`: load a model and stream a completion of a prompt to stdout."""
from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (EXL2 or Hugging Face)")
    p.add_argument("--prompt", required=True, help="text to continue ('-' reads standard input)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="number format (default auto, as kodkod serve: fp16 on a GPU; on the CPU bf16 where it is native)")


def run(args: argparse.Namespace) -> int:
    from engine import GenerationParams
    from server.commands.common import load_engine

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        params = GenerationParams(
            max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
            stop_strings=tuple(args.stop),
        )
        engine = load_engine(args.model, device=args.device, dtype=args.dtype)
        ids = engine.tokenizer.encode(prompt)
        events = engine.generate(ids, params)
    except ValueError as exc:  # bad sampling settings or prompt
        print(f"kodkod generate: {exc}", file=sys.stderr)
        return 2
    n = 0
    for ev in events:
        sys.stdout.write(ev.text)
        sys.stdout.flush()
        if ev.finish_reason:
            print(f"\n[{n} tokens, finish: {ev.finish_reason}]", file=sys.stderr)
        else:
            n += 1
    sys.stdout.write("\n")
    return 0
