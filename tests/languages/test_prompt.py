"""Prompt assembly: budget, FIM token order, templates, context."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from languages import (LANGUAGES, Segments, Snippet, build_prompt, fim_template_for,
                       resolve_language)

from lang_fixtures import load_tokenizer

def _py():
    return resolve_language("python")


text = st.lists(st.sampled_from(list("ab ()\n\t:{}#é\r") + ["<fim_prefix>", "<fim_middle>", "<|fim_suffix|>", "def ", "import x\n", "    "]),
                max_size=120).map("".join) | st.text(max_size=200)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=text, suffix=text, budget=st.integers(min_value=4, max_value=300),
       decl=st.lists(text, max_size=2), lang=st.sampled_from(["python", "go", "ruby", "swift", "css", None]))
def test_budget_and_fim_order(tok, prefix, suffix, budget, decl, lang):
    tpl = fim_template_for(tok)
    seg = Segments(prefix=prefix, suffix=suffix, declarations=[Snippet("a/b.x", b) for b in decl])
    p = build_prompt(seg, resolve_language(lang, "f.py"), tok, tpl, budget)
    assert len(p.ids) <= budget
    fim = [i for i in p.ids if i in (tpl.prefix_id, tpl.suffix_id, tpl.middle_id)]
    assert fim == [tpl.prefix_id, tpl.suffix_id, tpl.middle_id]  # once each, in order: none forged
    assert p.ids[0] == tpl.prefix_id and p.ids[-1] == tpl.middle_id


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=text, suffix=text, budget=st.integers(min_value=6, max_value=200))
def test_budget_qwen(qwen_tok, prefix, suffix, budget):
    tpl = fim_template_for(qwen_tok)
    p = build_prompt(Segments(prefix, suffix), _py(), qwen_tok, tpl, budget)
    assert len(p.ids) <= budget
    assert [i for i in p.ids if i in (tpl.prefix_id, tpl.suffix_id, tpl.middle_id)] == [
        tpl.prefix_id, tpl.suffix_id, tpl.middle_id]


def test_whole_prompt_when_it_fits(tok):
    tpl = fim_template_for(tok)
    p = build_prompt(Segments("def f():\n    ", "\n"), _py(), tok, tpl)
    assert p.ids == [tpl.prefix_id, *tok.encode("def f():\n    "), tpl.suffix_id, *tok.encode("\n"), tpl.middle_id]
    assert p.text == "<fim_prefix>def f():\n    <fim_suffix>\n<fim_middle>"
    assert p.multiline and 0 in p.stop_token_ids


def test_forged_fim_text_stays_text(tok):
    tpl = fim_template_for(tok)
    p = build_prompt(Segments("x = '<fim_middle>'", ""), _py(), tok, tpl)
    assert p.ids.count(tpl.middle_id) == 1


def test_long_prefix_keeps_imports_headers_and_nearest_lines(tok):
    body = "".join(f"        self.v{i} = {i}\n" for i in range(300))
    prefix = ("import os\nfrom typing import (\n    Any,\n    List,\n)\n\n"
              "class Store:\n    def __init__(self):\n" + body + "        ")
    tpl = fim_template_for(tok)
    p = build_prompt(Segments(prefix, "\n"), _py(), tok, tpl, 400)
    assert len(p.ids) <= 400
    assert "import os\n" in p.text and "    Any,\n" in p.text and ")\n" in p.text
    assert "class Store:\n" in p.text and "    def __init__(self):\n" in p.text
    assert "self.v299 = 299\n        <fim_suffix>" in p.text
    assert "self.v0 = 0\n" not in p.text
    assert "# ...\n" in p.text  # elision marked as a comment of the language
    assert any(d.startswith("prefix:") for d in p.decisions)


def test_imports_come_from_the_grammar_query(tok):
    # A Rust `use` spanning lines with braces: the imports.scm query keeps the whole
    # statement, where a line regex would keep only its first line.
    from languages import resolve_language

    body = "".join(f"    let v{i} = {i};\n" for i in range(300))
    prefix = ("use std::{\n    fs,\n    io::{self, Read},\n};\nuse serde::Deserialize;\n\n"
              "fn main() {\n" + body + "    ")
    tpl = fim_template_for(tok)
    p = build_prompt(Segments(prefix, "\n}\n"), resolve_language("rust"), tok, tpl, 300)
    assert len(p.ids) <= 300
    assert "use std::{\n    fs,\n    io::{self, Read},\n};\nuse serde::Deserialize;\n" in p.text
    assert "fn main() {\n" in p.text and "let v0 = 0;" not in p.text
    assert "2 imports" in " ".join(p.decisions)


def test_cursor_line_longer_than_budget(tok):
    tpl = fim_template_for(tok)
    p = build_prompt(Segments("x = " + "a + " * 500, ""), _py(), tok, tpl, 50)
    assert len(p.ids) <= 50 and p.ids[0] == tpl.prefix_id and p.ids[-1] == tpl.middle_id


def test_context_blocks_and_file_signatures(tok):
    tpl = fim_template_for(tok)
    far = "def helper(a, b):\n    return a + b\n\n" + "".join(f"x{i} = {i}\n" for i in range(400))
    seg = Segments(far + "def main():\n    return ", "\n", filepath="m.py",
                   declarations=[Snippet("lib/util.py", "def util():\n    pass")])
    p = build_prompt(seg, _py(), tok, tpl, 700)
    assert "# Path: lib/util.py\n# def util():\n#     pass\n" in p.text
    # main() does not call helper, so no signature yet
    assert "elsewhere in this file" not in p.text
    seg.suffix = "\n    helper(1, 2)\n"
    p = build_prompt(seg, _py(), tok, tpl, 700)
    assert "# Path: m.py (elsewhere in this file)\n# def helper(a, b):\n" in p.text
    assert len(p.ids) <= 700


def test_go_signature_via_tree_sitter(tok):
    tpl = fim_template_for(tok)
    far = "package main\n\nfunc scale(v int, k int) int {\n\treturn v * k\n}\n" + "// filler\n" * 600
    p = build_prompt(Segments(far + "func main() {\n\tx := scale(", ")\n}\n"), resolve_language("go"), tok, tpl, 600)
    assert "// func scale(v int, k int) int\n" in p.text


def test_stop_strings(tok):
    tpl = fim_template_for(tok)
    mid = build_prompt(Segments("x = f(", "a)\n"), _py(), tok, tpl)
    assert not mid.multiline and "\n" in mid.stop_strings
    inner = build_prompt(Segments("def f():\n    ", ""), _py(), tok, tpl)
    assert inner.multiline and "\n" not in inner.stop_strings and "\ndef " in inner.stop_strings
    assert "\n\n" not in inner.stop_strings  # a blank line never stops a completion


def test_template_detection():
    assert fim_template_for(load_tokenizer()).name == "starcoder"
    q = fim_template_for(load_tokenizer(["<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>"]))
    assert q.name == "qwen2.5-coder" and q.stop_ids
    g = load_tokenizer(["<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|file_separator|>"])
    assert fim_template_for(g).name == "codegemma"
    ds = load_tokenizer(["<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"])
    assert fim_template_for(ds).name == "deepseek-coder"
    cl = load_tokenizer(["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>", "<s>"])
    t = fim_template_for(cl, "codellama")
    p = build_prompt(Segments("a", "b"), _py(), cl, t, 64)
    assert p.text == "<s>▁<PRE> a▁<SUF>b▁<MID>" and p.ids[:2] == [t.bos_id, t.prefix_id]


def test_codestral_is_suffix_first():
    cs = load_tokenizer(["[SUFFIX]", "[PREFIX]", "<s>"])
    t = fim_template_for(cs)
    assert t.name == "codestral"
    p = build_prompt(Segments("a = 1\n", "b = 2\n"), _py(), cs, t, 64)
    assert p.text == "<s>[SUFFIX]b = 2\n[PREFIX]a = 1\n"
    assert p.ids.index(t.suffix_id) < p.ids.index(t.prefix_id) and len(p.ids) <= 64


def test_template_errors(tok):
    with pytest.raises(ValueError, match="needs special tokens"):
        fim_template_for(tok, "qwen")
    with pytest.raises(ValueError, match="unknown FIM template"):
        fim_template_for(tok, "nope")
    bare = load_tokenizer()
    bare.special_tokens = {"<|endoftext|>": 0}
    with pytest.raises(ValueError, match="cannot detect a FIM template"):
        fim_template_for(bare)
    assert fim_template_for(load_tokenizer(["<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]),
                            "Qwen2.5").name == "qwen2.5-coder"


def test_budget_too_small(tok):
    with pytest.raises(ValueError, match="budget"):
        build_prompt(Segments("a", "b"), _py(), tok, fim_template_for(tok), 2)


def test_languages_resolve():
    assert len(LANGUAGES) >= 20
    assert resolve_language("typescriptreact").name == "tsx"
    assert resolve_language("shellscript").name == "bash"
    assert resolve_language(None, "src/x.RS").name == "rust"
    assert resolve_language("unknown-id", "a/b.d.ts").name == "typescript"
    assert resolve_language("plaintext", "README").generic
    assert resolve_language(None, None).generic
    grammars = {n for n, l in LANGUAGES.items() if l.grammar}
    assert {"python", "javascript", "typescript", "tsx", "go", "rust", "java", "c", "cpp", "csharp",
            "ruby", "php", "lua", "bash", "kotlin"} <= grammars


def _shared(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_typing_keeps_the_prompt_start_for_the_kv_cache(tok):
    """Retyping ten lines in the middle of a file that is over the budget: the elided prefix
    window keeps its first line (an anchor line), so each prompt shares with the one before
    everything up to the line being typed: what the engine's KV cache reuses. The window may move,
    but rarely (in steps of whole anchor-to-anchor segments)."""
    import textwrap

    tpl = fim_template_for(tok)
    src = open(textwrap.__file__, encoding="utf-8").read()
    lines = src.splitlines(keepends=True)
    at = sum(len(l) for l in lines[: len(lines) // 2])
    region = "".join(lines[len(lines) // 2: len(lines) // 2 + 10])
    suffix = src[at + len(region):]
    prev, moved = None, 0
    for k in range(1, len(region) + 1):
        typed = region[:k]
        p = build_prompt(Segments(src[:at] + typed, suffix, filepath="textwrap.py"), _py(), tok, tpl, 700)
        assert len(p.ids) <= 700
        if prev is not None:
            # what the cursor line and the suffix cost: the part a keystroke may change
            tail = len(tok.encode(typed.rsplit("\n", 1)[-1])) + p.ids[::-1].index(tpl.suffix_id) + 2
            if _shared(prev, p.ids) < len(p.ids) - tail - 40:  # more than the last line changed
                moved += 1
        prev = p.ids
    assert moved <= 2, moved  # 480 keys; a window that slides line by line moves 8 times here


def test_context_blocks_keep_their_order_when_scores_change(tok):
    tpl = fim_template_for(tok)
    a, b = Snippet("a.py", "def alpha():\n    pass", 0.9), Snippet("b.py", "def beta():\n    pass", 0.1)
    p1 = build_prompt(Segments("x = 1\n", "", snippets=[a, b]), _py(), tok, tpl, 400)
    b.score = 0.95
    p2 = build_prompt(Segments("x = 1\n", "", snippets=[a, b]), _py(), tok, tpl, 400)
    assert p1.ids == p2.ids and p1.text.index("a.py") < p1.text.index("b.py")
