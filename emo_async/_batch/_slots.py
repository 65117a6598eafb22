"""The batch's ``max_tasks`` slots, with loans for jobs that are already open elsewhere.

A shared batch's worker may claim a dead worker's job whose task is already open (or whose
intent is already recorded): it counts in the batch's quota across workers already, and this
worker's new jobs may hold every local slot while they wait for that very quota. Waiting for a
local slot there would deadlock, so such a job gets a *loan*: a slot outside the cap, given
back like any other.
"""

from __future__ import annotations

import anyio

__all__ = ["Slots"]


class Slots:
    """``max_tasks`` slots held on behalf of jobs (a capacity limiter), plus loans."""

    def __init__(self, total: int) -> None:
        self._limiter = anyio.CapacityLimiter(total)
        self._loans: set[object] = set()

    @property
    def total(self) -> int:
        return int(self._limiter.total_tokens)

    @property
    def held(self) -> int:
        """Slots held now, loans included."""
        return int(self._limiter.borrowed_tokens) + len(self._loans)

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        await self._limiter.acquire_on_behalf_of(borrower)

    def lend(self, borrower: object) -> None:
        """A slot outside the cap, at once, for a job already counted in a quota elsewhere."""
        if borrower in self._loans:
            raise RuntimeError("this job already holds a slot")
        self._loans.add(borrower)

    def release_on_behalf_of(self, borrower: object) -> None:
        """Give back the job's slot (or loan); RuntimeError if it holds none."""
        if borrower in self._loans:
            self._loans.discard(borrower)
            return
        self._limiter.release_on_behalf_of(borrower)
