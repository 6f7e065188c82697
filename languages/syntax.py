"""tree-sitter: grammars, parsers and queries, loaded once per language and cached."""
from __future__ import annotations

import importlib
from functools import cache

import tree_sitter as ts

from .data import QUERY_DIR, Language
from .memo import LRU


@cache
def grammar(spec: str | None) -> ts.Language | None:
    """The tree-sitter language for "module:function", or None when it is not installed."""
    if not spec:
        return None
    module, _, func = spec.partition(":")
    try:
        return ts.Language(getattr(importlib.import_module(module), func or "language")())
    except (ImportError, AttributeError):  # a data file may name a grammar this install lacks
        return None


@cache
def _query(spec: str, folder: str, name: str) -> ts.Query | None:
    lang = grammar(spec)
    path = QUERY_DIR / folder / f"{name}.scm"
    if lang is None or not path.is_file():
        return None
    return ts.Query(lang, path.read_text(encoding="utf-8"))


def query(language: Language, name: str) -> ts.Query | None:
    if not language.grammar or not language.queries:
        return None
    return _query(language.grammar, language.queries, name)


def parse(language: Language, text: str) -> tuple[ts.Tree, int] | None:
    """Parse `text`; returns the tree and the byte offset where `text` starts in it."""
    lang = grammar(language.grammar)
    if lang is None:
        return None
    # A new Parser per call is cheap (microseconds) and keeps this thread-safe.
    lead = language.parse_lead.encode()
    return ts.Parser(lang).parse(lead + text.encode("utf-8")), len(lead)


# Query results by (grammar, query folder, parse lead, query, text), kept across builds
# (languages/memo.py): every keystroke's prompt parses the same candidate signatures and the same
# import block again. Weight: characters of the text and of the captured texts, plus one per
# result. Texts over 1/16 of the weight are parsed every time.
CAPTURE_MEMO_ENTRIES = 4096
CAPTURE_MEMO_WEIGHT = 1_000_000


def _weigh(key: tuple, value: tuple) -> int:
    return len(key[-1]) + sum(1 + (len(v[1]) if isinstance(v[1], str) else 0) for v in value)


_capture_memo = LRU(CAPTURE_MEMO_ENTRIES, CAPTURE_MEMO_WEIGHT, _weigh)


def _memoised(kind: str, compute, language: Language, name: str, text: str):
    """compute(language, name, text) through the memo, as a list (None, without a grammar, is not kept)."""
    key = (kind, language.grammar, language.queries, language.parse_lead, name, text)
    hit = _capture_memo.get(key)
    if hit is None:
        value = compute(language, name, text)
        if value is None:
            return None
        hit = tuple(value)
        _capture_memo.put(key, hit)
    return list(hit)


def captures(language: Language, name: str, text: str) -> list[tuple[str, str, int]]:
    """(capture name, captured text, start line) for query `name` over `text`."""
    return _memoised("captures", _captures, language, name, text)


def _captures(language: Language, name: str, text: str) -> list[tuple[str, str, int]]:
    q = query(language, name)
    parsed = parse(language, text) if q is not None else None
    if parsed is None:
        return []
    tree, lead = parsed
    src = language.parse_lead.encode() + text.encode("utf-8")
    lead_lines = language.parse_lead.count("\n")
    out = []
    for cap, nodes in ts.QueryCursor(q).captures(tree.root_node).items():
        for n in nodes:
            out.append((cap, src[n.start_byte:n.end_byte].decode("utf-8", "replace"), n.start_point[0] - lead_lines))
    return sorted(out, key=lambda c: c[2])


def capture_lines(language: Language, name: str, text: str) -> list[tuple[int, int]] | None:
    """(first line, last line) of every node query `name` captures in `text`; None without a grammar."""
    return _memoised("lines", _capture_lines, language, name, text)


def _capture_lines(language: Language, name: str, text: str) -> list[tuple[int, int]] | None:
    q = query(language, name)
    parsed = parse(language, text) if q is not None else None
    if parsed is None:
        return None
    tree, _ = parsed
    lead = language.parse_lead.count("\n")
    spans = {(n.start_point[0] - lead, n.end_point[0] - lead)
             for nodes in ts.QueryCursor(q).captures(tree.root_node).values() for n in nodes}
    return sorted(s for s in spans if s[0] >= 0)
