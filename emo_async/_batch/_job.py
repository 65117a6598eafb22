"""One job in flight, the events a batch reports, and the one place outcomes are emitted."""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import attrs
from anyio.streams.memory import MemoryObjectSendStream

from .._models import ErrorInfo, Job, Outcome, OutcomeState

if TYPE_CHECKING:
    from .._config import RetryPolicy
    from .._journal import JobRecord, Journal
    from .._media import ValidatedJob

__all__ = [
    "THROTTLED_FACTOR",
    "TRANSIENT_TRIES",
    "BatchEvent",
    "BatchStats",
    "EventKind",
    "InFlight",
    "Reporter",
    "is_transient",
    "pause_after",
    "tries_for",
]

logger = logging.getLogger("emo_async.batch")


class EventKind(enum.StrEnum):
    """What happened to a job (:attr:`BatchEvent.kind`)."""

    VALIDATED = "validated"
    REJECTED = "rejected"
    UPLOADED = "uploaded"
    DETECTED = "detected"
    SUBMITTED = "submitted"
    RECONCILING = "reconciling"
    ADOPTED = "adopted"
    FINISHED = "finished"
    DOWNLOADED = "downloaded"
    KEPT = "kept"
    OUTCOME = "outcome"
    SKIPPED = "skipped"
    RESUMED = "resumed"


@attrs.frozen
class BatchEvent:
    """Something happened to one job.

    Attributes:
        kind: What happened (an :class:`EventKind`, which compares equal to its string).
        name: The job's display name.
        task_id: Its task, when there is one.
        detail: Free text (a state, an error, a path).
    """

    kind: EventKind
    name: str
    task_id: str | None = None
    detail: str | None = None


@attrs.frozen
class BatchStats:
    """A snapshot of a running batch (for progress displays).

    Attributes:
        total: Jobs in the batch, when the input has a length (else ``None`` until read).
        seen: Jobs read so far.
        preparing: Jobs being validated, uploaded or detected.
        submitting: Jobs waiting for or in the submit stage.
        running: Tasks open on the server.
        downloading: Videos being downloaded.
        reconciling: Jobs whose submit answer was lost, being settled.
        done, failed, rejected, expired, cancelled, unresolved, skipped: Outcomes so far
            (skipped = done in an earlier run, counted in ``done`` too).
        billed_seconds: Seconds of video billed so far, in this run.
        throttled: 429s the client received.
        elapsed: Seconds since the batch started.
        eta: Estimated seconds to go, when it can be estimated.
    """

    total: int | None
    seen: int
    preparing: int
    submitting: int
    running: int
    downloading: int
    done: int
    failed: int
    rejected: int
    expired: int
    cancelled: int
    skipped: int
    billed_seconds: float
    throttled: int
    elapsed: float
    eta: float | None
    unresolved: int = 0
    reconciling: int = 0

    @property
    def finished(self) -> int:
        return (
            self.done
            + self.failed
            + self.rejected
            + self.expired
            + self.cancelled
            + self.unresolved
        )


@attrs.define(eq=False)
class InFlight:
    """A job on its way through the stages."""

    job: Job
    key: str = ""
    validated: ValidatedJob | None = None
    image_url: str | None = None
    audio_url: str | None = None
    face_bbox: tuple[int, int, int, int] | None = None
    ext_bbox: tuple[int, int, int, int] | None = None
    audio_seconds: float | None = None
    ratio: str | None = None
    task_id: str | None = None
    record: JobRecord | None = None
    dest: Path | None = None

    @property
    def name(self) -> str:
        return self.job.display_name


class Reporter:
    """Counts, events and outcomes: every outcome of a batch goes out through :meth:`emit`."""

    def __init__(
        self,
        out: MemoryObjectSendStream[Outcome],
        journal: Journal | None,
        on_event: Callable[[BatchEvent], object] | None,
    ) -> None:
        self._out = out
        self._journal = journal
        self._on_event = on_event
        self.started = time.monotonic()
        self.seen = 0
        self.preparing = 0
        self.submitting = 0
        self.running = 0
        self.downloading = 0
        self.reconciling = 0
        self.states: dict[OutcomeState, int] = dict.fromkeys(OutcomeState, 0)
        self.skipped = 0
        self.billed = 0.0

    @staticmethod
    def idle(total: int | None, throttled: int) -> BatchStats:
        """The stats of a batch that has not started."""
        return BatchStats(
            total=total,
            seen=0,
            preparing=0,
            submitting=0,
            running=0,
            downloading=0,
            done=0,
            failed=0,
            rejected=0,
            expired=0,
            cancelled=0,
            skipped=0,
            billed_seconds=0.0,
            throttled=throttled,
            elapsed=0.0,
            eta=None,
        )

    def stats(self, total: int | None, throttled: int) -> BatchStats:
        """A snapshot for progress displays."""
        elapsed = time.monotonic() - self.started
        finished = sum(self.states.values())
        fresh = finished - self.skipped
        eta = None
        if total is not None and fresh > 0 and elapsed > 0:
            eta = max(0.0, (total - finished) / (fresh / elapsed))
        return BatchStats(
            total=total,
            seen=self.seen,
            preparing=self.preparing,
            submitting=self.submitting,
            running=self.running,
            downloading=self.downloading,
            done=self.states[OutcomeState.DONE],
            failed=self.states[OutcomeState.FAILED],
            rejected=self.states[OutcomeState.REJECTED],
            expired=self.states[OutcomeState.EXPIRED],
            cancelled=self.states[OutcomeState.CANCELLED],
            unresolved=self.states[OutcomeState.UNRESOLVED],
            reconciling=self.reconciling,
            skipped=self.skipped,
            billed_seconds=self.billed,
            throttled=throttled,
            elapsed=elapsed,
            eta=eta,
        )

    def event(self, kind: EventKind, item: InFlight, detail: str | None = None) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(BatchEvent(kind, item.name, item.task_id, detail))
        except Exception:  # a progress display must never break the batch
            logger.exception("on_event callback failed")

    async def emit(
        self,
        item: InFlight,
        state: OutcomeState,
        *,
        exc: BaseException | None = None,
        path: Path | None = None,
        size: int | None = None,
        sha256: str | None = None,
        billed: float | None = None,
        video_url: str | None = None,
        journal_phase: bool = True,
        skipped: bool = False,
    ) -> None:
        """Send one job's outcome (and record its terminal phase, unless told not to)."""
        error = ErrorInfo.from_exception(exc) if exc is not None else None
        if (
            self._journal is not None
            and item.key
            and journal_phase
            and state not in (OutcomeState.DONE, OutcomeState.UNRESOLVED)
        ):
            from .._journal import JobPhase

            with anyio.CancelScope(shield=True):
                await self._journal.record_terminal(
                    item.key, JobPhase(state.value), error=error, billed_seconds=billed
                )
        self.states[state] += 1
        if skipped:
            self.skipped += 1
        elif billed:
            self.billed += billed
        outcome = Outcome(
            job=item.job,
            state=state,
            task_id=item.task_id,
            path=path,
            size=size,
            sha256=sha256,
            billed_seconds=billed,
            video_url=video_url,
            error=error,
            exception=exc,
        )
        self.event(EventKind.OUTCOME, item, state.value)
        await self._out.send(outcome)


#: Batch-level tries of a step that failed transiently without creating anything (a 429, a 503,
#: a 5xx or no answer to an unbilled request). The request path's own retries are capped by a
#: client-wide retry budget that a long batch under load spends quickly; without these, one
#: throttled submit or detection would fail its job although nothing happened on the server.
TRANSIENT_TRIES = 5
#: A 429 says only that the account is busy: a step throttled again and again gets this many
#: times more tries before its job fails (its waits grow with each, up to the policy's cap).
THROTTLED_FACTOR = 3


def tries_for(exc: BaseException, base: int) -> int:
    """Batch-level tries a step gets when ``exc`` is what it last failed with."""
    from .._exceptions import RateLimitError

    return base * THROTTLED_FACTOR if isinstance(exc, RateLimitError) else base


def is_transient(exc: BaseException, retry_after_max: float) -> bool:
    """Failed for now, created nothing, and worth another try later."""
    from .._exceptions import (
        AmbiguousSubmitError,
        APIError,
        RateLimitError,
        TransportError,
    )

    if isinstance(exc, AmbiguousSubmitError):
        return False
    if isinstance(exc, RateLimitError):
        return exc.retry_after is None or exc.retry_after <= retry_after_max
    if isinstance(exc, APIError):
        return exc.retryable
    return isinstance(exc, TransportError)


async def pause_after(item: InFlight, exc: BaseException, attempt: int, retry: RetryPolicy) -> None:
    """Wait before a batch-level retry: the request path's backoff, a few steps further on (by
    now its retries and budget are spent: the service is struggling), with Retry-After
    honoured up to ``retry_after_max`` (a list answering "Retry-After: 3600" must not hold a
    job for an hour)."""
    wait = retry.backoff(attempt + 3, retry_after=getattr(exc, "retry_after", None), floor=0.5)
    logger.info("%s: %s; trying again in %.2fs", item.name, type(exc).__name__, wait)
    await anyio.sleep(wait)
