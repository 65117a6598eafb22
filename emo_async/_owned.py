"""The tasks this client created, for its whole lifetime.

Every submit answer that carries a task id lands here before anything else happens to it, so
that (a) a lost answer of another job is never settled by adopting one of ours, (b) our own
answered submits can witness that the task list covers a lost answer's window, and (c) with
no journal, a job whose caller was cancelled after its task was created finds that task again
instead of paying a second time.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import itertools
from collections.abc import Callable, Iterator

import attrs

__all__ = ["OwnTask", "OwnedTasks", "account_registry"]


@attrs.frozen
class OwnTask:
    """A task of ours whose submit was answered (or one a journal records).

    Attributes:
        task_id: The task.
        sent_at: When its POST went out (our clock), if known.
        answered_at: When its answer came back (our clock), if known.
    """

    task_id: str
    sent_at: _dt.datetime | None = None
    answered_at: _dt.datetime | None = None


class OwnedTasks:
    """Task ids this client knows to be its own, with when their POST went out and came back."""

    def __init__(self) -> None:
        self._tasks: dict[str, OwnTask] = {}
        self._by_job: dict[str, str] = {}
        self._lost: dict[str, tuple[_dt.datetime, _dt.datetime]] = {}
        #: What a lost answer's job was billed for, while it is not settled: (audio, ratio).
        self._lost_bill: dict[str, tuple[float | None, str | None]] = {}
        #: Billed POSTs out right now: (sent_at of the latest attempt, audio, ratio).
        self._out: dict[int, tuple[_dt.datetime, float | None, str | None]] = {}
        self._out_ids = itertools.count()

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._tasks

    def add(
        self,
        task_id: str,
        *,
        sent_at: _dt.datetime | None = None,
        answered_at: _dt.datetime | None = None,
    ) -> None:
        known = self._tasks.get(task_id)
        if known is not None and known.answered_at is not None:
            return  # the first answer's times are the true ones
        self._tasks[task_id] = OwnTask(task_id, sent_at=sent_at, answered_at=answered_at)

    def merge(self, other: OwnedTasks) -> None:
        """Take in another registry's tasks and bindings."""
        for task in other._tasks.values():
            self.add(task.task_id, sent_at=task.sent_at, answered_at=task.answered_at)
        self._by_job.update(other._by_job)
        self._lost.update(other._lost)
        self._lost_bill.update(other._lost_bill)

    def snapshot(self) -> dict[str, OwnTask]:
        return dict(self._tasks)

    def bind(self, job_key: str, task_id: str) -> None:
        """Remember that ``task_id`` is the task of the job ``job_key`` (for journal-less runs)."""
        self._by_job[job_key] = task_id

    def task_of(self, job_key: str) -> str | None:
        return self._by_job.get(job_key)

    def unbind(self, job_key: str) -> None:
        self._by_job.pop(job_key, None)

    def note_lost(
        self,
        job_key: str,
        sent_at: _dt.datetime,
        failed_at: _dt.datetime,
        *,
        audio_seconds: float | None = None,
        ratio: str | None = None,
    ) -> None:
        """A submit of this job lost its answer and is not settled yet: a caller cancelled
        while it was being settled must not send it again blindly, and until it is settled no
        other lost answer (of any batch or call on this account) adopts a task it may have
        made."""
        self._lost[job_key] = (sent_at, failed_at)
        self._lost_bill[job_key] = (audio_seconds, ratio)

    def unsettled(self) -> list[tuple[str, _dt.datetime, float | None, str | None]]:
        """Lost answers not settled yet: (job key, sent at, audio seconds, ratio)."""
        return [
            (key, sent, *self._lost_bill.get(key, (None, None)))
            for key, (sent, _) in self._lost.items()
        ]

    @contextlib.contextmanager
    def out(
        self, sent_at: _dt.datetime, audio_seconds: float | None, ratio: str | None
    ) -> Iterator[Callable[[], None]]:
        """Around a billed POST: until it is answered or given up on, its task may be in the
        task list unknown, and no lost answer on this account adopts a task it may have made.
        Yields a callable to call as each attempt goes out (an attempt is retried only when it
        provably made nothing: only the latest may have)."""
        key = next(self._out_ids)
        self._out[key] = (sent_at, audio_seconds, ratio)

        def attempt() -> None:
            self._out[key] = (_dt.datetime.now(_dt.UTC), audio_seconds, ratio)

        try:
            yield attempt
        finally:
            del self._out[key]

    def posts_out(self) -> list[tuple[_dt.datetime, float | None, str | None]]:
        """Billed POSTs out now: (sent at, audio seconds, ratio)."""
        return list(self._out.values())

    def lost_of(self, job_key: str) -> tuple[_dt.datetime, _dt.datetime] | None:
        return self._lost.get(job_key)

    def settled(self, job_key: str) -> None:
        self._lost.pop(job_key, None)
        self._lost_bill.pop(job_key, None)


class _Accounts:
    """One registry of created tasks per account and key, shared by the clients of this
    process that are open on it at the same time: a task one of them created is never a
    stranger to another (which could otherwise adopt it after a lost answer of its own). It
    lives while one of them is open. Keyed by a digest of the key, never the key itself."""

    def __init__(self) -> None:
        self._open: dict[str, tuple[OwnedTasks, int]] = {}

    @staticmethod
    def _id(base_url: str, api_key: str) -> str:
        return hashlib.sha256(f"{base_url}\0{api_key}".encode()).hexdigest()

    def acquire(self, base_url: str, api_key: str, mine: OwnedTasks) -> OwnedTasks:
        ident = self._id(base_url, api_key)
        shared, users = self._open.get(ident, (mine, 0))
        if shared is not mine:
            shared.merge(mine)
        self._open[ident] = (shared, users + 1)
        return shared

    def release(self, base_url: str, api_key: str) -> None:
        ident = self._id(base_url, api_key)
        shared, users = self._open.get(ident, (None, 0))
        if users <= 1:
            self._open.pop(ident, None)
        elif shared is not None:
            self._open[ident] = (shared, users - 1)


account_registry = _Accounts()
