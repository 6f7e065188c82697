"""Prefill and the one-token decode step, on the torch path or on the CUDA kernels.

Both decoders share one contract: `prefill(ids, start)` runs the prompt and
draws the first token into `sampler.token`; `decode()` feeds that token at
`pos`, writes its keys/values into the static cache, and draws the next one.
Everything a decode step reads or writes lives in fixed device buffers (the
token, the position, the cache, the sampler's state), so on a GPU the whole
step is captured once as a CUDA graph and replayed per token; the host only
reads the token id. Graphs are captured per sampler variant (plain draw, or
with filters) on first use.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import kernels
from .kv_cache import KVCache
from .linear import DequantScratch, EXL2Linear, Linear
from .model import Attention, GatedMLP, LayerNorm, RMSNorm, Transformer
from .sampling import Sampler


PREFILL_BUCKETS = (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
# A continued prompt attends to the cache's first rows only, as many as a key bucket holds (the
# smallest one past its last position; the cache's length is the last bucket): attention and its
# mask cost what the prompt's length needs, not what the whole cache would.
KEY_BUCKETS = (512, 1024, 2048, 4096, 8192, 16384)


class Decoder:
    """The shared part: prefill (bucketed CUDA graphs on a GPU, eager on the CPU), graph capture of `_step`."""

    pos_dtype = torch.int64

    def __init__(self, model: Transformer, cache: KVCache, sampler: Sampler, use_graphs: bool):
        self.model, self.cache, self.sampler = model, cache, sampler
        self.device = sampler.device
        self.pos = torch.zeros(1, dtype=self.pos_dtype, device=self.device)
        self.host_pos = 0
        self.use_graphs = use_graphs
        self._graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        self._prefill_graphs: dict[tuple[int, int | None], torch.cuda.CUDAGraph] = {}
        if use_graphs:
            model.rope.ensure(cache.max_len)  # graph-safe steps only look rows up
            self.buckets = tuple(b for b in PREFILL_BUCKETS if b <= cache.max_len)
            self.key_buckets = tuple(b for b in KEY_BUCKETS if b < cache.max_len) + (cache.max_len,)
            n = max(self.buckets, default=0)
            self._pf_ids = torch.zeros(n, dtype=torch.int64, device=self.device)
            self._pf_pos = torch.zeros(n, dtype=torch.int64, device=self.device)
            self._pf_last = torch.zeros(1, dtype=torch.int64, device=self.device)
            self._pf_logits = torch.zeros(model.config.vocab_size, device=self.device)
            self._pool = torch.cuda.graph_pool_handle()

    @torch.inference_mode()
    def prefill(self, ids, start: int) -> None:
        """ids: the tokens after `start` (a list or an int64 array)."""
        bucket = next((b for b in getattr(self, "buckets", ()) if b >= len(ids)), None)
        if bucket is None:  # the CPU, or a prompt longer than every bucket
            t = torch.as_tensor(ids, device=self.device)
            positions = torch.arange(start, start + len(ids), device=self.device)
            logits = self.model(t, positions, self.cache, last_only=True, start=start)[0]
        else:
            # keys None: nothing cached before the prompt, plain causal attention (flash kernels)
            keys = None if start == 0 else self._key_bucket(start + bucket)
            self._set_prefill_inputs(ids, start, bucket)
            graph = self._prefill_graphs.get((bucket, keys))
            if graph is None:
                graph = self._capture(lambda: self._prefill_body(bucket, keys))
                self._prefill_graphs[(bucket, keys)] = graph
                self._set_prefill_inputs(ids, start, bucket)
            graph.replay()
            logits = self._pf_logits
        self.pos.fill_(start + len(ids) - 1)  # the draw advances it to the next free position
        self.host_pos = start + len(ids)
        self.sampler(logits, self.pos)

    def _set_prefill_inputs(self, ids, start: int, bucket: int) -> None:
        """Prompt padded to the bucket; padding sits at later positions (their cache rows are rewritten
        before anything reads them) and never past the cache's last row."""
        padded = np.zeros(bucket, dtype=np.int64)
        padded[:len(ids)] = ids  # through numpy: a list of 1,500 ints takes 0.03 ms, not torch.tensor's 0.18
        self._pf_ids[:bucket].copy_(torch.from_numpy(padded), non_blocking=True)
        self._pf_pos[:bucket].copy_(torch.arange(start, start + bucket).clamp(max=self.cache.max_len - 1),
                                    non_blocking=True)
        self._pf_last.fill_(len(ids) - 1)

    def _key_bucket(self, end: int) -> int:
        return next(k for k in self.key_buckets if k >= min(end, self.cache.max_len))

    def _prefill_body(self, bucket: int, keys: int | None) -> None:
        """A fresh prompt (keys None) writes cache rows [0, bucket) and attends causally among its
        own tokens; a continued one writes at its device positions and attends to the cache's first
        `keys` rows under a mask."""
        logits = self.model(self._pf_ids[:bucket], self._pf_pos[:bucket], self.cache, start=0 if keys is None else None,
                            last_index=self._pf_last, graph_safe=True, keys=keys)[0]
        self._pf_logits.copy_(logits)

    def warm_up_prefill(self) -> None:
        """Capture every prefill bucket now: fresh, and continued with each key bucket it can meet."""
        for b in getattr(self, "buckets", ()):
            for keys in (None, *(k for k in self.key_buckets if k > b or k == self.cache.max_len)):
                if (b, keys) not in self._prefill_graphs:
                    self._set_prefill_inputs([0], 0, b)
                    with torch.inference_mode():
                        self._prefill_graphs[(b, keys)] = self._capture(lambda b=b, k=keys: self._prefill_body(b, k))

    @torch.inference_mode()
    def decode(self) -> None:
        if not self.use_graphs:
            self._step()
        else:
            graph = self._graphs.get(self.sampler.filtered)
            if graph is None:
                graph = self._graphs[self.sampler.filtered] = self._capture()
            graph.replay()
        self.host_pos += 1

    @torch.inference_mode()
    def verify(self, tokens: list[int]) -> torch.Tensor:
        """Logits [T, vocab] of `tokens` fed at positions host_pos.. in one forward pass, their
        keys/values written into the cache: the speculative step. tokens[0] is the token the last
        draw made (what decode() would feed), the rest a draft. Rows of draft tokens that `accept`
        rejects stay in the cache until later writes at those positions replace them; nothing
        reads them before (attention masks by position). On a GPU this is the static form (device
        positions, the whole cache under a mask), eager for now: it runs the model's T-token
        forward, the same one for TorchDecoder and FastDecoder."""
        t = torch.tensor(tokens, dtype=torch.int64, device=self.device)
        positions = torch.arange(self.host_pos, self.host_pos + len(tokens), device=self.device)
        if self.use_graphs:
            return self.model(t, positions, self.cache, graph_safe=True, keys=self.host_pos + len(tokens))
        return self.model(t, positions, self.cache, start=self.host_pos)

    @torch.inference_mode()
    def accept(self, draft: list[int], logits: torch.Tensor) -> list[int]:
        """Draw from verify's rows in turn, exactly as decode() would have drawn (same sampler, same
        step counter, same seen tokens), and stop at the first draw that differs from the draft.
        Returns the new tokens: the accepted draft tokens, then the draw that ended the run (a
        correction, or the bonus token after a fully accepted draft).

        Why this is the speculative sampling rule: the draft is a point mass on d, and the draw is
        Gumbel-max with noise fixed by (seed, step), so it equals d with probability p(d), and when
        it does not, it is a draw from p with d removed and renormalized. Greedy output, and
        sampled output for a given seed, are token for token those of plain decoding."""
        base, out = self.host_pos, []
        for j in range(len(draft) + 1):
            self.pos.fill_(base + j)  # the draw advances it to base + j + 1
            self.sampler(logits[j], self.pos)
            token = int(self.sampler.token.item())
            out.append(token)
            if j == len(draft) or token != draft[j]:
                break
        self.host_pos = base + len(out)
        return out

    def _capture(self, body=None) -> torch.cuda.CUDAGraph:
        """Capture `body` (default: the decode step) with the buffers as they are, into one memory pool
        shared by all graphs (they never run at once). Warm-up runs write cache rows at positions that
        the real run rewrites, and change the sampler's state: that is put back."""
        body = body or self._step
        saved_pos, saved_ids = self.pos.clone(), list(self.cache.ids)
        saved_sampler = [t.clone() for t in (self.sampler.token, self.sampler.seen, self.sampler.step)]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.pos.fill_(self.host_pos)
                body()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        self.pos.fill_(self.host_pos)
        with torch.cuda.graph(graph, pool=self._pool):
            body()
        self.pos.copy_(saved_pos)
        for t, s in zip((self.sampler.token, self.sampler.seen, self.sampler.step), saved_sampler):
            t.copy_(s)
        self.cache.ids = saved_ids
        return graph

    def _step(self) -> None:
        raise NotImplementedError


class TorchDecoder(Decoder):
    """The model's own torch forward. On the CPU the step runs eagerly and attends to the cached
    positions only; on a GPU it is the static step (device positions, whole cache under a mask)."""

    def _step(self) -> None:
        if self.use_graphs:
            logits = self.model(self.sampler.token, self.pos, self.cache, last_only=True)[0]
        else:
            logits = self.model(self.sampler.token, self.pos, self.cache, last_only=True, start=self.host_pos)[0]
        self.sampler(logits, self.pos)


class FastDecoder(Decoder):
    """The decode step on csrc/'s kernels: per layer a fused norm+QKV GEMV, attention with RoPE and
    the cache write, O GEMV into the fp32 residual, a fused norm+gate/up GEMV, the down GEMV."""

    pos_dtype = torch.int32

    def __init__(self, model: Transformer, cache: KVCache, sampler: Sampler, ext, max_len: int):
        super().__init__(model, cache, sampler, use_graphs=True)
        self.ext = ext
        cfg = model.config
        dev, f16 = self.device, torch.float16
        self.cos, self.sin = model.rope.ensure(max_len)
        self.h = torch.zeros(cfg.hidden_size, device=dev)
        d = cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * d, cfg.num_kv_heads * d
        self.qkv = torch.zeros(self.q_size + 2 * self.kv_size, dtype=f16, device=dev)
        self.qkv_parts = [self.qkv[:self.q_size], self.qkv[self.q_size:self.q_size + self.kv_size],
                          self.qkv[self.q_size + self.kv_size:]]
        self.attn = torch.zeros(self.q_size, dtype=f16, device=dev)
        self.mlp = torch.zeros(cfg.intermediate_size, dtype=f16, device=dev)
        self.logits = torch.zeros(cfg.vocab_size, device=dev)
        self.splits = ext.attention_splits(cache.max_len, cfg.head_dim)
        self.scratch = torch.zeros(ext.attention_scratch_floats(cfg.num_heads, self.splits, d), device=dev)
        self.counters = torch.zeros(cfg.num_heads, dtype=torch.int32, device=dev)
        # split-K workspace of the GEMVs (csrc/gemv.cu): partial sums and per-tile counters
        self.partials = torch.zeros(1 << 21, device=dev)
        self.tile_counters = torch.zeros(1 << 16, dtype=torch.int32, device=dev)
        self.act = kernels.ACTIVATION_IDS[cfg.hidden_act]
        self.scale = 1.0 / math.sqrt(d)
        self.window = cfg.sliding_window or 0

    def _norm_args(self, norm):
        if isinstance(norm, LayerNorm):
            return kernels.IN_LAYER_NORM, norm.weight, norm.bias, norm.eps
        return kernels.IN_RMS_NORM, norm.weight, None, norm.eps

    def _gemv(self, mats, x, mode, w, b, eps, out_mode, act, outs, out_index=None, direct=False):
        """direct: x already stands in the layers' permuted input order (written with out_index)."""
        handles = [lin.kernel_matrix_direct if direct else lin.kernel_matrix for lin in mats]
        self.ext.gemv(handles, x, mode, w, b, eps, out_mode, act, outs, self.partials, self.tile_counters, out_index)

    def _step(self) -> None:
        ext, m, cfg = self.ext, self.model, self.model.config
        gemv = self._gemv
        ext.embed(m.embed_tokens, self.sampler.token, self.h)
        for i, block in enumerate(m.layers):
            a = block.self_attn
            mode, w, b, eps = self._norm_args(block.input_layernorm)
            gemv([a.q_proj, a.k_proj, a.v_proj], self.h, mode, w, b, eps, kernels.OUT_HALF, 0, self.qkv_parts)
            ext.decode_attention(self.qkv, self.cache.k[i], self.cache.v[i], self.pos, self.cos, self.sin,
                                 a.q_norm.weight if a.q_norm is not None else None,
                                 a.k_norm.weight if a.k_norm is not None else None,
                                 a.q_norm.eps if a.q_norm is not None else 0.0,
                                 self.attn, self.scratch, self.counters, cfg.num_heads, cfg.num_kv_heads,
                                 self.window, self.splits, self.scale)
            gemv([a.o_proj], self.attn, kernels.IN_HALF, None, None, 0.0, kernels.OUT_RESIDUAL, 0, [self.h])
            mode, w, b, eps = self._norm_args(block.post_attention_layernorm)
            mlp = block.mlp
            # the MLP's activations stored in the down projection's permuted input order
            down = mlp.down_proj if isinstance(mlp, GatedMLP) else mlp.c_proj
            if isinstance(mlp, GatedMLP):
                gemv([mlp.gate_proj, mlp.up_proj], self.h, mode, w, b, eps, kernels.OUT_GATED, self.act, [self.mlp],
                     down.input_order)
            else:
                gemv([mlp.c_fc], self.h, mode, w, b, eps, kernels.OUT_ACT, self.act, [self.mlp], down.input_order)
            gemv([down], self.mlp, kernels.IN_HALF, None, None, 0.0, kernels.OUT_RESIDUAL, 0, [self.h], direct=True)
        mode, w, b, eps = self._norm_args(m.norm)
        gemv([m.lm_head], self.h, mode, w, b, eps, kernels.OUT_FLOAT, 0, [self.logits])
        self.sampler(self.logits, self.pos)


def fast_path_blocker(model: Transformer, dtype: torch.dtype) -> str | None:
    """Why this model cannot run on the kernels (None: it can)."""
    cfg = model.config
    if dtype != torch.float16:
        return f"the kernels compute in float16, the model is loaded as {dtype}"
    if cfg.hidden_act not in kernels.ACTIVATION_IDS:
        return f"activation {cfg.hidden_act!r} has no kernel"
    if cfg.head_dim % 8 or cfg.head_dim > 256:
        return f"head_dim {cfg.head_dim} (kernels need a multiple of 8, at most 256)"
    if cfg.num_heads % cfg.num_kv_heads:
        return "query heads are not a multiple of key/value heads"
    return None


def prepare_fast_path(model: Transformer, ext, prompt_weights_bytes: int = 0) -> bool:
    """Hand every linear layer to the kernels (EXL2 stays packed; dense becomes W^T in place).
    When the layers' fp16 weights fit in `prompt_weights_bytes` (and in half the free device
    memory), keep them for prompts (EXL2Linear.keep_prompt_weight); returns whether it did."""
    device = model.embed_tokens.device
    layers = [m for m in model.layers.modules() if isinstance(m, EXL2Linear)]
    need = sum(m.prompt_weight_bytes() for m in layers)
    keep = bool(layers) and need <= min(prompt_weights_bytes, torch.cuda.mem_get_info(device)[0] // 2)
    largest = max((m.x_len * m.q_weight.shape[1] for m in layers), default=0)
    scratch = DequantScratch(0 if keep else largest, device)
    for module in model.modules():
        if isinstance(module, EXL2Linear):
            module.prepare_kernels(ext, scratch)
        elif isinstance(module, Linear):
            module.prepare_kernels(ext)
    for module in model.modules():
        if isinstance(module, (RMSNorm, LayerNorm)):
            module.weight.data = module.weight.data.contiguous()
        if isinstance(module, (RMSNorm, Attention)):  # the prompt's forward: fewer, larger launches
            module._ext = ext
    if keep:
        for m in layers:
            m.keep_prompt_weight()
    return keep
