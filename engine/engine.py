"""The Engine: a loaded model plus its tokenizer, KV cache and the generation loop."""
from __future__ import annotations

import collections
import random
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from . import kernels
from .config import ModelConfig, ModelError
from .decode import FastDecoder, TorchDecoder, fast_path_blocker, prepare_fast_path
from .dtypes import resolve_dtype
from .kv_cache import KVCache
from .kv_pool import KVPool
from .linear import EXL2Linear
from .loader import TensorStore, build_transformer
from .params import GenerationParams, TokenEvent
from .sampling import Sampler
from .speculate import PromptLookup
from .tokenizer import StreamDecoder, Tokenizer

BACKENDS = ("auto", "cuda", "torch")

# Engine.stats: cumulative counters (the server's /metrics reads them)
STAT_NAMES = ("prompt_tokens_cached", "prompt_tokens_prefilled", "draft_tokens", "accepted_tokens",
              "verify_steps")

DEFAULT_MAX_SEQ_LEN = 4096
DEFAULT_KV_POOL_MB = 512
# fp16 copies of the layers' weights kept for prompts on the fast path when they fit (decode.py
# prepare_fast_path): the 0.5B model's take 716 MiB and save 0.7 ms per prompt on the H100 (the
# 1.5B model's take 2.6 GiB: dequantized per prompt unless asked for).
DEFAULT_PROMPT_WEIGHTS_MB = 1024
# Prompt-lookup speculation (server: --draft-tokens). None: drafts of up to CPU_DRAFT_TOKENS on the
# CPU (HumanEval infilling decodes 1.6x faster there, the same tokens), off on a GPU, where a verify
# pass does not yet run on the decode step's kernels and costs more than the tokens it saves.
DEFAULT_DRAFT_TOKENS: int | None = None
CPU_DRAFT_TOKENS = 4
# Decode steps kept in flight ahead of the caller on a GPU. Two: the caller's hand-offs between
# tokens (the server's worker thread, its event loop) can take longer than a step without leaving
# the GPU idle; the cost is at most two steps computed for nothing when a stream stops.
LAUNCH_DEPTH = 2


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' asked for, but torch sees no CUDA GPU")
    return dev


def model_name(path: Path) -> str:
    """What clients are told the model is: a known model's cached form (models/<name>/hf-fp16,
    models/<name>/exl2-4bpw, see engine/convert/models.py) is named by its model and form, any
    other directory by itself."""
    if path.name == "hf-fp16" or path.name.startswith("exl2-"):
        return f"{path.parent.name}/{path.name}"
    return path.name


class Engine:
    def __init__(self, path: Path, config: ModelConfig, model, tokenizer: Tokenizer, device: torch.device,
                 dtype: torch.dtype, max_seq_len: int, quantized: bool, backend: str = "auto",
                 kv_pool_mb: float = DEFAULT_KV_POOL_MB, draft_tokens: int | None = DEFAULT_DRAFT_TOKENS,
                 prompt_weights_mb: float = DEFAULT_PROMPT_WEIGHTS_MB):
        self.path, self.config, self.model, self.tokenizer = path, config, model, tokenizer
        self.device, self.dtype, self.quantized = device, dtype, quantized
        self.max_seq_len = max_seq_len
        self.cache = KVCache(config.num_layers, config.num_kv_heads, config.head_dim, max_seq_len, device, dtype)
        self.stop_ids = frozenset(tokenizer.eos_token_ids) | frozenset(config.eos_token_ids)
        self.decode_steps = 0
        # prompt reuse and speculation: both change only how much work a generation takes, never its output
        self.reuse_prompts = True  # False: every prompt is prefilled whole (benchmarks' baseline)
        self.kv_pool = KVPool(int(kv_pool_mb * 2**20))
        self.stats = dict.fromkeys(STAT_NAMES, 0)
        self._lock = threading.Lock()
        self.backend, self.backend_reason = self._choose_backend(backend)
        ext = kernels.load() if self.backend == "cuda" else None
        self.sampler = Sampler(config.vocab_size, device, ext)
        self.prompt_weights = False  # fp16 layer weights kept for prompts (no dequantization per prompt)
        if ext is not None:
            self.prompt_weights = prepare_fast_path(model, ext, int(prompt_weights_mb * 2**20))
            self.decoder = FastDecoder(model, self.cache, self.sampler, ext, max_seq_len)
        else:
            for m in model.modules():  # dequantize once now, not during the first request
                if isinstance(m, EXL2Linear):
                    m.weight  # noqa: B018
            self.decoder = TorchDecoder(model, self.cache, self.sampler, use_graphs=device.type == "cuda")
        # Launch the decode steps after a token before that token is handed out, so the GPU computes
        # the next ones while the caller (the server's worker, the HTTP response) deals with this one.
        # On a GPU a step is an asynchronous graph replay that takes its token from the step before
        # on the device; each step's draw is copied to a host slot of its own. On the CPU a step
        # would be computed up front (slower to the first use of the token, and wasted when the
        # caller stops): off there.
        self.launch_ahead = LAUNCH_DEPTH if self.decoder.use_graphs else 0
        self._slots: torch.Tensor | None = None  # host copies of the draws of steps in flight
        self._slot_events: list = []
        self._next_slot = 0
        if draft_tokens is None:
            draft_tokens = 0 if self.decoder.use_graphs else CPU_DRAFT_TOKENS
        self.draft_tokens = draft_tokens  # longest prompt-lookup draft per step; 0: plain decoding

    def _choose_backend(self, asked: str) -> tuple[str, str | None]:
        """("cuda" | "torch", why not cuda). "cuda" must work when asked for by name."""
        if asked not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {asked!r}")
        if asked == "torch":
            return "torch", "the torch backend was asked for"
        why = "the model is on the CPU" if self.device.type != "cuda" else fast_path_blocker(self.model, self.dtype)
        if why is None and kernels.load() is None:
            why = kernels.reason()
        if why is not None and asked == "cuda":
            raise RuntimeError(f"the CUDA backend cannot run: {why}")
        return ("torch", why) if why else ("cuda", None)

    def warm_up(self) -> None:
        """Capture the CUDA graphs (every prefill bucket, both kinds of decode step) so no request pays for it."""
        self.decoder.warm_up_prefill()
        for filtered in (False, True):
            params = GenerationParams(max_new_tokens=3, temperature=0.5 if filtered else 0.0,
                                      top_p=0.9 if filtered else 1.0, seed=0)
            saved, self.stop_ids = self.stop_ids, frozenset()
            try:
                for _ in self.generate([0, 0], params):
                    pass
            finally:
                self.stop_ids = saved
        self.cache.ids = []
        self.kv_pool.clear()
        self.stats = dict.fromkeys(STAT_NAMES, 0)

    def info(self) -> dict:
        q = self.config.quantization or {}
        return {
            "name": model_name(self.path),
            "path": str(self.path),
            "architecture": self.config.architecture,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "quantization": ({"method": "exl2", "bits": q.get("bits"), "head_bits": q.get("head_bits")}
                             if self.quantized else None),
            "parameters": sum(p.numel() for p in self.model.parameters())
            + sum(m.in_features * m.out_features for m in self.model.modules() if isinstance(m, EXL2Linear)),
            "backend": self.backend,
            "backend_note": self.backend_reason,
            "prompt_weights": self._prompt_weights_note(),
            "max_seq_len": self.max_seq_len,
        }

    def _prompt_weights_note(self) -> str:
        """What a prompt's forward multiplies by (see prompt_weights_mb)."""
        if not self.quantized:
            return "the model's own dense weights"
        if self.backend != "cuda":
            return "dense, dequantized once at load"  # the torch path's EXL2Linear.weight cache
        return "fp16 copies kept" if self.prompt_weights else "dequantized per prompt"

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """Logits [T, vocab] (fp32) of one forward pass over `ids`, without the cache."""
        t = torch.tensor(self._check_ids(ids), device=self.device)
        pos = torch.arange(len(ids), device=self.device)
        self.decode_steps += 1
        return self.model(t, pos)

    def _check_ids(self, ids) -> np.ndarray:
        """Token ids as an int64 array, or a clear error. The prompt is converted once: a list of
        1,500 ints costs 0.03-0.07 ms each time numpy or torch reads it."""
        arr = np.asarray(ids)
        if arr.size == 0:
            raise ValueError("the prompt is empty")
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise ValueError(f"token ids must be a flat list of integers, got {arr.dtype} of shape {arr.shape}")
        vocab = self.config.vocab_size
        if arr.min() < 0 or arr.max() >= vocab:
            raise ValueError(f"token ids out of range [0, {vocab}): {arr[(arr < 0) | (arr >= vocab)][:5].tolist()}")
        return arr.astype(np.int64, copy=False)

    def generate(self, prompt_ids: list[int], params: GenerationParams = GenerationParams(),
                 cancel: threading.Event | None = None) -> Iterator[TokenEvent]:
        """Yield TokenEvents lazily: each `next()` runs at most one forward pass. With launch_ahead = k
        (on a GPU) the k steps after the token being handed out are launched before it is yielded
        and read at the following `next()`s; a caller that stops has made at most k steps more."""
        prompt = self._check_ids(prompt_ids)
        if len(prompt) >= self.max_seq_len:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit the {self.max_seq_len}-token context")
        return self._generate(prompt, params, cancel)

    def _generate(self, prompt: np.ndarray, params, cancel) -> Iterator[TokenEvent]:
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("the engine is already generating; it serves one request at a time")
        try:
            prompt_ids = prompt.tolist()
            seed = params.seed if params.seed is not None else random.getrandbits(63)
            self.sampler.start(params, prompt, seed)
            stop_ids = self.stop_ids | frozenset(params.stop_token_ids)
            decoder = StreamDecoder(self.tokenizer, prompt_ids)
            stops = StopStrings(params.stop_strings)
            lookup = PromptLookup(prompt_ids) if self.draft_tokens > 0 else None
            pending: list[int] = []  # tokens one forward pass made that are not yielded yet
            inflight: collections.deque[int] = collections.deque()  # slots of launched steps, oldest first
            if self.launch_ahead:
                self._make_slots()
            finish = "length"
            for i in range(params.max_new_tokens):
                if cancel is not None and cancel.is_set():
                    finish = "cancelled"
                    break
                if not pending:
                    if i == 0:
                        self._prefill(prompt_ids, prompt)
                        pending = [int(self.sampler.token.item())]
                        self.decode_steps += 1
                    elif inflight:
                        pending = [self._collect(token, inflight.popleft())]
                    else:
                        if len(self.cache.ids) >= self.max_seq_len:
                            break
                        pending = self._step(token, lookup, params.max_new_tokens - i)
                        self.decode_steps += 1
                token = pending.pop(0)
                if lookup is not None:
                    lookup.push(token)
                if token in stop_ids:
                    finish = "stop"
                    break
                text, stopped = stops.feed(decoder.push(token))
                if self.launch_ahead and lookup is None and not pending and not stopped:
                    # steps for the tokens after `token`, never past the length asked for or the
                    # context (the newest one writes cache row len(cache.ids) + len(inflight))
                    while (len(inflight) < self.launch_ahead and i + 1 + len(inflight) < params.max_new_tokens
                           and len(self.cache.ids) + len(inflight) < self.max_seq_len):
                        inflight.append(self._launch())
                yield TokenEvent(token, text)
                if stopped:
                    finish = "stop"
                    break
            tail = "" if finish == "stop" else stops.flush(decoder.flush())
            yield TokenEvent(None, tail, finish)
        finally:
            self._lock.release()

    def _prefill(self, ids: list[int], arr: np.ndarray) -> None:
        """Run the prompt after the longest prefix the cache (or the pool, copied in) already holds.
        `arr`: the same ids as an array (what numpy and torch read)."""
        start = 0
        if self.reuse_prompts:
            start = self.kv_pool.restore(arr, self.cache, self.cache.reusable(ids))
        del self.cache.ids[start:]
        self.decoder.prefill(arr[start:], start)
        self.cache.ids.extend(ids[start:])
        self.stats["prompt_tokens_cached"] += start
        self.stats["prompt_tokens_prefilled"] += len(ids) - start
        if self.reuse_prompts:
            self.kv_pool.save(arr, self.cache)

    def _make_slots(self) -> None:
        if self._slots is None or len(self._slots) != self.launch_ahead:
            cuda = self.device.type == "cuda"
            self._slots = torch.zeros(self.launch_ahead, dtype=torch.int64, pin_memory=cuda)
            self._slot_events = [torch.cuda.Event() for _ in range(self.launch_ahead)] if cuda else []
            self._next_slot = 0

    def _launch(self) -> int:
        """Launch the decode step after the newest token (on the device: the draw it reads); its draw
        is copied to a host slot when it is done. Returns the slot."""
        self.decoder.decode()
        self.decode_steps += 1
        j, self._next_slot = self._next_slot, (self._next_slot + 1) % len(self._slots)
        self._slots[j].copy_(self.sampler.token[0], non_blocking=True)
        if self._slot_events:
            self._slot_events[j].record(torch.cuda.current_stream(self.device))
        return j

    def _collect(self, last: int, slot: int | None = None) -> int:
        """The draw of the decode step that took `last` (waits for it): from its slot, or the
        sampler's token when it was not launched ahead."""
        self.cache.ids.append(last)
        if slot is None:
            return int(self.sampler.token.item())
        if self._slot_events:
            self._slot_events[slot].synchronize()
        return int(self._slots[slot])

    def _step(self, last: int, lookup: PromptLookup | None, left: int) -> list[int]:
        """One forward pass after `last` (the token the previous draw made): a plain decode step, or
        `last` plus a prompt-lookup draft verified at once. Returns the new tokens (at least one)."""
        room = min(self.draft_tokens, left - 1, self.max_seq_len - len(self.cache.ids) - 1)
        draft = lookup.draft(room) if lookup is not None and room > 0 else []
        if not draft:
            self.decoder.decode()
            return [self._collect(last)]
        logits = self.decoder.verify([last] + draft)
        new = self.decoder.accept(draft, logits)
        self.cache.ids += [last] + draft[:len(new) - 1]  # the rows a rejected draft left are not the cache's
        self.stats["verify_steps"] += 1
        self.stats["draft_tokens"] += len(draft)
        self.stats["accepted_tokens"] += len(new) - 1
        return new


class StopStrings:
    """Holds back text that might be the start of a stop string; cuts at the first full match."""

    def __init__(self, stop_strings):
        self.stops = [s for s in stop_strings if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(s[:n]):
                    keep = n
                    break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self, text: str = "") -> str:
        out, self.pending = self.pending + text, ""
        return out


def load_model(path: str | Path, device: str = "auto", dtype: torch.dtype | str | None = None,
               max_seq_len: int = DEFAULT_MAX_SEQ_LEN, progress: bool | None = None, backend: str = "auto",
               kv_pool_mb: float = DEFAULT_KV_POOL_MB, draft_tokens: int | None = DEFAULT_DRAFT_TOKENS,
               prompt_weights_mb: float = DEFAULT_PROMPT_WEIGHTS_MB) -> Engine:
    """Load an EXL2 or plain HF model directory (a progress bar on a terminal, unless progress=False).

    backend: "auto" runs the CUDA kernels where they can run (a GPU, fp16, the kernels built) and the
    torch path elsewhere; "cuda" insists on the kernels; "torch" never uses them.
    dtype: None (fp16 on a GPU, fp32 on the CPU: the reference), "auto" (bf16 on a CPU that
    multiplies it clearly faster, engine/dtypes.py), a name ("float32", "bfloat16", "float16") or
    a torch dtype."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{path}: not a directory")
    dev = resolve_device(device)
    dtype = resolve_dtype(dtype, dev)
    cfg = ModelConfig.from_dir(path)
    if progress is None:
        progress = sys.stderr.isatty()
    store = TensorStore(path)
    model = build_transformer(store, cfg, dev, dtype, progress)
    tok = Tokenizer.from_dir(path, cfg.eos_token_ids, cfg.bos_token_id)
    max_seq_len = min(max_seq_len, max(cfg.max_position_embeddings, 1))
    quantized = store.is_quantized()
    return Engine(path, cfg, model, tok, dev, dtype, max_seq_len, quantized, backend, kv_pool_mb, draft_tokens,
                  prompt_weights_mb)
