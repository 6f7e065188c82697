"""Shared test settings: where the fixtures are, and which tests need what."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# ../shared beside the repository; KODKOD_FIXTURES points elsewhere (the GPU machine gets a carried copy).
FIXTURES = Path(os.environ.get("KODKOD_FIXTURES") or ROOT / ".." / "shared" / "fixtures" / "exl2").resolve()


def fixture_dir(name: str) -> Path:
    """A model directory from ../shared/fixtures/exl2 (llama-tiny-fp16, llama-tiny-4.0bpw, ...)."""
    p = FIXTURES / name
    if not p.is_dir():
        pytest.fail(f"fixture {p} is missing: the tests expect ../shared beside the repository")
    return p


def pytest_collection_modifyitems(config, items):
    import torch

    no_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    no_slow = pytest.mark.skip(reason="slow test: set KODKOD_SLOW=1 to run it")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)
        if "slow" in item.keywords and os.environ.get("KODKOD_SLOW") != "1":
            item.add_marker(no_slow)
