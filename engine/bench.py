"""`kodkod bench engine`: decode and prefill speed of the engine on random models in real shapes.

For each shape: a random EXL2 model (engine.convert.synthetic, about 4.0 bpw
with a 6-bit head; "0.5b-fp16" and the like: dense fp16 weights, what a GPU
serves by default) is written and loaded once per backend; decode speed is
timed through `Engine.generate` (what a request pays) and as bare decode steps;
prefill is timed for several prompt lengths; the floor is the bytes a step
reads over the device-to-device copy bandwidth measured in the same run.
"""
from __future__ import annotations

import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from . import GenerationParams, load_model
from .convert.synthetic import random_model, step_bytes

PREFILL_LENGTHS = (256, 1536, 4096)


def copy_bandwidth(device="cuda", nbytes=1 << 30) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus bytes written."""
    a = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    b = torch.empty_like(a)
    times = []
    for _ in range(12):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * (nbytes // 2) * 2 / statistics.median(times[2:])


def _time_decode(eng, prompt: list[int], n: int, runs: int = 3) -> tuple[float, float]:
    """(seconds per token through generate, seconds per bare decode step), medians."""
    eng.stop_ids = frozenset()
    params = GenerationParams(max_new_tokens=n)
    per_token = []
    for _ in range(runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in eng.generate(prompt, params):
            pass
        per_token.append((time.perf_counter() - t0) / n)
        eng.cache.ids = []
    # bare steps: the decoder alone, synchronised per step as generate does
    steps = []
    for _ in range(runs):
        eng.sampler.start(params, prompt, 0)
        eng.decoder.prefill(prompt, 0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            eng.decoder.decode()
            eng.sampler.token.item()
        steps.append((time.perf_counter() - t0) / n)
    eng.cache.ids = []
    return statistics.median(per_token), statistics.median(steps)


def _time_prefill(eng, length: int, runs: int = 5) -> float:
    prompt = [(7 * i + 3) % (eng.config.vocab_size - 1) + 1 for i in range(length)]
    eng.sampler.start(GenerationParams(), prompt[:1], 0)
    times = []
    for _ in range(runs + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        eng.decoder.prefill(prompt, 0)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    eng.cache.ids = []
    return statistics.median(times[1:])


def _kernels_per_step(eng) -> int:
    """Kernel launches in one decode step, run eagerly under the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        eng.decoder._step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def bench_model(path: Path, backend: str, floor_s: float, max_len: int) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    eng = load_model(path, device="cuda", backend=backend, max_seq_len=max_len, progress=False)
    load_s = time.perf_counter() - t0
    resident = torch.cuda.memory_allocated() - base
    peak_load = torch.cuda.max_memory_allocated() - base
    eng.warm_up()
    prompt = [(11 * i + 5) % (eng.config.vocab_size - 1) + 1 for i in range(64)]
    per_token, per_step = _time_decode(eng, prompt, 256)
    row = {
        "backend": eng.backend, "load_s": round(load_s, 2),
        "decode_tok_s": round(1 / per_token, 1), "ms_per_token": round(per_token * 1e3, 3),
        "step_ms": round(per_step * 1e3, 3), "floor_pct": round(100 * floor_s / per_token, 1),
        "kernels_per_step": _kernels_per_step(eng),
        "prefill_ms": {n: round(_time_prefill(eng, n) * 1e3, 2) for n in PREFILL_LENGTHS if n < max_len},
        "resident_gb": round(resident / 1e9, 3), "load_peak_gb": round(peak_load / 1e9, 3),
        "peak_gb": round((torch.cuda.max_memory_allocated() - base) / 1e9, 3),
    }
    del eng
    gc.collect()
    torch.cuda.empty_cache()
    return row


def run(shapes=("0.5b", "1.5b", "7b"), backends=("cuda", "torch"), work: str | None = None,
        max_len: int = 4608, out: str | None = None) -> list[dict]:
    bw = copy_bandwidth()
    results = []
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        for shape in shapes:
            path = random_model(Path(tmp) / shape, shape, device="cuda", progress=True)
            nbytes = step_bytes(path)
            floor = nbytes / bw
            for backend in backends:
                row = {"shape": shape, "bytes_per_token": nbytes, "copy_tb_s": round(bw / 1e12, 2),
                       "floor_ms": round(floor * 1e3, 4), **bench_model(path, backend, floor, max_len)}
                results.append(row)
                print(json.dumps(row), flush=True)
            for f in path.glob("*.safetensors"):
                f.unlink()
    print(markdown(results))
    if out:
        Path(out).write_text(json.dumps(results, indent=1))
    return results


def markdown(rows: list[dict]) -> str:
    lines = [f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth "
             f"{rows[0]['copy_tb_s'] if rows else '?'} TB/s", "",
             "| shape | backend | decode tok/s | ms/token | bare step ms | % of floor | kernels/step | "
             "prefill 256 / 1536 / 4096 ms | resident GB | load peak GB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pf = " / ".join(str(r["prefill_ms"].get(n, "-")) for n in PREFILL_LENGTHS)
        lines.append(f"| {r['shape']} | {r['backend']} | {r['decode_tok_s']} | {r['ms_per_token']} | {r['step_ms']} | "
                     f"{r['floor_pct']} | {r['kernels_per_step']} | {pf} | {r['resident_gb']} | {r['load_peak_gb']} |")
    return "\n".join(lines)


def chart(rows: list[dict], path, gpu: str | None = None) -> None:
    """Decode tok/s per shape and backend, with the bandwidth floor's tok/s for scale (PNG). `gpu`:
    the title's GPU name (default: this machine's), for a table measured elsewhere."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / (len(backends) + 1)
    for i, b in enumerate(backends):
        vals = [next((r["decode_tok_s"] for r in rows if r["shape"] == s and r["backend"] == b), 0) for s in shapes]
        ax.bar([x + i * width for x in range(len(shapes))], vals, width, label=f"kodkod {b}")
    floor = [1000 / next(r["floor_ms"] for r in rows if r["shape"] == s) for s in shapes]
    ax.bar([x + len(backends) * width for x in range(len(shapes))], floor, width, label="bandwidth floor",
           color="lightgray")
    ax.set_xticks([x + width * len(backends) / 2 for x in range(len(shapes))], shapes)
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.set_yscale("log")
    ax.legend()
    if gpu is None:
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    ax.set_title(f"kodkod engine, {gpu}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
