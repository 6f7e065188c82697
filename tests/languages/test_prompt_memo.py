"""Memos across prompt builds (languages/memo.py): the same prompts as a build that remembers
nothing, far less work per keystroke, and never more memory than their bounds."""
from __future__ import annotations

import json.decoder
import threading
from pathlib import Path

import pytest

import languages.context as context
import languages.prompt as prompt_mod
import languages.syntax as syntax
from benchmarks.reuse_bench import keystroke_trace
from languages import Segments, build_prompt, fim_template_for, memo, resolve_language
from languages.memo import LRU

from lang_fixtures import QWEN_TOKENS, load_tokenizer

REPO = Path(__file__).resolve().parents[2]
# Real files: a Python module of the standard library and a TypeScript one of this repo.
FILES = [Path(json.decoder.__file__), REPO / "editors" / "vscode" / "src" / "extension.ts"]


@pytest.fixture(autouse=True)
def _fresh_memos():
    memo.clear_all()
    yield
    memo.set_enabled(True)
    memo.clear_all()


class CountingTokenizer:
    """The fixture's real tokenizer, counting its encodes."""

    def __init__(self, tok):
        self.tok = tok
        self.special_tokens = tok.special_tokens
        self.eos_token_ids = tok.eos_token_ids
        self.encodes = 0

    def encode(self, text):
        self.encodes += 1
        return self.tok.encode(text)

    def decode(self, ids):
        return self.tok.decode(ids)

    def token_id(self, text):
        return self.tok.token_id(text)


def _build(seg, lang, tok, tpl, budget, remember: bool):
    old = memo.set_enabled(remember)
    try:
        return build_prompt(seg, lang, tok, tpl, budget)
    finally:
        memo.set_enabled(old)


def _same(a, b):
    assert a.ids == b.ids
    assert a.text == b.text
    assert (a.decisions, a.stop_strings, a.stop_token_ids, a.multiline) == (
        b.decisions, b.stop_strings, b.stop_token_ids, b.multiline)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("budget", [2048, 400])
def test_memoised_prompts_equal_fresh_builds_on_a_keystroke_trace(path, budget, monkeypatch):
    tok = CountingTokenizer(load_tokenizer(QWEN_TOKENS))
    tpl = fim_template_for(tok)
    lang = resolve_language(None, path.name)
    assert lang.grammar  # the signature and import queries run
    parses = []
    real_parse = syntax.parse
    monkeypatch.setattr(syntax, "parse", lambda *a: parses.append(1) or real_parse(*a))
    trace = keystroke_trace(path.read_text(encoding="utf-8"), 24, 6)
    work = []
    for prefix, suffix in trace:
        seg = Segments(prefix, suffix, filepath=path.name)
        tok.encodes, parses[:] = 0, []
        warm = _build(seg, lang, tok, tpl, budget, remember=True)
        work.append((tok.encodes, len(parses)))
        tok.encodes, parses[:] = 0, []
        _same(warm, _build(seg, lang, tok, tpl, budget, remember=False))
        fresh = (tok.encodes, len(parses))
        assert len(warm.ids) <= budget
    # The first keystroke fills the memos; after it, a key costs the cursor line's encode and a
    # few more (where the window moves, a new name's signature), not the whole file's.
    assert work[0][0] >= fresh[0] > 50
    later = sorted(work[1:])
    median = later[len(later) // 2]
    assert median[0] <= 3 and median[1] <= 1, work


def test_tiny_memos_evict_mid_build_and_change_nothing(monkeypatch):
    """Bounds far below one prompt's lines: entries are dropped while a build runs, the prompt is the same."""
    monkeypatch.setattr(prompt_mod, "TOKEN_MEMO_ENTRIES", 16)
    monkeypatch.setattr(prompt_mod, "TOKEN_MEMO_WEIGHT", 600)
    tok = load_tokenizer(QWEN_TOKENS)  # a new tokenizer object: its memo takes the tiny bounds
    tpl = fim_template_for(tok)
    path = FILES[0]
    lang = resolve_language("python")
    for prefix, suffix in keystroke_trace(path.read_text(encoding="utf-8"), 8, 3):
        seg = Segments(prefix, suffix, filepath=path.name)
        _same(_build(seg, lang, tok, tpl, 1024, True), _build(seg, lang, tok, tpl, 1024, False))
        shared = prompt_mod.token_memo(tok)
        assert 0 < len(shared) <= 16 and shared.weight <= 600
    assert len(context._SIGNATURE_MEMO) <= context._SIGNATURE_MEMO.max_entries


def test_memo_bounds_and_order():
    m = LRU(max_entries=3, max_weight=10, weigh=lambda k, v: len(v), max_item_weight=5)
    for k in "abc":
        m.put(k, (1, 2))
    assert len(m) == 3 and m.weight == 6
    assert m.get("a") == (1, 2)  # a is now the most recent: b goes first
    m.put("d", (1,))
    assert m.get("b") is None and [m.get(k) is not None for k in "acd"] == [True, True, True]
    m.put("e", (1, 2, 3, 4))  # over the weight: the least recent go until it fits
    assert m.weight <= 10 and len(m) <= 3 and m.get("e") == (1, 2, 3, 4)
    m.put("big", tuple(range(6)))  # heavier than one item may be: never kept
    assert m.get("big") is None
    m.put("e", (9,))  # replacing an entry replaces its weight
    assert m.weight == sum(len(m.get(k)) for k in list(m._data))
    memo.set_enabled(False)
    m.put("f", (1,))
    assert m.get("e") is None and m.get("f") is None
    memo.set_enabled(True)
    assert m.get("f") is None and m.get("e") == (9,)
    m.clear()
    assert len(m) == 0 and m.weight == 0


def test_the_default_bounds_hold_over_many_files():
    """Every Python file of the json package, typed at: the memos stay within their bounds."""
    tok = load_tokenizer(QWEN_TOKENS)
    tpl = fim_template_for(tok)
    lang = resolve_language("python")
    for path in sorted(Path(json.decoder.__file__).parent.glob("*.py")):
        for prefix, suffix in keystroke_trace(path.read_text(encoding="utf-8"), 4, 2):
            build_prompt(Segments(prefix, suffix, filepath=path.name), lang, tok, tpl, 1024)
    for m in (prompt_mod.token_memo(tok), syntax._capture_memo, context._SIGNATURE_MEMO):
        assert len(m) <= m.max_entries and m.weight <= m.max_weight
        assert len(m) > 0


def test_threads_share_the_memos_and_get_the_same_prompts():
    tok = load_tokenizer(QWEN_TOKENS)
    tpl = fim_template_for(tok)
    lang = resolve_language("python")
    trace = keystroke_trace(FILES[0].read_text(encoding="utf-8"), 12, 4)
    expected = [_build(Segments(p, s), lang, tok, tpl, 1024, False) for p, s in trace]
    memo.clear_all()
    errors = []

    def work(order):
        try:
            for k in order:
                _same(build_prompt(Segments(*trace[k]), lang, tok, tpl, 1024), expected[k])
        except Exception as exc:  # reported below: an assert in a thread does not fail the test
            errors.append(exc)

    ks = list(range(len(trace)))
    threads = [threading.Thread(target=work, args=(ks[i:] + ks[:i],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_a_tokenizer_without_weak_references_still_builds():
    class Slotted:
        __slots__ = ("tok", "special_tokens", "eos_token_ids")

        def __init__(self, tok):
            self.tok, self.special_tokens, self.eos_token_ids = tok, tok.special_tokens, tok.eos_token_ids

        def encode(self, text):
            return self.tok.encode(text)

        def decode(self, ids):
            return self.tok.decode(ids)

    real = load_tokenizer(QWEN_TOKENS)
    tok = Slotted(real)
    assert prompt_mod.token_memo(tok) is None
    tpl = fim_template_for(real)
    seg = Segments("def f(x):\n    return ", "\n")
    _same(build_prompt(seg, resolve_language("python"), tok, tpl, 256),
          build_prompt(seg, resolve_language("python"), real, tpl, 256))


@pytest.mark.parametrize("names_per_text", [1024, 3])
def test_signatures_keep_file_order_and_limit_as_names_arrive_one_by_one(names_per_text, monkeypatch):
    """Names near the cursor come one keystroke at a time and their answers are remembered one by
    one; the block still lists the definitions in the file's order, at most `limit` of them (also
    when the memo of names per text is full and starts over)."""
    monkeypatch.setattr(context, "_NAMES_PER_TEXT", names_per_text)
    tok = load_tokenizer(QWEN_TOKENS)
    tpl = fim_template_for(tok)
    lang = resolve_language("python")
    defs = "".join(f"def h{i}(a{i}):\n    return a{i}\n\n" for i in range(10))
    far = defs + "".join(f"x{i} = {i}\n" for i in range(400))

    def sigs(calls):
        seg = Segments(far + "def main():\n    return " + " + ".join(f"h{i}(1)" for i in calls), "\n", filepath="m.py")
        text = build_prompt(seg, lang, tok, tpl, 700).text
        return [int(line.split("(")[0][len("# def h"):]) for line in text.split("\n") if line.startswith("# def h")]

    assert sigs([3]) == [3]
    assert sigs([3, 1]) == [1, 3]
    assert sigs([9, 3, 1, 0]) == [0, 1, 3, 9]
    assert sigs(range(9, -1, -1)) == list(range(8))
    assert context.file_signatures(lang, far.splitlines(keepends=True), "h9(1) + h2(2)", limit=1) == ["def h2(a2):"]
    assert all(len(found) <= names_per_text for found, _ in context._SIGNATURE_MEMO._data.values())
