"""The simulated clock: scaled monotonic time plus manual jumps."""

from __future__ import annotations

import datetime as _dt
import time

__all__ = ["SERVER_TZ", "SimClock", "format_server_time"]

#: DashScope writes its times in Beijing time without a zone.
SERVER_TZ = _dt.timezone(_dt.timedelta(hours=8), "UTC+08:00")


class SimClock:
    """Simulated seconds since the simulator started.

    ``now() = (monotonic() - t0) / time_scale + offset``; :meth:`advance` adds to ``offset``.
    :meth:`wall` maps simulated instants to real unix time, so with no jumps it is the real
    clock whatever the scale.
    """

    def __init__(self, time_scale: float) -> None:
        self._scale = time_scale
        self._t0 = time.monotonic()
        self._wall0 = time.time()
        self._offset = 0.0
        #: Bumped by every jump, so anything derived from the real/simulated mapping
        #: (the real ``Expires`` of a URL) can tell it must be recomputed.
        self.generation = 0

    @property
    def time_scale(self) -> float:
        """Real seconds per simulated second."""
        return self._scale

    def now(self) -> float:
        """Simulated seconds since start."""
        return (time.monotonic() - self._t0) / self._scale + self._offset

    def advance(self, seconds: float) -> None:
        """Jump simulated time forward (e.g. to expire URLs or tasks)."""
        if seconds < 0:
            raise ValueError("the simulated clock only moves forward")
        self._offset += seconds
        self.generation += 1

    def wall(self, sim_t: float | None = None) -> float:
        """Unix time, on the REAL clock, of a simulated instant (default: now).

        Answer timestamps (``submit_time``, ``end_time``, ``gmt_create``) use this, so a client
        can compare them with its own clock (the reconcile step of an ambiguous submit does):
        durations between them are real (scaled) durations, and a jump moves them forward by
        its real-time equivalent.
        """
        return self._wall0 + (self.now() if sim_t is None else sim_t) * self._scale

    def real_unix(self, sim_t: float) -> float:
        """Real unix time at which the simulated instant ``sim_t`` arrives (if no jump occurs)."""
        return time.time() + (sim_t - self.now()) * self._scale

    def real_seconds(self, sim_seconds: float) -> float:
        """Real duration of a simulated duration."""
        return sim_seconds * self._scale


def format_server_time(unix: float) -> str:
    """``"2023-12-20 21:36:31.896"`` in UTC+8, as DashScope writes it."""
    moment = _dt.datetime.fromtimestamp(unix, SERVER_TZ)
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}"
