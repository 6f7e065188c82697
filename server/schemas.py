"""Every request, response and error of the HTTP API, as pydantic models.

These are the single definition: validation, the OpenAPI document at
`/api-docs/openapi.json`, and docs/server.md all come from here. Field names
follow Tabby's protocol (../shared/docs/tabby-api.md); the extensions (`stream`,
`n`, `max_tokens`, `stop`) are optional.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _In(BaseModel):
    # Tabby clients send fields we do not use; ignore them rather than refuse.
    model_config = ConfigDict(extra="ignore")


class Declaration(_In):
    filepath: str | None = None
    body: str


class Snippet(_In):
    filepath: str | None = None
    body: str
    score: float | None = None


class Segments(_In):
    prefix: str = Field(..., description="text before the cursor")
    suffix: str | None = Field(None, description="text after the cursor")
    filepath: str | None = None
    git_url: str | None = None
    declarations: list[Declaration] | None = Field(None, max_length=100)
    relevant_snippets_from_changed_files: list[Snippet] | None = Field(None, max_length=100)
    relevant_snippets_from_recently_opened_files: list[Snippet] | None = Field(None, max_length=100)
    clipboard: str | None = None


class DebugOptions(_In):
    raw_prompt: str | None = Field(None, description="use this text as the prompt, skipping prompt building")
    return_snippets: bool = False
    return_prompt: bool = False
    disable_retrieval_augmented_code_completion: bool = False


class CompletionRequest(_In):
    language: str | None = Field(None, description="VS Code languageId; unknown or missing: generic settings")
    segments: Segments | None = None
    user: str | None = Field(None, description="a newer request of the same user supersedes this one")
    temperature: float | None = Field(None, ge=0, le=5, description="0 (or near it): greedy; default 0.1")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    mode: str | None = Field(None, description="Tabby's mode; only `standard`")
    debug_options: DebugOptions | None = None
    # Extensions
    stream: bool = Field(False, description="answer with Server-Sent Events, one per text delta")
    n: int = Field(1, ge=1, le=64, description="number of choices (server limit: max_n)")
    max_tokens: int | None = Field(None, ge=1, le=100_000, description="tokens to generate at most (server limit: max_tokens)")
    stop: list[str] | str | None = Field(None, description="extra stop strings (at most 16)")


class Choice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length", "cancelled"] | None = None


class DebugData(BaseModel):
    prompt: str | None = None
    snippets: list[Snippet] | None = None
    decisions: list[str] | None = None


class CompletionResponse(BaseModel):
    id: str = Field(..., description="cmpl-<uuid4>")
    choices: list[Choice]
    debug_data: DebugData | None = None


class StreamChoice(BaseModel):
    index: int
    text: str = Field(..., description="new text of this choice since the previous event")
    finish_reason: Literal["stop", "length", "cancelled", "timeout", "error"] | None = None
    completion: str | None = Field(
        None, description="on the last event of a choice: the whole post-processed completion (authoritative)")


class StreamEvent(BaseModel):
    """One `data:` line of a streamed completion; the stream ends with `data: [DONE]`."""
    id: str
    choices: list[StreamChoice]
    error: "ErrorBody | None" = None


class EventRequest(_In):
    type: Literal["view", "select", "dismiss"]
    completion_id: str
    choice_index: int = Field(..., ge=0)
    view_id: str | None = None
    elapsed: int | None = None


class ErrorBody(BaseModel):
    type: str = Field(..., description="machine-readable kind: invalid_request, unauthorized, ...")
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


StreamEvent.model_rebuild()


class CompletionModelInfo(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    name: str
    path: str | None = None
    architecture: str | None = None
    device: str | None = None
    dtype: str | None = None


class Version(BaseModel):
    build_date: str
    build_timestamp: str
    git_sha: str
    git_describe: str


class HealthResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    model: str
    chat_model: str | None = None
    chat_device: str | None = None
    device: str
    arch: str
    cpu_info: str
    cpu_count: int
    cuda_devices: list[str]
    version: Version
    webserver: bool | None = None
    models: dict[str, Any] = Field(default_factory=dict)


class ServerSetting(BaseModel):
    disable_client_side_telemetry: bool = False


class Healthz(BaseModel):
    status: Literal["ok"] = "ok"
