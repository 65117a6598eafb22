"""What the journal stores: job phases, job records, candidate tasks, keys and conversions.

Nothing here touches a database: a second storage backend reuses all of it.
"""

from __future__ import annotations

import datetime as _dt
import enum
import hashlib
import json
from pathlib import Path
from typing import Any, Final

import attrs

from .._models import ErrorInfo, Job

__all__ = ["Candidate", "JobPhase", "JobRecord", "job_key"]


class JobPhase(enum.StrEnum):
    """The journal's view of a job's life (see the lifecycle in DESIGN.md).

    ``new``: known, nothing spent. ``intent``: an intent was committed; the submit may or may not
    have been sent or answered. ``unresolved``: the submit's answer was lost and nothing proves
    either that a task of ours exists or that none does: it may have been billed, and it is never
    sent again without proof (a later run tries to settle it; see :class:`Candidate`).
    ``submitted``: the task id is known, the task is not finished. ``finished``: the task
    SUCCEEDED and its video URL is known, not yet downloaded. The rest (``done``, ``failed``,
    ``rejected``, ``expired``, ``cancelled``) are terminal.
    """

    NEW = "new"
    INTENT = "intent"
    UNRESOLVED = "unresolved"
    SUBMITTED = "submitted"
    FINISHED = "finished"
    DONE = "done"
    FAILED = "failed"
    REJECTED = "rejected"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        """Whether the job has ended (with or without a video)."""
        return self in TERMINAL


TERMINAL: Final = frozenset(
    {JobPhase.DONE, JobPhase.FAILED, JobPhase.REJECTED, JobPhase.EXPIRED, JobPhase.CANCELLED}
)
UNSUCCESSFUL: Final = (JobPhase.FAILED, JobPhase.REJECTED, JobPhase.EXPIRED, JobPhase.CANCELLED)

# Where each transition may start. A phase not listed is refused with a JournalError, except the
# idempotent repeats each method handles explicitly.
# An expired job was paid for: a new intent needs reset_expired first (the user asked to pay
# again), and an unresolved one may have been: it is settled (adopted, or proven absent) first.
INTENT_FROM: Final = (
    JobPhase.NEW,
    JobPhase.INTENT,
    JobPhase.FAILED,
    JobPhase.REJECTED,
    JobPhase.CANCELLED,
)
SUBMITTED_FROM: Final = (JobPhase.NEW, JobPhase.INTENT, JobPhase.UNRESOLVED)
UNRESOLVED_FROM: Final = (JobPhase.INTENT, JobPhase.UNRESOLVED)
CLEAR_FROM: Final = (JobPhase.INTENT, JobPhase.UNRESOLVED)
FINISHED_FROM: Final = (JobPhase.SUBMITTED, JobPhase.FINISHED)
DONE_FROM: Final = (JobPhase.SUBMITTED, JobPhase.FINISHED, JobPhase.EXPIRED, JobPhase.DONE)
# Not from done (a done job never moves back), nor from unresolved: a "failed" there would
# let the next run send it again, and it may have been billed already.
TERMINAL_FROM: Final = tuple(p for p in JobPhase if p not in (JobPhase.DONE, JobPhase.UNRESOLVED))


# --------------------------------------------------------------------------------------------
# Keys and conversions.


def job_key(job: Job, *, image_digest: str, audio_digest: str, ratio: str) -> str:
    """A stable key for a job: the same manifest gives the same keys, run after run.

    Args:
        job: The job.
        image_digest: A hash of the portrait's content (or of its URL, for remote inputs).
        audio_digest: The same for the audio.
        ratio: The ratio the job runs with (``job.ratio`` or the batch default).

    Returns:
        The SHA-256 hex digest of a canonical JSON of the digests, style, ratio, boxes and name.
    """
    canonical = {
        "v": 1,
        "image": image_digest,
        "audio": audio_digest,
        "style_level": job.style_level,
        "ratio": ratio,
        "face_bbox": list(job.face_bbox) if job.face_bbox is not None else None,
        "ext_bbox": list(job.ext_bbox) if job.ext_bbox is not None else None,
        # The effective name: it decides the output file, so two jobs writing different files
        # are different jobs even when their inputs match.
        "name": job.display_name,
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def job_to_json(job: Job) -> str:
    data = {
        "image": str(job.image),
        "audio": str(job.audio),
        "name": job.name,
        "style_level": job.style_level,
        "ratio": job.ratio,
        "face_bbox": list(job.face_bbox) if job.face_bbox is not None else None,
        "ext_bbox": list(job.ext_bbox) if job.ext_bbox is not None else None,
        # Which inputs were local paths, so the job comes back equal to the one registered.
        "local": [f for f in ("image", "audio") if isinstance(getattr(job, f), Path)],
    }
    return json.dumps(data, sort_keys=True, ensure_ascii=False)


def job_from_json(text: str) -> Job:
    data = json.loads(text)
    local = set(data.get("local") or ())
    image: str | Path = Path(data["image"]) if "image" in local else str(data["image"])
    audio: str | Path = Path(data["audio"]) if "audio" in local else str(data["audio"])
    return Job(
        image,
        audio,
        name=data.get("name"),
        style_level=data.get("style_level", "normal"),
        ratio=data.get("ratio"),
        face_bbox=data.get("face_bbox"),
        ext_bbox=data.get("ext_bbox"),
    )


def ts(value: _dt.datetime) -> str:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"journal times must be timezone-aware (UTC), got naive {value!r}")
    # A fixed width (always microseconds, always +00:00) makes text order equal time order.
    return value.astimezone(_dt.UTC).isoformat(timespec="microseconds")


def opt_ts(value: _dt.datetime | None) -> str | None:
    return None if value is None else ts(value)


def parse_ts(text: str | None) -> _dt.datetime | None:
    if text is None:
        return None
    parsed = _dt.datetime.fromisoformat(text)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=_dt.UTC)


def utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def error_to_json(error: ErrorInfo | None) -> str | None:
    return None if error is None else json.dumps(error.to_json(), sort_keys=True)


def error_from_json(text: str | None) -> ErrorInfo | None:
    return None if text is None else ErrorInfo.from_json(json.loads(text))


# --------------------------------------------------------------------------------------------
# Records.


@attrs.frozen
class JobRecord:
    """One job as the journal knows it.

    Attributes:
        key: The job's key (:func:`job_key`).
        name: The job's display name.
        phase: Where the job is (see :class:`JobPhase`).
        job: The job as registered.
        task_id: The emo-v1 task of the current attempt, once known.
        intent_at: When the current attempt's intent was recorded (UTC).
        submitted_at: When its task id was recorded (UTC).
        task_status: The last task status seen.
        video_url: The result URL, once the task SUCCEEDED.
        url_deadline: When that URL stops working (UTC), when known.
        billed_seconds: Seconds of video billed for the current attempt, when known.
        path, size, sha256: The verified video file (``done``).
        error: Why the job did not produce a video.
        reason: Why the job is ``unresolved`` (None in any other phase).
        attempts: How many intents were recorded for this key.
        updated_at: When the record last changed (UTC).
    """

    key: str
    name: str
    phase: JobPhase
    job: Job
    task_id: str | None = None
    intent_at: _dt.datetime | None = None
    submitted_at: _dt.datetime | None = None
    task_status: str | None = None
    video_url: str | None = attrs.field(default=None, repr=False)
    url_deadline: _dt.datetime | None = None
    billed_seconds: float | None = None
    path: str | None = None
    size: int | None = None
    sha256: str | None = None
    error: ErrorInfo | None = None
    attempts: int = 0
    updated_at: _dt.datetime = attrs.field(factory=utcnow)
    reason: str | None = None

    @classmethod
    def from_row(cls, row: Any) -> JobRecord:
        """The record of a ``jobs`` row (any mapping with the columns of ``JOB_COLUMNS``)."""
        updated = parse_ts(row["updated_at"])
        assert updated is not None
        return cls(
            key=row["key"],
            name=row["name"],
            phase=JobPhase(row["phase"]),
            job=job_from_json(row["job"]),
            task_id=row["task_id"],
            intent_at=parse_ts(row["intent_at"]),
            submitted_at=parse_ts(row["submitted_at"]),
            task_status=row["task_status"],
            video_url=row["video_url"],
            url_deadline=parse_ts(row["url_deadline"]),
            billed_seconds=row["billed_seconds"],
            path=row["path"],
            size=row["size"],
            sha256=row["sha256"],
            error=error_from_json(row["error"]),
            attempts=row["attempts"],
            updated_at=updated,
            reason=row["reason"],
        )


@attrs.frozen(kw_only=True)
class Candidate:
    """A task that may be an unresolved job's: created in the window its lost answer leaves, and
    owned by no job of the journal (an "unattributed" task).

    Attributes:
        task_id: The task.
        created_at: When the server says it was created (UTC), when known.
        status: Its last status seen (``SUCCEEDED``, ...), when known.
        video_duration: Seconds of video it made (what it billed), when known.
        video_url: Its result URL, when known.
        url_deadline: When that URL stops working (UTC), when known.
        path: Where its video was saved (``<out>/.unattributed/<task_id>.mp4``), once it was.
        size, sha256: That file's size and SHA-256.
    """

    task_id: str
    created_at: _dt.datetime | None = None
    status: str | None = None
    video_duration: float | None = None
    video_url: str | None = attrs.field(default=None, repr=False)
    url_deadline: _dt.datetime | None = None
    path: str | None = None
    size: int | None = None
    sha256: str | None = None

    @classmethod
    def from_row(cls, row: Any) -> Candidate:
        """The candidate of a ``candidates`` row."""
        return cls(
            task_id=row["task_id"],
            created_at=parse_ts(row["created_at"]),
            status=row["status"],
            video_duration=row["video_duration"],
            video_url=row["video_url"],
            url_deadline=parse_ts(row["url_deadline"]),
            path=row["path"],
            size=row["size"],
            sha256=row["sha256"],
        )
