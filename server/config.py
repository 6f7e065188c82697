"""Server configuration: one pydantic model, three sources.

Precedence: command-line flags > environment (`KODKOD_*`) > TOML file (`--config`)
> defaults. Every field can come from any source; the environment variable of a
field is `KODKOD_` + its name in upper case (`KODKOD_PORT`, `KODKOD_TOKENS` as a
comma-separated list, `KODKOD_LOG_PROMPTS=1`).
"""
from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import KodkodError

ENV_PREFIX = "KODKOD_"


class ConfigError(KodkodError, ValueError):
    """A configuration that cannot be used, with a message that says why and where."""


def default_home() -> Path:
    return Path(os.environ.get("KODKOD_HOME") or Path.home() / ".cache" / "kodkod")


class ServerConfig(BaseModel):
    """Everything `kodkod serve` can be told. Field docs double as `docs/server.md`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str | None = Field(None, description="model directory or known model name; none: the default model")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8080, ge=0, le=65535, description="port to listen on")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="where the model runs")
    backend: Literal["auto", "cuda", "torch"] = Field(
        "auto", description="auto: the CUDA kernels on a GPU (torch path if they cannot run); cuda: insist; torch")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="number format the model computes in; auto: fp16 on a GPU, and on the CPU bf16 "
        "where the CPU multiplies it natively (AVX512-BF16, AMX), else fp32")
    tokens: list[str] = Field(default_factory=list, description="accepted bearer tokens; empty: open server")
    home: Path = Field(default_factory=default_home, description="KODKOD_HOME: models, logs")
    log_file: Path | None = Field(None, description="JSONL event/completion log; default <home>/logs/events.jsonl")
    log_prompts: bool = Field(False, description="also write prompt and completion text to the log")
    queue_size: int = Field(64, ge=1, le=10_000, description="requests waiting for the worker before 503")
    timeout_s: float = Field(30.0, gt=0, le=3600, description="limit for one request, queue wait included")
    max_body_bytes: int = Field(2_000_000, ge=1024, description="larger request bodies get 413")
    max_prefix_chars: int = Field(100_000, ge=1, description="longer prefix (or suffix) gets 413")
    max_tokens: int = Field(256, ge=1, le=100_000, description="largest max_tokens a request may ask")
    default_max_tokens: int = Field(64, ge=1, description="max_tokens when a request gives none")
    max_n: int = Field(4, ge=1, le=64, description="largest n (choices) a request may ask")
    prompt_budget_tokens: int = Field(2048, ge=64, description="token budget of a built prompt")
    fim_template: str | None = Field(None, description="override the model's FIM template")
    engine: Literal["local", "openai"] = Field("local", description="local: run the model here; openai: send "
                                               "prompts to OpenAI-compatible upstream servers")
    upstreams: list[str] = Field(default_factory=list, description="base URLs of the upstream servers (engine openai)")
    upstream_model: str | None = Field(None, description="model name to ask the upstreams for; "
                                                         "default: the first one their /v1/models lists")
    upstream_token: str | None = Field(None, description="bearer token for the upstreams")
    # Connections (server/transport.py): limits that hold without a token
    max_connections: int = Field(1000, ge=8, le=1_000_000, description="open connections at most; over it the "
                                 "oldest incomplete request's connection is closed, else the new one gets 503")
    head_timeout_s: float = Field(10.0, gt=0, le=3600, description="time to send a request's line and headers "
                                  "(from connecting, or from the next request's first byte); then 408")
    body_timeout_s: float = Field(30.0, gt=0, le=3600, description="time to send a request body after its "
                                  "headers; then 408")
    keep_alive_s: float = Field(5.0, gt=0, le=3600, description="an idle kept-alive connection is closed after this")
    max_head_bytes: int = Field(16_384, ge=1024, le=1_048_576, description="request line and headers at most; "
                                "larger: 431")
    # JSON bodies (server/json_body.py)
    max_json_depth: int = Field(32, ge=2, le=500, description="nesting of arrays and objects at most; deeper: 400")
    max_json_items: int = Field(10_000, ge=16, description="items of one array, or keys of one object, at most")
    max_json_number_chars: int = Field(64, ge=8, le=4000, description="characters of one JSON number at most")
    # The events log (server/events_log.py)
    log_field_chars: int = Field(256, ge=16, description="longer logged strings (ids, language, ...) are cut")
    log_text_chars: int = Field(20_000, ge=16, description="longer logged prompt or completion texts "
                                "(log_prompts) are cut")
    log_max_bytes: int = Field(100_000_000, ge=10_000, description="the events log and its rotated files "
                               "together at most")
    log_files: int = Field(4, ge=2, le=100, description="files the log rotates through: events.jsonl, "
                           "events.jsonl.1, ...; each rotates at log_max_bytes / log_files")
    # Browsers (server/guards.py)
    allowed_hosts: list[str] = Field(default_factory=list, description="without tokens: Host names served "
                                     "besides localhost, IP addresses and this machine's name; \"*\": any")
    cors_origins: list[str] = Field(default_factory=list, description="origins that may call the API from a web "
                                    "page (CORS); none by default")
    # prompt reuse and speculation (engine/kv_pool.py, engine/speculate.py): less work, the same output
    kv_pool_mb: int = Field(512, ge=0, le=1_000_000, description="memory (MiB, on the model's device) for the "
                            "KV rows of recent prompts, so a prompt sharing its start with one of them prefills "
                            "only the rest; 0: reuse only the previous prompt's")
    draft_tokens: int | None = Field(None, ge=0, le=32, description="prompt-lookup speculative decoding: "
                                     "longest draft verified per forward pass; 0: off; default: 4 on the CPU, "
                                     "off on a GPU")
    prompt_weights_mb: int = Field(1024, ge=0, le=1_000_000, description="GPU fast path: memory (MiB) for fp16 "
                                   "copies of the layers' weights, kept when they fit so that prompts skip "
                                   "dequantizing them (0.5B: 716 MiB, 0.7 ms less per prompt); 0: never")

    @field_validator("upstreams", mode="before")
    @classmethod
    def _split_upstreams(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [u for u in (s.strip() for s in v.split(",")) if u]
        if isinstance(v, list) and any(not isinstance(u, str) or not u.startswith(("http://", "https://"))
                                       for u in v):
            raise ValueError("upstreams must be http:// or https:// URLs")
        return v

    @field_validator("tokens", mode="before")
    @classmethod
    def _split_tokens(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [t for t in (s.strip() for s in v.split(",")) if t]
        if isinstance(v, list) and any(not isinstance(t, str) or not t.strip() for t in v):
            raise ValueError("tokens must be non-empty strings")
        return v

    @field_validator("allowed_hosts", "cors_origins", mode="before")
    @classmethod
    def _split_names(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [t for t in (s.strip() for s in v.split(",")) if t]
        return v

    @model_validator(mode="after")
    def _upstreams_for_openai(self) -> "ServerConfig":
        if self.engine == "openai" and not self.upstreams:
            raise ValueError("engine 'openai' needs at least one upstream URL (--upstream)")
        return self

    @property
    def events_path(self) -> Path:
        return self.log_file or self.home / "logs" / "events.jsonl"


def _env_values(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ServerConfig.model_fields:
        key = ENV_PREFIX + name.upper()
        if key in env and env[key] != "":
            out[name] = env[key]
    return out


def _toml_values(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: cannot read ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: invalid TOML ({exc})") from None
    # Accept both a flat file and one with a [server] table.
    if isinstance(data.get("server"), dict):
        data = {**{k: v for k, v in data.items() if k != "server"}, **data["server"]}
    return data


def load_config(
    cli: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> ServerConfig:
    """Merge defaults < TOML file < environment < CLI flags (None values in `cli` mean unset)."""
    env = os.environ if env is None else env
    merged: dict[str, Any] = {}
    source: dict[str, str] = {}
    config_file = config_file or env.get(ENV_PREFIX + "CONFIG") or None
    if config_file:
        for k, v in _toml_values(Path(config_file)).items():
            merged[k], source[k] = v, f"config file {config_file}"
    for k, v in _env_values(env).items():
        merged[k], source[k] = v, f"environment {ENV_PREFIX}{k.upper()}"
    for k, v in (cli or {}).items():
        if v is None or (k in ("tokens", "upstreams", "allowed_hosts", "cors_origins") and not v):
            continue
        merged[k], source[k] = v, f"--{k.replace('_', '-')}"
    try:
        return ServerConfig(**merged)
    except ValidationError as exc:
        msgs = []
        for e in exc.errors():
            if not e["loc"]:  # a rule about several fields
                msgs.append(e["msg"].removeprefix("Value error, "))
                continue
            field = str(e["loc"][0])
            where = source.get(field, "")
            msgs.append(f"{field}: {e['msg']}" + (f" (from {where})" if where else ""))
        raise ConfigError("invalid configuration: " + "; ".join(msgs)) from None
    except TypeError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None
