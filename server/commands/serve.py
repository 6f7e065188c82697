"""`kodkod serve`: load a model and run the completion server."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model directory or known model name (default: the default model, "
                                   "downloaded and converted on first use)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8080)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], help="where the model runs (default auto)")
    p.add_argument("--backend", choices=["auto", "cuda", "torch"],
                   help="auto (default): the CUDA kernels on a GPU, else the torch path; cuda: insist; torch")
    p.add_argument("--token", dest="tokens", action="append", metavar="TOKEN",
                   help="accepted bearer token (repeatable); none: the server is open")
    p.add_argument("--config", help="TOML config file (flags > KODKOD_* environment > file)")
    p.add_argument("--log-prompts", action="store_true", default=None,
                   help="write prompt and completion text into the JSONL log")
    p.add_argument("--timeout", dest="timeout_s", type=float, help="seconds one request may take (default 30)")
    p.add_argument("--queue-size", type=int, help="waiting requests before 503 (default 64); "
                                                   "with --engine openai: requests in flight")
    p.add_argument("--engine", choices=["local", "openai"],
                   help="local (default): run the model here; openai: send the prompts to OpenAI-compatible "
                        "servers (--upstream), reading only the tokenizer from --model DIR")
    p.add_argument("--upstream", dest="upstreams", action="append", metavar="URL",
                   help="base URL of an OpenAI-compatible server (repeatable: round robin with failover)")
    p.add_argument("--upstream-model", help="model name to ask the upstreams for (default: the one they list)")
    p.add_argument("--upstream-token", help="bearer token for the upstreams")


def resolve_model(name: str | None, home: Path) -> Path:
    """A directory as given, else a known model name (or the default) via engine.convert.models."""
    if name and Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    try:
        from engine.convert.models import ensure_model
    except ImportError as exc:
        what = f"model {name!r}" if name else "the default model"
        raise SystemExit(f"kodkod serve: {what} is not a directory and the model downloader is not "
                         f"available ({exc}); pass --model DIR") from None
    return Path(ensure_model(name, home=home))


def run(args) -> int:
    import logging

    from server.config import ConfigError, load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per upstream request
    cli = {k: getattr(args, k, None) for k in ("model", "host", "port", "device", "backend", "tokens", "log_prompts",
                                                 "timeout_s", "queue_size", "engine", "upstreams",
                                                 "upstream_model", "upstream_token")}
    try:
        config = load_config(cli, config_file=args.config)
    except ConfigError as exc:
        print(f"kodkod serve: {exc}", file=sys.stderr)
        return 2

    import uvicorn

    try:
        path = resolve_model(config.model, config.home)
    except Exception as exc:
        print(f"kodkod serve: cannot get the model: {exc}", file=sys.stderr)
        return 1
    if config.engine == "openai":
        app = _remote_app(config, path)
        where = f"upstreams {', '.join(config.upstreams)}"
    else:
        app = _local_app(config, path)
        where = config.device
    srv = app.state.server
    if srv.service.template is None:
        print(f"kodkod serve: warning: {srv.service.template_error}; only raw prompts will work", file=sys.stderr)
    print(f"kodkod: serving {srv.model_name} ({where}) on http://{config.host}:{config.port} "
          f"(log: {config.events_path})", file=sys.stderr, flush=True)
    from server.transport import run as serve_app

    serve_app(app, config)  # uvicorn, with the connection limits of server/transport.py
    return 0


def _local_app(config, path: Path):
    from server.app import create_app
    from server.commands.common import load_engine

    print(f"kodkod: loading {path} on {config.device} ...", file=sys.stderr, flush=True)
    engine = load_engine(path, device=config.device, backend=config.backend)
    _warm_up(engine)
    return create_app(config, engine)


def _remote_app(config, path: Path):
    from server.app import create_app
    from server.remote import RemoteEngine, RemoteWorker
    from server.upstreams import UpstreamPool

    pool = UpstreamPool(config.upstreams, config.upstream_model, config.upstream_token, config.timeout_s)
    engine = RemoteEngine(path, pool)
    return create_app(config, engine, RemoteWorker(engine, config.queue_size))


def _warm_up(engine) -> None:
    """Capture the decode graphs and run a short generation before the server reports healthy."""
    import time

    t = time.monotonic()
    try:
        engine.warm_up()
    except Exception as exc:  # a warm-up failure shows up again on the first request
        print(f"kodkod serve: warm-up failed: {exc}", file=sys.stderr)
        return
    info = engine.info()
    why = f" ({info['backend_note']})" if info.get("backend_note") else ""
    print(f"kodkod: {info['backend']} backend{why}, warmed up in {time.monotonic() - t:.1f} s",
          file=sys.stderr, flush=True)
