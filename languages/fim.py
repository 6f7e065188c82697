"""FIM templates per model family, detected from a tokenizer's special tokens.

FIM tokens go into a prompt as ids, never as text: `tokenizer.encode` keeps
special-token text plain, so a file containing "<|fim_prefix|>" cannot forge one.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Protocol

TEMPLATES_FILE = Path(__file__).parent / "fim_templates.toml"


class TokenizerLike(Protocol):
    special_tokens: dict[str, int]

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def token_id(self, text: str) -> int | None: ...


@dataclass(frozen=True)
class FimTemplate:
    name: str
    order: str  # "psm" or "spm"
    prefix_id: int
    suffix_id: int
    middle_id: int | None  # None: the model writes right after the prefix (spm)
    prefix_text: str
    suffix_text: str
    middle_text: str
    bos_id: int | None = None
    bos_text: str = ""
    prefix_lead: str = ""
    stop_ids: tuple[int, ...] = ()
    stop_texts: tuple[str, ...] = ()

    @property
    def special_count(self) -> int:
        """How many ids the template itself adds to a prompt."""
        return 2 + (self.middle_id is not None) + (self.bos_id is not None)

    def assemble(self, prefix_ids: list[int], suffix_ids: list[int]) -> list[int]:
        lead = [self.bos_id] if self.bos_id is not None else []
        if self.order == "spm":
            return lead + [self.suffix_id, *suffix_ids, self.prefix_id, *prefix_ids] + (
                [self.middle_id] if self.middle_id is not None else [])
        return lead + [self.prefix_id, *prefix_ids, self.suffix_id, *suffix_ids] + (
            [self.middle_id] if self.middle_id is not None else [])

    def render(self, prefix: str, suffix: str) -> str:
        if self.order == "spm":
            return f"{self.bos_text}{self.suffix_text}{suffix}{self.prefix_text}{prefix}{self.middle_text}"
        return f"{self.bos_text}{self.prefix_text}{prefix}{self.suffix_text}{suffix}{self.middle_text}"


@cache
def _specs() -> tuple[dict, ...]:
    return tuple(tomllib.loads(TEMPLATES_FILE.read_text(encoding="utf-8"))["template"])


def template_names() -> list[str]:
    return [s["name"] for s in _specs()]


def _pick(alternatives: list[str], special: dict[str, int]) -> tuple[str, int] | None:
    for text in alternatives:
        if text in special:
            return text, special[text]
    return None


def _build(spec: dict, special: dict[str, int]) -> FimTemplate | None:
    pre, suf = _pick(spec["prefix"], special), _pick(spec["suffix"], special)
    mid = _pick(spec["middle"], special) if spec["middle"] else ("", None)
    if pre is None or suf is None or mid is None:
        return None
    if any(t not in special for t in spec.get("requires", [])):
        return None
    bos = _pick(spec.get("bos", []), special) or ("", None)
    stops = {t: special[t] for t in spec.get("stop", []) if t in special}
    # The template's own tokens never belong in a completion either.
    for text, i in (pre, suf, mid):
        if i is not None:
            stops.setdefault(text, i)
    return FimTemplate(
        name=spec["name"], order=spec["order"],
        prefix_id=pre[1], suffix_id=suf[1], middle_id=mid[1],
        prefix_text=pre[0], suffix_text=suf[0], middle_text=mid[0],
        bos_id=bos[1], bos_text=bos[0], prefix_lead=spec.get("prefix_lead", ""),
        stop_ids=tuple(stops.values()), stop_texts=tuple(stops),
    )


def fim_template_for(tokenizer: TokenizerLike, override: str | None = None) -> FimTemplate:
    """The FIM template for this tokenizer: `override` (a template name) or detected."""
    special = dict(tokenizer.special_tokens)
    if override:
        key = override.strip().lower()
        spec = next((s for s in _specs() if key == s["name"] or key in s.get("aliases", [])), None)
        if spec is None:
            raise ValueError(f"unknown FIM template {override!r}; known: {', '.join(template_names())}")
        tpl = _build(spec, special)
        if tpl is None:
            need = [spec["prefix"][0], spec["suffix"][0], *spec["middle"][:1], *spec.get("requires", [])]
            raise ValueError(f"FIM template {spec['name']!r} needs special tokens {need}, "
                             "which this tokenizer does not have")
        return tpl
    for spec in _specs():
        tpl = _build(spec, special)
        if tpl is not None:
            return tpl
    raise ValueError("cannot detect a FIM template: the tokenizer has none of the FIM special tokens of "
                     f"{', '.join(template_names())}; this model may not support fill-in-the-middle "
                     "(set the template explicitly if it does)")
