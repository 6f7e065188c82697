"""Helpers for the server tests (importable: pytest puts this folder on sys.path)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time


from tests.conftest import ROOT, fixture_dir  # noqa: F401 (re-exported for the server tests)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_live(app, **overrides):
    """Run `app` under a real uvicorn server on 127.0.0.1, configured as `kodkod serve` configures
    it (server/transport.py: its connection limits); yields the base URL. `overrides` go to
    uvicorn.Config (`log_config=None`: uvicorn's records reach pytest's log capture)."""
    import uvicorn

    from server.config import ServerConfig
    from server.transport import uvicorn_config

    port = free_port()
    srv = getattr(app.state, "server", None)
    config = srv.config if srv is not None else ServerConfig()
    kw = dict(host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=1)
    server = uvicorn.Server(uvicorn_config(app, config, **{**kw, **overrides}))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not t.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(10)


def wait_done(job, timeout=10.0):
    assert job.done_event.wait(timeout), "the job did not finish"
    return job


def sse_events(lines):
    """Parse `data:` payloads from an iterator of SSE lines."""
    for line in lines:
        if line.startswith("data:"):
            data = line[5:].strip()
            yield data if data == "[DONE]" else json.loads(data)


async def eventually(cond, tries: int = 500, every_s: float = 0.01) -> None:
    """Wait until cond() holds (polling), or fail the test."""
    for _ in range(tries):
        if cond():
            return
        await asyncio.sleep(every_s)
    raise AssertionError("condition not reached")
