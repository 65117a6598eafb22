"""What a journal holds, in numbers and in the few lines a person must read (``emo-async
status``): counts, billed seconds, failures, downloads at risk and unresolved jobs.

:func:`read_summary` reads a journal without its lock, so it works while a batch runs.
"""

from __future__ import annotations

import datetime as _dt
import os
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Final

import anyio.to_thread
import attrs

from .._exceptions import JournalCorruptError, JournalError
from .._models import ErrorInfo
from .connection import connect, sqlite_errors
from .lock import absolute
from .records import UNSUCCESSFUL, Candidate, JobPhase, error_from_json, parse_ts, ts, utcnow
from .schema import check_header, check_schema

__all__ = ["AT_RISK_WINDOW", "JournalSummary", "UnresolvedJob", "read_summary", "summarize"]

#: A finished video whose URL runs out within this window is reported as at risk.
AT_RISK_WINDOW: Final = _dt.timedelta(hours=2)


def _frozen_counts(value: Mapping[str, int]) -> Mapping[str, int]:
    return MappingProxyType(dict(value))


def _span(delta: _dt.timedelta) -> str:
    minutes = int(abs(delta.total_seconds()) // 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min"


@attrs.frozen(kw_only=True)
class UnresolvedJob:
    """An unresolved job, for a person to settle: why, and which tasks may be its.

    Attributes:
        key: The job's key.
        name: Its display name.
        intent_at: When the submit whose answer was lost was intended (UTC).
        reason: Why it is unresolved, as recorded.
        candidates: The unattributed tasks that may be its, oldest first.
    """

    key: str
    name: str
    intent_at: _dt.datetime | None
    reason: str | None
    candidates: tuple[Candidate, ...] = ()


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
        unresolved: Every unresolved job with its candidate tasks, in register order.
    """

    path: Path
    total: int
    by_phase: Mapping[str, int] = attrs.field(converter=_frozen_counts)
    billed_seconds: float
    failures: tuple[tuple[str, ErrorInfo], ...]
    at_risk: tuple[tuple[str, _dt.datetime], ...]
    now: _dt.datetime = attrs.field(factory=utcnow)
    unresolved: tuple[UnresolvedJob, ...] = ()

    def render(self, *, limit: int = 20) -> str:
        """A short human-readable text: counts, billed seconds, unresolved jobs, failures and
        downloads at risk.

        Args:
            limit: The most failures (and at-risk and unresolved jobs) listed one by one.
        """
        lines = [f"journal {self.path}: {self.total} job{'s' if self.total != 1 else ''}"]
        counts = [f"{phase} {n}" for phase, n in self.by_phase.items() if n]
        if counts:
            lines.append("  " + " · ".join(counts))
        lines.append(f"billed: {self.billed_seconds:.1f} s of video")
        if self.unresolved:
            lines.append(
                f"unresolved, may have been billed, not sent again ({len(self.unresolved)}):"
            )
            lines += [f"  {self._unresolved_line(job)}" for job in self.unresolved[:limit]]
            if len(self.unresolved) > limit:
                lines.append(f"  ... and {len(self.unresolved) - limit} more")
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

    def _unresolved_line(self, job: UnresolvedJob) -> str:
        why = job.reason
        if not why:
            when = f"{job.intent_at:%Y-%m-%d %H:%M:%S} UTC" if job.intent_at else "an unknown time"
            why = f"answer lost at {when}"
        if not job.candidates:
            return f"{job.name}: unresolved ({why}); no candidate task seen"
        shown = ", ".join(self._candidate_text(c) for c in job.candidates)
        return f"{job.name}: unresolved ({why}); candidates: {shown}"

    def _candidate_text(self, candidate: Candidate) -> str:
        facts = [
            f"{candidate.video_duration:.1f} s" if candidate.video_duration is not None else "? s",
            candidate.status or "status unknown",
        ]
        if candidate.path:
            facts.append(f"saved {self._shown_path(candidate.path)}")
        return f"{candidate.task_id} ({', '.join(facts)})"

    def _shown_path(self, path: str) -> str:
        # The journal lives in the output directory: paths inside it read best relative to it.
        base = self.path.parent
        try:
            return os.fspath(Path(path).relative_to(base))
        except ValueError:
            return path


def summarize(
    conn: sqlite3.Connection, path: Path, now: _dt.datetime, *, version: int
) -> JournalSummary:
    """The summary of the journal on ``conn`` (of schema ``version``), read in one go."""
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
    marks = ", ".join("?" for _ in UNSUCCESSFUL)
    failures = tuple(
        (
            str(row[0]),
            error_from_json(row[2])
            or ErrorInfo(kind=str(row[1]), message="no reason was recorded"),
        )
        for row in conn.execute(
            f"SELECT name, phase, error FROM jobs WHERE phase IN ({marks}) ORDER BY seq",
            UNSUCCESSFUL,
        )
    )
    at_risk = tuple(
        (str(row[0]), deadline)
        for row in conn.execute(
            "SELECT name, url_deadline FROM jobs WHERE phase = ? AND url_deadline IS NOT NULL"
            " AND url_deadline <= ? ORDER BY url_deadline",
            (JobPhase.FINISHED, ts(now + AT_RISK_WINDOW)),
        )
        if (deadline := parse_ts(row[1])) is not None
    )
    return JournalSummary(
        path=path,
        total=sum(by_phase.values()),
        by_phase=by_phase,
        billed_seconds=billed,
        failures=failures,
        at_risk=at_risk,
        now=now,
        unresolved=_unresolved(conn) if version >= 2 else (),
    )


def _unresolved(conn: sqlite3.Connection) -> tuple[UnresolvedJob, ...]:
    jobs = conn.execute(
        "SELECT key, name, intent_at, reason FROM jobs WHERE phase = ? ORDER BY seq",
        (JobPhase.UNRESOLVED,),
    ).fetchall()
    if not jobs:
        return ()
    by_key: dict[str, list[Candidate]] = {}
    for row in conn.execute(
        "SELECT c.* FROM candidates c JOIN jobs j ON j.key = c.key WHERE j.phase = ?"
        " ORDER BY c.created_at IS NULL, c.created_at, c.task_id",
        (JobPhase.UNRESOLVED,),
    ):
        by_key.setdefault(row["key"], []).append(Candidate.from_row(row))
    return tuple(
        UnresolvedJob(
            key=row["key"],
            name=row["name"],
            intent_at=parse_ts(row["intent_at"]),
            reason=row["reason"],
            candidates=tuple(by_key.get(row["key"], ())),
        )
        for row in jobs
    )


def _read_summary(target: Path, now: _dt.datetime) -> JournalSummary:
    if not check_header(target):
        raise JournalError(f"no journal at {target} (missing or empty)")
    try:
        conn = connect(target, read_only=True)
    except sqlite3.Error as exc:
        raise JournalCorruptError(f"cannot open journal {target} ({exc})") from None
    try:
        version = check_schema(conn, target)
        if not version:
            raise JournalCorruptError(f"{target} is an empty SQLite database, not a journal")
        with sqlite_errors(target, "summarising"):
            return summarize(conn, target, now, version=version)
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
    target = await anyio.to_thread.run_sync(absolute, path)
    return await anyio.to_thread.run_sync(_read_summary, target, now or utcnow())
