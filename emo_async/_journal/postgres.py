"""The PostgreSQL journal: one batch of jobs shared by several worker processes (issue 18).

The same promises as the SQLite :class:`~emo_async._journal.Journal` (see
:class:`~emo_async._journal.protocol.JournalStore`): every write is committed before it returns
and finishes even when its caller is cancelled; a phase check and its change are one statement;
refused transitions raise :class:`~emo_async.JournalError` and change nothing; a task id belongs
to at most one job, across every batch of the account. On top of them, claims
(:mod:`.postgres_claims`) let several workers share the batch without doing a job twice.

Importing this module imports psycopg: ``import emo_async`` never does.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Final

from psycopg import errors as _pg_errors

from .._exceptions import JournalError
from .._models import ErrorInfo, Job
from .postgres_base import JOB_COLUMNS, Conn, aware, phases, record_of
from .postgres_claims import INTENT_SET, Claims, intent_refusal
from .protocol import ClaimingStore, OpenIntent
from .records import (
    CLEAR_FROM,
    DONE_FROM,
    FINISHED_FROM,
    INTENT_FROM,
    SUBMITTED_FROM,
    TERMINAL_FROM,
    UNSUCCESSFUL,
    JobPhase,
    JobRecord,
    error_to_json,
    job_to_json,
)

__all__ = ["OpenIntent", "PostgresJournal"]

#: Rows per INSERT of register_many.
_INSERT_CHUNK: Final = 1000


class PostgresJournal(Claims):
    """The journal of one batch in PostgreSQL, shared by every worker that opens it.

    Open it with ``await PostgresJournal.open(dsn, batch="lessons", account=fingerprint)`` and
    close it with :meth:`aclose` (or ``async with``). Several processes (or several journals
    of one process) may have the same batch open at once: they share its jobs, and claim them
    (:meth:`claim`) so that each job has one worker at a time. Task ids, open intents and the
    detection and upload caches belong to the account: every batch of it sees them.

    Times a caller passes in (``at=``, ``now=``) are the caller's; times several processes
    compare (leases, when an intent was recorded) are the server's.

    Errors: :class:`~emo_async.JournalError` for a refused transition or an unknown key (the
    same messages as the SQLite journal), :class:`~emo_async._pg.PostgresUnavailable` when the
    server cannot be reached; a write that raised it may or may not have been committed, and
    the next call (on a fresh connection) tells.

    Attributes:
        path: Not a file: the redacted DSN, for messages.
        batch: The batch's name.
        account: The account's fingerprint.
        host: The host name recorded with each saved file.
        commit_delay: Ignored (0.0): every write commits before it returns.
    """

    # ---- jobs

    async def register(self, key: str, job: Job) -> JobRecord:
        """Add a job as ``new`` if its key is unknown in the batch; return its record
        (unchanged if it was known)."""
        text = job_to_json(job)

        async def run(conn: Conn) -> JobRecord:
            await conn.execute(
                "INSERT INTO emo_jobs (batch_id, account, key, name, job, phase)"
                " VALUES (%s, %s, %s, %s, %s::jsonb, 'new') ON CONFLICT (batch_id, key) DO NOTHING",
                (self._batch_id, self.account, key, job.display_name, text),
            )
            rows = await self._rows(
                conn,
                f"SELECT {JOB_COLUMNS} FROM emo_jobs WHERE batch_id = %s AND key = %s",
                (self._batch_id, key),
            )
            return record_of(rows[0])

        return await self._tx(run, "registering a job")

    async def register_many(self, items: Iterable[tuple[str, Job]]) -> int:
        """Register many jobs, a thousand per statement; a key already in the batch is left
        as it is (so enqueuing the same manifest twice adds nothing).

        Returns:
            How many keys were new.
        """
        added = 0
        chunk: list[tuple[str, Job]] = []

        async def flush() -> int:
            keys = [k for k, _ in chunk]
            names = [j.display_name for _, j in chunk]
            jobs = [job_to_json(j) for _, j in chunk]
            chunk.clear()

            async def run(conn: Conn) -> int:
                cur = await conn.execute(
                    "INSERT INTO emo_jobs (batch_id, account, key, name, job, phase)"
                    " SELECT %s, %s, k, n, j::jsonb, 'new'"
                    " FROM unnest(%s::text[], %s::text[], %s::text[]) WITH ORDINALITY"
                    " AS t(k, n, j, i) ORDER BY i ON CONFLICT (batch_id, key) DO NOTHING",
                    (self._batch_id, self.account, keys, names, jobs),
                )
                return max(cur.rowcount, 0)

            return await self._tx(run, "registering jobs")

        for item in items:
            chunk.append(item)
            if len(chunk) >= _INSERT_CHUNK:
                added += await flush()
        if chunk:
            added += await flush()
        return added

    async def enqueue(self, items: Iterable[tuple[str, Job]]) -> int:
        """Add a manifest's jobs to the batch, idempotently by key (see :meth:`register_many`)."""
        return await self.register_many(items)

    async def get(self, key: str) -> JobRecord | None:
        """The record of a key in this batch, or None."""
        rows = await self._fetchall(
            f"SELECT {JOB_COLUMNS} FROM emo_jobs WHERE batch_id = %s AND key = %s",
            (self._batch_id, key),
        )
        return record_of(rows[0]) if rows else None

    async def record_intent(self, key: str, *, at: _dt.datetime) -> None:
        """Commit an intent to submit; await it BEFORE sending the billed POST.

        The same rules as :meth:`Journal.record_intent <emo_async._journal.Journal.record_intent>`.
        It does not look at claims: a worker sharing the batch uses :meth:`reserve_submit`.
        """
        found = await self._transition(
            key, INTENT_FROM, INTENT_SET, (aware(at),), "recording an intent"
        )
        if found is not None:
            raise intent_refusal(key, *found)

    async def record_submitted(self, key: str, task_id: str, *, at: _dt.datetime) -> None:
        """Commit the task id of a submit (or of an adopted task); the same task again is a
        no-op.

        Raises:
            JournalError: Unknown key, the job already has another task, or the task id is
                another job's (of any batch of the account).
        """
        if not task_id:
            raise ValueError("task_id must be a non-empty string")
        try:
            found = await self._transition(
                key,
                SUBMITTED_FROM,
                "phase = 'submitted', task_id = %s, submitted_at = %s, task_status = NULL,"
                " reason = NULL",
                (task_id, aware(at)),
                f"recording task {task_id}",
            )
        except JournalError as exc:
            if not isinstance(exc.__cause__, _pg_errors.UniqueViolation):
                raise
            owner = await self.task_owner(task_id)
            raise JournalError(
                f"task {task_id} is already recorded for job {owner or '?'};"
                f" refusing to record it again for job {key}"
            ) from None
        if found is not None:
            phase, current = found
            if current == task_id:
                return
            raise JournalError(
                f"job {key} is {phase} with task {current}; refusing to record task {task_id}"
            )

    async def task_owner(self, task_id: str) -> str | None:
        """The key of the job (of any batch of the account) whose task this is, or None."""
        rows = await self._fetchall(
            "SELECT key FROM emo_tasks WHERE account = %s AND task_id = %s",
            (self.account, task_id),
        )
        return str(rows[0]["key"]) if rows else None

    async def record_status(self, key: str, status: str) -> None:
        """Record the last status seen for a submitted job's task; ignored once it ended.

        Raises:
            JournalError: Unknown key, or the job has no task yet.
        """
        found = await self._transition(
            key, (JobPhase.SUBMITTED,), "task_status = %s", (str(status),), "recording a status"
        )
        if found is not None and found[0] in (
            JobPhase.NEW,
            JobPhase.INTENT,
            JobPhase.UNRESOLVED,
        ):
            raise JournalError(f"job {key} is {found[0]}: it has no task to have a status")

    async def record_finished(
        self,
        key: str,
        *,
        video_url: str,
        url_deadline: _dt.datetime | None,
        billed_seconds: float | None,
    ) -> None:
        """Record that the task SUCCEEDED: its video URL, the URL's deadline, billed seconds."""
        found = await self._transition(
            key,
            FINISHED_FROM,
            "phase = 'finished', task_status = 'SUCCEEDED', video_url = %s,"
            " url_deadline = %s, billed_seconds = COALESCE(%s::float8, billed_seconds)",
            (video_url, aware(url_deadline), billed_seconds),
            "recording a finished task",
        )
        if found is not None:
            raise JournalError(f"job {key} is {found[0]}; it cannot be marked finished")

    async def record_done(
        self,
        key: str,
        *,
        path: str,
        size: int,
        sha256: str,
        billed_seconds: float | None = None,
        host: str | None = None,
    ) -> None:
        """Record the verified video file, and the host it is on (default :attr:`host`)."""
        found = await self._transition(
            key,
            DONE_FROM,
            "phase = 'done', path = %s, host = %s, size = %s, sha256 = %s, error = NULL,"
            " billed_seconds = COALESCE(%s::float8, billed_seconds)",
            (os.fspath(path), host or self.host, int(size), sha256, billed_seconds),
            "recording a download",
        )
        if found is not None:
            raise JournalError(f"job {key} is {found[0]}; it cannot be marked done")

    async def record_terminal(
        self,
        key: str,
        phase: JobPhase,
        *,
        error: ErrorInfo | None = None,
        billed_seconds: float | None = None,
    ) -> None:
        """Record that a job ended without a video: failed, rejected, expired or cancelled."""
        phase = JobPhase(phase)
        if phase not in UNSUCCESSFUL:
            raise ValueError(f"record_terminal takes one of {[str(p) for p in UNSUCCESSFUL]}")
        found = await self._transition(
            key,
            TERMINAL_FROM,
            "phase = %s, error = %s::jsonb, billed_seconds = COALESCE(%s::float8, billed_seconds)",
            (str(phase), error_to_json(error), billed_seconds),
            f"recording {phase}",
        )
        if found is not None:
            raise JournalError(f"job {key} is {found[0]}; it cannot be marked {phase}")

    async def clear_intent(self, key: str) -> None:
        """Reconciled as "no task was created": back to ``new`` so a resubmit is allowed."""
        found = await self._transition(
            key,
            CLEAR_FROM,
            "phase = 'new', intent_at = NULL, intent_server_at = NULL, reason = NULL",
            (),
            "clearing",
        )
        if found is not None and found[0] is not JobPhase.NEW:
            raise JournalError(
                f"job {key} is {found[0]}; only an intent or an unresolved job can be cleared"
            )

    async def record_file_missing(self, key: str, *, now: _dt.datetime | None = None) -> JobPhase:
        """A ``done`` job's file is gone: back to ``finished`` while its URL may still work,
        else ``expired`` (see the SQLite journal). ``now`` defaults to the server's clock.

        Returns:
            The job's new phase.
        """
        expired = error_to_json(
            ErrorInfo(
                kind="ResultExpiredError",
                message="the saved video is missing and its URL has expired",
            )
        )
        usable = (
            "video_url IS NOT NULL AND (url_deadline IS NULL"
            " OR url_deadline > COALESCE(%s::timestamptz, clock_timestamp()))"
        )
        stamp = aware(now)
        found = await self._transition(
            key,
            (JobPhase.DONE,),
            f"phase = CASE WHEN {usable} THEN 'finished' ELSE 'expired' END,"
            f" error = CASE WHEN {usable} THEN NULL ELSE %s::jsonb END,"
            " path = NULL, host = NULL, size = NULL, sha256 = NULL",
            (stamp, stamp, expired),
            "recording a missing file",
        )
        if found is not None:
            raise JournalError(f"job {key} is {found[0]}, not done; its file cannot be missing")
        rec = await self.get(key)
        assert rec is not None
        return rec.phase

    async def reset_expired(self, key: str) -> None:
        """Reopen an ``expired`` job as ``new``: call only when the user asked to pay again."""
        found = await self._transition(
            key,
            (JobPhase.EXPIRED,),
            "phase = 'new', billed_earlier = billed_earlier + COALESCE(billed_seconds, 0),"
            " billed_seconds = NULL, task_id = NULL, intent_at = NULL, intent_server_at = NULL,"
            " submitted_at = NULL, task_status = NULL, video_url = NULL, url_deadline = NULL,"
            " path = NULL, host = NULL, size = NULL, sha256 = NULL, error = NULL, reason = NULL",
            (),
            "resetting an expired job",
        )
        if found is not None:
            raise JournalError(f"job {key} is {found[0]}, not expired; it cannot be reset")

    async def unfinished(self) -> list[JobRecord]:
        """Every record of the batch not yet terminal, in register order (claimed or not)."""
        open_phases = phases(p for p in JobPhase if not p.is_terminal)
        return [rec async for rec in self._pages("AND phase = ANY(%s)", (open_phases,))]

    async def records(self) -> AsyncIterator[JobRecord]:
        """Every record of the batch, in register order, fetched a page at a time."""
        async for rec in self._pages("", ()):
            yield rec

    async def known_task_ids(self) -> set[str]:
        """Every task id that is or was a job's task, in every batch of the account and by
        every worker: none of them may be adopted by another job."""
        rows = await self._fetchall(
            "SELECT task_id FROM emo_tasks WHERE account = %s", (self.account,)
        )
        return {str(row["task_id"]) for row in rows}

    async def host_of(self, key: str) -> tuple[str | None, str | None]:
        """``(host, path)`` of a done job's file (None, None when it has none)."""
        rows = await self._fetchall(
            "SELECT host, path FROM emo_jobs WHERE batch_id = %s AND key = %s",
            (self._batch_id, key),
        )
        return (rows[0]["host"], rows[0]["path"]) if rows else (None, None)


if TYPE_CHECKING:

    def _is_a_claiming_store(journal: PostgresJournal) -> ClaimingStore:
        # mypy checks every signature of both protocols here.
        return journal
