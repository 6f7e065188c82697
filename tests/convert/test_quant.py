"""The EXL2 quantiser on its own: layouts, packing round trip, GPTQ beats RTN."""
import torch

from engine import exl2
from engine.convert.allocate import CANDIDATES, Measurement, allocate, head_mix
from engine.convert.quant import Mix, bpw, gptq, make_groups, rtn


def _data(k=256, n=96, t=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(t, k, generator=g) @ (torch.randn(k, k, generator=g) * 0.2 + torch.eye(k))
    x[:, :8] *= 10  # a few loud input features, as in real activations
    return w, x


def _rel_err(w, wq, x):
    return float(((x @ (wq - w).T) ** 2).sum() / ((x @ w.T) ** 2).sum())


def test_groups_follow_the_format_rules():
    for mix in CANDIDATES + (head_mix(6), head_mix(4)):
        for k in (256, 768, 896, 4864):
            groups = make_groups(mix, k)
            assert sum(g.rows for g in groups) == k
            assert all(a.bits >= b.bits for a, b in zip(groups, groups[1:])), mix
            assert all(g.rows % 32 == 0 and g.rows <= 128 for g in groups[:-1])
            assert all(g.bits in exl2.BIT_WIDTHS for g in groups)
    assert make_groups(head_mix(6), 896)[0].bits == 8


def test_packed_tensors_dequantize_to_the_quantized_weight():
    w, x = _data(n=80)  # 80 outputs: padded to 96 columns
    h = x.T @ x
    for mix in (Mix(((1.0, 4),), 32), Mix(((0.25, 5), (0.75, 3)), 32), Mix(((0.1, 8), (0.9, 6)), 64),
                Mix(((1.0, 2),), 64)):
        for kind, r in (("rtn", rtn(w, make_groups(mix, 256))), ("gptq", gptq(w, make_groups(mix, 256), h))):
            t = r.tensors()
            dq = exl2.dequantize(t, 80)
            assert torch.allclose(dq, r.weight(80), atol=1e-6)
            groups = exl2.parse_groups(t["q_groups"], t["q_weight"].shape[0], 256)
            assert groups == r.groups
            codes = exl2.unpack(t["q_weight"], groups)
            assert torch.equal(codes, r.codes)
            assert torch.equal(torch.argsort(t["q_invperm"].long()), r.perm)
            assert t["q_scale"].shape == (len(groups), 96 // 8)
            if kind == "gptq":
                continue
            # RTN error bounded by the grid (clipping included)
            sc = exl2.scales(t["q_scale"], t["q_scale_max"])
            assert float((dq - w).abs().max()) <= float(sc.max()) * 2 ** (max(g.bits for g in groups) - 1)


def test_gptq_beats_rtn_and_more_bits_beat_fewer():
    w, x = _data()
    h = x.T @ x
    errs = {}
    for b in (2, 3, 4, 6):
        groups = make_groups(Mix(((1.0, b),), 32), 256)
        e_rtn = _rel_err(w, rtn(w, groups, torch.diagonal(h)).weight(96), x)
        e_gptq = _rel_err(w, gptq(w, groups, h).weight(96), x)
        assert e_gptq < 0.8 * e_rtn, (b, e_gptq, e_rtn)
        errs[b] = e_gptq
    assert errs[2] > errs[3] > errs[4] > errs[6]
    assert errs[4] < 0.01


def test_act_order_sorts_rows_by_hessian_diagonal():
    w, x = _data()
    h = x.T @ x
    r = gptq(w, make_groups(Mix(((1.0, 4),), 32), 256), h)
    d = torch.diagonal(h)[r.perm]
    assert torch.all(d[:-1] >= d[1:])


def test_allocation_spends_the_budget_where_it_helps():
    def m(key, scale, k=256, n=256):
        errs = [scale * 4.0 ** (-b) for b in range(len(CANDIDATES))]
        bits = [int(bpw(make_groups(c, k), n) * k * n) for c in CANDIDATES]
        return Measurement(key, k, n, errs, bits)
    ms = [m("loud", 100.0), m("quiet", 1.0)]
    for target in (2.5, 4.0, 6.0):
        choice = allocate(ms, target)
        spent = sum(mm.bits[choice[mm.key]] for mm in ms)
        assert spent <= target * 2 * 256 * 256
        assert spent >= (target - 0.6) * 2 * 256 * 256
        assert choice["loud"] >= choice["quiet"]
