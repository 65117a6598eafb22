"""Unresolved jobs: a submit whose answer was lost, that nothing proves either ours-and-created
or absent. It may have been billed, so it is never sent again without proof; the journal keeps
why, and the unattributed tasks that may be its (its candidates), until a later run or a person
settles it.

Settling moves it on: a candidate proven its (``record_submitted``, or :meth:`Settling.assign` by
hand) makes it ``submitted``; proof that no task exists (``clear_intent``) makes it ``new``. The
schema's triggers drop a job's candidates when it leaves ``unresolved``, and a task from every
candidate list once it is some job's task.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from typing import Final

from .._exceptions import JournalError
from .base import JOB_COLUMNS, JournalBase
from .connection import atomic
from .records import UNRESOLVED_FROM, Candidate, JobPhase, JobRecord, opt_ts, ts, utcnow

__all__ = ["Settling"]

_CANDIDATE_COLUMNS: Final = (
    "key, task_id, created_at, status, video_duration, video_url, url_deadline, path, size, sha256"
)
# Settled by hand: a job whose answer was lost, or one that is still an open intent.
_ASSIGN_FROM: Final = (JobPhase.UNRESOLVED, JobPhase.INTENT)


class Settling(JournalBase):
    """The journal's unresolved jobs and their candidate tasks."""

    async def record_unresolved(
        self, key: str, *, reason: str, candidates: Sequence[Candidate]
    ) -> None:
        """Mark a job ``unresolved`` ("may have been billed, not resent"), with why and the
        tasks that may be its; they replace the job's earlier candidates.

        Allowed from ``intent`` (its intent time is kept: it bounds the window the answer was
        lost in) and ``unresolved`` (a later look). A file already saved for a candidate task
        stays recorded when the candidate given has none.

        Raises:
            JournalError: Unknown key, the job is in another phase, or a candidate is a task
                some job of this journal owns (an owned task is nobody's candidate).
        """
        given = {c.task_id: c for c in candidates}  # a task listed twice is one candidate
        if any(not task_id for task_id in given):
            raise ValueError("a candidate's task_id must be a non-empty string")
        marks = ", ".join("?" for _ in UNRESOLVED_FROM)
        update = (
            f"UPDATE jobs SET phase = ?, reason = ?, updated_at = ? WHERE key = ?"
            f" AND phase IN ({marks})"
        )
        update_args = (JobPhase.UNRESOLVED, str(reason), ts(utcnow()), key, *UNRESOLVED_FROM)

        def run(db: sqlite3.Connection) -> None:
            with atomic(db):
                if db.execute(update, update_args).rowcount == 0:
                    phase, task_id = self._phase_of(db, key)
                    raise JournalError(
                        f"job {key} is {phase} (task {task_id}); only an intent whose answer"
                        " was lost can become unresolved"
                    )
                files: dict[str, tuple[str, int | None, str | None]] = {}
                for task_id in given:
                    owner = db.execute(
                        "SELECT key FROM tasks WHERE task_id = ?", (task_id,)
                    ).fetchone()
                    if owner is not None:
                        raise JournalError(
                            f"task {task_id} is job {owner[0]}'s task; it cannot be a candidate"
                            f" of job {key}"
                        )
                    saved = db.execute(
                        "SELECT path, size, sha256 FROM candidates"
                        " WHERE task_id = ? AND path IS NOT NULL LIMIT 1",
                        (task_id,),
                    ).fetchone()
                    if saved is not None:
                        files[task_id] = (saved[0], saved[1], saved[2])
                db.execute("DELETE FROM candidates WHERE key = ?", (key,))
                for c in given.values():
                    path, size, sha256 = (
                        (c.path, c.size, c.sha256)
                        if c.path is not None
                        else files.get(c.task_id, (None, None, None))
                    )
                    db.execute(
                        f"INSERT INTO candidates ({_CANDIDATE_COLUMNS})"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            key,
                            c.task_id,
                            opt_ts(c.created_at),
                            c.status,
                            c.video_duration,
                            c.video_url,
                            opt_ts(c.url_deadline),
                            path,
                            size,
                            sha256,
                        ),
                    )

        await self._write(run, "recording an unresolved job")

    async def candidates(self, key: str | None = None) -> list[Candidate]:
        """The candidate tasks of one job, or (``key`` None) every unattributed task once,
        oldest first (those of unknown age last)."""
        if key is not None:
            rows = await self._fetchall(
                f"SELECT {_CANDIDATE_COLUMNS} FROM candidates WHERE key = ?"
                " ORDER BY created_at IS NULL, created_at, task_id",
                (key,),
            )
        else:
            # A task may be a candidate of several jobs (their windows overlap): listed once,
            # the first row of it being as good as any (the file columns are kept in step).
            rows = await self._fetchall(
                f"SELECT {_CANDIDATE_COLUMNS} FROM candidates WHERE rowid IN"
                " (SELECT MIN(rowid) FROM candidates GROUP BY task_id)"
                " ORDER BY created_at IS NULL, created_at, task_id"
            )
        return [Candidate.from_row(row) for row in rows]

    async def record_candidate_file(
        self, task_id: str, *, path: str | os.PathLike[str], size: int, sha256: str
    ) -> None:
        """Record that an unattributed task's video was saved (``<out>/.unattributed/<task>.mp4``):
        a paid video is kept even when nobody can tell whose it is.

        Raises:
            JournalError: The task is no job's candidate.
        """
        args = (os.fspath(path), int(size), sha256, task_id)

        def run(db: sqlite3.Connection) -> int:
            return db.execute(
                "UPDATE candidates SET path = ?, size = ?, sha256 = ? WHERE task_id = ?", args
            ).rowcount

        if await self._write(run, f"recording the file of task {task_id}") == 0:
            raise JournalError(f"task {task_id} is no unresolved job's candidate")

    async def unresolved(self) -> list[JobRecord]:
        """Every unresolved job, in register order."""
        rows = await self._fetchall(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE phase = ? ORDER BY seq",
            (JobPhase.UNRESOLVED,),
        )
        return [JobRecord.from_row(row) for row in rows]

    async def assign(self, task_id: str, key: str) -> Candidate | None:
        """Settle a job by hand: ``task_id`` is its task. The job becomes ``submitted`` with it
        (a later run polls and downloads it) and its candidates go; the task leaves every other
        job's candidate list.

        Allowed from ``unresolved`` and ``intent``; assigning a job its own task again is a
        no-op (returns None).

        Returns:
            The task as it was known as a candidate (with the file saved for it, if any, so the
            caller can put that video in place), or None when it was no candidate.

        Raises:
            JournalError: Unknown key, the job is in another phase or has another task, or the
                task is another job's.
        """
        if not task_id:
            raise ValueError("task_id must be a non-empty string")
        marks = ", ".join("?" for _ in _ASSIGN_FROM)

        def run(db: sqlite3.Connection) -> Candidate | None:
            with atomic(db):
                phase, current = self._phase_of(db, key)
                if current == task_id and phase not in _ASSIGN_FROM:
                    return None
                owner = db.execute("SELECT key FROM tasks WHERE task_id = ?", (task_id,))
                row = owner.fetchone()
                if row is not None:
                    raise JournalError(
                        f"task {task_id} is already job {row[0]}'s; it cannot be assigned to"
                        f" job {key}"
                    )
                if phase not in _ASSIGN_FROM:
                    raise JournalError(
                        f"job {key} is {phase} (task {current}); only an unresolved job or an"
                        " open intent can be assigned a task"
                    )
                found = db.execute(
                    f"SELECT {_CANDIDATE_COLUMNS} FROM candidates WHERE task_id = ?"
                    " ORDER BY key = ? DESC LIMIT 1",
                    (task_id, key),
                ).fetchone()
                candidate = None if found is None else Candidate.from_row(found)
                created = candidate.created_at if candidate is not None else None
                db.execute(
                    "UPDATE jobs SET phase = ?, task_id = ?, submitted_at = ?,"
                    f" task_status = NULL, reason = NULL, updated_at = ? WHERE key = ?"
                    f" AND phase IN ({marks})",
                    (
                        JobPhase.SUBMITTED,
                        task_id,
                        ts(created or utcnow()),
                        ts(utcnow()),
                        key,
                        *_ASSIGN_FROM,
                    ),
                )
                return candidate

        return await self._write(run, f"assigning task {task_id}")

    async def release(self, task_id: str) -> list[str]:
        """Drop a task from every job's candidate list (settled by hand: it is none of theirs).

        The jobs stay ``unresolved``, with or without other candidates: that the task is not
        theirs does not prove that no task of theirs exists.

        Returns:
            The keys of the jobs it was a candidate of (empty when it was nobody's).
        """

        def run(db: sqlite3.Connection) -> list[str]:
            with atomic(db):
                keys = [
                    str(row[0])
                    for row in db.execute(
                        "SELECT key FROM candidates WHERE task_id = ? ORDER BY key", (task_id,)
                    )
                ]
                db.execute("DELETE FROM candidates WHERE task_id = ?", (task_id,))
            return keys

        return await self._write(run, f"releasing task {task_id}")
