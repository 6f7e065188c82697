"""EXL2 tensors: unpack, dequantize and pack, exactly as ../docs/exl2-format.md says.

Everything is vectorised per bit width: the groups of one width are gathered
together and decoded with at most a few dozen tensor operations, whatever the
number of rows or groups.

Shapes (HF weight [out, in]; K = in, N = out rounded up to 32):
  q_weight [QR, N] int32   packed values, rows in permuted order
  q_invperm [K] int32      inverse of the row permutation
  q_scale  [G, N/8] int32  4-bit scale codes
  q_scale_max [G] fp16     per-group maximum scale
  q_groups [2G] int16      (bits, first packed row) per group
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BIT_WIDTHS = (2, 3, 4, 5, 6, 8)
SUFFIXES = ("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups")


class EXL2FormatError(ValueError):
    """A tensor set that does not follow the EXL2 format."""


def _chunk(bits: int) -> tuple[int, int]:
    """Smallest (words, values) unit in which a bit stream of `bits` repeats."""
    words = bits // math.gcd(bits, 32)
    return words, words * 32 // bits


@dataclass(frozen=True)
class Group:
    bits: int
    rows: int  # rows of the (permuted) weight the group covers


def parse_groups(q_groups: torch.Tensor, packed_rows: int, in_features: int) -> list[Group]:
    """Read q_groups into (bits, rows) per group, checking every rule of the format."""
    g = q_groups.to(torch.int64).tolist()
    if len(g) % 2 or not g:
        raise EXL2FormatError(f"q_groups must hold (bits, row) pairs, got {len(g)} values")
    bits, starts = g[0::2], g[1::2] + [packed_rows]
    groups, rows_left = [], in_features
    for i, b in enumerate(bits):
        if b not in BIT_WIDTHS:
            raise EXL2FormatError(f"group {i}: bit width {b} is not one of {BIT_WIDTHS}")
        if i and b > bits[i - 1]:
            raise EXL2FormatError(f"group {i}: bit width rises from {bits[i - 1]} to {b}")
        words = starts[i + 1] - starts[i]
        if words <= 0:
            raise EXL2FormatError(f"group {i}: empty or backwards packed row range")
        rows = words * 32 // b if i + 1 < len(bits) else rows_left
        if words * 32 < rows * b:
            raise EXL2FormatError(f"group {i}: {words} packed rows cannot hold {rows} rows of {b} bits")
        groups.append(Group(b, rows))
        rows_left -= rows
    if rows_left != 0:
        raise EXL2FormatError(f"groups cover {in_features - rows_left} rows, expected {in_features}")
    return groups


def _positions(groups: list[Group], bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed-word rows and value rows of all groups with this bit width, in order."""
    words, values = [], []
    w0 = v0 = 0
    for g in groups:
        nw = -(-g.rows * g.bits // 32)
        if g.bits == bits:
            words.append(torch.arange(w0, w0 + nw))
            values.append(torch.arange(v0, v0 + g.rows))
        w0 += nw
        v0 += g.rows
    return torch.cat(words), torch.cat(values)


def unpack(q_weight: torch.Tensor, groups: list[Group]) -> torch.Tensor:
    """Packed words [QR, N] -> integer codes [K, N] (int16, permuted row order)."""
    qw = q_weight.to(torch.int64) & 0xFFFFFFFF  # raw 32-bit words
    n = qw.shape[1]
    k = sum(g.rows for g in groups)
    out = torch.empty(k, n, dtype=torch.int16, device=q_weight.device)
    for bits in sorted({g.bits for g in groups}):
        wrows, vrows = _positions(groups, bits)
        cw, cv = _chunk(bits)
        if wrows.numel() % cw:
            raise EXL2FormatError(f"{bits}-bit groups do not fill whole {cw}-word units")
        words = qw[wrows.to(qw.device)].view(-1, cw, n)  # [C, cw, N]
        mask = (1 << bits) - 1
        vals = []
        for i in range(cv):
            off = i * bits
            w, s = divmod(off, 32)
            v = words[:, w] >> s
            if s + bits > 32:
                v = v | (words[:, w + 1] << (32 - s))
            vals.append(v & mask)
        codes = torch.stack(vals, 1).view(-1, n)  # [C*cv, N]
        out[vrows.to(out.device)] = codes[: vrows.numel()].to(torch.int16)
    return out


def pack(codes: torch.Tensor, groups: list[Group]) -> torch.Tensor:
    """Integer codes [K, N] (permuted row order) -> packed words [QR, N] int32."""
    k, n = codes.shape
    if sum(g.rows for g in groups) != k:
        raise EXL2FormatError("groups do not cover the rows of codes")
    c64 = codes.to(torch.int64)
    packed_rows = sum(-(-g.rows * g.bits // 32) for g in groups)
    out = torch.zeros(packed_rows, n, dtype=torch.int64, device=codes.device)
    for bits in sorted({g.bits for g in groups}):
        wrows, vrows = _positions(groups, bits)
        cw, cv = _chunk(bits)
        vals = c64[vrows.to(c64.device)]
        if ((vals < 0) | (vals >= (1 << bits))).any():
            raise EXL2FormatError(f"codes out of range for {bits} bits")
        pad = (-vals.shape[0]) % cv
        if pad:
            vals = torch.cat([vals, vals.new_zeros(pad, n)])
        vals = vals.view(-1, cv, n)
        words = torch.zeros(vals.shape[0], cw, n, dtype=torch.int64, device=codes.device)
        for i in range(cv):
            w, s = divmod(i * bits, 32)
            words[:, w] |= (vals[:, i] << s) & 0xFFFFFFFF
            if s + bits > 32:
                words[:, w + 1] |= vals[:, i] >> (32 - s)
        out[wrows.to(out.device)] = words.view(-1, n)[: wrows.numel()]
    return to_int32(out)


def to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 -> the same bits as int32."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def scales(q_scale: torch.Tensor, q_scale_max: torch.Tensor) -> torch.Tensor:
    """Per-group, per-column scales [G, N] (fp32)."""
    qs = q_scale.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 4, device=qs.device)
    nib = (qs.unsqueeze(-1) >> shifts) & 15  # [G, N/8, 8]
    nib = nib.reshape(qs.shape[0], -1).to(torch.float32)
    return (nib + 1) ** 2 * (q_scale_max.to(torch.float32).unsqueeze(1) / 256)


def pack_scales(codes: torch.Tensor) -> torch.Tensor:
    """4-bit scale codes [G, N] (values 0..15) -> q_scale [G, N/8] int32."""
    g, n = codes.shape
    c = codes.to(torch.int64).view(g, n // 8, 8) << torch.arange(0, 32, 4, device=codes.device)
    return to_int32(c.sum(-1))


def group_index(groups: list[Group], device=None) -> torch.Tensor:
    """Group number of every permuted row [K]."""
    return torch.repeat_interleave(
        torch.arange(len(groups), device=device),
        torch.tensor([g.rows for g in groups], device=device),
    )


def dequantize(t: dict[str, torch.Tensor], out_features: int | None = None) -> torch.Tensor:
    """EXL2 tensors of one layer -> the HF weight [out, in] in fp32."""
    missing = [s for s in SUFFIXES if s not in t]
    if missing:
        raise EXL2FormatError(f"missing EXL2 tensors: {', '.join(missing)}")
    q_weight, invperm = t["q_weight"], t["q_invperm"].to(torch.int64)
    k, n = invperm.numel(), q_weight.shape[1]
    if n % 32:
        raise EXL2FormatError(f"q_weight has {n} columns, not a multiple of 32")
    groups = parse_groups(t["q_groups"], q_weight.shape[0], k)
    if t["q_scale"].shape != (len(groups), n // 8):
        raise EXL2FormatError(f"q_scale shape {tuple(t['q_scale'].shape)} != {(len(groups), n // 8)}")
    codes = unpack(q_weight, groups).to(torch.float32)
    gi = group_index(groups, codes.device)
    zero = torch.tensor([float(1 << (g.bits - 1)) for g in groups], device=codes.device)[gi]
    w_perm = (codes - zero.unsqueeze(1)) * scales(t["q_scale"], t["q_scale_max"])[gi]
    w = torch.empty_like(w_perm)
    w[torch.argsort(invperm)] = w_perm
    out = n if out_features is None else out_features
    return w.T[:out].contiguous()
