"""Calibration and evaluation text: real source code available offline.

Built-in sets come from the Python standard library's own sources of the
running interpreter, split so that the two never overlap:

- calibration: top-level modules (`Lib/*.py`), one window from the middle of each;
- evaluation (perplexity): modules inside the packages in `EVAL_PACKAGES`
  (`Lib/asyncio/`, `Lib/email/`, `Lib/json/`, ...), which calibration never reads.

A user file overrides calibration: plain text, JSONL (a "text" field per line,
or the first string value) or Parquet (a "text" column; needs pyarrow).
"""
from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path
from typing import Callable

EVAL_PACKAGES = ("asyncio", "email", "json", "http", "concurrent", "logging")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def calibration_files() -> list[Path]:
    files = sorted(p for p in stdlib_dir().glob("*.py") if p.is_file())
    random.Random(0).shuffle(files)
    return files


def eval_files() -> list[Path]:
    out: list[Path] = []
    for pkg in EVAL_PACKAGES:
        out += sorted((stdlib_dir() / pkg).rglob("*.py"))
    random.Random(1).shuffle(out)
    return out


def _read(p: Path, limit: int = 200_000) -> str:
    try:
        return p.read_text(encoding="utf-8", errors="replace")[:limit]
    except OSError:
        return ""


def _windows_from_files(files: list[Path], encode: Callable[[str], list[int]], rows: int, length: int,
                        per_file: int = 1) -> list[list[int]]:
    out: list[list[int]] = []
    for p in files:
        if len(out) >= rows:
            break
        ids = encode(_read(p))
        if len(ids) < length:
            continue
        n = min(per_file, len(ids) // length)
        # windows spread over the file, centred when there is one
        span = len(ids) - length
        for j in range(n):
            start = span // 2 if n == 1 else span * j // (n - 1)
            out.append(ids[start:start + length])
            if len(out) >= rows:
                break
    return out


def _texts_from_file(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        texts = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            obj = json.loads(line)
            if isinstance(obj, str):
                texts.append(obj)
            elif isinstance(obj, dict):
                v = obj.get("text")
                if not isinstance(v, str):
                    v = next((x for x in obj.values() if isinstance(x, str)), None)
                if v:
                    texts.append(v)
        return texts
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError("reading Parquet calibration files needs pyarrow (pip install pyarrow)") from None
        table = pq.read_table(path)
        col = "text" if "text" in table.column_names else next(
            (c for c in table.column_names if str(table.schema.field(c).type) in ("string", "large_string")), None)
        if col is None:
            raise ValueError(f"{path}: no text column")
        return [t for t in table.column(col).to_pylist() if isinstance(t, str)]
    return [path.read_text(encoding="utf-8", errors="replace")]


def calibration_rows(encode: Callable[[str], list[int]], rows: int = 64, length: int = 512,
                     path: str | Path | None = None) -> list[list[int]]:
    """`rows` windows of `length` tokens of real code (the built-in set unless `path` is given)."""
    if path is None:
        out = _windows_from_files(calibration_files(), encode, rows, length)
        if len(out) < rows:  # short on files: take more windows per file
            out = _windows_from_files(calibration_files(), encode, rows, length, per_file=8)
    else:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: calibration file not found")
        ids: list[int] = []
        for t in _texts_from_file(path):
            ids += encode(t)
        if len(ids) < length:
            raise ValueError(f"{path}: only {len(ids)} tokens, need at least {length}")
        step = max(length, (len(ids) - length) // max(rows - 1, 1)) if len(ids) > rows * length else length
        out = [ids[s:s + length] for s in range(0, len(ids) - length + 1, step)][:rows]
    if not out:
        raise ValueError("no calibration text long enough")
    return out


def eval_rows(encode: Callable[[str], list[int]], tokens: int = 16384, length: int = 1024,
              path: str | Path | None = None) -> list[list[int]]:
    """Held-out evaluation windows (built-in: stdlib package sources never used for calibration)."""
    rows = max(1, tokens // length)
    if path is None:
        return _windows_from_files(eval_files(), encode, rows, length)
    ids: list[int] = []
    for t in _texts_from_file(Path(path)):
        ids += encode(t)
    out = [ids[s:s + length] for s in range(0, len(ids) - 1, length)][:rows]
    return [r for r in out if len(r) > 1]
