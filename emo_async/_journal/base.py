"""The SQLite journal's plumbing: opening (lock, checks, upgrade), closing, reads and writes on
the connection's thread, phase-checked transitions, and the detection and upload caches.

The job lifecycle is in :mod:`.sqlite` and the unresolved jobs in :mod:`.unresolved`; both build
on :class:`JournalBase`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import anyio
import anyio.to_thread

from .._exceptions import JournalCorruptError, JournalError
from .._models import Detection
from .connection import Connection, sqlite_errors
from .lock import absolute, acquire_lock
from .records import JobPhase, parse_ts, ts, utcnow
from .schema import SCHEMA_VERSION, inspect, upgrade
from .summary import JournalSummary, summarize

__all__ = ["UPLOAD_MIN_VALIDITY", "JournalBase"]

_T = TypeVar("_T")

#: An upload URL is handed out again only if it stays valid at least this long.
UPLOAD_MIN_VALIDITY: Final = _dt.timedelta(hours=1)

JOB_COLUMNS: Final = (
    "key, name, job, phase, attempts, task_id, intent_at, submitted_at, task_status, video_url,"
    " url_deadline, billed_seconds, path, size, sha256, error, updated_at, reason"
)

_Caches = tuple[
    dict[tuple[str, str], Detection],
    dict[tuple[str, str], tuple[str, _dt.datetime | None]],
    set[str],
]


class JournalBase:
    """An open SQLite journal's plumbing; :class:`~emo_async._journal.sqlite.Journal` adds the
    job lifecycle (and documents the whole).

    Attributes:
        path: The journal file.
        commit_delay: See :class:`~emo_async._journal.sqlite.Journal`.
        opened_version: The schema version the file had when it was opened (0: a new file); it
            has the current one since.
    """

    def __init__(self, path: Path, conn: Connection, lock_fd: int) -> None:
        self.path = path
        self.commit_delay = 0.0
        self._conn: Connection | None = conn
        self._lock_fd: int | None = lock_fd
        self._detections: dict[tuple[str, str], Detection] = {}
        self._uploads: dict[tuple[str, str], tuple[str, _dt.datetime | None]] = {}
        self._keys: set[str] | None = None  # None: not loaded, ask the database
        self.opened_version = 0

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else "open"
        return f"<{type(self).__name__} {str(self.path)!r} {state}>"

    @classmethod
    async def open(cls, path: str | os.PathLike[str]) -> Self:
        """Open (or create) a journal and take its lock; close it with :meth:`aclose`.

        Raises:
            JournalLockedError: Another open journal (in any process) holds the file.
            JournalCorruptError: The file is not an emo_async journal, is damaged, or is newer.
            JournalError: The file cannot be created or read.
        """
        target = await anyio.to_thread.run_sync(absolute, path)
        if not target.name:
            raise JournalError(f"journal path {os.fspath(path)!r} names no file")
        lock_fd = await anyio.to_thread.run_sync(acquire_lock, target)
        conn: Connection | None = None
        try:
            with anyio.CancelScope(shield=True):
                version = await anyio.to_thread.run_sync(inspect, target)
                try:
                    conn = await Connection.open(target)
                    caches = await conn.alone(lambda db: _setup(db, target, version))
                except sqlite3.Error as exc:
                    name = getattr(exc, "sqlite_errorname", "") or ""
                    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
                        raise JournalCorruptError(f"journal {target} is damaged ({exc})") from None
                    raise JournalError(f"cannot open journal {target}: {exc}") from None
        except BaseException:
            if conn is not None:
                with anyio.CancelScope(shield=True):
                    await conn.close()
            os.close(lock_fd)
            raise
        assert conn is not None
        journal = cls(target, conn, lock_fd)
        journal._detections, journal._uploads, journal._keys = caches
        journal.opened_version = version
        return journal

    async def aclose(self) -> None:
        """Close the database and release the lock. Safe to call twice."""
        conn, self._conn = self._conn, None
        try:
            if conn is not None:
                with anyio.CancelScope(shield=True):
                    await conn.close()
        finally:
            fd, self._lock_fd = self._lock_fd, None
            if fd is not None:
                os.close(fd)  # Closing the descriptor drops the flock.

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # ---- plumbing

    def _db(self) -> Connection:
        if self._conn is None:
            raise JournalError(f"journal {self.path} is closed")
        return self._conn

    async def _write(
        self, fn: Callable[[sqlite3.Connection], _T], doing: str, *, patient: bool = False
    ) -> _T:
        """Run ``fn`` in a transaction on the journal's thread; return once it is committed.

        Shielded: once a write is queued it runs anyway, so its caller waits to learn it did.
        ``patient``: the commit may wait up to :attr:`commit_delay` to be shared with others.
        """
        conn = self._db()
        with sqlite_errors(self.path, doing):
            return await conn.write(fn, patience=self.commit_delay if patient else 0.0)

    async def _read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        conn = self._db()
        with sqlite_errors(self.path, "reading"):
            return await conn.read(fn)

    async def _fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        args = tuple(params)
        return await self._read(lambda db: db.execute(sql, args).fetchall())

    async def _fetchone(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Row | None:
        rows = await self._fetchall(sql, params)
        return rows[0] if rows else None

    def _phase_of(self, db: sqlite3.Connection, key: str) -> tuple[JobPhase, str | None]:
        row = db.execute("SELECT phase, task_id FROM jobs WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise JournalError(f"journal {self.path} has no job with key {key}")
        return JobPhase(row[0]), row[1]

    async def _phase(self, key: str) -> tuple[JobPhase, str | None]:
        return await self._read(lambda db: self._phase_of(db, key))

    async def _transition(
        self,
        key: str,
        allowed: tuple[JobPhase, ...],
        assignments: str,
        params: Iterable[Any],
        doing: str,
        *,
        patient: bool = False,
    ) -> tuple[JobPhase, str | None] | None:
        """Run ``UPDATE jobs SET <assignments>`` if the job's phase is in ``allowed``.

        The phase check is part of the one statement, so it cannot race with another write.

        Returns:
            None when the job changed; else its ``(phase, task_id)``, read in the same call.

        Raises:
            JournalError: Unknown key.
        """
        marks = ", ".join("?" for _ in allowed)
        sql = f"UPDATE jobs SET {assignments}, updated_at = ? WHERE key = ? AND phase IN ({marks})"
        args = (*params, ts(utcnow()), key, *allowed)

        def run(db: sqlite3.Connection) -> tuple[JobPhase, str | None] | None:
            if db.execute(sql, args).rowcount > 0:
                return None
            return self._phase_of(db, key)

        return await self._write(run, doing, patient=patient)

    # ---- caches

    async def get_detection(self, image_digest: str, ratio: str) -> Detection | None:
        """The cached detection of a portrait at a ratio, or None."""
        self._db()
        return self._detections.get((image_digest, ratio))

    async def put_detection(self, image_digest: str, ratio: str, detection: Detection) -> None:
        """Cache a detection (replacing an earlier one), written with the next write."""
        args = (image_digest, ratio, json.dumps(detection.to_json()), ts(utcnow()))
        self._db().defer(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO detections (image_digest, ratio, detection, created_at)"
                " VALUES (?, ?, ?, ?)",
                args,
            )
        )
        self._detections[(image_digest, ratio)] = detection

    async def get_upload(
        self, digest: str, model: str, *, now: _dt.datetime | None = None
    ) -> str | None:
        """A cached ``oss://`` URL for this content and model still valid for an hour, or None."""
        self._db()
        hit = self._uploads.get((digest, model))
        if hit is None:
            return None
        url, expires = hit
        now = now or utcnow()
        ts(now)  # refuses a naive time
        if expires is None or expires - now < UPLOAD_MIN_VALIDITY:
            return None
        return url

    async def put_upload(
        self, digest: str, model: str, url: str, *, expires_at: _dt.datetime
    ) -> None:
        """Cache an upload URL with its expiry (replacing an earlier one), written with the next
        write."""
        args = (digest, model, url, ts(expires_at), ts(utcnow()))
        self._db().defer(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO uploads (digest, model, url, expires_at, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                args,
            )
        )
        self._uploads[(digest, model)] = (url, parse_ts(args[3]))

    # ---- summary

    async def summary(self, *, now: _dt.datetime | None = None) -> JournalSummary:
        """Counts by phase, billed seconds, failures and downloads at risk of expiry."""
        when = now or utcnow()
        conn = self._db()
        with sqlite_errors(self.path, "summarising"):
            return await conn.read(
                lambda db: summarize(db, self.path, when, version=SCHEMA_VERSION)
            )


def _setup(conn: sqlite3.Connection, path: Path, version: int) -> _Caches:
    """Set the pragmas, create, check or upgrade the schema; return the detection and upload
    caches and the job keys."""
    upgrade(conn, path, version)
    detections: dict[tuple[str, str], Detection] = {}
    for row in conn.execute("SELECT image_digest, ratio, detection FROM detections"):
        # A cache: an entry this version cannot read is detected again.
        with contextlib.suppress(ValueError, TypeError, KeyError):
            detections[(row[0], row[1])] = Detection.from_record(json.loads(row[2]))
    uploads: dict[tuple[str, str], tuple[str, _dt.datetime | None]] = {}
    for row in conn.execute("SELECT digest, model, url, expires_at FROM uploads"):
        with contextlib.suppress(ValueError, TypeError):
            uploads[(row[0], row[1])] = (str(row[2]), parse_ts(row[3]))
    keys = {str(row[0]) for row in conn.execute("SELECT key FROM jobs")}
    return detections, uploads, keys
