"""Mutable state of one simulator: tasks and their lazy FIFO schedule, uploads, rate buckets."""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Iterator, Mapping

import attrs

from ._clock import SimClock
from ._config import SimulatorConfig
from ._ledger import Ledger

__all__ = ["SimTask", "StoredObject", "TaskSnapshot", "TaskStore", "TasksView", "TokenBucket"]

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELED"})


@attrs.define(eq=False, kw_only=True)
class SimTask:
    """One task. Its status is computed from its times, never stored."""

    task_id: str
    request_id: str
    model: str
    api_key_id: str
    created: float
    fingerprint: str
    #: Simulated seconds from scheduling to the end (success, or failure after pre-processing).
    duration: float
    audio_duration: float
    ratio: str
    style_level: str
    failure: tuple[str, str] | None
    scheduled: float | None = None
    canceled_at: float | None = None
    media_generation: int = 0
    #: Cached real unix ``Expires`` of the video URL and the clock generation it was made for.
    url_expires: int | None = None
    url_clock_generation: int = -1

    @property
    def ended(self) -> float | None:
        """Simulated time of the end (None while not finished being scheduled)."""
        if self.canceled_at is not None:
            return self.canceled_at
        if self.scheduled is None:
            return None
        return self.scheduled + self.duration

    def status(self, now: float) -> str:
        """The status at simulated time ``now`` (retention is the store's business)."""
        if self.canceled_at is not None:
            return "CANCELED"
        if self.scheduled is None or now < self.scheduled:
            return "PENDING"
        elapsed = now - self.scheduled
        if elapsed >= self.duration:
            return "FAILED" if self.failure is not None else "SUCCEEDED"
        if self.failure is not None:
            return "PRE-PROCESSING"
        if elapsed < 0.1 * self.duration:
            return "PRE-PROCESSING"
        if elapsed < 0.9 * self.duration:
            return "RUNNING"
        return "POST-PROCESSING"


@attrs.frozen(kw_only=True)
class TaskSnapshot:
    """A read-only view of a task at one instant (``Simulator.tasks``); times are simulated
    seconds since the simulator started."""

    task_id: str
    status: str
    fingerprint: str
    model: str
    style_level: str
    ratio: str
    audio_duration: float
    submitted: float
    scheduled: float | None
    ended: float | None
    processing_seconds: float
    error_code: str | None
    request_id: str


class TaskStore:
    """Tasks by id, and a FIFO queue behind the account's concurrency cap.

    Scheduling is lazy and exact: :meth:`catch_up` replays, in time order, every start that
    must have happened by now (a task starts when it is at the head of the queue and one of
    ``max_running`` slots is free). Each task is scheduled once, so the cost is O(log cap) per
    task, whatever the polling rate.
    """

    def __init__(self, config: SimulatorConfig, clock: SimClock, ledger: Ledger) -> None:
        self._config = config
        self._clock = clock
        self._ledger = ledger
        self._tasks: dict[str, SimTask] = {}
        self._pending: deque[SimTask] = deque()
        self._ends: list[float] = []

    def __len__(self) -> int:
        return len(self._tasks)

    def add(self, task: SimTask) -> None:
        """Queue a new task (PENDING)."""
        self._tasks[task.task_id] = task
        self._pending.append(task)
        self.catch_up()

    def catch_up(self) -> float:
        """Schedule everything due by now; returns the simulated now."""
        now = self._clock.now()
        cap = self._config.max_running
        pending, ends = self._pending, self._ends
        while pending:
            head = pending[0]
            if head.canceled_at is not None:
                pending.popleft()
                continue
            if len(ends) < cap:
                start = head.created
            elif ends[0] <= now:
                start = max(head.created, heapq.heappop(ends))
            else:
                break
            pending.popleft()
            head.scheduled = start
            heapq.heappush(ends, start + head.duration)
            running = sum(1 for end in ends if end > start)
            if running > self._ledger.max_running_observed:
                self._ledger.max_running_observed = running
        return now

    def _expired(self, task: SimTask, now: float) -> bool:
        ended = task.ended
        return ended is not None and now >= ended + self._config.task_retention

    def get(self, task_id: str, now: float) -> SimTask | None:
        """The task, or None when unknown or past retention."""
        task = self._tasks.get(task_id)
        if task is None or self._expired(task, now):
            return None
        return task

    def raw(self, task_id: str) -> SimTask | None:
        """The task even past retention (for the media host and tests)."""
        return self._tasks.get(task_id)

    def newest_first(self, now: float) -> Iterator[SimTask]:
        """Live tasks, newest first (O(N): for the list endpoint only)."""
        for task in reversed(self._tasks.values()):
            if not self._expired(task, now):
                yield task

    def snapshot(self, task: SimTask, now: float) -> TaskSnapshot:
        """Freeze a task's state at ``now``."""
        return TaskSnapshot(
            task_id=task.task_id,
            status="UNKNOWN" if self._expired(task, now) else task.status(now),
            fingerprint=task.fingerprint,
            model=task.model,
            style_level=task.style_level,
            ratio=task.ratio,
            audio_duration=task.audio_duration,
            submitted=task.created,
            scheduled=task.scheduled,
            ended=task.ended if task.status(now) in TERMINAL else None,
            processing_seconds=task.duration,
            error_code=task.failure[0] if task.failure else None,
            request_id=task.request_id,
        )

    def ids(self) -> Iterator[str]:
        """All task ids ever created, oldest first."""
        return iter(self._tasks)


class TasksView(Mapping[str, TaskSnapshot]):
    """``Simulator.tasks``: task id → :class:`TaskSnapshot`, computed on access."""

    def __init__(self, store: TaskStore) -> None:
        self._store = store

    def __getitem__(self, task_id: str) -> TaskSnapshot:
        now = self._store.catch_up()
        task = self._store.raw(task_id)
        if task is None:
            raise KeyError(task_id)
        return self._store.snapshot(task, now)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._store.ids()))

    def __len__(self) -> int:
        return len(self._store)


@attrs.define(eq=False, kw_only=True)
class StoredObject:
    """A temporary upload (``oss://<key>``)."""

    key: str
    data: bytes | bytearray
    created: float
    content_type: str
    #: The model named when the upload policy was issued: only that model may read the file.
    model: str | None = None


class TokenBucket:
    """Capacity ``max(1, rate)`` tokens, refilled at ``rate`` per real second."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self._tokens = self.capacity
        self._last = time.monotonic()

    def take(self) -> bool:
        """Take a token if there is one."""
        now = time.monotonic()
        self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0 - 1e-9:
            self._tokens -= 1.0
            return True
        return False
