"""Rate limits shared by every process of one account, kept in PostgreSQL on the server's clock.

Each endpoint family of an account is one row of ``emo_account_limits`` holding the state of
:class:`~emo_async._ratelimit.AdaptiveRateLimiter` (rate, target, pause, last cut): the same
even spacing and the same AIMD adaptation, but for the account rather than for one process.

* An acquire reserves the next slot in one ``UPDATE … RETURNING``: the theoretical arrival time
  moves to ``greatest(tat, now, paused_until) + slack / rate`` and the statement returns how
  long the caller must wait, measured on the server's clock within that same statement, so the
  hosts' clocks never matter (only the one-way latency does, well under the 5 % slack).
* Within a process, callers take turns (an anyio lock, as the local limiter does) and hold it
  until their slot comes: each process has at most one reservation ahead, so a cut or a
  ``Retry-After`` applies to the very next request of every process, not after a queue of
  reservations made at the old rate.
* ``on_throttle``, ``on_success`` and ``pause`` are synchronous in the local interface; here they
  queue a statement that a background task (and the next acquire, before reserving) sends. A
  success costs no statement while the rate is at its ceiling, which is nearly always.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskStatus as AnyioTaskStatus

from .._ratelimit import AdaptiveRateLimiter
from ._connect import PostgresUnavailable

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

__all__ = ["SharedRateLimiter"]

logger = logging.getLogger("emo_async.pg")

# Quiet-spell restore, shared by every statement: whatever throttled us is over.
_QUIET = "(now.t - l.last_throttle >= make_interval(secs => %(quiet)s))"
_RATE = f"(CASE WHEN {_QUIET} THEN l.max_rate ELSE l.rate END)"
_TARGET = f"(CASE WHEN {_QUIET} THEN l.max_rate ELSE l.target END)"

_SETUP = """
INSERT INTO emo_account_limits AS l (account, family, max_rate, rate, target)
VALUES (%(account)s, %(family)s, %(max_rate)s, %(max_rate)s, %(max_rate)s)
ON CONFLICT (account, family) DO UPDATE SET
    max_rate = excluded.max_rate,
    rate = least(l.rate, excluded.max_rate),
    target = least(l.target, excluded.max_rate)
RETURNING l.rate, l.max_rate
"""

_ACQUIRE = f"""
WITH now AS (SELECT clock_timestamp() AS t)
UPDATE emo_account_limits AS l SET
    rate = {_RATE},
    target = {_TARGET},
    tat = greatest(l.tat, now.t, l.paused_until) + make_interval(secs => %(slack)s / {_RATE}),
    acquired = l.acquired + 1
FROM now
WHERE l.account = %(account)s AND l.family = %(family)s
RETURNING extract(epoch FROM l.tat - now.t)::float8 - %(slack)s / l.rate, l.rate, l.max_rate
"""

_SUCCESS = f"""
WITH now AS (SELECT clock_timestamp() AS t)
UPDATE emo_account_limits AS l SET
    rate = CASE
        WHEN {_QUIET} THEN l.max_rate
        WHEN l.target - l.rate > 0.01 * l.target
            THEN least(l.max_rate, l.rate + (l.target - l.rate) * %(recovery)s)
        ELSE least(l.max_rate, greatest(l.rate, l.target) * (1 + %(probe)s))
    END,
    target = {_TARGET}
FROM now
WHERE l.account = %(account)s AND l.family = %(family)s AND l.rate < l.max_rate
    AND now.t - l.last_throttle >= make_interval(secs => %(calm)s)
RETURNING l.rate, l.max_rate
"""

_CUT = "(now.t - l.last_cut >= make_interval(secs => %(holdoff)s))"
_THROTTLE = f"""
WITH now AS (SELECT clock_timestamp() AS t)
UPDATE emo_account_limits AS l SET
    throttled = l.throttled + 1,
    last_throttle = now.t,
    target = CASE WHEN {_CUT} THEN {_RATE} * %(margin)s ELSE {_TARGET} END,
    rate = CASE WHEN {_CUT} THEN greatest(%(min_rate)s, {_RATE} * %(decrease)s) ELSE {_RATE} END,
    last_cut = CASE WHEN {_CUT} THEN now.t ELSE l.last_cut END,
    paused_until = CASE WHEN %(pause)s > 0
        THEN greatest(l.paused_until, now.t + make_interval(secs => %(pause)s))
        ELSE l.paused_until END
FROM now
WHERE l.account = %(account)s AND l.family = %(family)s
RETURNING l.rate, l.max_rate
"""

_PAUSE = """
UPDATE emo_account_limits AS l SET
    paused_until = greatest(l.paused_until, clock_timestamp() + make_interval(secs => %(pause)s))
WHERE l.account = %(account)s AND l.family = %(family)s
RETURNING l.rate, l.max_rate
"""


class SharedRateLimiter(AdaptiveRateLimiter):
    """An :class:`AdaptiveRateLimiter` whose state is one row shared by the account's processes.

    Same parameters, validation and interface as the local limiter (the client's request path
    cannot tell them apart); call :meth:`setup` once before use, and run :meth:`run` in a task
    group so reports reach the database even while nobody acquires.
    """

    #: Wider than the local limiter's: each process reaches the server over its own path, and
    #: the row's clock is the database's, so their jitters add up.
    _SLACK = 1.05

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        account: str,
        name: str,
        rate: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, rate, **kwargs)
        self._pool = pool
        self._account = account
        self._turn = anyio.Lock()
        self._pending: list[tuple[str, float]] = []
        self._kick = anyio.Event()
        self._send_lock = anyio.Lock()
        self._recovering = False

    def _params(self, **extra: float) -> dict[str, Any]:
        return {"account": self._account, "family": self.name, "quiet": self._quiet, **extra}

    def _note(self, row: tuple[Any, ...] | None) -> None:
        # The account's rate as of our last statement: the statistics, and whether a success
        # is worth a statement.
        if row is not None:
            self._rate = float(row[0])
            self._recovering = self._rate < float(row[1])

    @property
    def rate(self) -> float:
        return self._rate

    async def setup(self) -> None:
        """Create the family's row, or adopt it (this process's ceiling wins)."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(_SETUP, {**self._params(), "max_rate": self.max_rate})
            self._note(await cur.fetchone())

    async def acquire(self) -> None:
        """Wait for the account's next permit of this family."""
        self._waiting += 1
        try:
            async with self._turn:
                if self._pending:
                    await self._send()
                try:
                    async with self._pool.connection() as conn:
                        cur = await conn.execute(_ACQUIRE, self._params(slack=self._SLACK))
                        row = await cur.fetchone()
                except Exception as exc:
                    # Nothing is sent without a permit: no database, no request.
                    raise PostgresUnavailable(
                        f"the shared {self.name} limiter cannot reach PostgreSQL: {exc}"
                    ) from None
                if row is None:
                    raise PostgresUnavailable(f"the {self.name} limiter's row is gone")
                self._note(row[1:])
                self._acquired += 1
                wait = float(row[0])
                if wait > 0:
                    await self._sleep(wait)
        finally:
            self._waiting -= 1

    def on_success(self) -> None:
        if self._recovering:
            self._queue("success", 0.0)

    def on_throttle(self, retry_after: float | None = None) -> None:
        self._throttled += 1
        self._queue("throttle", retry_after if retry_after and retry_after > 0 else 0.0)

    def pause(self, seconds: float) -> None:
        if seconds > 0:
            self._queue("pause", seconds)

    def _queue(self, kind: str, value: float) -> None:
        self._pending.append((kind, value))
        self._kick.set()

    async def _send(self) -> None:
        """Send the queued reports, in order (a failure drops them: they only advise)."""
        async with self._send_lock:
            batch, self._pending = self._pending, []
            if not batch:
                return
            try:
                async with self._pool.connection() as conn:
                    for kind, value in batch:
                        if kind == "success":
                            cur = await conn.execute(
                                _SUCCESS,
                                self._params(
                                    calm=self._CALM, recovery=self._recovery, probe=self._probe
                                ),
                            )
                        elif kind == "throttle":
                            cur = await conn.execute(
                                _THROTTLE,
                                self._params(
                                    holdoff=self._CUT_HOLDOFF,
                                    margin=self._TARGET_MARGIN,
                                    min_rate=self.min_rate,
                                    decrease=self._decrease,
                                    pause=value,
                                ),
                            )
                        else:
                            cur = await conn.execute(_PAUSE, self._params(pause=value))
                        self._note(await cur.fetchone())
            except Exception as exc:
                logger.warning("could not share the %s limiter's report: %s", self.name, exc)

    async def run(self, *, task_status: AnyioTaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Send reports as they come (until cancelled)."""
        task_status.started()
        while True:
            await self._kick.wait()
            self._kick = anyio.Event()
            await self._send()

    async def refresh(self) -> None:
        """Read the account's current rate (for the statistics)."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT CASE WHEN clock_timestamp() - last_throttle"
                " >= make_interval(secs => %(quiet)s) THEN max_rate ELSE rate END, max_rate"
                " FROM emo_account_limits WHERE account = %(account)s AND family = %(family)s",
                self._params(),
            )
            self._note(await cur.fetchone())

    def __repr__(self) -> str:
        return f"<SharedRateLimiter {self.name} rate={self._rate:.2f}/{self.max_rate:.2f}/s>"
