"""The Engine: a loaded model plus its tokenizer, KV cache and the generation loop."""
from __future__ import annotations

import random
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from .config import ModelConfig, ModelError
from .kv_cache import KVCache
from .loader import TensorStore, build_transformer
from .params import GenerationParams, TokenEvent
from .sampling import sample
from .tokenizer import StreamDecoder, Tokenizer

DEFAULT_MAX_SEQ_LEN = 4096


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' asked for, but torch sees no CUDA GPU")
    return dev


class Engine:
    def __init__(self, path: Path, config: ModelConfig, model, tokenizer: Tokenizer, device: torch.device,
                 dtype: torch.dtype, max_seq_len: int, quantized: bool):
        self.path, self.config, self.model, self.tokenizer = path, config, model, tokenizer
        self.device, self.dtype, self.quantized = device, dtype, quantized
        self.max_seq_len = max_seq_len
        self.cache = KVCache(config.num_layers, config.num_kv_heads, config.head_dim, max_seq_len, device, dtype)
        self.stop_ids = frozenset(tokenizer.eos_token_ids) | frozenset(config.eos_token_ids)
        self.decode_steps = 0
        self._lock = threading.Lock()

    def info(self) -> dict:
        q = self.config.quantization or {}
        return {
            "name": self.path.name,
            "path": str(self.path),
            "architecture": self.config.architecture,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "quantization": ({"method": "exl2", "bits": q.get("bits"), "head_bits": q.get("head_bits")}
                             if self.quantized else None),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "max_seq_len": self.max_seq_len,
        }

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """Logits [T, vocab] (fp32) of one forward pass over `ids`, without the cache."""
        t = torch.tensor(self._check_ids(ids), device=self.device)
        pos = torch.arange(len(ids), device=self.device)
        self.decode_steps += 1
        return self.model(t, pos)

    def _check_ids(self, ids: list[int]) -> list[int]:
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("the prompt is empty")
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.config.vocab_size}): {bad[:5]}")
        return ids

    @torch.inference_mode()
    def _step(self, ids: list[int], start: int) -> torch.Tensor:
        """Run `ids` at positions start.. through the model, caching their keys/values; last logits [vocab]."""
        self.decode_steps += 1
        t = torch.tensor(ids, device=self.device)
        pos = torch.arange(start, start + len(ids), device=self.device)
        del self.cache.ids[start:]
        out = self.model(t, pos, self.cache, last_only=True)[0]
        self.cache.ids.extend(ids)
        return out

    def generate(self, prompt_ids: list[int], params: GenerationParams = GenerationParams(),
                 cancel: threading.Event | None = None) -> Iterator[TokenEvent]:
        """Yield TokenEvents lazily: each `next()` runs at most one forward pass."""
        prompt_ids = self._check_ids(prompt_ids)
        if len(prompt_ids) >= self.max_seq_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit the {self.max_seq_len}-token context")
        return self._generate(prompt_ids, params, cancel)

    def _generate(self, prompt_ids, params, cancel) -> Iterator[TokenEvent]:
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("the engine is already generating; it serves one request at a time")
        try:
            seed = params.seed if params.seed is not None else random.getrandbits(63)
            gen = None if params.greedy else torch.Generator(device=self.device).manual_seed(seed)
            stop_ids = self.stop_ids | frozenset(params.stop_token_ids)
            history = torch.tensor(prompt_ids, device=self.device)
            decoder = StreamDecoder(self.tokenizer, prompt_ids)
            stops = StopStrings(params.stop_strings)
            start = self.cache.reusable(prompt_ids)
            pending = prompt_ids[start:]
            finish = "length"
            for _ in range(params.max_new_tokens):
                if cancel is not None and cancel.is_set():
                    finish = "cancelled"
                    break
                if start + len(pending) > self.max_seq_len:
                    break
                logits = self._step(pending, start)
                token = sample(logits, history, params, gen)
                if token in stop_ids:
                    finish = "stop"
                    break
                start += len(pending)
                pending = [token]
                if params.repetition_penalty != 1.0:
                    history = torch.cat([history, history.new_tensor([token])])
                text, stopped = stops.feed(decoder.push(token))
                yield TokenEvent(token, text)
                if stopped:
                    finish = "stop"
                    break
            tail = "" if finish == "stop" else stops.flush(decoder.flush())
            yield TokenEvent(None, tail, finish)
        finally:
            self._lock.release()


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


def load_model(path: str | Path, device: str = "auto", dtype: torch.dtype | None = None,
               max_seq_len: int = DEFAULT_MAX_SEQ_LEN, progress: bool | None = None) -> Engine:
    """Load an EXL2 or plain HF model directory (a progress bar on a terminal, unless progress=False)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{path}: not a directory")
    dev = resolve_device(device)
    if dtype is None:
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    cfg = ModelConfig.from_dir(path)
    if progress is None:
        progress = sys.stderr.isatty()
    store = TensorStore(path)
    model = build_transformer(store, cfg, dev, dtype, progress)
    tok = Tokenizer.from_dir(path, cfg.eos_token_ids, cfg.bos_token_id)
    max_seq_len = min(max_seq_len, max(cfg.max_position_embeddings, 1))
    quantized = store.is_quantized()
    return Engine(path, cfg, model, tok, dev, dtype, max_seq_len, quantized)
