"""Streams never take text back: for any model output cut into any deltas, the streamed deltas
concatenate to the final completion (server/choice_text.py), with real post-processing."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# where the cursor is: post-processing behaves differently in each
CONTEXTS = [
    ("python", "def f(x):\n    ", "\n\nprint(f(3))\n"),
    ("python", "class A:\n    def g(self):\n        ", "\n    def h(self):\n        pass\n"),
    ("python", "x = [1, 2,", "]\n"),  # mid-line: a single line
    ("javascript", "function f(a) {\n  ", "\n}\n"),
    ("go", "func main() {\r\n\t", "\r\n}\r\n"),  # \r\n line endings, tabs
    (None, "hello ", ""),  # unknown language: generic settings
]
# pieces a code model emits: lines at several depths, closers, repeats of the suffix, blank lines
PIECES = ["\n", "\n\n", "    ", "\t", "return x", "y = x + 1", "}", "print(f(3))", "def h(self):", "pass",
          "if x:", "else:", "x = [1, 2,", "]", "# note", "foo(", ")", "  ", "a", "é", "\r\n"]


@pytest.fixture(scope="module")
def services(engine, tmp_path_factory):
    from server.completion import CompletionService
    from server.config import ServerConfig
    from server.schemas import CompletionRequest

    svc = CompletionService(engine, ServerConfig(home=tmp_path_factory.mktemp("lines")))
    out = []
    for language, prefix, suffix in CONTEXTS:
        req = CompletionRequest(language=language, segments={"prefix": prefix, "suffix": suffix})
        info, _ = svc._prepare(req)
        out.append(info)
    return svc, out


def _stream(svc, info, deltas, mode="lines"):
    from server.choice_text import ChoiceText

    ct = ChoiceText(svc, info, mode)
    sent = [ct.add(d) for d in deltas]
    last, completion, decisions = ct.finish()
    return "".join(sent) + last, completion, decisions


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(context=st.integers(0, len(CONTEXTS) - 1), pieces=st.lists(st.sampled_from(PIECES), max_size=40),
       cuts=st.lists(st.integers(0, 400), max_size=12))
def test_streamed_deltas_add_up_to_the_completion(services, context, pieces, cuts):
    svc, infos = services
    info = infos[context]
    raw = "".join(pieces)
    bounds = sorted({0, len(raw), *(c for c in cuts if c < len(raw))})
    deltas = [raw[a:b] for a, b in zip(bounds, bounds[1:])]
    streamed, completion, decisions = _stream(svc, info, deltas)
    assert streamed == completion
    final, _ = svc.finish_text(raw, info)
    # the completion is post-processing's answer, unless that answer would take back a line already shown
    assert completion == final or (completion.startswith(final.rstrip()) and decisions[-1] == "kept the lines already streamed")
    # raw deltas: the engine's text as it came; the completion is post-processing's answer
    streamed_raw, completion_raw, _ = _stream(svc, info, deltas, "raw")
    assert completion_raw == final
    assert streamed_raw == svc.client_line_endings(raw, info)
    # a JSON answer streams nothing, and its completion is post-processing's answer
    assert _stream(svc, info, deltas, None)[:2] == ("", final)


def test_lines_are_sent_as_soon_as_post_processing_accepts_them(services):
    from server.choice_text import ChoiceText

    svc, infos = services
    ct = ChoiceText(svc, infos[0])
    assert ct.add("y = x") == ""  # not a whole line yet
    assert ct.add(" + 1\n") == "y = x + 1"  # its newline waits: it may be the last line
    assert ct.add("    return y\n") == "\n    return y"
    assert ct.add("print(1)\n") == ""  # outside the function: post-processing cuts it
    assert ct.finish() == ("", "y = x + 1\n    return y", ct.finish()[2])
