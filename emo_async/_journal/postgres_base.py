"""The PostgreSQL journal's plumbing: opening (pool, migrations, the batch row), closing,
transactions that finish even when their caller is cancelled, errors, row conversions, the
account's detection and upload caches, and the summary.

The job lifecycle is in :mod:`.postgres`, unresolved jobs in :mod:`.postgres_unresolved` and
claims in :mod:`.postgres_claims`; all build on :class:`PgJournalBase`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import anyio

from .._exceptions import JournalError
from .._models import Detection, ErrorInfo
from .._pg import PostgresUnavailable, migrate, open_pool, redact_dsn

try:
    import psycopg
    import psycopg_pool
    from psycopg.rows import dict_row
except ImportError as exc:  # pragma: no cover - depends on the install
    raise PostgresUnavailable(
        "a postgresql:// journal needs the postgres extra: pip install 'emo-async[postgres]'"
    ) from exc

from .base import UPLOAD_MIN_VALIDITY
from .records import Candidate, JobPhase, JobRecord, job_from_json, ts, utcnow
from .summary import AT_RISK_WINDOW, JournalSummary, UnresolvedJob

__all__ = ["JOB_COLUMNS", "PgJournalBase", "candidate_of", "phases", "record_of"]

_T = TypeVar("_T")
Conn = psycopg.AsyncConnection[Any]

JOB_COLUMNS: Final = (
    "key, name, job, phase, attempts, task_id, intent_at, submitted_at, task_status, video_url,"
    " url_deadline, billed_seconds, path, size, sha256, error, updated_at, reason"
)
CANDIDATE_COLUMNS: Final = (
    "key, task_id, created_at, status, video_duration, video_url, url_deadline, path, size, sha256"
)


def phases(items: Iterable[JobPhase]) -> list[str]:
    # Plain strings: psycopg would dump an Enum member by its name, not its value.
    return [str(p) for p in items]


def aware(value: _dt.datetime | None) -> _dt.datetime | None:
    """A caller's time, refused when naive (as the SQLite journal refuses it)."""
    if value is not None:
        ts(value)
    return value


def _utc(value: _dt.datetime | None) -> _dt.datetime | None:
    return None if value is None else value.astimezone(_dt.UTC)


def _error(value: Any) -> ErrorInfo | None:
    return None if value is None else ErrorInfo.from_json(value)


def record_of(row: Mapping[str, Any]) -> JobRecord:
    """The record of an ``emo_jobs`` row read with ``JOB_COLUMNS``."""
    updated = _utc(row["updated_at"])
    assert updated is not None
    return JobRecord(
        key=row["key"],
        name=row["name"],
        phase=JobPhase(row["phase"]),
        job=job_from_json(json.dumps(row["job"])),
        task_id=row["task_id"],
        intent_at=_utc(row["intent_at"]),
        submitted_at=_utc(row["submitted_at"]),
        task_status=row["task_status"],
        video_url=row["video_url"],
        url_deadline=_utc(row["url_deadline"]),
        billed_seconds=row["billed_seconds"],
        path=row["path"],
        size=row["size"],
        sha256=row["sha256"],
        error=_error(row["error"]),
        attempts=row["attempts"],
        updated_at=updated,
        reason=row["reason"],
    )


def candidate_of(row: Mapping[str, Any]) -> Candidate:
    return Candidate(
        task_id=row["task_id"],
        created_at=_utc(row["created_at"]),
        status=row["status"],
        video_duration=row["video_duration"],
        video_url=row["video_url"],
        url_deadline=_utc(row["url_deadline"]),
        path=row["path"],
        size=row["size"],
        sha256=row["sha256"],
    )


def _lost(exc: BaseException) -> bool:
    """Whether an error means the server (or the way to it) is gone or cannot take work, not
    that a statement was wrong: connection exceptions (08...), shutdowns (57P...), no room
    (53...: too many connections, disk full), or no SQLSTATE at all."""
    if isinstance(exc, psycopg_pool.PoolTimeout | psycopg.InterfaceError):
        return True
    if isinstance(exc, psycopg.OperationalError):
        state = getattr(exc, "sqlstate", None)
        return state is None or state.startswith(("08", "57P", "53"))
    return False


class PgJournalBase:
    """An open PostgreSQL journal's plumbing; :class:`~emo_async._journal.postgres.
    PostgresJournal` adds the job lifecycle and claims (and documents the whole)."""

    def __init__(
        self,
        pool: psycopg_pool.AsyncConnectionPool[Any],
        *,
        where: str,
        batch: str,
        batch_id: int,
        account: str,
        host: str,
        owns_pool: bool,
    ) -> None:
        #: No file: a label for messages and summaries (the DSN without its password).
        self.path = Path(where)
        #: Kept for the protocol: every write commits at once (PostgreSQL groups commits).
        self.commit_delay = 0.0
        self.batch = batch
        self.account = account
        self.host = host
        self._where = where
        self._batch_id = batch_id
        self._pool: psycopg_pool.AsyncConnectionPool[Any] | None = pool
        self._owns_pool = owns_pool
        self._detections: dict[tuple[str, str], Detection] = {}

    def __repr__(self) -> str:
        state = "closed" if self._pool is None else "open"
        return f"<{type(self).__name__} {self._where!r} batch {self.batch!r} {state}>"

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        batch: str,
        account: str,
        host: str | None = None,
        pool: psycopg_pool.AsyncConnectionPool[Any] | None = None,
        max_size: int = 4,
    ) -> Self:
        """Open the journal of ``batch`` on ``account`` (created on first use), migrating the
        database first; close it with :meth:`aclose`.

        Args:
            dsn: A ``postgresql://`` URL.
            batch: The batch's name: workers naming the same batch share its jobs.
            account: The account's fingerprint: task ids, open intents and caches are shared
                by every batch of the account.
            host: This worker's host name, recorded with each saved file (default: this
                machine's).
            pool: A pool to use instead of opening one (it is left open by :meth:`aclose`).
            max_size: Connections of the pool opened here.

        Raises:
            PostgresUnavailable: The server cannot be reached.
            ValueError: An empty batch or account.
        """
        if not batch or not account:
            raise ValueError("a PostgreSQL journal needs a batch name and an account")
        where = redact_dsn(dsn)
        owns = pool is None
        if pool is None:
            pool = await open_pool(dsn, max_size=max_size, name="emo_async.journal")
        try:
            with anyio.CancelScope(shield=True):
                try:
                    await migrate(pool)
                    async with pool.connection() as conn:
                        await conn.execute(
                            "INSERT INTO emo_batches (account, name) VALUES (%s, %s)"
                            " ON CONFLICT (account, name) DO NOTHING",
                            (account, batch),
                        )
                        cur = await conn.execute(
                            "SELECT id FROM emo_batches WHERE account = %s AND name = %s",
                            (account, batch),
                        )
                        row = await cur.fetchone()
                except psycopg.Error as exc:
                    raise _translate(exc, where, "opening the journal") from None
        except BaseException:
            if owns:
                with anyio.CancelScope(shield=True):
                    await pool.close()
            raise
        assert row is not None
        return cls(
            pool,
            where=where,
            batch=batch,
            batch_id=int(row[0]),
            account=account,
            host=host or socket.gethostname(),
            owns_pool=owns,
        )

    async def aclose(self) -> None:
        """Close the pool (if it was opened here). Safe to call twice."""
        pool, self._pool = self._pool, None
        if pool is not None and self._owns_pool:
            with anyio.CancelScope(shield=True):
                await pool.close()

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

    def _live(self) -> psycopg_pool.AsyncConnectionPool[Any]:
        if self._pool is None:
            raise JournalError(f"journal {self._where} (batch {self.batch}) is closed")
        return self._pool

    async def _tx(self, fn: Callable[[Conn], Awaitable[_T]], doing: str) -> _T:
        """Run ``fn`` in one transaction; return once it is committed.

        Shielded: once started it runs to its end, so a cancelled caller's write is either
        committed or rolled back whole, never left to chance. A refusal (JournalError) raised
        by ``fn`` rolls the transaction back.
        """
        pool = self._live()
        with anyio.CancelScope(shield=True):
            try:
                async with pool.connection() as conn, conn.transaction():
                    result = await fn(conn)
            except psycopg.Error as exc:
                raise _translate(exc, self._where, doing) from exc
            except psycopg_pool.PoolTimeout:
                raise PostgresUnavailable(
                    f"PostgreSQL at {self._where} is unreachable ({doing})"
                ) from None
        return result

    async def _read(self, fn: Callable[[Conn], Awaitable[_T]], doing: str = "reading") -> _T:
        pool = self._live()
        try:
            async with pool.connection() as conn:
                return await fn(conn)
        except psycopg.Error as exc:
            raise _translate(exc, self._where, doing) from exc
        except psycopg_pool.PoolTimeout:
            raise PostgresUnavailable(
                f"PostgreSQL at {self._where} is unreachable ({doing})"
            ) from None

    @staticmethod
    async def _rows(conn: Conn, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(sql.encode(), tuple(params))
        return await cur.fetchall()

    async def _fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        args = tuple(params)
        return await self._read(lambda conn: self._rows(conn, sql, args))

    async def _phase_of(self, conn: Conn, key: str) -> tuple[JobPhase, str | None]:
        rows = await self._rows(
            conn,
            "SELECT phase, task_id FROM emo_jobs WHERE batch_id = %s AND key = %s",
            (self._batch_id, key),
        )
        if not rows:
            raise JournalError(f"journal {self._where} has no job with key {key}")
        return JobPhase(rows[0]["phase"]), rows[0]["task_id"]

    async def _transition(
        self,
        key: str,
        allowed: Iterable[JobPhase],
        assignments: str,
        params: Iterable[Any],
        doing: str,
    ) -> tuple[JobPhase, str | None] | None:
        """``UPDATE emo_jobs SET <assignments>`` if the job's phase is in ``allowed``: the
        check is part of the statement, so no other worker's write can come between.

        Returns:
            None when the job changed; else its ``(phase, task_id)``, read in the same
            transaction.
        """
        sql = (
            f"UPDATE emo_jobs SET {assignments}, updated_at = clock_timestamp()"
            " WHERE batch_id = %s AND key = %s AND phase = ANY(%s)"
        ).encode()
        args = (*params, self._batch_id, key, phases(allowed))

        async def run(conn: Conn) -> tuple[JobPhase, str | None] | None:
            cur = await conn.execute(sql, args)
            if cur.rowcount > 0:
                return None
            return await self._phase_of(conn, key)

        return await self._tx(run, doing)

    # ---- caches (shared by every batch of the account)

    async def get_detection(self, image_digest: str, ratio: str) -> Detection | None:
        """The cached detection of a portrait at a ratio, or None."""
        self._live()
        hit = self._detections.get((image_digest, ratio))
        if hit is not None:
            return hit
        rows = await self._fetchall(
            "SELECT detection FROM emo_detections"
            " WHERE account = %s AND image_digest = %s AND ratio = %s",
            (self.account, image_digest, ratio),
        )
        if not rows:
            return None
        # A cache: an entry this version cannot read is detected again.
        with contextlib.suppress(ValueError, TypeError, KeyError):
            found = Detection.from_record(rows[0]["detection"])
            self._detections[(image_digest, ratio)] = found
            return found
        return None

    async def put_detection(self, image_digest: str, ratio: str, detection: Detection) -> None:
        """Cache a detection for the account (replacing an earlier one)."""
        text = json.dumps(detection.to_json())
        await self._tx(
            lambda conn: conn.execute(
                "INSERT INTO emo_detections (account, image_digest, ratio, detection)"
                " VALUES (%s, %s, %s, %s::jsonb) ON CONFLICT (account, image_digest, ratio)"
                " DO UPDATE SET detection = EXCLUDED.detection, created_at = clock_timestamp()",
                (self.account, image_digest, ratio, text),
            ),
            "caching a detection",
        )
        self._detections[(image_digest, ratio)] = detection

    async def get_upload(
        self, digest: str, model: str, *, now: _dt.datetime | None = None
    ) -> str | None:
        """A cached ``oss://`` URL for this content and model still valid for an hour, or None."""
        when = aware(now) or utcnow()
        rows = await self._fetchall(
            "SELECT url, expires_at FROM emo_uploads"
            " WHERE account = %s AND digest = %s AND model = %s",
            (self.account, digest, model),
        )
        if not rows or rows[0]["expires_at"] - when < UPLOAD_MIN_VALIDITY:
            return None
        return str(rows[0]["url"])

    async def put_upload(
        self, digest: str, model: str, url: str, *, expires_at: _dt.datetime
    ) -> None:
        """Cache an upload URL with its expiry for the account (replacing an earlier one)."""
        aware(expires_at)
        await self._tx(
            lambda conn: conn.execute(
                "INSERT INTO emo_uploads (account, digest, model, url, expires_at)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (account, digest, model)"
                " DO UPDATE SET url = EXCLUDED.url, expires_at = EXCLUDED.expires_at,"
                " created_at = clock_timestamp()",
                (self.account, digest, model, url, expires_at),
            ),
            "caching an upload",
        )

    # ---- summary

    async def summary(self, *, now: _dt.datetime | None = None) -> JournalSummary:
        """The batch's counts by phase, billed seconds, failures, downloads at risk and
        unresolved jobs, read in one snapshot."""
        when = aware(now) or utcnow()
        return await self._read(lambda conn: self._summarize(conn, when), "summarising")

    async def _summarize(self, conn: Conn, now: _dt.datetime) -> JournalSummary:
        b = self._batch_id
        async with conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            counts = await self._rows(
                conn,
                "SELECT phase, count(*) AS n FROM emo_jobs WHERE batch_id = %s GROUP BY phase",
                (b,),
            )
            billed = await self._rows(
                conn,
                "SELECT COALESCE(sum(COALESCE(billed_seconds, 0) + billed_earlier), 0) AS s"
                " FROM emo_jobs WHERE batch_id = %s",
                (b,),
            )
            failed = await self._rows(
                conn,
                "SELECT name, phase, error FROM emo_jobs WHERE batch_id = %s"
                " AND phase IN ('failed', 'rejected', 'expired', 'cancelled') ORDER BY seq",
                (b,),
            )
            risky = await self._rows(
                conn,
                "SELECT name, url_deadline FROM emo_jobs WHERE batch_id = %s"
                " AND phase = 'finished' AND url_deadline IS NOT NULL AND url_deadline <= %s"
                " ORDER BY url_deadline",
                (b, now + AT_RISK_WINDOW),
            )
            open_jobs = await self._rows(
                conn,
                "SELECT key, name, intent_at, reason FROM emo_jobs WHERE batch_id = %s"
                " AND phase = 'unresolved' ORDER BY seq",
                (b,),
            )
            cands = await self._rows(
                conn,
                f"SELECT {CANDIDATE_COLUMNS} FROM emo_candidates WHERE batch_id = %s"
                " ORDER BY created_at IS NULL, created_at, task_id",
                (b,),
            )
        found = {str(r["phase"]): int(r["n"]) for r in counts}
        by_phase = {str(p): found.pop(str(p), 0) for p in JobPhase}
        by_phase.update(found)
        by_key: dict[str, list[Candidate]] = {}
        for r in cands:
            by_key.setdefault(r["key"], []).append(candidate_of(r))
        return JournalSummary(
            path=self.path,
            total=sum(by_phase.values()),
            by_phase=by_phase,
            billed_seconds=float(billed[0]["s"]),
            failures=tuple(
                (
                    str(r["name"]),
                    _error(r["error"])
                    or ErrorInfo(kind=str(r["phase"]), message="no reason was recorded"),
                )
                for r in failed
            ),
            at_risk=tuple((str(r["name"]), r["url_deadline"].astimezone(_dt.UTC)) for r in risky),
            now=now,
            unresolved=tuple(
                UnresolvedJob(
                    key=r["key"],
                    name=r["name"],
                    intent_at=_utc(r["intent_at"]),
                    reason=r["reason"],
                    candidates=tuple(by_key.get(r["key"], ())),
                )
                for r in open_jobs
            ),
        )

    async def _pages(self, where: str, params: tuple[Any, ...]) -> AsyncIterator[JobRecord]:
        """The batch's records matching ``where``, in register order, a page at a time."""
        last = 0
        while True:
            rows = await self._fetchall(
                f"SELECT seq, {JOB_COLUMNS} FROM emo_jobs WHERE batch_id = %s AND seq > %s"
                f" {where} ORDER BY seq LIMIT {_PAGE_SIZE}",
                (self._batch_id, last, *params),
            )
            for row in rows:
                yield record_of(row)
            if len(rows) < _PAGE_SIZE:
                return
            last = rows[-1]["seq"]


_PAGE_SIZE: Final = 500


def _translate(exc: psycopg.Error, where: str, doing: str) -> Exception:
    """PostgresUnavailable when the server is gone, a JournalError otherwise."""
    if _lost(exc):
        return PostgresUnavailable(f"PostgreSQL at {where} is unreachable ({doing}): {exc}")
    return JournalError(f"journal {where}: {doing} failed: {exc}")
