"""Another program on the same account and key, submitting jobs of its own.

Its tasks are made lazily, like the task schedule: every request to the simulator (and every
read of ``Simulator.ledger``/``tasks``) first creates the tasks that fell due since the last
one, each at the instant it was due. So with ``other_program_interval=0.1`` exactly
``floor(elapsed / 0.1)`` foreign tasks exist after ``elapsed`` real seconds, whatever the load.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from typing import Final

__all__ = ["FOREIGN_AUDIO_SECONDS", "OtherProgram"]

#: Range of the seeded audio durations of the other program's jobs, in seconds.
FOREIGN_AUDIO_SECONDS: Final = (2.0, 8.0)
#: A tiny interval after a long quiet spell must not stall a request: the rest is skipped.
_MAX_PER_CATCH_UP: Final = 10_000

#: (audio seconds, monotonic instant it was due or None for "now") → task id.
Create = Callable[[float, float | None], str]


class OtherProgram:
    """Schedules the other program's submits; ``create`` makes each task."""

    def __init__(self, create: Create) -> None:
        self._create = create
        self._interval: float | None = None
        self._next_due = math.inf
        self._rng = random.Random()

    def configure(self, interval: float | None, seed: int) -> None:
        """Start (or stop) submitting every ``interval`` real seconds from now; reseeds."""
        self.catch_up()
        self._interval = interval
        self._rng = random.Random(f"other-program:{seed}")
        self._next_due = math.inf if interval is None else time.monotonic() + interval

    def catch_up(self) -> None:
        """Create every task due by now."""
        interval = self._interval
        if interval is None:
            return
        now = time.monotonic()
        made = 0
        while self._next_due <= now and made < _MAX_PER_CATCH_UP:
            self._create(self._draw(), self._next_due)
            self._next_due += interval
            made += 1
        if self._next_due <= now:
            self._next_due = now + interval

    def create_now(self, audio_seconds: float | None) -> str:
        """Create one task now (the drawn duration if ``audio_seconds`` is None)."""
        if audio_seconds is not None and not 0 < audio_seconds < 60:
            raise ValueError(f"audio_seconds must be within (0, 60), got {audio_seconds}")
        return self._create(self._draw() if audio_seconds is None else audio_seconds, None)

    def _draw(self) -> float:
        low, high = FOREIGN_AUDIO_SECONDS
        # Two decimals, as usage.video_duration reports it: the ledger then equals the bill.
        return round(self._rng.uniform(low, high), 2)
