"""The first start's plan: what a CPU and a GPU serve, what is said up front, and the fallback."""
from __future__ import annotations

from pathlib import Path

import pytest

from engine.convert import models
from server import first_start

NAME = models.DEFAULT_MODEL
CONVERTED = "qwen2.5-coder-1.5b"  # a model that a GPU serves as EXL2 (the default serves its fp16 import)


def finished(home: Path, leaf: str, name: str = NAME) -> Path:
    d = models.model_dir(name, home) / leaf
    d.mkdir(parents=True)
    (d / ".complete").write_text("1 s\n")
    return d


@pytest.fixture(autouse=True)
def no_baked_home(monkeypatch):
    monkeypatch.delenv("KODKOD_BAKED_HOME", raising=False)


def test_a_cpu_serves_the_imported_weights_and_says_so_up_front(tmp_path):
    p = first_start.plan(None, tmp_path, gpu=False)
    assert p.form == "imported" and p.ready is None
    text = p.describe(tmp_path)
    assert f"first start: {NAME} is not in {tmp_path} yet" in text and "minute" in text
    assert "download 491 MB" in text and "import it as fp16" in text and "no EXL2 conversion" in text
    assert "convert" not in text.replace("no EXL2 conversion", "")
    low, high = p.seconds
    assert 30 < low < high < 300


def test_a_gpu_serves_the_default_as_fp16_and_converts_the_others_on_the_gpu(tmp_path):
    assert models.KNOWN_MODELS[NAME].gpu_form == "imported" and models.KNOWN_MODELS[CONVERTED].gpu_form == "exl2"
    p = first_start.plan(None, tmp_path, gpu=True)
    assert p.form == "imported"
    text = p.describe(tmp_path)
    assert "serve those weights on the GPU" in text and "convert" not in text
    p = first_start.plan(CONVERTED, tmp_path, gpu=True)
    assert p.form == "exl2"
    assert "convert it to EXL2 4 bpw on the GPU" in p.describe(tmp_path)


def test_what_is_there_is_not_done_again(tmp_path):
    gguf = models.model_dir(NAME, tmp_path) / "model.gguf"
    gguf.parent.mkdir(parents=True)
    with open(gguf, "wb") as f:
        f.truncate(models.KNOWN_MODELS[NAME].size)
    assert "download" not in first_start.plan(None, tmp_path, gpu=False).describe(tmp_path)
    imported = finished(tmp_path, models.IMPORTED)
    p = first_start.plan(None, tmp_path, gpu=False)
    assert p.ready == imported and p.describe(tmp_path) == ""
    assert first_start.plan(None, tmp_path, gpu=True).ready == imported
    finished(tmp_path, models.IMPORTED, CONVERTED)
    gpu = first_start.plan(CONVERTED, tmp_path, gpu=True)
    assert gpu.ready is None and "import" not in gpu.describe(tmp_path)
    exl2 = finished(tmp_path, "exl2-4bpw", CONVERTED)
    assert first_start.plan(CONVERTED, tmp_path, gpu=True).ready == exl2
    assert first_start.prepare(first_start.plan(CONVERTED, tmp_path, gpu=True), tmp_path) == exl2


def test_a_baked_home_is_looked_in_first(tmp_path, monkeypatch):
    baked = finished(tmp_path / "baked", models.IMPORTED)
    monkeypatch.setenv("KODKOD_BAKED_HOME", str(tmp_path / "baked"))
    assert first_start.plan(None, tmp_path / "home", gpu=False).ready == baked


def test_prepare_imports_on_a_cpu_and_falls_back_to_fp16_when_the_gpu_conversion_fails(tmp_path, monkeypatch,
                                                                                       capsys):
    calls = []

    def imported(name, home, progress=True):
        calls.append("import")
        return finished(home, models.IMPORTED, name) if not (models.model_dir(name, home) / models.IMPORTED).exists() \
            else models.model_dir(name, home) / models.IMPORTED

    def convert(name, home, progress=True, device="cpu"):
        calls.append(f"convert on {device}")
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(models, "ensure_imported", imported)
    monkeypatch.setattr(models, "ensure_model", convert)
    out = first_start.prepare(first_start.plan(CONVERTED, tmp_path, gpu=True), tmp_path, progress=False)
    assert out == models.model_dir(CONVERTED, tmp_path) / models.IMPORTED
    assert calls == ["import", "convert on cuda"]
    err = capsys.readouterr().err
    assert "the EXL2 conversion on the GPU failed (CUDA out of memory)" in err and "fp16" in err


def test_serve_prints_the_plan_before_the_work(tmp_path, monkeypatch, capsys):
    from server.commands import serve

    monkeypatch.setattr(serve, "_cuda_available", lambda: False)
    seen = []
    monkeypatch.setattr(first_start, "prepare", lambda p, home: seen.append(capsys.readouterr().err) or tmp_path)
    assert serve.resolve_model(None, tmp_path) == tmp_path
    assert "first start" in seen[0] and "no EXL2 conversion" in seen[0]
    # a directory is used as it is; the remote engine reads only the tokenizer: no conversion either
    assert serve.resolve_model(str(tmp_path), tmp_path / "h") == tmp_path
    monkeypatch.setattr(serve, "_cuda_available", lambda: True)
    serve.resolve_model(None, tmp_path, engine="openai")
    assert "no EXL2 conversion" in seen[-1]
    serve.resolve_model(None, tmp_path, device="auto")
    assert "on the GPU" in seen[-1]


def test_download_for_cpu_imports_only(tmp_path, monkeypatch, capsys):
    from server.cli import main

    monkeypatch.setattr(models, "ensure_imported", lambda name, home, progress=True: tmp_path / "imported")
    monkeypatch.setattr(models, "ensure_model", lambda *a, **k: pytest.fail("no conversion for --for cpu"))
    assert main(["download", "--for", "cpu", "--home", str(tmp_path), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "imported")


def test_download_for_gpu_converts_where_it_can_and_the_default_stays_fp16(tmp_path, monkeypatch, capsys):
    import torch

    from server.cli import main

    seen = []
    monkeypatch.setattr(models, "ensure_model", lambda name, home, progress=True, device="cpu":
                        seen.append(device) or tmp_path / "exl2")
    monkeypatch.setattr(models, "ensure_imported", lambda name, home, progress=True: tmp_path / "imported")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["download", CONVERTED, "--for", "gpu", "--home", str(tmp_path), "--no-progress"]) == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert main(["download", CONVERTED, "--home", str(tmp_path), "--no-progress"]) == 0  # auto: a GPU here
    assert seen == ["cpu", "cuda"]  # an image build has no GPU: it converts on the CPU
    assert main(["download", "--for", "gpu", "--home", str(tmp_path), "--no-progress"]) == 0  # the default: fp16
    assert seen == ["cpu", "cuda"]
    assert capsys.readouterr().out.split() == [str(tmp_path / "exl2")] * 2 + [str(tmp_path / "imported")]
