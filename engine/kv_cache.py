"""A preallocated key/value cache for batch-1 generation."""
from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer for positions [0, max_len), allocated once.

    `ids` records which tokens the cached positions hold, so a new prompt that
    shares a prefix with the last one (the common case while a user types)
    only prefills what changed.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, max_len: int, device, dtype):
        shape = (layers, max_len, kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.positions = torch.arange(max_len, device=device)
        self.ids: list[int] = []

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Store k/v [T, kv_heads, head_dim] at positions start.., return all up to the last one."""
        end = start + k.shape[0]
        self.check_fits(end)
        self.k[layer, start:end] = k
        self.v[layer, start:end] = v
        return self.k[layer, :end], self.v[layer, :end]

    def check_fits(self, end: int) -> None:
        if end > self.max_len:
            raise ValueError(f"sequence of {end} tokens exceeds the KV cache of {self.max_len}")

    def write_at(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Store k/v at device positions (no host read), return the whole layer's cache."""
        self.k[layer].index_copy_(0, positions, k)
        self.v[layer].index_copy_(0, positions, v)
        return self.k[layer], self.v[layer]

    def reusable(self, ids: list[int]) -> int:
        """How many leading tokens of `ids` the cache already holds (always leaving one to run)."""
        n = 0
        for a, b in zip(self.ids, ids[:-1]):
            if a != b:
                break
            n += 1
        return n
