"""The OpenAPI document, generated from the pydantic models in schemas.py."""
from __future__ import annotations

from functools import lru_cache

from pydantic.json_schema import models_json_schema

from . import schemas as S

REF = "#/components/schemas/{model}"


def _ref(model) -> dict:
    return {"$ref": REF.format(model=model.__name__)}


def _json(model) -> dict:
    return {"application/json": {"schema": _ref(model)}}


def _errors(*codes: int) -> dict:
    text = {400: "malformed JSON, invalid UTF-8, or neither segments nor raw_prompt",
            401: "missing or wrong bearer token", 409: "superseded by a newer request of the same user",
            413: "body or prefix over the size limit", 422: "a field of the wrong type or over a limit",
            501: "no completion model, or the model cannot fill in the middle",
            502: "remote engine: the upstream servers answered with errors",
            503: "the queue is full (see Retry-After); remote engine: no upstream can be reached",
            504: "the request timed out", 408: "the request head or body did not arrive in time",
            415: "the body is not sent as application/json",
            421: "without tokens: a Host header this server does not answer for",
            431: "the request line and headers are too large"}
    return {str(c): {"description": text.get(c, "error"), "content": _json(S.ErrorResponse)} for c in codes}


@lru_cache(maxsize=4)
def document(version: str) -> dict:
    models = [S.CompletionRequest, S.OpenAICompletionRequest, S.CompletionResponse, S.OpenAICompletionResponse,
              S.StreamEvent, S.EventRequest, S.ErrorResponse, S.HealthResponse, S.ServerSetting, S.Healthz,
              S.ModelList]
    _, top = models_json_schema([(m, "validation") for m in models], ref_template=REF)
    components = top.get("$defs", {})
    secured = [{"bearer": []}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "kodkod", "version": version,
                 "description": "Tabby-compatible code completion API with streaming extensions"},
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
            "/v1/completions": {"post": {
                "operationId": "completion", "security": secured,
                "description": "Tabby's body, or OpenAI's (told apart by `prompt`); the answer has the same form",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "oneOf": [_ref(S.CompletionRequest), _ref(S.OpenAICompletionRequest)]}}}},
                "responses": {"200": {"description": "the completion; with `stream: true`, Server-Sent Events "
                                                     "each carrying a StreamEvent (OpenAI: a chunk in the answer's "
                                                     "form), then `data: [DONE]`",
                                      "content": {"application/json": {"schema": {
                                          "oneOf": [_ref(S.CompletionResponse), _ref(S.OpenAICompletionResponse)]}},
                                                  "text/event-stream": {"schema": {"type": "string"}}}},
                              **_errors(400, 401, 408, 409, 413, 415, 421, 422, 431, 501, 502, 503, 504)}}},
            "/v1/models": {"get": {
                "operationId": "models", "security": secured,
                "responses": {"200": {"description": "OpenAI's model list: the loaded model", "content": _json(S.ModelList)},
                              **_errors(401)}}},
            "/v1/events": {"post": {
                "operationId": "event", "security": secured,
                "requestBody": {"required": True, "content": _json(S.EventRequest)},
                "parameters": [{"name": "select_kind", "in": "query", "required": False,
                                "schema": {"type": "string", "enum": ["line"]}}],
                "responses": {"200": {"description": "recorded", "content": {"application/json": {"schema": {"type": "object"}}}},
                              **_errors(400, 401, 408, 413, 415, 421, 422, 431)}}},
            "/v1/health": {m: {"operationId": f"health_{m}", "security": secured,
                               "responses": {"200": {"description": "server and model facts", "content": _json(S.HealthResponse)},
                                             **_errors(401)}} for m in ("get", "post")},
            "/v1beta/server_setting": {"get": {"operationId": "server_setting", "security": secured,
                                               "responses": {"200": {"description": "settings", "content": _json(S.ServerSetting)},
                                                             **_errors(401)}}},
            "/healthz": {"get": {"operationId": "healthz",
                                 "responses": {"200": {"description": "alive", "content": _json(S.Healthz)}}}},
            "/metrics": {"get": {"operationId": "metrics",
                                 "responses": {"200": {"description": "Prometheus text format",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        },
    }
