"""POST /v1/completions: Tabby's body or OpenAI's, answered as JSON or as Server-Sent Events.

Both bodies become one `CompletionRequest`; both answers are written from the same
per-choice events (server/choices.py). A body with `prompt` is OpenAI's, any other Tabby's.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..choices import ChoiceEnd, ChoiceRun, Delta, Failure, outcome_error
from ..errors import ApiError
from ..schemas import (Choice, CompletionRequest, CompletionResponse, DebugData, OpenAIChoice,
                       OpenAICompletionRequest, OpenAICompletionResponse, StreamChoice, StreamEvent, Usage)
from ..state import Server, error_response, server_of
from ..worker import Job, QueueFull


async def completions(request: Request) -> Response:
    srv = server_of(request)
    token = srv.authenticate(request)
    req, openai_body = _request(srv, await srv.read_json(request))
    key = srv.supersede_key(request, token, req.user)
    job = srv.service.make_job(req, key)
    try:
        srv.worker.submit(job)
    except QueueFull as exc:
        raise ApiError(503, "overloaded", str(exc), {"Retry-After": "1"}) from None
    srv.remember(job)
    srv.metrics.queue_depth.set(srv.worker.depth)
    answer = OpenAIAnswer(job, srv.model_name) if openai_body else TabbyAnswer(job)
    deltas = ("raw" if req.stream_raw else "lines") if req.stream else None
    run = ChoiceRun(srv.service, srv.metrics, job, req.n, deltas)
    if req.stream:
        return EventSourceResponse(_stream(srv, req, run, answer), ping=15)
    return await _complete(srv, req, run, answer, request)


def _request(srv: Server, data: dict) -> tuple[CompletionRequest, bool]:
    """The body as the one request form the pipeline reads, and whether it was OpenAI's."""
    if "prompt" not in data:
        return srv.validate(CompletionRequest, data), False
    if "segments" in data or "debug_options" in data:
        raise ApiError(422, "invalid_request", "a body is either OpenAI's (`prompt`) or Tabby's "
                                               "(`segments`, `debug_options`), not both")
    oai = srv.validate(OpenAICompletionRequest, data)
    if oai.echo:
        raise ApiError(422, "invalid_request", "echo is not supported: the answer holds the completion only")
    if oai.logprobs is not None:
        raise ApiError(422, "invalid_request", "logprobs are not supported")
    return oai.to_tabby(), True


class TabbyAnswer:
    """Tabby's JSON answer; SSE events with kodkod's streaming extension."""

    def __init__(self, job: Job):
        self.job = job

    def body(self, run: ChoiceRun, ends: list[ChoiceEnd], req: CompletionRequest) -> dict[str, Any]:
        debug = None
        opts = req.debug_options
        if opts and (opts.return_prompt or opts.return_snippets):
            decisions = [d for e in ends for d in e.decisions]
            debug = DebugData(prompt=getattr(run.info.prompt, "text", None) if opts.return_prompt else None,
                              decisions=decisions or None)
        choices = [Choice(index=e.index, text=e.completion, finish_reason=e.finish_reason) for e in ends]
        return CompletionResponse(id=self.job.id, choices=choices, debug_data=debug).model_dump(exclude_none=True)

    def delta(self, d: Delta) -> str:
        return self._event([StreamChoice(index=d.index, text=d.text)])

    def choice_end(self, e: ChoiceEnd, error: ApiError | None) -> str:
        return self._event([StreamChoice(index=e.index, text=e.text, finish_reason=e.finish_reason,
                                         completion=e.completion)], error)

    def failure(self, error: ApiError) -> str:
        return self._event([], error)

    def _event(self, choices: list[StreamChoice], error: ApiError | None = None) -> str:
        err = {"type": error.type, "message": error.message} if error else None
        return StreamEvent(id=self.job.id, choices=choices, error=err).model_dump_json(exclude_none=True)


class OpenAIAnswer:
    """OpenAI's `text_completion` answer and chunks; a failed stream sends `{"error": ...}`."""

    def __init__(self, job: Job, model: str):
        self.job, self.model = job, model
        self.created = int(time.time())

    def body(self, run: ChoiceRun, ends: list[ChoiceEnd], req: CompletionRequest) -> dict[str, Any]:
        prompt_tokens = len(run.info.prompt.ids) if run.info else 0
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=self.job.tokens,
                      total_tokens=prompt_tokens + self.job.tokens)
        choices = [OpenAIChoice(text=e.completion, index=e.index, finish_reason=e.finish_reason) for e in ends]
        return self._answer(choices, usage).model_dump()

    def delta(self, d: Delta) -> str:
        return self._answer([OpenAIChoice(text=d.text, index=d.index)]).model_dump_json(exclude={"usage"})

    def choice_end(self, e: ChoiceEnd, error: ApiError | None) -> str:
        if error is not None:  # OpenAI has no "cancelled" finish: the stream ends with the error
            return self.failure(error)
        return self._answer([OpenAIChoice(text=e.text, index=e.index, finish_reason=e.finish_reason)]
                            ).model_dump_json(exclude={"usage"})

    def failure(self, error: ApiError) -> str:
        return error_body(error)

    def _answer(self, choices: list[OpenAIChoice], usage: Usage | None = None) -> OpenAICompletionResponse:
        return OpenAICompletionResponse(id=self.job.id, created=self.created, model=self.model,
                                        choices=choices, usage=usage)


def error_body(error: ApiError) -> str:
    return json.dumps({"error": {"type": error.type, "message": error.message}})


async def _watch_disconnect(request: Request, job: Job) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel("disconnected")
            return


async def _complete(srv: Server, req: CompletionRequest, run: ChoiceRun, answer, request: Request) -> Response:
    job = run.job
    watcher = asyncio.create_task(_watch_disconnect(request, job))
    try:
        ends: list[ChoiceEnd] = []
        async for ev in run.events():
            if isinstance(ev, ChoiceEnd):
                ends.append(ev)
            elif isinstance(ev, Failure):
                srv.log_completion(job, req, run.info, run.completions, ev.outcome)
                return error_response(ev.error.status, ev.error.type, ev.error.message, ev.error.headers)
        srv.log_completion(job, req, run.info, run.completions, "ok")
        return JSONResponse(answer.body(run, ends, req))
    except asyncio.CancelledError:
        job.cancel("disconnected")
        raise
    finally:
        watcher.cancel()


async def _stream(srv: Server, req: CompletionRequest, run: ChoiceRun, answer):
    job = run.job
    error_sent = False
    try:
        async for ev in run.events():
            if isinstance(ev, Delta):
                yield {"data": answer.delta(ev)}
            elif isinstance(ev, ChoiceEnd):
                # a choice cut short because the whole job was cancelled carries the reason
                error = outcome_error(job.cancel_reason, job) if ev.finish_reason == "cancelled" and job.cancel_reason else None
                error_sent = error is not None
                yield {"data": answer.choice_end(ev, error)}
            elif not error_sent:
                yield {"data": answer.failure(ev.error)}
        yield {"data": "[DONE]"}
    finally:
        if not job.done_event.is_set() and not job.cancelled:
            job.cancel("disconnected")
            run.outcome = "disconnected"
        srv.log_completion(job, req, run.info, run.completions, run.outcome)
