"""Stage durations for the flows' reports."""

from __future__ import annotations

import time


class Stopwatch:
    """Seconds since the previous lap: one stage's duration at a time."""

    def __init__(self) -> None:
        self._last = time.monotonic()

    def lap(self) -> float:
        now = time.monotonic()
        seconds, self._last = now - self._last, now
        return round(seconds, 3)
