"""The remote engine: kodkod's prompts, stop rules and post-processing on top of
OpenAI-compatible servers (vLLM, SGLang, llama.cpp, another kodkod).

`kodkod serve --engine openai --upstream URL [--upstream URL ...]` builds each prompt
here (with the model's tokenizer, read from `--model DIR`), sends its text to
`POST {upstream}/v1/completions` with `"stream": true`, and reads the text as it
comes. The HTTP side sees the same job items as with the local engine
(server/worker.py), so streaming, early stops and post-processing are the same.

The upstream connection is closed the moment its text is no longer wanted: the client
went away, a newer request of the same user superseded it, a stop string appeared, or
post-processing settled the choice. Closing the connection is what tells the upstream
to stop generating.

Several upstreams, their health and failover: server/upstreams.py.
"""
from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Callable

from .errors import UsageError
from .upstreams import HEALTH_INTERVAL_S, UpstreamPool
from .worker import Item, Job, QueueFull


class RemoteEngine:
    """What the server needs of an engine, for a model that runs elsewhere: its tokenizer
    (to build prompts), its context length, `info()`, and a step counter (here: chunks received)."""

    def __init__(self, tokenizer_dir: str | Path, pool: UpstreamPool):
        from engine.config import ModelConfig
        from engine.tokenizer import Tokenizer

        from engine import ModelError

        try:
            config = ModelConfig.from_dir(tokenizer_dir)
            self.tokenizer = Tokenizer.from_dir(tokenizer_dir, config.eos_token_ids, config.bos_token_id)
        except ModelError as exc:
            raise UsageError(f"the remote engine reads the model's tokenizer from --model DIR: {exc}") from None
        self.max_seq_len = config.max_position_embeddings
        self.path = Path(tokenizer_dir)
        self.pool = pool
        self.decode_steps = 0

    def info(self) -> dict:
        return {"name": self.pool.model or self.path.name, "device": "remote", "tokenizer": str(self.path),
                "max_seq_len": self.max_seq_len,
                "upstreams": [{"url": u.url, "alive": u.alive, "model": u.model, "error": u.error}
                              for u in self.pool.upstreams]}


class RemoteWorker:
    """EngineWorker's face (server/worker.py) for the remote engine. Jobs run at once and side by
    side, each as a task of the event loop: the upstreams batch them. `queue_size` bounds the jobs
    in flight. A newer job with the same key supersedes the older one, as with the local engine."""

    def __init__(self, engine: RemoteEngine, queue_size: int = 16,
                 on_job_done: Callable[[Job], None] | None = None, health_interval_s: float = HEALTH_INTERVAL_S):
        self.engine = engine
        self.queue_size = queue_size
        self.on_job_done = on_job_done
        self.health_interval_s = health_interval_s
        self._tasks: dict[str, asyncio.Task] = {}  # by job id
        self._by_key: dict[str, Job] = {}
        self._health: asyncio.Task | None = None

    # ---- lifecycle ----
    def start(self) -> None:
        """Start the health checks (inside a running event loop; elsewhere they start with the first job)."""
        if self._health is None:
            try:
                self._health = asyncio.get_running_loop().create_task(
                    self.engine.pool.check_forever(self.health_interval_s))
            except RuntimeError:
                pass

    def stop(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        if self._health is not None:
            self._health.cancel()
            self._health = None

    async def aclose(self) -> None:
        self.stop()
        await self.engine.pool.aclose()

    @property
    def depth(self) -> int:
        return 0  # nothing waits: jobs start at once

    @property
    def busy(self) -> bool:
        return bool(self._tasks)

    # ---- submitting ----
    def submit(self, job: Job) -> Job:
        loop = asyncio.get_running_loop()
        self.start()
        job._loop, job._out, job._worker = loop, asyncio.Queue(), self
        old = self._by_key.get(job.key) if job.key is not None else None
        if old is not None and old.done_event.is_set():
            old = None
        # a newer job takes its predecessor's place; without one it needs a free place, and a refused
        # job cancels nothing
        if old is None and len(self._tasks) >= self.queue_size:
            raise QueueFull(f"{len(self._tasks)} requests are in flight; try again shortly")
        if old is not None:
            old.cancel("superseded")
        if job.key is not None:
            self._by_key[job.key] = job
        self._tasks[job.id] = loop.create_task(self._run(job))
        return job

    # ---- one job ----
    async def _run(self, job: Job) -> None:
        job.started = time.monotonic()
        job.steps_at_start = self.engine.decode_steps
        try:
            info, plan = await asyncio.to_thread(job.prepare)  # prompt building is CPU work
            job._emit(Item("prepared", info))
            for index, (_ids, params) in enumerate(plan):
                if job.cancelled:
                    break
                await self._choice(job, index, info.prompt.text, params)
        except asyncio.CancelledError:
            job.cancel("shutdown")
        except Exception as exc:
            job._emit(Item("error", exc))
        finally:
            self._finish(job)

    async def _choice(self, job: Job, index: int, prompt: str, params) -> None:
        from engine import TokenEvent

        job._choice = (index, threading.Event())
        reader = asyncio.create_task(self._read(job, index, prompt, params))
        job.interrupt = reader.cancel
        if job.cancelled:
            reader.cancel()
        try:
            finish, tail = await reader
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # the server is stopping, not just this choice
                raise
            finish, tail = "cancelled", ""
        finally:
            job.interrupt = None
        job._emit(Item("token", TokenEvent(None, tail, finish), index))

    async def _read(self, job: Job, index: int, prompt: str, params) -> tuple[str, str]:
        """Stream one choice from an upstream; (finish_reason, text held back at the end)."""
        from engine import TokenEvent
        from engine.engine import StopStrings

        if params.max_new_tokens == 0:
            return "length", ""
        body = {"prompt": prompt, "max_tokens": params.max_new_tokens, "temperature": params.temperature,
                "top_p": params.top_p, "seed": params.seed}
        stops = StopStrings(params.stop_strings)
        finish = "stop"
        async with self.engine.pool.stream(body) as chunks:
            async for text, upstream_finish in chunks:
                if text or upstream_finish is None:  # about one chunk per token; a bare finish is none
                    self.engine.decode_steps += 1
                    job.tokens += 1
                out, stopped = stops.feed(text)
                if out:
                    job._emit(Item("token", TokenEvent(-1, out), index))
                if stopped:  # leaving the block closes the connection: the upstream stops
                    return "stop", ""
                if upstream_finish is not None:
                    finish = "length" if upstream_finish == "length" else "stop"
                    break
        return finish, stops.flush()

    def _finish(self, job: Job) -> None:
        self._tasks.pop(job.id, None)
        if job.key is not None and self._by_key.get(job.key) is job:
            del self._by_key[job.key]
        job.steps_at_end = self.engine.decode_steps
        job.finished = time.monotonic()
        job._emit(Item("end", job.cancel_reason))
        job.done_event.set()
        if self.on_job_done is not None:
            self.on_job_done(job)

