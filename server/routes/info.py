"""The routes that describe the server: health, models, settings, metrics, API documents."""
from __future__ import annotations

import base64
import hashlib
import os
import platform

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from .. import openapi
from ..metrics import CONTENT_TYPE_LATEST
from ..schemas import HealthResponse, Healthz, ModelCard, ModelList, ServerSetting, Version
from ..state import server_of
from ..version import VERSION


async def health(request: Request) -> Response:
    srv = server_of(request)
    srv.authenticate(request)
    info = srv.engine.info() if srv.engine is not None else {}
    body = HealthResponse(
        model=srv.model_name, device=str(info.get("device") or "none"), arch=platform.machine(),
        cpu_info=srv.cpu_info, cpu_count=os.cpu_count() or 1, cuda_devices=srv.cuda_devices,
        version=Version(build_date=srv.build_date, build_timestamp=srv.build_date, git_sha="",
                        git_describe=f"v{VERSION}"),
        webserver=False,
        models={"completion": {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool, dict, list))}}
        if info else {},
    )
    return JSONResponse(body.model_dump())


async def models(request: Request) -> Response:
    """OpenAI's model list: the one model this server completes with."""
    srv = server_of(request)
    srv.authenticate(request)
    cards = [ModelCard(id=srv.model_name, created=int(srv.started))] if srv.engine is not None else []
    return JSONResponse(ModelList(data=cards).model_dump())


async def healthz(request: Request) -> Response:
    return JSONResponse(Healthz().model_dump())


async def server_setting(request: Request) -> Response:
    server_of(request).authenticate(request)
    return JSONResponse(ServerSetting().model_dump())


async def metrics(request: Request) -> Response:
    srv = server_of(request)
    srv.metrics.queue_depth.set(srv.worker.depth)
    return Response(srv.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def openapi_json(request: Request) -> Response:
    return JSONResponse(openapi.document(VERSION))


# Swagger UI's assets come from the swagger-ui-bundle package: the page works offline.
SWAGGER_SCRIPT = ('window.onload = () => { window.ui = SwaggerUIBundle({url: "/api-docs/openapi.json", '
                  'dom_id: "#swagger-ui"}); };')
SWAGGER_HTML = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>kodkod API</title>
<link rel="stylesheet" href="/swagger-ui/static/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/swagger-ui/static/swagger-ui-bundle.js"></script>
<script>{SWAGGER_SCRIPT}</script>
<noscript>The API description is at <a href="/api-docs/openapi.json">/api-docs/openapi.json</a>.</noscript>
</body></html>"""
# the pages' content security policy: scripts from here and the one inline script above (by its hash);
# Swagger UI sets inline styles and shows data: images
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(SWAGGER_SCRIPT.encode()).digest()).decode()
DOCS_CSP = (f"default-src 'self'; script-src 'self' 'sha256-{_SCRIPT_HASH}'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


async def swagger_ui(request: Request) -> Response:
    return HTMLResponse(SWAGGER_HTML)
