"""Small line helpers shared by prompt building and post-processing."""
from __future__ import annotations

import re

CLOSERS = ")]}\"'`>;,"
OPEN_CLOSE = {"(": ")", "[": "]", "{": "}"}
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def to_lf(text: str) -> str:
    return text.replace("\r\n", "\n")


def indent_of(line: str) -> int:
    """Width of the leading whitespace, a tab counting 4."""
    n = 0
    for ch in line:
        if ch == " ":
            n += 1
        elif ch == "\t":
            n += 4
        else:
            break
    return n


def leading_ws(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def is_closers_only(s: str) -> bool:
    """True for text an editor auto-inserts after the cursor: closing brackets, quotes, ';'."""
    s = s.strip()
    return bool(s) and all(c in CLOSERS or c.isspace() for c in s)


def words(text: str) -> set[str]:
    return set(_WORD.findall(text))


def imbalance(text: str) -> int:
    """Unmatched brackets plus an unterminated string, roughly (no comments)."""
    stack: list[str] = []
    bad = 0
    quote = None
    esc = False
    for ch in text:
        if quote:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == quote:
                quote = None
            elif ch == "\n" and quote != "`":
                quote = None
                bad += 1
            continue
        if ch in "\"'`":
            quote = ch
        elif ch in OPEN_CLOSE:
            stack.append(OPEN_CLOSE[ch])
        elif ch in ")]}":
            if stack and stack[-1] == ch:
                stack.pop()
            else:
                bad += 1
    return bad + len(stack) + (quote is not None)
