"""Claims: how several workers share one batch without doing a job twice.

A worker claims unfinished jobs (``SELECT ... FOR UPDATE SKIP LOCKED``: two workers never wait
on, nor get, the same row), holds them while it heartbeats, and loses them to any other worker
once its lease runs out on the server's clock. A billed submit goes through
:meth:`Claims.reserve_submit`, which checks in one transaction that the job is still the
worker's and that the open-task quota has room across every worker, and records the intent.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable
from typing import Final, Literal

from .._exceptions import JournalError
from .postgres_base import JOB_COLUMNS, Conn, aware, phases, record_of
from .postgres_unresolved import PgSettling
from .protocol import OpenIntent
from .records import INTENT_FROM, JobPhase, JobRecord

__all__ = ["INTENT_SET", "ClaimLostError", "Claims", "intent_refusal"]

#: Phases of a task that is (or may be about to be) open on the server: what the quota counts.
_OPEN_TASK: Final = ("intent", "submitted")

# The assignments of a fresh attempt; the earlier attempt's billed seconds stay in the total.
INTENT_SET: Final = (
    "phase = 'intent', attempts = attempts + 1,"
    " intent_at = COALESCE(%s::timestamptz, clock_timestamp()),"
    " intent_server_at = clock_timestamp(),"
    " billed_earlier = billed_earlier + COALESCE(billed_seconds, 0),"
    " billed_seconds = NULL, task_id = NULL, submitted_at = NULL, task_status = NULL,"
    " video_url = NULL, url_deadline = NULL, path = NULL, host = NULL, size = NULL,"
    " sha256 = NULL, error = NULL, reason = NULL"
)


class ClaimLostError(JournalError):
    """The job is not (or no longer) claimed by this worker: its lease ran out and another
    worker may have it. Nothing was recorded; the worker drops the job."""


def intent_refusal(key: str, phase: JobPhase, task_id: str | None) -> JournalError:
    """Why a job may not get a new intent (the SQLite journal's words)."""
    if phase is JobPhase.EXPIRED:
        return JournalError(
            f"job {key} is expired: its video (task {task_id}) was paid for and its URL"
            " ran out; refusing a new intent unless the job is reset (reset_expired)"
        )
    if phase is JobPhase.UNRESOLVED:
        return JournalError(
            f"job {key} is unresolved: its earlier submit may have been billed;"
            " refusing a new intent until it is settled (adopted, assigned, or proven absent)"
        )
    return JournalError(
        f"job {key} is {phase} (task {task_id}); refusing a second intent, which would pay twice"
    )


def _open_phases() -> list[str]:
    return phases(p for p in JobPhase if not p.is_terminal)


class Claims(PgSettling):
    """Claims, leases, the shared open-task quota and every worker's open intents."""

    async def claim(self, owner: str, limit: int, lease: float) -> list[JobRecord]:
        """Claim up to ``limit`` unfinished jobs of the batch that nobody holds (unclaimed, or
        their owner's lease ran out), in register order, for ``lease`` seconds.

        Rows another worker is claiming at this very moment are skipped, not waited for.

        Returns:
            The records of the jobs now this owner's (empty when none is free).
        """
        if not owner:
            raise ValueError("a claim needs an owner")
        if limit <= 0:
            return []
        cols = ", ".join(f"j.{c.strip()}" for c in JOB_COLUMNS.split(","))

        async def run(conn: Conn) -> list[JobRecord]:
            rows = await self._rows(
                conn,
                "UPDATE emo_jobs j SET owner = %s,"
                " lease_until = clock_timestamp() + make_interval(secs => %s::float8)"
                " FROM (SELECT seq FROM emo_jobs WHERE batch_id = %s AND phase = ANY(%s)"
                " AND (owner IS NULL OR lease_until IS NULL OR lease_until < clock_timestamp())"
                " ORDER BY seq LIMIT %s FOR UPDATE SKIP LOCKED) free"
                f" WHERE j.seq = free.seq RETURNING j.seq, {cols}",
                (owner, float(lease), self._batch_id, _open_phases(), int(limit)),
            )
            rows.sort(key=lambda r: r["seq"])
            return [record_of(r) for r in rows]

        return await self._tx(run, "claiming jobs")

    async def heartbeat(self, owner: str, lease: float) -> int:
        """Extend every unfinished claim of ``owner`` in the batch to ``lease`` seconds from
        now (server clock).

        Returns:
            How many jobs it holds (0: it lost them all; another worker may have them).
        """

        async def run(conn: Conn) -> int:
            cur = await conn.execute(
                "UPDATE emo_jobs SET lease_until = clock_timestamp()"
                " + make_interval(secs => %s::float8)"
                " WHERE batch_id = %s AND owner = %s AND phase = ANY(%s)",
                (float(lease), self._batch_id, owner, _open_phases()),
            )
            return max(cur.rowcount, 0)

        return await self._tx(run, "renewing claims")

    async def release_claims(self, owner: str, keys: Iterable[str] | None = None) -> int:
        """Give back ``owner``'s unfinished claims (all, or those of ``keys``) so any worker
        may take them at once. A finished job keeps its owner, as who did it.

        Returns:
            How many claims were given back.
        """
        chosen = None if keys is None else list(keys)

        async def run(conn: Conn) -> int:
            cur = await conn.execute(
                "UPDATE emo_jobs SET owner = NULL, lease_until = NULL"
                " WHERE batch_id = %s AND owner = %s AND phase = ANY(%s)"
                " AND (%s::text[] IS NULL OR key = ANY(%s::text[]))",
                (self._batch_id, owner, _open_phases(), chosen, chosen),
            )
            return max(cur.rowcount, 0)

        return await self._tx(run, "releasing claims")

    async def claimed_keys(self, owner: str) -> list[str]:
        """The unfinished jobs of the batch ``owner`` holds (lease run out or not)."""
        rows = await self._fetchall(
            "SELECT key FROM emo_jobs WHERE batch_id = %s AND owner = %s AND phase = ANY(%s)"
            " ORDER BY seq",
            (self._batch_id, owner, _open_phases()),
        )
        return [str(r["key"]) for r in rows]

    async def reserve_submit(
        self,
        key: str,
        owner: str,
        max_tasks: int,
        *,
        at: _dt.datetime | None = None,
        across: Literal["batch", "account"] = "batch",
    ) -> bool:
        """Record an intent to submit if the job is ``owner``'s and fewer than ``max_tasks``
        tasks are open; await it BEFORE sending the billed POST.

        One transaction: the quota's lock (the batch row, or the account's transaction lock
        with ``across="account"``), the job's claim, the count of open tasks (jobs in
        ``intent`` or ``submitted``, of every worker, this job aside) and the intent, so the
        quota holds whatever the number of workers.

        Args:
            at: The intent's time on the caller's clock (default: the server's).

        Returns:
            True when the intent is recorded; False when the quota is full (nothing changed).

        Raises:
            ClaimLostError: The job is not claimed by ``owner``.
            JournalError: Unknown key, or a new intent is refused (see :meth:`record_intent`).
        """
        aware(at)
        if max_tasks < 1:
            raise ValueError("max_tasks must be at least 1")
        if across == "account":
            scope = "account = %s"
            lock = "SELECT pg_advisory_xact_lock(hashtextextended('emo_quota' || chr(31) || %s, 7))"
            scope_arg: object = self.account
        else:
            scope = "batch_id = %s"
            # NO KEY UPDATE: registering jobs (their foreign key's KEY SHARE) goes on meanwhile.
            lock = "SELECT 1 FROM emo_batches WHERE id = %s FOR NO KEY UPDATE"
            scope_arg = self._batch_id

        async def run(conn: Conn) -> bool:
            await conn.execute(lock.encode(), (scope_arg,))
            rows = await self._rows(
                conn,
                "SELECT phase, task_id, owner FROM emo_jobs WHERE batch_id = %s AND key = %s"
                " FOR UPDATE",
                (self._batch_id, key),
            )
            if not rows:
                raise JournalError(f"journal {self._where} has no job with key {key}")
            row = rows[0]
            phase, task_id, holder = JobPhase(row["phase"]), row["task_id"], row["owner"]
            if holder != owner:
                raise ClaimLostError(
                    f"job {key} is claimed by {holder or 'nobody'}, not {owner}; nothing was"
                    " recorded"
                )
            if phase not in INTENT_FROM:
                raise intent_refusal(key, phase, task_id)
            counted = await self._rows(
                conn,
                f"SELECT count(*) AS n FROM emo_jobs WHERE {scope} AND phase = ANY(%s)"
                " AND NOT (batch_id = %s AND key = %s)",
                (scope_arg, list(_OPEN_TASK), self._batch_id, key),
            )
            if int(counted[0]["n"]) >= max_tasks:
                return False
            await conn.execute(
                f"UPDATE emo_jobs SET {INTENT_SET}, updated_at = clock_timestamp()"
                " WHERE batch_id = %s AND key = %s".encode(),
                (at, self._batch_id, key),
            )
            return True

        return await self._tx(run, "reserving a submit")

    async def open_intents(self) -> list[OpenIntent]:
        """Every intent without a task id in the account (every batch, every worker), oldest
        first on the server's clock: the submits whose answers nobody has recorded."""
        rows = await self._fetchall(
            "SELECT b.name AS batch, j.key, j.phase, j.owner, j.intent_at, j.intent_server_at,"
            " j.lease_until FROM emo_jobs j JOIN emo_batches b ON b.id = j.batch_id"
            " WHERE j.account = %s AND j.phase IN ('intent', 'unresolved')"
            " AND j.task_id IS NULL ORDER BY j.intent_server_at NULLS FIRST, j.seq",
            (self.account,),
        )
        return [
            OpenIntent(
                batch=str(r["batch"]),
                key=str(r["key"]),
                phase=JobPhase(r["phase"]),
                owner=r["owner"],
                intent_at=_utc(r["intent_at"]),
                server_at=_utc(r["intent_server_at"]),
                lease_until=_utc(r["lease_until"]),
            )
            for r in rows
        ]

    async def server_now(self) -> _dt.datetime:
        """The database server's clock, the one leases and :class:`OpenIntent` times use."""
        rows = await self._fetchall("SELECT clock_timestamp() AS now")
        now = _utc(rows[0]["now"])
        assert now is not None
        return now


def _utc(value: _dt.datetime | None) -> _dt.datetime | None:
    return None if value is None else value.astimezone(_dt.UTC)
