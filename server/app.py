"""The HTTP application: Tabby's routes, plus streaming, metrics and health.

`create_app(config, engine)` builds a Starlette app around one engine worker.
Routes (see docs/server.md):
  POST /v1/completions        GET|POST /v1/health        POST /v1/events
  GET  /v1beta/server_setting GET /healthz (no auth)     GET /metrics
  GET  /api-docs/openapi.json GET /swagger-ui
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import time
from contextlib import asynccontextmanager
from typing import Any

from pydantic import BaseModel, ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from . import openapi
from .auth import TokenAuth
from .completion import CompletionService, Prepared
from .config import ServerConfig
from .errors import ApiError
from .events_log import EventLog
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .schemas import (Choice, CompletionRequest, CompletionResponse, DebugData, EventRequest, Healthz,
                      HealthResponse, ServerSetting, StreamChoice, StreamEvent, Version)
from .worker import EngineWorker, Job, JobTimeout, QueueFull

log = logging.getLogger("kodkod.server")

try:
    from importlib.metadata import version as _pkg_version
    VERSION = _pkg_version("kodkod")
except Exception:  # pragma: no cover
    VERSION = "0.1.0"


def error_response(status: int, type: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": type, "message": message}}, status_code=status, headers=headers)


class Outcome(Exception):
    """A job that ended without completing (superseded, disconnected, timed out...)."""

    def __init__(self, reason: str):
        self.reason = reason


OUTCOME_ERRORS = {
    "superseded": (409, "superseded", "a newer request from the same user superseded this one"),
    "timeout": (504, "timeout", "the request took longer than the server's time limit"),
    "disconnected": (499, "client_closed_request", "the client closed the connection"),
    "shutdown": (503, "shutting_down", "the server is shutting down"),
    "cancelled": (499, "cancelled", "the request was cancelled"),
}


class Server:
    """The app's state: config, engine, worker, service, metrics, log."""

    def __init__(self, config: ServerConfig, engine=None):
        self.config = config
        self.engine = engine
        self.auth = TokenAuth(config.tokens)
        self.metrics = Metrics()
        self.log = EventLog(config.events_path)
        self.service = CompletionService(engine, config)
        self.worker = EngineWorker(engine, config.queue_size, on_job_done=self._job_done)
        self.jobs: dict[str, Job] = {}  # recent jobs by id (tests, debugging); bounded
        self.started = time.time()

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
        fields: dict[str, Any] = dict(
            id=job.id, language=req.language, stream=req.stream, n=req.n,
            prompt_chars=len(prompt_text), prompt_tokens=len(info.prompt.ids) if info else 0,
            completion_chars=sum(len(t) for t in texts), completion_tokens=job.tokens,
            latency_ms=round((time.monotonic() - job.submitted) * 1000, 1),
            outcome=outcome, cancelled=job.cancel_reason is not None, cancel_reason=job.cancel_reason,
        )
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

    async def read_model(self, request: Request, model: type[BaseModel]) -> BaseModel:
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
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            parts = []
            for e in exc.errors()[:5]:
                loc = ".".join(str(x) for x in e["loc"]) or "body"
                parts.append(f"{loc}: {e['msg']}")
            raise ApiError(422, "invalid_request", "; ".join(parts)) from None


def _srv(request: Request) -> Server:
    return request.app.state.server


# ---------------------------------------------------------------- completions
async def completions(request: Request) -> Response:
    srv = _srv(request)
    token = srv.authenticate(request)
    req: CompletionRequest = await srv.read_model(request, CompletionRequest)  # type: ignore[assignment]
    key = f"user:{req.user}" if req.user else (f"token:{token}" if token else None)
    job = srv.service.make_job(req, key)
    try:
        srv.worker.submit(job)
    except QueueFull as exc:
        raise ApiError(503, "overloaded", str(exc), {"Retry-After": "1"}) from None
    srv.remember(job)
    srv.metrics.queue_depth.set(srv.worker.depth)
    if req.stream:
        return EventSourceResponse(_stream(srv, job, req), ping=15)
    return await _complete(srv, job, req, request)


async def _watch_disconnect(request: Request, job: Job) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel("disconnected")
            return


async def _complete(srv: Server, job: Job, req: CompletionRequest, request: Request) -> Response:
    watcher = asyncio.create_task(_watch_disconnect(request, job))
    info: Prepared | None = None
    early: list = []
    raw = [""] * req.n
    finish: list[str | None] = [None] * req.n
    texts: list[str] = []
    try:
        while True:
            item = await job.next()
            if item.kind == "prepared":
                info = item.value
                early = [srv.service.early_stop(info) for _ in range(req.n)]
            elif item.kind == "token":
                i = item.index
                raw[i] += item.value.text
                if item.value.finish_reason:
                    finish[i] = _finish_reason(job, i, item.value.finish_reason)
                elif early[i].check(raw[i]):
                    job.stop_choice(i)
                    srv.metrics.early_stops.inc()
            elif item.kind == "error":
                raise item.value
            elif item.kind == "end":
                break
        if job.cancel_reason is not None:
            raise Outcome(job.cancel_reason)
        assert info is not None
        decisions: list[str] = []
        for r in raw:
            t, d = srv.service.finish_text(r, info)
            texts.append(t)
            decisions += d
        debug = None
        if req.debug_options and (req.debug_options.return_prompt or req.debug_options.return_snippets):
            debug = DebugData(prompt=getattr(info.prompt, "text", None) if req.debug_options.return_prompt else None,
                              decisions=decisions or None)
        body = CompletionResponse(
            id=job.id,
            choices=[Choice(index=i, text=t, finish_reason=f) for i, (t, f) in enumerate(zip(texts, finish))],
            debug_data=debug,
        )
        srv.log_completion(job, req, info, texts, "ok")
        return JSONResponse(body.model_dump(exclude_none=True))
    except JobTimeout:
        srv.log_completion(job, req, info, texts, "timeout")
        status, type_, _ = OUTCOME_ERRORS["timeout"]
        return error_response(status, type_, f"the request took longer than {srv.config.timeout_s:g} s")
    except Outcome as o:
        srv.log_completion(job, req, info, texts, o.reason)
        status, type_, msg = OUTCOME_ERRORS.get(o.reason, OUTCOME_ERRORS["cancelled"])
        return error_response(status, type_, msg)
    except asyncio.CancelledError:
        job.cancel("disconnected")
        raise
    except ApiError:
        raise
    except Exception as exc:
        job.cancel("error")
        srv.log_completion(job, req, info, texts, "error")
        log.exception("completion %s failed", job.id)
        return error_response(500, "internal_error", f"{type(exc).__name__}: {exc}")
    finally:
        watcher.cancel()


def _finish_reason(job: Job, index: int, reason: str) -> str:
    """A choice the server ended early, because its completion was settled, finished with "stop"."""
    if reason == "cancelled" and job.cancel_reason is None and index in job.stopped_choices:
        return "stop"
    return reason


def _event(job: Job, choices: list[StreamChoice], error: tuple[str, str] | None = None) -> str:
    ev = StreamEvent(id=job.id, choices=choices,
                     error={"type": error[0], "message": error[1]} if error else None)
    return ev.model_dump_json(exclude_none=True)


async def _stream(srv: Server, job: Job, req: CompletionRequest):
    info: Prepared | None = None
    early: list = []
    raw = [""] * req.n
    texts: list[str] = []
    outcome = "ok"
    error_sent = False

    def cancel_error() -> tuple[str, str]:
        _, type_, msg = OUTCOME_ERRORS.get(job.cancel_reason or "cancelled", OUTCOME_ERRORS["cancelled"])
        return type_, msg

    try:
        while True:
            try:
                item = await job.next()
            except JobTimeout as exc:
                outcome, error_sent = "timeout", True
                yield {"data": _event(job, [], ("timeout", str(exc)))}
                break
            if item.kind == "prepared":
                info = item.value
                early = [srv.service.early_stop(info) for _ in range(req.n)]
            elif item.kind == "token":
                ev = item.value
                raw[item.index] += ev.text
                delta = srv.service.stream_delta(ev.text, info)
                if ev.finish_reason is None:
                    if delta:
                        yield {"data": _event(job, [StreamChoice(index=item.index, text=delta)])}
                    if early[item.index].check(raw[item.index]):
                        job.stop_choice(item.index)
                        srv.metrics.early_stops.inc()
                    continue
                text, _ = srv.service.finish_text(raw[item.index], info)
                texts.append(text)
                err = None
                if ev.finish_reason == "cancelled" and job.cancel_reason:
                    err, error_sent = cancel_error(), True
                reason = _finish_reason(job, item.index, ev.finish_reason)
                yield {"data": _event(job, [StreamChoice(index=item.index, text=delta, finish_reason=reason,
                                                         completion=text)], err)}
            elif item.kind == "error":
                outcome, error_sent = "error", True
                log.error("completion %s failed: %r", job.id, item.value)
                yield {"data": _event(job, [], ("internal_error", f"{type(item.value).__name__}: {item.value}"))}
                break
            elif item.kind == "end":
                if job.cancel_reason and not error_sent:
                    error_sent = True
                    yield {"data": _event(job, [], cancel_error())}
                break
        if job.cancel_reason and outcome == "ok":
            outcome = job.cancel_reason
        yield {"data": "[DONE]"}
    finally:
        if not job.done_event.is_set() and not job.cancelled:
            job.cancel("disconnected")
            outcome = "disconnected"
        srv.log_completion(job, req, info, texts, outcome)


# ---------------------------------------------------------------- other routes
async def events(request: Request) -> Response:
    srv = _srv(request)
    srv.authenticate(request)
    try:
        ev: EventRequest = await srv.read_model(request, EventRequest)  # type: ignore[assignment]
    except ApiError as exc:  # Tabby answers 400 to any event it cannot use
        if exc.status == 422:
            exc.status = 400
        raise
    select_kind = request.query_params.get("select_kind")
    if select_kind is not None and select_kind not in ("line",):
        raise ApiError(400, "invalid_request", f"select_kind must be 'line', not {select_kind[:40]!r}")
    srv.metrics.events.labels(ev.type).inc()
    srv.log.write("event", **ev.model_dump(exclude_none=True), **({"select_kind": select_kind} if select_kind else {}))
    return JSONResponse({})


def _cpu_info() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cuda_devices() -> list[str]:
    try:
        import torch
        if torch.cuda.is_available():
            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:
        pass
    return []


async def health(request: Request) -> Response:
    srv = _srv(request)
    srv.authenticate(request)
    info = srv.engine.info() if srv.engine is not None else {}
    name = str(info.get("name") or "none")
    device = str(info.get("device") or "none")
    body = HealthResponse(
        model=name, device=device, arch=platform.machine(), cpu_info=srv.cpu_info, cpu_count=os.cpu_count() or 1,
        cuda_devices=srv.cuda_devices,
        version=Version(build_date=srv.build_date, build_timestamp=srv.build_date, git_sha="", git_describe=f"v{VERSION}"),
        webserver=False,
        models={"completion": {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool, dict))}} if info else {},
    )
    return JSONResponse(body.model_dump())


async def healthz(request: Request) -> Response:
    return JSONResponse(Healthz().model_dump())


async def server_setting(request: Request) -> Response:
    _srv(request).authenticate(request)
    return JSONResponse(ServerSetting().model_dump())


async def metrics(request: Request) -> Response:
    srv = _srv(request)
    srv.metrics.queue_depth.set(srv.worker.depth)
    return Response(srv.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def openapi_json(request: Request) -> Response:
    return JSONResponse(openapi.document(VERSION))


# Swagger UI's assets come from the swagger-ui-bundle package: the page works offline.
SWAGGER_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>kodkod API</title>
<link rel="stylesheet" href="/swagger-ui/static/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/swagger-ui/static/swagger-ui-bundle.js"></script>
<script>window.onload = () => { window.ui = SwaggerUIBundle({url: "/api-docs/openapi.json", dom_id: "#swagger-ui"}); };</script>
<noscript>The API description is at <a href="/api-docs/openapi.json">/api-docs/openapi.json</a>.</noscript>
</body></html>"""


async def swagger_ui(request: Request) -> Response:
    return HTMLResponse(SWAGGER_HTML)


# ---------------------------------------------------------------- errors, metrics middleware
async def _api_error(request: Request, exc: ApiError) -> Response:
    return error_response(exc.status, exc.type, exc.message, exc.headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    types = {404: "not_found", 405: "method_not_allowed"}
    return error_response(exc.status_code, types.get(exc.status_code, "http_error"), str(exc.detail),
                          dict(exc.headers or {}))


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)
    return error_response(500, "internal_error", f"{type(exc).__name__}: {exc}")


class MetricsMiddleware:
    """Counts requests and their latency per route (pure ASGI: does not buffer streams)."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.monotonic()
        status = {"code": 500}

        async def _send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        path = scope.get("path", "")
        route = path if path in ROUTE_PATHS else "other"
        try:
            await self.app(scope, receive, _send)
        finally:
            self.metrics.requests.labels(route, scope.get("method", ""), str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(time.monotonic() - start)


ROUTES = [
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/events", events, methods=["POST"]),
    Route("/v1/health", health, methods=["GET", "POST"]),
    Route("/v1beta/server_setting", server_setting, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/api-docs/openapi.json", openapi_json, methods=["GET"]),
    Route("/swagger-ui", swagger_ui, methods=["GET"]),
    Mount("/swagger-ui/static", StaticFiles(directory=str(swagger_ui_path)), name="swagger-static"),
]
ROUTE_PATHS = {r.path for r in ROUTES}


def create_app(config: ServerConfig | None = None, engine=None) -> Starlette:
    """The ASGI app. The worker thread starts with the app's lifespan (or on first use)."""
    config = config or ServerConfig()
    srv = Server(config, engine)
    srv.cpu_info = _cpu_info()
    srv.cuda_devices = _cuda_devices() if engine is not None and "cuda" in str(engine.info().get("device")) else []
    srv.build_date = time.strftime("%Y-%m-%d", time.gmtime())

    @asynccontextmanager
    async def lifespan(app):
        srv.worker.start()
        if srv.auth.open:
            log.warning("no tokens configured (--token, KODKOD_TOKENS or the config file): "
                        "the server is open to anyone who can reach it")
        try:
            yield
        finally:
            srv.worker.stop()

    app = Starlette(
        routes=ROUTES,
        exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _internal_error},
        lifespan=lifespan,
    )
    app.state.server = srv
    srv.worker.start()  # also without a lifespan (direct ASGI calls in tests)
    app.add_middleware(MetricsMiddleware, metrics=srv.metrics)
    return app
