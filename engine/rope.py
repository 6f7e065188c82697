"""Rotary position embeddings: inverse frequencies for every supported rope type.

Follows the definitions Hugging Face models were trained with (default,
linear, dynamic NTK, YaRN, Llama 3); tests compare against transformers.
"""
from __future__ import annotations

import math

import torch


def rotary_dim(rope: dict, head_dim: int) -> int:
    return int(head_dim * rope.get("partial_rotary_factor", 1.0))


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def inv_freq(rope: dict, head_dim: int, max_position_embeddings: int, seq_len: int | None = None
             ) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [dim/2], attention scaling) for a sequence of `seq_len` tokens."""
    kind = rope["rope_type"]
    base = float(rope["rope_theta"])
    dim = rotary_dim(rope, head_dim)
    if kind == "default":
        return _base_inv_freq(base, dim), 1.0
    factor = rope.get("factor")
    if factor is None and kind == "yarn":
        factor = max_position_embeddings / rope["original_max_position_embeddings"]
    factor = float(factor)
    if kind == "linear":
        return _base_inv_freq(base, dim) / factor, 1.0
    if kind == "dynamic":
        # NTK-aware: the base grows once the sequence outgrows the trained length.
        orig = rope.get("original_max_position_embeddings") or max_position_embeddings
        seq_len = max(seq_len or 0, orig)
        base = base * ((factor * seq_len / orig) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if kind == "llama3":
        return _llama3(rope, base, dim, factor), 1.0
    if kind == "yarn":
        return _yarn(rope, base, dim, factor, max_position_embeddings)
    raise ValueError(f"unsupported rope type {kind!r}")


def _llama3(rope: dict, base: float, dim: int, factor: float) -> torch.Tensor:
    freq = _base_inv_freq(base, dim)
    low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_len = float(rope["original_max_position_embeddings"])
    wavelen = 2 * math.pi / freq
    # Long wavelengths are interpolated, short ones kept, the band between blended.
    scaled = torch.where(wavelen > old_len / low, freq / factor, freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def _yarn(rope: dict, base: float, dim: int, factor: float, max_pos: int) -> tuple[torch.Tensor, float]:
    orig = rope.get("original_max_position_embeddings") or max_pos

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = rope.get("attention_factor")
    if attn is None:
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo), 0, 1)
    extrapolate = 1 - ramp  # 1: keep the trained frequency, 0: interpolate
    pos = base ** (torch.arange(0, dim, 2).float() / dim)
    freq = (1.0 / (factor * pos)) * (1 - extrapolate) + (1.0 / pos) * extrapolate
    return freq, float(attn)


class Rope:
    """Cos/sin tables for positions, recomputed only when dynamic scaling asks for it."""

    def __init__(self, rope: dict, head_dim: int, max_position_embeddings: int, device, dtype):
        self.rope, self.head_dim, self.max_pos = rope, head_dim, max_position_embeddings
        self.device, self.dtype = device, dtype
        self.dynamic = rope["rope_type"] == "dynamic"
        self._table_len = 0
        self._freq_len = None
        self._cos = self._sin = None

    def _build(self, length: int):
        freq_len = length if self.dynamic and length > self.max_pos else None
        if length <= self._table_len and freq_len == self._freq_len:
            return
        freq, scale = inv_freq(self.rope, self.head_dim, self.max_pos, freq_len)
        n = max(length, self.max_pos if not self.dynamic else length, 1)
        n = min(n, max(length, 8192))  # bound the table for models trained on huge contexts
        t = torch.arange(n, dtype=torch.float32)
        ang = torch.outer(t, freq)
        emb = torch.cat([ang, ang], -1)
        self._cos = (emb.cos() * scale).to(self.device, self.dtype)
        self._sin = (emb.sin() * scale).to(self.device, self.dtype)
        self._table_len, self._freq_len = n, freq_len

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._build(int(positions.max()) + 1)
        return self._cos[positions], self._sin[positions]

    def ensure(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Build the tables for positions < length now; (cos, sin) [table_len, rotary_dim]."""
        self._build(length)
        return self._cos, self._sin

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the tables already built (no host read: graph-safe)."""
        return self._cos[positions], self._sin[positions]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]; cos/sin [T, rotary_dim]. Rotate-half layout (HF's)."""
    rd = cos.shape[-1]
    xr, xp = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated = torch.cat([-xr[..., half:], xr[..., :half]], -1)
    out = xr * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)
    return torch.cat([out, xp], -1) if xp.numel() else out
