"""`kodkod serve`: load a model and run the completion server."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from server.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model directory or known model name (default: the default model, "
                                   "fetched on first use: served as imported fp16 on a CPU, as EXL2 on a GPU)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8080)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], help="where the model runs (default auto)")
    p.add_argument("--backend", choices=["auto", "cuda", "torch"],
                   help="auto (default): the CUDA kernels on a GPU, else the torch path; cuda: insist; torch")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="number format (default auto: fp16 on a GPU; on the CPU bf16 where it is native, else fp32)")
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
    p.add_argument("--kv-pool-mb", type=int, help="memory for recent prompts' KV rows, MiB (default 512; 0: off)")
    p.add_argument("--prompt-weights-mb", type=int,
                   help="GPU: memory for fp16 copies of the layers' weights kept for prompts, MiB (default 1024; 0: never)")
    p.add_argument("--draft-tokens", type=int, help="prompt-lookup speculative decoding: longest draft (0: off; default 4 on the CPU, off on a GPU)")


def resolve_model(name: str | None, home: Path, device: str = "auto", engine: str = "local") -> Path:
    """A directory as given, else a known model name (or the default), made ready first (server.first_start).

    On a CPU (and for `--engine openai`, which reads only the tokenizer) that is the imported fp16
    model; on a GPU what the model's entry says (`KnownModel.gpu_form`: the fp16 import for the
    default model, else its EXL2 conversion). What the first start will do is printed before it starts.
    """
    if name and Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    from server.first_start import plan, prepare

    gpu = engine == "local" and device != "cpu" and _cuda_available()
    p = plan(name, home, gpu)
    if not p.ready:
        print(p.describe(home), file=sys.stderr, flush=True)
    return prepare(p, home)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_home(home: Path) -> None:
    """KODKOD_HOME must be writable (models, logs): said in one line before any work starts."""
    import os
    import tempfile

    who = f"uid {os.getuid()}" if hasattr(os, "getuid") else "this user"
    try:
        home.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=home):
            pass
    except OSError as exc:
        raise UsageError(f"KODKOD_HOME {home} is not writable by {who} ({exc.strerror or exc}): mount a volume "
                         f"that {who} can write there, or set KODKOD_HOME to a writable directory") from None


def bind_port(host: str, port: int):
    """Take the port now, before minutes of model loading; a taken port is said in one line."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        import errno

        if exc.errno == errno.EADDRINUSE:
            raise UsageError(f"port {port} on {host} is already in use (another kodkod or server?): "
                             f"stop it or choose another with --port / KODKOD_PORT / PORT") from None
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _environment() -> dict[str, str]:
    """os.environ, with PORT (set by container platforms) standing in for an unset KODKOD_PORT."""
    import os

    env = dict(os.environ)
    if not env.get("KODKOD_PORT") and env.get("PORT"):
        env["KODKOD_PORT"] = env["PORT"]
    return env


def run(args) -> int:
    import logging

    from server.config import ConfigError, load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per upstream request
    cli = {k: getattr(args, k, None) for k in ("model", "host", "port", "device", "backend", "dtype", "tokens",
                                                 "log_prompts", "timeout_s", "queue_size", "engine", "upstreams",
                                                 "upstream_model", "upstream_token", "kv_pool_mb", "draft_tokens",
                                                 "prompt_weights_mb")}
    try:
        config = load_config(cli, env=_environment(), config_file=args.config)
    except ConfigError as exc:
        print(f"kodkod serve: {exc}", file=sys.stderr)
        return 2

    from server.commands.common import check_device

    if config.engine == "local":
        check_device(config.device)
    if config.log_file is None or not (config.model and Path(config.model).expanduser().is_dir()):
        check_home(config.home)  # the log goes there, or a model will
    sock = bind_port(config.host, config.port)
    try:
        path = resolve_model(config.model, config.home, config.device, config.engine)
    except UsageError:
        raise
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
    port = sock.getsockname()[1]
    print(f"kodkod: serving {srv.model_name} ({where}) on http://{config.host}:{port} "
          f"(log: {config.events_path})", file=sys.stderr, flush=True)
    from server.transport import run as serve_app

    # uvicorn, with the connection limits of server/transport.py, on the port taken before the model loaded
    return 0 if serve_app(app, config, sockets=[sock]) else 1


def _local_app(config, path: Path):
    from server.app import create_app
    from server.commands.common import load_engine

    print(f"kodkod: loading {path} on {config.device} ...", file=sys.stderr, flush=True)
    engine = load_engine(path, device=config.device, backend=config.backend, dtype=config.dtype,
                         kv_pool_mb=config.kv_pool_mb, draft_tokens=config.draft_tokens,
                         prompt_weights_mb=config.prompt_weights_mb)
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
    if info["backend"] == "cuda":
        why += f", prompt weights {info['prompt_weights']}"
    print(f"kodkod: {info['backend']} backend{why}, {info['dtype']}, warmed up in {time.monotonic() - t:.1f} s",
          file=sys.stderr, flush=True)
