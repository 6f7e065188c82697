"""The number format a model computes in (engine/dtypes.py), and the engine in bf16 on the CPU."""
import pytest
import torch
from safetensors.torch import load_file

from engine import GenerationParams, dtypes, load_model
from tests.conftest import fixture_dir

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_fp16_on_a_gpu_and_bf16_only_on_a_cpu_that_has_it(monkeypatch, native):
    monkeypatch.setattr(dtypes, "cpu_has_bf16", lambda: native)
    assert dtypes.resolve_dtype("auto", CPU) == (torch.bfloat16 if native else torch.float32)
    assert dtypes.resolve_dtype("auto", CUDA) == torch.float16
    # None is the reference, whatever the CPU: what the tests compare against
    assert dtypes.resolve_dtype(None, CPU) == torch.float32 and dtypes.resolve_dtype(None, CUDA) == torch.float16


def test_names_dtypes_and_a_clear_error():
    for name, dt in dtypes.NAMES.items():
        assert dtypes.resolve_dtype(name, CPU) == dt
    assert dtypes.resolve_dtype(torch.bfloat16, CUDA) == torch.bfloat16
    with pytest.raises(ValueError, match="one of auto, float32, bfloat16, float16, not 'fp8'"):
        dtypes.resolve_dtype("fp8", CPU)


@pytest.mark.parametrize("caps, native", [({"avx512_bf16": True}, True), ({"amx_bf16": True, "avx512_bf16": False}, True),
                                          ({"avx512_bf16": False, "avx2": True}, False), ({}, False)])
def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch, caps, native):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    assert dtypes.cpu_has_bf16() is native


def test_bf16_on_the_cpu_computes_what_fp32_does_within_its_precision():
    """The same model in bf16 (what dtype auto picks on a CPU with native bf16): logits within bf16's
    precision of fp32's, the same top token almost everywhere, and a generation that runs."""
    ids = load_file(fixture_dir("llama-tiny-4.0bpw") / "golden.safetensors")["input_ids"].tolist()
    ref = load_model(fixture_dir("llama-tiny-4.0bpw"), device="cpu")
    bf = load_model(fixture_dir("llama-tiny-4.0bpw"), device="cpu", dtype="bfloat16")
    assert bf.dtype == torch.bfloat16 and bf.info()["dtype"] == "bfloat16"
    a, b = ref.logits(ids), bf.logits(ids).float()
    assert (a - b).abs().max().item() < 0.05 * a.abs().max().item()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() > 0.9
    events = list(bf.generate(ids, GenerationParams(max_new_tokens=8, temperature=0)))
    assert events[-1].finish_reason is not None and len(events) >= 2


def test_a_bf16_decode_step_attends_in_fp32_and_matches_the_reference():
    """One token after a cached prompt (the decode step: its attention runs in fp32 from bf16
    inputs) against the fp32 engine's same step."""
    ids = load_file(fixture_dir("llama-tiny-4.0bpw") / "golden.safetensors")["input_ids"].tolist()
    out = []
    for dtype in (None, "bfloat16"):
        eng = load_model(fixture_dir("llama-tiny-4.0bpw"), device="cpu", dtype=dtype)
        n = len(ids) - 1
        with torch.inference_mode():
            eng.model(torch.tensor(ids[:n]), torch.arange(n), eng.cache, start=0)
            step = eng.model(torch.tensor(ids[n:]), torch.tensor([n]), eng.cache, last_only=True, start=n)[0]
        assert step.dtype == torch.float32 and step.shape == (eng.config.vocab_size,)
        out.append(step)
    ref, bf = out
    assert (ref - bf).abs().max().item() < 0.05 * ref.abs().max().item()
    assert ref.argmax() == bf.argmax()
