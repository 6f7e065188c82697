"""How much each linear layer's output matters to the model's loss.

The bit allocation trades one layer's error against another's, so their errors need
a common unit. The empirical Fisher gives one: for output channel j of a layer,
f_j = mean over tokens of (dL/dy_j)^2, with L the next-token cross-entropy on the
calibration text. To second order an output error dY raises the loss by about
1/2 * sum_j f_j * dY_j^2 per token, whichever layer it comes from; a plain relative
error instead counts a small k_proj as much as the last down_proj.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F


def output_fisher(model, rows: Iterable[list[int]], linears: list[tuple[str, torch.nn.Module]],
                  progress=None) -> dict[str, torch.Tensor]:
    """{key: f [out_features]} for each (key, Linear) in `linears`, averaged over all tokens of `rows`."""
    dev = model.embed_tokens.device
    acc = {key: torch.zeros(m.weight.shape[0], dtype=torch.float64) for key, m in linears}

    def hook(key):
        def on_output(mod, args, out):
            def on_grad(g):
                acc[key] += (g.double() ** 2).sum(0).cpu()
            out.register_hook(on_grad)
        return on_output

    def needs_grad(mod, args):
        # The weights are frozen: a residual stream that needs a gradient makes autograd record the graph.
        return (args[0].detach().requires_grad_(), *args[1:])

    handles = [m.register_forward_hook(hook(key)) for key, m in linears]
    handles.append(model.layers[0].register_forward_pre_hook(needs_grad))
    tokens = 0
    try:
        for ids in rows:
            t = torch.tensor(ids, device=dev)
            with torch.enable_grad():
                logits = model(t, torch.arange(len(ids), device=dev))
                F.cross_entropy(logits[:-1], t[1:], reduction="sum").backward()
            tokens += len(ids)
            if progress is not None:
                progress.update(1)
    finally:
        for h in handles:
            h.remove()
    return {key: (v / max(tokens, 1)).float() for key, v in acc.items()}
