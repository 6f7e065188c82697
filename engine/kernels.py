"""The CUDA kernels of csrc/: built on first use, cached, or the reason they are not there.

The extension is compiled with ninja through torch.utils.cpp_extension into
KODKOD_HOME/kernels/<key>, where the key hashes the sources, torch's version,
the CUDA version and the GPU architectures, so an upgrade rebuilds and a
second start loads in a second. KODKOD_BAKED_HOME/kernels/<key> (kernels compiled into a
container image with `kodkod build-kernels`) is looked in first. Anything that stops the build (no GPU, no
compiler, a compile error) leaves the engine on its torch path, with one log
line saying why.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger("kodkod.kernels")

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ("bindings.cpp", "gemv.cu", "attention.cu", "prefill.cu", "sampling.cu", "trace.cu")
HEADERS = ("kodkod.h", "launch.cuh", "trace.cuh", "mma.cuh")
MIN_CAPABILITY = (7, 5)

# Modes of the gemv kernel (csrc/kodkod.h: InputMode, OutputMode, Activation).
IN_HALF, IN_RMS_NORM, IN_LAYER_NORM = 0, 1, 2
OUT_HALF, OUT_RESIDUAL, OUT_GATED, OUT_ACT, OUT_FLOAT = 0, 1, 2, 3, 4
ACTIVATION_IDS = {"silu": 0, "gelu": 1, "gelu_pytorch_tanh": 2, "gelu_new": 2, "relu": 3}

_lock = threading.Lock()
_module = None
_reason: str | None = None


def kernel_home() -> Path:
    home = Path(os.environ.get("KODKOD_HOME") or Path.home() / ".cache" / "kodkod").expanduser()
    return home / "kernels"


def arch_list() -> str:
    """GPU architectures to build for: TORCH_CUDA_ARCH_LIST if set, else the visible GPUs'."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return env
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{a}.{b}" for a, b in caps)


def build_key(archs: str) -> str:
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    h.update(f"{torch.__version__}|{torch.version.cuda}|{archs}|{sys.version_info[:2]}|{_defines()}".encode())
    return h.hexdigest()[:16]


def _defines() -> list[str]:
    """KODKOD_TRACE=1 builds the phase timestamps of csrc/trace.cuh (benchmarks/trace_step.py)."""
    return ["-DKODKOD_TRACE"] if os.environ.get("KODKOD_TRACE") == "1" else []


def unavailable_reason() -> str | None:
    """Why the kernels cannot be used here, or None if nothing rules them out before a build."""
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    if torch.version.cuda is None:
        return "this torch build has no CUDA"
    low = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
           if torch.cuda.get_device_capability(i) < MIN_CAPABILITY]
    if low:
        return f"GPU {low[0]} is older than compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}"
    if os.environ.get("KODKOD_KERNELS", "1") == "0":
        return "KODKOD_KERNELS=0"
    if shutil.which("ninja") is None and not _has_ninja_module():
        return "ninja is not installed (pip install ninja)"
    return None


def _has_ninja_module() -> bool:
    try:
        import ninja  # noqa: F401
    except ImportError:
        return False
    os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    return True


def load(verbose: bool = False):
    """The compiled extension module, or None (see `reason()`). Builds once per process at most."""
    global _module, _reason
    with _lock:
        if _module is not None or _reason is not None:
            return _module
        _reason = unavailable_reason()
        if _reason is None:
            try:
                _module = build(verbose)
            except Exception as exc:  # a failed build must never stop the engine: it has a torch path
                first = str(exc).strip().splitlines()
                _reason = f"the kernel build failed: {first[-1] if first else type(exc).__name__}"
        if _module is None:
            log.warning("CUDA kernels off (%s): the engine runs its torch path", _reason)
        return _module


def reason() -> str | None:
    return _reason


def build(verbose: bool = False):
    """Compile (or find in the cache) and import the extension; raises if the build fails."""
    from torch.utils.cpp_extension import load as load_extension

    archs = arch_list()
    key = build_key(archs)
    name = f"kodkod_kernels_{key}"
    baked = os.environ.get("KODKOD_BAKED_HOME")
    if baked and (Path(baked) / "kernels" / key / f"{name}.so").is_file():
        return _import_so(name, Path(baked) / "kernels" / key / f"{name}.so")
    build_dir = kernel_home() / key
    build_dir.mkdir(parents=True, exist_ok=True)
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    built = build_dir / f"{name}.so"
    if built.is_file():  # the key already covers sources, compiler and architectures: no ninja pass needed
        return _import_so(name, built)
    print(f"kodkod: compiling CUDA kernels for sm {archs} (once, about a minute) into {build_dir}",
          file=sys.stderr, flush=True)
    t0 = time.monotonic()
    module = load_extension(
        name=name,
        sources=[str(CSRC / s) for s in SOURCES],
        extra_include_paths=[str(CSRC)],
        extra_cflags=["-O3", "-std=c++17", *_defines()],
        extra_cuda_cflags=["-O3", "-std=c++17", "-lineinfo", *_defines()],
        build_directory=str(build_dir),
        verbose=verbose,
    )
    print(f"kodkod: CUDA kernels ready in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    return module


def _import_so(name: str, path: Path):
    import importlib.machinery
    import importlib.util

    import torch  # noqa: F401  (the extension links against torch's libraries)

    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module
