"""The fixture cases: (prefix, suffix, raw model output, expected completion) per language."""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from languages import Segments, build_prompt, fim_template_for, postprocess, resolve_language

CASES_DIR = Path(__file__).parent / "cases"


def _load():
    out = []
    for path in sorted(CASES_DIR.glob("*.toml")):
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        for i, case in enumerate(data["case"]):
            case.setdefault("language", data.get("language", path.stem))
            out.append(pytest.param(case, id=f"{path.stem}-{i}-{case['name']}"))
    return out


CASES = _load()


@pytest.mark.parametrize("case", CASES)
def test_case(case, tok):
    lang = resolve_language(case["language"], case.get("filepath"))
    assert lang.name != "generic" or case["language"] == "generic"
    seg = Segments(prefix=case["prefix"], suffix=case.get("suffix", ""), filepath=case.get("filepath"))
    prompt = build_prompt(seg, lang, tok, fim_template_for(tok), case.get("budget", 2048))
    got = postprocess(case["raw"], seg, lang, prompt)
    assert got.text == case["expected"], "\n".join(prompt.decisions + got.decisions)
    if "decision" in case:
        assert any(case["decision"] in x for x in got.decisions + prompt.decisions), got.decisions


def test_case_coverage():
    cases = [c.values[0] for c in CASES]
    langs = {c["language"] for c in cases}
    assert len(cases) >= 60 and len(langs) >= 10, (len(cases), langs)
    rules = {c["rule"] for c in cases}
    assert {"single-line", "scope", "top-level", "suffix-repeat", "auto-close", "repetition",
            "indent-style", "crlf", "tabby-blank-line", "stop"} <= rules, rules
