"""One choice's text as the engine makes it: what a stream may show now, and when it is settled.

Post-processing (languages/) may cut the end of a completion once more text shows that
the end left its scope or repeated itself, so the engine's raw text cannot be streamed
as it comes without sometimes taking text back. `ChoiceText` streams whole lines
instead: after each new complete line of raw text it post-processes the complete lines
and sends what the result adds to the text already sent. Sent text is never taken back:
at the end the completion is the post-processed whole text when that extends what was
sent, else (post-processing of the whole cuts inside text already shown, which is rare)
exactly what was sent. Either way the deltas concatenate to the completion.

A JSON answer streams nothing (`deltas=None`): its completion is always the post-processed
whole text. With `deltas="raw"` a stream gets the engine's text as it comes instead.

The same checkpoints settle a choice early: when post-processing drops a non-blank line
at the end and gives the same text at two checkpoints in a row (or at once, when it says
its cut is structural: the completion left the cursor's block), more tokens cannot
change the answer, so nobody would read them (`settled`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .completion import CompletionService, Prepared


Deltas = Literal["lines", "raw"] | None


class ChoiceText:
    def __init__(self, service: "CompletionService", info: "Prepared", deltas: Deltas = "lines"):
        self.service = service
        self.info = info
        # raw prompts are never post-processed: their raw text is final as it comes
        self.deltas = "raw" if deltas is not None and info.raw else deltas
        self.raw = ""
        self.sent = ""
        self.settled = False
        self._checked = -1  # end of the complete lines already post-processed
        self._last_cut: str | None = None  # the cut text of the previous checkpoint
        self._post_failed = False

    def add(self, text: str) -> str:
        """Take the engine's next text; return the delta to send now (may be empty)."""
        self.raw += text
        accepted = None if self.info.raw else self._checkpoint()
        if self.deltas is None:
            return ""
        if self.deltas == "raw":
            # converted as a whole: a "\r\n" split across two deltas must not become "\r\r\n"
            shown = self.service.client_line_endings(self.raw, self.info)
            delta, self.sent = shown[len(self.sent):], shown
            return delta
        if accepted is None or not accepted.startswith(self.sent):
            return ""  # no new line, or post-processing disagrees with what was sent: wait
        delta, self.sent = accepted[len(self.sent):], accepted
        return delta

    def _checkpoint(self) -> str | None:
        """At a new complete line: the post-processed complete lines (client line endings)."""
        end = self.raw.rfind("\n")
        if end <= self._checked or self._post_failed:
            return None
        self._checked = end
        complete = self.raw[: end + 1]
        try:
            accepted, _, structural = self.service.finish(complete, self.info)
        except Exception:  # post-processing of partial text must never break a completion
            self._post_failed = True
            return None
        self._check_settled(complete, accepted.replace("\r\n", "\n"), structural)
        return accepted

    def finish(self) -> tuple[str, str, list[str]]:
        """(last delta, completion, post-processing decisions) once the engine is done."""
        final, decisions = self.service.finish_text(self.raw, self.info)
        if self.deltas != "lines":
            return "", final, decisions
        if final.startswith(self.sent):
            return final[len(self.sent):], final, decisions
        return "", self.sent, decisions + ["kept the lines already streamed"]

    def _check_settled(self, complete: str, cut: str, structural: bool = False) -> None:
        complete = complete.replace("\r\n", "\n")
        # the cut may start later than the raw text: post-processing drops indentation the cursor
        # line already has (the model often repeats it), so find the cut after leading blanks
        at = 0 if complete.startswith(cut) else complete.find(cut) if cut.strip() else -1
        dropped = complete[at + len(cut):] if at >= 0 and not complete[:at].strip() else ""
        if not cut.strip() or not any(line.strip() for line in dropped.split("\n")):
            self._last_cut = None
            return
        # the same cut twice in a row, or once when post-processing says its cut is structural
        self.settled = self._last_cut == cut or structural
        self._last_cut = cut
