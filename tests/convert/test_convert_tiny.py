"""The converter end to end on the tiny fp16 fixture: format rules, accuracy, loading, resume."""
import json
import shutil

import pytest
import torch
from safetensors import safe_open

from engine import exl2, load_model
from engine.convert.converter import WORK, convert
from engine.convert.writer import validate
from engine.loader import TensorStore

ROWS, LENGTH = 6, 128  # small calibration: the tiny model is random anyway


@pytest.fixture(scope="module")
def converted(tiny_fp16, tmp_path_factory):
    out = {}
    for bits in (2.5, 4.0, 6.5):
        d = tmp_path_factory.mktemp(f"tiny-{bits}")
        out[bits] = convert(tiny_fp16, d / "exl2", bits=bits, rows=ROWS, length=LENGTH, progress=False,
                            log=lambda s: None)
    return out


def _tensors(path):
    store = TensorStore(path)
    return {k: store.get(k) for k in store.names()}


@pytest.mark.parametrize("bits", [2.5, 4.0, 6.5])
def test_files_follow_the_format(converted, tiny_fp16, bits):
    d = converted[bits]
    summary = validate(d)  # group order, sizes, packing units, scale ranges, dtypes
    assert summary["layers"] == 2 * 7 + 1
    names = sorted(p.name for p in d.glob("*.safetensors"))
    assert names == ["output-00001-of-00001.safetensors"]
    cfg = json.loads((d / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "exl2" and q["bits"] == bits and q["head_bits"] == 6
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (d / f).is_file()
    t = _tensors(d)
    assert "lm_head.q_weight" in t and "lm_head.weight" not in t
    assert t["model.embed_tokens.weight"].dtype == torch.float16
    assert t["model.norm.weight"].dtype == torch.float16
    for key in [k[:-9] for k in t if k.endswith(".q_weight")]:
        g = t[f"{key}.q_groups"].long().tolist()
        bits_seq = g[0::2]
        assert bits_seq == sorted(bits_seq, reverse=True)
        nib = exl2.scales(t[f"{key}.q_scale"], t[f"{key}.q_scale_max"])
        assert torch.all(nib > 0)
    assert not (d / WORK).exists()


@pytest.mark.parametrize("bits", [2.5, 4.0, 6.5])
def test_bits_per_weight_near_target(converted, bits):
    t = _tensors(converted[bits])
    total_bits = total_w = 0
    for key in [k[:-9] for k in t if k.endswith(".q_weight") and not k.startswith("lm_head")]:
        k, n = t[f"{key}.q_invperm"].numel(), t[f"{key}.q_weight"].shape[1]
        total_bits += sum(t[f"{key}.{s}"].numel() * t[f"{key}.{s}"].element_size() * 8
                          for s in exl2.SUFFIXES)
        total_w += k * n
    assert bits - 0.35 <= total_bits / total_w <= bits + 0.01


def test_dequantized_weights_match_within_bit_width_error(converted, tiny_fp16):
    ref = _tensors(tiny_fp16)
    worst = {}
    for bits, d in converted.items():
        t = _tensors(d)
        errs = []
        for key in [k[:-9] for k in t if k.endswith(".q_weight")]:
            w = ref[f"{key}.weight"].float()
            dq = exl2.dequantize({s: t[f"{key}.{s}"] for s in exl2.SUFFIXES}, w.shape[0])
            rel = float((dq - w).norm() / w.norm())
            min_bits = min(t[f"{key}.q_groups"].long().tolist()[0::2])
            # a b-bit uniform grid over the range leaves a relative error of roughly 2^-b
            assert rel < 2.0 ** (1 - min_bits) * 1.5, (key, bits, rel, min_bits)
            errs.append(rel)
        worst[bits] = max(errs)
    assert worst[6.5] < worst[4.0] < worst[2.5]


def test_engine_loads_it_and_logits_approach_fp16(converted, tiny_fp16):
    g = safe_open(str(tiny_fp16.parent / "llama-tiny-4.0bpw" / "golden.safetensors"), "pt")
    ids = g.get_tensor("input_ids").tolist()
    ref = load_model(tiny_fp16, device="cpu").logits(ids)
    diffs = {}
    for bits, d in converted.items():
        eng = load_model(d, device="cpu")
        assert eng.quantized
        diffs[bits] = float((eng.logits(ids) - ref).abs().max())
    # exllamav2's own files: about 3 / 0.9 / 0.2 (docs/exl2-format.md)
    assert diffs[6.5] < 0.5 and diffs[4.0] < 1.5 and diffs[2.5] < 5.0
    assert diffs[6.5] < diffs[4.0] < diffs[2.5]


def test_fast_mode_and_cli(tiny_fp16, tmp_path):
    from server.cli import main

    out = tmp_path / "fast"
    assert main(["convert", "-i", str(tiny_fp16), "-o", str(out), "-b", "4.0", "--fast", "--no-progress"]) == 0
    s = validate(out)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["fast"] is True
    # --fast does no act-order: the permutation is the identity
    t = _tensors(out)
    assert torch.equal(t["model.layers.0.mlp.down_proj.q_invperm"].long(), torch.arange(768))
    assert s["layers"] == 15
    assert main(["convert", "-i", str(tmp_path / "nope"), "-o", str(tmp_path / "x")]) == 1


def test_resume_after_interruption(tiny_fp16, tmp_path, monkeypatch):
    import engine.convert.converter as conv

    out = tmp_path / "exl2"
    calls = {"n": 0}
    real = conv.gptq

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 9:  # in the second block
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(conv, "gptq", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_fp16, out, bits=4.0, rows=ROWS, length=LENGTH, progress=False, log=lambda s: None)
    state = json.loads((out / WORK / "state.json").read_text())
    assert state["blocks_done"] == 1
    done = (out / WORK / "block-0000.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(conv, "gptq", real)
    logs = []
    convert(tiny_fp16, out, bits=4.0, rows=ROWS, length=LENGTH, progress=False, log=logs.append,
            keep_work=True)
    assert any("resuming" in s for s in logs)
    assert (out / WORK / "block-0000.safetensors").stat().st_mtime_ns == done  # not redone
    validate(out)
    # the same settings from scratch give the same files
    fresh = tmp_path / "fresh"
    convert(tiny_fp16, fresh, bits=4.0, rows=ROWS, length=LENGTH, progress=False, log=lambda s: None)
    a, b = _tensors(out), _tensors(fresh)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    shutil.rmtree(out / WORK)


def test_given_allocation_skips_measurement(tiny_fp16, tmp_path, monkeypatch):
    import engine.convert.converter as conv
    from engine.convert import allocate

    keys = [f"model.layers.{i}.{m}" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    given = {k: allocate.CANDIDATES[8].name() for k in keys}  # uniform 4-bit g32

    def boom(*a, **k):
        raise AssertionError("no measurement expected")

    monkeypatch.setattr(conv.alloc, "measure", boom)
    out = convert(tiny_fp16, tmp_path / "o", bits=4.0, rows=4, length=64, progress=False,
                  log=lambda s: None, allocation=given)
    summary = validate(out)
    assert summary["bit_widths"] == [4, 6, 8]
    with pytest.raises(conv.ConvertError, match="does not fit"):
        convert(tiny_fp16, tmp_path / "p", bits=4.0, rows=4, length=64, progress=False,
                log=lambda s: None, allocation={"x": "y"})


def test_cli_reuses_an_earlier_allocation(tiny_fp16, tmp_path, monkeypatch, capsys):
    import engine.convert.converter as conv
    from server.cli import main

    first = tmp_path / "first"
    assert main(["convert", "-i", str(tiny_fp16), "-o", str(first), "--rows", "4", "--length", "64",
                 "--measure-rows", "2", "--no-progress"]) == 0
    summary = first / "kodkod-convert.json"

    def boom(*a, **k):
        raise AssertionError("no measurement expected")

    monkeypatch.setattr(conv.alloc, "measure", boom)
    second = tmp_path / "second"
    assert main(["convert", "-i", str(tiny_fp16), "-o", str(second), "--rows", "4", "--length", "64",
                 "--allocation", str(summary), "--no-progress"]) == 0
    assert (json.loads((second / "kodkod-convert.json").read_text())["allocation"]
            == json.loads(summary.read_text())["allocation"])
    a, b = _tensors(first), _tensors(second)  # same allocation, same calibration: same model
    assert all(torch.equal(a[k], b[k]) for k in a)
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    capsys.readouterr()
    assert main(["convert", "-i", str(tiny_fp16), "-o", str(tmp_path / "x"), "--allocation", str(bad)]) == 1
    assert "--allocation" in capsys.readouterr().err


@pytest.mark.cuda
def test_gpu_conversion_matches_cpu_quality(converted, tiny_fp16, tmp_path):
    out = convert(tiny_fp16, tmp_path / "gpu", bits=4.0, rows=ROWS, length=LENGTH, device="cuda",
                  progress=False, log=lambda s: None)
    validate(out)
    g = safe_open(str(tiny_fp16.parent / "llama-tiny-4.0bpw" / "golden.safetensors"), "pt")
    ids = g.get_tensor("input_ids").tolist()
    ref = load_model(tiny_fp16, device="cpu").logits(ids)
    gpu = float((load_model(out, device="cpu").logits(ids) - ref).abs().max())
    cpu = float((load_model(converted[4.0], device="cpu").logits(ids) - ref).abs().max())
    assert gpu < 1.5 and gpu < 1.5 * cpu
    # the same allocation on both (float noise may flip a rounding, not a bit width)
    a = json.loads((out / "kodkod-convert.json").read_text())["allocation"]
    b = json.loads((converted[4.0] / "kodkod-convert.json").read_text())["allocation"]
    assert sum(a[k] != b[k] for k in a) <= len(a) // 10
