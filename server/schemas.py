"""Every request, response and error of the HTTP API, as pydantic models.

These are the single definition: validation, the OpenAPI document at
`/api-docs/openapi.json`, and docs/server.md all come from here. Field names
follow Tabby's protocol (../shared/docs/tabby-api.md); the extensions (`stream`,
`n`, `max_tokens`, `stop`, `top_p`, `stream_raw`) are optional. The same route also
takes OpenAI's completion body (`OpenAICompletionRequest`, told apart by `prompt`).
Request models are strict: a string where a number belongs is refused (422), not coerced.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _In(BaseModel):
    # Clients send fields we do not use: ignore them rather than refuse. Types are strict:
    # `"max_tokens": "10"` is a client bug worth a clear 422, not a guess.
    model_config = ConfigDict(extra="ignore", strict=True)


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
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling; default 1 (off)")
    stream_raw: bool = Field(False, description="stream the engine's text as it comes; the last event's "
                                                "`completion` is then authoritative (post-processing may trim it)")


class OpenAICompletionRequest(_In):
    """OpenAI's `POST /v1/completions` body. `prompt` with `suffix` (even empty) is a fill-in-the-middle
    request that gets kodkod's FIM template and post-processing; a bare `prompt` is plain completion."""
    model_config = ConfigDict(extra="ignore", strict=True, protected_namespaces=())
    model: str | None = Field(None, description="any name: the loaded model answers")
    prompt: str | list[str] = Field(..., description="text before the cursor (a list: exactly one string)")
    suffix: str | None = Field(None, description="text after the cursor")
    max_tokens: int | None = Field(None, ge=1, le=100_000, description="default: the server's default_max_tokens")
    temperature: float | None = Field(None, ge=0, le=5, description="default 0.1")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=64)
    stop: list[str] | str | None = None
    stream: bool = False
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    user: str | None = Field(None, description="a newer request of the same user supersedes this one")
    echo: bool = Field(False, description="not supported: true is refused")
    logprobs: int | None = Field(None, description="not supported: a value is refused")
    stream_raw: bool = Field(False, description="kodkod extension: see CompletionRequest.stream_raw")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError(f"one prompt per request, not {len(v)}")
        return v

    def to_tabby(self) -> CompletionRequest:
        """The same request as a Tabby body: the one form the completion pipeline reads."""
        prompt = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        if self.suffix is not None:
            where = dict(segments=Segments(prefix=prompt, suffix=self.suffix))
        else:
            where = dict(debug_options=DebugOptions(raw_prompt=prompt))
        return CompletionRequest(**where, user=self.user, temperature=self.temperature, seed=self.seed,
                                 stream=self.stream, n=self.n, max_tokens=self.max_tokens, stop=self.stop,
                                 top_p=self.top_p, stream_raw=self.stream_raw)


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
    finish_reason: Literal["stop", "length", "cancelled"] | None = None
    completion: str | None = Field(
        None, description="on the last event of a choice: the whole completion, which the deltas add up to "
                          "(with `stream_raw`: the post-processed text, which may differ from the deltas)")


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


class OpenAIChoice(BaseModel):
    text: str
    index: int
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class OpenAICompletionResponse(BaseModel):
    """OpenAI's completion answer; with `stream: true`, each SSE chunk has this shape (`usage` on
    none of them, `finish_reason` on the last chunk of each choice), then `data: [DONE]`."""
    model_config = ConfigDict(protected_namespaces=())
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[OpenAIChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kodkod"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


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
