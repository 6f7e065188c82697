"""Write the lock files from the environment kodkod is installed in (a CPU one, made by `make install`).

    .venv/bin/python deploy/lock.py

constraints.txt         kodkod's runtime dependencies, all of them, exact versions: what `make install`
                        and the image install (`pip install -c constraints.txt`).
deploy/torch.txt        torch and its own dependencies (and ninja, which the CUDA image's kernels need):
                        the image's torch step. Kept apart so that `make install` on a machine that has
                        its own torch (a CUDA build, another version) keeps it.
"""
from __future__ import annotations

import importlib.metadata as md
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
NINJA = "ninja==1.13.2"  # not installed on a CPU machine; pinned by hand


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: list[str]) -> dict[str, str]:
    """name -> installed version for the roots and everything they need (no extras)."""
    seen: dict[str, str] = {}
    todo = [Requirement(r) for r in roots]
    while todo:
        r = todo.pop()
        if r.marker and not r.marker.evaluate({"extra": ""}):
            continue
        n = norm(r.name)
        if n in seen:
            continue
        d = md.distribution(r.name)
        seen[n] = d.version.split("+")[0]  # 2.13.0+cpu -> 2.13.0: the pin fits the CPU and the CUDA build
        todo += [Requirement(x) for x in d.requires or []]
    return seen


def locks() -> tuple[dict[str, str], dict[str, str]]:
    """(kodkod's tree without torch, what torch's tree adds), from the running environment."""
    own = closure([r for r in md.requires("kodkod") if norm(Requirement(r).name) != "torch"])
    return own, {n: v for n, v in closure(["torch"]).items() if n not in own}


def render(pins: dict[str, str], head: str, extra: list[str] = ()) -> str:
    lines = [f"# {line}".rstrip() for line in head.splitlines()]
    return "\n".join(lines + [f"{n}=={v}" for n, v in sorted(pins.items())] + list(extra)) + "\n"


def main() -> int:
    own, torch = locks()
    py = f"{sys.version_info[0]}.{sys.version_info[1]}"
    (ROOT / "constraints.txt").write_text(render(own, f"""\
kodkod's runtime dependencies, exact versions (Python {py}, Linux x86_64). Written by deploy/lock.py:
edit pyproject.toml, `make install`, then `.venv/bin/python deploy/lock.py`. Used by `make install`
and by the image (deploy/install.sh). torch is pinned in deploy/torch.txt."""))
    (ROOT / "deploy" / "torch.txt").write_text(render(torch, f"""\
torch and what it needs, for the image's torch step (deploy/install.sh). Written by deploy/lock.py.
The CUDA build of this torch pins its CUDA libraries (nvidia-*, cuda-toolkit, triton) itself;
cuda-bindings and cuda-pathfinder follow its ranges. ninja: the CUDA image builds its kernels with it.""",
                                                       [NINJA]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
