"""The completion pipeline: request → prompt (languages/) → engine job → post-processed text.

`CompletionService.make_job()` validates the request against the server's
limits and returns a `worker.Job` whose `prepare()` (run on the worker thread)
builds the prompt. The HTTP side then pulls token events from the job
(server/choices.py) and post-processes each choice's text (server/choice_text.py).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

from .config import ServerConfig
from .errors import ApiError
from .schemas import CompletionRequest
from .worker import Job

MAX_STOP_STRINGS = 16
MAX_STOP_LEN = 64
DEFAULT_TEMPERATURE = 0.1
MIN_TOP_P = 1e-6

from languages import Segments as LSegments
from languages import Snippet as LSnippet
from languages import build_prompt, fim_template_for, postprocess, resolve_language


@dataclass
class _PlainPrompt:
    """A raw prompt (debug_options.raw_prompt): sent as it is, no FIM template, no post-processing."""
    ids: list[int]
    text: str
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    multiline: bool = True
    decisions: list[str] = field(default_factory=list)


@dataclass
class Prepared:
    """What prepare() hands to the HTTP side."""
    prompt: Any
    segments: Any
    lang: Any
    raw: bool
    crlf: bool
    language: str | None


class CompletionService:
    def __init__(self, engine, config: ServerConfig):
        self.engine = engine
        self.config = config
        self.tokenizer = engine.tokenizer if engine is not None else None
        self.template = None
        self.template_error: str | None = None
        if engine is not None:
            self._init_template()
        specials = self.tokenizer.special_tokens if self.tokenizer is not None else {}
        names = sorted(specials, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    def _init_template(self) -> None:
        try:
            self.template = fim_template_for(self.tokenizer, self.config.fim_template)
        except ValueError as exc:
            self.template_error = str(exc)

    # ---- request → job ----
    def validate(self, req: CompletionRequest) -> None:
        c = self.config
        raw = req.debug_options.raw_prompt if req.debug_options else None
        if req.segments is None and raw is None:
            raise ApiError(400, "invalid_request", "the request needs `segments` (with `prefix`) or `debug_options.raw_prompt`")
        if self.engine is None:
            raise ApiError(501, "no_model", "no completion model is loaded")
        for name, text in (("segments.prefix", req.segments.prefix if req.segments else None),
                           ("segments.suffix", req.segments.suffix if req.segments else None),
                           ("debug_options.raw_prompt", raw)):
            if text is not None and len(text) > c.max_prefix_chars:
                raise ApiError(413, "too_large", f"{name} has {len(text)} characters; the limit is {c.max_prefix_chars}")
        if req.n > c.max_n:
            raise ApiError(422, "invalid_request", f"n = {req.n} is over this server's limit of {c.max_n}")
        if req.max_tokens is not None and req.max_tokens > c.max_tokens:
            raise ApiError(422, "invalid_request", f"max_tokens = {req.max_tokens} is over this server's limit of {c.max_tokens}")
        stops = self._stops(req)
        if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_LEN or not s for s in stops):
            raise ApiError(422, "invalid_request",
                           f"stop: at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_LEN} characters")
        if req.mode not in (None, "standard"):
            raise ApiError(422, "invalid_request", f"mode {req.mode!r} is not supported (only 'standard')")
        if raw == "":
            raise ApiError(422, "invalid_request", "the prompt is empty")
        if raw is None and self.template is None:
            raise ApiError(501, "unsupported_model", f"cannot build a fill-in-the-middle prompt: {self.template_error}")

    @staticmethod
    def _stops(req: CompletionRequest) -> list[str]:
        if req.stop is None:
            return []
        return [req.stop] if isinstance(req.stop, str) else list(req.stop)

    def make_job(self, req: CompletionRequest, key: str | None) -> Job:
        self.validate(req)
        return Job(prepare=lambda: self._prepare(req), key=key, timeout_s=self.config.timeout_s)

    # ---- worker thread ----
    def _prepare(self, req: CompletionRequest):
        from engine import GenerationParams

        raw = req.debug_options.raw_prompt if req.debug_options else None
        if raw is not None:
            crlf = "\r\n" in raw
            prompt = _PlainPrompt(ids=self._encode_raw(raw), text=raw)
            info = Prepared(prompt=prompt, segments=None, lang=None, raw=True, crlf=False, language=req.language)
        else:
            s = req.segments
            crlf = "\r\n" in s.prefix or "\r\n" in (s.suffix or "")
            segs = self._segments(req)
            lang = resolve_language(req.language, s.filepath)
            prompt = build_prompt(segs, lang, self.tokenizer, self.template,
                                  budget_tokens=self.config.prompt_budget_tokens)
            info = Prepared(prompt=prompt, segments=segs, lang=lang, raw=False, crlf=crlf, language=req.language)
        if len(prompt.ids) >= self.engine.max_seq_len:
            raise ApiError(413, "too_large", f"the prompt has {len(prompt.ids)} tokens; the model's context "
                                             f"holds {self.engine.max_seq_len}")
        max_new = req.max_tokens or self.config.default_max_tokens
        # leave room in the engine's context (its KV cache)
        max_new = max(0, min(max_new, self.engine.max_seq_len - len(prompt.ids)))
        temperature = DEFAULT_TEMPERATURE if req.temperature is None else req.temperature
        seed = req.seed if req.seed is not None else random.getrandbits(32)
        # a top_p below float32's resolution rounds to 0 in the engine's nucleus filter, which then
        # drops every token (found by the fuzz test); any top_p this small keeps only the likeliest token
        top_p = max(req.top_p, MIN_TOP_P) if req.top_p is not None else 1.0
        stop_strings = tuple(dict.fromkeys((*prompt.stop_strings, *self._stops(req))))
        stop_ids = tuple(prompt.stop_token_ids)
        plan = []
        for i in range(req.n):
            params = GenerationParams(max_new_tokens=max_new, temperature=temperature, seed=seed + i,
                                      top_p=top_p, stop_token_ids=stop_ids, stop_strings=stop_strings)
            plan.append((list(prompt.ids), params))
        return info, plan

    def _segments(self, req: CompletionRequest):
        s = req.segments
        snippets = [LSnippet(x.filepath or "", x.body, x.score)
                    for x in (s.relevant_snippets_from_changed_files or []) + (s.relevant_snippets_from_recently_opened_files or [])]
        decls = [LSnippet(x.filepath or "", x.body) for x in (s.declarations or [])]
        if req.debug_options and req.debug_options.disable_retrieval_augmented_code_completion:
            snippets, decls = [], []
        return LSegments(prefix=s.prefix, suffix=s.suffix or "", filepath=s.filepath, declarations=decls,
                         snippets=snippets, clipboard=s.clipboard)

    def _encode_raw(self, text: str) -> list[int]:
        """A raw prompt may name special tokens (`<fim_prefix>`): they become the tokens."""
        if self._special_re is None:
            return self.tokenizer.encode(text)
        ids: list[int] = []
        for part in self._special_re.split(text):
            if not part:
                continue
            tid = self.tokenizer.special_tokens.get(part)
            ids.extend([tid] if tid is not None else self.tokenizer.encode(part))
        return ids

    # ---- finishing ----
    def finish_text(self, raw_text: str, info: Prepared) -> tuple[str, list[str]]:
        text, decisions, _ = self.finish(raw_text, info)
        return text, decisions

    def finish(self, raw_text: str, info: Prepared) -> tuple[str, list[str], bool]:
        """(post-processed text, decisions, settled): settled when post-processing's cut is structural
        (the completion left the cursor's block), so that more tokens cannot change the answer."""
        if info.raw:
            return raw_text, [], False
        done = postprocess(raw_text, info.segments, info.lang, info.prompt)
        return done.text, list(done.decisions), bool(done.settled)

    @staticmethod
    def client_line_endings(text: str, info: Prepared) -> str:
        """Raw engine text in the client's line endings (post-processed text has them already)."""
        if info.crlf:
            return text.replace("\r\n", "\n").replace("\n", "\r\n")
        return text
