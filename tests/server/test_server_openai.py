"""OpenAI's completion API on the same route: the `openai` client library against a real server."""
from __future__ import annotations

import httpx
import openai
import pytest
from starlette.testclient import TestClient

TOKEN = "openai-test-token"
PREFIX, SUFFIX = "import os\n\ndef main():\n    ", "\n"


@pytest.fixture
def oai(live):
    url, app = live(tokens=[TOKEN], max_tokens=1000)
    with openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=30) as client:
        yield client, url, app


def test_openai_client_completion_with_suffix(oai):
    client, url, _ = oai
    r = client.completions.create(model="anything", prompt=PREFIX, suffix=SUFFIX, max_tokens=12,
                                  temperature=0, seed=1)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.model == "llama-tiny-4.0bpw" and isinstance(r.created, int)
    (choice,) = r.choices
    assert choice.index == 0 and choice.finish_reason in ("stop", "length") and choice.logprobs is None
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # the same request in Tabby's form: FIM template and post-processing alike
    tabby = httpx.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {TOKEN}"},
                       json={"segments": {"prefix": PREFIX, "suffix": SUFFIX}, "max_tokens": 12,
                             "temperature": 0, "seed": 1}).json()
    assert choice.text == tabby["choices"][0]["text"]


def test_openai_client_stream(oai):
    client, _, _ = oai
    whole = client.completions.create(model="m", prompt=PREFIX, suffix=SUFFIX, max_tokens=12, temperature=0.8,
                                      seed=5, n=2)
    chunks = list(client.completions.create(model="m", prompt=PREFIX, suffix=SUFFIX, max_tokens=12,
                                            temperature=0.8, seed=5, n=2, stream=True))
    assert chunks and all(c.object == "text_completion" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    for index in (0, 1):
        mine = [ch for c in chunks for ch in c.choices if ch.index == index]
        assert all(ch.finish_reason is None for ch in mine[:-1]) and mine[-1].finish_reason in ("stop", "length")
        assert "".join(ch.text for ch in mine) == whole.choices[index].text


def test_openai_plain_prompt_and_models(oai):
    client, url, _ = oai
    r = client.completions.create(model="m", prompt="def fib(n):\n", max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    raw = httpx.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {TOKEN}"},
                     json={"debug_options": {"raw_prompt": "def fib(n):\n"}, "max_tokens": 5, "temperature": 0})
    assert r.choices[0].text == raw.json()["choices"][0]["text"]  # a bare prompt: plain completion
    models = client.models.list()
    assert [m.id for m in models.data] == ["llama-tiny-4.0bpw"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()


@pytest.mark.parametrize("body,type_,words", [
    ({"prompt": "x", "echo": True}, "invalid_request", "echo"),
    ({"prompt": "x", "logprobs": 2}, "invalid_request", "logprobs"),
    ({"prompt": ["a", "b"]}, "invalid_request", "one prompt"),
    ({"prompt": "x", "segments": {"prefix": "y"}}, "invalid_request", "not both"),
    ({"prompt": "x", "max_tokens": "10"}, "invalid_request", "max_tokens"),
    ({"prompt": 5}, "invalid_request", "prompt"),
    ({"prompt": ""}, "invalid_request", "empty"),
    ({"segments": {"prefix": "x"}, "max_tokens": "10"}, "invalid_request", "max_tokens"),
])
def test_bad_openai_bodies_are_422(make_app, body, type_, words):
    with TestClient(make_app()) as c:
        r = c.post("/v1/completions", json=body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["type"] == type_ and words in err["message"], err


def test_openapi_documents_both_bodies(client):
    doc = client.get("/api-docs/openapi.json").json()
    body = doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    refs = {s["$ref"].rsplit("/", 1)[1] for s in body["oneOf"]}
    assert refs == {"CompletionRequest", "OpenAICompletionRequest"}
    assert "/v1/models" in doc["paths"]
