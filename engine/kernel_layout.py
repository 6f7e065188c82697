"""The packed layout the CUDA GEMV reads: EXL2 words rearranged once at load for tensor-core tiles.

The GEMV (csrc/gemv.cu) multiplies with `mma.m16n8k16`: a warp takes 32 output columns and one
chunk of rows, and each lane holds the weights of 4 columns at the k positions that the mma's
A fragment gives it. This module moves every EXL2 value to where that lane finds it, so that a
lane loads whole 32-bit words and turns them into fp16 pairs with one logic op and one fused
multiply-add per pair (the magic-number conversion), never extracting a value that straddles
two words.

A chunk is V rows of one group (V = 16 for 2-bit, 32 otherwise; the format's group sizes are
multiples of V, and the last group is padded with zero-weight codes). Within a 32-column tile
lane l = 4g + t holds columns 4g..4g+3 and, for k-step s (16 rows), the rows 16s + 2t + 8h + e
(h, e in {0, 1}). Its values form pairs p = 8s + 2c + h (column c; e picks the pair's half).
A width splits into a low plane of 2, 4 or 8 bits and a high plane of 1 or 2 bits
(3 = 2 + 1, 5 = 4 + 1, 6 = 4 + 2); in a plane of b bits, slot j of a word holds a pair's first
value at bits [b*j, b*j + b) and its second 16 bits higher. The lane's words are W = V * B / 32
consecutive rows of the packed tensor at column 32 * tile + l: low plane first.

Dense fp16 matrices keep W[k, n]; their chunk table cuts K into 16-row k-steps.
"""
from __future__ import annotations

import torch

from . import exl2

DENSE_BITS = 16  # the chunk table's bit width for dense fp16 rows (csrc: kDenseBits)
DENSE_CHUNK_ROWS = 16  # one mma k-step


def chunk_values(bits: int) -> int:
    return 16 if bits in (2, DENSE_BITS) else 32


def chunk_words(bits: int) -> int:
    """Packed rows of one EXL2 chunk (words per lane)."""
    return chunk_values(bits) * bits // 32


def planes(bits: int) -> tuple[int, int]:
    """(low, high) plane widths."""
    low = {3: 2, 5: 4, 6: 4}.get(bits, bits)
    return low, bits - low


def _order(vals: torch.Tensor) -> torch.Tensor:
    """Codes [C, V, N] -> [C, N/32, 32 lanes, V/2 pairs, 2]: each lane's pairs in fragment order."""
    c, v, n = vals.shape
    s = v // 16
    x = vals.view(c, s, 2, 4, 2, n // 32, 8, 4)  # [C, s, h, t, e, tile, g, col]
    x = x.permute(0, 5, 6, 3, 1, 7, 2, 4)  # [C, tile, g, t, s, col, h, e]
    return x.reshape(c, n // 32, 32, v // 2, 2)


def _plane_words(pairs: torch.Tensor, b: int) -> torch.Tensor:
    """Plane values [..., P, 2] (b bits each) -> words [..., P * b / 16]."""
    slots = 16 // b
    x = pairs.reshape(*pairs.shape[:-2], -1, slots, 2)
    shifts = torch.arange(slots, device=pairs.device) * b
    lo = (x[..., 0] << shifts).sum(-1)
    hi = (x[..., 1] << shifts).sum(-1)
    return lo | (hi << 16)


def _plane_values(words: torch.Tensor, b: int) -> torch.Tensor:
    """Inverse of _plane_words: words [..., w] -> values [..., w * 16 / b, 2]."""
    slots = 16 // b
    shifts = torch.arange(slots, device=words.device) * b
    w = words.unsqueeze(-1)
    lo = (w >> shifts) & ((1 << b) - 1)
    hi = (w >> (shifts + 16)) & ((1 << b) - 1)
    return torch.stack([lo, hi], -1).reshape(*words.shape[:-1], -1, 2)


def chunk_table(groups: list[exl2.Group]) -> list[tuple[int, int, int, int]]:
    """(first packed row, first value row, group, bits) of every chunk, checking the group sizes."""
    out, row, value = [], 0, 0
    for gi, g in enumerate(groups):
        v = chunk_values(g.bits)
        if g.rows % v and gi + 1 < len(groups):
            raise exl2.EXL2FormatError(f"group {gi}: {g.rows} rows of {g.bits} bits is not a multiple of {v}")
        for i in range(-(-g.rows // v)):
            out.append((row, value + i * v, gi, g.bits))
            row += chunk_words(g.bits)
        value += g.rows
    return out


def covered_rows(table: list[tuple[int, int, int, int]]) -> int:
    """x_len: the value rows the chunks read (K rounded up to a whole chunk)."""
    return table[-1][1] + chunk_values(table[-1][3])


def repack(q_weight: torch.Tensor, groups: list[exl2.Group], block: int = 1024,
           in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """EXL2 q_weight [QR, N] -> (kernel words [R, N] int32, chunk table [C, 4] int32, x_len).

    x_len counts the value rows the chunks cover (K rounded up to a whole chunk). Columns go
    `block` at a time so that a wide matrix never holds all its 64-bit temporaries at once; with
    in_place, into q_weight itself where the row counts agree (every K a multiple of 32), so that
    loading never holds a matrix twice.
    """
    table = chunk_table(groups)
    n = q_weight.shape[1]
    x_len = covered_rows(table)
    rows = table[-1][0] + chunk_words(table[-1][3])
    if in_place and rows == q_weight.shape[0] and q_weight.dtype == torch.int32 and q_weight.is_contiguous():
        out = q_weight  # a column block is decoded whole before its words are overwritten
    else:
        out = torch.empty(rows, n, dtype=torch.int32, device=q_weight.device)
    dev, k = q_weight.device, sum(g.rows for g in groups)
    widths = []  # per bit width, once for every column block: the value rows of its chunks (past K:
    for bits in sorted({g.bits for g in groups}):  # padding) and the packed rows they go to
        mine = [c for c in table if c[3] == bits]
        idx = torch.tensor([c[1] for c in mine], device=dev)[:, None] + torch.arange(chunk_values(bits), device=dev)
        dst = torch.tensor([c[0] for c in mine], device=dev)[:, None] + torch.arange(chunk_words(bits), device=dev)
        widths.append((bits, idx.clamp(max=k - 1), (idx < k)[..., None], dst.flatten()))
    for c0 in range(0, n, block):
        cols = slice(c0, min(n, c0 + block))
        codes = exl2.unpack(q_weight[:, cols], groups).to(torch.int64)
        for bits, rows_in, inside, dst in widths:
            lo_b, hi_b = planes(bits)
            vals = torch.where(inside, codes[rows_in], 1 << (bits - 1))  # padding: weight 0
            pairs = _order(vals)  # [C, tiles, 32, P, 2]
            words = _plane_words(pairs & ((1 << lo_b) - 1), lo_b)
            if hi_b:
                words = torch.cat([words, _plane_words(pairs >> lo_b, hi_b)], -1)
            out[dst, cols] = exl2.to_int32(words.permute(0, 3, 1, 2).reshape(-1, cols.stop - c0))  # [C * W, cols]
    return out, torch.tensor(table, dtype=torch.int32, device=q_weight.device), x_len


def unpack(words: torch.Tensor, chunks: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of repack (for tests): kernel words -> integer codes [K, N] in permuted row order."""
    n = words.shape[1]
    w64 = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(chunks[-1, 1].item() + 32, n, dtype=torch.int64, device=words.device)
    for row, value, _, bits in chunks.tolist():
        v, nw, (lo_b, hi_b) = chunk_values(bits), chunk_words(bits), planes(bits)
        lane = w64[row:row + nw].view(nw, n // 32, 32).permute(1, 2, 0)  # [tiles, 32, W]
        lo_w = v // 2 * lo_b // 16
        vals = _plane_values(lane[..., :lo_w], lo_b)
        if hi_b:
            vals = vals | (_plane_values(lane[..., lo_w:], hi_b) << lo_b)
        s = v // 16
        x = vals.view(n // 32, 8, 4, s, 4, 2, 2)  # [tile, g, t, s, col, h, e]
        out[value:value + v] = x.permute(3, 5, 2, 6, 0, 1, 4).reshape(v, n)
    return out[:k]


def dense_chunks(in_features: int, device=None) -> tuple[torch.Tensor, int]:
    """Chunk table and x_len of a dense matrix with K = in_features rows."""
    rows = torch.arange(0, in_features, DENSE_CHUNK_ROWS, dtype=torch.int32)
    chunks = torch.stack([rows, rows, (in_features - rows).clamp(max=DENSE_CHUNK_ROWS),
                          torch.full_like(rows, DENSE_BITS)], 1)
    return chunks.to(device), -(-in_features // DENSE_CHUNK_ROWS) * DENSE_CHUNK_ROWS
