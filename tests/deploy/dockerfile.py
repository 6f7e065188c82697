"""A small reader of our Dockerfile: its instructions by stage, enough for the tests to run what it says."""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"


@dataclass
class Stage:
    base: str
    name: str | None
    steps: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    def all(self, op: str) -> list[str]:
        return [args for o, args in self.steps if o == op]

    def env(self) -> dict[str, str]:
        """ENV key=value pairs (quotes removed; ${PATH} left as written)."""
        out: dict[str, str] = {}
        for args in self.all("ENV"):
            for item in shlex.split(args):
                k, _, v = item.partition("=")
                out[k] = v
        return out

    def exec_form(self, op: str) -> list[str]:
        (args,) = self.all(op)[-1:]
        return json.loads(args)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        op, _, args = buf.strip().partition(" ")
        out.append((op.upper(), args.strip()))
        buf = ""
    return out


def stages(path: Path = DOCKERFILE) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages in order)."""
    args: dict[str, str] = {}
    result: list[Stage] = []
    for op, rest in instructions(path.read_text()):
        if op == "FROM":
            words = rest.split()
            result.append(Stage(words[0], words[2] if len(words) > 2 and words[1].upper() == "AS" else None))
        elif not result and op == "ARG":
            k, _, v = rest.partition("=")
            args[k] = v
        elif result:
            result[-1].steps.append((op, rest))
    return args, result


def copy_sources(path: Path = DOCKERFILE) -> set[str]:
    """Paths in the build context that COPY instructions read (not those copied from other stages)."""
    out = set()
    for st in stages(path)[1]:
        for args in st.all("COPY"):
            words = [w for w in args.split() if not w.startswith("--")]
            if "--from=" in args:
                continue
            out.update(w.rstrip("/") for w in words[:-1])
    return out
