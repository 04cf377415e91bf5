"""Stop strings over streamed text: emit only what can no longer become part of a stop string.

Text arrives in arbitrary deltas. After each one, the longest tail of the unemitted text that is the start of some stop
string is held back; everything before it is safe. A stop string that straddles deltas is therefore never partly
emitted, and the result does not depend on how the text was split.
"""

from __future__ import annotations


class StopChecker:
    """One sequence's stop-string state. ``push`` each text delta; ``flush`` when it ends for another reason."""

    def __init__(self, stop: list[str], include_stop: bool) -> None:
        for s in stop:
            if not isinstance(s, str):
                raise ValueError(f"stop strings must be strings, got {s!r}")
        self._stops = [s for s in dict.fromkeys(stop) if s]  # empty strings would match everywhere: ignore them
        self._include_stop = include_stop
        self._longest = max((len(s) for s in self._stops), default=0)
        self._held = ""
        self._matched: str | None = None

    @property
    def matched(self) -> str | None:
        """The stop string that ended the text, once one has."""
        return self._matched

    def push(self, text: str) -> tuple[str, str | None]:
        """(text safe to emit now, the stop string matched by this delta or None)."""
        if self._matched is not None:
            raise RuntimeError(f"text pushed after stop string {self._matched!r} already ended this sequence")
        pending = self._held + text
        match = self._first_match(pending)
        if match is not None:
            start, stop = match
            self._held, self._matched = "", stop
            return pending[: start + len(stop) if self._include_stop else start], stop
        keep = self._partial_stop_suffix(pending)
        self._held = pending[len(pending) - keep :]
        return pending[: len(pending) - keep], None

    def flush(self) -> str:
        """Release held-back text: the sequence ended without completing the stop string it resembled."""
        held, self._held = self._held, ""
        return held

    def _first_match(self, text: str) -> tuple[int, str] | None:
        """The stop string completed earliest in ``text`` (on a tie, the longer one), and where it starts.

        Earliest completion, not earliest start: that is where token-by-token streaming would have stopped.
        """
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stops:
            start = text.find(stop)
            if start >= 0:
                candidate = (start + len(stop), start, stop)
                if best is None or candidate[:2] < best[:2]:
                    best = candidate
        return None if best is None else (best[1], best[2])

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        for size in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-size:]
            if any(stop.startswith(tail) for stop in self._stops):
                return size
        return 0
