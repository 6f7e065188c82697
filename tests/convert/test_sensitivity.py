"""The per-channel Fisher information that weights the allocation's errors."""
import torch
import torch.nn.functional as F

from engine import load_model
from engine.convert.allocate import measure
from engine.convert.converter import _linears
from engine.convert.sensitivity import output_fisher
from tests.engine.tiny_models import build

ROWS = [[5, 17, 300, 41, 999, 2, 77, 77, 512, 8], [640, 33, 90, 1000, 4, 61, 250, 7, 19, 700, 3, 3]]


def test_fisher_equals_squared_gradients_taken_another_way(tmp_path):
    path, _ = build(tmp_path, "qwen2")
    model = load_model(path, device="cpu", dtype=torch.float32).model
    lins = [kl for i, b in enumerate(model.layers) for kl in _linears(b, f"model.layers.{i}")]
    fisher = output_fisher(model, ROWS, lins)

    # Independent route: a zero probe added to one layer's output; its .grad is dL/dy.
    key, target = lins[4]
    total, tokens = torch.zeros(target.weight.shape[0], dtype=torch.float64), 0
    for ids in ROWS:
        probe = torch.zeros(len(ids), target.weight.shape[0], requires_grad=True)
        h = target.register_forward_hook(lambda m, a, out: out + probe)
        with torch.enable_grad():
            logits = model(torch.tensor(ids), torch.arange(len(ids)))
            F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").backward()
        h.remove()
        total += probe.grad.double().pow(2).sum(0)
        tokens += len(ids)
    want = (total / tokens).float()
    assert want.abs().max() > 0
    assert torch.allclose(fisher[key], want, rtol=1e-4, atol=1e-9)
    assert set(fisher) == {k for k, _ in lins}
    assert all(not p.requires_grad for p in model.parameters())


def test_fisher_weighted_error_follows_the_weights():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g) * 0.02
    x = torch.randn(256, 128, generator=g)
    ones = measure("a", w, x, None, fisher=torch.ones(64))
    tens = measure("a", w, x, None, fisher=torch.full((64,), 10.0))
    assert all(abs(t - 10 * o) <= 1e-5 * t for o, t in zip(ones.errors, tens.errors))
    # with unit weights it is the mean squared output error per token, summed over channels
    assert ones.errors[0] > ones.errors[-1] > 0
    rel = measure("a", w, x, None)
    ratio = [o / r for o, r in zip(ones.errors, rel.errors)]
    assert max(ratio) / min(ratio) < 1 + 1e-4  # the same ordering, a different unit
