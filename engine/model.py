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

    _ext = None  # the kernels (engine.decode.prepare_fast_path): rows of fp16 on the GPU in one launch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._ext is not None and x.is_cuda and x.dim() == 2 and x.dtype == torch.float16:
            out = torch.empty_like(x)
            self._ext.rms_norm_rows(x.contiguous(), self.weight, out, self.eps)
            return out
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

    _ext = None  # the kernels (engine.decode.prepare_fast_path): RoPE and the cache write in one launch

    def forward(self, x, cos, sin, positions, cache: KVCache | None = None, layer: int = 0,
                start: int | None = None, keys: int | None = None, mask: torch.Tensor | None = None):
        """With a cache: `start` (a host int) writes positions start.. and attends to what is cached;
        start=None is the static step: positions live on the device, the cache is written at them
        and the cache is attended to under a mask (no host reads, graph-safe): its first `keys`
        rows (every position written so far lies below), else all of it. `mask`: which keys each
        query sees (Transformer.forward builds it once for all layers); None: the keys are exactly
        the queries' positions, plain causal attention."""
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.heads, self.head_dim)
        k = self.k_proj(x).view(t, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = self._rotate_and_store(q, k, v, cos, sin, positions, cache, layer, start)
        if keys is not None:
            k, v = k[:keys], v[:keys]
        gqa = self.heads != self.kv_heads
        # On the CPU, repeated heads let SDPA pick its fused kernels; on a GPU they take the KV heads
        # as they are (a continued prompt over 2,048 keys: 43 us a layer against 54 with the repeat)
        if gqa and t > 1 and not x.is_cuda:
            k = k.repeat_interleave(self.heads // self.kv_heads, 1)
            v = v.repeat_interleave(self.heads // self.kv_heads, 1)
            gqa = False
        # [1, heads, T, d]: SDPA's fused kernels take batched 4-D inputs only
        q, k, v = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        # One query on the CPU in bf16: SDPA in fp32 (one token over 1,500 keys, 14 heads over 2: 169 us
        # with the upcasts against 1,128 in bf16); several (a verify pass) stay in bf16, faster there
        upcast = t == 1 and not x.is_cuda and q.dtype != torch.float32
        if upcast:
            q, k, v = q.float(), k.float(), v.float()
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        if upcast:
            out = out.to(x.dtype)
        return self.o_proj(out[0].transpose(0, 1).reshape(t, self.heads * self.head_dim))

    def _rotate_and_store(self, q, k, v, cos, sin, positions, cache: KVCache | None, layer: int,
                          start: int | None):
        """RoPE on q and k; with a cache, k and v written into it. Returns q and the keys and values
        attention reads (with a cache, its rows up to the last one written, or all of them in the
        static step)."""
        t = q.shape[0]
        if cache is not None and self._ext is not None and q.is_cuda:  # one kernel for all of it
            if start is not None:
                cache.check_fits(start + t)
            q = q.contiguous()
            self._ext.rope_write(q, k.contiguous(), v.contiguous(), cos, sin, positions, cache.k[layer], cache.v[layer])
            end = cache.max_len if start is None else start + t
            return q, cache.k[layer, :end], cache.v[layer, :end]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            return q, k, v
        if start is not None:
            return (q, *cache.write(layer, start, k, v))  # all keys/values up to the last new position
        return (q, *cache.write_at(layer, positions, k, v))


def attention_mask(key_pos: torch.Tensor, positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """Causal (and sliding-window) mask [queries, keys]: the query at p sees keys at p - window < kp <= p."""
    mask = key_pos.unsqueeze(0) <= positions.unsqueeze(1)
    if window:
        mask &= key_pos.unsqueeze(0) > positions.unsqueeze(1) - window
    return mask


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

    def forward(self, x, positions, cache: KVCache | None = None, cos_sin=None, start: int | None = None,
                keys: int | None = None, mask: torch.Tensor | None = None):
        cos, sin = cos_sin if cos_sin is not None else self._rope(positions)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, cache, self.index, start, keys, mask)
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
                last_index: torch.Tensor | None = None, graph_safe: bool = False,
                keys: int | None = None) -> torch.Tensor:
        """ids, positions [T] -> logits [T or 1, vocab] in fp32.

        With a cache, `start` is the first position as a host int; without it
        the step is static (see Attention.forward; `keys`: attend to the cache's
        first rows only). Static steps, and any with graph_safe=True, only look
        up rope rows already built (Rope.ensure)."""
        x = self.embed_tokens[ids]
        static = graph_safe or (cache is not None and start is None)
        cos_sin = self.rope.at(positions) if static else self.rope(positions)
        # One mask for every layer; none where the keys are exactly the queries' positions
        # (no cache, or a prompt from position 0) and no window: plain causal attention.
        mask, window = None, self.config.sliding_window
        if window or (cache is not None and start != 0):
            if cache is None:
                key_pos = positions
            else:
                key_pos = cache.positions[:keys] if start is None else cache.positions[:start + ids.shape[0]]
            mask = attention_mask(key_pos, positions, window)
        for layer in self.layers:
            x = layer(x, positions, cache, cos_sin, start, keys, mask)
        if last_index is not None:  # the row of the last real token of a padded prompt, on the device
            x = x.index_select(0, last_index)
        elif last_only:
            x = x[-1:]
        return self.lm_head(self.norm(x)).float()
