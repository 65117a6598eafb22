"""Unresolved jobs in the PostgreSQL journal: the same rules as :mod:`.unresolved`, with task
ownership checked across the whole account (a task any worker recorded is nobody's candidate).

The schema's triggers keep the candidates honest whoever writes: a job leaving ``unresolved``
drops its candidates, and a task becoming some job's leaves every candidate list of the account.
Both sides take the task's transaction lock (``emo_task_lock``), so the two cannot cross.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Final

from .._exceptions import JournalError
from .postgres_base import CANDIDATE_COLUMNS, JOB_COLUMNS, Conn, PgJournalBase, candidate_of
from .postgres_base import phases as _phases
from .postgres_base import record_of as _record_of
from .records import UNRESOLVED_FROM, Candidate, JobPhase, JobRecord

__all__ = ["PgSettling"]

_ASSIGN_FROM: Final = (JobPhase.UNRESOLVED, JobPhase.INTENT)


class PgSettling(PgJournalBase):
    """The batch's unresolved jobs and their candidate tasks."""

    async def _lock_tasks(self, conn: Conn, task_ids: Sequence[str]) -> None:
        # Sorted: two writers locking overlapping sets never wait on each other in a circle.
        for task_id in sorted(set(task_ids)):
            await conn.execute("SELECT emo_task_lock(%s, %s)", (self.account, task_id))

    async def _owners(self, conn: Conn, task_ids: Sequence[str]) -> dict[str, str]:
        rows = await self._rows(
            conn,
            "SELECT task_id, key FROM emo_tasks WHERE account = %s AND task_id = ANY(%s)",
            (self.account, list(task_ids)),
        )
        return {str(r["task_id"]): str(r["key"]) for r in rows}

    async def record_unresolved(
        self, key: str, *, reason: str, candidates: Sequence[Candidate]
    ) -> None:
        """Mark a job ``unresolved`` ("may have been billed, not resent"), with why and the
        tasks that may be its; they replace its earlier candidates (see the SQLite journal).

        Raises:
            JournalError: Unknown key, the job is in another phase, or a candidate is a task
                some job of the account owns.
        """
        given = {c.task_id: c for c in candidates}
        if any(not task_id for task_id in given):
            raise ValueError("a candidate's task_id must be a non-empty string")
        ids = sorted(given)

        async def run(conn: Conn) -> None:
            cur = await conn.execute(
                "UPDATE emo_jobs SET phase = 'unresolved', reason = %s,"
                " updated_at = clock_timestamp()"
                " WHERE batch_id = %s AND key = %s AND phase = ANY(%s)",
                (str(reason), self._batch_id, key, _phases(UNRESOLVED_FROM)),
            )
            if cur.rowcount == 0:
                phase, task_id = await self._phase_of(conn, key)
                raise JournalError(
                    f"job {key} is {phase} (task {task_id}); only an intent whose answer"
                    " was lost can become unresolved"
                )
            await self._lock_tasks(conn, ids)
            owners = await self._owners(conn, ids)
            for task_id in ids:
                if task_id in owners:
                    raise JournalError(
                        f"task {task_id} is job {owners[task_id]}'s task; it cannot be a"
                        f" candidate of job {key}"
                    )
            saved = {
                str(r["task_id"]): r
                for r in await self._rows(
                    conn,
                    "SELECT DISTINCT ON (task_id) task_id, path, host, size, sha256"
                    " FROM emo_candidates WHERE account = %s AND task_id = ANY(%s)"
                    " AND path IS NOT NULL ORDER BY task_id",
                    (self.account, ids),
                )
            }
            await conn.execute(
                "DELETE FROM emo_candidates WHERE batch_id = %s AND key = %s",
                (self._batch_id, key),
            )
            rows: list[tuple[Any, ...]] = []
            for c in given.values():
                if c.path is not None:
                    file: tuple[Any, ...] = (c.path, self.host, c.size, c.sha256)
                elif c.task_id in saved:
                    s = saved[c.task_id]
                    file = (s["path"], s["host"], s["size"], s["sha256"])
                else:
                    file = (None, None, None, None)
                rows.append(
                    (
                        self._batch_id,
                        key,
                        self.account,
                        c.task_id,
                        c.created_at,
                        c.status,
                        c.video_duration,
                        c.video_url,
                        c.url_deadline,
                        *file,
                    )
                )
            if rows:
                async with conn.cursor() as cur2:
                    await cur2.executemany(
                        "INSERT INTO emo_candidates (batch_id, key, account, task_id, created_at,"
                        " status, video_duration, video_url, url_deadline, path, host, size,"
                        " sha256) VALUES (%s, %s, %s, %s, %s, %s, %s::float8, %s, %s, %s, %s,"
                        " %s::bigint, %s)",
                        rows,
                    )

        await self._tx(run, "recording an unresolved job")

    async def candidates(self, key: str | None = None) -> list[Candidate]:
        """The candidate tasks of one job of the batch, or (``key`` None) every candidate of
        the batch once, oldest first (those of unknown age last)."""
        if key is not None:
            rows = await self._fetchall(
                f"SELECT {CANDIDATE_COLUMNS} FROM emo_candidates WHERE batch_id = %s"
                " AND key = %s ORDER BY created_at IS NULL, created_at, task_id",
                (self._batch_id, key),
            )
        else:
            rows = await self._fetchall(
                f"SELECT * FROM (SELECT DISTINCT ON (task_id) {CANDIDATE_COLUMNS}"
                " FROM emo_candidates WHERE batch_id = %s ORDER BY task_id, key) c"
                " ORDER BY created_at IS NULL, created_at, task_id",
                (self._batch_id,),
            )
        return [candidate_of(row) for row in rows]

    async def record_candidate_file(
        self, task_id: str, *, path: str | os.PathLike[str], size: int, sha256: str
    ) -> None:
        """Record that an unattributed task's video was saved, on :attr:`host`, for every job
        of the account listing it.

        Raises:
            JournalError: The task is no job's candidate.
        """
        args = (os.fspath(path), self.host, int(size), sha256, self.account, task_id)

        async def run(conn: Conn) -> int:
            cur = await conn.execute(
                "UPDATE emo_candidates SET path = %s, host = %s, size = %s, sha256 = %s"
                " WHERE account = %s AND task_id = %s",
                args,
            )
            return cur.rowcount

        if await self._tx(run, f"recording the file of task {task_id}") == 0:
            raise JournalError(f"task {task_id} is no unresolved job's candidate")

    async def unresolved(self) -> list[JobRecord]:
        """Every unresolved job of the batch, in register order."""
        rows = await self._fetchall(
            f"SELECT {JOB_COLUMNS} FROM emo_jobs WHERE batch_id = %s AND phase = 'unresolved'"
            " ORDER BY seq",
            (self._batch_id,),
        )
        return [_record_of(row) for row in rows]

    async def assign(self, task_id: str, key: str) -> Candidate | None:
        """Settle a job by hand: ``task_id`` is its task (see the SQLite journal's ``assign``).

        Returns:
            The task as it was known as a candidate, or None when it was no candidate (or the
            job already had it).

        Raises:
            JournalError: Unknown key, the job is in another phase or has another task, or the
                task is another job's (of any batch of the account).
        """
        if not task_id:
            raise ValueError("task_id must be a non-empty string")

        async def run(conn: Conn) -> Candidate | None:
            rows = await self._rows(
                conn,
                "SELECT phase, task_id FROM emo_jobs WHERE batch_id = %s AND key = %s FOR UPDATE",
                (self._batch_id, key),
            )
            if not rows:
                raise JournalError(f"journal {self._where} has no job with key {key}")
            phase, current = JobPhase(rows[0]["phase"]), rows[0]["task_id"]
            if current == task_id and phase not in _ASSIGN_FROM:
                return None
            await self._lock_tasks(conn, [task_id])
            owner = (await self._owners(conn, [task_id])).get(task_id)
            if owner is not None:
                raise JournalError(
                    f"task {task_id} is already job {owner}'s; it cannot be assigned to job {key}"
                )
            if phase not in _ASSIGN_FROM:
                raise JournalError(
                    f"job {key} is {phase} (task {current}); only an unresolved job or an"
                    " open intent can be assigned a task"
                )
            found = await self._rows(
                conn,
                f"SELECT {CANDIDATE_COLUMNS} FROM emo_candidates"
                " WHERE account = %s AND task_id = %s"
                " ORDER BY (batch_id = %s AND key = %s) DESC LIMIT 1",
                (self.account, task_id, self._batch_id, key),
            )
            candidate = candidate_of(found[0]) if found else None
            created = candidate.created_at if candidate is not None else None
            await conn.execute(
                "UPDATE emo_jobs SET phase = 'submitted', task_id = %s,"
                " submitted_at = COALESCE(%s::timestamptz, clock_timestamp()),"
                " task_status = NULL, reason = NULL, updated_at = clock_timestamp()"
                " WHERE batch_id = %s AND key = %s",
                (task_id, created, self._batch_id, key),
            )
            return candidate

        return await self._tx(run, f"assigning task {task_id}")

    async def release(self, task_id: str) -> list[str]:
        """Drop a task from every candidate list of the batch (settled by hand: it is none of
        theirs); the jobs stay ``unresolved``.

        Returns:
            The keys of the jobs it was a candidate of.
        """

        async def run(conn: Conn) -> list[str]:
            rows = await self._rows(
                conn,
                "DELETE FROM emo_candidates WHERE batch_id = %s AND task_id = %s RETURNING key",
                (self._batch_id, task_id),
            )
            return sorted(str(r["key"]) for r in rows)

        return await self._tx(run, f"releasing task {task_id}")
