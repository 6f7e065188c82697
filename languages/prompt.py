"""Prompt assembly under a token budget.

Every piece (a line, a marker, a context block) is encoded on its own and the
prompt's ids are the concatenation of those pieces, so the count we budget is
exactly the count we send, and the FIM tokens are added as ids around them: the
budget can never cut one. Pieces split at line starts, where byte-level BPE
pre-tokenizers split anyway.
"""
from __future__ import annotations

import threading
import weakref
import zlib
from dataclasses import dataclass, field

from .context import file_signatures, render_block, request_blocks
from .data import Language
from .fim import FimTemplate, TokenizerLike
from .memo import LRU
from .segments import Segments
from .syntax import capture_lines
from .text import imbalance, indent_of, is_closers_only, leading_ws, to_lf


@dataclass
class Prompt:
    ids: list[int]
    text: str
    stop_token_ids: list[int]
    stop_strings: list[str]
    multiline: bool
    decisions: list[str] = field(default_factory=list)


def split_lines(text: str) -> list[str]:
    """Lines keeping their "\n"; the last one (maybe empty) has none."""
    parts = text.split("\n")
    return [p + "\n" for p in parts[:-1]] + [parts[-1]]


# Line -> token ids, kept across builds per tokenizer (languages/memo.py): while the user types,
# nearly every line of a prompt was encoded for the previous one. Weight: characters plus ids.
# Full of ordinary code (16,384 lines of the standard library) it holds about 15 MB; the weight
# bound keeps it under about 40 MB whatever the text (an id costs 36 bytes, a character 1 to 4). A piece
# over 1/16 of the weight (a huge minified line, a giant snippet) is encoded every time instead.
TOKEN_MEMO_ENTRIES = 16384
TOKEN_MEMO_WEIGHT = 1_000_000

_token_memos: "weakref.WeakKeyDictionary[object, LRU]" = weakref.WeakKeyDictionary()
_token_memos_lock = threading.Lock()


def token_memo(tok: TokenizerLike) -> LRU | None:
    """The shared memo of `tok`'s encodings (None for a tokenizer that cannot be weakly referenced).

    Keyed by the tokenizer object: a tokenizer must not change its encoding after its first
    prompt (ours never does: special tokens are fixed when it is loaded).
    """
    with _token_memos_lock:
        try:
            memo = _token_memos.get(tok)
            if memo is None:
                memo = _token_memos[tok] = LRU(TOKEN_MEMO_ENTRIES, TOKEN_MEMO_WEIGHT,
                                               lambda text, ids: len(text) + len(ids))
        except TypeError:
            return None
        return memo


class _Encoder:
    """Memoised encode: a dict for this build (lines repeat: blank lines, braces) in front of the
    tokenizer's shared memo. Ids come back as tuples: shared between builds, they must not change."""

    def __init__(self, tok: TokenizerLike):
        self.tok = tok
        self.memo: dict[str, tuple[int, ...]] = {}
        self.shared = token_memo(tok)

    def __call__(self, text: str) -> tuple[int, ...]:
        ids = self.memo.get(text)
        return self._miss(text) if ids is None else ids

    def _miss(self, text: str) -> tuple[int, ...]:
        ids = self.shared.get(text) if self.shared is not None else None
        if ids is None:
            ids = tuple(self.tok.encode(text)) if text else ()
            if self.shared is not None:
                self.shared.put(text, ids)
        self.memo[text] = ids
        return ids

    def n(self, text: str) -> int:
        ids = self.memo.get(text)  # the hot path: a thousand calls a build
        return len(self._miss(text) if ids is None else ids)


def _walk(lines: list[str], idx, cap: int, enc: _Encoder) -> tuple[int, int]:
    """How many lines (in the order of `idx`) fit in `cap` tokens, and their cost."""
    used = taken = 0
    n = enc.n
    for i in idx:
        c = n(lines[i])
        if used + c > cap:
            break
        used += c
        taken += 1
    return taken, used


def _marker(language: Language, indent: str) -> str:
    return indent + language.comment("...") + "\n"


def _scope_headers(lines: list[str], start: int, language: Language) -> list[int]:
    """Indices before `start` of the lines that open the scopes enclosing it, innermost first.

    Indentation finds them in every language, grammar or not: a header is the
    nearest earlier line indented less than everything after it.
    """
    near = [indent_of(l) for l in lines[start:] if l.strip()]
    level = min(near) if near else 0
    out = []
    comment = language.line_comment or "\x00"
    for i in range(start - 1, -1, -1):
        if level == 0:
            break
        s = lines[i].strip()
        if not s or s.startswith(comment) or s[0] in ")]}" or s.startswith(tuple(language.block_end or ("\x00",))):
            continue
        ind = indent_of(lines[i])
        if ind < level:
            out.append(i)
            level = ind
    return out


# Imports sit at the top of a file; parsing only this many lines keeps the
# query cheap (a 2,000-line parse costs several milliseconds).
IMPORT_HEAD_LINES = 200


def _import_groups(lines: list[str], stop: int, language: Language) -> list[list[int]]:
    """Groups of line indices (one import statement each, continuation lines included) before `stop`.

    The language's `imports.scm` query finds them where a grammar is installed;
    its `import_patterns` regexes do elsewhere.
    """
    head = min(stop, IMPORT_HEAD_LINES)
    spans = capture_lines(language, "imports", "".join(lines[:head]))
    if spans is not None:
        return [list(range(a, b + 1)) for a, b in spans if b < head]
    rx = language.import_re
    if rx is None:
        return []
    groups = []
    i = 0
    while i < stop:
        if rx.match(lines[i]):
            j = i + 1
            while j < stop and j - i < 30 and imbalance("".join(lines[i:j])) and "(" in lines[i]:
                j += 1
            groups.append(list(range(i, j)))
            i = j
        else:
            i += 1
    return groups


# The elided prefix window starts only at anchor lines: non-blank lines whose text hashes to 0
# modulo ANCHOR_EVERY (about one line in 8). Anchors belong to the text, not to line numbers, so
# while the user types (the cursor line grows, lines are added or removed above) the window keeps
# its first line, and the engine's cached keys/values of the prompt's start stay valid
# (engine/kv_pool.py). Where the window is too short for one, coarser levels give way to finer ones
# (a line that hashes to 0 modulo 8 does so modulo 4, 2 and 1: the levels nest).
ANCHOR_EVERY = 8
ANCHOR_LEVELS = (8, 4, 2, 1)
CURSOR_LINE_STEP = 32  # tokens


def _line_hash(line: str) -> int | None:
    s = line.strip()
    return zlib.crc32(s.encode("utf-8", "surrogatepass")) if s else None


def _is_anchor(line: str, every: int = ANCHOR_EVERY) -> bool:
    h = _line_hash(line)
    return h is not None and h % every == 0


def _anchor_at_or_after(lines: list[str], i: int, stop: int) -> int | None:
    """The first anchor line in [i, stop), at the coarsest level that has one."""
    for every in ANCHOR_LEVELS:
        j = next((j for j in range(i, stop) if _is_anchor(lines[j], every)), None)
        if j is not None:
            return j
    return None


def _anchor_before(lines: list[str], i: int, every: int) -> int:
    """The nearest anchor line (of level `every`) before i; the file's first line counts as one."""
    return next((j for j in range(i - 1, 0, -1) if _is_anchor(lines[j], every)), 0)


def _assemble(lines, keep: set[int], language, enc) -> tuple[list[str], int]:
    """Kept lines in order, with a marker comment where lines were left out."""
    pieces, cost, prev = [], 0, -1
    for i in sorted(keep):
        if i != prev + 1:
            pieces.append(_marker(language, leading_ws(lines[i])))
        pieces.append(lines[i])
        prev = i
    for p in pieces:
        cost += enc.n(p)
    return pieces, cost


def _cursor_line_only(lines, cap, enc, decisions):
    """Even the cursor line does not fit: its last tokens only (build_prompt takes them)."""
    decisions.append(f"prefix: cut to the last {max(cap, 0)} tokens of the cursor line")
    return [], set()


def _elide_prefix(lines: list[str], cap: int, language: Language, enc: _Encoder, decisions: list[str]):
    """Fit the prefix lines into `cap` tokens; returns the pieces and the kept indices."""
    n = len(lines)
    total_taken, _ = _walk(lines, range(n - 1, -1, -1), cap, enc)
    if total_taken == n:
        return lines, set(range(n))
    if total_taken == 0:
        return _cursor_line_only(lines, cap, enc, decisions)
    # The room of the lines above the cursor must not change with every key typed on the cursor
    # line, or the window's first line would move each time: count the cursor line as its tokens
    # rounded up to a step.
    at_cursor = enc.n(lines[-1])
    cap = min(cap, cap - -(-at_cursor // CURSOR_LINE_STEP) * CURSOR_LINE_STEP + at_cursor)
    # 1. the lines nearest the cursor get half the room first
    near, _ = _walk(lines, range(n - 1, -1, -1), max(cap // 2, 1), enc)
    near = max(near, 1)
    start = n - near
    # ...starting at an anchor line (see ANCHOR_EVERY), the same one while the cursor moves on
    start = _anchor_at_or_after(lines, start, n - 1) or start
    keep = set(range(start, n))
    _, used = _assemble(lines, keep, language, enc)
    extra: list[list[int]] = []

    def marker(i: int) -> int:
        return enc.n(_marker(language, leading_ws(lines[i])))

    def try_add(group: list[int]) -> bool:
        """Add the lines if they fit; the cost changes by their tokens and the markers they make or close."""
        nonlocal used
        added: set[int] = set()
        delta = 0
        for j in group:
            if j in keep or j in added:
                continue
            has = lambda k: k in keep or k in added  # noqa: E731
            delta += enc.n(lines[j]) + (marker(j) if j > 0 and not has(j - 1) else 0)
            if has(j + 1):
                delta -= marker(j + 1)
            added.add(j)
        if used + delta > cap:
            return False
        keep.update(added)
        used += delta
        extra.append(group)
        return True

    # 2. headers of the enclosing scopes, 3. imports
    headers = [h for h in _scope_headers(lines, start, language) if try_add([h])]
    imports = [g for g in _import_groups(lines, start, language) if try_add(g)]
    # 4. the rest of the room: more lines nearest the cursor, from anchor to anchor (8 lines on
    # average, then 4 for what room is left), so that the window's first line stays where it was
    # while the room changes by a few tokens
    i = start
    for every in ANCHOR_LEVELS[:2]:
        while i > 0:
            a = _anchor_before(lines, i, every)
            if not try_add([j for j in range(a, i) if j not in keep]):
                break
            i = a
    pieces, cost = _assemble(lines, keep, language, enc)
    while cost > cap and keep:  # the one forced near line plus its marker may not fit
        keep.discard(min(keep))
        pieces, cost = _assemble(lines, keep, language, enc)
    if not keep:
        return _cursor_line_only(lines, cap, enc, decisions)
    elided = n - len(keep)
    decisions.append(f"prefix: {n} lines over budget; kept {len(keep)} "
                     f"({len(headers)} scope headers, {len(imports)} imports), elided {elided} behind '{language.comment('...')}' markers")
    return pieces, keep


# When prefix and suffix do not both fit, the suffix gets at least 1/SUFFIX_SHARE of the room and the
# prefix the rest. The prefix's tokens are nearly free while the user types (the engine keeps their
# keys/values from the last prompt), the suffix's are computed again at every key (it follows the
# changing cursor line in a prefix-first prompt): so the prefix gets the larger share.
SUFFIX_SHARE = 8

# Context blocks in the prompt: files the editor found relevant (they change when the user switches
# files), the clipboard, declarations of names near the cursor, signatures used near the cursor
# (these change while the user types). Within a kind, by text.
CONTEXT_ORDER = {"snippet": 0, "clipboard": 1, "declaration": 2, "signatures": 3}


def build_prompt(segments: Segments, language: Language, tokenizer: TokenizerLike,
                 template: FimTemplate, budget_tokens: int = 2048) -> Prompt:
    decisions = [f"language: {language.name}", f"template: {template.name}"]
    enc = _Encoder(tokenizer)
    prefix, suffix = to_lf(segments.prefix), to_lf(segments.suffix)
    lead_ids = list(enc(template.prefix_lead))
    avail = budget_tokens - template.special_count - len(lead_ids)
    if avail < 0:
        raise ValueError(f"token budget {budget_tokens} is smaller than the FIM template's "
                         f"{template.special_count + len(lead_ids)} tokens")
    p_lines, s_lines = split_lines(prefix), split_lines(suffix)
    p_fit, p_need = _walk(p_lines, range(len(p_lines) - 1, -1, -1), avail, enc)
    s_fit, s_need = _walk(s_lines, range(len(s_lines)), avail, enc)
    p_need = p_need if p_fit == len(p_lines) else avail + 1
    s_need = s_need if s_fit == len(s_lines) else avail + 1

    blocks = request_blocks(segments, language)
    ctx_need = sum(enc.n(b) for _, b in blocks)
    ctx_cap = min(ctx_need, avail // 4)
    if p_need + s_need > avail:  # something will be elided: keep room for its signatures
        ctx_cap = min(avail // 4, max(ctx_need, avail // 8))
    s_cap = min(s_need, max(avail // SUFFIX_SHARE, avail - ctx_cap - p_need))
    p_cap = avail - ctx_cap - s_cap

    # Suffix: the lines nearest the cursor.
    s_take, s_used = _walk(s_lines, range(len(s_lines)), s_cap, enc)
    if s_take == 0 and s_lines[0]:
        s_ids = list(enc(s_lines[0])[:s_cap]) if s_cap > 0 else []
        s_text = tokenizer.decode(s_ids)
    else:
        s_ids = [i for line in s_lines[:s_take] for i in enc(line)]
        s_text = "".join(s_lines[:s_take])
    if s_take < len(s_lines):
        decisions.append(f"suffix: kept the first {s_take} of {len(s_lines)} lines")

    p_pieces, p_keep = _elide_prefix(p_lines, p_cap, language, enc, decisions)
    if p_keep:
        p_ids = [i for piece in p_pieces for i in enc(piece)]
    else:  # even the cursor line did not fit: its last tokens
        p_ids = list(enc(p_lines[-1])[-p_cap:]) if p_cap > 0 else []

    # Context fills what prefix and suffix left, most relevant first.
    room = avail - len(p_ids) - len(s_ids)
    if len(p_keep) < len(p_lines) or s_take < len(s_lines):
        elided = [p_lines[i] for i in range(len(p_lines)) if i not in p_keep] + s_lines[s_take:]
        near = "".join(p_lines[-20:]) + "".join(s_lines[:10])
        sigs = file_signatures(language, elided, near)
        if sigs:
            path = f"{segments.filepath or 'this file'} (elsewhere in this file)"
            n_decl = sum(1 for k, _ in blocks if k == "declaration")
            blocks.insert(n_decl, ("signatures", render_block(language, path, "\n".join(sigs))))
    chosen, n_ctx = [], 0
    for kind, block in blocks:  # chosen by priority...
        if n_ctx + enc.n(block) <= room:
            chosen.append((kind, block))
            n_ctx += enc.n(block)
    used_kinds = [k for k, _ in chosen]
    # ...written in a stable order, the ones that change least often first: a snippet's score moving
    # it up or down, or a new signature, then leaves the cached start of the prompt valid
    chosen.sort(key=lambda kb: (CONTEXT_ORDER.get(kb[0], len(CONTEXT_ORDER)), kb[1]))
    ctx_text = "".join(b for _, b in chosen)
    ctx_ids = [i for _, b in chosen for i in enc(b)]
    if blocks:
        decisions.append(f"context: {len(used_kinds)} of {len(blocks)} blocks ({', '.join(used_kinds) or 'none fit'})")

    ids = template.assemble(lead_ids + ctx_ids + p_ids, s_ids)
    p_text = "".join(p_pieces) if p_keep else tokenizer.decode(p_ids)
    text = template.render(template.prefix_lead + ctx_text + p_text, s_text)
    decisions.append(f"budget: {len(ids)}/{budget_tokens} tokens (context {len(ctx_ids)}, "
                     f"prefix {len(p_ids)}, suffix {len(s_ids)})")

    line_rest = s_lines[0].rstrip("\n")
    cursor_line = p_lines[-1]
    multiline = not (line_rest.strip() and not is_closers_only(line_rest))
    decisions.append("mode: multi-line" if multiline else "mode: single-line (cursor mid-line)")
    stops = list(template.stop_texts)
    if not multiline:
        stops.append("\n")
    elif indent_of(cursor_line) > 0:
        # Inside an indented block, a top-level keyword at column 0 ends it for sure.
        stops += ["\n" + kw for kw in language.top_level_keywords if kw[:1].isalpha()]
    stop_ids = list(dict.fromkeys([*template.stop_ids, *getattr(tokenizer, "eos_token_ids", ())]))
    return Prompt(ids=ids, text=text, stop_token_ids=stop_ids, stop_strings=stops,
                  multiline=multiline, decisions=decisions)
