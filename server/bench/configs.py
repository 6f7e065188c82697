"""The configurations `kodkod eval` compares on one generation: what text each shows the user,
and after how many tokens its server would have stopped generating.

- raw:    the model's own output, to its end token or the token cap.
- kodkod: kodkod's post-processing (languages.postprocess, through CompletionService.finish_text);
          the server stops at the prompt's stop strings or when post-processing has settled
          (server.choice_text.ChoiceText.settled), exactly as `kodkod serve` does.
- tabby:  Tabby's rules (tabby_rules.py): stop words, 64 tokens at most, one line mid-line.

`kodkod-no-ts-context` is kodkod on a second prompt, built without tree-sitter (completers.VARIANTS).
"""
from __future__ import annotations

from .tabby_rules import TABBY_MAX_TOKENS, stop_index, tabby_postprocess

CONFIGS = ("raw", "tabby", "kodkod", "kodkod-no-ts-context")
# `raw` needs every generation to run to its end or the cap: several times the work, so only on request
DEFAULT_CONFIGS = ("tabby", "kodkod", "kodkod-no-ts-context")
# configuration -> (the rules it applies, the prompt variant it generates from)
RULES = {"raw": "raw", "tabby": "tabby", "kodkod": "kodkod", "kodkod-no-ts-context": "kodkod"}
VARIANT = {"raw": "default", "tabby": "default", "kodkod": "default", "kodkod-no-ts-context": "no-ts-context"}


def _special_texts(info) -> tuple[str, ...]:
    prompt = getattr(info, "prompt", None)
    return tuple(s for s in getattr(prompt, "stop_strings", ()) if s.startswith("<"))


class Stopper:
    """Fed the raw text after each token; records the token count at which each configuration's
    server would have stopped. `done` when all the wanted ones have."""

    def __init__(self, info, wanted: set[str]):
        from server.choice_text import ChoiceText
        from server.completion import CompletionService
        from server.config import ServerConfig

        self.info = info
        self.wanted = set(wanted)
        self.stops: dict[str, int] = {}
        self.local = hasattr(getattr(info, "prompt", None), "stop_strings")  # a prompt built here
        # the server's own rule for settling a choice early (post-processing only: no engine)
        self.early = ChoiceText(CompletionService(None, ServerConfig()), info, deltas=None) if self.local else None
        self.special = _special_texts(info)

    def feed(self, raw: str, n_tokens: int) -> None:
        if "kodkod" in self.wanted and "kodkod" not in self.stops and self.local:
            self.early.add(raw[len(self.early.raw):])
            if any(s and s in raw for s in self.info.prompt.stop_strings) or self.early.settled:
                self.stops["kodkod"] = n_tokens
        if "tabby" in self.wanted and "tabby" not in self.stops:
            if n_tokens >= TABBY_MAX_TOKENS or stop_index(raw, self.info.lang, self.special) is not None:
                self.stops["tabby"] = n_tokens

    @property
    def done(self) -> bool:
        return self.wanted <= set(self.stops)


def stop_points(pieces: list[str], info, wanted: set[str]) -> dict[str, int]:
    """Replay a finished generation through a Stopper: the stop point of each wanted configuration
    (the whole generation where it never stopped early)."""
    s = Stopper(info, wanted - {"raw"})
    raw = ""
    if not s.wanted:
        return {c: len(pieces) for c in wanted}
    for i, p in enumerate(pieces, 1):
        raw += p
        s.feed(raw, i)
        if s.done:
            break
    return {c: s.stops.get(c, len(pieces)) for c in wanted}


def completion_text(config: str, pieces: list[str], stop: int, info, service=None) -> str:
    """The text configuration `config` shows, from the first `stop` tokens of the generation."""
    raw = "".join(pieces[:stop])
    rules = RULES[config]
    if rules == "raw":
        return raw
    if rules == "tabby":
        seg = info.segments
        return tabby_postprocess(raw, seg.prefix, seg.suffix, info.lang, _special_texts(info))
    return service.finish_text(raw, info)[0]
