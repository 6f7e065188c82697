"""Random-weight models in the real Qwen2.5-Coder shapes, quantized to EXL2 like `convert --fast`
(about 4.0 bpw, or 8.0) or left in fp16 (what the server runs on a GPU by default: the imported
fp16 model).

For speed work and tests on machines that cannot download real weights:
weights are drawn at a realistic scale (never zeros); for EXL2 every linear layer is
quantized with the converter's own RTN and scale search through a random
act-order permutation, with mixed bit widths as real allocations have, and
the directory is written exactly as `kodkod convert` writes one.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .quant import Mix, make_groups, rtn
from .writer import write_model_dir

SHAPES: dict[str, dict] = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, tie_word_embeddings=False),
}
VOCAB = 151936

# The EXL2 forms: (bits, head bits, layer mixes in turn, head mix), with the mixes real allocations
# pick. 4bpw: about 4.0 bits per weight, the head at 6 bits (the shapes); 8bpw: what
# `convert --fast -b 8.0 --head-bits 8` picks for the real 0.5B model (8 bits, some 6).
EXL2_FORMS: dict[str, tuple] = {
    "4bpw": (4.0, 6, (Mix(((1.0, 4),), 128), Mix(((0.25, 5), (0.75, 4)), 32), Mix(((0.1, 4), (0.9, 3)), 32),
                      Mix(((0.1, 6), (0.9, 4)), 64)), Mix(((1.0, 6),), 128)),
    "8bpw": (8.0, 8, (Mix(((1.0, 8),), 32), Mix(((1.0, 8),), 128), Mix(((0.1, 8), (0.9, 6)), 32)),
             Mix(((1.0, 8),), 128)),
}
FORMS = ("4bpw", "8bpw", "fp16")  # a model name's suffix ("0.5b-fp16"); none: 4bpw


def qwen2_config(shape: str, vocab: int = VOCAB, max_positions: int = 32768) -> dict:
    s = SHAPES[shape]
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": max_positions,
            "vocab_size": vocab, "bos_token_id": None, "eos_token_id": 0, "torch_dtype": "float16", **s}


def word_tokenizer(vocab: int) -> str:
    """tokenizer.json of a word-level tokenizer with `vocab` tokens t0, t1, ... (text for random models)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str()


def _random_model(out, shape, device="cpu", seed=0, vocab=VOCAB, layers=None, progress=False,
                  form: str = "4bpw") -> Path:
    """form: one of FORMS; fp16: dense weights, the head a tensor of its own."""
    from tqdm import tqdm

    out = Path(out)
    quantize = form != "fp16"
    bits, head_bits, layer_mixes, head_mix = EXL2_FORMS[form] if quantize else (None, None, (None,), None)
    cfg = qwen2_config(shape, vocab)
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    if not quantize:
        cfg["tie_word_embeddings"] = False  # the head is written (the same bytes a step reads as a tied one)
    g = torch.Generator(device=device).manual_seed(seed)
    h, inter, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["hidden_size"] // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d

    def randn(*size, scale=1.0):
        return torch.randn(*size, generator=g, device=device) * scale

    tensors: dict[str, torch.Tensor] = {}

    def linear(key: str, out_f: int, in_f: int, mix: Mix, scale: float):
        w = randn(out_f, in_f, scale=scale)
        if not quantize:
            tensors[f"{key}.weight"] = w.half().cpu()
            return
        order = torch.rand(in_f, generator=g, device=device) + 0.1  # a random act-order permutation
        for name, t in rtn(w, make_groups(mix, in_f), order).tensors().items():
            tensors[f"{key}.{name}"] = t

    tensors["model.embed_tokens.weight"] = randn(vocab, h, scale=0.02).half().cpu()
    tensors["model.norm.weight"] = (1 + randn(h, scale=0.1)).half().cpu()
    i = 0
    for layer in tqdm(range(cfg["num_hidden_layers"]), desc=f"random {shape}", unit="layer", disable=not progress):
        p = f"model.layers.{layer}"
        for key, out_f, in_f in (("self_attn.q_proj", h, h), ("self_attn.k_proj", kv, h), ("self_attn.v_proj", kv, h),
                                 ("self_attn.o_proj", h, h), ("mlp.gate_proj", inter, h), ("mlp.up_proj", inter, h),
                                 ("mlp.down_proj", h, inter)):
            linear(f"{p}.{key}", out_f, in_f, layer_mixes[i % len(layer_mixes)], in_f ** -0.5)
            i += 1
        for key, n in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
            tensors[f"{p}.self_attn.{key}.bias"] = randn(n, scale=0.02).half().cpu()
        tensors[f"{p}.input_layernorm.weight"] = (1 + randn(h, scale=0.1)).half().cpu()
        tensors[f"{p}.post_attention_layernorm.weight"] = (1 + randn(h, scale=0.1)).half().cpu()
    linear("lm_head", vocab, h, head_mix, h ** -0.5)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(word_tokenizer(vocab))
    quant = {"quant_method": "exl2", "bits": bits, "head_bits": head_bits,
             "calibration": {"dataset": "(random weights)"}} if quantize else None
    write_model_dir(out, out, cfg, tensors, quant)
    return out


def parse_model_name(name: str) -> tuple[str, str]:
    """(shape, form) of a random model's name: a shape ("0.5b": EXL2 about 4.0 bpw) or a shape
    with a form of FORMS ("0.5b-8bpw": EXL2 8.0 bpw; "0.5b-fp16": dense fp16 weights)."""
    shape, dash, form = name.partition("-")
    if shape not in SHAPES or (dash and form not in FORMS):
        raise ValueError(f"unknown model {name!r}: one of {', '.join(SHAPES)}, each optionally with "
                         f"{' or '.join('-' + f for f in FORMS)}")
    return shape, form or "4bpw"


def random_model(out: str | Path, name: str, **kw) -> Path:
    """The random model `name` names (parse_model_name), written to `out`."""
    shape, form = parse_model_name(name)
    return _random_model(out, shape, form=form, **kw)


def step_bytes(path: str | Path) -> int:
    """Bytes a decode step reads from the weights: every tensor but the embedding table (one row of it)."""
    from safetensors import safe_open

    total = 0
    for f in Path(path).glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                if name != "model.embed_tokens.weight":
                    t = st.get_slice(name)
                    n = 1
                    for s in t.get_shape():
                        n *= s
                    total += n * {"I32": 4, "F16": 2, "I16": 2, "F32": 4}.get(t.get_dtype(), 2)
    return total

