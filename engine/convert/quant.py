"""Quantising one linear layer to EXL2: bit layouts, scale search, RTN and GPTQ.

Everything works on the transposed, permuted weight `Wt` [K, N] (rows = input
features in act-order, columns = outputs padded to a multiple of 32), which is
exactly the layout EXL2 stores. Packing is `engine.exl2`'s.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import exl2
from ..exl2 import Group


@dataclass(frozen=True)
class Mix:
    """A candidate bit layout: (fraction of rows, bits) parts, most important rows first."""
    parts: tuple[tuple[float, int], ...]
    group_size: int = 32

    def name(self) -> str:
        p = "+".join(f"{f:g}x{b}b" for f, b in self.parts)
        return f"{p}/g{self.group_size}"


def make_groups(mix: Mix, k: int) -> list[Group]:
    """Cut K permuted rows into groups following `mix` (bits never rise; every group but the last is whole words)."""
    gs = mix.group_size
    parts = sorted(mix.parts, key=lambda p: -p[1])
    rows_per_part, left = [], k
    for i, (frac, bits) in enumerate(parts):
        if i == len(parts) - 1:
            r = left
        else:
            r = min(left, max(gs if frac > 0 else 0, int(round(frac * k / gs)) * gs))
        rows_per_part.append(r)
        left -= r
    groups: list[Group] = []
    for (frac, bits), r in zip(parts, rows_per_part):
        while r > 0:
            n = min(gs, r)
            groups.append(Group(bits, n))
            r -= n
    # A short last group of a part other than the final one would break word alignment: only the
    # very last group may be short, which the loop above guarantees since parts are multiples of gs.
    return groups


def storage_bits(groups: list[Group], n: int) -> int:
    """Bits the EXL2 tensors of one layer take (q_weight, q_scale, q_scale_max, q_groups, q_invperm)."""
    k = sum(g.rows for g in groups)
    qw = sum(-(-g.rows * g.bits // 32) for g in groups) * 32 * n
    return qw + len(groups) * (n * 4 + 16 + 32) + k * 32


def bpw(groups: list[Group], n: int) -> float:
    k = sum(g.rows for g in groups)
    return storage_bits(groups, n) / (k * n)


def search_scales_batch(w: torch.Tensor, bits: int, row_weight: torch.Tensor | None = None,
                        chunk_elems: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-column scale codes for G groups at once: w [G, r, N] (row_weight [G, r]).

    The group maximum comes from the per-column max-abs; each column then tries all 16
    square-root scale codes and keeps the one with the lowest (row-weighted) squared error.
    Returns (nibble codes [G, N] int64 0..15, scale_max [G] fp16, scales [G, N] fp32).
    """
    z = 1 << (bits - 1)
    maxq = (1 << bits) - 1
    ideal = torch.maximum(-w.amin(1) / z, w.amax(1) / (z - 1))  # [G, N]
    m = ideal.amax(1).clamp(6.1e-5, 65504.0)  # [G]
    m16 = m.to(torch.float16)
    mf = m16.float()
    steps = ((torch.arange(16, dtype=torch.float32, device=w.device) + 1) / 16) ** 2  # [16]
    g, r, n = w.shape
    # the code that just covers the column's range, then a few around it
    base = (torch.ceil(16 * torch.sqrt(ideal / mf.view(g, 1))) - 1).clamp(0, 15).to(torch.int64)  # [G, N]
    rw = None if row_weight is None else row_weight.float().view(g, r, 1)
    best = arg = None
    deltas = (0, -1, -2, 1) if bits >= 4 else (0, -1, -2, -3, -4, -5, -6, -8, 1)
    for delta in deltas:
        cand = (base + delta).clamp(0, 15)
        s = (steps[cand] * mf.view(g, 1)).unsqueeze(1)  # [G, 1, N]
        q = torch.clamp(torch.round(w / s) + z, 0, maxq)
        err = (w - (q - z) * s) ** 2
        if rw is not None:
            err = err * rw
        e = err.sum(1)  # [G, N]
        if best is None:
            best, arg = e, cand
        else:
            better = e < best
            best = torch.where(better, e, best)
            arg = torch.where(better, cand, arg)
    nib = arg
    scales = steps[nib] * mf.view(g, 1)
    return nib, m16, scales


def search_scales(w: torch.Tensor, bits: int, row_weight: torch.Tensor | None = None):
    """One group w [r, N]: (nibble codes [N], scale_max fp16 scalar, scales [N])."""
    nib, m16, s = search_scales_batch(w.unsqueeze(0), bits, None if row_weight is None else row_weight.unsqueeze(0))
    return nib[0], m16[0], s[0]


def quantize_rows(w: torch.Tensor, scale: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round to the grid: (codes, dequantised values) for rows w [..., N] with per-column scales [N]."""
    z = 1 << (bits - 1)
    q = torch.clamp(torch.round(w / scale) + z, 0, (1 << bits) - 1)
    return q, (q - z) * scale


@dataclass
class QuantResult:
    codes: torch.Tensor  # [K, N] int16, permuted rows
    nibbles: torch.Tensor  # [G, N] int64
    scale_max: torch.Tensor  # [G] fp16
    groups: list[Group]
    perm: torch.Tensor  # [K] int64
    dequant_t: torch.Tensor  # [K, N] fp32 permuted, dequantised (W^T rows in perm order)

    def weight(self, out_features: int) -> torch.Tensor:
        """The dequantised HF weight [out, in] fp32."""
        w = torch.empty_like(self.dequant_t)
        w[self.perm] = self.dequant_t
        return w.T[:out_features].contiguous()

    def tensors(self) -> dict[str, torch.Tensor]:
        """The EXL2 tensors of this layer (without the `<key>.` prefix)."""
        starts, row = [], 0
        for g in self.groups:
            starts.append(row)
            row += -(-g.rows * g.bits // 32)
        qg = torch.tensor([v for g, s in zip(self.groups, starts) for v in (g.bits, s)], dtype=torch.int16)
        return {  # packed where the codes are (a GPU packs a large layer in milliseconds), stored on the CPU
            "q_weight": exl2.pack(self.codes, self.groups).cpu(),
            "q_invperm": torch.argsort(self.perm.cpu()).to(torch.int32),
            "q_scale": exl2.pack_scales(self.nibbles).cpu(),
            "q_scale_max": self.scale_max.cpu().to(torch.float16),
            "q_groups": qg,
        }


def _prepare(weight: torch.Tensor) -> torch.Tensor:
    """HF weight [out, in] -> W^T [K, N] fp32 with N padded to a multiple of 32."""
    wt = weight.detach().to(torch.float32).T.contiguous()
    pad = (-wt.shape[1]) % 32
    if pad:
        wt = torch.cat([wt, wt.new_zeros(wt.shape[0], pad)], 1)
    return wt


def hessian(xs: list[torch.Tensor], blocks: int = 4) -> torch.Tensor:
    """H = X^T X in fp32 over the rows of every x in `xs` (each [..., K]).

    One product over all rows rather than a sum of per-row products, and only the
    upper triangle of column blocks is computed (H is symmetric): on a 2-core CPU
    this is 2.4x faster for K = 4864, where the Hessian is most of a conversion.
    """
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]).float()
    k = x.shape[1]
    if k < 1024:
        return x.T @ x
    b = -(-k // blocks)
    h = x.new_empty(k, k)
    for i in range(0, k, b):
        for j in range(i, k, b):
            blk = x[:, i:i + b].T @ x[:, j:j + b]
            h[i:i + b, j:j + b] = blk
            if j != i:
                h[j:j + b, i:i + b] = blk.T
    return h


def act_order(h_diag: torch.Tensor | None, k: int, device=None) -> torch.Tensor:
    if h_diag is None:
        return torch.arange(k, device=device)
    return torch.argsort(h_diag, descending=True, stable=True)


def rtn(weight: torch.Tensor, groups: list[Group], h_diag: torch.Tensor | None = None) -> QuantResult:
    """Round-to-nearest with the per-group scale search (act-order when a Hessian diagonal is given)."""
    wt = _prepare(weight)
    k, n = wt.shape
    perm = act_order(h_diag, k, wt.device)
    wt = wt[perm]
    rw = None if h_diag is None else h_diag[perm].float()
    codes = torch.empty(k, n, dtype=torch.int16, device=wt.device)
    deq = torch.empty_like(wt)
    nibs, maxes = [], []
    r0, i = 0, 0
    while i < len(groups):  # runs of groups with the same (bits, rows), done together
        j = i
        while j < len(groups) and groups[j] == groups[i]:
            j += 1
        g, cnt = groups[i], j - i
        wg = wt[r0:r0 + g.rows * cnt].view(cnt, g.rows, n)
        rwg = None if rw is None else rw[r0:r0 + g.rows * cnt].view(cnt, g.rows)
        nib, m16, s = search_scales_batch(wg, g.bits, rwg)
        q, d = quantize_rows(wg, s.unsqueeze(1), g.bits)
        codes[r0:r0 + g.rows * cnt] = q.reshape(-1, n).to(torch.int16)
        deq[r0:r0 + g.rows * cnt] = d.reshape(-1, n)
        nibs += list(nib)
        maxes += list(m16)
        r0 += g.rows * cnt
        i = j
    return QuantResult(codes, torch.stack(nibs), torch.stack(maxes), groups, perm, deq)


def gptq(weight: torch.Tensor, groups: list[Group], hessian: torch.Tensor, damp: float = 0.01,
         block: int = 32) -> QuantResult:
    """GPTQ with act-order: quantise rows one at a time, feeding each row's error forward
    through the inverse Hessian; scales are searched per group on the error-updated weights."""
    wt = _prepare(weight)
    k, n = wt.shape
    h = hessian.to(torch.float32).clone()
    diag = torch.diagonal(h)
    dead = diag == 0
    h[dead, dead] = 1
    wt[dead] = 0
    perm = act_order(torch.diagonal(h), k, wt.device)
    wt = wt[perm]
    h = h[perm][:, perm]
    rw = torch.diagonal(h).clone()
    d = damp * float(torch.diagonal(h).mean())
    for attempt in range(6):
        try:
            hd = h + torch.eye(k, device=h.device) * d
            hinv = torch.cholesky_inverse(torch.linalg.cholesky(hd))
            hinv = torch.linalg.cholesky(hinv, upper=True)
            break
        except torch.linalg.LinAlgError:
            d *= 10
    else:  # pragma: no cover - hopeless Hessian
        return rtn(weight, groups, torch.diagonal(hessian))

    codes = torch.empty(k, n, dtype=torch.int16, device=wt.device)
    deq = torch.empty_like(wt)
    nibs, maxes = [], []
    # Blocks made of whole groups, about `block` rows each.
    bounds, starts, r0 = [0], [], 0
    for g in groups:
        starts.append(r0)
        r0 += g.rows
        if r0 - bounds[-1] >= block or r0 == k:
            bounds.append(r0)
    gi = 0
    for b0, b1 in zip(bounds[:-1], bounds[1:]):
        w1 = wt[b0:b1].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[b0:b1, b0:b1]
        scale, bits = None, None
        for i in range(b1 - b0):
            row = b0 + i
            if gi < len(groups) and row == starts[gi]:
                g = groups[gi]
                nib, m16, scale = search_scales(w1[i:i + g.rows], g.bits, rw[row:row + g.rows])
                bits = g.bits
                nibs.append(nib)
                maxes.append(m16)
                gi += 1
            w = w1[i]
            q, dq = quantize_rows(w, scale, bits)
            codes[row], deq[row] = q.to(torch.int16), dq
            e = (w - dq) / hinv1[i, i]
            w1[i:] -= hinv1[i, i:].unsqueeze(1) * e.unsqueeze(0)
            err1[i] = e
        wt[b1:] -= hinv[b0:b1, b1:].T @ err1
    return QuantResult(codes, torch.stack(nibs), torch.stack(maxes), groups, perm, deq)
