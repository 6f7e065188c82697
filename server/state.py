"""The server's state (`Server`) and what every route needs from it: auth, request bodies, logging.

`create_app` (server/app.py) makes one `Server` and puts it on `app.state.server`;
routes (server/routes/) reach it with `server_of(request)`.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from .auth import TokenAuth
from .completion import CompletionService, Prepared
from .config import ServerConfig
from .engine_metrics import EngineStatsCollector
from .errors import ApiError
from . import json_body
from .events_log import EventLog
from .metrics import Metrics
from .schemas import CompletionRequest
from .worker import EngineWorker, Job

log = logging.getLogger("kodkod.server")
M = TypeVar("M", bound=BaseModel)
LARGE_BODY = 256 * 1024


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
        self.log = EventLog(config.events_path, field_chars=config.log_field_chars, text_chars=config.log_text_chars,
                            max_bytes=config.log_max_bytes, files=config.log_files)
        self.json_limits = json_body.JsonLimits(config.max_json_depth, config.max_json_items,
                                                config.max_json_number_chars)
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
        """The body as a JSON object, within the size and JSON limits; 400/413/415/422 otherwise,
        and a quiet 499 when the client goes away while sending it."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json" and not (ctype.startswith("application/") and ctype.endswith("+json")):
            # a web page can send text/plain anywhere without asking (no CORS preflight); JSON it cannot
            raise ApiError(415, "unsupported_media_type", "the request body must be JSON, sent with "
                                                          "`Content-Type: application/json`")
        limit = self.config.max_body_bytes
        cl = request.headers.get("content-length")
        if cl is not None and cl.isdigit() and int(cl) > limit:
            raise ApiError(413, "too_large", f"the request body is over {limit} bytes")
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise ApiError(413, "too_large", f"the request body is over {limit} bytes")
        except ClientDisconnect:
            raise ApiError(499, "client_closed_request", "the client closed the connection") from None
        if not body:
            raise ApiError(400, "invalid_json", "the request body is empty; a JSON object is expected")
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ApiError(400, "invalid_utf8", f"the request body is not valid UTF-8 (byte {exc.start})") from None
        if len(text) > LARGE_BODY:  # parsing a large body takes milliseconds: off the event loop
            data = await asyncio.to_thread(json_body.parse, text, self.json_limits)
        else:
            data = json_body.parse(text, self.json_limits)
        try:  # lone surrogates (\ud800) cannot become UTF-8 for the tokenizer
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "invalid_utf8", "the request contains an unpaired UTF-16 surrogate escape") from None
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, "invalid_json", f"the request body is not usable JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ApiError(422, "invalid_request", f"a JSON object is expected, not {type(data).__name__}")
        return data

    def supersede_key(self, request: Request, token: str | None, user: str | None) -> str | None:
        """Who a newer request may supersede: the same tenant's (its token, or without tokens the
        client's address) request with the same `user`; with a token and no `user`, the same
        token's from the same address. Without tokens and `user`: nobody."""
        addr = request.client.host if request.client else "?"
        tenant = f"token:{hashlib.sha256(token.encode()).hexdigest()[:24]}" if token else f"addr:{addr}"
        if user:
            return f"{tenant} user:{user}"
        return f"{tenant} addr:{addr}" if token else None

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
