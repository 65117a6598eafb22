"""What the batch runner needs from a journal, as a Protocol: a second storage backend (say
PostgreSQL) is one new module whose class has these methods, with the same promises.

The promises every backend keeps: each ``record_*``, ``clear_intent``, ``reset_expired``,
``assign`` and ``release`` is durable before it returns and finishes even when its caller is
cancelled; a phase check and its change are one atomic step; refused transitions raise
:class:`~emo_async.JournalError` and change nothing; a task id belongs to at most one job.
Records, phases and candidates are the shared types of :mod:`.records`.

:class:`ClaimingStore` is what a journal shared by several workers adds (the PostgreSQL one):
claims with leases, the open-task quota across workers, and every worker's open intents. A
backend of one process (SQLite) need not have it; check with ``isinstance``.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import attrs

from .._models import Detection, ErrorInfo, Job
from .records import Candidate, JobPhase, JobRecord
from .summary import JournalSummary

__all__ = ["ClaimingStore", "JournalStore", "OpenIntent"]


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


@attrs.frozen(kw_only=True)
class OpenIntent:
    """An intent without a task id, of any worker and any batch of the account: a submit
    whose answer nobody has recorded (yet). A reconciler treats another worker's as a
    competing lost submit: a task it cannot attribute may be that one's.

    Attributes:
        batch: The batch of the job.
        key: The job's key.
        phase: ``intent`` or ``unresolved``.
        owner: The worker whose claim the job is under (None: unclaimed).
        intent_at: When the intent was recorded, on the recording worker's clock (the one its
            reconciler compares with the API's task times).
        server_at: When the intent was recorded, on the database server's clock (the one
            every worker shares; compare it with :meth:`ClaimingStore.server_now`).
        lease_until: When the owner's claim runs out unless it heartbeats (server clock).
    """

    batch: str
    key: str
    phase: JobPhase
    owner: str | None
    intent_at: _dt.datetime | None
    server_at: _dt.datetime | None
    lease_until: _dt.datetime | None


@runtime_checkable
class ClaimingStore(JournalStore, Protocol):
    """A journal several workers share: each works only on the jobs it claimed.

    Promises on top of :class:`JournalStore`'s: a job is claimed by one owner at a time, until
    its lease (on the server's clock) runs out without a :meth:`heartbeat`; the open-task
    quota of :meth:`reserve_submit` holds across every worker; :meth:`known_task_ids` and
    :meth:`open_intents` cover every batch and every worker of the account.
    """

    async def enqueue(self, items: Iterable[tuple[str, Job]]) -> int: ...

    async def claim(self, owner: str, limit: int, lease: float) -> list[JobRecord]: ...

    async def heartbeat(self, owner: str, lease: float) -> int: ...

    async def release_claims(self, owner: str, keys: Iterable[str] | None = None) -> int: ...

    async def reserve_submit(
        self, key: str, owner: str, max_tasks: int, *, at: _dt.datetime | None = None
    ) -> bool: ...

    async def open_intents(self) -> list[OpenIntent]: ...

    async def server_now(self) -> _dt.datetime: ...
