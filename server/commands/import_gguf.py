"""`kodkod import-gguf`: turn a GGUF file into a Hugging Face model directory."""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="the .gguf file")
    parser.add_argument("-o", "--output", required=True, help="output HF model directory")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                        help="dtype of the written weights (default float32: the GGUF values exactly)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from engine.convert.gguf_import import GGUFImportError, import_gguf

    try:
        out = import_gguf(args.file, args.output, dtype=args.dtype, progress=not args.no_progress,
                          log=lambda s: print(s, file=sys.stderr))
    except (GGUFImportError, OSError) as exc:
        print(f"kodkod import-gguf: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0
