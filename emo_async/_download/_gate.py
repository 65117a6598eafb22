"""Earliest-deadline-first download slots."""

from __future__ import annotations

import heapq
import itertools
import math

import anyio
import attrs


@attrs.define(order=False, eq=False)
class _Waiter:
    key: float
    seq: int
    event: anyio.Event = attrs.field(factory=anyio.Event)
    granted: bool = False
    abandoned: bool = False

    def __lt__(self, other: _Waiter) -> bool:
        return (self.key, self.seq) < (other.key, other.seq)


class _EDFGate:
    """At most ``slots`` holders; waiters get a slot in order of ``key`` (ties: arrival)."""

    def __init__(self, slots: int) -> None:
        self._slots = slots
        self._free = slots
        self._heap: list[_Waiter] = []
        self._seq = itertools.count()

    @property
    def active(self) -> int:
        return self._slots - self._free

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._heap if not w.abandoned)

    async def acquire(self, key: float, *, give_up_after: float | None) -> bool:
        """Take a slot; ``False`` if ``give_up_after`` seconds passed first (no slot is held)."""
        if self._free > 0:
            # release() hands slots to live waiters first, so a free slot means nobody waits.
            self._free -= 1
            return True
        waiter = _Waiter(key, next(self._seq))
        heapq.heappush(self._heap, waiter)
        try:
            with anyio.move_on_after(
                math.inf if give_up_after is None else max(0.0, give_up_after)
            ):
                await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                self.release()
            else:
                waiter.abandoned = True
            raise
        if not waiter.granted:
            waiter.abandoned = True
            return False
        return True

    def release(self) -> None:
        while self._heap:
            waiter = heapq.heappop(self._heap)
            if waiter.abandoned:
                continue
            waiter.granted = True
            waiter.event.set()
            return
        self._free += 1
