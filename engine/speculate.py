"""Prompt-lookup drafts for speculative decoding.

Code completions copy a lot: a name from the suffix, a line like one above, the rest of a call
seen in a context snippet. So the tokens that followed the last few generated tokens where they
last occurred (in the prompt or in the text generated so far) are a cheap guess at what comes
next. The engine feeds the guess (the draft) to the model in one forward pass and keeps the
longest run the model's own draws agree with (Decoder.accept), so a draft never changes the
output, only how many forward passes it takes.
"""
from __future__ import annotations

import numpy as np


class PromptLookup:
    """Drafts from the latest earlier occurrence of the history's last n tokens, n = max_ngram
    down to min_ngram (a longer match is a better guess)."""

    def __init__(self, prompt_ids: list[int], max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._buf = np.zeros(max(64, 2 * len(prompt_ids)), dtype=np.int64)
        self._buf[:len(prompt_ids)] = prompt_ids
        self._len = len(prompt_ids)

    def push(self, token: int) -> None:
        """Append a generated token to the history."""
        if self._len == len(self._buf):
            self._buf = np.concatenate([self._buf, np.zeros_like(self._buf)])
        self._buf[self._len] = token
        self._len += 1

    def draft(self, k: int) -> list[int]:
        """Up to k tokens that followed the last n-gram where it occurred before (empty: no match)."""
        buf, end = self._buf, self._len
        if k <= 0:
            return []
        for n in range(min(self.max_ngram, end - 1), self.min_ngram - 1, -1):
            tail = buf[end - n:end]
            # starts i of earlier occurrences buf[i:i+n] == tail that have a token after them
            starts = np.flatnonzero(buf[:end - n] == tail[0])
            for j in range(1, n):
                starts = starts[buf[starts + j] == tail[j]]
            if len(starts):
                i = int(starts[-1]) + n
                return buf[i:min(i + k, end)].tolist()
        return []
