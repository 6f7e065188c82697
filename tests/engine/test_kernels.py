"""Every CUDA kernel against its torch twin / an fp64 reference, on fresh random inputs. Skipped without CUDA."""
import math

import pytest
import torch
from safetensors.torch import load_file

from engine import GenerationParams, exl2, kernels, load_model
from engine.convert.quant import Mix, make_groups, rtn
from engine.linear import DequantScratch, EXL2Linear, Linear
from engine.model import RMSNorm
from engine.rope import Rope, apply_rope
from engine.sampling import draw
from tests.conftest import fixture_dir

pytestmark = pytest.mark.cuda
DEV = "cuda"

MIXES = [Mix(((1.0, b),), gs) for b, gs in ((2, 64), (3, 32), (4, 128), (5, 32), (6, 64), (8, 32))] + [
    Mix(((0.25, 8), (0.25, 6), (0.25, 5), (0.25, 4)), 32), Mix(((0.25, 4), (0.5, 3), (0.25, 2)), 32)]
SHAPES = [(896, 896), (100, 160), (1000, 4864), (40, 96)]  # (out, in): odd outputs, K from 96 to 4864
ODD_K = [(Mix(((1.0, b),), 32), (70, 100)) for b in (2, 4, 8)]  # K not a multiple of 32 (allowed for 2/4/8 bits)


@pytest.fixture(scope="module")
def ext():
    module = kernels.load()
    if module is None:
        pytest.fail(f"the kernels did not build: {kernels.reason()}")
    return module


@pytest.fixture(scope="module")
def workspace():
    """Split-K scratch as the fast decoder passes it (partials, counters)."""
    return torch.zeros(1 << 20, device=DEV), torch.zeros(1 << 14, dtype=torch.int32, device=DEV)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double().flatten(), ref.double().flatten()
    assert not torch.isnan(a).any()
    return ((a - ref).norm() / ref.norm()).item()


def random_layer(ext, out_f, in_f, mix, seed, bias=True) -> EXL2Linear:
    g = torch.Generator(device=DEV).manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, device=DEV) * in_f ** -0.5
    order = torch.rand(in_f, generator=g, device=DEV)
    t = {k: v.to(DEV) for k, v in rtn(w, make_groups(mix, in_f), order).tensors().items()}
    b = (torch.randn(out_f, generator=g, device=DEV) * 0.1).half() if bias else None
    lin = EXL2Linear(t, out_f, in_f, b, torch.float16)
    lin.ref_w = exl2.dequantize(t, out_f)  # the format's dequantization, before the layer repacks its words
    lin.prepare_kernels(ext, DequantScratch())
    return lin


def reference(lin, x: torch.Tensor) -> torch.Tensor:
    y = x.double() @ lin.ref_w.double().T
    return y + lin.bias.double() if lin.bias is not None else y


@pytest.mark.parametrize("mix, shape", [(m, s) for m in MIXES for s in SHAPES] + ODD_K)
@pytest.mark.parametrize("split", [False, True])
def test_exl2_gemv_matches_fp64_reference(ext, workspace, mix, shape, split):
    out_f, in_f = shape
    ws = workspace if split else (None, None)
    lin = random_layer(ext, out_f, in_f, mix, seed=out_f * 7 + in_f)
    x = torch.randn(in_f, device=DEV).half()
    y32 = torch.full((out_f,), float("nan"), device=DEV)
    ext.gemv([lin.kernel_matrix], x, kernels.IN_HALF, None, None, 0.0, kernels.OUT_FLOAT, 0, [y32], *ws)
    assert rel_err(y32, reference(lin, x)) <= 1e-5  # fp32 accumulation of exact products
    y16 = torch.full((out_f,), float("nan"), device=DEV, dtype=torch.float16)
    ext.gemv([lin.kernel_matrix], x, kernels.IN_HALF, None, None, 0.0, kernels.OUT_HALF, 0, [y16], *ws)
    assert rel_err(y16, reference(lin, x)) <= 1e-3
    if split:
        assert workspace[1].sum().item() == 0  # every tile's counter back at zero
    assert torch.allclose(lin(x[None])[0].float(), y16.float(), rtol=1e-2, atol=1e-2)  # module forward = kernel


@pytest.mark.parametrize("shape", [(40000, 512), (33000, 256), (9000, 2048)])  # wide tiles: 313, 258; 282 of 32
@pytest.mark.parametrize("split", [False, True])
def test_gemv_grid_larger_than_one_wave(ext, workspace, shape, split):
    """More tiles than resident blocks: each block takes several units (tile, K split) in turn (wide
    and narrow tiles at 3 blocks per SM, two chunks per warp turn where K is long enough)."""
    out_f, in_f = shape
    lin = random_layer(ext, out_f, in_f, MIXES[-2], seed=11)
    x = torch.randn(in_f, device=DEV).half()
    y = torch.full((out_f,), float("nan"), device=DEV)
    ws = workspace if split else (None, None)
    for _ in range(2):  # twice: the split counters must be back at zero after a launch
        ext.gemv([lin.kernel_matrix], x, kernels.IN_HALF, None, None, 0.0, kernels.OUT_FLOAT, 0, [y], *ws)
        assert rel_err(y, reference(lin, x)) <= 1e-5
    assert workspace[1].sum().item() == 0


@pytest.mark.parametrize("mix", [MIXES[-2], MIXES[-1]])
def test_rows_beyond_the_window_come_from_global_memory(ext, mix):
    """Long K and no split: a block's rows do not all fit its shared-memory window; the rest are
    read from global memory (EXL2 with mixed bit widths, gated, dense)."""
    lin = random_layer(ext, 72, 8192, mix, seed=31)
    x = torch.randn(8192, device=DEV).half()
    y = torch.full((72,), float("nan"), device=DEV)
    ext.gemv([lin.kernel_matrix], x, kernels.IN_HALF, None, None, 0.0, kernels.OUT_FLOAT, 0, [y])
    assert rel_err(y, reference(lin, x)) <= 1e-5
    gate, up = (random_layer(ext, 72, 4096, mix, seed=s) for s in (32, 33))
    x = torch.randn(4096, device=DEV).half()
    act = torch.full((72,), float("nan"), device=DEV, dtype=torch.float16)
    ext.gemv([gate.kernel_matrix, up.kernel_matrix], x, kernels.IN_HALF, None, None, 0.0, kernels.OUT_GATED,
             kernels.ACTIVATION_IDS["silu"], [act])
    assert rel_err(act, torch.nn.functional.silu(reference(gate, x)) * reference(up, x)) <= 3e-3
    g = torch.Generator(device=DEV).manual_seed(34)
    w = (torch.randn(40, 12000, generator=g, device=DEV) * 0.01).half()
    dense = Linear(w.clone(), None)
    dense.prepare_kernels(ext)
    xd = torch.randn(12000, device=DEV).half()
    yd = torch.full((40,), float("nan"), device=DEV)
    ext.gemv([dense.kernel_matrix], xd, kernels.IN_HALF, None, None, 0.0, kernels.OUT_FLOAT, 0, [yd])
    assert rel_err(yd, xd.double() @ w.double().T) <= 1e-5


@pytest.mark.parametrize("case", ["gated", "head", "dense_head", "half_split", "residual_split"])
def test_grids_past_one_wave_run_on_the_units_kernel(ext, workspace, monkeypatch, case):
    """More tiles than resident blocks (3 per SM): a block per slot takes units (tile, K split) in
    turn, its input normalized and gathered once; its results and the wave-by-wave launch's both
    match the fp64 reference (gated with split merges, wide tiles with a float output from EXL2 and
    from dense fp16 weights, fp16 output with ordered merges, residual adds by atomics)."""
    slots = 3 * torch.cuda.get_device_properties(0).multi_processor_count
    mix = MIXES[-2] if case in ("gated", "half_split") else MIXES[-1]
    n, k = (128 * (2 * slots + 10), 256) if case.endswith("head") else (32 * (slots + 60), 512 if case == "gated" else 1024)
    g = torch.Generator(device=DEV).manual_seed(41)
    h = torch.randn(k, generator=g, device=DEV) * 3
    w = (1 + 0.2 * torch.randn(k, generator=g, device=DEV)).half()
    x = torch.randn(k, generator=g, device=DEV).half()
    if case == "gated":
        gate, up = (random_layer(ext, n, k, mix, seed=s, bias=False) for s in (42, 43))
        xr = rms_rounded(h, w, 1e-6)
        ref, tol = torch.nn.functional.silu(reference(gate, xr)) * reference(up, xr), 3e-3
    elif case == "dense_head":  # an fp16 model's head
        wd = (torch.randn(n, k, generator=g, device=DEV) * k ** -0.5).half()
        lin = Linear(wd.clone(), None)
        lin.prepare_kernels(ext)
        ref, tol = rms_rounded(h, w, 1e-6).double() @ wd.double().T, 1e-5
    else:
        lin = random_layer(ext, n, k, mix, seed=44)
        ref, tol = (reference(lin, rms_rounded(h, w, 1e-6)), 1e-5) if case == "head" else (reference(lin, x), 1e-3)

    def run():
        if case == "gated":
            out = torch.full((n,), float("nan"), device=DEV, dtype=torch.float16)
            ext.gemv([gate.kernel_matrix, up.kernel_matrix], h, kernels.IN_RMS_NORM, w, None, 1e-6, kernels.OUT_GATED,
                     kernels.ACTIVATION_IDS["silu"], [out], *workspace)
        elif case.endswith("head"):
            out = torch.full((n,), float("nan"), device=DEV)
            ext.gemv([lin.kernel_matrix], h, kernels.IN_RMS_NORM, w, None, 1e-6, kernels.OUT_FLOAT, 0, [out])
        elif case == "half_split":
            out = torch.full((n,), float("nan"), device=DEV, dtype=torch.float16)
            ext.gemv([lin.kernel_matrix], x, kernels.IN_HALF, None, None, 0.0, kernels.OUT_HALF, 0, [out], *workspace)
        else:
            base = torch.randn(n, generator=g, device=DEV)
            out = base.clone()
            ext.gemv([lin.kernel_matrix], x, kernels.IN_HALF, None, None, 0.0, kernels.OUT_RESIDUAL, 0, [out], *workspace)
            out = out - base
        return out, ext.gemv_last_plan()

    for units in ("1", "0"):
        monkeypatch.setenv("KODKOD_GEMV_UNITS", units)
        out, plan = run()
        assert plan["units"] == (units == "1")
        if units == "1":
            assert plan["blocks"] == slots
            assert (plan["splits"] == 1) if case.endswith("head") else (plan["splits"] > 1)  # merges taken
        assert rel_err(out, ref) <= tol
        assert workspace[1].sum().item() == 0  # every tile's counter back at zero


def test_gated_units_knob_splits_a_one_wave_gate_up(ext, workspace, monkeypatch):
    """KODKOD_GEMV_UNITS=g (an experiment knob): a gate+up of fewer tiles than resident slots, which
    the wave kernel runs by default, runs on the units kernel split over K (1.5B's shape: 280 tiles
    of K 1,536 for 396 slots), and both match the fp64 reference."""
    slots = 3 * torch.cuda.get_device_properties(0).multi_processor_count
    n, k = 32 * (slots * 2 // 3 + 7), 1536
    g = torch.Generator(device=DEV).manual_seed(45)
    h = torch.randn(k, generator=g, device=DEV) * 3
    w = (1 + 0.2 * torch.randn(k, generator=g, device=DEV)).half()
    gate, up = (random_layer(ext, n, k, MIXES[-2], seed=s, bias=False) for s in (46, 47))
    xr = rms_rounded(h, w, 1e-6)
    ref = torch.nn.functional.silu(reference(gate, xr)) * reference(up, xr)
    for units in ("g", "1"):
        monkeypatch.setenv("KODKOD_GEMV_UNITS", units)
        out = torch.full((n,), float("nan"), device=DEV, dtype=torch.float16)
        ext.gemv([gate.kernel_matrix, up.kernel_matrix], h, kernels.IN_RMS_NORM, w, None, 1e-6, kernels.OUT_GATED,
                 kernels.ACTIVATION_IDS["silu"], [out], *workspace)
        plan = ext.gemv_last_plan()
        assert plan["units"] == (units == "g")
        if units == "g":
            assert plan["splits"] > 1
        assert rel_err(out, ref) <= 3e-3
        assert workspace[1].sum().item() == 0


@pytest.mark.parametrize("dense", [False, True])
def test_long_tiles_run_on_the_units_kernel_reading_their_input_in_place(ext, workspace, monkeypatch, dense):
    """A one-wave grid of EXL2 tiles that each stream at least 256 KB (7B's down projection) runs on
    the units kernel, split over K; an fp16 input that needs no gather (the previous layer wrote it
    in this matrix's order) is read where it lies. Residual adds by atomics, against fp64 and
    against the wave kernel. Dense fp16 tiles as long stay on the wave kernel (not measured yet)."""
    k = 8192 if dense else 18944  # dense: 512 KB a tile; 4 bits: 2,368 rows, 303 KB
    g = torch.Generator(device=DEV).manual_seed(46)
    x = torch.randn(k, generator=g, device=DEV).half()
    if dense:
        w = (torch.randn(1000, k, generator=g, device=DEV) * k ** -0.5).half()
        lin = Linear(w.clone(), None)
        lin.prepare_kernels(ext)
        ref, x_direct = x.double() @ w.double().T, x  # dense rows stand in their own order
    else:
        lin = random_layer(ext, 1000, k, MIXES[2], seed=45)
        ref, x_direct = reference(lin, x), torch.empty_like(x)
        x_direct[lin.input_order.long()] = x
    base = torch.randn(1000, generator=g, device=DEV)
    for units in ("1", "0"):
        monkeypatch.setenv("KODKOD_GEMV_UNITS", units)
        out = base.clone()
        ext.gemv([lin.kernel_matrix_direct], x_direct, kernels.IN_HALF, None, None, 0.0, kernels.OUT_RESIDUAL, 0,
                 [out], *workspace)
        plan = ext.gemv_last_plan()
        assert plan["units"] == (units == "1" and not dense)
        if plan["units"]:
            assert plan["splits"] > 4  # past the multi-wave rule's limit
        assert rel_err(out - base, ref) <= 1e-3


def test_out_index_hands_the_next_layer_its_permuted_input(ext):
    """A GEMV that stores its outputs in the next layer's input order; that layer then reads them as they are."""
    first = random_layer(ext, 256, 128, MIXES[2], seed=21)
    nxt = random_layer(ext, 64, 256, MIXES[-1], seed=22)
    x = torch.randn(128, device=DEV).half()
    mid, mid_p = (torch.full((256,), float("nan"), device=DEV, dtype=torch.float16) for _ in range(2))
    ext.gemv([first.kernel_matrix], x, kernels.IN_HALF, None, None, 0.0, kernels.OUT_HALF, 0, [mid])
    ext.gemv([first.kernel_matrix], x, kernels.IN_HALF, None, None, 0.0, kernels.OUT_HALF, 0, [mid_p],
             out_index=nxt.input_order)
    assert torch.equal(mid_p[nxt.input_order.long()], mid)
    y, y_direct = (torch.full((64,), float("nan"), device=DEV) for _ in range(2))
    ext.gemv([nxt.kernel_matrix], mid, kernels.IN_HALF, None, None, 0.0, kernels.OUT_FLOAT, 0, [y])
    ext.gemv([nxt.kernel_matrix_direct], mid_p, kernels.IN_HALF, None, None, 0.0, kernels.OUT_FLOAT, 0, [y_direct])
    assert torch.equal(y, y_direct)


@pytest.mark.parametrize("mix", MIXES)
def test_dequant_kernel_equals_reference_dequantization(ext, mix):
    lin = random_layer(ext, 200, 256, mix, seed=3)
    out = torch.full((256, lin.q_weight.shape[1]), float("nan"), device=DEV, dtype=torch.float16)
    ext.dequant(lin.kernel_matrix, out)
    ref = lin.ref_w.T  # W [K, out] in the original row order
    assert torch.allclose(out[:, :200].float(), ref.half().float(), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("tokens", [7, 40])  # the few-token GEMV; dequantization into scratch + matmul
def test_multi_token_module_forward(ext, tokens):
    lin = random_layer(ext, 300, 512, MIXES[-2], seed=5)
    x = torch.randn(tokens, 512, device=DEV).half()
    assert rel_err(lin(x), reference(lin, x)) <= 2e-3


@pytest.mark.parametrize("mix, shape", [(m, s) for m in MIXES for s in SHAPES[:2]] + ODD_K)
@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 8, 16])
def test_exl2_gemv_tokens_matches_fp64_reference(ext, mix, shape, tokens):
    """A few tokens at once: every row the product of its own input, the weights read once."""
    out_f, in_f = shape
    lin = random_layer(ext, out_f, in_f, mix, seed=out_f * 5 + in_f + tokens)
    x = torch.randn(tokens, in_f, device=DEV).half()
    out = torch.full((tokens, out_f), float("nan"), device=DEV, dtype=torch.float16)
    scratch = torch.full((8 * lin.x_len,), float("nan"), device=DEV, dtype=torch.float16)
    ext.gemv_tokens(lin.kernel_matrix, x, out, scratch)
    assert rel_err(out, reference(lin, x)) <= 1e-3
    y = torch.empty(out_f, device=DEV, dtype=torch.float16)
    ext.gemv([lin.kernel_matrix], x[-1], kernels.IN_HALF, None, None, 0.0, kernels.OUT_HALF, 0, [y])
    assert torch.allclose(out[-1].float(), y.float(), rtol=2e-3, atol=2e-3)  # the one-token kernel agrees


def dense_layer(ext, seed):
    """A dense fp16 layer [100, 72] with a bias, handed to the kernels: (layer, its weight, its bias)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    w = (torch.randn(100, 72, generator=g, device=DEV) * 0.1).half()
    b = (torch.randn(100, generator=g, device=DEV) * 0.1).half()
    lin = Linear(w.clone(), b)
    lin.prepare_kernels(ext)
    return lin, w, b


def test_dense_gemv_tokens(ext):
    lin, w, b = dense_layer(ext, seed=2)
    x = torch.randn(5, 72, device=DEV).half()
    out = torch.empty(5, 100, device=DEV, dtype=torch.float16)
    ext.gemv_tokens(lin.kernel_matrix, x, out, torch.empty(8 * 80, device=DEV, dtype=torch.float16))
    assert rel_err(out, x.double() @ w.double().T + b.double()) <= 1e-3


def test_dense_gemv(ext):
    lin, w, b = dense_layer(ext, seed=1)
    assert torch.equal(lin.weight, w)  # the torch view of the transposed storage
    x = torch.randn(72, device=DEV).half()
    y = torch.full((100,), float("nan"), device=DEV)
    ext.gemv([lin.kernel_matrix], x, kernels.IN_HALF, None, None, 0.0, kernels.OUT_FLOAT, 0, [y])
    assert rel_err(y, x.double() @ w.double().T + b.double()) <= 1e-5


def rms_rounded(h, w, eps):
    """What the kernels' RMSNorm prologue computes: fp32 statistics, fp16 roundings as the torch fp16 path."""
    return ((h * torch.rsqrt(h.pow(2).mean() + eps)).half() * w).half()


@pytest.mark.parametrize("split", [False, True])
def test_fused_norm_qkv_gated_and_residual_epilogues(ext, workspace, split):
    """K long enough that the launcher splits every product when it may (40 and 80 chunks): the
    ordered merge of the fp16 and gated outputs, the atomic adds of the residual's splits."""
    ws = workspace if split else (None, None)
    k, inter = 1280, 2560
    q, kk, v = (random_layer(ext, n, k, MIXES[i], seed=10 + i) for i, n in enumerate((256, 64, 64)))
    gate, up = (random_layer(ext, inter, k, MIXES[6], seed=20 + i, bias=False) for i in range(2))
    down = random_layer(ext, k, inter, MIXES[2], seed=30)
    h = torch.randn(k, device=DEV) * 3
    w = (1 + 0.2 * torch.randn(k, device=DEV)).half()
    x = rms_rounded(h, w, 1e-6)

    outs = [torch.full((n,), float("nan"), device=DEV, dtype=torch.float16) for n in (256, 64, 64)]
    ext.gemv([q.kernel_matrix, kk.kernel_matrix, v.kernel_matrix], h, kernels.IN_RMS_NORM, w, None, 1e-6,
             kernels.OUT_HALF, 0, outs, *ws)
    for lin, y in zip((q, kk, v), outs):
        assert rel_err(y, reference(lin, x)) <= 2e-3

    act = torch.full((inter,), float("nan"), device=DEV, dtype=torch.float16)
    ext.gemv([gate.kernel_matrix, up.kernel_matrix], h, kernels.IN_RMS_NORM, w, None, 1e-6, kernels.OUT_GATED,
             kernels.ACTIVATION_IDS["silu"], [act], *ws)
    ref = torch.nn.functional.silu(reference(gate, x)) * reference(up, x)
    assert rel_err(act, ref) <= 3e-3

    h0 = h.clone()
    ext.gemv([down.kernel_matrix], act, kernels.IN_HALF, None, None, 0.0, kernels.OUT_RESIDUAL, 0, [h], *ws)
    assert rel_err(h - h0, reference(down, act)) <= 1e-4


def test_layer_norm_prologue_and_activation_epilogue(ext):
    k = 192
    fc = random_layer(ext, 300, k, MIXES[3], seed=40)
    h = torch.randn(k, device=DEV) * 2 + 0.5
    w, b = (1 + 0.2 * torch.randn(k, device=DEV)).half(), (0.1 * torch.randn(k, device=DEV)).half()
    y = torch.full((300,), float("nan"), device=DEV, dtype=torch.float16)
    ext.gemv([fc.kernel_matrix], h, kernels.IN_LAYER_NORM, w, b, 1e-5, kernels.OUT_ACT,
             kernels.ACTIVATION_IDS["gelu_pytorch_tanh"], [y])
    x = torch.nn.functional.layer_norm(h, (k,), w.float(), b.float(), 1e-5).half()
    ref = torch.nn.functional.gelu(reference(fc, x), approximate="tanh")
    assert rel_err(y, ref) <= 2e-3


def attention_reference(qkv, kc, vc, pos, cos, sin, heads, kv_heads, window, q_norm, k_norm):
    d = kc.shape[-1]
    q = qkv[: heads * d].view(1, heads, d)
    k = qkv[heads * d: (heads + kv_heads) * d].view(1, kv_heads, d)
    v = qkv[(heads + kv_heads) * d:].view(1, kv_heads, d)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    c, s = cos[pos:pos + 1], sin[pos:pos + 1]
    q, k = apply_rope(q, c, s), apply_rope(k, c, s)
    kc, vc = kc.clone(), vc.clone()
    kc[pos], vc[pos] = k[0], v[0]
    lo = max(0, pos - window + 1) if window else 0
    keys = kc[lo:pos + 1].double().repeat_interleave(heads // kv_heads, 1)  # [T, heads, d]
    vals = vc[lo:pos + 1].double().repeat_interleave(heads // kv_heads, 1)
    scores = torch.einsum("hd,thd->ht", q[0].double(), keys) / math.sqrt(d)
    out = torch.einsum("ht,thd->hd", torch.softmax(scores, -1), vals)
    return out.reshape(-1), kc, vc


@pytest.mark.parametrize("heads, kv_heads, d, rot, window, qk_norm", [
    (14, 2, 64, 1.0, 0, False), (8, 8, 128, 1.0, 0, False), (12, 4, 96, 0.5, 0, False),
    (4, 2, 64, 1.0, 100, False), (8, 2, 128, 1.0, 0, True), (2, 1, 256, 1.0, 0, False),
    (34, 1, 64, 1.0, 0, False), (6, 2, 72, 1.0, 0, False)])  # 3 groups of 16 heads; dims past 64 padded
@pytest.mark.parametrize("pos", [0, 1, 255, 256, 700, 1023])
def test_decode_attention_matches_reference(ext, heads, kv_heads, d, rot, window, qk_norm, pos):
    max_len = 1024
    g = torch.Generator(device=DEV).manual_seed(pos * 31 + d)
    rope = Rope({"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": rot}, d, max_len, DEV,
                torch.float16)
    cos, sin = rope.ensure(max_len)
    kc = torch.randn(max_len, kv_heads, d, generator=g, device=DEV).half()
    vc = torch.randn(max_len, kv_heads, d, generator=g, device=DEV).half()
    qkv = torch.randn((heads + 2 * kv_heads) * d, generator=g, device=DEV).half()
    norms = [RMSNorm((1 + 0.1 * torch.randn(d, generator=g, device=DEV)).half(), 1e-6) for _ in range(2)] \
        if qk_norm else [None, None]
    ref, kc_ref, vc_ref = attention_reference(qkv, kc, vc, pos, cos, sin, heads, kv_heads, window, *norms)
    splits = ext.attention_splits(max_len, d)
    out = torch.full((heads * d,), float("nan"), device=DEV, dtype=torch.float16)
    scratch = torch.zeros(ext.attention_scratch_floats(heads, splits, d), device=DEV)
    counters = torch.zeros(heads, dtype=torch.int32, device=DEV)
    p = torch.tensor([pos], dtype=torch.int32, device=DEV)
    for _ in range(2):  # the second launch checks that the counters were left at zero
        ext.decode_attention(qkv, kc, vc, p, cos, sin, norms[0] and norms[0].weight, norms[1] and norms[1].weight,
                             1e-6, out, scratch, counters, heads, kv_heads, window, splits, 1 / math.sqrt(d))
        assert rel_err(out, ref) <= 2e-3
    assert counters.sum().item() == 0
    assert torch.allclose(kc[pos].float(), kc_ref[pos].float(), atol=2e-3, rtol=2e-3)
    assert torch.equal(vc, vc_ref)


@pytest.mark.parametrize("temperature, penalty", [(0.0, 1.0), (0.0, 1.3), (0.7, 1.0), (1.0, 1.2), (0.1, 1.0)])
def test_sample_kernel_draws_what_the_twin_draws(ext, temperature, penalty):
    vocab = 151936
    g = torch.Generator(device=DEV).manual_seed(int(temperature * 10 + penalty * 100))
    for step in range(20):
        logits = torch.randn(vocab, generator=g, device=DEV) * 4
        seen = (torch.rand(vocab, generator=g, device=DEV) < 0.01).to(torch.uint8)
        threshold = -math.inf if step % 2 else float(torch.quantile(logits[:50000] / max(temperature, 1e-5), 0.999))
        params = torch.tensor([temperature, penalty, threshold], device=DEV)
        seed = torch.tensor([123456789012345 + step], device=DEV)
        step_t = torch.tensor([step], dtype=torch.int32, device=DEV)
        expected = draw(logits, seen, params, seed, step_t).item()
        token = torch.full((1,), -1, dtype=torch.int64, device=DEV)
        pos = torch.tensor([41], dtype=torch.int32, device=DEV)
        ext.sample(logits, seen, True, params, seed, step_t, token, pos, torch.zeros(128, device=DEV),
                   torch.zeros(1, dtype=torch.int32, device=DEV))
        assert token.item() == expected
        assert step_t.item() == step + 1 and pos.item() == 42 and seen[expected].item() == 1


def test_embed(ext):
    table = torch.randn(1000, 96, device=DEV).half()
    out = torch.full((96,), float("nan"), device=DEV)
    ext.embed(table, torch.tensor([517], device=DEV), out)
    assert torch.equal(out, table[517].float())


@pytest.mark.parametrize("rows, hidden", [(1, 896), (7, 100), (300, 1536), (33, 3584)])
def test_rms_norm_rows_equals_the_twin(ext, rows, hidden):
    g = torch.Generator(device=DEV).manual_seed(rows * hidden)
    x = (torch.randn(rows, hidden, generator=g, device=DEV) * 3).half()
    norm = RMSNorm((torch.rand(hidden, generator=g, device=DEV) + 0.5).half(), 1e-6)
    expected = norm(x)  # no kernels: the torch twin
    out = torch.full_like(x, float("nan"))
    ext.rms_norm_rows(x, norm.weight, out, norm.eps)
    assert (out.float() - expected.float()).abs().max().item() <= 2e-3 * expected.float().abs().max().item()
    assert rel_err(out, expected) < 1e-3


@pytest.mark.parametrize("heads, kv_heads, d, rot", [(14, 2, 64, 64), (8, 8, 128, 128), (6, 2, 96, 48), (4, 1, 256, 256)])
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_rope_write_equals_apply_rope_then_the_cache_write(ext, heads, kv_heads, d, rot, tokens):
    g = torch.Generator(device=DEV).manual_seed(heads * d + tokens)
    rope = Rope({"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": rot / d}, d, 4096, DEV,
                torch.float16)
    cos_t, sin_t = rope.ensure(600)
    positions = torch.randperm(600, generator=g, device=DEV)[:tokens]  # scattered rows, as a continued prompt's
    cos, sin = cos_t[positions][:, :rot], sin_t[positions][:, :rot]
    q = torch.randn(tokens, heads, d, generator=g, device=DEV).half()
    k = torch.randn(tokens, kv_heads, d, generator=g, device=DEV).half()
    v = torch.randn(tokens, kv_heads, d, generator=g, device=DEV).half()
    k_cache = torch.randn(600, kv_heads, d, generator=g, device=DEV).half()
    v_cache = torch.randn(600, kv_heads, d, generator=g, device=DEV).half()
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    k_ref.index_copy_(0, positions, apply_rope(k, cos, sin))
    v_ref.index_copy_(0, positions, v)
    q_ref = apply_rope(q, cos, sin)
    ext.rope_write(q, k, v, cos.contiguous(), sin.contiguous(), positions, k_cache, v_cache)
    # the same fp16 products and sums as torch's ops, each rounded once: equal but for a rare double
    # rounding of a sum in torch (its fp16 ops compute in fp32): one unit in the last place at most
    for got, want in ((q, q_ref), (k_cache, k_ref)):
        ulp = torch.finfo(torch.float16).eps * want.float().abs().clamp(min=2 ** -14)
        off = (got.float() - want.float()).abs() > ulp
        assert off.sum().item() <= want.numel() // 1000, f"{off.sum().item()} values differ by more than one ulp"
    assert torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("name", ["llama-tiny-2.5bpw", "llama-tiny-4.0bpw", "llama-tiny-6.5bpw", "llama-tiny-fp16"])
def test_fast_path_generates_what_the_torch_path_generates(ext, name):
    ids = load_file(fixture_dir("llama-tiny-4.0bpw") / "golden.safetensors")["input_ids"].tolist()
    fast = load_model(fixture_dir(name), device="cuda", backend="cuda")
    slow = load_model(fixture_dir(name), device="cuda", backend="torch")
    assert fast.backend == "cuda" and slow.backend == "torch"
    assert (fast.logits(ids) - slow.logits(ids)).abs().max().item() < 0.05
    check_greedy_agreement(fast, slow, ids, 128)


@pytest.mark.parametrize("name", ["llama-tiny-2.5bpw", "llama-tiny-6.5bpw"])
def test_kept_prompt_weights_give_the_same_prompt_forward(ext, name):
    """fp16 weights kept for prompts (the default where they fit) against dequantizing at each
    prompt: the same kernel writes the same values, so the logits are identical."""
    ids = load_file(fixture_dir("llama-tiny-4.0bpw") / "golden.safetensors")["input_ids"].tolist()
    kept = load_model(fixture_dir(name), device="cuda", backend="cuda")
    each = load_model(fixture_dir(name), device="cuda", backend="cuda", prompt_weights_mb=0)
    assert kept.prompt_weights and not each.prompt_weights
    assert kept.info()["prompt_weights"] != each.info()["prompt_weights"]
    assert len(ids) > 8  # more than PACKED_TOKENS: the dequantize + matmul path
    assert torch.equal(kept.logits(ids), each.logits(ids))
    params = GenerationParams(max_new_tokens=24)
    assert [e.token_id for e in kept.generate(ids, params)] == [e.token_id for e in each.generate(ids, params)]


def check_greedy_agreement(fast, slow, ids, n):
    """Same greedy tokens wherever the torch path's top two logits differ by more than 1e-2."""
    from engine import GenerationParams

    for eng in (fast, slow):
        eng.stop_ids = frozenset()
    params = GenerationParams(max_new_tokens=n)
    a = [e.token_id for e in fast.generate(ids, params)][:-1]
    b = [e.token_id for e in slow.generate(ids, params)][:-1]
    assert len(a) == len(b) == n
    if a != b:
        i = next(j for j in range(n) if a[j] != b[j])
        top2 = slow.logits(ids + b[:i])[-1].topk(2).values
        assert (top2[0] - top2[1]).item() <= 1e-2, f"token {i} differs with a margin of {top2[0] - top2[1]}"


def test_random_qwen_shape_model_fast_matches_torch(ext, tmp_path):
    from engine.convert.synthetic import random_model

    path = random_model(tmp_path / "m", "0.5b", device="cuda", layers=4)
    fast = load_model(path, device="cuda", backend="cuda")
    slow = load_model(path, device="cuda", backend="torch")
    ids = list(range(100, 400))
    assert rel_err(fast.logits(ids)[-1], slow.logits(ids)[-1].float()) < 1e-2
    check_greedy_agreement(fast, slow, ids, 128)


@pytest.mark.parametrize("backend", ["cuda", "torch"])
def test_graph_prefill_and_decode_match_a_plain_forward(ext, backend):
    """Every greedy token of the graph-captured path (bucketed prefill, decode step) against a plain
    full forward without cache, prefix reuse included."""
    from engine import GenerationParams

    eng = load_model(fixture_dir("llama-tiny-6.5bpw"), device="cuda", backend=backend)
    eng.stop_ids = frozenset()
    ids = load_file(fixture_dir("llama-tiny-4.0bpw") / "golden.safetensors")["input_ids"].tolist()
    for prompt in (ids[:40], ids[:37] + [5, 6, 7], ids[:3], ids):  # the second and third reuse the cache
        out = [e.token_id for e in eng.generate(prompt, GenerationParams(max_new_tokens=24))][:-1]
        for i, tok in enumerate(out):
            top2 = eng.logits(prompt + out[:i])[-1].topk(2)
            if (top2.values[0] - top2.values[1]).item() > 1e-2:
                assert tok == top2.indices[0].item(), f"token {i} of a {len(prompt)}-token prompt"


@pytest.mark.parametrize("arch", ["llama-bias", "mistral", "qwen2", "qwen3", "starcoder2"])
def test_every_family_runs_on_the_fast_path(ext, tmp_path, arch):
    """Dense fp16 weights, biases, sliding windows, q/k norms, LayerNorm and the plain MLP, on the kernels."""
    from tests.engine.tiny_models import build

    path, _ = build(tmp_path, arch)
    fast = load_model(path, device="cuda", backend="cuda")
    slow = load_model(path, device="cuda", backend="torch")
    assert fast.backend == "cuda"
    ids = list(range(3, 60))
    assert rel_err(fast.logits(ids)[-1], slow.logits(ids)[-1].float()) < 1e-2
    check_greedy_agreement(fast, slow, ids, 64)


def test_doctor_self_test_passes(ext):
    """`kodkod doctor`'s self-test (engine/selftest.py: every kernel family against its twin, a
    grid of more than one wave among the GEMVs) passes on this GPU."""
    from engine import selftest

    results = selftest.run(0.2)
    assert results and all(ok for _, ok, _ in results), results
