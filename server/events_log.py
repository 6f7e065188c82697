"""An append-only JSONL log under KODKOD_HOME: client events and one line per completion."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path


class EventLog:
    def __init__(self, path: Path | None):
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self._warned = False

    def write(self, kind: str, **fields) -> None:
        if self.path is None:
            return
        line = json.dumps({"ts": round(time.time(), 3), "kind": kind, **fields}, ensure_ascii=False)
        try:
            with self._lock:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as f:
                    f.write(line + "\n")
        except OSError as exc:  # a full disk must not break completions
            if not self._warned:
                self._warned = True
                import logging
                logging.getLogger("kodkod").warning("cannot write %s: %s", self.path, exc)

    def read(self) -> list[dict]:
        if self.path is None or not self.path.exists():
            return []
        return [json.loads(l) for l in self.path.read_text(encoding="utf-8").splitlines() if l.strip()]
