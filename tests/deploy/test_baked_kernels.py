"""Kernels compiled into an image (KODKOD_BAKED_HOME/kernels/<key>) are loaded, not compiled again."""
from __future__ import annotations

from engine import kernels


def test_prebuilt_kernels_in_the_baked_home_are_used(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5;8.0;8.6;8.9;9.0")
    key = kernels.build_key("7.5;8.0;8.6;8.9;9.0")
    so = tmp_path / "baked" / "kernels" / key / f"kodkod_kernels_{key}.so"
    so.parent.mkdir(parents=True)
    so.write_bytes(b"")
    monkeypatch.setenv("KODKOD_BAKED_HOME", str(tmp_path / "baked"))
    monkeypatch.setenv("KODKOD_HOME", str(tmp_path / "data"))
    monkeypatch.setattr(kernels, "_import_so", lambda name, path: (name, path))
    assert kernels.build() == (f"kodkod_kernels_{key}", so)
    assert not (tmp_path / "data").exists()  # nothing compiled, nothing written to KODKOD_HOME
