import os
from pathlib import Path

import pytest

from tests.conftest import FIXTURES


def pytest_collection_modifyitems(config, items):
    if os.environ.get("KODKOD_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: needs the model download (set KODKOD_SLOW=1)")
    for item in items:
        if "slow" in item.keywords and str(item.fspath).startswith(str(Path(__file__).parent)):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_fp16() -> Path:
    p = FIXTURES / "llama-tiny-fp16"
    if not p.is_dir():
        pytest.skip(f"fixture {p} missing")
    return p


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one thread is faster, and much faster on a busy machine. Module scope (autouse first), so
    that it is in force for module fixtures too (they are set up before function fixtures)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
