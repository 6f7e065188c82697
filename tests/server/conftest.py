"""Server test fixtures: the real tiny model, in-process apps, a real uvicorn server."""
from __future__ import annotations

import contextlib

import pytest

from srvutil import fixture_dir, serve_live

TINY = "llama-tiny-4.0bpw"


@pytest.fixture(scope="session")
def engine():
    from engine import load_model

    return load_model(fixture_dir(TINY), device="cpu")


@pytest.fixture
def make_config(tmp_path):
    from server.config import ServerConfig

    def make(**kw):
        kw.setdefault("home", tmp_path / "home")
        kw.setdefault("default_max_tokens", 8)
        # the in-process clients' Host names (TestClient's, and httpx's base_url "http://t")
        kw.setdefault("allowed_hosts", ["testserver", "t"])
        return ServerConfig(**kw)

    return make


@pytest.fixture
def make_app(engine, make_config):
    """create_app(config) with the real engine; workers are stopped afterwards."""
    from server.app import create_app

    apps = []

    def make(engine_=engine, **kw):
        app = create_app(make_config(**kw), engine_)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.state.server.worker.stop()


@pytest.fixture
def client(make_app):
    """A direct-ASGI client on a default app (no tokens)."""
    from starlette.testclient import TestClient

    with TestClient(make_app(), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def live(make_app):
    """Factory: live(**config) -> (base_url, app) running under uvicorn until the test ends."""
    stack = contextlib.ExitStack()

    def start(**kw):
        app = make_app(**kw)
        url = stack.enter_context(serve_live(app))
        return url, app

    with stack:
        yield start


@pytest.fixture
def remote(make_config):
    """Factory: remote(upstream_urls, **config) -> (base_url, app): a kodkod server in remote mode
    (engine openai, the tiny model's tokenizer) running under uvicorn until the test ends."""
    from server.app import create_app
    from server.remote import RemoteEngine, RemoteWorker
    from server.upstreams import UpstreamPool

    stack = contextlib.ExitStack()

    def start(upstreams, **kw):
        config = make_config(engine="openai", upstreams=upstreams, **kw)
        engine = RemoteEngine(fixture_dir(TINY), UpstreamPool(upstreams, timeout_s=config.timeout_s))
        app = create_app(config, engine, RemoteWorker(engine, config.queue_size, health_interval_s=0.5))
        url = stack.enter_context(serve_live(app))
        return url, app

    with stack:
        yield start


