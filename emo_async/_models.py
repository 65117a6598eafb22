"""Frozen records: what the user asks for (:class:`Job`), what the server says (:class:`Task`,
:class:`Detection`) and how a job ended (:class:`Outcome`).

Wire ↔ model conversion lives only in ``from_json`` / ``to_json``.
"""

from __future__ import annotations

import datetime as _dt
import enum
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, TypeAlias

import attrs

__all__ = [
    "BBox",
    "Detection",
    "ErrorInfo",
    "Job",
    "Outcome",
    "OutcomeState",
    "Ratio",
    "StyleLevel",
    "Task",
    "TaskListItem",
    "TaskPage",
    "TaskStatus",
    "parse_server_time",
]

BBox: TypeAlias = tuple[int, int, int, int]
Ratio: TypeAlias = Literal["1:1", "3:4"]
StyleLevel: TypeAlias = Literal["normal", "calm", "active"]

#: DashScope writes times as ``"2023-12-20 21:36:31.896"`` without a zone; it is Beijing time.
SERVER_TZ = _dt.timezone(_dt.timedelta(hours=8), "UTC+08:00")


def parse_server_time(value: object) -> _dt.datetime | None:
    """Parse a DashScope timestamp (``"YYYY-MM-DD hh:mm:ss.fff"``, UTC+8) or epoch millis."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _dt.datetime.fromtimestamp(float(value) / 1000.0, _dt.UTC)
    if not isinstance(value, str):
        return None
    text = value.strip()
    for fmt in ("%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%d %H:%M:%S"):
        try:
            return _dt.datetime.strptime(text, fmt).replace(tzinfo=SERVER_TZ)
        except ValueError:
            continue
    try:
        parsed = _dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=SERVER_TZ)


class TaskStatus(enum.StrEnum):
    """A task's status. Statuses the documents do not list are kept as they come and are
    treated as not finished (``TaskStatus("WARMING")`` works and is not terminal)."""

    PENDING = "PENDING"
    PRE_PROCESSING = "PRE-PROCESSING"
    RUNNING = "RUNNING"
    POST_PROCESSING = "POST-PROCESSING"
    SUSPENDED = "SUSPENDED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"
    UNKNOWN = "UNKNOWN"

    @classmethod
    def _missing_(cls, value: object) -> TaskStatus | None:
        if not isinstance(value, str):
            return None
        member = str.__new__(cls, value)
        member._name_ = value
        member._value_ = value
        return member

    @property
    def is_terminal(self) -> bool:
        """SUCCEEDED, FAILED, CANCELED or UNKNOWN (the task is gone)."""
        return self.value in _TERMINAL

    @property
    def is_known(self) -> bool:
        """Whether the status is one of the documented ones."""
        return self.value in TaskStatus.__members__.values()


_TERMINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELED", "UNKNOWN"})


def _is_whole(i: object) -> bool:
    if isinstance(i, bool):
        return False
    return isinstance(i, int) or (isinstance(i, float) and i.is_integer())


def _as_bbox(value: object) -> BBox | None:
    if value is None:
        return None
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise TypeError(f"a bbox is 4 integers [x1, y1, x2, y2], got {value!r}")
    items = list(value)
    if len(items) != 4 or not all(_is_whole(i) for i in items):
        raise TypeError(f"a bbox is 4 integers [x1, y1, x2, y2], got {value!r}")
    a, b, c, d = (int(i) for i in items)
    return (a, b, c, d)


@attrs.frozen
class Detection:
    """The answer of emo-detect-v1 for one portrait.

    Attributes:
        check_pass: Whether the portrait can be animated.
        face_bbox: The face box ``[x1, y1, x2, y2]`` (when it passed).
        ext_bbox: The motion box, of the requested ``ratio`` (when it passed).
        message: Why it did not pass.
        ratio: The ratio asked for.
        request_id: DashScope's request id.
    """

    check_pass: bool
    face_bbox: BBox | None = None
    ext_bbox: BBox | None = None
    message: str | None = None
    ratio: Ratio = "1:1"
    request_id: str | None = None

    @classmethod
    def from_json(cls, body: Mapping[str, Any], *, ratio: Ratio = "1:1") -> Detection:
        output = body.get("output") or {}
        check = output.get("check_pass")
        if check is None:
            check = output.get("pass", False)
        try:
            face = _as_bbox(output.get("face_bbox"))
            ext = _as_bbox(output.get("ext_bbox"))
        except TypeError:
            face = ext = None
        return cls(
            check_pass=bool(check),
            face_bbox=face,
            ext_bbox=ext,
            message=output.get("message") or output.get("reason"),
            ratio=ratio,
            request_id=body.get("request_id"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "check_pass": self.check_pass,
            "face_bbox": list(self.face_bbox) if self.face_bbox else None,
            "ext_bbox": list(self.ext_bbox) if self.ext_bbox else None,
            "message": self.message,
            "ratio": self.ratio,
            "request_id": self.request_id,
        }

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> Detection:
        """Inverse of :meth:`to_json` (used by the journal's cache)."""
        return cls(
            check_pass=bool(data["check_pass"]),
            face_bbox=_as_bbox(data.get("face_bbox")),
            ext_bbox=_as_bbox(data.get("ext_bbox")),
            message=data.get("message"),
            ratio=data.get("ratio", "1:1"),
            request_id=data.get("request_id"),
        )


def _empty_raw() -> Mapping[str, Any]:
    return MappingProxyType({})


def _read_only(value: Mapping[str, Any]) -> Mapping[str, Any]:
    # A view, not a copy: the body was parsed for this answer alone, and the poller reads
    # many of them.
    if isinstance(value, MappingProxyType):
        return value
    return MappingProxyType(value if isinstance(value, dict) else dict(value))


@attrs.frozen
class Task:
    """The server's snapshot of one emo-v1 task.

    Attributes:
        task_id: DashScope's task id.
        status: Its status; unknown values are kept (see :class:`TaskStatus`).
        video_url: The result URL once SUCCEEDED; valid 24 h after ``end_time``.
        video_duration: Billed seconds of video (``usage.video_duration``).
        video_ratio: ``"1:1"`` or ``"3:4"``.
        submit_time, scheduled_time, end_time: Server times (timezone-aware).
        code, message: The failure reason when FAILED.
        request_id: Request id of the answer this snapshot came from.
        raw: The whole JSON body this snapshot was read from, read-only (for fields this
            record does not model); empty for a Task made by hand. Not part of equality or
            repr: two snapshots that say the same are equal whatever else the bodies held.
    """

    task_id: str
    status: TaskStatus
    video_url: str | None = None
    video_duration: float | None = None
    video_ratio: str | None = None
    submit_time: _dt.datetime | None = None
    scheduled_time: _dt.datetime | None = None
    end_time: _dt.datetime | None = None
    code: str | None = None
    message: str | None = None
    request_id: str | None = None
    raw: Mapping[str, Any] = attrs.field(
        factory=_empty_raw, converter=_read_only, eq=False, repr=False, kw_only=True
    )

    @property
    def is_terminal(self) -> bool:
        return self.status.is_terminal

    @property
    def succeeded(self) -> bool:
        return self.status == TaskStatus.SUCCEEDED

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Task:
        """Read a submit, query or cancel answer.

        ``output.results`` may be an object or a list of objects (the document says both);
        ``output.video_url`` at the top of ``output`` is accepted too.
        """
        output = body.get("output") or {}
        usage = body.get("usage") or {}
        results = output.get("results")
        url = None
        if isinstance(results, Mapping):
            url = results.get("video_url")
        elif isinstance(results, list):
            for item in results:
                if isinstance(item, Mapping) and item.get("video_url"):
                    url = item["video_url"]
                    break
        if url is None:
            url = output.get("video_url")
        if isinstance(url, list):
            url = url[0] if url else None
        duration = usage.get("video_duration", usage.get("duration"))
        try:
            duration_f = float(duration) if duration is not None else None
        except (TypeError, ValueError):
            duration_f = None
        return cls(
            task_id=str(output.get("task_id") or ""),
            # No status at all is a malformed answer, not a verdict: kept as a non-terminal
            # pseudo-status so a billed task is never written off on a glitch.
            status=TaskStatus(str(output.get("task_status") or "MISSING")),
            video_url=str(url) if url else None,
            video_duration=duration_f,
            video_ratio=usage.get("video_ratio"),
            submit_time=parse_server_time(output.get("submit_time")),
            scheduled_time=parse_server_time(output.get("scheduled_time")),
            end_time=parse_server_time(output.get("end_time")),
            code=output.get("code"),
            message=output.get("message"),
            request_id=body.get("request_id"),
            raw=body,
        )


def _path_or_str(value: str | os.PathLike[str]) -> str | Path:
    if isinstance(value, Path):
        return value
    if isinstance(value, os.PathLike):
        return Path(value)
    return value


def _bbox_converter(value: object) -> BBox | None:
    return _as_bbox(value)


@attrs.frozen
class Job:
    """One video to make: a portrait and a voice recording.

    ``image`` and ``audio`` are each a local path, an ``http(s)://`` URL or an ``oss://`` URL
    from :meth:`Client.upload`. Without boxes the client runs emo-detect-v1 (once per portrait
    and ratio) to get them.

    Attributes:
        image: The portrait.
        audio: The voice (wav or mp3, < 15 MB, < 60 s).
        name: Output file stem and report name; derived from the audio file name if not given.
        style_level: ``"normal"``, ``"calm"`` or ``"active"``.
        ratio: ``"1:1"`` (head, 512x512) or ``"3:4"`` (half body, 512x704); default 1:1.
        face_bbox, ext_bbox: Boxes from an earlier detection, to skip detecting again.
    """

    image: str | Path = attrs.field(converter=_path_or_str)
    audio: str | Path = attrs.field(converter=_path_or_str)
    name: str | None = attrs.field(default=None, kw_only=True)
    style_level: str = attrs.field(default="normal", kw_only=True)
    ratio: str | None = attrs.field(default=None, kw_only=True)
    face_bbox: BBox | None = attrs.field(default=None, kw_only=True, converter=_bbox_converter)
    ext_bbox: BBox | None = attrs.field(default=None, kw_only=True, converter=_bbox_converter)

    @property
    def display_name(self) -> str:
        """The name, or a stem derived from the audio source."""
        if self.name:
            return self.name
        src = str(self.audio).rstrip("/").split("?", 1)[0]
        stem = src.rsplit("/", 1)[-1].rsplit("\\", 1)[-1]
        return stem.rsplit(".", 1)[0] if "." in stem else stem or "job"


class OutcomeState(enum.StrEnum):
    """How a job ended.

    ``done``: a verified file at its final path. ``rejected``: refused before any money was
    spent (validation, detection). ``failed``: the server or the network said no. ``expired``:
    paid for, but the video URL ran out before it was saved. ``cancelled``: stopped on request.
    ``unresolved``: the submit's answer was lost and nothing proves whether a task exists: it
    may have been billed, it was not resent; videos that may be its are kept in
    ``.unattributed/`` and a later run tries again to settle it.
    """

    DONE = "done"
    REJECTED = "rejected"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    UNRESOLVED = "unresolved"


@attrs.frozen
class ErrorInfo:
    """A serialisable summary of an error (what reports and the journal keep).

    Attributes:
        kind: The exception class name, e.g. ``"InvalidURLError"``.
        message: Its text.
        code: DashScope's error code, when the server gave one.
        request_id: DashScope's request id, when known.
    """

    kind: str
    message: str
    code: str | None = None
    request_id: str | None = None

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorInfo:
        return cls(
            kind=type(exc).__name__,
            message=str(exc),
            code=getattr(exc, "code", None),
            request_id=getattr(exc, "request_id", None),
        )

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ErrorInfo:
        return cls(
            kind=str(data.get("kind", "EmoError")),
            message=str(data.get("message", "")),
            code=data.get("code"),
            request_id=data.get("request_id"),
        )


@attrs.frozen
class Outcome:
    """How one job ended.

    Attributes:
        job: The job.
        state: See :class:`OutcomeState`.
        task_id: The emo-v1 task, when one was created.
        path: The verified video file (``done`` only).
        size: Its size in bytes.
        sha256: Its SHA-256, computed while it was written.
        billed_seconds: Seconds of video billed (``usage.video_duration``).
        video_url: The result URL, while valid.
        error: What went wrong, when something did.
        exception: The exception itself (in-process only; not kept in journals).
    """

    job: Job
    state: OutcomeState
    task_id: str | None = None
    path: Path | None = None
    size: int | None = None
    sha256: str | None = None
    billed_seconds: float | None = None
    video_url: str | None = attrs.field(default=None, repr=False)
    error: ErrorInfo | None = None
    exception: BaseException | None = attrs.field(default=None, eq=False, repr=False)

    @property
    def ok(self) -> bool:
        return self.state == OutcomeState.DONE


@attrs.frozen
class TaskListItem:
    """One row of ``GET /tasks`` (the task list carries no result URLs).

    Attributes:
        task_id: The task.
        status: Its status.
        created_at: When the server created it (``gmt_create``).
        end_time: When it finished, if it did.
        model_name: The model that runs it.
        request_id: The request id of the submit that created it.
    """

    task_id: str
    status: TaskStatus
    created_at: _dt.datetime | None = None
    end_time: _dt.datetime | None = None
    model_name: str | None = None
    request_id: str | None = None

    @classmethod
    def from_json(cls, item: Mapping[str, Any]) -> TaskListItem:
        return cls(
            task_id=str(item.get("task_id") or ""),
            status=TaskStatus(str(item.get("status") or item.get("task_status") or "UNKNOWN")),
            created_at=parse_server_time(item.get("gmt_create"))
            or parse_server_time(item.get("submit_time")),
            end_time=parse_server_time(item.get("end_time")),
            model_name=item.get("model_name"),
            request_id=item.get("request_id"),
        )


@attrs.frozen
class TaskPage:
    """One page of ``GET /tasks``.

    Attributes:
        items: Its rows.
        page_no: The page asked for.
        page_size: The page size in force: the server's echo when it sent one (a server may
            cap what was asked for), else the size asked for.
        total_page: The server's page count, when it sent one.
        total: The server's count of matching tasks, when it sent one.
    """

    items: tuple[TaskListItem, ...]
    page_no: int
    page_size: int
    total_page: int | None = None
    total: int | None = None

    @property
    def is_last(self) -> bool:
        """No page after this one: it is empty, the last by ``total_page``, or short.

        A short page is only a hint (a server may cap the page size without saying so): use
        :attr:`proves_end` where the end of the list must be proven.
        """
        if not self.items:
            return True
        if self.total_page is not None:
            return self.page_no >= self.total_page
        return len(self.items) < self.page_size

    @property
    def proves_end(self) -> bool:
        """The server itself says nothing follows: an empty page, or ``total_page`` reached."""
        if not self.items:
            return True
        return self.total_page is not None and self.page_no >= self.total_page
