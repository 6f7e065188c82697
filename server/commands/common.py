"""What several commands share: loading an engine, its user-facing failures raised as UsageError."""
from __future__ import annotations

from pathlib import Path

from server.errors import UsageError


def check_device(device: str | None) -> None:
    """`--device cuda` on a machine without a GPU is a user error, said in one line."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: torch sees no CUDA GPU here (use --device cpu or auto)")


def load_engine(path: str | Path, device: str = "auto", **kw):
    """engine.load_model, with a bad model directory or a missing GPU raised as UsageError (exit code 2)."""
    from engine import ModelError, load_model

    check_device(device)
    try:
        return load_model(path, device=device, **kw)
    except (ModelError, OSError) as exc:
        raise UsageError(str(exc)) from None
    except RuntimeError as exc:  # backend="cuda" asked for where the kernels cannot run
        if "backend" not in str(exc):
            raise
        raise UsageError(str(exc)) from None
