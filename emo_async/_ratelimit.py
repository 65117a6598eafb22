"""Client-side rate limiting: one adaptive limiter per endpoint family.

A limiter spaces requests evenly (GCRA / virtual scheduling, no bursts), so a server-side bucket
of ``rate`` tokens per second is never overrun, whatever the number of callers. It is fair:
waiters are served in arrival order through an anyio lock. It adapts like TCP (AIMD): a 429
cuts the rate, successes raise it back towards the configured ceiling, and a ``Retry-After``
pauses the whole family.

Recovery is proportionate, and aims just below the rate that was throttled. A cut remembers
95 % of the rate it cut from as the *target*. Each later success closes a fixed fraction of
the gap to the target, so a halving is mostly undone within about ten successes, whatever the
ceiling. Above the target the rate only creeps up, by 0.2 % per success, to probe for more.
Successes within a moment of a 429 count for nothing, since they came from the same burst.
After a quiet spell with no 429, the ceiling and the target are both restored. So a transient
429 burst costs a second or so of reduced rate, while a real limit below the configured rate
is found and followed, with a 429 only every few seconds. A fixed step in requests per second
could do neither: a small step takes hundreds of successes to undo one cut at 40/s, and a
large one overruns a 20/s account limit on every success.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio
import attrs

__all__ = ["AdaptiveRateLimiter", "Clock", "RateLimiterStatistics", "Sleep"]

#: Monotonic seconds.
Clock = Callable[[], float]
#: Waits that many seconds of the matching :data:`Clock`.
Sleep = Callable[[float], Awaitable[None]]


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
    #: Successes this soon after a 429 do not raise the rate (429s come in clusters).
    _CALM = 0.25
    #: After a cut, the target is this fraction of the rate that was throttled.
    _TARGET_MARGIN = 0.95
    #: Permits are spaced this much wider than ``1 / rate``: a guard against the jitter
    #: between our send and the server's arrival squeezing rate + 1 requests into one of its
    #: seconds. Small, since a 429 is handled anyway (and the limit is the account's own).
    _SLACK = 1.02

    def __init__(
        self,
        name: str,
        rate: float,
        *,
        min_rate: float | None = None,
        decrease: float = 0.5,
        recovery: float = 0.2,
        probe: float = 0.002,
        recover_seconds: float = 10.0,
        clock: Clock = time.monotonic,
        sleep: Sleep = anyio.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        if not 0 < decrease < 1:
            raise ValueError("decrease must be within (0, 1)")
        if not 0 < recovery <= 1:
            raise ValueError("recovery must be within (0, 1]")
        if not 0 <= probe <= 1:
            raise ValueError("probe must be within [0, 1]")
        if recover_seconds <= 0:
            raise ValueError("recover_seconds must be > 0")
        self.name = name
        # Tests pass a fake clock and its sleep, to check spacing without waiting for it.
        self._clock = clock
        self._sleep = sleep
        self.max_rate = float(rate)
        self.min_rate = float(min_rate) if min_rate is not None else max(0.1, rate / 20)
        self._rate = float(rate)
        self._decrease = decrease
        # Fraction of the gap to the target closed per success: the same number of successes
        # undoes a cut at 2/s and at 200/s.
        self._recovery = recovery
        # Relative increase per success above the target, where the last 429 came from.
        self._probe = probe
        self._target = self.max_rate
        # No 429 for this long: whatever throttled us is over, back to the ceiling.
        self._quiet = float(recover_seconds)
        self._next = 0.0
        self._paused_until = 0.0
        self._last_cut = -1e9
        self._last_throttle = -1e9
        self._lock = anyio.Lock()
        self._acquired = 0
        self._throttled = 0
        self._waiting = 0

    @property
    def rate(self) -> float:
        self._restore_if_quiet(self._clock())
        return self._rate

    def _restore_if_quiet(self, now: float) -> None:
        if self._rate < self.max_rate and now - self._last_throttle >= self._quiet:
            self._rate = self._target = self.max_rate

    async def acquire(self) -> None:
        """Wait for the next permit."""
        self._waiting += 1
        try:
            async with self._lock:
                while True:
                    now = self._clock()
                    self._restore_if_quiet(now)
                    wait = max(self._next - now, self._paused_until - now)
                    if wait <= 0:
                        break
                    await self._sleep(wait)
                # The slack: jitter between our send and the server's arrival (a busy loop,
                # the network) must not squeeze rate+1 requests into one second there.
                self._next = max(self._next, now) + self._SLACK / self._rate
                self._acquired += 1
        finally:
            self._waiting -= 1

    def on_success(self) -> None:
        """A request of this family succeeded: head back to the target, then probe above."""
        now = self._clock()
        self._restore_if_quiet(now)
        if self._rate >= self.max_rate or now - self._last_throttle < self._CALM:
            return
        gap = self._target - self._rate
        if gap > 0.01 * self._target:
            rate = self._rate + gap * self._recovery
        else:
            rate = max(self._rate, self._target) * (1.0 + self._probe)
        self._rate = min(self.max_rate, rate)

    def on_throttle(self, retry_after: float | None = None) -> None:
        """The server answered 429: cut the rate and honour ``Retry-After``."""
        self._throttled += 1
        now = self._clock()
        self._last_throttle = now
        if now - self._last_cut >= self._CUT_HOLDOFF:
            # Aim a little below the rate that drew the 429, then probe up from there.
            self._target = self._rate * self._TARGET_MARGIN
            self._rate = max(self.min_rate, self._rate * self._decrease)
            self._last_cut = now
        if retry_after is not None and retry_after > 0:
            self.pause(retry_after)

    def pause(self, seconds: float) -> None:
        """Hand out no permit for ``seconds``."""
        self._paused_until = max(self._paused_until, self._clock() + seconds)

    def statistics(self) -> RateLimiterStatistics:
        return RateLimiterStatistics(
            name=self.name,
            rate=self.rate,
            max_rate=self.max_rate,
            acquired=self._acquired,
            throttled=self._throttled,
            waiting=self._waiting,
        )

    def __repr__(self) -> str:
        return f"<AdaptiveRateLimiter {self.name} rate={self._rate:.2f}/{self.max_rate:.2f}/s>"
