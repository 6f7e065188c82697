"""`kodkod build-kernels`: compile the CUDA kernels ahead of time (for images built without a GPU)."""
from __future__ import annotations

import argparse
import os
import sys



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", help="compute capabilities, e.g. 7.5;8.0;8.6;8.9;9.0 (default: the GPUs here)")
    p.add_argument("--verbose", action="store_true", help="show the compiler's output")


def run(args) -> int:
    import torch

    from engine import kernels

    if args.arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = args.arch.replace(",", ";")
    elif not torch.cuda.is_available():
        print("kodkod build-kernels: no GPU here; name the architectures with --arch", file=sys.stderr)
        return 2
    try:
        module = kernels.build(verbose=args.verbose)
    except Exception as exc:  # the compiler's message is the useful part
        print(f"kodkod build-kernels: the build failed: {exc}", file=sys.stderr)
        return 1
    print(f"kodkod: kernels ready: {module.__file__}")
    return 0
