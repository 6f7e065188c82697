"""A quick check of the CUDA kernels against their torch twins, on fresh random inputs (for `kodkod doctor`)."""
from __future__ import annotations

import math
import time

import torch

from . import exl2, kernels
from .convert.quant import Mix, make_groups, rtn
from .linear import DequantScratch, EXL2Linear
from .rope import Rope, apply_rope
from .sampling import draw


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double().flatten(), ref.double().flatten()
    return float("inf") if torch.isnan(a).any() else ((a - ref).norm() / ref.norm()).item()


def _gemv(ext, seed: int) -> float:
    g = torch.Generator(device="cuda").manual_seed(seed)
    worst = 0.0
    # the last shape: a head-like grid of more than one wave of blocks (wide tiles of 128 columns,
    # 3 blocks per SM), which runs on the units kernel
    wide = 128 * (3 * torch.cuda.get_device_properties(0).multi_processor_count + 8)
    for bits, (out_f, in_f) in zip((2, 3, 4, 5, 6, 8, 6), ((96, 256), (200, 512), (640, 896), (130, 384),
                                                            (64, 1024), (256, 160), (wide, 256))):
        w = torch.randn(out_f, in_f, generator=g, device="cuda") * in_f ** -0.5
        t = {k: v.cuda() for k, v in rtn(w, make_groups(Mix(((1.0, bits),), 32), in_f),
                                         torch.rand(in_f, generator=g, device="cuda")).tensors().items()}
        lin = EXL2Linear(t, out_f, in_f, None, torch.float16)
        w_ref = exl2.dequantize(t, out_f)  # the format's own dequantization, before the layer repacks
        lin.prepare_kernels(ext, DequantScratch())
        x = torch.randn(in_f, generator=g, device="cuda").half()
        y = torch.full((out_f,), float("nan"), device="cuda")
        ext.gemv([lin.kernel_matrix], x, kernels.IN_HALF, None, None, 0.0, kernels.OUT_FLOAT, 0, [y])
        worst = max(worst, _rel(y, x.double() @ w_ref.double().T))
    return worst


def _attention(ext, seed: int) -> float:
    g = torch.Generator(device="cuda").manual_seed(seed)
    heads, kv, d, max_len, pos = 8, 2, 64, 512, 300
    cos, sin = Rope({"rope_type": "default", "rope_theta": 10000.0}, d, max_len, "cuda", torch.float16).ensure(max_len)
    kc = torch.randn(max_len, kv, d, generator=g, device="cuda").half()
    vc = torch.randn(max_len, kv, d, generator=g, device="cuda").half()
    qkv = torch.randn((heads + 2 * kv) * d, generator=g, device="cuda").half()
    q = apply_rope(qkv[:heads * d].view(1, heads, d), cos[pos:pos + 1], sin[pos:pos + 1])
    k = apply_rope(qkv[heads * d:(heads + kv) * d].view(1, kv, d), cos[pos:pos + 1], sin[pos:pos + 1])
    keys = torch.cat([kc[:pos], k]).double().repeat_interleave(heads // kv, 1)
    vals = torch.cat([vc[:pos], qkv[(heads + kv) * d:].view(1, kv, d)]).double().repeat_interleave(heads // kv, 1)
    ref = torch.einsum("ht,thd->hd", torch.softmax(torch.einsum("hd,thd->ht", q[0].double(), keys) / math.sqrt(d), -1),
                       vals)
    splits = ext.attention_splits(max_len, d)
    out = torch.full((heads * d,), float("nan"), device="cuda", dtype=torch.float16)
    ext.decode_attention(qkv, kc, vc, torch.tensor([pos], dtype=torch.int32, device="cuda"), cos, sin, None, None,
                         0.0, out, torch.zeros(ext.attention_scratch_floats(heads, splits, d), device="cuda"),
                         torch.zeros(heads, dtype=torch.int32, device="cuda"), heads, kv, 0, splits, 1 / math.sqrt(d))
    return _rel(out, ref)


def _prefill(ext, seed: int) -> float:
    """The prompt's per-token kernels against their twins: RMSNorm of rows, RoPE with the cache write."""
    from .model import RMSNorm

    g = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(37, 896, generator=g, device="cuda") * 3).half()
    norm = RMSNorm((torch.rand(896, generator=g, device="cuda") + 0.5).half(), 1e-6)
    out = torch.full_like(x, float("nan"))
    ext.rms_norm_rows(x, norm.weight, out, norm.eps)
    worst = _rel(out, norm(x))  # no kernels on the module: the torch twin
    heads, kv, d, t, max_len = 14, 2, 64, 21, 512
    cos_t, sin_t = Rope({"rope_type": "default", "rope_theta": 10000.0}, d, max_len, "cuda", torch.float16).ensure(max_len)
    pos = torch.randperm(max_len, generator=g, device="cuda")[:t]
    cos, sin = cos_t[pos].contiguous(), sin_t[pos].contiguous()
    q = torch.randn(t, heads, d, generator=g, device="cuda").half()
    k = torch.randn(t, kv, d, generator=g, device="cuda").half()
    v = torch.randn(t, kv, d, generator=g, device="cuda").half()
    kc, vc = torch.zeros(max_len, kv, d, device="cuda").half(), torch.zeros(max_len, kv, d, device="cuda").half()
    q_ref, k_ref = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    ext.rope_write(q, k, v, cos, sin, pos, kc, vc)
    return max(worst, _rel(q, q_ref), _rel(kc[pos], k_ref), _rel(vc[pos], v))


def _sample(ext, seed: int) -> int:
    g = torch.Generator(device="cuda").manual_seed(seed)
    wrong = 0
    for step in range(8):
        logits = torch.randn(32000, generator=g, device="cuda") * 3
        seen = torch.zeros(32000, dtype=torch.uint8, device="cuda")
        params = torch.tensor([0.8 if step % 2 else 0.0, 1.1, -math.inf], device="cuda")
        seed_t = torch.tensor([seed], device="cuda")
        step_t = torch.tensor([step], dtype=torch.int32, device="cuda")
        want = draw(logits, seen, params, seed_t, step_t).item()
        token = torch.zeros(1, dtype=torch.int64, device="cuda")
        ext.sample(logits, seen, False, params, seed_t, step_t, token, None, torch.zeros(128, device="cuda"),
                   torch.zeros(1, dtype=torch.int32, device="cuda"))
        wrong += int(token.item() != want)
    return wrong


def run(seconds: float = 2.0) -> list[tuple[str, bool, str]]:
    """(check, passed, detail) for each kernel family, repeated on fresh inputs for about `seconds`."""
    ext = kernels.load()
    if ext is None:
        return [("kernels", False, kernels.reason() or "not built")]
    worst = {"gemv": 0.0, "attention": 0.0, "prefill": 0.0, "sample": 0}
    runs, seed, end = 0, int(time.time()), time.monotonic() + seconds
    while time.monotonic() < end or runs == 0:
        worst["gemv"] = max(worst["gemv"], _gemv(ext, seed + runs))
        worst["attention"] = max(worst["attention"], _attention(ext, seed + runs))
        worst["prefill"] = max(worst["prefill"], _prefill(ext, seed + runs))
        worst["sample"] += _sample(ext, seed + runs)
        runs += 1
    torch.cuda.synchronize()
    return [
        ("EXL2 GEMV, 2-8 bits", worst["gemv"] <= 1e-5, f"worst relative error {worst['gemv']:.1e} over {runs} runs"),
        ("decode attention", worst["attention"] <= 2e-3, f"worst relative error {worst['attention']:.1e}"),
        ("prefill norm, RoPE and cache write", worst["prefill"] <= 1e-3, f"worst relative error {worst['prefill']:.1e}"),
        ("sampling", worst["sample"] == 0, f"{worst['sample']} of {8 * runs} draws differ from the twin"),
    ]
