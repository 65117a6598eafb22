"""The ledger: what the simulator saw and did, for tests and benchmarks to check."""

from __future__ import annotations

import bisect
from collections import defaultdict

import attrs

__all__ = ["Ledger", "RequestRecord", "TaskInputs", "TaskRecord"]


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
            ``"ambiguous"``, ``"lost"``, ``"submit_code"``, ``"truncate"``, ``"ignore_range"``,
            ``"etag_change"``, ``"slow"``).
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
class TaskInputs:
    """What a task was made from, so a test can prove which job a video belongs to.

    Attributes:
        image_url: The ``image_url`` submitted (as sent, ``oss://`` included).
        audio_url: The ``audio_url`` submitted.
        audio_duration: Seconds of audio the simulator measured (10.0 assumed when inputs are
            not validated); ``usage.video_duration`` bills it rounded to 2 decimals.
        api_key_id: The ``api_key_id`` of the Bearer key that submitted it (as in the list).
        image_sha256: sha256 (hex) of the image bytes (of the URL when not validated).
        audio_sha256: sha256 (hex) of the audio bytes (of the URL when not validated).
        face_bbox: The submitted ``face_bbox``.
        ext_bbox: The submitted ``ext_bbox``.
        style_level: The style level.
    """

    image_url: str
    audio_url: str
    audio_duration: float
    api_key_id: str
    image_sha256: str
    audio_sha256: str
    face_bbox: tuple[int, int, int, int]
    ext_bbox: tuple[int, int, int, int]
    style_level: str


@attrs.frozen(kw_only=True)
class TaskRecord:
    """A task the simulator created (the billing ledger).

    Attributes:
        task_id: The task id.
        fingerprint: sha256 of the canonical input (model, content hashes of the image and
            audio, both boxes, style level): two submits of the same job share it.
        created_at: ``time.monotonic()`` at creation.
        request_id: The submit's request id.
        inputs: What it was made from.
        foreign: Made by "another program" on the same account and key
            (``FaultConfig.other_program_interval``, ``Simulator.create_foreign_task``), not
            by a request to the API.
    """

    task_id: str
    fingerprint: str
    created_at: float
    request_id: str
    inputs: TaskInputs | None = None
    foreign: bool = False


class Ledger:
    """Everything the simulator saw: requests per endpoint and the tasks it created.

    ``tasks_created`` holds every task billed to the account, the other program's included;
    ``foreign_tasks`` names those that no request to the API created.
    """

    def __init__(self) -> None:
        self.requests: list[RequestRecord] = []
        self.tasks_created: list[TaskRecord] = []
        self.foreign_tasks: set[str] = set()
        self.max_running_observed = 0
        self._by_id: dict[str, TaskRecord] = {}

    def reset(self) -> None:
        """Forget everything recorded so far."""
        self.requests = []
        self.tasks_created = []
        self.foreign_tasks = set()
        self.max_running_observed = 0
        self._by_id = {}

    def record(self, record: RequestRecord) -> None:
        """Append a request record."""
        self.requests.append(record)

    def record_task(self, record: TaskRecord) -> None:
        """Append a created task."""
        self.tasks_created.append(record)
        self._by_id[record.task_id] = record
        if record.foreign:
            self.foreign_tasks.add(record.task_id)

    def task(self, task_id: str) -> TaskRecord:
        """The record of a created task.

        Raises:
            KeyError: No such task was recorded.
        """
        return self._by_id[task_id]

    def task_inputs(self, task_id: str) -> TaskInputs:
        """What a created task was made from.

        Raises:
            KeyError: No such task was recorded, or it was recorded without its inputs.
        """
        inputs = self._by_id[task_id].inputs
        if inputs is None:
            raise KeyError(task_id)
        return inputs

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
