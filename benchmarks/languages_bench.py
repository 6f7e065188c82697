"""Time parsing and post-processing on 2,000-line files, per language.

Run: .venv/bin/python benchmarks/languages_bench.py
Prints a table (milliseconds, median of N runs). Not a test: timings vary by machine.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "languages"))

from lang_fixtures import load_tokenizer  # noqa: E402

from languages import Segments, build_prompt, fim_template_for, postprocess, resolve_language  # noqa: E402

FUNCS = {
    "python": ("def f{i}(a, b):\n    x = a + {i}\n    if x > b:\n        return x\n\n    return b\n\n",
               "def target(a):\n    ", "\n\ndef after():\n    pass\n",
               "y = f3(a, 1)\n\n    return y\n\n\ndef extra():\n    return 0\n"),
    "javascript": ("function f{i}(a, b) {{\n  const x = a + {i};\n  if (x > b) {{\n    return x;\n  }}\n  return b;\n}}\n\n",
                   "function target(a) {\n  ", "\n}\n\nfunction after() {}\n",
                   "const y = f3(a, 1);\n\n  return y;\n}\n\nfunction extra() {}\n"),
    "go": ("func f{i}(a int, b int) int {{\n\tx := a + {i}\n\tif x > b {{\n\t\treturn x\n\t}}\n\treturn b\n}}\n\n",
           "func target(a int) int {\n\t", "\n}\n\nfunc after() {}\n",
           "y := f3(a, 1)\n\n\treturn y\n}\n\nfunc extra() {}\n"),
    "java": ("    int f{i}(int a, int b) {{\n        int x = a + {i};\n        if (x > b) {{\n            return x;\n        }}\n        return b;\n    }}\n\n",
             "    int target(int a) {\n        ", "\n    }\n}\n",
             "int y = f3(a, 1);\n\n        return y;\n    }\n\n    void extra() {}\n"),
    "swift": ("func f{i}(a: Int, b: Int) -> Int {{\n    let x = a + {i}\n    if x > b {{\n        return x\n    }}\n    return b\n}}\n\n",
              "func target(a: Int) -> Int {\n    ", "\n}\n",
              "let y = f3(a, 1)\n\n    return y\n}\n\nfunc extra() {}\n"),
}


def _file(lang: str, lines: int) -> tuple[str, str, str]:
    unit, head, tail, raw = FUNCS[lang]
    per = unit.count("\n")
    body = "".join(unit.format(i=i) for i in range(lines // 2 // per))
    prefix = ("class Big {\n" if lang == "java" else "") + body + head
    suffix = tail + "".join(unit.format(i=i + 10_000) for i in range(lines // 2 // per))
    return prefix, suffix, raw


def _ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(runs: int = 30) -> None:
    tok = load_tokenizer()
    tpl = fim_template_for(tok)
    spent = [0.0]
    plain_encode = tok.encode

    def timed_encode(text):  # to tell the tokenizer's time (the engine pays it anyway) from ours
        t0 = time.perf_counter()
        try:
            return plain_encode(text)
        finally:
            spent[0] += time.perf_counter() - t0

    tok.encode = timed_encode
    print(f"{'language':<12}{'lines':>7}{'prompt ms':>11}{'(tokenizer)':>13}{'prompt-tok':>12}"
          f"{'postprocess':>13}{'parse+post':>12}  rules")
    for lang_id in FUNCS:
        lang = resolve_language(lang_id)
        prefix, suffix, raw = _file(lang_id, 2000)
        seg = Segments(prefix, suffix, filepath=f"big.{lang_id}")
        prompt = build_prompt(seg, lang, tok, tpl)
        postprocess(raw, seg, lang, prompt)  # warm caches: grammar, queries
        spent[0] = 0.0
        p = _ms(lambda: build_prompt(seg, lang, tok, tpl), runs)
        t = spent[0] * 1e3 / runs
        q = _ms(lambda: postprocess(raw, seg, lang, prompt), runs)
        n = prefix.count("\n") + suffix.count("\n")
        print(f"{lang_id:<12}{n:>7}{p:>11.2f}{t:>13.2f}{p - t:>12.2f}{q:>13.2f}{p - t + q:>12.2f}  "
              f"{'tree-sitter' if lang.grammar else 'indentation'}")
    print("prompt-tok: prompt assembly without the tokenizer's own time; parse+post: what languages/ adds.")


if __name__ == "__main__":
    main()
