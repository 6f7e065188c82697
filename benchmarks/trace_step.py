"""Where each kernel of a decode step spends its time, from timestamps taken inside the kernels.

KODKOD_TRACE=1 python benchmarks/trace_step.py [SHAPE] [--context 1536]

Needs a trace build (KODKOD_TRACE=1: csrc/trace.cuh; it gets its own build key). The decode
step is captured as a graph and replayed; thread 0 of every block stamps the global timer at
fixed points. Per role (median over the layers) it prints, in microseconds:
  launch   first block's start minus the previous kernel's end (negative: started early, PDL)
  wait     first block past the dependency wait minus the previous kernel's end
  input    past the wait -> input ready (norm and gather / q, k, v loaded and rotated), median block
  compute  input ready -> the block's result (weights streamed, reduced), median block
  tail     result -> last block done (split-K or split merge, stragglers)
  span     this kernel's end minus the previous kernel's end: what it adds to the step
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import torch

from engine import GenerationParams, kernels, load_model
from engine.convert.synthetic import random_model

# csrc: 0 entry, 1 before the dependency wait, 2 past it, 3 input ready, 4 result, 5 block done,
# 6 merge done (last block only)
ROLES = ("qkv", "attention", "o", "gate_up", "down")


def analyse(names: list[str], stamps: torch.Tensor) -> list[dict]:
    rows, prev_end = [], None
    for name, s in zip(names, stamps):
        blocks = min(int(name.rsplit("/", 1)[1]), s.shape[0])
        s = s[:blocks].double() / 1000.0  # ns -> us
        p = [s[:, i] for i in range(s.shape[1])]
        # points a block may skip: 3, 4 in sample; 1-4 in attention's splits past the context
        have = lambda i: p[i][p[i] > 0]  # noqa: E731
        end = float(p[5].max())
        row = {"name": name.rsplit("/", 1)[0], "blocks": blocks}
        if prev_end is not None:
            row["launch"] = float(p[0].min()) - prev_end
            row["wait"] = float(have(2).min()) - prev_end
            row["span"] = end - prev_end
        if len(have(3)) and len(have(4)):
            row["input"] = float((have(3) - p[2][p[3] > 0]).median())  # blocks that pass 3 passed 2
            row["compute"] = float((have(4) - have(3)).median())
            row["tail"] = end - float(have(4).median())
        else:
            row["tail"] = end - float(have(2).min())
        row["pre"] = float((p[1][p[1] > 0] - p[0][p[1] > 0]).median()) if len(have(1)) else 0.0
        rows.append(row)
        prev_end = end
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", nargs="?", default="0.5b", help="a random model: 0.5b, 1.5b or 7b (EXL2 4.0 bpw), optionally with -8bpw or -fp16")
    ap.add_argument("--context", type=int, default=1536)
    ap.add_argument("--replays", type=int, default=20)
    args = ap.parse_args()
    if os.environ.get("KODKOD_TRACE") != "1":
        raise SystemExit("run with KODKOD_TRACE=1 (a trace build of the kernels)")
    with tempfile.TemporaryDirectory() as tmp:
        path = random_model(f"{tmp}/m", args.shape, device="cuda")
        eng = load_model(path, device="cuda", backend="cuda", max_seq_len=args.context + 512, progress=False)
        ext = kernels.load()
        prompt = list(range(1, args.context + 1))
        eng.sampler.start(GenerationParams(), prompt, 0)
        eng.decoder.prefill(prompt, 0)
        eng.decoder.decode()  # the trace buffer exists before the capture below
        ext.trace_reset()
        eng.decoder._graphs.clear()
        eng.decoder.decode()  # warm-up runs and the capture: the graph's launches are the last ones
        for _ in range(args.replays):
            eng.decoder.decode()
        torch.cuda.synchronize()
        names, stamps = ext.trace_read()
    n_layers = eng.config.num_layers
    per_step = n_layers * len(ROLES) + 2
    names, stamps = names[-per_step:], stamps[-per_step:]
    rows = analyse(names, stamps)
    roles = [r for _ in range(n_layers) for r in ROLES] + ["head", "sample"]
    step = sum(r.get("span", 0.0) for r in rows[1:])
    ticks = stamps[stamps > 0].flatten().sort().values.diff()
    print(f"{args.shape}, context {args.context}: step {step:.1f} us over {len(rows)} traced kernels "
          f"(global timer's smallest nonzero step: {int(ticks[ticks > 0].min())} ns)")
    cols = ("blocks", "pre", "launch", "wait", "input", "compute", "tail", "span")
    print(f"{'role':10s}" + "".join(f"{c:>9s}" for c in cols) + f"{'x/step':>8s}{'us/step':>9s}")
    for role in dict.fromkeys(roles):
        mine = [r for r, name in zip(rows, roles) if name == role]
        vals = [statistics.median([r[c] for r in mine if c in r]) if any(c in r for r in mine) else float("nan")
                for c in cols]
        total = sum(r.get("span", 0.0) for r in mine)
        print(f"{role:10s}" + "".join(f"{v:9.2f}" for v in vals) + f"{len(mine):8d}{total:9.1f}")


if __name__ == "__main__":
    main()
