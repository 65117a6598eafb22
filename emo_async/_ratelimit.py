"""Client-side rate limiting: one adaptive limiter per endpoint family.

A limiter spaces requests evenly (GCRA / virtual scheduling, no bursts), so a server-side bucket
of ``rate`` tokens per second is never overrun, whatever the number of callers. It is fair:
waiters are served in arrival order through an anyio lock. It adapts like TCP (AIMD): a 429
cuts the rate, successes raise it back towards the configured ceiling, and a ``Retry-After``
pauses the whole family.
"""

from __future__ import annotations

import time

import anyio
import attrs

__all__ = ["AdaptiveRateLimiter", "RateLimiterStatistics"]


@attrs.frozen
class RateLimiterStatistics:
    """A snapshot of one limiter.

    Attributes:
        name: The endpoint family.
        rate: The current rate, requests per second.
        max_rate: The configured ceiling.
        acquired: Permits handed out so far.
        throttled: 429s reported to it.
        waiting: Callers waiting for a permit now.
    """

    name: str
    rate: float
    max_rate: float
    acquired: int
    throttled: int
    waiting: int


class AdaptiveRateLimiter:
    """Even spacing at ``rate`` per second, shared by every caller, adaptive on 429s."""

    #: After a cut, further 429s within this many seconds do not cut again (they were already
    #: in flight when the first one arrived).
    _CUT_HOLDOFF = 1.0
    _SLACK = 1.05

    def __init__(
        self,
        name: str,
        rate: float,
        *,
        min_rate: float | None = None,
        decrease: float = 0.5,
        recover_seconds: float = 10.0,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.name = name
        self.max_rate = float(rate)
        self.min_rate = float(min_rate) if min_rate is not None else max(0.1, rate / 20)
        self._rate = float(rate)
        self._decrease = decrease
        # Additive increase: from min to max over about `recover_seconds` of successful traffic.
        self._step = self.max_rate / max(1.0, recover_seconds * self.max_rate)
        self._next = 0.0
        self._paused_until = 0.0
        self._last_cut = -1e9
        self._lock = anyio.Lock()
        self._acquired = 0
        self._throttled = 0
        self._waiting = 0

    @property
    def rate(self) -> float:
        return self._rate

    async def acquire(self) -> None:
        """Wait for the next permit."""
        self._waiting += 1
        try:
            async with self._lock:
                while True:
                    now = time.monotonic()
                    wait = max(self._next - now, self._paused_until - now)
                    if wait <= 0:
                        break
                    await anyio.sleep(wait)
                # 5 % slack: jitter between our send and the server's arrival (a busy loop,
                # the network) must not squeeze rate+1 requests into one second there.
                self._next = max(self._next, now) + self._SLACK / self._rate
                self._acquired += 1
        finally:
            self._waiting -= 1

    def on_success(self) -> None:
        """A request of this family succeeded: creep back towards the ceiling."""
        if self._rate < self.max_rate:
            self._rate = min(self.max_rate, self._rate + self._step)

    def on_throttle(self, retry_after: float | None = None) -> None:
        """The server answered 429: cut the rate and honour ``Retry-After``."""
        self._throttled += 1
        now = time.monotonic()
        if now - self._last_cut >= self._CUT_HOLDOFF:
            self._rate = max(self.min_rate, self._rate * self._decrease)
            self._last_cut = now
        if retry_after is not None and retry_after > 0:
            self.pause(retry_after)

    def pause(self, seconds: float) -> None:
        """Hand out no permit for ``seconds``."""
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    def statistics(self) -> RateLimiterStatistics:
        return RateLimiterStatistics(
            name=self.name,
            rate=self._rate,
            max_rate=self.max_rate,
            acquired=self._acquired,
            throttled=self._throttled,
            waiting=self._waiting,
        )

    def __repr__(self) -> str:
        return f"<AdaptiveRateLimiter {self.name} rate={self._rate:.2f}/{self.max_rate:.2f}/s>"
