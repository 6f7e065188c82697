"""An append-only JSONL log under KODKOD_HOME: client events and one line per completion.

Bounded: every string a client sent is cut to `field_chars` (prompt and completion texts,
written only with log_prompts, to `text_chars`), and the file rotates by size: at
`max_bytes / files` it becomes events.jsonl.1 (the older ones move up, the oldest is
dropped), so the log and its rotated files hold at most about `max_bytes`. Each line is
written with one call in append mode, so a killed server leaves at most a torn last line,
which `read` skips.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

TEXT_FIELDS = ("prompt", "completions")
CUT = "…"


def _cut(value, limit: int):
    if isinstance(value, str):
        return value if len(value) <= limit else value[:limit] + CUT
    if isinstance(value, list):
        return [_cut(v, limit) for v in value]
    if isinstance(value, dict):
        return {k: _cut(v, limit) for k, v in value.items()}
    return value


class EventLog:
    def __init__(self, path: Path | None, field_chars: int = 256, text_chars: int = 20_000,
                 max_bytes: int = 100_000_000, files: int = 4):
        self.path = Path(path) if path else None
        self.field_chars, self.text_chars = field_chars, text_chars
        self.files = max(2, files)
        self.file_bytes = max(1, max_bytes // self.files)
        self._lock = threading.Lock()
        self._warned = False

    def write(self, kind: str, **fields) -> None:
        if self.path is None:
            return
        fields = {k: _cut(v, self.text_chars if k in TEXT_FIELDS else self.field_chars) for k, v in fields.items()}
        line = json.dumps({"ts": round(time.time(), 3), "kind": kind, **fields}, ensure_ascii=False) + "\n"
        try:
            with self._lock:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as f:
                    f.write(line)
                    size = f.tell()
                if size >= self.file_bytes:
                    self._rotate()
        except OSError as exc:  # a full disk must not break completions
            if not self._warned:
                self._warned = True
                logging.getLogger("kodkod").warning("cannot write %s: %s", self.path, exc)

    def rotated(self, i: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{i}")

    def _rotate(self) -> None:
        for i in range(self.files - 1, 0, -1):  # .{files-1} is dropped (replaced), .1 -> .2, ...
            src = self.path if i == 1 else self.rotated(i - 1)
            if src.exists():
                os.replace(src, self.rotated(i))

    def read(self, rotated: bool = False) -> list[dict]:
        """The log's lines, oldest first (with `rotated`, the rotated files' lines before them).
        Lines end at "\\n" only: U+2028 or U+0085 inside a field is text, not a line break."""
        if self.path is None:
            return []
        paths = [self.rotated(i) for i in range(self.files - 1, 0, -1)] if rotated else []
        out = []
        for p in [*paths, self.path]:
            try:
                data = p.read_bytes()
            except FileNotFoundError:
                continue
            for raw in data.split(b"\n"):
                if not raw.strip():
                    continue
                try:
                    out.append(json.loads(raw.decode("utf-8")))
                except ValueError:  # a line torn by a crash
                    continue
        return out
