"""The number format a model computes in: fp16 on a GPU; on the CPU fp32, or bf16 where the CPU
multiplies bf16 natively (AVX512-BF16 or AMX-BF16: AMD Zen 4, Intel Cooper Lake, Sapphire Rapids
and later). Elsewhere torch emulates bf16 products, slower than fp32's."""
from __future__ import annotations

import torch

NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHOICES = ("auto", *NAMES)


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """None: the reference formats (fp16 on a GPU, fp32 on the CPU; what the tests compare against).
    "auto": fp16 on a GPU; on the CPU bf16 where it is native (cpu_has_bf16), else fp32. A name of
    NAMES, or a torch dtype: that format."""
    if isinstance(dtype, torch.dtype):
        return dtype
    cuda = device.type == "cuda"
    if dtype is None:
        return torch.float16 if cuda else torch.float32
    if dtype == "auto":
        if cuda:
            return torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if dtype in NAMES:
        return NAMES[dtype]
    raise ValueError(f"dtype must be one of {', '.join(CHOICES)}, not {dtype!r}")


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware. On the 2-core AMD EPYC (Zen 4) here, the 0.5B
    model in bf16 against fp32: decode 1.8-2.0x faster, prompts 1.7-1.9x, the same pass@1 within
    noise (docs/performance.md, "The CPU's number format")."""
    caps = getattr(torch.cpu, "get_capabilities", dict)()
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
