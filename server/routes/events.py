"""POST /v1/events: Tabby's view/select/dismiss events, counted and logged."""
from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..errors import ApiError
from ..schemas import EventRequest
from ..state import server_of


async def events(request: Request) -> Response:
    srv = server_of(request)
    srv.authenticate(request)
    try:
        ev = await srv.read_model(request, EventRequest)
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
