"""The `kodkod` command line, run as a real subprocess."""
import subprocess
import sys

import pytest

from tests.conftest import ROOT, fixture_dir


def kodkod(*args, input=None):
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, input=input, timeout=120)


def test_help_lists_the_commands():
    r = kodkod("--help")
    assert r.returncode == 0
    for cmd in ("serve", "generate", "convert", "download", "import-gguf"):
        assert cmd in r.stdout


def test_generate_prints_the_stream():
    model = fixture_dir("llama-tiny-6.5bpw")
    r = kodkod("generate", "--model", str(model), "--prompt", "def load(path):", "--max-tokens", "12")
    assert r.returncode == 0, r.stderr
    from engine import GenerationParams, load_model

    eng = load_model(model, device="cpu", dtype="auto")  # the command's default, as the server's
    expect = "".join(e.text for e in eng.generate(eng.tokenizer.encode("def load(path):"),
                                                  GenerationParams(max_new_tokens=12)))
    assert r.stdout == expect + "\n"
    assert "finish:" in r.stderr


def test_generate_reads_stdin_and_reports_bad_models_clearly(tmp_path):
    r = kodkod("generate", "--model", str(tmp_path), "--prompt", "-", input="x")
    assert r.returncode == 2
    assert "no config.json" in r.stderr
    assert "Traceback" not in r.stderr


def test_doctor_and_build_kernels_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    r = kodkod("doctor")
    assert r.returncode == 0 and "GPU" in r.stdout and "torch path" in r.stdout
    r = kodkod("build-kernels")
    assert r.returncode == 2 and "--arch" in r.stderr
