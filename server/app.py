"""The HTTP application: Tabby's routes, OpenAI's completions, streaming, metrics and health.

`create_app(config, engine)` builds a Starlette app around one engine worker (or, with
`worker=`, the remote engine's dispatcher). The routes live in server/routes/, the
state they share in server/state.py; this module wires them together with the error
handlers and the metrics middleware.
"""
from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from .config import ServerConfig
from .errors import ApiError
from .guards import HostGuard
from .metrics import Metrics
from .routes import ROUTE_PATHS, ROUTES
from .routes.info import DOCS_CSP
from .state import Server, error_response

from .machine import cpu_name, cuda_devices

log = logging.getLogger("kodkod.server")


# ---------------------------------------------------------------- errors, metrics middleware
async def _api_error(request: Request, exc: ApiError) -> Response:
    return error_response(exc.status, exc.type, exc.message, exc.headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    types = {404: "not_found", 405: "method_not_allowed"}
    return error_response(exc.status_code, types.get(exc.status_code, "http_error"), str(exc.detail),
                          dict(exc.headers or {}))


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)  # a server bug: its text stays in the log
    return error_response(500, "internal_error", "the server failed; its log says why")


async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
    return error_response(499, "client_closed_request", "the client closed the connection")  # goes nowhere


# label values of the request metrics: known methods only (an invented method is "other")
METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


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
        route = path if path in ROUTE_PATHS else "/swagger-ui/static" if path.startswith("/swagger-ui/static/") \
            else "other"
        method = scope.get("method", "")
        method = method if method in METHODS else "other"
        try:
            await self.app(scope, receive, _send)
        finally:
            self.metrics.requests.labels(route, method, str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(time.monotonic() - start)


def create_app(config: ServerConfig | None = None, engine=None, worker=None) -> Starlette:
    """The ASGI app. The worker starts with the app's lifespan (or on first use)."""
    config = config or ServerConfig()
    srv = Server(config, engine, worker)
    srv.cpu_info = cpu_name()
    srv.cuda_devices = cuda_devices() if engine is not None and "cuda" in str(engine.info().get("device")) else []
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
            await srv.worker.aclose()

    app = Starlette(
        routes=ROUTES,
        exception_handlers={ApiError: _api_error, HTTPException: _http_error, ClientDisconnect: _client_gone,
                            Exception: _internal_error},
        lifespan=lifespan,
    )
    app.router.redirect_slashes = False  # its redirect's Location would come from the Host header
    app.state.server = srv
    srv.worker.start()  # also without a lifespan (direct ASGI calls in tests)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"], max_age=600)
    app.add_middleware(HostGuard, srv=srv, docs_csp=DOCS_CSP)
    app.add_middleware(MetricsMiddleware, metrics=srv.metrics)
    return app
