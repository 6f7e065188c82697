"""Where `kodkod eval` gets completions: a local engine, or a running server at a URL.

Both go through kodkod's real pipeline: the server's CompletionService builds the
prompt (languages/) and post-processes the text. For the ablations the eval needs
the model's raw output, token by token, so a completer streams the raw tokens of
one generation; the eval's `Stopper` says when every configuration has the text
it needs, and the completer stops there.

- LocalCompleter: an engine in this process (CompletionService._prepare, engine.generate),
  with the prompt's stop strings left out (each configuration applies its own rules).
- HttpCompleter: a kodkod server. One request as an editor sends it gives kodkod's
  completion and the prompt (`debug_options.return_prompt`); a second, streamed
  request with that prompt as `raw_prompt` gives the raw tokens for the ablations.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Iterator

from .humaneval import Task

LANGUAGE = "python"
FILEPATH = "solution.py"  # what the editor would send as the file's path
VARIANTS = ("default", "no-ts-context")  # prompt with and without tree-sitter context


@dataclasses.dataclass
class Prepared:
    """One task's prompt, ready to generate from."""
    info: object          # server.completion.Prepared (prompt, segments, lang): what post-processing needs
    prompt_sha: str       # identifies the prompt: equal prompts share one generation
    prompt_tokens: int
    params: object = None            # engine.GenerationParams (LocalCompleter) or max_tokens (HttpCompleter)
    server_text: str | None = None   # kodkod's completion as a server returned it (HttpCompleter)
    server_seconds: float | None = None


def _sha(ids_or_text) -> str:
    return hashlib.sha1(json.dumps(ids_or_text).encode()).hexdigest()[:16]


def _request(task: Task, max_tokens: int):
    from server.schemas import CompletionRequest

    return CompletionRequest(language=LANGUAGE, segments={"prefix": task.prefix, "suffix": task.suffix,
                                                          "filepath": FILEPATH},
                             max_tokens=max_tokens, temperature=0.0, seed=0)


class LocalCompleter:
    def __init__(self, engine, config):
        from server.completion import CompletionService

        self.engine = engine
        self.service = CompletionService(engine, config)
        self.config = config
        if self.service.template is None:
            raise SystemExit(f"kodkod eval: {self.service.template_error}")

    def describe(self) -> dict:
        info = self.engine.info()
        return {"model": str(info.get("name")), "path": str(info.get("path")), "device": str(info.get("device")),
                "dtype": info.get("dtype"), "quantization": info.get("quantization"),
                "budget_tokens": self.config.prompt_budget_tokens}

    def prepare(self, task: Task, variant: str, max_tokens: int) -> Prepared:
        req = _request(task, max_tokens)
        self.service.validate(req)
        info, plan = self.service._prepare(req)
        if variant == "no-ts-context":
            info = self._without_tree_sitter(info)
        params = dataclasses.replace(plan[0][1], stop_strings=())
        return Prepared(info=info, prompt_sha=_sha(list(info.prompt.ids)), prompt_tokens=len(info.prompt.ids),
                        params=params)

    def _without_tree_sitter(self, info):
        """The same request, its prompt built for a Python without its grammar (no tree-sitter
        signatures or import queries in the prompt); post-processing is unchanged."""
        from languages import build_prompt

        plain = dataclasses.replace(info.lang, grammar=None)
        prompt = build_prompt(info.segments, plain, self.service.tokenizer, self.service.template,
                              budget_tokens=self.config.prompt_budget_tokens)
        return dataclasses.replace(info, prompt=prompt)

    def stream(self, prepared: Prepared, cancel) -> Iterator[str]:
        """The raw text of each generated token, until the end, the cap, or `cancel` is set."""
        for ev in self.engine.generate(list(prepared.info.prompt.ids), prepared.params, cancel):
            if ev.finish_reason is not None:
                if ev.text:
                    yield ev.text
                return
            yield ev.text


class HttpCompleter:
    """A running kodkod server: the real HTTP path, post-processing done by the server."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 120.0):
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)
        self._health = self.client.get("/v1/health").raise_for_status().json()

    def describe(self) -> dict:
        completion = self._health.get("models", {}).get("completion", {}) or {}
        return {"model": self._health.get("model"), "url": self.url, "device": self._health.get("device"),
                "dtype": completion.get("dtype"), "quantization": completion.get("quantization")}

    def prepare(self, task: Task, variant: str, max_tokens: int) -> Prepared:
        from languages import Segments, resolve_language

        if variant != "default":
            raise SystemExit("kodkod eval: the no-ts-context variant needs a local model (--model), not --url")
        body = _request(task, max_tokens).model_dump(exclude_none=True)
        body["debug_options"] = {"return_prompt": True}
        t = time.monotonic()
        r = self.client.post("/v1/completions", json=body)
        r.raise_for_status()
        seconds = time.monotonic() - t
        data = r.json()
        prompt_text = data.get("debug_data", {}).get("prompt") or ""
        segs = Segments(prefix=task.prefix, suffix=task.suffix, filepath=FILEPATH)
        info = _UrlInfo(prompt_text=prompt_text, segments=segs, lang=resolve_language(LANGUAGE, FILEPATH))
        return Prepared(info=info, prompt_sha=_sha(prompt_text), prompt_tokens=-1, params=max_tokens,
                        server_text=data["choices"][0]["text"], server_seconds=seconds)

    def stream(self, prepared: Prepared, cancel) -> Iterator[str]:
        body = {"debug_options": {"raw_prompt": prepared.info.prompt_text}, "stream": True,
                "max_tokens": prepared.params, "temperature": 0.0, "seed": 0}
        with self.client.stream("POST", "/v1/completions", json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if cancel.is_set():
                    return  # leaving the block closes the connection: the server stops
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                ev = json.loads(line[5:])
                for ch in ev.get("choices", []):
                    if ch.get("text"):
                        yield ch["text"]


@dataclasses.dataclass
class _UrlInfo:
    """What post-processing needs to know about a prompt a server built."""
    prompt_text: str
    segments: object
    lang: object
    raw: bool = False
