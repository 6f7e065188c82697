"""Tiny random models of every supported architecture, built and saved with transformers."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tests.conftest import fixture_dir

COMMON = dict(vocab_size=1024, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=0, eos_token_id=0)

ARCHS = {
    "llama": ("LlamaConfig", dict(attention_bias=False)),
    "llama-bias": ("LlamaConfig", dict(attention_bias=True, mlp_bias=True)),
    "mistral": ("MistralConfig", dict(sliding_window=8, head_dim=16)),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=False, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=24, use_sliding_window=False)),
    "starcoder2": ("Starcoder2Config", dict(use_bias=True, norm_epsilon=1e-5, hidden_act="gelu_pytorch_tanh",
                                            sliding_window=None, tie_word_embeddings=True)),
}


def build(tmp: Path, arch: str, seed: int = 0, **overrides):
    """Save a random model of `arch` under tmp; return (dir, transformers model in fp32 eager mode)."""
    import transformers

    cls_name, extra = ARCHS[arch]
    cfg = getattr(transformers, cls_name)(**{**COMMON, **extra, **overrides})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        # Non-trivial values everywhere, biases and norms included, so every term is tested.
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    out = tmp / arch
    model.save_pretrained(out, safe_serialization=True)
    shutil.copy(fixture_dir("llama-tiny-fp16") / "tokenizer.json", out / "tokenizer.json")
    return out, model


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()
