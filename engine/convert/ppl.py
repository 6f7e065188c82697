"""Perplexity of a model on windows of token ids."""
from __future__ import annotations

import math

import torch


@torch.inference_mode()
def perplexity(engine, rows: list[list[int]], progress: bool = True) -> float:
    """exp(mean NLL) over all predicted tokens of all windows (each window scored on its own)."""
    from tqdm import tqdm

    nll, count = 0.0, 0
    for ids in tqdm(rows, desc="perplexity", unit="window", disable=not progress):
        if len(ids) < 2:
            continue
        logits = engine.logits(ids)[:-1].float()
        target = torch.tensor(ids[1:], device=logits.device)
        nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        count += len(ids) - 1
    if not count:
        raise ValueError("no tokens to score")
    return math.exp(nll / count)
