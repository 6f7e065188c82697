"""Every HTTP route of the server, one module per job (see docs/server.md)."""
from __future__ import annotations

from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from .completions import completions
from .events import events
from .info import health, healthz, metrics, models, openapi_json, server_setting, swagger_ui

ROUTES = [
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/models", models, methods=["GET"]),
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
