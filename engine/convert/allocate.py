"""Bit allocation: candidate bit mixes per layer, their measured error, and the choice.

Each linear layer gets one `Mix` out of `CANDIDATES`. For every layer and
candidate the converter measures the output error the candidate causes on
calibration activations X (a sample of 2048 tokens and 256 output columns, RTN with
act-order and the scale search as a proxy for the final GPTQ error): weighted by
each output channel's Fisher information (sensitivity.py), sum_j f_j ||X dW_j||^2,
which estimates the loss the error costs and so is comparable between layers;
without Fisher weights, the relative error ||X dW^T||^2 / ||X W^T||^2. The choice
then minimises the summed error subject to the total storage bits <= target bpw *
weights (a Lagrangian search over the price of a bit, then a greedy pass spending
what is left where it helps most).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .quant import Mix, make_groups, rtn, storage_bits

CANDIDATES: tuple[Mix, ...] = (
    Mix(((1.0, 2),), 64),
    Mix(((1.0, 2),), 32),
    Mix(((0.25, 3), (0.75, 2)), 32),
    Mix(((1.0, 3),), 128),
    Mix(((1.0, 3),), 32),
    Mix(((0.1, 4), (0.9, 3)), 32),
    Mix(((0.25, 4), (0.75, 3)), 32),
    Mix(((1.0, 4),), 128),
    Mix(((1.0, 4),), 32),
    Mix(((0.1, 5), (0.9, 4)), 32),
    Mix(((0.25, 5), (0.75, 4)), 32),
    Mix(((1.0, 5),), 128),
    Mix(((1.0, 5),), 32),
    Mix(((0.25, 6), (0.75, 5)), 32),
    Mix(((1.0, 6),), 128),
    Mix(((1.0, 6),), 32),
    Mix(((0.1, 8), (0.9, 6)), 32),
    Mix(((1.0, 8),), 128),
    Mix(((1.0, 8),), 32),
)


def head_mix(head_bits: int) -> Mix:
    """The head's layout: the most important 32 rows at 8 bits, the rest at head_bits (as exllamav2 does)."""
    if head_bits not in (2, 3, 4, 5, 6, 8):
        raise ValueError(f"--head-bits must be one of 2, 3, 4, 5, 6, 8 (got {head_bits})")
    if head_bits == 8:
        return Mix(((1.0, 8),), 32)
    return Mix(((0.0001, 8), (0.9999, head_bits)), 32)


def read_allocation(path: str | Path, label: str = "allocation") -> dict[str, str]:
    """{layer: mix name} from a conversion's kodkod-convert.json, or a file holding just that map.
    Errors are ValueErrors that start with `label` and the path."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{label} {path}: {exc}") from None
    data = data.get("allocation", data) if isinstance(data, dict) else data
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ValueError(f"{label} {path}: expected a kodkod-convert.json or a {{layer: mix}} map")
    return data


@dataclass
class Measurement:
    key: str
    k: int
    n: int
    errors: list[float]  # per candidate
    bits: list[int]  # storage bits per candidate


def measure(key: str, weight: torch.Tensor, x: torch.Tensor | None, h_diag: torch.Tensor | None,
            candidates=CANDIDATES, columns: int = 256, seed: int = 0,
            fisher: torch.Tensor | None = None) -> Measurement:
    """Output error of every candidate on a sample of output columns.

    x: [T, K] sample of the layer's calibration inputs (None: weight-space error, for --fast).
    fisher: [out_features] per-channel Fisher information: the error becomes an estimate of
    the loss per token (summed over all channels) instead of a relative error.
    """
    out_f, k = weight.shape
    n = -(-out_f // 32) * 32
    g = torch.Generator().manual_seed(seed)
    cols = torch.randperm(out_f, generator=g)[: min(columns, out_f)].sort().values
    w = weight[cols].float()
    if fisher is not None and x is not None:
        cw = fisher[cols].float() * (out_f / len(cols)) / x.shape[0]  # column weights; per token, all channels
        denom = 1.0
    else:
        cw = None
        ref = (x @ w.T) if x is not None else w
        denom = max(float((ref ** 2).sum()), 1e-30)
    errs, bits = [], []
    for mix in candidates:
        groups = make_groups(mix, k)
        r = rtn(w, groups, h_diag)
        dw = r.weight(w.shape[0]) - w
        e = ((x @ dw.T) if x is not None else dw) ** 2
        if cw is not None:
            e = e * cw
        errs.append(float(e.sum()) / denom)
        bits.append(storage_bits(groups, n))
    return Measurement(key, k, n, errs, bits)


def allocate(measurements: list[Measurement], target_bpw: float) -> dict[str, int]:
    """Choose one candidate index per layer: minimal total error within target_bpw overall."""
    if not measurements:
        return {}
    total_w = sum(m.k * m.n for m in measurements)
    budget = target_bpw * total_w
    nc = len(measurements[0].errors)

    def pick(lam: float) -> list[int]:
        return [min(range(nc), key=lambda c: m.errors[c] + lam * m.bits[c])
                for m in measurements]

    def cost(choice) -> float:
        return sum(m.bits[c] for m, c in zip(measurements, choice))

    lo, hi = 0.0, 1e-12
    while cost(pick(hi)) > budget and hi < 1e6:
        hi *= 4
    for _ in range(60):
        mid = (lo + hi) / 2
        if cost(pick(mid)) > budget:
            lo = mid
        else:
            hi = mid
    choice = pick(hi)
    if cost(choice) > budget:  # even the cheapest mixes do not fit: take the cheapest
        choice = [min(range(nc), key=lambda c: m.bits[c]) for m in measurements]
    # Greedy: spend what is left on the upgrades with the best error drop per bit.
    spent = cost(choice)
    while True:
        best, best_gain = None, 0.0
        for i, m in enumerate(measurements):
            c0 = choice[i]
            for c in range(nc):
                extra = m.bits[c] - m.bits[c0]
                if extra <= 0 or spent + extra > budget:
                    continue
                gain = (m.errors[c0] - m.errors[c]) / extra
                if gain > best_gain:
                    best, best_gain = (i, c, extra), gain
        if best is None:
            break
        i, c, extra = best
        choice[i] = c
        spent += extra
    return {m.key: c for m, c in zip(measurements, choice)}
