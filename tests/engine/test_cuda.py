"""The reference engine on a GPU (fp16) agrees with the CPU (fp32). Skipped without CUDA."""
import pytest
import torch
from safetensors.torch import load_file

from engine import GenerationParams, load_model
from engine import exl2
from tests.conftest import fixture_dir

pytestmark = pytest.mark.cuda


def test_dequantize_on_gpu_equals_cpu():
    tensors = load_file(fixture_dir("llama-tiny-2.5bpw") / "output.safetensors")
    key = "model.layers.1.mlp.down_proj"
    t = {s: tensors[f"{key}.{s}"] for s in exl2.SUFFIXES}
    cpu = exl2.dequantize(t)
    gpu = exl2.dequantize({k: v.cuda() for k, v in t.items()})
    assert torch.equal(cpu, gpu.cpu())


@pytest.mark.parametrize("name", ["llama-tiny-fp16", "llama-tiny-4.0bpw"])
def test_gpu_fp16_logits_close_to_cpu_fp32(name):
    ids = load_file(fixture_dir(name.replace("fp16", "4.0bpw")) / "golden.safetensors")["input_ids"].tolist()
    cpu = load_model(fixture_dir(name), device="cpu").logits(ids)
    gpu_engine = load_model(fixture_dir(name), device="cuda")
    assert gpu_engine.dtype == torch.float16
    gpu = gpu_engine.logits(ids).cpu()
    assert (gpu - cpu).abs().max().item() < 0.05
    assert (gpu.argmax(-1) == cpu.argmax(-1)).float().mean().item() > 0.95


def test_gpu_generation_streams_and_cancels():
    eng = load_model(fixture_dir("llama-tiny-6.5bpw"), device="cuda")
    events = list(eng.generate([5, 6, 7, 8], GenerationParams(max_new_tokens=8, temperature=0.7, seed=3)))
    again = list(eng.generate([5, 6, 7, 8], GenerationParams(max_new_tokens=8, temperature=0.7, seed=3)))
    assert events == again
    assert events[-1].finish_reason in ("length", "stop")
