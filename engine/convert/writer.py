"""Writing (and checking) an EXL2 model directory as ../../docs (exl2-format.md) says."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .. import exl2

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


def split_shards(items, shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """(name, tensor) pairs, in order, cut into shards of at most `shard_bytes` (one tensor may exceed it)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in items:
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def write_model_dir(out: Path, src: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                    quantization_config: dict[str, Any], shard_bytes: int = 8 << 30) -> list[Path]:
    """Write config.json (with quantization_config), tokenizer files and output-0000N-of-0000M shards."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("output*.safetensors"):
        old.unlink()
    shards = split_shards(((name, tensors[name]) for name in sorted(tensors)), shard_bytes)
    paths = []
    for i, shard in enumerate(shards):
        p = out / f"output-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _atomic_save(shard, p)
        paths.append(p)
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and src.resolve() != out.resolve():
            shutil.copyfile(src / name, out / name)
    cfg = dict(config)
    cfg["quantization_config"] = quantization_config
    cfg["torch_dtype"] = "float16"
    cfg.pop("dtype", None)
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(cfg, indent=2))
    os.replace(tmp, out / "config.json")
    return paths


def validate(path: str | Path) -> dict[str, Any]:
    """Check every rule of the format on a model directory; returns a summary, raises EXL2FormatError."""
    from safetensors import safe_open

    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise exl2.EXL2FormatError(f"{path}: no safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                tensors[k] = h.get_tensor(k)
    keys = sorted({k[: -len(".q_weight")] for k in tensors if k.endswith(".q_weight")})
    if "lm_head" not in keys:
        raise exl2.EXL2FormatError("lm_head is not quantized")
    total_bits, total_w, widths = 0, 0, set()
    for key in keys:
        t = {s: tensors[f"{key}.{s}"] for s in exl2.SUFFIXES}
        dtypes = {"q_weight": torch.int32, "q_invperm": torch.int32, "q_scale": torch.int32,
                  "q_scale_max": torch.float16, "q_groups": torch.int16}
        for s, dt in dtypes.items():
            if t[s].dtype != dt:
                raise exl2.EXL2FormatError(f"{key}.{s}: dtype {t[s].dtype}, expected {dt}")
        k, n = t["q_invperm"].numel(), t["q_weight"].shape[1]
        if n % 32:
            raise exl2.EXL2FormatError(f"{key}: {n} columns")
        if not torch.equal(torch.sort(t["q_invperm"].long()).values, torch.arange(k)):
            raise exl2.EXL2FormatError(f"{key}: q_invperm is not a permutation")
        groups = exl2.parse_groups(t["q_groups"], t["q_weight"].shape[0], k)  # order, sizes, coverage
        starts = t["q_groups"].long()[1::2].tolist()
        row = 0
        for i, g in enumerate(groups):
            if starts[i] != row:
                raise exl2.EXL2FormatError(f"{key}: group {i} starts at packed row {starts[i]}, expected {row}")
            if i + 1 < len(groups) and g.rows % 32:
                raise exl2.EXL2FormatError(f"{key}: group {i} has {g.rows} rows, not a multiple of 32")
            row += -(-g.rows * g.bits // 32)
        if row != t["q_weight"].shape[0]:
            raise exl2.EXL2FormatError(f"{key}: {t['q_weight'].shape[0]} packed rows, groups need {row}")
        if t["q_scale"].shape != (len(groups), n // 8):
            raise exl2.EXL2FormatError(f"{key}: q_scale shape {tuple(t['q_scale'].shape)}")
        sm = t["q_scale_max"].float()
        if not torch.isfinite(sm).all() or (sm <= 0).any():
            raise exl2.EXL2FormatError(f"{key}: q_scale_max must be finite and > 0")
        codes = exl2.unpack(t["q_weight"], groups)  # checks packing units
        if (codes < 0).any():
            raise exl2.EXL2FormatError(f"{key}: negative codes")
        widths |= {g.bits for g in groups}
        total_bits += t["q_weight"].numel() * 32 + t["q_scale"].numel() * 32
        total_w += k * n
    for name, tt in tensors.items():
        if not any(name.startswith(k + ".q_") for k in keys) and tt.is_floating_point() and tt.dtype != torch.float16:
            raise exl2.EXL2FormatError(f"{name}: stored as {tt.dtype}, expected float16")
    q = cfg.get("quantization_config") or {}
    return {"layers": len(keys), "bit_widths": sorted(widths), "bpw": total_bits / max(total_w, 1),
            "quantization_config": q}
