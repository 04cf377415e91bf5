"""How soon do ended requests' successors arrive? Learned from the worker's own traffic, for Engine.linger.

Clients that send their next request as soon as one ends (chat UIs, agents, closed-loop benchmarks) reach the worker
a few milliseconds after the step that ended the previous one: the gateway, Redis and the client's own turn-around.
When most ends are followed that quickly by an arrival, it pays to hold the next step for that long (the running
sequences lose those milliseconds once; each successor saves a whole step). When they are not, lingering only costs.
"""

from __future__ import annotations

from collections import deque

SUCCESSOR_WINDOW_S = 0.25  # an arrival this soon after an end counts as its successor
MIN_SAMPLES = 4  # ends observed before the clock offers a gap
LIKELY = 0.5  # the share of recent ends followed by a successor above which one is expected
GAP_QUANTILE = 0.8
GAP_MARGIN = 1.25  # the wait offered: the usual gap with room for a slower one


class SuccessorClock:
    """Not thread-safe: the engine calls it under its inbox lock."""

    def __init__(self, history: int = 32) -> None:
        self._ends: deque[float] = deque()  # times of ends still waiting for a successor, oldest first
        self._gaps: deque[float] = deque(maxlen=history)  # seconds from an end to its successor
        self._followed: deque[bool] = deque(maxlen=history)  # per recent end: did a successor come in the window

    def ended(self, now: float, count: int) -> None:
        self._expire(now)
        self._ends.extend([now] * count)

    def arrived(self, now: float, count: int = 1) -> None:
        self._expire(now)
        for _ in range(count):
            if not self._ends:
                return
            self._gaps.append(now - self._ends.popleft())
            self._followed.append(True)

    def expected_gap(self) -> float | None:
        """How long to wait for successors (seconds), or None when recent ends were mostly not followed."""
        if len(self._followed) < MIN_SAMPLES or sum(self._followed) < LIKELY * len(self._followed):
            return None  # (past this, some end was followed, so there are gaps)
        gaps = sorted(self._gaps)
        return GAP_MARGIN * gaps[min(len(gaps) - 1, int(GAP_QUANTILE * len(gaps)))]

    def _expire(self, now: float) -> None:
        while self._ends and now - self._ends[0] > SUCCESSOR_WINDOW_S:
            self._ends.popleft()
            self._followed.append(False)
