"""The tasks this client created, for its whole lifetime.

Every submit answer that carries a task id lands here before anything else happens to it, so
that (a) a lost answer of another job is never settled by adopting one of ours, (b) our own
answered submits can witness that the task list covers a lost answer's window, and (c) with
no journal, a job whose caller was cancelled after its task was created finds that task again
instead of paying a second time.
"""

from __future__ import annotations

import datetime as _dt

import attrs

__all__ = ["OwnTask", "OwnedTasks"]


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

    def snapshot(self) -> dict[str, OwnTask]:
        return dict(self._tasks)

    def bind(self, job_key: str, task_id: str) -> None:
        """Remember that ``task_id`` is the task of the job ``job_key`` (for journal-less runs)."""
        self._by_job[job_key] = task_id

    def task_of(self, job_key: str) -> str | None:
        return self._by_job.get(job_key)

    def unbind(self, job_key: str) -> None:
        self._by_job.pop(job_key, None)
