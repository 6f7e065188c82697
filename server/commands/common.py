"""What several commands share: loading an engine with its user-facing failures as KodkodError."""
from __future__ import annotations

from pathlib import Path

from server.errors import KodkodError


def check_device(device: str | None) -> None:
    """`--device cuda` on a machine without a GPU is a user error, said in one line."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise KodkodError("--device cuda: torch sees no CUDA GPU here (use --device cpu or auto)")


def load_engine(path: str | Path, device: str = "auto", **kw):
    """engine.load_model, with a bad model directory or a missing GPU raised as KodkodError."""
    from engine import ModelError, load_model

    check_device(device)
    try:
        return load_model(path, device=device, **kw)
    except (ModelError, OSError) as exc:
        err = KodkodError(str(exc))
        err.exit_code = 2  # the model named on the command line is the user's input
        raise err from None
    except RuntimeError as exc:  # backend="cuda" asked for where the kernels cannot run
        if "backend" not in str(exc):
            raise
        raise KodkodError(str(exc)) from None
