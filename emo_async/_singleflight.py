"""Compute once per key, share the result with concurrent callers; a failure is not cached."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import anyio

__all__ = ["SingleFlight"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """A cache whose misses are computed once per key, however many callers ask at once.

    Callers that arrive while a key is being computed wait for it and take its result. When the
    computation fails (or is cancelled) nothing is cached and its error goes to its own caller
    only: the waiters wake up and the next of them computes afresh, so one caller's failure
    (its timeout, its cancellation) does not become everybody's.

    Args:
        fresh: Whether a cached value may still be handed out (e.g. not about to expire); a
            stale value counts as a miss and is computed again.
    """

    def __init__(self, *, fresh: Callable[[V], bool] | None = None) -> None:
        self._values: dict[K, V] = {}
        self._pending: dict[K, anyio.Event] = {}
        self._fresh = fresh

    def get(self, key: K) -> V | None:
        """The cached value for ``key`` if there is a fresh one."""
        value = self._values.get(key)
        if value is None or (self._fresh is not None and not self._fresh(value)):
            return None
        return value

    def put(self, key: K, value: V) -> None:
        """Cache ``value`` for ``key`` (e.g. seeded from a journal), replacing an earlier one."""
        self._values[key] = value

    async def get_or_compute(self, key: K, compute: Callable[[], Awaitable[V]]) -> V:
        """The cached value for ``key``, or ``await compute()``'s, computed by one caller."""
        while True:
            hit = self.get(key)
            if hit is not None:
                return hit
            pending = self._pending.get(key)
            if pending is None:
                break
            await pending.wait()
        event = anyio.Event()
        self._pending[key] = event
        try:
            value = await compute()
            self._values[key] = value
            return value
        finally:
            del self._pending[key]
            event.set()
