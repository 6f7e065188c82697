"""GGUF file -> Hugging Face model directory (config.json, tokenizer.json, safetensors).

The `gguf` package reads the file and dequantises every tensor with numpy. Tensor
names map one-to-one from llama.cpp's names onto the HF names; for llama-arch
models llama.cpp permuted the rows of Q and K for its RoPE layout, which is
undone here (qwen2 keeps the HF layout). The tokenizer (byte-level BPE) is
rebuilt from `tokenizer.ggml.tokens` / `merges` / `token_type`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

SUPPORTED_ARCHS = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}

# Pre-tokenizer split patterns by `tokenizer.ggml.pre` (the same regexes as the HF tokenizers).
PRE_PATTERNS = {
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "llama3": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
# token_type values (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte
_CONTROL, _USER = 3, 4


class GGUFImportError(ValueError):
    """A GGUF file kodkod cannot import, with the reason."""


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception:  # pragma: no cover - odd field types
        return default


def hf_name(name: str) -> str | None:
    """llama.cpp tensor name -> HF name (None for tensors HF does not have, like rope_freqs)."""
    fixed = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    if name in fixed:
        return fixed[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if not m:
        return None
    i, part, kind = m.groups()
    parts = {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    if part not in parts:
        return None
    return f"model.layers.{i}.{parts[part]}.{kind}"


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (its `permute` in convert_hf_to_gguf.py)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def build_config(reader) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise GGUFImportError(
            f"unsupported GGUF architecture {arch!r}; kodkod imports {', '.join(sorted(SUPPORTED_ARCHS))}"
        )
    a = arch
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = len(tokens.data) if tokens is not None else None
    emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if emb is not None:
        vocab = int(emb.shape[1])
    hidden = int(_field(reader, f"{a}.embedding_length"))
    heads = int(_field(reader, f"{a}.attention.head_count"))
    kv = int(_field(reader, f"{a}.attention.head_count_kv", heads))
    head_dim = int(_field(reader, f"{a}.attention.key_length", hidden // heads))
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    cfg: dict[str, Any] = {
        "architectures": [SUPPORTED_ARCHS[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, f"{a}.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, f"{a}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(_field(reader, f"{a}.context_length", 4096)),
        "rms_norm_eps": float(_field(reader, f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_field(reader, f"{a}.rope.freq_base", 10000.0)),
        "vocab_size": vocab,
        "tie_word_embeddings": not has_output,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
        "torch_dtype": "float32",
    }
    if arch == "qwen2":
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg["num_hidden_layers"])
    if arch == "llama":
        cfg.update(attention_bias=any(t.name.endswith("attn_q.bias") for t in reader.tensors), mlp_bias=False)
        stype = _field(reader, f"{a}.rope.scaling.type")
        if stype in ("linear", "yarn"):
            cfg["rope_scaling"] = {"type": stype, "factor": float(_field(reader, f"{a}.rope.scaling.factor", 1.0))}
    return cfg


def build_tokenizer(reader) -> tuple[str, list[int]]:
    """tokenizer.json text rebuilt from the GGUF vocabulary, and the end-of-text ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFImportError(
            f"unsupported GGUF tokenizer model {kind!r}; kodkod rebuilds byte-level BPE ('gpt2') tokenizers only"
        )
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    tf = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(tf.parts[i]).decode("utf-8") for i in tf.data]
    mf = reader.fields.get("tokenizer.ggml.merges")
    merges = [tuple(bytes(mf.parts[i]).decode("utf-8").split(" ", 1)) for i in mf.data] if mf else []
    tt = reader.fields.get("tokenizer.ggml.token_type")
    types = [int(tt.parts[i][0]) for i in tt.data] if tt else [1] * len(tokens)

    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pattern = PRE_PATTERNS.get(pre)
    if pre == "qwen2":
        tok.normalizer = normalizers.NFC()
    if pattern is not None:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ])
    else:  # GPT-2's own regex
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    added = [
        AddedToken(tokens[i], special=True, normalized=False)
        for i, t in enumerate(types) if t in (_CONTROL, _USER)
    ]
    tok.add_special_tokens(added)
    eos = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        v = _field(reader, key)
        if v is not None:
            eos.append(int(v))
    eot = vocab.get("<|endoftext|>")
    if eot is not None and types[eot] == _CONTROL:
        eos.append(eot)
    return tok.to_str(), list(dict.fromkeys(eos))


def import_gguf(
    path: str | Path,
    out_dir: str | Path,
    dtype: str = "float32",
    shard_bytes: int = 2 << 30,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Dequantise a GGUF file into a HF model directory. Returns the directory."""
    import gguf
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    from .writer import split_shards

    path, out = Path(path), Path(out_dir)
    if not path.is_file():
        raise GGUFImportError(f"{path}: no such file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:
        raise GGUFImportError(f"{path}: not a readable GGUF file ({exc})") from None
    cfg = build_config(reader)
    tok_json, eos = build_tokenizer(reader)
    tdtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    cfg["torch_dtype"] = dtype
    if eos:
        cfg["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    out.mkdir(parents=True, exist_ok=True)

    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def hf_tensors():
        for t in tqdm(reader.tensors, desc="import-gguf", unit="tensor", disable=not progress):
            name = hf_name(t.name)
            if name is None:
                continue
            w = gguf.quants.dequantize(t.data, t.tensor_type)
            w = np.asarray(w, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
            if cfg["model_type"] == "llama":
                if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
                    w = _unpermute(w, heads)
                elif name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
                    w = _unpermute(w, kv)
            yield name, torch.from_numpy(np.array(w, dtype=np.float32, copy=True)).to(tdtype)

    shards = split_shards(hf_tensors(), shard_bytes)

    for old in out.glob("model*.safetensors"):
        old.unlink()
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
        )
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "tokenizer.json").write_text(tok_json)
    tokens_f = reader.fields["tokenizer.ggml.tokens"]
    names = [bytes(tokens_f.parts[i]).decode("utf-8") for i in tokens_f.data]
    tok_cfg: dict[str, Any] = {"add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False))}
    if eos:
        tok_cfg["eos_token"] = names[eos[0]]
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    if pad is not None:
        tok_cfg["pad_token"] = names[int(pad)]
    tmpl = _field(reader, "tokenizer.chat_template")
    if tmpl:
        tok_cfg["chat_template"] = tmpl
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    gen = {"eos_token_id": eos, "bos_token_id": cfg["bos_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    log(f"imported {path.name} ({cfg['architectures'][0]}, {cfg['num_hidden_layers']} layers) -> {out}")
    return out
