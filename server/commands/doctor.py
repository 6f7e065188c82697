"""`kodkod doctor`: what this machine offers the engine, and a self-test of the CUDA kernels."""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=2.0, help="length of the kernel self-test (default 2)")


def _line(name: str, value: str) -> None:
    print(f"{name:<18} {value}")


def _nvcc() -> str:
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return "not found (the kernels need nvcc and ninja to build once)"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{nvcc} (does not run: {exc})"
    return f"{nvcc} ({out.strip().splitlines()[-1] if out.strip() else '?'})"


def _attention_path() -> str:
    import importlib.util

    prefill = "flash-attn" if importlib.util.find_spec("flash_attn") else "torch SDPA (flash / memory-efficient kernels)"
    return f"prefill: {prefill}; decode: kodkod kernel (split over the sequence, RoPE and cache write fused)"


def run(args) -> int:
    import torch

    from engine import kernels

    _line("python", sys.version.split()[0])
    _line("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    from engine.dtypes import cpu_has_bf16, resolve_dtype

    auto = str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
    _line("CPU", f"{os.cpu_count() or 1} cores, {'native' if cpu_has_bf16() else 'no native'} bf16 products: "
                 f"a model on the CPU computes in {auto} (dtype auto)")
    if not torch.cuda.is_available():
        _line("GPU", "none: the engine runs its torch path on the CPU")
        return 0
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        _line(f"GPU {i}", f"{p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                          f"{p.multi_processor_count} SMs")
    try:
        drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
        _line("driver", drv[0] if drv else "?")
    except (OSError, subprocess.TimeoutExpired):
        _line("driver", "? (nvidia-smi not found)")
    _line("compiler", _nvcc())
    _line("ninja", shutil.which("ninja") or "not on PATH")
    ext = kernels.load()
    if ext is None:
        _line("kernels", f"OFF: {kernels.reason()}")
        return 1
    _line("kernels", f"built for sm {kernels.arch_list()}, cached in {kernels.kernel_home()}")
    _line("attention", _attention_path())
    from engine import selftest

    failed = 0
    for name, ok, detail in selftest.run(args.seconds):
        _line("self-test", f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
        failed += not ok
    return 1 if failed else 0
