"""The durable batch journal: what was asked, what was sent, what came back.

A crashed or interrupted batch resumes from here without paying twice. The journal is one SQLite
file in WAL mode with ``synchronous=FULL``: every ``record_*`` call is a single statement that is
committed (and fsynced) before it returns, so an intent awaited before the billed POST survives a
SIGKILL or a power cut. Besides the jobs it caches detections (per portrait and ratio) and upload
URLs (per content and model, with their expiry).

One process at a time: ``open_journal`` takes an exclusive ``flock`` on ``<journal>.lock``, which
the kernel drops when the process dies, so a killed batch never leaves a stale lock behind.
:func:`read_summary` reads a journal without that lock, for ``emo-async status`` while a batch runs.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import enum
import errno
import fcntl
import hashlib
import json
import os
import sqlite3
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Final

import aiosqlite
import anyio
import anyio.to_thread
import attrs

from ._exceptions import JournalCorruptError, JournalError, JournalLockedError
from ._models import Detection, ErrorInfo, Job

__all__ = [
    "SCHEMA_NAME",
    "SCHEMA_VERSION",
    "JobPhase",
    "JobRecord",
    "Journal",
    "JournalSummary",
    "job_key",
    "open_journal",
    "read_summary",
]

SCHEMA_NAME: Final = "emo_async.journal"
SCHEMA_VERSION: Final = 1

#: An upload URL is handed out again only if it stays valid at least this long.
UPLOAD_MIN_VALIDITY: Final = _dt.timedelta(hours=1)
#: A finished video whose URL runs out within this window is reported as at risk.
AT_RISK_WINDOW: Final = _dt.timedelta(hours=2)

_PAGE_SIZE: Final = 500
# Rows per multi-row INSERT; 9 parameters each stays far below SQLITE_MAX_VARIABLE_NUMBER.
_INSERT_CHUNK: Final = 500
_SQLITE_MAGIC: Final = b"SQLite format 3\x00"
_BUSY_TIMEOUT_MS: Final = 10_000


class JobPhase(enum.StrEnum):
    """The journal's view of a job's life (see the lifecycle in DESIGN.md).

    ``new``: known, nothing spent. ``intent``: an intent was committed; the submit may or may not
    have been sent or answered. ``submitted``: the task id is known, the task is not finished.
    ``finished``: the task SUCCEEDED and its video URL is known, not yet downloaded. The rest
    (``done``, ``failed``, ``rejected``, ``expired``, ``cancelled``) are terminal.
    """

    NEW = "new"
    INTENT = "intent"
    SUBMITTED = "submitted"
    FINISHED = "finished"
    DONE = "done"
    FAILED = "failed"
    REJECTED = "rejected"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        """Whether the job has ended (with or without a video)."""
        return self in _TERMINAL


_TERMINAL: Final = frozenset(
    {JobPhase.DONE, JobPhase.FAILED, JobPhase.REJECTED, JobPhase.EXPIRED, JobPhase.CANCELLED}
)
_UNSUCCESSFUL: Final = (JobPhase.FAILED, JobPhase.REJECTED, JobPhase.EXPIRED, JobPhase.CANCELLED)

# Where each transition may start. A phase not listed is refused with a JournalError, except the
# idempotent repeats each method handles explicitly.
_INTENT_FROM: Final = (JobPhase.NEW, JobPhase.INTENT, *_UNSUCCESSFUL)
_SUBMITTED_FROM: Final = (JobPhase.NEW, JobPhase.INTENT)
_FINISHED_FROM: Final = (JobPhase.SUBMITTED, JobPhase.FINISHED)
_DONE_FROM: Final = (JobPhase.SUBMITTED, JobPhase.FINISHED, JobPhase.EXPIRED, JobPhase.DONE)
_TERMINAL_FROM: Final = tuple(p for p in JobPhase if p is not JobPhase.DONE)


# --------------------------------------------------------------------------------------------
# Keys and conversions.


def job_key(job: Job, *, image_digest: str, audio_digest: str, ratio: str) -> str:
    """A stable key for a job: the same manifest gives the same keys, run after run.

    Args:
        job: The job.
        image_digest: A hash of the portrait's content (or of its URL, for remote inputs).
        audio_digest: The same for the audio.
        ratio: The ratio the job runs with (``job.ratio`` or the batch default).

    Returns:
        The SHA-256 hex digest of a canonical JSON of the digests, style, ratio, boxes and name.
    """
    canonical = {
        "v": 1,
        "image": image_digest,
        "audio": audio_digest,
        "style_level": job.style_level,
        "ratio": ratio,
        "face_bbox": list(job.face_bbox) if job.face_bbox is not None else None,
        "ext_bbox": list(job.ext_bbox) if job.ext_bbox is not None else None,
        # The effective name: it decides the output file, so two jobs writing different files
        # are different jobs even when their inputs match.
        "name": job.display_name,
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _job_to_json(job: Job) -> str:
    data = {
        "image": str(job.image),
        "audio": str(job.audio),
        "name": job.name,
        "style_level": job.style_level,
        "ratio": job.ratio,
        "face_bbox": list(job.face_bbox) if job.face_bbox is not None else None,
        "ext_bbox": list(job.ext_bbox) if job.ext_bbox is not None else None,
        # Which inputs were local paths, so the job comes back equal to the one registered.
        "local": [f for f in ("image", "audio") if isinstance(getattr(job, f), Path)],
    }
    return json.dumps(data, sort_keys=True, ensure_ascii=False)


def _job_from_json(text: str) -> Job:
    data = json.loads(text)
    local = set(data.get("local") or ())
    image: str | Path = Path(data["image"]) if "image" in local else str(data["image"])
    audio: str | Path = Path(data["audio"]) if "audio" in local else str(data["audio"])
    return Job(
        image,
        audio,
        name=data.get("name"),
        style_level=data.get("style_level", "normal"),
        ratio=data.get("ratio"),
        face_bbox=data.get("face_bbox"),
        ext_bbox=data.get("ext_bbox"),
    )


def _ts(value: _dt.datetime) -> str:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"journal times must be timezone-aware (UTC), got naive {value!r}")
    # A fixed width (always microseconds, always +00:00) makes text order equal time order.
    return value.astimezone(_dt.UTC).isoformat(timespec="microseconds")


def _opt_ts(value: _dt.datetime | None) -> str | None:
    return None if value is None else _ts(value)


def _parse_ts(text: str | None) -> _dt.datetime | None:
    if text is None:
        return None
    parsed = _dt.datetime.fromisoformat(text)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=_dt.UTC)


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _error_to_json(error: ErrorInfo | None) -> str | None:
    return None if error is None else json.dumps(error.to_json(), sort_keys=True)


def _error_from_json(text: str | None) -> ErrorInfo | None:
    return None if text is None else ErrorInfo.from_json(json.loads(text))


# --------------------------------------------------------------------------------------------
# Records.


@attrs.frozen
class JobRecord:
    """One job as the journal knows it.

    Attributes:
        key: The job's key (:func:`job_key`).
        name: The job's display name.
        phase: Where the job is (see :class:`JobPhase`).
        job: The job as registered.
        task_id: The emo-v1 task of the current attempt, once known.
        intent_at: When the current attempt's intent was recorded (UTC).
        submitted_at: When its task id was recorded (UTC).
        task_status: The last task status seen.
        video_url: The result URL, once the task SUCCEEDED.
        url_deadline: When that URL stops working (UTC), when known.
        billed_seconds: Seconds of video billed for the current attempt, when known.
        path, size, sha256: The verified video file (``done``).
        error: Why the job did not produce a video.
        attempts: How many intents were recorded for this key.
        updated_at: When the record last changed (UTC).
    """

    key: str
    name: str
    phase: JobPhase
    job: Job
    task_id: str | None = None
    intent_at: _dt.datetime | None = None
    submitted_at: _dt.datetime | None = None
    task_status: str | None = None
    video_url: str | None = attrs.field(default=None, repr=False)
    url_deadline: _dt.datetime | None = None
    billed_seconds: float | None = None
    path: str | None = None
    size: int | None = None
    sha256: str | None = None
    error: ErrorInfo | None = None
    attempts: int = 0
    updated_at: _dt.datetime = attrs.field(factory=_now)

    @classmethod
    def _from_row(cls, row: sqlite3.Row) -> JobRecord:
        updated = _parse_ts(row["updated_at"])
        assert updated is not None
        return cls(
            key=row["key"],
            name=row["name"],
            phase=JobPhase(row["phase"]),
            job=_job_from_json(row["job"]),
            task_id=row["task_id"],
            intent_at=_parse_ts(row["intent_at"]),
            submitted_at=_parse_ts(row["submitted_at"]),
            task_status=row["task_status"],
            video_url=row["video_url"],
            url_deadline=_parse_ts(row["url_deadline"]),
            billed_seconds=row["billed_seconds"],
            path=row["path"],
            size=row["size"],
            sha256=row["sha256"],
            error=_error_from_json(row["error"]),
            attempts=row["attempts"],
            updated_at=updated,
        )


def _frozen_counts(value: Mapping[str, int]) -> Mapping[str, int]:
    return MappingProxyType(dict(value))


def _span(delta: _dt.timedelta) -> str:
    minutes = int(abs(delta.total_seconds()) // 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min"


@attrs.frozen
class JournalSummary:
    """What a journal holds, in numbers (``emo-async status``).

    Attributes:
        path: The journal file.
        total: Number of jobs.
        by_phase: Jobs per phase, every phase listed (in lifecycle order).
        billed_seconds: Seconds of video billed, over every attempt recorded.
        failures: ``(name, error)`` of every failed, rejected, expired or cancelled job.
        at_risk: ``(name, url_deadline)`` of finished, not yet downloaded jobs whose video URL
            runs out within two hours (or already has), soonest first.
        now: The time the summary was taken at.
    """

    path: Path
    total: int
    by_phase: Mapping[str, int] = attrs.field(converter=_frozen_counts)
    billed_seconds: float
    failures: tuple[tuple[str, ErrorInfo], ...]
    at_risk: tuple[tuple[str, _dt.datetime], ...]
    now: _dt.datetime = attrs.field(factory=_now)

    def render(self, *, limit: int = 20) -> str:
        """A short human-readable text: counts, billed seconds, failures and downloads at risk.

        Args:
            limit: The most failures (and at-risk jobs) listed one by one.
        """
        lines = [f"journal {self.path}: {self.total} job{'s' if self.total != 1 else ''}"]
        counts = [f"{phase} {n}" for phase, n in self.by_phase.items() if n]
        if counts:
            lines.append("  " + " · ".join(counts))
        lines.append(f"billed: {self.billed_seconds:.1f} s of video")
        if self.at_risk:
            lines.append(f"downloads at risk of expiry ({len(self.at_risk)}):")
            for name, deadline in self.at_risk[:limit]:
                left = deadline - self.now
                when = f"in {_span(left)}" if left.total_seconds() > 0 else f"{_span(left)} ago"
                verb = "expires" if left.total_seconds() > 0 else "expired"
                lines.append(f"  {name}: URL {verb} {when} ({deadline:%Y-%m-%d %H:%M} UTC)")
            if len(self.at_risk) > limit:
                lines.append(f"  ... and {len(self.at_risk) - limit} more")
        if self.failures:
            lines.append(f"failures ({len(self.failures)}):")
            for name, error in self.failures[:limit]:
                code = f" [{error.code}]" if error.code else ""
                message = f": {error.message}" if error.message else ""
                lines.append(f"  {name}: {error.kind}{code}{message}")
            if len(self.failures) > limit:
                lines.append(f"  ... and {len(self.failures) - limit} more")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Schema.

_SCHEMA: Final = f"""
BEGIN IMMEDIATE;
CREATE TABLE meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT INTO meta (name, value) VALUES ('schema', '{SCHEMA_NAME}'), ('version', '{SCHEMA_VERSION}');
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    job TEXT NOT NULL,
    phase TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    task_id TEXT,
    intent_at TEXT,
    submitted_at TEXT,
    task_status TEXT,
    video_url TEXT,
    url_deadline TEXT,
    billed_seconds REAL,
    billed_earlier REAL NOT NULL DEFAULT 0,
    path TEXT,
    size INTEGER,
    sha256 TEXT,
    error TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX jobs_phase ON jobs (phase);
CREATE TABLE tasks (
    task_id TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    submitted_at TEXT
);
CREATE TRIGGER jobs_task_history AFTER UPDATE OF task_id ON jobs
WHEN NEW.task_id IS NOT NULL AND NEW.task_id IS NOT OLD.task_id
BEGIN
    INSERT INTO tasks (task_id, key, submitted_at) VALUES (NEW.task_id, NEW.key, NEW.submitted_at);
END;
CREATE TABLE detections (
    image_digest TEXT NOT NULL,
    ratio TEXT NOT NULL,
    detection TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (image_digest, ratio)
);
CREATE TABLE uploads (
    digest TEXT NOT NULL,
    model TEXT NOT NULL,
    url TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (digest, model)
);
COMMIT;
"""
_TABLES: Final = frozenset({"meta", "jobs", "tasks", "detections", "uploads"})


@contextlib.contextmanager
def _sqlite_errors(path: Path, doing: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        name = getattr(exc, "sqlite_errorname", "") or ""
        if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
            raise JournalCorruptError(f"journal {path} is damaged ({doing}: {exc})") from exc
        raise JournalError(f"journal {path}: {doing} failed: {exc}") from exc


def _check_header(path: Path) -> bool:
    """Whether ``path`` holds data (False: absent or empty); raise if it is not SQLite."""
    if path.is_dir():
        raise JournalError(f"journal path {path} is a directory, not a file")
    try:
        with path.open("rb") as fh:
            head = fh.read(len(_SQLITE_MAGIC))
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise JournalError(f"cannot read journal {path}: {exc}") from None
    if not head:
        return False
    if head != _SQLITE_MAGIC:
        raise JournalCorruptError(
            f"{path} is not an emo_async journal (not an SQLite database); it was left untouched"
        )
    return True


async def _check_schema(conn: aiosqlite.Connection, path: Path) -> bool:
    """Validate our meta and tables. False: an SQLite file without any table (a fresh one)."""
    try:
        async with conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'") as cur:
            tables = {row[0] for row in await cur.fetchall()}
        if not tables:
            return False
        if "meta" not in tables:
            shown = ", ".join(sorted(tables)[:5])
            raise JournalCorruptError(
                f"{path} is an SQLite database but not an emo_async journal (it has tables:"
                f" {shown}); it was left untouched"
            )
        async with conn.execute("SELECT name, value FROM meta") as cur:
            meta = {str(row[0]): str(row[1]) for row in await cur.fetchall()}
    except sqlite3.Error as exc:
        raise JournalCorruptError(
            f"{path} is damaged or not an emo_async journal ({exc}); it was left untouched"
        ) from None
    if meta.get("schema") != SCHEMA_NAME:
        raise JournalCorruptError(
            f"{path} is an SQLite database but not an emo_async journal"
            f" (schema {meta.get('schema')!r}); it was left untouched"
        )
    try:
        version = int(meta.get("version", ""))
    except ValueError:
        raise JournalCorruptError(
            f"journal {path} has an unreadable version {meta.get('version')!r}"
        ) from None
    if version > SCHEMA_VERSION:
        raise JournalCorruptError(
            f"journal {path} was written by a newer emo_async (journal version {version}; this"
            f" version reads {SCHEMA_VERSION}); upgrade emo_async to use it"
        )
    if version < 1:
        raise JournalCorruptError(f"journal {path} has an invalid version {version}")
    missing = _TABLES - tables
    if missing:
        raise JournalCorruptError(
            f"journal {path} is damaged: missing table(s) {', '.join(sorted(missing))}"
        )
    return True


async def _connect(path: Path, *, read_only: bool) -> aiosqlite.Connection:
    # aiosqlite runs the stdlib sqlite3 connection on its own thread and hands results back
    # through futures: a commit's fsync never blocks the event loop.
    if read_only:
        conn = await aiosqlite.connect(path.as_uri() + "?mode=ro", uri=True, isolation_level=None)
    else:
        # isolation_level=None: no implicit transactions, so each statement commits on its own.
        conn = await aiosqlite.connect(path, isolation_level=None)
    conn.row_factory = sqlite3.Row
    try:
        async with conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}"):
            pass
    except BaseException:
        await conn.close()
        raise
    return conn


async def _validated_read_only(path: Path) -> tuple[aiosqlite.Connection, bool]:
    try:
        conn = await _connect(path, read_only=True)
    except sqlite3.Error as exc:
        raise JournalCorruptError(f"cannot open journal {path} ({exc})") from None
    try:
        ours = await _check_schema(conn, path)
    except BaseException:
        await conn.close()
        raise
    return conn, ours


# --------------------------------------------------------------------------------------------
# The lock.


def _absolute(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.abspath(os.fspath(path)))


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def _acquire_lock(path: Path) -> int:
    lock_path = _lock_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # os.open makes the descriptor non-inheritable: a child process never holds our lock.
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise JournalError(f"cannot create journal lock {lock_path}: {exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _read_pid(fd)
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise JournalError(f"cannot lock journal {path}: {exc}") from None
        if holder == os.getpid():
            who = "this process (another open_journal on it is still open)"
        elif holder is not None:
            who = f"another process (pid {holder})"
        else:
            who = "another process"
        raise JournalLockedError(
            f"journal {path} is in use by {who}; lock file {lock_path}. Two runs on one journal"
            " could submit the same job twice: wait for the other run to end, or stop it."
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:
        pass  # The pid is a courtesy for the error message; the flock is what counts.
    return fd


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# The journal.

_JOB_COLUMNS: Final = (
    "key, name, job, phase, attempts, task_id, intent_at, submitted_at, task_status, video_url,"
    " url_deadline, billed_seconds, path, size, sha256, error, updated_at"
)


class Journal:
    """An open journal. Get one from :func:`open_journal` (or ``await Journal.open(path)``).

    Every ``record_*`` method commits before it returns, and finishes its write even when the
    awaiting task is cancelled. Methods raise :class:`JournalError` for an unknown key or a
    transition that would lose information (a ``done`` job never moves back; a job with a task
    never gets a second intent unless it ended without a video).

    Attributes:
        path: The journal file.
    """

    def __init__(self, path: Path, conn: aiosqlite.Connection, lock_fd: int) -> None:
        self.path = path
        self._conn: aiosqlite.Connection | None = conn
        self._lock_fd: int | None = lock_fd

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else "open"
        return f"<Journal {str(self.path)!r} {state}>"

    @classmethod
    async def open(cls, path: str | os.PathLike[str]) -> Journal:
        """Open (or create) a journal and take its lock; close it with :meth:`aclose`.

        Raises:
            JournalLockedError: Another open journal (in any process) holds the file.
            JournalCorruptError: The file is not an emo_async journal, is damaged, or is newer.
            JournalError: The file cannot be created or read.
        """
        target = await anyio.to_thread.run_sync(_absolute, path)
        if not target.name:
            raise JournalError(f"journal path {os.fspath(path)!r} names no file")
        lock_fd = await anyio.to_thread.run_sync(_acquire_lock, target)
        conn: aiosqlite.Connection | None = None
        try:
            with anyio.CancelScope(shield=True):
                has_data = await anyio.to_thread.run_sync(_check_header, target)
                ours = False
                if has_data:
                    # Look through a read-only connection first: a foreign database is never
                    # opened for writing, so nothing (not even a checkpoint) can change it.
                    ro, ours = await _validated_read_only(target)
                    await ro.close()
                try:
                    conn = await _connect(target, read_only=False)
                    await _prepare(conn, target, create=not ours, check=ours)
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
        return cls(target, conn, lock_fd)

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

    async def __aenter__(self) -> Journal:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # ---- plumbing

    def _db(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise JournalError(f"journal {self.path} is closed")
        return self._conn

    async def _write(self, sql: str, params: Iterable[Any], doing: str) -> int:
        conn = self._db()
        # Shielded: once a write is queued it runs anyway, so its caller waits to learn it did.
        changed = 0
        with anyio.CancelScope(shield=True), _sqlite_errors(self.path, doing):
            async with conn.execute(sql, tuple(params)) as cur:
                changed = cur.rowcount
        return changed

    async def _fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        conn = self._db()
        rows: list[sqlite3.Row] = []
        with _sqlite_errors(self.path, "reading"):
            async with conn.execute(sql, tuple(params)) as cur:
                rows = list(await cur.fetchall())
        return rows

    async def _fetchone(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Row | None:
        rows = await self._fetchall(sql, params)
        return rows[0] if rows else None

    async def _phase(self, key: str) -> tuple[JobPhase, str | None]:
        row = await self._fetchone("SELECT phase, task_id FROM jobs WHERE key = ?", (key,))
        if row is None:
            raise JournalError(f"journal {self.path} has no job with key {key}")
        return JobPhase(row["phase"]), row["task_id"]

    async def _transition(
        self,
        key: str,
        allowed: tuple[JobPhase, ...],
        assignments: str,
        params: Iterable[Any],
        doing: str,
    ) -> bool:
        """Run ``UPDATE jobs SET <assignments>`` if the job's phase is in ``allowed``.

        The phase check is part of the one statement, so it cannot race with another write.
        """
        marks = ", ".join("?" for _ in allowed)
        sql = f"UPDATE jobs SET {assignments}, updated_at = ? WHERE key = ? AND phase IN ({marks})"
        changed = await self._write(sql, [*params, _ts(_now()), key, *allowed], doing)
        return changed > 0

    # ---- jobs

    async def register(self, key: str, job: Job) -> JobRecord:
        """Add a job as ``new`` if its key is unknown; return its record (unchanged if known)."""
        now = _ts(_now())
        await self._write(
            "INSERT OR IGNORE INTO jobs (key, name, job, phase, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (key, job.display_name, _job_to_json(job), JobPhase.NEW, now, now),
            "registering a job",
        )
        record = await self.get(key)
        assert record is not None
        return record

    async def register_many(self, items: Iterable[tuple[str, Job]]) -> int:
        """Register many jobs with few commits (a manifest of thousands at start-up).

        Returns:
            How many keys were new.
        """
        now = _ts(_now())
        added = 0
        batch: list[tuple[str, Job]] = []

        async def flush() -> int:
            values = ", ".join("(?, ?, ?, ?, ?, ?)" for _ in batch)
            params: list[Any] = []
            for key, job in batch:
                params += [key, job.display_name, _job_to_json(job), JobPhase.NEW, now, now]
            batch.clear()
            return await self._write(
                "INSERT OR IGNORE INTO jobs (key, name, job, phase, created_at, updated_at)"
                f" VALUES {values}",
                params,
                "registering jobs",
            )

        for item in items:
            batch.append(item)
            if len(batch) >= _INSERT_CHUNK:
                added += await flush()
        if batch:
            added += await flush()
        return added

    async def get(self, key: str) -> JobRecord | None:
        """The record of a key, or None."""
        row = await self._fetchone(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE key = ?", (key,))
        return None if row is None else JobRecord._from_row(row)

    async def record_intent(self, key: str, *, at: _dt.datetime) -> None:
        """Commit an intent to submit; await it BEFORE sending the billed POST.

        Allowed from ``new``, ``intent`` (a deliberate resubmit) and the unsuccessful terminal
        phases (a deliberate retry, which starts a fresh attempt). ``attempts`` goes up by one.

        Raises:
            JournalError: Unknown key, or the job has a live task or a video (a second submit
                would pay twice).
        """
        ok = await self._transition(
            key,
            _INTENT_FROM,
            "phase = ?, attempts = attempts + 1, intent_at = ?,"
            " billed_earlier = billed_earlier + COALESCE(billed_seconds, 0),"
            " billed_seconds = NULL, task_id = NULL, submitted_at = NULL, task_status = NULL,"
            " video_url = NULL, url_deadline = NULL, path = NULL, size = NULL, sha256 = NULL,"
            " error = NULL",
            (JobPhase.INTENT, _ts(at)),
            "recording an intent",
        )
        if not ok:
            phase, task_id = await self._phase(key)
            raise JournalError(
                f"job {key} is {phase} (task {task_id}); refusing a second intent, which"
                " would pay twice"
            )

    async def record_submitted(self, key: str, task_id: str, *, at: _dt.datetime) -> None:
        """Commit the task id of a submit (or of a task adopted by reconciliation).

        Allowed from ``intent`` and ``new``; recording the same task id again is a no-op.

        Raises:
            JournalError: Unknown key, the job already has another task, or the task id
                belongs to another job.
        """
        if not task_id:
            raise ValueError("task_id must be a non-empty string")
        try:
            ok = await self._transition(
                key,
                _SUBMITTED_FROM,
                "phase = ?, task_id = ?, submitted_at = ?, task_status = NULL",
                (JobPhase.SUBMITTED, task_id, _ts(at)),
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
        if not ok:
            phase, current = await self._phase(key)
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
        ok = await self._transition(
            key, (JobPhase.SUBMITTED,), "task_status = ?", (str(status),), "recording a status"
        )
        if not ok:
            phase, _ = await self._phase(key)
            if phase in (JobPhase.NEW, JobPhase.INTENT):
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
        ok = await self._transition(
            key,
            _FINISHED_FROM,
            "phase = ?, task_status = 'SUCCEEDED', video_url = ?, url_deadline = ?,"
            " billed_seconds = COALESCE(?, billed_seconds)",
            (JobPhase.FINISHED, video_url, _opt_ts(url_deadline), billed_seconds),
            "recording a finished task",
        )
        if not ok:
            phase, _ = await self._phase(key)
            raise JournalError(f"job {key} is {phase}; it cannot be marked finished")

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
        ok = await self._transition(
            key,
            _DONE_FROM,
            "phase = ?, path = ?, size = ?, sha256 = ?, error = NULL,"
            " billed_seconds = COALESCE(?, billed_seconds)",
            (JobPhase.DONE, os.fspath(path), int(size), sha256, billed_seconds),
            "recording a download",
        )
        if not ok:
            phase, _ = await self._phase(key)
            raise JournalError(f"job {key} is {phase}; it cannot be marked done")

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
            JournalError: Unknown key, or the job is done (a done job never moves back).
        """
        phase = JobPhase(phase)
        if phase not in _UNSUCCESSFUL:
            raise ValueError(f"record_terminal takes one of {[str(p) for p in _UNSUCCESSFUL]}")
        ok = await self._transition(
            key,
            _TERMINAL_FROM,
            "phase = ?, error = ?, billed_seconds = COALESCE(?, billed_seconds)",
            (phase, _error_to_json(error), billed_seconds),
            f"recording {phase}",
        )
        if not ok:
            current, _ = await self._phase(key)
            raise JournalError(f"job {key} is {current}; it cannot be marked {phase}")

    async def clear_intent(self, key: str) -> None:
        """Reconciled as "no task was created": back to ``new`` so a resubmit is allowed.

        Raises:
            JournalError: Unknown key, or the job is past its intent (it has a task).
        """
        ok = await self._transition(
            key, (JobPhase.INTENT,), "phase = ?, intent_at = NULL", (JobPhase.NEW,), "clearing"
        )
        if not ok:
            phase, _ = await self._phase(key)
            if phase is not JobPhase.NEW:
                raise JournalError(f"job {key} is {phase}; only an intent can be cleared")

    async def record_file_missing(self, key: str, *, now: _dt.datetime | None = None) -> JobPhase:
        """A ``done`` job's file is gone: the one sanctioned step back from ``done``.

        The job goes back to ``finished`` (download again, nothing to pay) while its video URL
        may still work (its deadline is in the future or unknown), else to ``expired``.

        Returns:
            The job's new phase.

        Raises:
            JournalError: Unknown key, or the job is not done.
        """
        expired = ErrorInfo(
            kind="ResultExpiredError",
            message="the saved video is missing and its URL has expired",
        )
        stamp = _ts(now or _now())
        ok = await self._transition(
            key,
            (JobPhase.DONE,),
            "phase = CASE WHEN video_url IS NOT NULL"
            " AND (url_deadline IS NULL OR url_deadline > ?) THEN ? ELSE ? END,"
            " error = CASE WHEN video_url IS NOT NULL"
            " AND (url_deadline IS NULL OR url_deadline > ?) THEN NULL ELSE ? END,"
            " path = NULL, size = NULL, sha256 = NULL",
            (stamp, JobPhase.FINISHED, JobPhase.EXPIRED, stamp, _error_to_json(expired)),
            "recording a missing file",
        )
        phase, _ = await self._phase(key)
        if not ok:
            raise JournalError(f"job {key} is {phase}, not done; its file cannot be missing")
        return phase

    async def unfinished(self) -> list[JobRecord]:
        """Every record not yet terminal (new, intent, submitted, finished), in register order."""
        open_phases = [p for p in JobPhase if not p.is_terminal]
        marks = ", ".join("?" for _ in open_phases)
        rows = await self._fetchall(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE phase IN ({marks}) ORDER BY seq",
            open_phases,
        )
        return [JobRecord._from_row(row) for row in rows]

    async def records(self) -> AsyncIterator[JobRecord]:
        """Every record, in register order, fetched a page at a time."""
        last = 0
        while True:
            rows = await self._fetchall(
                f"SELECT seq, {_JOB_COLUMNS} FROM jobs WHERE seq > ? ORDER BY seq LIMIT ?",
                (last, _PAGE_SIZE),
            )
            for row in rows:
                yield JobRecord._from_row(row)
            if len(rows) < _PAGE_SIZE:
                return
            last = rows[-1]["seq"]

    async def known_task_ids(self) -> set[str]:
        """Every task id ever recorded in this journal (earlier attempts included)."""
        rows = await self._fetchall("SELECT task_id FROM tasks")
        return {row[0] for row in rows}

    # ---- caches

    async def get_detection(self, image_digest: str, ratio: str) -> Detection | None:
        """The cached detection of a portrait at a ratio, or None."""
        row = await self._fetchone(
            "SELECT detection FROM detections WHERE image_digest = ? AND ratio = ?",
            (image_digest, ratio),
        )
        return None if row is None else Detection.from_record(json.loads(row[0]))

    async def put_detection(self, image_digest: str, ratio: str, detection: Detection) -> None:
        """Cache a detection (replacing an earlier one)."""
        await self._write(
            "INSERT OR REPLACE INTO detections (image_digest, ratio, detection, created_at)"
            " VALUES (?, ?, ?, ?)",
            (image_digest, ratio, json.dumps(detection.to_json()), _ts(_now())),
            "caching a detection",
        )

    async def get_upload(
        self, digest: str, model: str, *, now: _dt.datetime | None = None
    ) -> str | None:
        """A cached ``oss://`` URL for this content and model still valid for an hour, or None."""
        row = await self._fetchone(
            "SELECT url, expires_at FROM uploads WHERE digest = ? AND model = ?", (digest, model)
        )
        if row is None:
            return None
        expires = _parse_ts(row["expires_at"])
        now = now or _now()
        _ts(now)  # refuses a naive time
        if expires is None or expires - now < UPLOAD_MIN_VALIDITY:
            return None
        return str(row["url"])

    async def put_upload(
        self, digest: str, model: str, url: str, *, expires_at: _dt.datetime
    ) -> None:
        """Cache an upload URL with its expiry (replacing an earlier one)."""
        await self._write(
            "INSERT OR REPLACE INTO uploads (digest, model, url, expires_at, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (digest, model, url, _ts(expires_at), _ts(_now())),
            "caching an upload",
        )

    # ---- summary

    async def summary(self, *, now: _dt.datetime | None = None) -> JournalSummary:
        """Counts by phase, billed seconds, failures and downloads at risk of expiry."""
        conn = self._db()
        with _sqlite_errors(self.path, "summarising"):
            return await _summarize(conn, self.path, now or _now())


async def _prepare(conn: aiosqlite.Connection, path: Path, *, create: bool, check: bool) -> None:
    async with conn.execute("PRAGMA journal_mode = WAL") as cur:
        await cur.fetchall()
    # FULL: a WAL commit is fsynced before it returns, so an intent survives a power cut.
    async with conn.execute("PRAGMA synchronous = FULL"):
        pass
    if create:
        # One executescript call is one job on the connection's thread: the schema and its meta
        # land in one transaction, whole or not at all.
        await conn.executescript(_SCHEMA)
    if check:
        async with conn.execute("PRAGMA quick_check(1)") as cur:
            rows = [str(row[0]) for row in await cur.fetchall()]
        if rows != ["ok"]:
            raise JournalCorruptError(f"journal {path} is damaged: {'; '.join(rows)}")


async def _summarize(conn: aiosqlite.Connection, path: Path, now: _dt.datetime) -> JournalSummary:
    async with conn.execute("SELECT phase, COUNT(*) FROM jobs GROUP BY phase") as cur:
        found = {str(row[0]): int(row[1]) for row in await cur.fetchall()}
    by_phase = {str(p): found.pop(str(p), 0) for p in JobPhase}
    by_phase.update(found)  # a phase from a later version still counts
    async with conn.execute(
        "SELECT COALESCE(SUM(COALESCE(billed_seconds, 0) + billed_earlier), 0) FROM jobs"
    ) as cur:
        billed_row = await cur.fetchone()
    billed = float(billed_row[0]) if billed_row is not None else 0.0
    marks = ", ".join("?" for _ in _UNSUCCESSFUL)
    async with conn.execute(
        f"SELECT name, phase, error FROM jobs WHERE phase IN ({marks}) ORDER BY seq",
        _UNSUCCESSFUL,
    ) as cur:
        failures = tuple(
            (
                str(row[0]),
                _error_from_json(row[2])
                or ErrorInfo(kind=str(row[1]), message="no reason was recorded"),
            )
            for row in await cur.fetchall()
        )
    async with conn.execute(
        "SELECT name, url_deadline FROM jobs WHERE phase = ? AND url_deadline IS NOT NULL"
        " AND url_deadline <= ? ORDER BY url_deadline",
        (JobPhase.FINISHED, _ts(now + AT_RISK_WINDOW)),
    ) as cur:
        at_risk = tuple(
            (str(row[0]), deadline)
            for row in await cur.fetchall()
            if (deadline := _parse_ts(row[1])) is not None
        )
    return JournalSummary(
        path=path,
        total=sum(by_phase.values()),
        by_phase=by_phase,
        billed_seconds=billed,
        failures=failures,
        at_risk=at_risk,
        now=now,
    )


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


async def read_summary(
    path: str | os.PathLike[str], *, now: _dt.datetime | None = None
) -> JournalSummary:
    """Summarise a journal read-only, without its lock (safe while a batch runs on it).

    Raises:
        JournalError: No journal at ``path``.
        JournalCorruptError: The file is not an emo_async journal, is damaged, or is newer.
    """
    target = await anyio.to_thread.run_sync(_absolute, path)
    if not await anyio.to_thread.run_sync(_check_header, target):
        raise JournalError(f"no journal at {target} (missing or empty)")
    conn, ours = await _validated_read_only(target)
    try:
        if not ours:
            raise JournalCorruptError(f"{target} is an empty SQLite database, not a journal")
        with _sqlite_errors(target, "summarising"):
            return await _summarize(conn, target, now or _now())
    finally:
        with anyio.CancelScope(shield=True):
            await conn.close()
