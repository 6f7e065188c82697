""".dockerignore keeps the build context small: the sources the Dockerfile copies, no weights, venvs or builds."""
from __future__ import annotations

import re
import subprocess

from tests.conftest import ROOT
from tests.deploy.dockerfile import copy_sources


def patterns() -> list[str]:
    out = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def _regex(pattern: str) -> re.Pattern:
    """Docker's pattern syntax (Go filepath.Match plus `**`) as a regular expression."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def ignored(path: str, pats: list[str]) -> bool:
    """As Docker decides: the last pattern that matches the path or one of its parents wins."""
    parts = path.strip("/").split("/")
    result = False
    for pat in pats:
        negate = pat.startswith("!")
        rx = _regex(pat.lstrip("!").strip("/"))
        if any(rx.fullmatch("/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            result = not negate
    return result


def test_the_matcher_follows_docker():
    pats = ["*", "!engine", "**/__pycache__", "**/*.bin"]
    assert ignored("Makefile", pats) and ignored("tests/x.py", pats)
    assert not ignored("engine/x.py", pats) and not ignored("engine/convert/x.py", pats)
    assert ignored("engine/__pycache__/x.pyc", pats) and ignored("engine/a/b.bin", pats)


def test_junk_is_left_out():
    pats = patterns()
    for path in (".venv/bin/python", ".venv/lib/python3.11/site-packages/torch/lib/libtorch.so",
                 "venv/pyvenv.cfg", ".git/HEAD", "models/qwen/model.safetensors", "x.gguf",
                 "engine/weights/model.safetensors", "engine/model.gguf", "server/part01.bin",
                 "build/lib/engine/x.py", "dist/kodkod-0.1.0-py3-none-any.whl", "kodkod.egg-info/PKG-INFO",
                 "engine/__pycache__/x.cpython-311.pyc", "csrc/kodkod_kernels.so", "bench-results/eval/a.json",
                 "editors/vscode/node_modules/x/index.js", "node_modules/x.js", ".pytest_cache/v",
                 ".hypothesis/examples/x", "tests/server/test_server_api.py", "docs/engine-bench.png"):
        assert ignored(path, pats), f"{path} would go into the build context"


def test_the_context_has_what_the_dockerfile_copies_and_little_else():
    pats = patterns()
    for src in copy_sources():
        assert not ignored(src, pats), f"the Dockerfile copies {src}, .dockerignore leaves it out"
        assert (ROOT / src).exists(), f"the Dockerfile copies {src}, which is not in the repository"
    # every file in this checkout, the untracked and the git-ignored (.venv, weights, ...) too
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\0")
    junk = subprocess.run(["git", "ls-files", "-z", "--others", "--ignored", "--exclude-standard", "--directory"],
                          cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\0")
    for path in junk:
        if path:
            assert ignored(path, pats), f"{path} (ignored by git) would go into the build context"
    sent = [f for f in files if f and (ROOT / f).is_file() and not ignored(f, pats)]
    size = sum((ROOT / f).stat().st_size for f in sent)
    assert size < 5e6, f"build context {size / 1e6:.1f} MB"
    assert "engine/kernels.py" in sent and "csrc/gemv.cu" in sent and "deploy/install.sh" in sent
