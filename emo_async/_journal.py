"""The durable batch journal: what was asked, what was sent, what came back.

A crashed or interrupted batch resumes from here without paying twice. The journal is one SQLite
file in WAL mode with ``synchronous=FULL``: every ``record_*`` call is committed (and fsynced)
before it returns, so an intent awaited before the billed POST survives a SIGKILL or a power cut.
Besides the jobs it caches detections (per portrait and ratio) and upload URLs (per content and
model, with their expiry).

The connection lives on one thread of its own. Writes queued at the same moment (many jobs of a
batch at once) share one transaction and one fsync, and the event loop hears back once for all of
them (group commit); each caller still resumes only after its own write is committed.

One process at a time: ``open_journal`` takes an exclusive ``flock`` on ``<journal>.lock``, which
the kernel drops when the process dies, so a killed batch never leaves a stale lock behind.
:func:`read_summary` reads a journal without that lock, for ``emo-async status`` while a batch runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import enum
import errno
import fcntl
import hashlib
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Final, TypeVar

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

logger = logging.getLogger("emo_async.journal")

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


def _check_schema(conn: sqlite3.Connection, path: Path) -> bool:
    """Validate our meta and tables. False: an SQLite file without any table (a fresh one)."""
    try:
        tables = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        if not tables:
            return False
        if "meta" not in tables:
            shown = ", ".join(sorted(tables)[:5])
            raise JournalCorruptError(
                f"{path} is an SQLite database but not an emo_async journal (it has tables:"
                f" {shown}); it was left untouched"
            )
        meta = {str(row[0]): str(row[1]) for row in conn.execute("SELECT name, value FROM meta")}
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


def _connect(path: Path, *, read_only: bool) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; the journal's thread opens its own.
    if read_only:
        conn = sqlite3.connect(path.as_uri() + "?mode=ro", uri=True, isolation_level=None)
    else:
        conn = sqlite3.connect(path, isolation_level=None)
    conn.row_factory = sqlite3.Row
    try:
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
    except BaseException:
        conn.close()
        raise
    return conn


def _inspect(path: Path) -> bool:
    """Whether ``path`` already holds our journal (False: absent, empty or a fresh SQLite file).

    A file with data is looked at through a read-only connection: a foreign database is never
    opened for writing, so nothing (not even a checkpoint) can change it.
    """
    if not _check_header(path):
        return False
    try:
        conn = _connect(path, read_only=True)
    except sqlite3.Error as exc:
        raise JournalCorruptError(f"cannot open journal {path} ({exc})") from None
    try:
        return _check_schema(conn, path)
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------
# The journal's connection and its thread.

_T = TypeVar("_T")

_READ: Final = 0
_WRITE: Final = 1
#: Run alone, outside any transaction: opening, pragmas, the schema script, closing.
_ALONE: Final = 2
#: The most calls one transaction takes in.
_GROUP_MAX: Final = 256


class _Call:
    __slots__ = ("deferred", "fn", "future", "kind", "loop", "ok", "owner", "patience", "value")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], Any],
        kind: int,
        loop: asyncio.AbstractEventLoop,
        deferred: list[Callable[[sqlite3.Connection], object]] | None = None,
    ) -> None:
        self.fn = fn
        self.kind = kind
        self.loop = loop
        #: Writes nobody waits for, run just before ``fn`` in the same transaction.
        self.deferred = deferred
        #: Seconds this write's commit may wait for other writes to share it.
        self.patience = 0.0
        self.future: asyncio.Future[Any] = loop.create_future()
        self.ok = False
        self.value: Any = None
        #: The connection whose deferred writes this call carries (set when it carries some).
        self.owner: _Connection | None = None


def _deliver(calls: list[_Call]) -> None:
    for call in calls:
        owner = call.owner
        if call.deferred and not call.ok and owner is not None and not owner.closed:
            # Not committed (the call failed, or its transaction did): the deferred writes go
            # back in front of the queue for the next call. Each is idempotent (INSERT OR
            # IGNORE / OR REPLACE), so the ones that ran before the failure may run again; a
            # job registered in memory must not lose its row while its key stays known.
            owner._deferred[:0] = call.deferred
            logger.warning(
                "journal: %d deferred writes not committed (%s); kept for the next write",
                len(call.deferred),
                call.value,
            )
        if not call.future.done():  # a cancelled reader no longer waits
            if call.ok:
                call.future.set_result(call.value)
            else:
                call.future.set_exception(call.value)


class _Connection:
    """An SQLite connection owned by one thread, called from the event loop.

    Calls run in the order they were made. The thread takes every call already queued when it
    gets to work (up to ``_GROUP_MAX``) and runs the writes among them in one transaction: one
    ``BEGIN IMMEDIATE`` ... ``COMMIT``, so one fsync, and one wake-up of the event loop for
    the whole group. A write's caller resumes only once that transaction is committed. Each
    write runs in a savepoint, so a write that raises (an unknown key, a constraint) leaves
    no trace and does not undo its neighbours. An error that ends the whole transaction (a
    full disk, an I/O error) or a failed ``COMMIT`` fails every write of the group: none of
    them is reported committed unless it is. A write alone in its group runs in autocommit
    mode, so a write call must make at most one modifying statement (each of the journal's
    does; reads around it are fine).

    A patient write (``patience`` > 0) waits up to that long for others to join its group,
    and goes at once when a call comes that may not wait. :meth:`defer` queues a write nobody
    waits for (a cache entry, a job that has cost nothing yet): it costs no commit and no thread
    hop of its own, and runs at the start of the next call, in its transaction, or when the
    connection closes.
    """

    def __init__(self, path: Path, *, read_only: bool) -> None:
        self._path = path
        self._read_only = read_only
        self._db: sqlite3.Connection | None = None
        self._queue: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._deferred: list[Callable[[sqlite3.Connection], object]] = []
        self.closed = False

    @classmethod
    async def open(cls, path: Path, *, read_only: bool = False) -> _Connection:
        conn = cls(path, read_only=read_only)
        # A daemon thread: a journal nobody closed must not keep the interpreter alive.
        conn._thread = threading.Thread(target=conn._serve, name="emo-journal", daemon=True)
        conn._thread.start()
        try:
            await conn._call(conn._connect, _ALONE)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await conn.close()
            raise
        return conn

    def _connect(self, _: Any) -> None:
        self._db = _connect(self._path, read_only=self._read_only)

    async def read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn`` on the connection (not cancel-shielded: a cancelled read is dropped)."""
        return await self._call(fn, _READ)

    async def write(self, fn: Callable[[sqlite3.Connection], _T], *, patience: float = 0.0) -> _T:
        """Run ``fn`` in a transaction; return once it is committed (even when cancelled).

        ``patience``: seconds the commit may wait for other writes to share it (it goes as soon
        as a write comes that may not wait).
        """
        with anyio.CancelScope(shield=True):
            result = await self._call(fn, _WRITE, patience=patience)
        return result

    async def alone(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn`` outside any transaction (pragmas, scripts), shielded."""
        with anyio.CancelScope(shield=True):
            result = await self._call(fn, _ALONE)
        return result

    def defer(self, fn: Callable[[sqlite3.Connection], object]) -> None:
        """Have ``fn`` (one modifying statement) run first in the next call's transaction."""
        self._deferred.append(fn)

    async def close(self) -> None:
        """Run what is queued, close the connection and end the thread. Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        with anyio.CancelScope(shield=True):
            if self._deferred:
                try:
                    await self._call(_nothing, _WRITE)
                except Exception as exc:
                    # Deferred writes are caches and jobs nothing was spent on: losing them
                    # costs a repeated upload or detection, never money.
                    logger.warning("journal %s: deferred writes were lost: %s", self._path, exc)
            # Answered after the connection is closed; the thread ends right after.
            await self._call(self._close, _ALONE)

    def _close(self, _: Any) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()
        raise _Stop

    def _call(
        self, fn: Callable[[sqlite3.Connection], _T], kind: int, *, patience: float = 0.0
    ) -> asyncio.Future[_T]:
        loop = asyncio.get_running_loop()
        if self._deferred and kind != _ALONE:
            deferred, self._deferred = self._deferred, []
            call = _Call(fn, _WRITE, loop, deferred)
            call.owner = self
        else:
            call = _Call(fn, kind, loop)
        call.patience = patience
        self._queue.put(call)
        return call.future

    # -- the thread

    def _serve(self) -> None:
        carry: _Call | None = None
        while True:
            first = carry if carry is not None else self._queue.get()
            carry = None
            if first.kind == _ALONE:
                if self._run_alone(first):
                    return
                continue
            group = [first]
            # A patient write waits for company until this moment (or an impatient call).
            until = time.monotonic() + first.patience if first.patience > 0 else None
            while len(group) < _GROUP_MAX:
                try:
                    if until is None:
                        nxt = self._queue.get_nowait()
                    else:
                        nxt = self._queue.get(timeout=max(0.0, until - time.monotonic()))
                except queue.Empty:
                    break
                if nxt.kind == _ALONE:
                    carry = nxt
                    break
                group.append(nxt)
                if nxt.patience <= 0:
                    until = None  # someone may not wait: take what is queued and go
            self._run_group(group)

    def _post(self, calls: list[_Call]) -> None:
        loop = calls[0].loop
        if all(call.loop is loop for call in calls):
            batches = [(loop, calls)]
        else:  # pragma: no cover - one journal used from two event loops
            batches = [(call.loop, [call]) for call in calls]
        for target, some in batches:
            with contextlib.suppress(RuntimeError):  # that event loop is closed
                target.call_soon_threadsafe(_deliver, some)

    def _run_alone(self, call: _Call) -> bool:
        stop = False
        try:
            call.value = call.fn(self._db)  # type: ignore[arg-type]
            call.ok = True
        except _Stop:
            call.ok, stop = True, True
        except Exception as exc:
            call.value = exc
        self._post([call])
        return stop

    def _run_group(self, group: list[_Call]) -> None:
        db = self._db
        if db is None:
            for call in group:
                call.value = sqlite3.ProgrammingError("the journal's connection is closed")
            self._post(group)
            return
        if sum(call.kind == _WRITE for call in group) < 2 and not any(c.deferred for c in group):
            # Nothing to share: each statement commits on its own (the common case when jobs
            # trickle in), without the cost of a transaction and savepoint around it.
            for call in group:
                if db.in_transaction:
                    # Left open by a COMMIT and a ROLLBACK that both failed: a statement here
                    # would join it instead of committing, so it must not be reported done.
                    with contextlib.suppress(Exception):
                        db.execute("ROLLBACK")
                if db.in_transaction:
                    call.value = sqlite3.OperationalError(
                        "the journal's connection is stuck in a failed transaction"
                    )
                    continue
                try:
                    call.value, call.ok = call.fn(db), True
                except Exception as exc:
                    call.value = exc
            self._post(group)
            return
        in_txn: list[_Call] = []  # the calls whose fate depends on the open transaction
        for call in group:
            if call.kind == _WRITE and not in_txn:
                try:
                    db.execute("BEGIN IMMEDIATE")
                except Exception as exc:
                    call.value = exc
                    continue
            if call.kind == _READ:
                if in_txn:
                    in_txn.append(call)
                try:
                    call.value, call.ok = call.fn(db), True
                except Exception as exc:
                    call.value = exc
            else:
                in_txn.append(call)
                for write in call.deferred or ():
                    ok, value = _step(db, write)
                    if not ok:
                        # The call may depend on it (an intent on a job registered just
                        # before): it fails with it, the other deferred writes stay.
                        call.value = value
                        break
                else:
                    call.ok, call.value = _step(db, call.fn)
            if in_txn and not db.in_transaction:
                # SQLite gave up the whole transaction (a full disk, an I/O error): every write
                # made in it is lost, none may be reported committed.
                lost = call.value if not call.ok else sqlite3.OperationalError("rolled back")
                _fail(in_txn, lost)
                in_txn = []
        if in_txn:
            try:
                db.execute("COMMIT")
            except Exception as exc:
                with contextlib.suppress(Exception):
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                _fail(in_txn, exc)
        self._post(group)


def _step(db: sqlite3.Connection, fn: Callable[[sqlite3.Connection], Any]) -> tuple[bool, Any]:
    """Run ``fn`` in a savepoint of the open transaction: all of it, or none of it."""
    try:
        db.execute("SAVEPOINT journal_call")
        try:
            return True, fn(db)
        except Exception as exc:
            if db.in_transaction:
                db.execute("ROLLBACK TO journal_call")
            return False, exc
        finally:
            if db.in_transaction:
                db.execute("RELEASE journal_call")
    except Exception as exc:
        return False, exc


class _Stop(Exception):
    """Ends the journal's thread (raised by the closing call)."""


def _nothing(db: sqlite3.Connection) -> None:
    return None


def _fail(calls: list[_Call], exc: BaseException) -> None:
    for call in calls:
        if call.ok:
            call.ok, call.value = False, exc


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
    """

    def __init__(self, path: Path, conn: _Connection, lock_fd: int) -> None:
        self.path = path
        self.commit_delay = 0.0
        self._conn: _Connection | None = conn
        self._lock_fd: int | None = lock_fd
        self._detections: dict[tuple[str, str], Detection] = {}
        self._uploads: dict[tuple[str, str], tuple[str, _dt.datetime | None]] = {}
        self._keys: set[str] | None = None  # None: not loaded, ask the database

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
        conn: _Connection | None = None
        try:
            with anyio.CancelScope(shield=True):
                ours = await anyio.to_thread.run_sync(_inspect, target)
                try:
                    conn = await _Connection.open(target)
                    caches = await conn.alone(
                        lambda db: _prepare(db, target, create=not ours, check=ours)
                    )
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

    def _db(self) -> _Connection:
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
        with _sqlite_errors(self.path, doing):
            return await conn.write(fn, patience=self.commit_delay if patient else 0.0)

    async def _read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        conn = self._db()
        with _sqlite_errors(self.path, "reading"):
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
        args = (*params, _ts(_now()), key, *allowed)

        def run(db: sqlite3.Connection) -> tuple[JobPhase, str | None] | None:
            if db.execute(sql, args).rowcount > 0:
                return None
            return self._phase_of(db, key)

        return await self._write(run, doing, patient=patient)

    # ---- jobs

    async def register(self, key: str, job: Job) -> JobRecord:
        """Add a job as ``new`` if its key is unknown; return its record (unchanged if known).

        A new job is written with the journal's next write (at the latest with its intent, in
        the same transaction): until then nothing has been spent on it, so it needs no commit
        of its own.
        """
        conn = self._db()
        now = _ts(_now())
        text = _job_to_json(job)
        args = (key, job.display_name, text, JobPhase.NEW, now, now)
        sql = (
            "INSERT OR IGNORE INTO jobs (key, name, job, phase, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?)"
        )
        keys = self._keys
        if keys is not None and key not in keys:
            conn.defer(lambda db: db.execute(sql, args))
            keys.add(key)
            updated = _parse_ts(now)
            assert updated is not None
            # What reading the row back would give (the job as its JSON says).
            return JobRecord(
                key=key,
                name=job.display_name,
                phase=JobPhase.NEW,
                job=_job_from_json(text),
                updated_at=updated,
            )

        def run(db: sqlite3.Connection) -> JobRecord:
            db.execute(sql, args)
            row = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE key = ?", (key,)).fetchone()
            return JobRecord._from_row(row)

        record = await self._write(run, "registering a job")
        if keys is not None:
            keys.add(key)
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
        found = await self._transition(
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
        if found is not None:
            phase, task_id = found
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
            found = await self._transition(
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
        found = await self._transition(
            key,
            _FINISHED_FROM,
            "phase = ?, task_status = 'SUCCEEDED', video_url = ?, url_deadline = ?,"
            " billed_seconds = COALESCE(?, billed_seconds)",
            (JobPhase.FINISHED, video_url, _opt_ts(url_deadline), billed_seconds),
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
            _DONE_FROM,
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
            JournalError: Unknown key, or the job is done (a done job never moves back).
        """
        phase = JobPhase(phase)
        if phase not in _UNSUCCESSFUL:
            raise ValueError(f"record_terminal takes one of {[str(p) for p in _UNSUCCESSFUL]}")
        found = await self._transition(
            key,
            _TERMINAL_FROM,
            "phase = ?, error = ?, billed_seconds = COALESCE(?, billed_seconds)",
            (phase, _error_to_json(error), billed_seconds),
            f"recording {phase}",
            patient=True,
        )
        if found is not None:
            raise JournalError(f"job {key} is {found[0]}; it cannot be marked {phase}")

    async def clear_intent(self, key: str) -> None:
        """Reconciled as "no task was created": back to ``new`` so a resubmit is allowed.

        Raises:
            JournalError: Unknown key, or the job is past its intent (it has a task).
        """
        found = await self._transition(
            key, (JobPhase.INTENT,), "phase = ?, intent_at = NULL", (JobPhase.NEW,), "clearing"
        )
        if found is not None and found[0] is not JobPhase.NEW:
            raise JournalError(f"job {key} is {found[0]}; only an intent can be cleared")

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
        found = await self._transition(
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
        if found is not None:
            raise JournalError(f"job {key} is {found[0]}, not done; its file cannot be missing")
        phase, _ = await self._phase(key)
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
        self._db()
        return self._detections.get((image_digest, ratio))

    async def put_detection(self, image_digest: str, ratio: str, detection: Detection) -> None:
        """Cache a detection (replacing an earlier one), written with the next write."""
        args = (image_digest, ratio, json.dumps(detection.to_json()), _ts(_now()))
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
        now = now or _now()
        _ts(now)  # refuses a naive time
        if expires is None or expires - now < UPLOAD_MIN_VALIDITY:
            return None
        return url

    async def put_upload(
        self, digest: str, model: str, url: str, *, expires_at: _dt.datetime
    ) -> None:
        """Cache an upload URL with its expiry (replacing an earlier one), written with the next
        write."""
        args = (digest, model, url, _ts(expires_at), _ts(_now()))
        self._db().defer(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO uploads (digest, model, url, expires_at, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                args,
            )
        )
        self._uploads[(digest, model)] = (url, _parse_ts(args[3]))

    # ---- summary

    async def summary(self, *, now: _dt.datetime | None = None) -> JournalSummary:
        """Counts by phase, billed seconds, failures and downloads at risk of expiry."""
        when = now or _now()
        conn = self._db()
        with _sqlite_errors(self.path, "summarising"):
            return await conn.read(lambda db: _summarize(db, self.path, when))


_Caches = tuple[
    dict[tuple[str, str], Detection],
    dict[tuple[str, str], tuple[str, _dt.datetime | None]],
    set[str],
]


def _prepare(conn: sqlite3.Connection, path: Path, *, create: bool, check: bool) -> _Caches:
    """Set the pragmas, create or check the schema; return the detection and upload caches and
    the job keys."""
    conn.execute("PRAGMA journal_mode = WAL").fetchall()
    # FULL: a WAL commit is fsynced before it returns, so an intent survives a power cut.
    conn.execute("PRAGMA synchronous = FULL")
    if create:
        # The schema and its meta land in one transaction, whole or not at all.
        conn.executescript(_SCHEMA)
    if check:
        rows = [str(row[0]) for row in conn.execute("PRAGMA quick_check(1)")]
        if rows != ["ok"]:
            raise JournalCorruptError(f"journal {path} is damaged: {'; '.join(rows)}")
    detections: dict[tuple[str, str], Detection] = {}
    for row in conn.execute("SELECT image_digest, ratio, detection FROM detections"):
        # A cache: an entry this version cannot read is detected again.
        with contextlib.suppress(ValueError, TypeError, KeyError):
            detections[(row[0], row[1])] = Detection.from_record(json.loads(row[2]))
    uploads: dict[tuple[str, str], tuple[str, _dt.datetime | None]] = {}
    for row in conn.execute("SELECT digest, model, url, expires_at FROM uploads"):
        with contextlib.suppress(ValueError, TypeError):
            uploads[(row[0], row[1])] = (str(row[2]), _parse_ts(row[3]))
    keys = {str(row[0]) for row in conn.execute("SELECT key FROM jobs")}
    return detections, uploads, keys


def _summarize(conn: sqlite3.Connection, path: Path, now: _dt.datetime) -> JournalSummary:
    found = {
        str(row[0]): int(row[1])
        for row in conn.execute("SELECT phase, COUNT(*) FROM jobs GROUP BY phase")
    }
    by_phase = {str(p): found.pop(str(p), 0) for p in JobPhase}
    by_phase.update(found)  # a phase from a later version still counts
    billed_row = conn.execute(
        "SELECT COALESCE(SUM(COALESCE(billed_seconds, 0) + billed_earlier), 0) FROM jobs"
    ).fetchone()
    billed = float(billed_row[0]) if billed_row is not None else 0.0
    marks = ", ".join("?" for _ in _UNSUCCESSFUL)
    failures = tuple(
        (
            str(row[0]),
            _error_from_json(row[2])
            or ErrorInfo(kind=str(row[1]), message="no reason was recorded"),
        )
        for row in conn.execute(
            f"SELECT name, phase, error FROM jobs WHERE phase IN ({marks}) ORDER BY seq",
            _UNSUCCESSFUL,
        )
    )
    at_risk = tuple(
        (str(row[0]), deadline)
        for row in conn.execute(
            "SELECT name, url_deadline FROM jobs WHERE phase = ? AND url_deadline IS NOT NULL"
            " AND url_deadline <= ? ORDER BY url_deadline",
            (JobPhase.FINISHED, _ts(now + AT_RISK_WINDOW)),
        )
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


def _read_summary(target: Path, now: _dt.datetime) -> JournalSummary:
    if not _check_header(target):
        raise JournalError(f"no journal at {target} (missing or empty)")
    try:
        conn = _connect(target, read_only=True)
    except sqlite3.Error as exc:
        raise JournalCorruptError(f"cannot open journal {target} ({exc})") from None
    try:
        if not _check_schema(conn, target):
            raise JournalCorruptError(f"{target} is an empty SQLite database, not a journal")
        with _sqlite_errors(target, "summarising"):
            return _summarize(conn, target, now)
    finally:
        conn.close()


async def read_summary(
    path: str | os.PathLike[str], *, now: _dt.datetime | None = None
) -> JournalSummary:
    """Summarise a journal read-only, without its lock (safe while a batch runs on it).

    Raises:
        JournalError: No journal at ``path``.
        JournalCorruptError: The file is not an emo_async journal, is damaged, or is newer.
    """
    target = await anyio.to_thread.run_sync(_absolute, path)
    return await anyio.to_thread.run_sync(_read_summary, target, now or _now())
