"""One completion job as a sequence of per-choice events: the JSON and the SSE answers both read it.

`ChoiceRun.events()` pulls the job's items (server/worker.py) and yields, choice after
choice, `Delta`s (text a stream may show now) and one `ChoiceEnd` per choice; a job that
fails or is cancelled ends with one `Failure`. It also ends a choice early once
post-processing has settled it (server/choice_text.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import AsyncIterator

from .choice_text import ChoiceText, Deltas
from .completion import CompletionService, Prepared
from .errors import ApiError
from .metrics import Metrics
from .worker import Job, JobTimeout

log = logging.getLogger("kodkod.server")


@dataclass
class Delta:
    index: int
    text: str


@dataclass
class ChoiceEnd:
    index: int
    text: str  # the last delta
    finish_reason: str  # stop, length or cancelled
    completion: str
    decisions: list[str]


@dataclass
class Failure:
    outcome: str  # timeout, superseded, disconnected, shutdown, cancelled or error
    error: ApiError


# why a job ended without its completion -> the error its client gets
OUTCOME_ERRORS = {
    "superseded": (409, "superseded", "a newer request from the same user superseded this one"),
    "timeout": (504, "timeout", "the request took longer than the server's time limit of {timeout_s:g} s"),
    "disconnected": (499, "client_closed_request", "the client closed the connection"),
    "shutdown": (503, "shutting_down", "the server is shutting down"),
    "cancelled": (499, "cancelled", "the request was cancelled"),
}


def outcome_error(reason: str, job: Job | None = None) -> ApiError:
    """The one error (and one message) for each way a job can end without its completion."""
    status, type, message = OUTCOME_ERRORS.get(reason, OUTCOME_ERRORS["cancelled"])
    return ApiError(status, type, message.format(timeout_s=job.timeout_s if job is not None else 0))


class ChoiceRun:
    def __init__(self, service: CompletionService, metrics: Metrics, job: Job, n: int, deltas: Deltas = None):
        self.service, self.metrics, self.job, self.n = service, metrics, job, n
        self.deltas = deltas  # None: a JSON answer, nothing is streamed
        self.info: Prepared | None = None
        self.completions: list[str] = []
        self.outcome = "ok"

    async def events(self) -> AsyncIterator[Delta | ChoiceEnd | Failure]:
        job = self.job
        texts: list[ChoiceText] = []
        while True:
            try:
                item = await job.next()
            except JobTimeout:
                yield self._fail("timeout", outcome_error("timeout", job))
                return
            if item.kind == "prepared":
                self.info = item.value
                texts = [ChoiceText(self.service, self.info, self.deltas) for _ in range(self.n)]
            elif item.kind == "token":
                i, ev = item.index, item.value
                delta = texts[i].add(ev.text)
                if ev.finish_reason is None:
                    if delta:
                        yield Delta(i, delta)
                    if texts[i].settled:
                        job.stop_choice(i)
                        self.metrics.early_stops.inc()
                    continue
                try:
                    last, completion, decisions = texts[i].finish()
                except Exception as exc:
                    yield self._fail("error", self._internal(exc))
                    return
                self.completions.append(completion)
                yield ChoiceEnd(i, delta + last, self._finish_reason(i, ev.finish_reason), completion, decisions)
            elif item.kind == "error":
                exc = item.value
                yield self._fail("error", exc if isinstance(exc, ApiError) else self._internal(exc))
                return
            elif item.kind == "end":
                if job.cancel_reason is not None:
                    yield self._fail(job.cancel_reason, outcome_error(job.cancel_reason, job))
                return

    def _fail(self, outcome: str, error: ApiError) -> Failure:
        self.outcome = outcome
        if outcome == "error":
            self.job.cancel("error")
        return Failure(outcome, error)

    def _internal(self, exc: BaseException) -> ApiError:
        log.error("completion %s failed", self.job.id, exc_info=exc)
        return ApiError(500, "internal_error", "the completion failed; the server's log says why")

    def _finish_reason(self, index: int, reason: str) -> str:
        """A choice the server ended early, because its completion was settled, finished with "stop"."""
        job = self.job
        if reason == "cancelled" and job.cancel_reason is None and index in job.stopped_choices:
            return "stop"
        return reason
