"""Tabby's completion rules, re-implemented from the facts in shared/docs/tabby-api.md,
as a baseline for kodkod's post-processing in `kodkod eval`.

Tabby (v0.31) stops generation at its stop words: a blank line, a new line that
starts (at column 0) with the language's line comment or one of its top-level
keywords (Python: def, class, from, import), and the model's special tokens; it
generates at most 64 tokens. Its clients show one line when the cursor is
mid-line (text other than closing brackets after it), and trim the trailing
whitespace. The eval applies these rules to the same raw model output kodkod's
post-processing sees, so only the rules differ.
"""
from __future__ import annotations

TABBY_MAX_TOKENS = 64
CLOSERS = set(")]}'\"` ;,")


# The documented keyword list for Python; other languages use kodkod's own data.
TABBY_KEYWORDS = {"python": ("def", "from", "class", "import")}


def stop_words(language) -> list[str]:
    words = ["\n\n"]
    if language.line_comment:
        words.append("\n" + language.line_comment)
    keywords = TABBY_KEYWORDS.get(language.name) or [kw.strip() for kw in language.top_level_keywords]
    words += ["\n" + kw for kw in keywords if kw]
    return words


def tabby_postprocess(raw: str, prefix: str, suffix: str, language, special_texts=()) -> str:
    """The completion Tabby would show for `raw`, the model's output at the cursor."""
    text = raw.replace("\r\n", "\n")
    cuts = [text.find(w) for w in (*stop_words(language), *special_texts) if w and w in text]
    if cuts:
        text = text[: min(cuts)]
    rest = suffix.split("\n", 1)[0]
    if rest.strip() and not set(rest.strip()) <= CLOSERS:
        text = text.split("\n", 1)[0]
    return text.rstrip()


def stop_index(raw: str, language, special_texts=()) -> int | None:
    """Where in `raw` Tabby's server would have stopped generating (None: not yet)."""
    cuts = [raw.find(w) for w in (*stop_words(language), *special_texts) if w and w in raw]
    return min(cuts) if cuts else None
