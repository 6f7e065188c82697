"""Choosing the next token from logits: penalty, filters, then greedy or a seeded draw.

The draw is Gumbel-max: argmax(logit / T + g) with g Gumbel noise picks each
token with probability softmax(logit / T), exactly. The noise is a hash of
(seed, step, token id) in 32-bit integer arithmetic, so the CPU, this torch
code on a GPU and the CUDA kernel (csrc/sampling.cu) draw the same token from
the same logits, and a draw needs no generator state: it can sit inside a
CUDA graph. Filters (top-k, top-p, min-p) become one threshold on logit / T.

`Sampler` keeps every input of a draw in device tensors (the token, the step,
the seen-token mask of the repetition penalty, the parameters), so nothing in
a draw reads a value back to the host.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .params import GenerationParams

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style: seen tokens' logits are divided (if positive) or multiplied (if negative) by penalty."""
    if penalty == 1.0 or history.numel() == 0:
        return logits
    seen = logits.gather(0, history)
    logits = logits.clone()
    logits.scatter_(0, history, torch.where(seen > 0, seen / penalty, seen * penalty))
    return logits


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Set to -inf every token that top-k, top-p (nucleus) or min-p rules out (reference form)."""
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if min_p > 0:
        probs = torch.softmax(logits, -1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        # Drop a token when the ones before it already reach top_p; the first always stays.
        drop = (cum - torch.softmax(sorted_logits, -1)) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (values held in int64; every product stays below 2^63)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & MASK32
    return x ^ (x >> 16)


def gumbel_noise(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel noise [vocab] (fp32) for draw number `step` of a generation seeded with `seed`."""
    seed, step = seed.to(torch.int64), step.to(torch.int64)
    key = mix32((seed & MASK32) ^ mix32(((seed >> 32) & MASK32) ^ mix32(step & MASK32)))
    i = torch.arange(vocab, device=seed.device, dtype=torch.int64)
    r = mix32(key ^ mix32((i + GOLDEN) & MASK32))
    u = ((r >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)
    return -torch.log(-torch.log(u))


def filter_threshold(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                     min_p: torch.Tensor) -> torch.Tensor:
    """The smallest logit / T that top-k, min-p and then top-p keep (a 0-d tensor; no host reads).

    Each filter keeps a prefix of the logits sorted in descending order, so
    together they are one threshold on the value.
    """
    vocab = scaled.numel()
    ordered = torch.sort(scaled, descending=True).values
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    th = ordered.gather(0, (k - 1).view(1))[0]
    th = torch.where(min_p > 0, torch.maximum(th, ordered[0] + torch.log(min_p.clamp(min=1e-30))), th)
    kept = ordered >= th
    probs = torch.softmax(torch.where(kept, ordered, torch.full_like(ordered, -math.inf)), 0)
    before = probs.cumsum(0) - probs
    keep_p = kept & ((before < top_p) | (top_p >= 1.0))
    last = (keep_p.sum() - 1).clamp(min=0)
    return torch.maximum(th, ordered.gather(0, last.view(1))[0])


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """The repetition penalty over a seen-token mask (apply_repetition_penalty's rule, graph-safe)."""
    return torch.where(seen.bool(), torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def draw(logits: torch.Tensor, seen: torch.Tensor, params: torch.Tensor, seed: torch.Tensor,
         step: torch.Tensor) -> torch.Tensor:
    """The torch twin of csrc/sampling.cu's kernel: the token id (0-d int64 tensor).

    params = [temperature, penalty, threshold on logit / T (-inf: keep all)].
    """
    temperature, penalty, threshold = params[0], params[1], params[2]
    v = penalize(logits, seen, penalty)
    scaled = v / temperature.clamp(min=1e-30)
    noisy = torch.where(scaled >= threshold, scaled + gumbel_noise(seed, step, v.numel()),
                        torch.full_like(v, -math.inf))
    greedy = temperature <= 1e-5
    return torch.where(greedy, torch.argmax(v), torch.argmax(noisy))


class Sampler:
    """Device-side state of one generation's draws, and the draw itself (kernel or torch twin)."""

    def __init__(self, vocab: int, device, ext=None):
        self.vocab, self.device, self.ext = vocab, device, ext
        self.token = torch.zeros(1, dtype=torch.int64, device=device)
        self.seen = torch.zeros(vocab, dtype=torch.uint8, device=device)
        self.params = torch.tensor([0.0, 1.0, -math.inf], device=device)  # temperature, penalty, threshold
        self.filters = torch.tensor([0.0, 1.0, 0.0], device=device)  # top_k, top_p, min_p
        self.seed = torch.zeros(1, dtype=torch.int64, device=device)
        self.step = torch.zeros(1, dtype=torch.int32, device=device)
        self.filtered = False
        if ext is not None:
            self._partial = torch.zeros(128, device=device)
            self._counter = torch.zeros(1, dtype=torch.int32, device=device)

    def start(self, params: GenerationParams, prompt_ids, seed: int) -> None:
        """Set up a generation: its parameters, seed and the prompt's tokens (a list or an int64
        array) for the penalty."""
        self.seen.zero_()
        ids = torch.from_numpy(np.asarray(prompt_ids, dtype=np.int64))  # from a list: 6x faster than torch.tensor
        self.seen.index_fill_(0, ids.to(self.device), 1)  # one kernel (indexing would sort)
        self.params.copy_(torch.tensor([params.temperature, params.repetition_penalty, -math.inf]))
        self.filters.copy_(torch.tensor([float(params.top_k), params.top_p, params.min_p]))
        self.filtered = not params.greedy and (params.top_k > 0 or params.top_p < 1.0 or params.min_p > 0)
        self.seed.fill_(seed & (2**63 - 1))
        self.step.zero_()

    def __call__(self, logits: torch.Tensor, pos: torch.Tensor | None = None) -> None:
        """Draw into self.token (and count the step; advance `pos` if given). Graph-safe."""
        if self.filtered:
            t = self.params[0].clamp(min=1e-30)
            v = penalize(logits, self.seen, self.params[1])
            self.params[2:3].copy_(filter_threshold(v / t, self.filters[0].long(), self.filters[1],
                                                    self.filters[2]).view(1))
        if self.ext is not None:
            self.ext.sample(logits, self.seen, True, self.params, self.seed, self.step, self.token, pos,
                            self._partial, self._counter)
            return
        token = draw(logits, self.seen, self.params, self.seed, self.step)
        self.token.copy_(token.view(1))
        self.seen.index_fill_(0, self.token, 1)
        self.step += 1
        if pos is not None:
            pos += 1
