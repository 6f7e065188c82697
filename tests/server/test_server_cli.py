"""`kodkod` commands end with one line, never a traceback, on errors a user can fix."""
from __future__ import annotations

import subprocess
import sys

import pytest

from srvutil import ROOT, fixture_dir


def kodkod(*args):
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_device_cuda_without_a_gpu_is_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    model = str(fixture_dir("llama-tiny-4.0bpw"))
    for args in (("serve", "--model", model, "--device", "cuda", "--port", "1"), ("ppl", model, "--device", "cuda"),
                 ("convert", "-i", model, "-o", "unused", "--device", "cuda")):
        r = kodkod(*args)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and "no CUDA GPU" in r.stderr, r.stderr


def test_remote_engine_needs_upstreams_and_a_tokenizer(tmp_path):
    r = kodkod("serve", "--engine", "openai", "--model", str(tmp_path))
    assert r.returncode == 2 and "needs at least one upstream" in r.stderr and "Traceback" not in r.stderr
    r = kodkod("serve", "--engine", "openai", "--model", str(tmp_path), "--upstream", "http://127.0.0.1:1",
               "--port", "0")  # serve takes its port before it reads the model
    assert r.returncode == 2 and "tokenizer" in r.stderr and "Traceback" not in r.stderr, r.stderr
