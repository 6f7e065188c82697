"""A pool of recent prompts' key/value rows, so a prompt that shares its start with any of them
(the user typed on, or came back to a file) only prefills what follows the shared part.

The static cache (kv_cache.KVCache) holds one sequence, and CUDA graphs captured its addresses, so
the pool never swaps tensors in: it keeps copies of cache rows and copies the rows of the best
match back into the static cache (one device copy per tensor). Entries live on the cache's device,
in its dtype, bounded by a byte budget; the least recently used entry goes first.

Keystrokes make prompts that share almost everything with the one before, so a new prompt that
shares at least half of an entry's tokens replaces that entry in place (only the rows after the
shared part are copied) instead of adding a near-duplicate: the pool holds one entry per place
the user works in, not one per keystroke.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from .kv_cache import KVCache

ROW_GRANULE = 256  # entries grow in steps of this many rows (fewer reallocations while typing)
# Entries are told apart by their first HEAD tokens (bytes compared, well under a microsecond)
# before any whole-prompt comparison: an entry that shares fewer leading tokens with a prompt
# would save it too little prefill to be worth a copy. With tens of entries, comparing every
# prompt whole cost 0.3-0.4 ms a request on the GPU machine's CPU.
HEAD = 16


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two 1-D integer arrays."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


class _Entry:
    def __init__(self, cache: KVCache, rows: int):
        cap = -(-rows // ROW_GRANULE) * ROW_GRANULE
        shape = (cache.k.shape[0], min(cap, cache.max_len), *cache.k.shape[2:])
        self.k = torch.empty(shape, dtype=cache.k.dtype, device=cache.k.device)
        self.v = torch.empty_like(self.k)
        self.ids = np.zeros(0, dtype=np.int64)
        self.head = b""

    def hold(self, ids: np.ndarray) -> None:
        self.ids, self.head = ids, ids[:HEAD].tobytes()

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class KVPool:
    """Recent prompts' cache rows under a byte budget (0: the pool is off)."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = max(0, int(budget_bytes))
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self._next_key = 0

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def _best(self, ids: np.ndarray) -> tuple[int | None, int]:
        best, best_n = None, 0
        head = ids[:HEAD].tobytes()
        for key, e in self._entries.items():
            if len(e.ids) >= HEAD and len(ids) >= HEAD and e.head != head:
                continue
            n = common_prefix(e.ids, ids)
            if n > best_n:
                best, best_n = key, n
        return best, best_n

    def restore(self, ids, cache: KVCache, have: int) -> int:
        """Copy into `cache` the rows of the entry sharing the longest prefix with `ids`, if it shares
        more than the `have` tokens the cache already holds; returns how many leading tokens of `ids`
        the cache holds now (always leaving the last one to run, as KVCache.reusable does)."""
        if not self._entries or len(ids) < 2:
            return have
        key, n = self._best(np.asarray(ids[:-1], dtype=np.int64))
        if key is None or n <= have:
            return have
        e = self._entries[key]
        self._entries.move_to_end(key)
        # rows [0, have) already hold the same tokens: only the rest is copied
        cache.k[:, have:n].copy_(e.k[:, have:n])
        cache.v[:, have:n].copy_(e.v[:, have:n])
        cache.ids = np.asarray(ids[:n]).tolist()
        return n

    def save(self, ids, cache: KVCache) -> None:
        """Keep the cache rows of `ids` (just prefilled, so rows [0, len(ids)) of `cache` are theirs)."""
        if self.budget_bytes == 0 or len(ids) == 0:
            return
        a = np.asarray(ids, dtype=np.int64)
        key, shared = self._best(a)
        if key is not None and 2 * shared < len(self._entries[key].ids):
            key, shared = None, 0  # another place in the code: a new entry
        if key is None:
            key, self._next_key = self._next_key, self._next_key + 1
            self._entries[key] = _Entry(cache, len(ids))
        e = self._entries[key]
        self._entries.move_to_end(key)
        if len(ids) > e.capacity:
            grown = _Entry(cache, len(ids) + len(ids) // 4)
            grown.k[:, :shared].copy_(e.k[:, :shared])
            grown.v[:, :shared].copy_(e.v[:, :shared])
            e = self._entries[key] = grown
        e.k[:, shared:len(ids)].copy_(cache.k[:, shared:len(ids)])
        e.v[:, shared:len(ids)].copy_(cache.v[:, shared:len(ids)])
        e.hold(a)
        self._evict(keep=key)

    def _evict(self, keep: int) -> None:
        total = self.nbytes
        for key in list(self._entries):
            if total <= self.budget_bytes:
                return
            if key != keep:
                total -= self._entries.pop(key).nbytes
        if total > self.budget_bytes:  # the newest alone is over the budget
            self._entries.pop(keep, None)
