"""The SQLite journal: what was asked, what was sent, what came back.

A crashed or interrupted batch resumes from here without paying twice. The journal is one SQLite
file in WAL mode with ``synchronous=FULL``: every ``record_*`` call is committed (and fsynced)
before it returns, so an intent awaited before the billed POST survives a SIGKILL or a power cut.
Besides the jobs it caches detections (per portrait and ratio) and upload URLs (per content and
model, with their expiry).

One process at a time: :func:`open_journal` takes an exclusive ``flock`` on ``<journal>.lock``
(see :mod:`.lock`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import sqlite3
from collections.abc import AsyncIterator, Iterable
from typing import Any, Final

from .._exceptions import JournalError
from .._models import ErrorInfo, Job
from .base import JOB_COLUMNS
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
    job_from_json,
    job_to_json,
    opt_ts,
    parse_ts,
    ts,
    utcnow,
)
from .unresolved import Settling

__all__ = ["Journal", "open_journal"]

_PAGE_SIZE: Final = 500
# Rows per multi-row INSERT; 9 parameters each stays far below SQLITE_MAX_VARIABLE_NUMBER.
_INSERT_CHUNK: Final = 500


class Journal(Settling):
    """An open journal. Get one from :func:`open_journal` (or ``await Journal.open(path)``).

    Every ``record_*`` method commits before it returns, and finishes its write even when the
    awaiting task is cancelled. Methods raise :class:`JournalError` for an unknown key or a
    transition that would lose information (a ``done`` job never moves back; a job with a task
    never gets a second intent unless it ended without a video).

    The journal's lock makes this process its only writer, so what it already knows is kept in
    memory rather than queried again: the detection and upload caches, and which keys exist.
    Writes that need no commit of their own (a cache entry, a job that has cost nothing yet) are
    made with the next write; every other write is committed before its method returns.

    Attributes:
        path: The journal file.
        commit_delay: Seconds that :meth:`record_finished`, :meth:`record_done` and
            :meth:`record_terminal` may wait, before committing, for other writes to share
            their commit (and its fsync); they still return only once committed. 0 (the
            default) commits at once; a batch raises it while it runs, where writes come every
            few tens of milliseconds. Intents and task ids never wait.
        opened_version: The schema version the file had when it was opened (0: a new file);
            an older file is upgraded on opening.
    """

    # ---- jobs

    async def register(self, key: str, job: Job) -> JobRecord:
        """Add a job as ``new`` if its key is unknown; return its record (unchanged if known).

        A new job is written with the journal's next write (at the latest with its intent, in
        the same transaction): until then nothing has been spent on it, so it needs no commit
        of its own.
        """
        conn = self._db()
        now = ts(utcnow())
        text = job_to_json(job)
        args = (key, job.display_name, text, JobPhase.NEW, now, now)
        sql = (
            "INSERT OR IGNORE INTO jobs (key, name, job, phase, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?)"
        )
        keys = self._keys
        if keys is not None and key not in keys:
            conn.defer(lambda db: db.execute(sql, args))
            keys.add(key)
            updated = parse_ts(now)
            assert updated is not None
            # What reading the row back would give (the job as its JSON says).
            return JobRecord(
                key=key,
                name=job.display_name,
                phase=JobPhase.NEW,
                job=job_from_json(text),
                updated_at=updated,
            )

        def run(db: sqlite3.Connection) -> JobRecord:
            db.execute(sql, args)
            row = db.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE key = ?", (key,)).fetchone()
            return JobRecord.from_row(row)

        record = await self._write(run, "registering a job")
        if keys is not None:
            keys.add(key)
        return record

    async def register_many(self, items: Iterable[tuple[str, Job]]) -> int:
        """Register many jobs with few commits (a manifest of thousands at start-up).

        Returns:
            How many keys were new.
        """
        now = ts(utcnow())
        added = 0
        batch: list[tuple[str, Job]] = []

        async def flush() -> int:
            values = ", ".join("(?, ?, ?, ?, ?, ?)" for _ in batch)
            params: list[Any] = []
            for key, job in batch:
                params += [key, job.display_name, job_to_json(job), JobPhase.NEW, now, now]
            batch.clear()
            sql = (
                "INSERT OR IGNORE INTO jobs (key, name, job, phase, created_at, updated_at)"
                f" VALUES {values}"
            )
            return await self._write(
                lambda db: db.execute(sql, params).rowcount, "registering jobs"
            )

        keys = self._keys
        for item in items:
            batch.append(item)
            if keys is not None:
                keys.add(item[0])
            if len(batch) >= _INSERT_CHUNK:
                added += await flush()
        if batch:
            added += await flush()
        return added

    async def get(self, key: str) -> JobRecord | None:
        """The record of a key, or None."""
        row = await self._fetchone(f"SELECT {JOB_COLUMNS} FROM jobs WHERE key = ?", (key,))
        return None if row is None else JobRecord.from_row(row)

    async def record_intent(self, key: str, *, at: _dt.datetime) -> None:
        """Commit an intent to submit; await it BEFORE sending the billed POST.

        Allowed from ``new``, ``intent`` (a deliberate resubmit), ``failed``, ``rejected`` and
        ``cancelled`` (a deliberate retry, which starts a fresh attempt). Not from ``expired``:
        that video was paid for, and only :meth:`reset_expired` (the user asked to pay again)
        opens it to a new attempt; nor from ``unresolved``: it may have been billed, and only
        proof of absence (:meth:`clear_intent`) reopens it. ``attempts`` goes up by one.

        Raises:
            JournalError: Unknown key, or the job has a live task, a video, a paid video whose
                URL expired, or may have been billed already (a second submit would pay twice).
        """
        found = await self._transition(
            key,
            INTENT_FROM,
            "phase = ?, attempts = attempts + 1, intent_at = ?,"
            " billed_earlier = billed_earlier + COALESCE(billed_seconds, 0),"
            " billed_seconds = NULL, task_id = NULL, submitted_at = NULL, task_status = NULL,"
            " video_url = NULL, url_deadline = NULL, path = NULL, size = NULL, sha256 = NULL,"
            " error = NULL, reason = NULL",
            (JobPhase.INTENT, ts(at)),
            "recording an intent",
        )
        if found is not None:
            phase, task_id = found
            if phase is JobPhase.EXPIRED:
                raise JournalError(
                    f"job {key} is expired: its video (task {task_id}) was paid for and its URL"
                    " ran out; refusing a new intent unless the job is reset (reset_expired)"
                )
            if phase is JobPhase.UNRESOLVED:
                raise JournalError(
                    f"job {key} is unresolved: its earlier submit may have been billed;"
                    " refusing a new intent until it is settled (adopted, assigned, or proven"
                    " absent)"
                )
            raise JournalError(
                f"job {key} is {phase} (task {task_id}); refusing a second intent, which"
                " would pay twice"
            )

    async def record_submitted(self, key: str, task_id: str, *, at: _dt.datetime) -> None:
        """Commit the task id of a submit (or of a task adopted by reconciliation).

        Allowed from ``intent``, ``new`` and ``unresolved`` (a candidate proven ours; its
        candidate list goes, and the task leaves every other job's list too); recording the
        same task id again is a no-op.

        Raises:
            JournalError: Unknown key, the job already has another task, or the task id
                belongs to another job.
        """
        if not task_id:
            raise ValueError("task_id must be a non-empty string")
        try:
            found = await self._transition(
                key,
                SUBMITTED_FROM,
                "phase = ?, task_id = ?, submitted_at = ?, task_status = NULL, reason = NULL",
                (JobPhase.SUBMITTED, task_id, ts(at)),
                f"recording task {task_id}",
            )
        except JournalError as exc:
            # The task history's primary key: one task never belongs to two jobs (or attempts).
            if not isinstance(exc.__cause__, sqlite3.IntegrityError):
                raise
            owner = await self._fetchone("SELECT key FROM tasks WHERE task_id = ?", (task_id,))
            raise JournalError(
                f"task {task_id} is already recorded for job {owner[0] if owner else '?'};"
                f" refusing to record it again for job {key}"
            ) from None
        if found is not None:
            phase, current = found
            if current == task_id:
                return
            raise JournalError(
                f"job {key} is {phase} with task {current}; refusing to record task {task_id}"
            )

    async def record_status(self, key: str, status: str) -> None:
        """Record the last status seen for a submitted job's task (not a phase change).

        A status arriving after the job finished or ended is ignored.

        Raises:
            JournalError: Unknown key, or the job has no task yet.
        """
        found = await self._transition(
            key, (JobPhase.SUBMITTED,), "task_status = ?", (str(status),), "recording a status"
        )
        if found is not None:
            phase, _ = found
            if phase in (JobPhase.NEW, JobPhase.INTENT, JobPhase.UNRESOLVED):
                raise JournalError(f"job {key} is {phase}: it has no task to have a status")

    async def record_finished(
        self,
        key: str,
        *,
        video_url: str,
        url_deadline: _dt.datetime | None,
        billed_seconds: float | None,
    ) -> None:
        """Record that the task SUCCEEDED: its video URL, the URL's deadline, billed seconds.

        Raises:
            JournalError: Unknown key, or the job is not submitted (or finished).
        """
        found = await self._transition(
            key,
            FINISHED_FROM,
            "phase = ?, task_status = 'SUCCEEDED', video_url = ?, url_deadline = ?,"
            " billed_seconds = COALESCE(?, billed_seconds)",
            (JobPhase.FINISHED, video_url, opt_ts(url_deadline), billed_seconds),
            "recording a finished task",
            patient=True,
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
    ) -> None:
        """Record the verified video file: the job is done.

        Allowed from ``submitted``, ``finished``, ``expired`` (saved after all) and ``done``.

        Raises:
            JournalError: Unknown key, or the job has no task or ended without a video.
        """
        found = await self._transition(
            key,
            DONE_FROM,
            "phase = ?, path = ?, size = ?, sha256 = ?, error = NULL,"
            " billed_seconds = COALESCE(?, billed_seconds)",
            (JobPhase.DONE, os.fspath(path), int(size), sha256, billed_seconds),
            "recording a download",
            patient=True,
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
        """Record that a job ended without a video: failed, rejected, expired or cancelled.

        Raises:
            ValueError: ``phase`` is not one of those four.
            JournalError: Unknown key, or the job is done (a done job never moves back) or
                unresolved (its earlier submit may have been billed: a failed job could be
                sent again).
        """
        phase = JobPhase(phase)
        if phase not in UNSUCCESSFUL:
            raise ValueError(f"record_terminal takes one of {[str(p) for p in UNSUCCESSFUL]}")
        found = await self._transition(
            key,
            TERMINAL_FROM,
            "phase = ?, error = ?, billed_seconds = COALESCE(?, billed_seconds)",
            (phase, error_to_json(error), billed_seconds),
            f"recording {phase}",
            patient=True,
        )
        if found is not None:
            raise JournalError(f"job {key} is {found[0]}; it cannot be marked {phase}")

    async def clear_intent(self, key: str) -> None:
        """Reconciled as "no task was created": back to ``new`` so a resubmit is allowed.

        Allowed from ``intent`` and ``unresolved`` (proof of absence came later; the job's
        candidates go); a ``new`` job stays as it is.

        Raises:
            JournalError: Unknown key, or the job is past its intent (it has a task).
        """
        found = await self._transition(
            key,
            CLEAR_FROM,
            "phase = ?, intent_at = NULL, reason = NULL",
            (JobPhase.NEW,),
            "clearing",
        )
        if found is not None and found[0] is not JobPhase.NEW:
            raise JournalError(
                f"job {key} is {found[0]}; only an intent or an unresolved job can be cleared"
            )

    async def record_file_missing(self, key: str, *, now: _dt.datetime | None = None) -> JobPhase:
        """A ``done`` job's file is gone: the one sanctioned step back from ``done``.

        The job goes back to ``finished`` (download again, nothing to pay) while its video URL
        may still work (its deadline is in the future or unknown), else to ``expired``, where
        it stays: that video was paid for, and a new intent is refused until
        :meth:`reset_expired` (the user asked to pay again). It never becomes ``new`` here.

        Returns:
            The job's new phase: ``JobPhase.FINISHED`` or ``JobPhase.EXPIRED``.

        Raises:
            JournalError: Unknown key, or the job is not done.
        """
        expired = ErrorInfo(
            kind="ResultExpiredError",
            message="the saved video is missing and its URL has expired",
        )
        stamp = ts(now or utcnow())
        found = await self._transition(
            key,
            (JobPhase.DONE,),
            "phase = CASE WHEN video_url IS NOT NULL"
            " AND (url_deadline IS NULL OR url_deadline > ?) THEN ? ELSE ? END,"
            " error = CASE WHEN video_url IS NOT NULL"
            " AND (url_deadline IS NULL OR url_deadline > ?) THEN NULL ELSE ? END,"
            " path = NULL, size = NULL, sha256 = NULL",
            (stamp, JobPhase.FINISHED, JobPhase.EXPIRED, stamp, error_to_json(expired)),
            "recording a missing file",
        )
        if found is not None:
            raise JournalError(f"job {key} is {found[0]}, not done; its file cannot be missing")
        phase, _ = await self._phase(key)
        return phase

    async def reset_expired(self, key: str) -> None:
        """Reopen an ``expired`` job as ``new``: call only when the user asked to pay again.

        The seconds billed for the lost video stay in the journal's total; the task stays in
        its history (:meth:`known_task_ids`).

        Raises:
            JournalError: Unknown key, or the job is not expired.
        """
        found = await self._transition(
            key,
            (JobPhase.EXPIRED,),
            "phase = ?, billed_earlier = billed_earlier + COALESCE(billed_seconds, 0),"
            " billed_seconds = NULL, task_id = NULL, intent_at = NULL, submitted_at = NULL,"
            " task_status = NULL, video_url = NULL, url_deadline = NULL, path = NULL,"
            " size = NULL, sha256 = NULL, error = NULL, reason = NULL",
            (JobPhase.NEW,),
            "resetting an expired job",
        )
        if found is not None:
            raise JournalError(f"job {key} is {found[0]}, not expired; it cannot be reset")

    async def unfinished(self) -> list[JobRecord]:
        """Every record not yet terminal (new, intent, unresolved, submitted, finished), in
        register order. An unresolved job is listed so a later run tries to settle it; it is
        never ``new``, so nothing sends it again by accident."""
        open_phases = [p for p in JobPhase if not p.is_terminal]
        marks = ", ".join("?" for _ in open_phases)
        rows = await self._fetchall(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE phase IN ({marks}) ORDER BY seq",
            open_phases,
        )
        return [JobRecord.from_row(row) for row in rows]

    async def records(self) -> AsyncIterator[JobRecord]:
        """Every record, in register order, fetched a page at a time."""
        last = 0
        while True:
            rows = await self._fetchall(
                f"SELECT seq, {JOB_COLUMNS} FROM jobs WHERE seq > ? ORDER BY seq LIMIT ?",
                (last, _PAGE_SIZE),
            )
            for row in rows:
                yield JobRecord.from_row(row)
            if len(rows) < _PAGE_SIZE:
                return
            last = rows[-1]["seq"]

    async def known_task_ids(self) -> set[str]:
        """Every task id that is or was a job's task in this journal (earlier attempts
        included): none of them may be adopted by another job. Candidate tasks of unresolved
        jobs are not in it: they are exactly the ones nobody owns yet."""
        rows = await self._fetchall(
            "SELECT task_id FROM tasks UNION SELECT task_id FROM jobs WHERE task_id IS NOT NULL"
        )
        return {row[0] for row in rows}


@contextlib.asynccontextmanager
async def open_journal(path: str | os.PathLike[str]) -> AsyncIterator[Journal]:
    """Open (or create) the journal at ``path``, holding its lock until the block ends.

    Missing parent directories are created. See :meth:`Journal.open` for the errors.
    """
    journal = await Journal.open(path)
    try:
        yield journal
    finally:
        await journal.aclose()
