"""The ledger: what the simulator saw and did, for tests and benchmarks to check."""

from __future__ import annotations

import bisect
from collections import defaultdict

import attrs

__all__ = ["Ledger", "RequestRecord", "TaskRecord"]


@attrs.frozen(kw_only=True)
class RequestRecord:
    """One request as the simulator saw it.

    Attributes:
        t: ``time.monotonic()`` on arrival.
        role: ``"api"``, ``"upload"`` or ``"media"``: which listener got it.
        endpoint: The endpoint name (see ``ENDPOINTS``) or ``"other"``.
        method: HTTP method.
        path: Request path (no query string).
        status: HTTP status sent, or None when the connection was dropped without an answer.
        authorization: An ``Authorization`` header was present.
        fault: The injected fault, if any (``"error"``, ``"reset"``, ``"throttle"``,
            ``"ambiguous"``, ``"truncate"``, ``"ignore_range"``, ``"etag_change"``, ``"slow"``).
        bytes_sent: Body bytes sent.
    """

    t: float
    role: str
    endpoint: str
    method: str
    path: str
    status: int | None
    authorization: bool
    fault: str | None = None
    bytes_sent: int = 0


@attrs.frozen(kw_only=True)
class TaskRecord:
    """A task the simulator created (the billing ledger).

    Attributes:
        task_id: The task id.
        fingerprint: sha256 of the canonical input (model, content hashes of the image and
            audio, both boxes, style level): two submits of the same job share it.
        created_at: ``time.monotonic()`` at creation.
        request_id: The submit's request id.
    """

    task_id: str
    fingerprint: str
    created_at: float
    request_id: str


class Ledger:
    """Everything the simulator saw: requests per endpoint and the tasks it created."""

    def __init__(self) -> None:
        self.requests: list[RequestRecord] = []
        self.tasks_created: list[TaskRecord] = []
        self.max_running_observed = 0

    def reset(self) -> None:
        """Forget everything recorded so far."""
        self.requests = []
        self.tasks_created = []
        self.max_running_observed = 0

    def record(self, record: RequestRecord) -> None:
        """Append a request record."""
        self.requests.append(record)

    def record_task(self, record: TaskRecord) -> None:
        """Append a created task."""
        self.tasks_created.append(record)

    def count(self, endpoint: str | None = None, *, status: int | None = None) -> int:
        """Requests of an endpoint (all if None), optionally only those answered ``status``."""
        return sum(
            1
            for r in self.requests
            if (endpoint is None or r.endpoint == endpoint)
            and (status is None or r.status == status)
        )

    def max_in_window(self, endpoint: str, window: float = 1.0) -> int:
        """Most requests of ``endpoint`` that arrived within any window of ``window`` seconds
        (refused ones included)."""
        times = sorted(r.t for r in self.requests if r.endpoint == endpoint)
        best = 0
        for i, t in enumerate(times):
            # Windows are half-open [t, t + window): a client pacing at exactly `rate` puts
            # request n+rate at t + 1.0, which starts the next window.
            j = bisect.bisect_left(times, t + window, lo=i)
            best = max(best, j - i)
        return best

    def throttled(self, endpoint: str | None = None) -> int:
        """429 answers sent (to an endpoint, or in total)."""
        return self.count(endpoint, status=429)

    def auth_leaks(self) -> list[RequestRecord]:
        """Requests that carried an ``Authorization`` header to a non-API host."""
        return [r for r in self.requests if r.authorization and r.role != "api"]

    def bytes_served(self, endpoint: str = "media") -> int:
        """Body bytes sent by an endpoint."""
        return sum(r.bytes_sent for r in self.requests if r.endpoint == endpoint)

    def duplicate_tasks(self) -> dict[str, list[str]]:
        """Fingerprint → task ids, for inputs that were turned into more than one task."""
        groups: defaultdict[str, list[str]] = defaultdict(list)
        for task in self.tasks_created:
            groups[task.fingerprint].append(task.task_id)
        return {fp: ids for fp, ids in groups.items() if len(ids) > 1}
