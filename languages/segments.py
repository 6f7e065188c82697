"""What the editor sends: the text around the cursor and the context it found."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Snippet:
    filepath: str
    body: str
    score: float | None = None


@dataclass
class Segments:
    prefix: str
    suffix: str = ""
    filepath: str | None = None
    declarations: list[Snippet] = field(default_factory=list)
    snippets: list[Snippet] = field(default_factory=list)
    clipboard: str | None = None
