"""The account's poller lease: one row per account naming the process that polls for everyone.

The lease is held until ``lease_until`` on the server's clock; the holder renews it well before
then, and any process may take it once it has passed (the holder died, froze or lost the
database). The holder also steps down by itself when it could not renew for most of a lease,
by its own monotonic clock (an interval, never compared with another host's clock), so two
processes poll at once only for the moments a frozen holder needs to notice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

__all__ = ["Lease"]

_TAKE = """
INSERT INTO emo_account_leader AS l (account, owner, lease_until)
VALUES (%(account)s, %(owner)s, clock_timestamp() + make_interval(secs => %(lease)s))
ON CONFLICT (account) DO UPDATE SET
    owner = excluded.owner,
    lease_until = excluded.lease_until,
    term = CASE WHEN l.owner = excluded.owner THEN l.term ELSE l.term + 1 END,
    acquired_at = CASE WHEN l.owner = excluded.owner THEN l.acquired_at
                       ELSE clock_timestamp() END
WHERE l.owner = excluded.owner OR l.lease_until < clock_timestamp()
RETURNING l.term
"""

_RENEW = """
UPDATE emo_account_leader
SET lease_until = clock_timestamp() + make_interval(secs => %(lease)s)
WHERE account = %(account)s AND owner = %(owner)s AND lease_until >= clock_timestamp()
RETURNING term
"""

_RELEASE = """
WITH gone AS (
    UPDATE emo_account_leader SET lease_until = '-infinity'
    WHERE account = %(account)s AND owner = %(owner)s
    RETURNING account
)
SELECT pg_notify(%(channel)s, 'leader') FROM gone
"""


class Lease:
    """The leader lease of one account, as seen by one process (``owner``)."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        account: str,
        owner: str,
        *,
        seconds: float,
        channel: str,
    ) -> None:
        self._pool = pool
        self._params = {"account": account, "owner": owner, "lease": seconds, "channel": channel}
        self.seconds = seconds
        #: The term we hold (it grows each time the lease changes hands), or None.
        self.term: int | None = None

    async def take(self) -> bool:
        """Take the lease if it is free, expired or ours (renewing it); whether we hold it."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(_TAKE, self._params)
            row = await cur.fetchone()
        self.term = int(row[0]) if row else None
        return row is not None

    async def renew(self) -> bool:
        """Extend a lease we still hold; False if it expired or someone else holds it."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(_RENEW, self._params)
            row = await cur.fetchone()
        if row is None or (self.term is not None and int(row[0]) != self.term):
            self.term = None
            return False
        return True

    async def release(self) -> None:
        """Give the lease up now and tell the others (a no-op if we do not hold it)."""
        self.term = None
        async with self._pool.connection() as conn:
            await conn.execute(_RELEASE, self._params)
