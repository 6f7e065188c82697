"""The reference transformer in plain PyTorch: batch 1, shapes [T, hidden].

One module tree serves every supported family; `engine.config.Family` says
which norm, which MLP and which biases a model has.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kv_cache import KVCache
from .linear import EXL2Linear, Linear  # noqa: F401  (re-exported: the converter's dense layers)
from .rope import Rope, apply_rope

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class LayerNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, q_proj, k_proj, v_proj, o_proj, q_norm=None, k_norm=None):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.q_norm, self.k_norm = q_norm, k_norm
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.window = cfg.sliding_window

    def forward(self, x, cos, sin, positions, cache: KVCache | None = None, layer: int = 0,
                start: int | None = None):
        """With a cache: `start` (a host int) writes positions start.. and attends to what is cached;
        start=None is the static decode step: positions live on the device, the cache is written
        at them and the whole cache is attended to under a mask (no host reads, graph-safe)."""
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.heads, self.head_dim)
        k = self.k_proj(x).view(t, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            key_pos = positions
        elif start is not None:
            k, v = cache.write(layer, start, k, v)  # all keys/values up to the last new position
            key_pos = torch.arange(k.shape[0], device=x.device)
        else:
            k, v = cache.write_at(layer, positions, k, v)
            key_pos = cache.positions
        gqa = self.heads != self.kv_heads
        if gqa and t > 1:  # repeated heads let SDPA pick its fused kernels (flash, memory-efficient)
            k = k.repeat_interleave(self.heads // self.kv_heads, 1)
            v = v.repeat_interleave(self.heads // self.kv_heads, 1)
            gqa = False
        # [1, heads, T, d]: SDPA's fused kernels take batched 4-D inputs only
        q, k, v = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        if not self.window and (cache is None or start == 0):
            # keys are exactly the queries' positions: plain causal attention
            out = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=gqa)
        else:
            # Causal (and sliding-window) mask: query at p sees keys at p - window < kp <= p.
            mask = key_pos.unsqueeze(0) <= positions.unsqueeze(1)
            if self.window:
                mask &= key_pos.unsqueeze(0) > positions.unsqueeze(1) - self.window
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(out[0].transpose(0, 1).reshape(t, self.heads * self.head_dim))


class GatedMLP(nn.Module):
    def __init__(self, gate_proj, up_proj, down_proj, act):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act = gate_proj, up_proj, down_proj, act

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class PlainMLP(nn.Module):
    def __init__(self, c_fc, c_proj, act):
        super().__init__()
        self.c_fc, self.c_proj, self.act = c_fc, c_proj, act

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, index: int, input_layernorm, self_attn, post_attention_layernorm, mlp, rope: Rope):
        super().__init__()
        self.index = index
        self.input_layernorm, self.self_attn = input_layernorm, self_attn
        self.post_attention_layernorm, self.mlp = post_attention_layernorm, mlp
        self._rope = rope  # shared, not a submodule

    def forward(self, x, positions, cache: KVCache | None = None, cos_sin=None, start: int | None = None):
        cos, sin = cos_sin if cos_sin is not None else self._rope(positions)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, cache, self.index, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, embed_tokens: torch.Tensor, layers: list[Block], norm, lm_head: Linear,
                 rope: Rope):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Parameter(embed_tokens, requires_grad=False)
        self.layers = nn.ModuleList(layers)
        self.norm, self.lm_head = norm, lm_head
        self.rope = rope

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None,
                last_only: bool = False, start: int | None = None,
                last_index: torch.Tensor | None = None, graph_safe: bool = False) -> torch.Tensor:
        """ids, positions [T] -> logits [T or 1, vocab] in fp32.

        With a cache, `start` is the first position as a host int; without it
        the step is static (see Attention.forward). Static steps, and any with
        graph_safe=True, only look up rope rows already built (Rope.ensure)."""
        x = self.embed_tokens[ids]
        static = graph_safe or (cache is not None and start is None)
        cos_sin = self.rope.at(positions) if static else self.rope(positions)
        for layer in self.layers:
            x = layer(x, positions, cache, cos_sin, start)
        if last_index is not None:  # the row of the last real token of a padded prompt, on the device
            x = x.index_select(0, last_index)
        elif last_only:
            x = x[-1:]
        return self.lm_head(self.norm(x)).float()
