"""Where a decode step and a prefill spend their GPU time (run on the GPU machine).

python benchmarks/profile_step.py [SHAPE] [--layers N] [--continued T]
Prints the kernels of one eager fast-path decode step by role (launch order is
fixed: embed, per layer qkv/attention/o/gate-up/down, head, sample), the graph
replay time, the top operators of a 1,536-token prefill, and those of a continued
prompt of T tokens after 1,300 cached ones (what a keystroke recomputes: the cursor
line and the suffix), with its wall time.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from engine import GenerationParams, load_model
from engine.convert.synthetic import random_model

ROLES = ("qkv", "attention", "o", "gate_up", "down")


def kernel_events(prof):
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", nargs="?", default="0.5b", help="a random model: 0.5b, 1.5b or 7b (EXL2 4.0 bpw), optionally with -8bpw or -fp16")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--max-len", type=int, default=4608)
    ap.add_argument("--continued", type=int, default=240, help="tokens of the continued prompt (default 240)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = random_model(f"{tmp}/m", args.shape, device="cuda", layers=args.layers)
        eng = load_model(path, device="cuda", backend="cuda", max_seq_len=args.max_len, progress=False)
        eng.warm_up()
        prompt = list(range(1, 1537))
        eng.sampler.start(GenerationParams(), prompt, 0)
        eng.decoder.prefill(prompt, 0)
        for _ in range(3):
            eng.decoder.decode()
        torch.cuda.synchronize()
        by_role: dict[str, list[float]] = {}
        with torch.inference_mode():
            for _ in range(5):
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    eng.decoder._step()
                    torch.cuda.synchronize()
                ev = kernel_events(prof)
                n_layers = eng.config.num_layers
                roles = ["embed"] + [r for _ in range(n_layers) for r in ROLES] + ["head", "sample"]
                if len(ev) != len(roles):
                    print("unexpected kernel count", len(ev), [e.name for e in ev][:20])
                    roles = [e.name[:40] for e in ev]
                for r, e in zip(roles, ev):
                    by_role.setdefault(r, []).append(e.device_time_total if hasattr(e, "device_time_total")
                                                      else e.cuda_time_total)
        total = 0.0
        print(f"{'role':12s} {'launches':>8s} {'median us':>10s} {'sum us/step':>12s}")
        for r, ts in by_role.items():
            per_step = len(ts) / 5
            med = statistics.median(ts)
            total += med * per_step
            print(f"{r:12s} {per_step:8.0f} {med:10.2f} {med * per_step:12.1f}")
        print(f"kernel time per step: {total:.1f} us")
        times = []
        for _ in range(200):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            eng.decoder.decode()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        print(f"graph replay + sync: median {statistics.median(times) * 1e6:.1f} us")
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            eng.decoder.prefill(prompt, 0)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
        more = list(range(2000, 2000 + args.continued))
        times = []
        for _ in range(20):  # graph capture on the first
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            eng.decoder.prefill(more, 1300)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            eng.decoder.prefill(more, 1300)
            torch.cuda.synchronize()
        ev = kernel_events(prof)
        gpu = sum(getattr(e, "device_time_total", 0) for e in ev)
        print(f"continued prompt of {args.continued} tokens after 1,300: wall median "
              f"{statistics.median(times[1:]) * 1e3:.2f} ms, {len(ev)} kernels, {gpu / 1e3:.2f} ms of kernel time")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))



def sdpa_check():
    """Which fused SDPA kernels accept a prefill's shapes (the math fallback is slow)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 14, 1536, 64, device="cuda", dtype=torch.float16)
    k = torch.randn(1536, 14, 64, device="cuda", dtype=torch.float16).transpose(0, 1)[None]
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True)
            print(backend, "ok")
        except Exception as exc:  # noqa: BLE001
            print(backend, "refused:", str(exc).splitlines()[0][:200])


if __name__ == "__main__":
    sdpa_check()
    main()
