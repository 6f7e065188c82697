"""The server's state (`Server`) and what every route needs from it: auth, request bodies, logging.

`create_app` (server/app.py) makes one `Server` and puts it on `app.state.server`;
routes (server/routes/) reach it with `server_of(request)`.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse

from .auth import TokenAuth
from .completion import CompletionService, Prepared
from .config import ServerConfig
from .engine_metrics import EngineStatsCollector
from .errors import ApiError
from .events_log import EventLog
from .metrics import Metrics
from .schemas import CompletionRequest
from .worker import EngineWorker, Job

log = logging.getLogger("kodkod.server")
M = TypeVar("M", bound=BaseModel)


def error_response(status: int, type: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": type, "message": message}}, status_code=status, headers=headers)


class Server:
    """The app's state: config, engine, worker, service, metrics, log."""

    def __init__(self, config: ServerConfig, engine=None, worker=None):
        self.config = config
        self.engine = engine
        self.auth = TokenAuth(config.tokens)
        self.metrics = Metrics()
        if engine is not None:
            self.metrics.registry.register(EngineStatsCollector(engine))
        self.log = EventLog(config.events_path)
        self.service = CompletionService(engine, config)
        # the local engine's worker thread, or the remote engine's dispatcher (server/remote.py)
        self.worker = worker or EngineWorker(engine, config.queue_size)
        self.worker.on_job_done = self._job_done
        self.jobs: dict[str, Job] = {}  # recent jobs by id (tests, debugging); bounded
        self.started = time.time()
        info = engine.info() if engine is not None else {}
        self.model_name = str(info.get("name") or "none")

    # ---- bookkeeping ----
    def _job_done(self, job: Job) -> None:
        self.metrics.tokens.inc(job.tokens)
        self.metrics.queue_depth.set(self.worker.depth)
        if job.cancel_reason:
            self.metrics.cancellations.labels(job.cancel_reason).inc()
            self.metrics.count_after_cancel(job)

    def remember(self, job: Job) -> None:
        self.jobs[job.id] = job
        while len(self.jobs) > 256:
            self.jobs.pop(next(iter(self.jobs)))

    def log_completion(self, job: Job, req: CompletionRequest, info: Prepared | None, texts: list[str],
                       outcome: str) -> None:
        prompt_text = getattr(info.prompt, "text", "") if info else ""
        latency_ms = round((time.monotonic() - job.submitted) * 1000, 1)
        fields: dict[str, Any] = dict(
            id=job.id, language=req.language, stream=req.stream, n=req.n,
            prompt_chars=len(prompt_text), prompt_tokens=len(info.prompt.ids) if info else 0,
            completion_chars=sum(len(t) for t in texts), completion_tokens=job.tokens,
            latency_ms=latency_ms, outcome=outcome, cancelled=job.cancel_reason is not None,
            cancel_reason=job.cancel_reason,
        )
        # the console gets one line per completion: a cancelled request shows up where people look
        log.info("completion %s %s: %d tokens, %.0f ms%s", job.id[5:13], outcome, job.tokens, latency_ms,
                 " (stream)" if req.stream else "")
        if self.config.log_prompts:
            fields["prompt"] = prompt_text
            fields["completions"] = texts
        self.log.write("completion", **fields)
        self.metrics.completions.labels(outcome).inc()
        self.metrics.completion_latency.observe(time.monotonic() - job.submitted)

    # ---- auth and input ----
    def authenticate(self, request: Request) -> str | None:
        if self.auth.open:
            return None
        token = self.auth.check(request.headers.get("authorization"))
        if token is None:
            raise ApiError(401, "unauthorized", "a valid `Authorization: Bearer <token>` header is required",
                           {"WWW-Authenticate": "Bearer"})
        return token

    async def read_json(self, request: Request) -> dict:
        """The body as a JSON object, within the size limit; 400/413/422 otherwise."""
        limit = self.config.max_body_bytes
        cl = request.headers.get("content-length")
        if cl is not None and cl.isdigit() and int(cl) > limit:
            raise ApiError(413, "too_large", f"the request body is over {limit} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, "too_large", f"the request body is over {limit} bytes")
        if not body:
            raise ApiError(400, "invalid_json", "the request body is empty; a JSON object is expected")
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ApiError(400, "invalid_utf8", f"the request body is not valid UTF-8 (byte {exc.start})") from None
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ApiError(400, "invalid_json", f"the request body is not valid JSON: {exc}") from None
        try:  # lone surrogates (\ud800) cannot become UTF-8 for the tokenizer
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "invalid_utf8", "the request contains an unpaired UTF-16 surrogate escape") from None
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, "invalid_json", f"the request body is not usable JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ApiError(422, "invalid_request", f"a JSON object is expected, not {type(data).__name__}")
        return data

    @staticmethod
    def validate(model: type[M], data: dict) -> M:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            parts = []
            for e in exc.errors()[:5]:
                loc = ".".join(str(x) for x in e["loc"]) or "body"
                parts.append(f"{loc}: {e['msg']}")
            raise ApiError(422, "invalid_request", "; ".join(parts)) from None

    async def read_model(self, request: Request, model: type[M]) -> M:
        return self.validate(model, await self.read_json(request))


def server_of(request: Request) -> Server:
    return request.app.state.server
