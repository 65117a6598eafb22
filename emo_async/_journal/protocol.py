"""What the batch runner needs from a journal, as a Protocol: a second storage backend (say
PostgreSQL) is one new module whose class has these methods, with the same promises.

The promises every backend keeps: each ``record_*``, ``clear_intent``, ``reset_expired``,
``assign`` and ``release`` is durable before it returns and finishes even when its caller is
cancelled; a phase check and its change are one atomic step; refused transitions raise
:class:`~emo_async.JournalError` and change nothing; a task id belongs to at most one job.
Records, phases and candidates are the shared types of :mod:`.records`.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from .._models import Detection, ErrorInfo, Job
from .records import Candidate, JobPhase, JobRecord
from .summary import JournalSummary

__all__ = ["JournalStore"]


@runtime_checkable
class JournalStore(Protocol):
    """A journal as the batch runner uses it (the SQLite :class:`Journal` is one)."""

    path: Path
    #: Seconds a terminal write may wait to share its commit with others (0: commit at once).
    commit_delay: float

    async def aclose(self) -> None: ...

    # ---- jobs

    async def register(self, key: str, job: Job) -> JobRecord: ...

    async def register_many(self, items: Iterable[tuple[str, Job]]) -> int: ...

    async def get(self, key: str) -> JobRecord | None: ...

    async def record_intent(self, key: str, *, at: _dt.datetime) -> None: ...

    async def record_submitted(self, key: str, task_id: str, *, at: _dt.datetime) -> None: ...

    async def record_status(self, key: str, status: str) -> None: ...

    async def record_finished(
        self,
        key: str,
        *,
        video_url: str,
        url_deadline: _dt.datetime | None,
        billed_seconds: float | None,
    ) -> None: ...

    async def record_done(
        self,
        key: str,
        *,
        path: str,
        size: int,
        sha256: str,
        billed_seconds: float | None = None,
    ) -> None: ...

    async def record_terminal(
        self,
        key: str,
        phase: JobPhase,
        *,
        error: ErrorInfo | None = None,
        billed_seconds: float | None = None,
    ) -> None: ...

    async def clear_intent(self, key: str) -> None: ...

    async def record_file_missing(
        self, key: str, *, now: _dt.datetime | None = None
    ) -> JobPhase: ...

    async def reset_expired(self, key: str) -> None: ...

    async def unfinished(self) -> list[JobRecord]: ...

    def records(self) -> AsyncIterator[JobRecord]: ...

    async def known_task_ids(self) -> set[str]: ...

    # ---- unresolved jobs

    async def record_unresolved(
        self, key: str, *, reason: str, candidates: Sequence[Candidate]
    ) -> None: ...

    async def candidates(self, key: str | None = None) -> list[Candidate]: ...

    async def record_candidate_file(
        self, task_id: str, *, path: str | os.PathLike[str], size: int, sha256: str
    ) -> None: ...

    async def unresolved(self) -> list[JobRecord]: ...

    async def assign(self, task_id: str, key: str) -> Candidate | None: ...

    async def release(self, task_id: str) -> list[str]: ...

    # ---- caches

    async def get_detection(self, image_digest: str, ratio: str) -> Detection | None: ...

    async def put_detection(self, image_digest: str, ratio: str, detection: Detection) -> None: ...

    async def get_upload(
        self, digest: str, model: str, *, now: _dt.datetime | None = None
    ) -> str | None: ...

    async def put_upload(
        self, digest: str, model: str, url: str, *, expires_at: _dt.datetime
    ) -> None: ...

    # ---- summary

    async def summary(self, *, now: _dt.datetime | None = None) -> JournalSummary: ...
