"""A fake monotonic clock for the limiters and the poller: time moves only when a test (or
:meth:`FakeClock.autojump`) moves it, so rates and delays are checked exactly and instantly.

Real I/O (HTTP to the simulator) still runs on the event loop; :func:`settle` waits for it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable

import anyio
import anyio.lowlevel

__all__ = ["FakeClock", "settle"]


async def settle(idle: Callable[[], bool] = lambda: True, *, limit: float = 5.0) -> None:
    """Wait until every other task waits for something and ``idle()`` holds.

    "Waits for something" includes a socket read, so ``idle`` must say that no request is in
    flight; once both hold, only a timer of the fake clock can move anything.
    """
    this = asyncio.current_task()
    with anyio.fail_after(limit):
        while True:
            await anyio.lowlevel.checkpoint()
            blocked = all(
                task is this
                or (
                    (waiter := getattr(task, "_fut_waiter", None)) is not None and not waiter.done()
                )
                for task in asyncio.all_tasks()
            )
            if blocked and idle():
                return
            await anyio.sleep(0.001)


class FakeClock:
    """``clock()`` is the time; ``sleep`` and ``move_on_after`` wait on it, not on the loop."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start
        self._timers: list[tuple[float, int, anyio.CancelScope]] = []
        self._ids = itertools.count()

    def __call__(self) -> float:
        return self.t

    def move_on_after(self, seconds: float) -> anyio.CancelScope:
        scope = anyio.CancelScope()
        if seconds <= 0:
            scope.cancel()
        else:
            heapq.heappush(self._timers, (self.t + seconds, next(self._ids), scope))
        return scope

    async def sleep(self, seconds: float) -> None:
        with self.move_on_after(seconds):
            await anyio.sleep_forever()

    def next_deadline(self) -> float | None:
        """When the earliest pending timer fires."""
        while self._timers and self._timers[0][2].cancel_called:
            heapq.heappop(self._timers)
        return self._timers[0][0] if self._timers else None

    def advance(self, seconds: float) -> None:
        """Move time forward and fire every timer that is due."""
        assert seconds >= 0
        self.t += seconds
        while self._timers and self._timers[0][0] <= self.t:
            heapq.heappop(self._timers)[2].cancel()

    async def step(self, idle: Callable[[], bool] = lambda: True) -> bool:
        """Once nothing but a timer can move things, jump to the next timer; False if none."""
        await settle(idle)
        deadline = self.next_deadline()
        if deadline is None:
            return False
        self.advance(max(0.0, deadline - self.t))
        return True

    async def run_to(self, when: float, idle: Callable[[], bool] = lambda: True) -> None:
        """Fire every timer due by ``when``, in order, then stop the clock at ``when``."""
        while True:
            await settle(idle)
            deadline = self.next_deadline()
            if deadline is None or deadline > when:
                break
            self.advance(max(0.0, deadline - self.t))
        self.advance(max(0.0, when - self.t))
        await settle(idle)

    async def run_until(
        self,
        done: Callable[[], bool],
        idle: Callable[[], bool] = lambda: True,
        *,
        max_steps: int = 10_000,
    ) -> None:
        """Jump from timer to timer until ``done()``."""
        for _ in range(max_steps):
            await settle(idle)
            if done():
                return
            if not await self.step(idle):
                raise AssertionError("nothing left to wait for, and not done")
        raise AssertionError("not done after max_steps timers")
