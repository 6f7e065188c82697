"""Reading a model directory: safetensors shards (EXL2 or plain HF) into the reference Transformer."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from . import exl2
from .config import ModelConfig, ModelError
from .linear import EXL2Linear, Linear
from .model import ACTIVATIONS, Attention, Block, GatedMLP, LayerNorm, PlainMLP, RMSNorm, Transformer
from .rope import Rope


class TensorStore:
    """Every tensor of a model directory by name, read lazily from its shard."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors") if p.name != "golden.safetensors")
        if not files:
            raise ModelError(f"{self.path}: no *.safetensors files")
        self._where: dict[str, str] = {}
        self._handles = {}
        for f in files:
            fp = self.path / f
            if not fp.is_file():
                raise ModelError(f"{self.path}: shard {f} named in the index is missing")
            try:
                h = safe_open(str(fp), framework="pt")
            except Exception as exc:
                raise ModelError(f"{fp}: not a readable safetensors file ({exc})") from None
            self._handles[f] = h
            for name in h.keys():
                self._where[name] = f

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise ModelError(f"{self.path}: tensor {name!r} is missing")
        return self._handles[self._where[name]].get_tensor(name)

    def is_quantized(self) -> bool:
        return any(n.endswith(".q_weight") for n in self._where)


def load_linear(store: TensorStore, key: str, out_features: int, in_features: int, bias: bool,
                device, dtype) -> Linear | EXL2Linear:
    """A linear layer, quantized (EXL2, kept packed) or dense, checked against the shape the config implies."""
    b = None
    if bias or f"{key}.bias" in store:
        b = store.get(f"{key}.bias").to(device, dtype)[:out_features]
    if f"{key}.q_weight" in store:
        q = {s: store.get(f"{key}.{s}").to(device) for s in exl2.SUFFIXES}
        try:
            return EXL2Linear(q, out_features, in_features, b, dtype)
        except exl2.EXL2FormatError as exc:
            raise ModelError(f"{key}: {exc}") from None
    w = store.get(f"{key}.weight").to(device)
    if tuple(w.shape) != (out_features, in_features):
        raise ModelError(f"{key}: weight shape {tuple(w.shape)}, config implies {(out_features, in_features)}")
    return Linear(w.to(dtype), b)


def _norm(store: TensorStore, key: str, cfg: ModelConfig, device, dtype):
    w = store.get(f"{key}.weight").to(device, dtype)
    if cfg.family.norm == "layer":
        return LayerNorm(w, store.get(f"{key}.bias").to(device, dtype), cfg.norm_eps)
    return RMSNorm(w, cfg.norm_eps)


def build_transformer(store: TensorStore, cfg: ModelConfig, device, dtype, progress: bool = False) -> Transformer:
    from tqdm import tqdm

    path = store.path
    fam, h, hd = cfg.family, cfg.hidden_size, cfg.head_dim
    act = ACTIVATIONS.get(cfg.hidden_act)
    if act is None:
        raise ModelError(f"unsupported activation {cfg.hidden_act!r}; known: {', '.join(ACTIVATIONS)}")

    def lin(key, out_f, in_f, bias):
        return load_linear(store, key, out_f, in_f, bias, device, dtype)

    rope = Rope(cfg.rope, hd, cfg.max_position_embeddings, device, dtype)
    layers = []
    for i in tqdm(range(cfg.num_layers), desc=f"loading {Path(path).name}", unit="layer", disable=not progress):
        p = f"model.layers.{i}"
        a = f"{p}.self_attn"
        q_norm = k_norm = None
        if fam.qk_norm:
            q_norm = RMSNorm(store.get(f"{a}.q_norm.weight").to(device, dtype), cfg.norm_eps)
            k_norm = RMSNorm(store.get(f"{a}.k_norm.weight").to(device, dtype), cfg.norm_eps)
        attn = Attention(
            cfg,
            lin(f"{a}.q_proj", cfg.num_heads * hd, h, fam.qkv_bias),
            lin(f"{a}.k_proj", cfg.num_kv_heads * hd, h, fam.qkv_bias),
            lin(f"{a}.v_proj", cfg.num_kv_heads * hd, h, fam.qkv_bias),
            lin(f"{a}.o_proj", h, cfg.num_heads * hd, fam.o_bias),
            q_norm, k_norm,
        )
        m, inter = f"{p}.mlp", cfg.intermediate_size
        if fam.mlp == "gated":
            mlp = GatedMLP(lin(f"{m}.gate_proj", inter, h, fam.mlp_bias), lin(f"{m}.up_proj", inter, h, fam.mlp_bias),
                           lin(f"{m}.down_proj", h, inter, fam.mlp_bias), act)
        else:
            mlp = PlainMLP(lin(f"{m}.c_fc", inter, h, fam.mlp_bias), lin(f"{m}.c_proj", h, inter, fam.mlp_bias), act)
        layers.append(Block(i, _norm(store, f"{p}.input_layernorm", cfg, device, dtype), attn,
                            _norm(store, f"{p}.post_attention_layernorm", cfg, device, dtype), mlp, rope))
    embed = store.get("model.embed_tokens.weight").to(device, dtype)
    if tuple(embed.shape) != (cfg.vocab_size, h):
        raise ModelError(f"embedding shape {tuple(embed.shape)}, config implies {(cfg.vocab_size, h)}")
    if "lm_head.q_weight" in store or "lm_head.weight" in store:
        head = lin("lm_head", cfg.vocab_size, h, False)
    elif cfg.tie_word_embeddings:
        head = Linear(embed)
    else:
        raise ModelError(f"{path}: no lm_head and the config does not tie it to the embedding")
    return Transformer(cfg, embed, layers, _norm(store, "model.norm", cfg, device, dtype), head, rope)
