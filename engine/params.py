"""What a caller asks of one generation, and what it gets back."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # <= 1e-5 means greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None  # same seed, same prompt, same output
    stop_token_ids: tuple[int, ...] = ()  # besides the model's own end-of-text tokens
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if not 0 <= self.min_p < 1:
            raise ValueError("min_p must be in [0, 1)")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5


@dataclass(frozen=True)
class TokenEvent:
    """One step of a generation stream.

    `text` is the new text this step made visible (may be empty while a UTF-8
    character or a possible stop string is incomplete). The last event of every
    stream has `finish_reason` set and `token_id` None.
    """
    token_id: int | None
    text: str
    finish_reason: FinishReason | None = None
