"""EXL2 tensors: the reader against exllamav2's own files, and pack/unpack round trips."""
import pytest
import torch
from safetensors.torch import load_file

from engine import exl2
from tests.conftest import fixture_dir

QUANTIZED = ["llama-tiny-2.5bpw", "llama-tiny-4.0bpw", "llama-tiny-6.5bpw"]


def layer(tensors, key):
    return {s: tensors[f"{key}.{s}"] for s in exl2.SUFFIXES}


@pytest.mark.parametrize("name", QUANTIZED)
def test_dequantize_matches_exllamav2_reference(name):
    d = fixture_dir(name)
    tensors = load_file(d / "output.safetensors")
    golden = load_file(d / "golden.safetensors")
    keys = [k.removeprefix("ref_dq.") for k in golden if k.startswith("ref_dq.")]
    assert len(keys) == 15  # 7 linears x 2 layers + lm_head
    for key in keys:
        ref = golden[f"ref_dq.{key}"].float()
        w = exl2.dequantize(layer(tensors, key), ref.shape[0])
        assert w.shape == ref.shape
        assert (w - ref).abs().max().item() <= 1e-3, key


def test_fixtures_cover_every_bit_width():
    seen = set()
    for name in QUANTIZED:
        tensors = load_file(fixture_dir(name) / "output.safetensors")
        for k, v in tensors.items():
            if k.endswith(".q_groups"):
                seen |= set(v[0::2].tolist())
    assert seen == set(exl2.BIT_WIDTHS)


def random_layout(gen, k):
    """Groups of random widths (non-increasing) and sizes that add up to k rows."""
    widths = sorted(torch.randint(0, 6, (8,), generator=gen).tolist(), reverse=True)
    groups, left = [], k
    for i, wi in enumerate(widths):
        bits = exl2.BIT_WIDTHS[wi]
        sizes = [32, 64, 128] + ([16, 48] if bits == 2 else [])
        rows = sizes[int(torch.randint(0, len(sizes), (1,), generator=gen))]
        if i == len(widths) - 1 or rows >= left:
            rows = left
        groups.append(exl2.Group(bits, rows))
        left -= rows
        if left == 0:
            break
    return groups


SINGLE = [(b, r) for b in exl2.BIT_WIDTHS for r in (32, 64, 96, 128)] + [(2, 16), (2, 48)]


@pytest.mark.parametrize("bits, rows", SINGLE)
def test_pack_unpack_round_trip_single_width(bits, rows):
    gen = torch.Generator().manual_seed(bits * 1000 + rows)
    groups = [exl2.Group(bits, rows)]
    codes = torch.randint(0, 1 << bits, (rows, 64), generator=gen, dtype=torch.int16)
    packed = exl2.pack(codes, groups)
    assert packed.dtype == torch.int32 and packed.shape == (rows * bits // 32, 64)
    assert torch.equal(exl2.unpack(packed, groups), codes)


@pytest.mark.parametrize("seed", range(12))
def test_pack_unpack_round_trip_mixed_groups(seed):
    gen = torch.Generator().manual_seed(seed)
    k = 32 * int(torch.randint(4, 24, (1,), generator=gen))
    groups = random_layout(gen, k)
    codes = torch.cat([torch.randint(0, 1 << g.bits, (g.rows, 96), generator=gen) for g in groups]).to(torch.int16)
    packed = exl2.pack(codes, groups)
    assert torch.equal(exl2.unpack(packed, groups), codes)
    # The packed layout reads back through q_groups exactly as a file would store it.
    starts, row = [], 0
    for g in groups:
        starts += [g.bits, row]
        row += -(-g.rows * g.bits // 32)
    assert exl2.parse_groups(torch.tensor(starts, dtype=torch.int16), packed.shape[0], k) == groups


def test_pack_matches_exllamav2_files_bit_for_bit():
    tensors = load_file(fixture_dir("llama-tiny-4.0bpw") / "output.safetensors")
    for key in ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj", "lm_head"]:
        t = layer(tensors, key)
        groups = exl2.parse_groups(t["q_groups"], t["q_weight"].shape[0], t["q_invperm"].numel())
        codes = exl2.unpack(t["q_weight"], groups)
        assert torch.equal(exl2.pack(codes, groups), t["q_weight"])
        nib = torch.round(torch.sqrt(exl2.scales(t["q_scale"], t["q_scale_max"]) * 256
                                     / t["q_scale_max"].float().unsqueeze(1))) - 1
        assert torch.equal(exl2.pack_scales(nib.to(torch.int64)), t["q_scale"])


def test_dequantize_of_packed_random_weights_is_exact():
    gen = torch.Generator().manual_seed(7)
    k, n, out = 256, 96, 90  # 90 outputs padded to 96 columns
    groups = [exl2.Group(8, 32), exl2.Group(6, 64), exl2.Group(4, 128), exl2.Group(3, 32)]
    codes = torch.cat([torch.randint(0, 1 << g.bits, (g.rows, n), generator=gen) for g in groups])
    nib = torch.randint(0, 16, (len(groups), n), generator=gen)
    smax = torch.rand(len(groups), generator=gen).half() + 0.01
    perm = torch.randperm(k, generator=gen)
    starts, row = [], 0
    for g in groups:
        starts += [g.bits, row]
        row += g.rows * g.bits // 32
    t = {"q_weight": exl2.pack(codes, groups), "q_invperm": torch.argsort(perm).to(torch.int32),
         "q_scale": exl2.pack_scales(nib), "q_scale_max": smax, "q_groups": torch.tensor(starts, dtype=torch.int16)}
    w = exl2.dequantize(t, out)
    gi = exl2.group_index(groups)
    zero = torch.tensor([1 << (g.bits - 1) for g in groups])[gi]
    expect = torch.empty(k, n)
    expect[perm] = (codes - zero[:, None]).float() * ((nib + 1) ** 2 * smax.float()[:, None] / 256)[gi]
    assert torch.equal(w, expect.T[:out])


@pytest.mark.parametrize("q_groups, message", [
    ([7, 0], "bit width 7"),
    ([4, 0, 6, 4], "rises"),
    ([4, 0, 4, 0], "empty"),
])
def test_malformed_groups_are_clear_errors(q_groups, message):
    with pytest.raises(exl2.EXL2FormatError, match=message):
        exl2.parse_groups(torch.tensor(q_groups, dtype=torch.int16), 8, 64)


def test_missing_tensor_is_a_clear_error():
    with pytest.raises(exl2.EXL2FormatError, match="q_scale_max"):
        exl2.dequantize({"q_weight": torch.zeros(4, 32, dtype=torch.int32)})
