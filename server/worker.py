"""The engine worker: one thread, one request at a time, in arrival order, lazily.

A request becomes a `Job`. The worker takes jobs from a bounded queue and runs
them one by one, but it computes nothing on its own initiative: every item a
job produces (the prepared prompt, then each token event) is made only after
the consumer asked for it with `await job.next()`, with one exception: the first
choice's prompt runs right after the prepared item is handed over (its consumer
asks for the first token next; the demand's round trip would delay the prefill).
The HTTP side asks for the next token only after it has sent the previous one,
so tokens are produced as the response is sent, and a closed connection stops
the engine before its next decode step (the engine checks the job's cancel event
before every forward pass).

A newer job with the same key (server/state.py `supersede_key`: the same tenant and user)
supersedes an older one that is still queued or running: it takes the older one's place in
the queue, or, when the older one runs, is queued if there is room and refused (QueueFull)
otherwise, and only then is the older one cancelled. A job cancelled while queued (its
client left, its time ran out) leaves the queue at once.
"""
from __future__ import annotations

import asyncio
import collections
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

DEMAND_POLL_S = 0.02


class QueueFull(Exception):
    pass


class JobTimeout(Exception):
    pass


@dataclass
class Item:
    """What a job produces: kind is "prepared", "token", "error" or "end"."""
    kind: str
    value: Any = None
    index: int = 0


@dataclass
class Job:
    """One request's work. `prepare()` runs on the worker thread and returns
    (info, plan): info goes to the consumer, plan is a list of
    (prompt_ids, GenerationParams), one per choice."""
    prepare: Callable[[], tuple[Any, list[tuple[list[int], Any]]]]
    key: str | None = None
    timeout_s: float = 30.0
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4()}")
    cancel_event: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str | None = None
    # bookkeeping for tests and metrics
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    steps_at_start: int | None = None
    steps_at_cancel: int | None = None
    steps_at_end: int | None = None
    tokens: int = 0
    done_event: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self.deadline = self.submitted + self.timeout_s
        self._demand = threading.Semaphore(0)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._out: asyncio.Queue[Item] | None = None
        self._worker: "EngineWorker | None" = None
        self._choice: tuple[int, threading.Event] | None = None  # the choice being generated
        self.stopped_choices: set[int] = set()
        # set by an asynchronous producer (server/remote.py): called on cancel() and
        # stop_choice() so that it stops waiting for its upstream at once
        self.interrupt: Callable[[], None] | None = None

    # ---- consumer side (event loop) ----
    async def next(self) -> Item:
        """Ask the worker for the next item and wait for it (at most until the deadline)."""
        assert self._out is not None
        if self._out.empty():
            self._demand.release()
        remaining = self.deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise asyncio.TimeoutError
            return await asyncio.wait_for(self._out.get(), remaining)
        except asyncio.TimeoutError:
            self.cancel("timeout")
            raise JobTimeout(f"the request took longer than {self.timeout_s:g} s") from None

    def cancel(self, reason: str = "cancelled") -> None:
        if self.cancel_event.is_set() or self.done_event.is_set():
            return
        self.cancel_reason = reason
        if self._worker is not None and self._worker.engine is not None:
            self.steps_at_cancel = self._worker.engine.decode_steps
        self.cancel_event.set()
        if self._choice is not None:
            self._choice[1].set()
        self._demand.release()  # wake the worker if it waits for demand
        if self.interrupt is not None:
            self.interrupt()
        discard = getattr(self._worker, "discard", None)
        if discard is not None and self.started is None:
            discard(self)

    def stop_choice(self, index: int) -> None:
        """End choice `index` early (its completion is already known); the next choices still run.
        Call it before asking for the next item: the engine then ends the choice without a forward pass."""
        c = self._choice
        if c is not None and c[0] == index:
            self.stopped_choices.add(index)
            c[1].set()
            if self.interrupt is not None:
                self.interrupt()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    # ---- worker side ----
    def _emit(self, item: Item) -> None:
        assert self._loop is not None and self._out is not None
        try:
            self._loop.call_soon_threadsafe(self._out.put_nowait, item)
        except RuntimeError:  # loop closed: nobody listens any more
            self.cancel_event.set()

    def _wait_demand(self) -> bool:
        """Block until the consumer asks for an item; False when cancelled or past the deadline."""
        while True:
            if self.cancel_event.is_set():
                return False
            if time.monotonic() > self.deadline:
                self.cancel("timeout")
                return False
            if self._demand.acquire(timeout=DEMAND_POLL_S):
                return not self.cancel_event.is_set()


class EngineWorker:
    """One thread that owns the engine."""

    def __init__(self, engine, queue_size: int = 16, on_job_done: Callable[[Job], None] | None = None):
        self.engine = engine
        self.queue_size = queue_size
        self.on_job_done = on_job_done
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._by_key: dict[str, Job] = {}
        self._current: Job | None = None
        self._stop = False
        self._thread: threading.Thread | None = None

    # ---- lifecycle ----
    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="kodkod-engine-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stop = True
            jobs = list(self._queue) + ([self._current] if self._current else [])
            self._cond.notify_all()
        for j in jobs:
            j.cancel("shutdown")
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    async def aclose(self) -> None:
        """Stop at the end of the app's lifespan (the remote engine's worker closes connections there)."""
        self.stop()

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> bool:
        return self._current is not None

    # ---- submitting ----
    def submit(self, job: Job) -> Job:
        """Queue a job (call from the event loop). A live job with the same key is superseded: a queued
        one gives the newer job its place; a running one is cancelled once the newer job has a place.
        Raises QueueFull, cancelling nothing, when the newer job cannot have a place."""
        job._loop = asyncio.get_running_loop()
        job._out = asyncio.Queue()
        job._worker = self
        with self._cond:
            old = self._by_key.get(job.key) if job.key is not None else None
            if old is not None and old.done_event.is_set():
                old = None
            try:
                place = self._queue.index(old) if old is not None else None
            except ValueError:  # running: not in the queue
                place = None
            if place is not None:
                self._queue[place] = job
            elif len(self._queue) >= self.queue_size:
                raise QueueFull(f"{len(self._queue)} requests are waiting; try again shortly")
            else:
                self._queue.append(job)
            if job.key is not None:
                self._by_key[job.key] = job
            self._cond.notify()
        if old is not None:
            old.cancel("superseded")
            if place is not None:
                self._finish(old)  # it never ran: it ends now
        return job

    def discard(self, job: Job) -> None:
        """A cancelled job still queued leaves the queue at once: the queue holds only live work."""
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:
                return
        self._finish(job)

    # ---- the thread ----
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                job = self._queue.popleft()
                self._current = job
            try:
                self._serve(job)
            except BaseException as exc:  # never let the worker die
                job._emit(Item("error", exc))
            finally:
                with self._cond:
                    self._current = None
                self._finish(job)

    def _finish(self, job: Job, queued: bool = False) -> None:
        if job.done_event.is_set():
            return
        if self.engine is not None:
            job.steps_at_end = self.engine.decode_steps
        job.finished = time.monotonic()
        job._emit(Item("end", job.cancel_reason))
        if job.key is not None and self._by_key.get(job.key) is job:
            with self._cond:
                if self._by_key.get(job.key) is job:
                    del self._by_key[job.key]
        job.done_event.set()
        if self.on_job_done is not None:
            try:
                self.on_job_done(job)
            except Exception:
                pass

    def _serve(self, job: Job) -> None:
        job.started = time.monotonic()
        job.steps_at_start = self.engine.decode_steps if self.engine is not None else 0
        if not job._wait_demand():
            return
        info, plan = job.prepare()
        job._emit(Item("prepared", info))
        for index, (ids, params) in enumerate(plan):
            # The first choice starts at once: its consumer asks for the first token as soon as it
            # has "prepared", and waiting for that demand would delay the prefill by a round trip
            # through the event loop. Its first token is still handed over on demand (below).
            if index > 0 and not job._wait_demand():
                return
            choice_cancel = threading.Event()
            job._choice = (index, choice_cancel)
            if job.cancel_event.is_set():
                choice_cancel.set()
            gen: Iterator = self.engine.generate(ids, params, choice_cancel)
            first = True
            while True:
                if not first and not job._wait_demand():
                    # cancelled between steps: let the engine finish its stream (no forward pass)
                    pass
                ev = next(gen, None)
                if first and index == 0:
                    job._wait_demand()  # the first token's demand, made while the prompt ran: one item per demand
                first = False
                if ev is None:
                    break
                if ev.token_id is not None:
                    job.tokens += 1
                job._emit(Item("token", ev, index))
                if ev.finish_reason is not None:
                    break
            if job.cancel_event.is_set():
                return
