"""From the model's raw text to the completion the editor shows.

Rules, in order: stop strings; single line when the cursor is mid-line;
degenerate repetition; syntax-aware cut (tree-sitter, indentation without a
grammar); text repeating the suffix, also as a last `else` branch; merging with
auto-closed brackets; the file's indentation style and line endings. Each rule that fires says so in
`decisions`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .data import Language
from .prompt import Prompt
from .segments import Segments
from .syntax import parse
from .text import imbalance, indent_of, is_closers_only, leading_ws, to_lf

WINDOW_BEFORE = 150  # prefix lines parsed with the completion; enough for an enclosing function
WINDOW_AFTER = 80


@dataclass
class Completion:
    text: str
    decisions: list[str] = field(default_factory=list)
    # The completion ended at a line that left the cursor's block or began the next statement
    # (the indentation scope): more text after it cannot change the answer, so a server may stop.
    settled: bool = False


def _is_pure_closer(line: str, language: Language) -> bool:
    s = line.strip()
    if not s:
        return False
    for tok in sorted(language.block_end, key=len, reverse=True):
        s = s.replace(tok, "")
    return not s.strip(" ;,)]}")


def _suffix_closes(suffix: str, closer_line: str, language: Language) -> bool:
    """Does the suffix (after the cursor line) already close the block `closer_line` would?"""
    for line in suffix.split("\n")[1:]:
        if line.strip():
            return _is_pure_closer(line, language) and indent_of(line) <= indent_of(closer_line)
    return False


def _drop_trailing_comments(text: str, language: Language) -> str:
    lines = text.split("\n")
    while len(lines) > 1 and (not lines[-1].strip() or (
            language.line_comment and lines[-1].strip().startswith(language.line_comment))):
        lines.pop()
    return "\n".join(lines)


def _cut_closing(text: str, li: int, prefix_line: str, suffix: str, language: Language,
                 what: str, d: list[str]) -> str:
    """Cut around line `li` of `text`, which closes the enclosing scope."""
    lines = text.split("\n")
    if li >= 1 and _is_pure_closer(lines[li], language) and _suffix_closes(suffix, lines[li], language):
        d.append(f"cut before line {li + 1}: the suffix already closes the {what}")
        return "\n".join(lines[:li])
    d.append(f"cut after line {li + 1}: it closes the {what}")
    return "\n".join(lines[:li + 1])


def _window_start(p_lines: list[str], language: Language) -> int:
    """The latest least-indented line among the last WINDOW_BEFORE: a good place to start parsing."""
    braces = "}" in language.block_end
    lo = max(0, len(p_lines) - WINDOW_BEFORE)
    best, best_ind = lo, 1 << 30
    for i in range(len(p_lines) - 2, lo - 1, -1):
        s = p_lines[i]
        # In brace languages a line ending in ":" is a label ("public:", "case 1:"), not a start.
        if s.strip() and indent_of(s) < best_ind and not (braces and s.rstrip().endswith(":")):
            best, best_ind = i, indent_of(s)
            if best_ind == 0:
                break
    return best


def _tree_cut(text: str, prefix: str, suffix: str, language: Language, d: list[str]) -> str | None:
    p_lines = prefix.split("\n")
    head = "\n".join(p_lines[_window_start(p_lines, language):])
    tail = "\n".join(suffix.split("\n")[:WINDOW_AFTER])
    parsed = parse(language, head + text + tail)
    if parsed is None:
        return None
    tree, lead = parsed
    cur = lead + len(head.encode())
    comp = text.encode()
    end = cur + len(comp)

    def line_at(byte: int) -> int:
        return comp[: max(0, byte - cur)].count(b"\n")

    root = tree.root_node
    n = root.descendant_for_byte_range(cur, cur)
    while n is not None and not (n.type in language.scope_node_types and n.start_byte < cur):
        n = n.parent
    if n is not None and cur < n.end_byte < end and comp[n.end_byte - cur:].strip():
        li = line_at(n.end_byte - 1) if n.end_byte > cur else 0
        return _cut_closing(text, li, p_lines[-1], suffix, language, n.type.replace("_", " "), d)
    # A new top-level definition after the one being written ends the completion.
    first = cur + (len(comp) - len(comp.lstrip()))
    for child in root.children:
        if child.start_byte <= first or child.start_byte >= end:
            continue
        li = line_at(child.start_byte)
        line = text.split("\n")[li]
        if li >= 1 and indent_of(line) == 0 and (child.type in language.scope_node_types
                                                 or line.startswith(language.top_level_keywords or ("\x00",))):
            d.append(f"cut before line {li + 1}: a new top-level {child.type.replace('_', ' ')}")
            return _drop_trailing_comments("\n".join(text.split("\n")[:li]), language)
    return text


def _indent_cut(text: str, prefix: str, suffix: str, language: Language, d: list[str]) -> str:
    lines = text.split("\n")
    p_last = prefix.rsplit("\n", 1)[-1]
    cursor_line = p_last + lines[0]
    base = indent_of(cursor_line) if cursor_line.strip() else indent_of(p_last + lines[0] + "x")
    opened = cursor_line.rstrip().endswith(("{", ":", "(", "[", " do", " then", "=>"))
    for i in range(1, len(lines)):
        line = lines[i]
        if not line.strip():
            continue
        ind = indent_of(line)
        if _is_pure_closer(line, language) and (ind < base or (opened and ind == base)):
            return _cut_closing(text, i, p_last, suffix, language, "block", d)
        if ind < base:
            d.append(f"cut before line {i + 1}: it leaves the block (indentation)")
            return "\n".join(lines[:i])
        if ind == 0 and line.startswith(language.top_level_keywords or ("\x00",)) and (
                base > 0 or not lines[i - 1].strip()):
            d.append(f"cut before line {i + 1}: a new top-level definition")
            return _drop_trailing_comments("\n".join(lines[:i]), language)
    return text


def _dedupe(text: str, p_last: str, d: list[str]) -> str:
    lines = text.split("\n")
    lines[0] = leading_ws(p_last) + lines[0]  # the first line starts at the cursor's indentation
    for i in range(len(lines)):
        for k in range(1, 5):
            block = lines[i:i + k]
            if len(block) < k or not any(len(l.strip()) > 1 for l in block):
                continue
            if lines[i + k:i + 2 * k] == block and lines[i + 2 * k:i + 3 * k] == block:
                d.append(f"removed degenerate repetition from line {i + k + 1}")
                return "\n".join(text.split("\n")[:i + k])
    return text


def _drop_suffix_repeat(text: str, suffix: str, d: list[str]) -> str:
    # Compared with their indentation: a nested "}" is not the suffix's "}".
    s = [l.rstrip() for l in suffix.split("\n")[1:] if l.strip()][:8]
    lines = text.split("\n")
    if not s:
        return text
    for i in range(1, len(lines)):
        tail = [l.rstrip() for l in lines[i:] if l.strip()]
        if not tail or tail[0] != s[0]:
            continue
        m = min(len(tail), len(s))
        if tail[: m - 1] == s[: m - 1] and s[m - 1].startswith(tail[m - 1]):
            d.append(f"dropped {len(lines) - i} lines repeating the suffix")
            return "\n".join(lines[:i])
    return text


_ELSE = re.compile(r"(\}\s*)?(else\b|elif\b|elsif\b)")
# Clauses that continue a compound statement at its own indentation (Python, Haskell's guards aside).
_CLAUSE = re.compile(r"(elif|else|except|finally|case)\b")
_OPENERS = ("{", ":", "(", "[", " do", " then", "=>")


def _restarted_indent(text: str, prefix: str, d: list[str]) -> str:
    """The cursor sits after the indentation of an otherwise empty line, and the model wrote the
    line again from column 0: `"    return a + b"` after a prefix ending in four spaces. The
    completion starts at the cursor, so that repeated indentation goes (up to the cursor's width).
    Not when the line above opens a block the editor has not indented yet: there the model's extra
    indentation is the block's."""
    p_last = prefix.rsplit("\n", 1)[-1]
    first = text.split("\n", 1)[0]
    ws = leading_ws(first)
    if not p_last or p_last.strip() or not ws or not first.strip():
        return text
    above = next((l for l in reversed(prefix.split("\n")[:-1]) if l.strip()), "")
    if above.rstrip().endswith(_OPENERS) and indent_of(p_last) <= indent_of(above):
        return text
    drop = min(len(ws), len(p_last))
    d.append(f"dropped {drop} characters of indentation the cursor line already has")
    return text[drop:]


def _next_indent(suffix: str) -> int | None:
    """Indentation of the suffix's next non-blank line after the cursor line (None: there is none)."""
    for line in suffix.split("\n")[1:]:
        if line.strip():
            return indent_of(line)
    return None


def _indent_scope(text: str, prefix: str, suffix: str, language: Language, d: list[str]) -> tuple[str, bool]:
    """For languages whose blocks end by indentation alone (Python): the completion ends where it
    leaves the cursor's block (a line indented less than the cursor line), even inside an `if` or a
    loop (the syntax cut knows only functions and classes). When the code after the cursor goes on
    in the same block, the editor is inserting between lines: the completion is one statement, the
    cursor line's, with its body and continuation lines (`elif`/`else`/`except`... included); when
    the code after it is indented deeper, the cursor line heads a block whose body is already
    there: the completion is that line. Returns the text and whether it was cut (settled)."""
    lines = text.split("\n")
    p_last = prefix.rsplit("\n", 1)[-1]
    cursor_line = p_last + lines[0]
    base = indent_of(cursor_line) if cursor_line.strip() else indent_of(p_last)
    after = _next_indent(suffix) if not suffix.split("\n", 1)[0].strip() else None
    header = after is not None and after > base and bool(lines[0].strip())
    one = after is not None and after >= base
    for i in range(1, len(lines)):
        line = lines[i]
        if not line.strip():
            continue
        ind = indent_of(line)
        balanced = not imbalance("\n".join(lines[:i]))
        if ind < base:
            d.append(f"cut before line {i + 1}: it leaves the cursor's block (indentation)")
            return _drop_trailing_comments("\n".join(lines[:i]), language), True
        if header and balanced:
            d.append(f"cut before line {i + 1}: the code after the cursor is this line's block")
            return "\n".join(lines[:i]).rstrip(), True
        if one and ind == base and balanced and not _CLAUSE.match(line.strip()):
            d.append(f"cut before line {i + 1}: the code after the cursor goes on in this block, "
                     "so the completion is one statement")
            return "\n".join(lines[:i]).rstrip(), True
    return text, False


def _drop_else_repeating_suffix(text: str, suffix: str, d: list[str]) -> str:
    """A last `else:`/`} else {` branch whose body is what the suffix does next anyway: the
    body would run twice, or be dead code after a return. The branch goes; `if` and `elif`
    branches before it stay. (Other blocks, loops say, are left alone: dropping them would
    change what the code does.)"""
    s = [l.strip() for l in suffix.split("\n")[1:] if l.strip()]
    lines = text.rstrip().split("\n")
    end = len(lines) - 1 if lines[-1].strip() == "}" else len(lines)
    for i in range(end - 2, 0, -1):
        opener = lines[i].rstrip()
        if not (_ELSE.match(opener.strip()) and opener.endswith((":", "{"))):
            continue
        body = lines[i + 1:end]
        stripped = [l.strip() for l in body if l.strip()]
        deeper = all(indent_of(l) > indent_of(opener) for l in body if l.strip())
        if stripped and deeper and stripped == s[:len(stripped)]:
            keep = lines[:i]
            if opener.strip().startswith("}"):  # the closer of the branch before stays
                keep.append(leading_ws(opener) + "}")
            d.append(f"dropped the last else branch (lines {i + 1}-{len(lines)}): the suffix does the same next")
            return "\n".join(keep)
        break  # only the last branch counts
    return text


def _merge_closers(text: str, prefix: str, rest: str, d: list[str]) -> tuple[str, bool]:
    """Drop the closers the editor already inserted after the cursor, if the text repeats them."""
    r = rest.strip()
    if not is_closers_only(r):
        return text, False
    body = text.rstrip()
    ctx = "\n".join(prefix.split("\n")[-10:])
    for k in range(len(r), 0, -1):
        if body.endswith(r[:k]):
            cand = body[:-k]
            if imbalance(ctx + cand + rest) < imbalance(ctx + body + rest):
                d.append(f"merged with the auto-closed {r[:k]!r} after the cursor")
                return cand, True
    return text, False


def _indent_style(text: str, prefix: str, suffix: str, d: list[str]) -> str:
    file_lines = prefix.split("\n")[-200:] + suffix.split("\n")[:100]
    tabs = sum(l.startswith("\t") for l in file_lines)
    spaces = [indent_of(l) for l in file_lines if l.startswith(" ") and l.strip()]
    lines = text.split("\n")
    if tabs > len(spaces) and any(l.startswith(" ") for l in lines[1:]):
        widths = [len(leading_ws(l)) for l in lines[1:] if l.startswith(" ") and l.strip()]
        unit = min([w for w in widths if w >= 2] or [4])
        for i in range(1, len(lines)):
            ws = leading_ws(lines[i])
            if " " in ws:
                w = indent_of(ws)
                lines[i] = "\t" * (w // unit) + " " * (w % unit) + lines[i][len(ws):]
        d.append("indentation: spaces to tabs, as in the file")
    elif len(spaces) > tabs and any(l.startswith("\t") for l in lines[1:]):
        unit = min([w for w in spaces if w >= 2] or [4])
        for i in range(1, len(lines)):
            ws = leading_ws(lines[i])
            lines[i] = ws.replace("\t", " " * unit) + lines[i][len(ws):]
        d.append(f"indentation: tabs to {unit} spaces, as in the file")
    return "\n".join(lines)


def postprocess(raw: str, segments: Segments, language: Language, prompt: Prompt) -> Completion:
    d: list[str] = []
    settled = False
    crlf = "\r\n" in segments.prefix or "\r\n" in segments.suffix
    prefix, suffix, text = to_lf(segments.prefix), to_lf(segments.suffix), to_lf(raw)
    hits = [(text.find(s), s) for s in prompt.stop_strings if s and s in text]
    if hits:
        at, s = min(hits)
        text = text[:at]
        if s != "\n":
            d.append(f"stopped at {s!r}")
    text = _restarted_indent(text, prefix, d)
    rest = suffix.split("\n", 1)[0]
    single = not prompt.multiline
    p_last = prefix.rsplit("\n", 1)[-1]
    if prompt.multiline and rest.strip() and p_last.strip() and "\n" in text.strip("\n"):
        # Only auto-closed text after the cursor: stay on the line unless the completion
        # starts on a new line or opens a block at its end.
        first = text.split("\n", 1)[0].rstrip()
        single = bool(first.strip()) and not first.endswith(("{", "(", "[", ",", ":", " do", "|", "=>"))
    if single:
        if "\n" in text:
            text = text.split("\n", 1)[0]
        d.append("single line: the cursor is mid-line" if not prompt.multiline
                 else "single line: only auto-closed text follows the cursor")
    elif "\n" in text.strip("\n"):
        text = _dedupe(text, prefix.rsplit("\n", 1)[-1], d)
        cut = _tree_cut(text, prefix, suffix, language, d) if language.grammar else None
        text = cut if cut is not None else _indent_cut(text, prefix, suffix, language, d)
        if not language.block_end and "\n" in text.strip("\n"):
            text, settled = _indent_scope(text, prefix, suffix, language, d)
        text = _drop_suffix_repeat(text, suffix, d)
        text = _drop_else_repeating_suffix(text, suffix, d)
    merged = False
    if rest.strip() and is_closers_only(rest):
        text, merged = _merge_closers(text, prefix, rest, d)
    elif rest.strip() and text.rstrip().endswith(rest.strip()):
        text = text.rstrip()[: -len(rest.strip())]
        d.append("dropped text repeating the rest of the line")
    text = _indent_style(text, prefix, suffix, d)
    if not merged:
        text = text.rstrip()
    if not text.strip():
        text = ""
    if crlf and text:
        text = text.replace("\n", "\r\n")
        d.append("line endings: \\r\\n, as in the file")
    return Completion(text=text, decisions=d, settled=settled)
