"""GPTQ's block pass: every linear's Hessian comes from the inputs it really gets once the
linears before it are quantised, and the block's outputs are those of the quantised block."""
import pytest
import torch

from engine import load_model
from engine.convert.converter import _linears, _quantize_block
from engine.convert.quant import hessian
from tests.engine.tiny_models import build


@pytest.mark.parametrize("arch", ["llama", "starcoder2"])
def test_block_pass_sees_quantised_predecessors(tmp_path, arch):
    path, _ = build(tmp_path, arch)
    model = load_model(path, device="cpu", dtype=torch.float32).model
    block = model.layers[0]
    lins = _linears(block, "model.layers.0")
    named = dict(lins)
    g = torch.Generator().manual_seed(1)
    hidden = model.embed_tokens.shape[1]
    states = [torch.randn(t, hidden, generator=g) for t in (12, 12, 7)]
    pos = torch.arange(12)
    order, seen = [], {}

    def expected_inputs():
        """Each linear's input from a plain forward of the block as it is now."""
        got = {}
        hooks = [m.register_forward_hook(lambda mod, a, o, k=k: got.setdefault(k, []).append(a[0]))
                 for k, m in lins]
        with torch.inference_mode():
            for x in states:
                block(x, pos[: x.shape[0]])
        for h in hooks:
            h.remove()
        return got

    def quantize(keys, h):
        ref = expected_inputs()
        for key in keys:
            want = hessian(ref[key])
            assert torch.allclose(h, want, rtol=1e-4, atol=1e-3), key
            seen[key] = h
            m = named[key]  # a stand-in for quantisation: a visible change to the weight
            m.weight.data = m.weight.data + 0.05 * torch.randn(m.weight.shape, generator=g)
        order.append(keys)

    with torch.inference_mode():
        out = _quantize_block(block, named, states, pos, quantize)
        want = [block(x, pos[: x.shape[0]]) for x in states]
    assert set(seen) == set(named)
    flat = [k.rsplit(".", 1)[1] for keys in order for k in keys]
    if arch == "llama":
        assert [sorted(k.rsplit(".", 1)[1] for k in keys) for keys in order] == [
            ["k_proj", "q_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    else:
        assert flat[-2:] == ["c_fc", "c_proj"]
    for o, w in zip(out, want):
        assert torch.allclose(o, w, atol=1e-5)


def test_hessian_equals_the_plain_product():
    g = torch.Generator().manual_seed(0)
    for k in (96, 1100, 2050):
        xs = [torch.randn(37, k, generator=g), torch.randn(5, 3, k, generator=g)]
        x = torch.cat([xs[0], xs[1].reshape(-1, k)]).double()
        ref = (x.T @ x).float()
        h = hessian(xs)
        assert torch.allclose(h, ref, rtol=1e-4, atol=1e-3)
        assert torch.equal(h, h.T)
