"""`kodkod convert`: quantize a Hugging Face model directory to EXL2."""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", "--input", required=True, help="HF model directory (fp16/bf16/fp32 safetensors)")
    parser.add_argument("-o", "--output", required=True, help="output EXL2 model directory")
    parser.add_argument("-b", "--bits", type=float, default=4.0, help="target bits per weight, 2.0-8.0 (default 4.0)")
    parser.add_argument("--head-bits", type=int, default=6, choices=(2, 3, 4, 5, 6, 8),
                        help="bits for lm_head (default 6)")
    parser.add_argument("--calibration", metavar="FILE",
                        help="calibration text (.txt, .jsonl, .parquet); default: Python stdlib sources")
    parser.add_argument("--fast", action="store_true",
                        help="round-to-nearest with scale search, no calibration (quick start, lower quality)")
    parser.add_argument("--rows", type=int, default=64, help="calibration rows (default 64)")
    parser.add_argument("--length", type=int, default=512, help="tokens per calibration row (default 512)")
    parser.add_argument("--measure-rows", type=int, metavar="N",
                        help="calibration rows for measuring the bit allocation (default: a quarter of --rows, "
                             "at least 4)")
    parser.add_argument("--allocation", metavar="FILE",
                        help="reuse the bit allocation of an earlier conversion (its kodkod-convert.json) "
                             "instead of measuring one")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    parser.add_argument("--shard-mb", type=int, default=8192, help="max output shard size in MB (default 8192)")
    parser.add_argument("--ppl", action="store_true",
                        help="afterwards, report perplexity of the input and the output on held-out code")
    parser.add_argument("--ppl-tokens", type=int, default=16384, help="tokens scored by --ppl (default 16384)")
    parser.add_argument("--keep-work", action="store_true", help="keep the resumable work folder when done")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from engine.convert.allocate import read_allocation
    from engine.convert.converter import ConvertError, convert
    from server.commands.common import check_device, load_engine

    check_device(args.device)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    try:
        allocation = read_allocation(args.allocation, "--allocation") if args.allocation else None
        out = convert(args.input, args.output, bits=args.bits, head_bits=args.head_bits,
                      calibration=args.calibration, fast=args.fast, rows=args.rows, length=args.length,
                      device=args.device, shard_mb=args.shard_mb, progress=not args.no_progress, log=log,
                      keep_work=args.keep_work, measure_rows=args.measure_rows, allocation=allocation)
    except (ConvertError, ValueError, OSError) as exc:
        print(f"kodkod convert: {exc}", file=sys.stderr)
        return 1
    if args.ppl:
        from engine.convert.calibration import eval_rows
        from engine.convert.ppl import perplexity

        for label, path in (("input", args.input), ("output", out)):
            eng = load_engine(path, device=args.device)
            rows = eval_rows(eng.tokenizer.encode, args.ppl_tokens)
            print(f"perplexity {label}: {perplexity(eng, rows, not args.no_progress):.4f}")
            del eng
    print(out)
    return 0
