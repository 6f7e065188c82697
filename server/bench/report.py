"""Reports for `kodkod eval` and `kodkod bench`: JSON (everything), Markdown (the table a person
reads, ready for docs/benchmarks.md) and PNG charts (matplotlib, drawn without a display)."""
from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from server.machine import cpu_name, cuda_devices


def run_meta(argv: list[str] | None = None) -> dict:
    """Where and how a number was made: machine, commit, date, the exact command."""
    return {
        "command": "kodkod " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "commit": _commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": ", ".join([cpu_name(), f"{os.cpu_count()} cores", *cuda_devices()[:1]]),
        "python": platform.python_version(),
    }


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


# How each kind of column is written in a table.
_FORMATS = {"pct": lambda v: f"{100 * v:.1f}%", "ms": lambda v: f"{1000 * v:.0f}", "int": lambda v: f"{v:.0f}",
            "f1": lambda v: f"{v:.1f}", "f2": lambda v: f"{v:.2f}", "f3": lambda v: f"{v:.3f}"}


def _fmt(value, kind: str) -> str:
    if value is None:
        return "-"
    return _FORMATS.get(kind, str)(value)


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, kind) with kind one of pct, ms, int, f1, f2, f3, str."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" if k == "str" else "---:" for _, _, k in columns) + "|"
    body = ["| " + " | ".join(_fmt(r.get(key), kind) for key, _, kind in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: draw straight to PNG
    import matplotlib.pyplot as plt

    return plt


def pass_at_1_chart(rows: list[dict], path: Path, title: str) -> None:
    """Grouped bars: pass@1 per task type (groups) and configuration (bars)."""
    plt = _pyplot()
    types = [t for t in dict.fromkeys(r["type"] for r in rows)]
    configs = [c for c in dict.fromkeys(r["config"] for r in rows)]
    value = {(r["config"], r["type"]): r["pass_at_1"] for r in rows}
    width = 0.8 / max(1, len(configs))
    fig, ax = plt.subplots(figsize=(1.6 + 1.8 * len(types), 4))
    for i, c in enumerate(configs):
        xs = [j + (i - (len(configs) - 1) / 2) * width for j in range(len(types))]
        ys = [100 * value.get((c, t), 0.0) for t in types]
        bars = ax.bar(xs, ys, width, label=c)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(types)), types)
    ax.set_ylabel("pass@1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency_chart(series: dict[str, list[float]], path: Path, title: str) -> None:
    """Histogram (log-spaced bins) of latencies in seconds, one colour per series."""
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    values = [v for vs in series.values() for v in vs if v > 0]
    if values:
        bins = np.logspace(np.log10(min(values) * 1000), np.log10(max(values) * 1000 * 1.01), 30)
        for name, vs in series.items():
            if vs:
                ax.hist([1000 * v for v in vs], bins=bins, alpha=0.6, label=f"{name} (n={len(vs)})")
        ax.set_xscale("log")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("requests")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
