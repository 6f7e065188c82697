"""Bounded, thread-safe memos that live across prompt builds.

While a user types, consecutive prompts share almost every line, signature and
import block: encoding a line or parsing a signature again at every key is the
larger part of a prompt build. These memos keep the results of that pure work
(text in, tokens or captures out) between requests, bounded so that a long
session cannot grow them: least recently used entries go first once either the
entry count or the total weight (characters in, items out) is over its limit.

The server builds prompts on its worker thread, tests and benchmarks from
others: every memo takes its lock for each get and put (well under a
microsecond), and its values are immutable (tuples), so a caller can never
change what another caller reads. One exception, languages/context.py's
signature memo: its value is a dict that only gains answers (name -> the same
signature whoever computes it); a dict's get and set are atomic, so two threads
at worst both compute one answer.
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Any, Callable, Hashable

_enabled = True
_all: "weakref.WeakSet[LRU]" = weakref.WeakSet()
_all_lock = threading.Lock()


def set_enabled(flag: bool) -> bool:
    """Turn every memo on or off (off: each build starts empty, as before the memos); returns the old setting.

    For benchmarks and tests that compare against a build with nothing remembered.
    """
    global _enabled
    old, _enabled = _enabled, bool(flag)
    return old


def enabled() -> bool:
    return _enabled


def clear_all() -> None:
    """Empty every memo (a test's fresh start)."""
    with _all_lock:
        memos = list(_all)
    for m in memos:
        m.clear()


class LRU:
    """A least-recently-used map bounded by entries and by total weight.

    `weigh(key, value)` gives an entry's weight; an entry heavier than
    `max_item_weight` is never kept (one huge text must not flush the rest).
    """

    def __init__(self, max_entries: int, max_weight: int, weigh: Callable[[Any, Any], int],
                 max_item_weight: int | None = None):
        self.max_entries = max_entries
        self.max_weight = max_weight
        self.max_item_weight = max_weight // 16 if max_item_weight is None else max_item_weight
        self.weigh = weigh
        self.weight = 0
        self._data: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        with _all_lock:
            _all.add(self)

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: Hashable) -> Any | None:
        if not _enabled:
            return None
        with self._lock:
            hit = self._data.get(key)
            if hit is None:
                return None
            self._data.move_to_end(key)
            return hit[0]

    def put(self, key: Hashable, value: Any) -> None:
        if not _enabled:
            return
        w = self.weigh(key, value)
        if w > self.max_item_weight:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.weight -= old[1]
            self._data[key] = (value, w)
            self.weight += w
            while len(self._data) > self.max_entries or self.weight > self.max_weight:
                _, (_, ow) = self._data.popitem(last=False)
                self.weight -= ow

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.weight = 0
