"""Model configuration: the parts of a HF `config.json` the engine needs, per architecture."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ModelError(ValueError):
    """A model directory the engine cannot load, with a message that says why."""


@dataclass(frozen=True)
class Family:
    """What distinguishes one architecture family from another (behaviour as data)."""
    norm: str  # "rms" or "layer"
    mlp: str  # "gated" (gate/up/down) or "plain" (c_fc/c_proj)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False


FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family(norm="rms", mlp="gated"),
    "MistralForCausalLM": Family(norm="rms", mlp="gated"),
    "Qwen2ForCausalLM": Family(norm="rms", mlp="gated", qkv_bias=True),
    "Qwen3ForCausalLM": Family(norm="rms", mlp="gated", qk_norm=True),
    "Starcoder2ForCausalLM": Family(norm="layer", mlp="plain", qkv_bias=True, o_bias=True, mlp_bias=True),
}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    family: Family
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    hidden_act: str
    max_position_embeddings: int
    tie_word_embeddings: bool
    sliding_window: int | None
    rope: dict[str, Any] = field(default_factory=dict)  # rope_theta, rope_type and its parameters
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    quantization: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in FAMILIES:
            raise ModelError(
                f"unsupported architecture {arch!r}; kodkod supports {', '.join(sorted(FAMILIES))}"
            )
        fam = FAMILIES[arch]
        # Config fields that change the family's defaults.
        if arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen3ForCausalLM"):
            bias = bool(cfg.get("attention_bias", False))
            fam = Family(fam.norm, fam.mlp, qkv_bias=bias, o_bias=bias,
                         mlp_bias=bool(cfg.get("mlp_bias", False)), qk_norm=fam.qk_norm)
        if arch == "Starcoder2ForCausalLM" and not cfg.get("use_bias", True):
            fam = Family(fam.norm, fam.mlp)
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            layers = int(cfg["num_hidden_layers"])
            vocab = int(cfg["vocab_size"])
            inter = int(cfg["intermediate_size"])
        except KeyError as exc:
            raise ModelError(f"config.json lacks {exc.args[0]!r}") from None
        eps = cfg.get("rms_norm_eps", cfg.get("norm_epsilon", cfg.get("layer_norm_eps", 1e-6)))
        window = cfg.get("sliding_window")
        if cfg.get("use_sliding_window") is False:
            window = None
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            architecture=arch,
            family=fam,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            norm_eps=float(eps),
            hidden_act=cfg.get("hidden_act") or cfg.get("hidden_activation") or "silu",
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", arch == "Starcoder2ForCausalLM")),
            sliding_window=int(window) if window else None,
            rope=rope_settings(cfg),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            quantization=cfg.get("quantization_config"),
            raw=cfg,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        p = Path(path) / "config.json"
        if not p.is_file():
            raise ModelError(f"{path}: no config.json; is this a model directory?")
        try:
            cfg = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise ModelError(f"{p}: not valid JSON ({exc})") from None
        return cls.from_dict(cfg)


def rope_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """Merge RoPE settings from wherever the config keeps them into one dict.

    Old configs: top-level `rope_theta` and `rope_scaling`; newer transformers:
    `rope_parameters` holding both. The result always has `rope_theta` and `rope_type`.
    """
    params: dict[str, Any] = {}
    scaling = cfg.get("rope_scaling") or {}
    params.update(scaling)
    params.update(cfg.get("rope_parameters") or {})
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    params["rope_type"] = rope_type
    params.pop("type", None)
    params.setdefault("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    known = ("default", "linear", "dynamic", "yarn", "llama3")
    if rope_type not in known:
        raise ModelError(f"unsupported rope type {rope_type!r}; kodkod supports {', '.join(known)}")
    return params
