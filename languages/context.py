"""Context for the prompt: the request's declarations and snippets, and signatures
of definitions elsewhere in the file that the code near the cursor uses."""
from __future__ import annotations

import bisect
import itertools
import re

from .data import Language
from .memo import LRU
from .segments import Segments
from .syntax import captures
from .text import indent_of, to_lf, words

_CALL = re.compile(r"\b([A-Za-z_]\w*)\s*\(")
# Calls that are control flow in most languages, never user definitions worth a signature.
_COMMON = {"if", "for", "while", "switch", "return", "print", "len", "catch", "function", "func", "fn", "def"}


def render_block(language: Language, path: str, body: str) -> str:
    """A snippet as line comments headed by its path, the way Tabby does it."""
    lines = [language.comment(f"Path: {path}")]
    lines += [language.comment(line) for line in to_lf(body).rstrip("\n").split("\n")]
    return "\n".join(lines) + "\n"


def request_blocks(segments: Segments, language: Language) -> list[tuple[str, str]]:
    """(kind, rendered block) in priority order: declarations, snippets by score, clipboard."""
    out = [("declaration", render_block(language, d.filepath, d.body)) for d in segments.declarations if d.body.strip()]
    ranked = sorted(segments.snippets, key=lambda s: -(s.score if s.score is not None else 0.0))
    out += [("snippet", render_block(language, s.filepath, s.body)) for s in ranked if s.body.strip()]
    if segments.clipboard and segments.clipboard.strip():
        out.append(("clipboard", render_block(language, "clipboard", segments.clipboard)))
    return out


def _signature(lines: list[str], i: int) -> str:
    """The header starting at line i: up to the line that opens the body (at most 4 lines)."""
    sig = []
    for line in lines[i:i + 4]:
        sig.append(line.rstrip())
        s = line.rstrip()
        if s.endswith(("{", ":", "=>", "->", "do", "then", ")")) or s.endswith(";"):
            break
    text = "\n".join(sig).rstrip()
    return text[:-1].rstrip() if text.endswith("{") else text


def _is_definition(language: Language, sig: str, name: str) -> bool:
    if language.grammar:
        caps = captures(language, "definitions", sig + language.signature_stub)
        return any(c == "name" and t == name and line == 0 for c, t, line in caps)
    return sig.lstrip().startswith(language.definition_keywords) if language.definition_keywords else False


# Per elided text (its lines, exactly), each name's signature found there: while the user types,
# the elided lines stay the same for many keys and the names near the cursor change one at a time,
# so a keystroke looks up only its new names (languages/memo.py). Bounded by entries and by the
# characters of elided text held; each entry remembers at most _NAMES_PER_TEXT names.
_SIGNATURE_MEMO = LRU(16, 4_000_000, lambda key, _: sum(map(len, key[1])), max_item_weight=1_000_000)
_NAMES_PER_TEXT = 1024
_UNKNOWN = object()


def file_signatures(language: Language, elided: list[str], near: str, limit: int = 8) -> list[str]:
    """Signatures of definitions in `elided` lines whose names occur in `near`.

    Only candidate lines (a used name as a whole word, shallow indentation, not a
    comment) get parsed, each on its own, so a 2,000-line file costs microseconds.
    """
    # Names that are called ("name(") or look like types (Capitalised), minus the language's keywords.
    keywords = words(" ".join(language.top_level_keywords + language.definition_keywords))
    names = {m.group(1) for m in _CALL.finditer(near)} | {w for w in words(near) if w[:1].isupper()}
    names -= keywords | _COMMON
    if not names:
        return []
    key = (language, tuple(elided))
    found = _SIGNATURE_MEMO.get(key)
    if found is None:
        found = {}
        _SIGNATURE_MEMO.put(key, found)
    # Read into a dict of this call's own: another thread may clear `found` meanwhile.
    answers = {n: found.get(n, _UNKNOWN) for n in names}
    missing = [n for n, a in answers.items() if a is _UNKNOWN]
    if missing:
        new = _first_definitions(language, elided, missing)
        answers.update(new)
        if len(found) + len(new) > _NAMES_PER_TEXT:
            found.clear()
        if len(new) <= _NAMES_PER_TEXT:
            found.update(new)
    hits = [a for a in answers.values() if a is not None]
    # The names' first definitions in the order they come in the text, as one pass over it finds them.
    return [sig for _, sig in sorted(hits)[:limit]]


def _first_definitions(language: Language, elided: list[str], names: list[str]) -> dict[str, tuple[int, str] | None]:
    """For each name, (offset in the joined text, signature) of the first line of `elided` that defines it, or None."""
    out: dict[str, tuple[int, str] | None] = dict.fromkeys(names)
    comment = language.line_comment or "\x00"
    # One regex pass over the elided text finds candidate lines; only those get looked at.
    text = "".join(elided)
    starts = list(itertools.accumulate((len(l) for l in elided), initial=0))
    rx = re.compile(r"\b(" + "|".join(sorted(map(re.escape, names))) + r")\b")
    for m in rx.finditer(text):
        name = m.group(1)
        if out[name] is not None:
            continue
        i = bisect.bisect_right(starts, m.start()) - 1
        line = elided[i]
        s = line.strip()
        if not s or s.startswith(comment) or indent_of(line) > 8:
            continue
        if name not in words(s.split("(", 1)[0]):  # the name before any "(": being defined, not called
            continue
        sig = _signature(elided, i)
        if _is_definition(language, sig, name):
            out[name] = (m.start(), sig.strip("\n"))
    return out
