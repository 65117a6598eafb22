"""The billed step: journal the intent, send the POST once, record any task id it answers
with, and settle a lost answer by evidence (:mod:`._reconciler`), never by a guess.

Task slots: the caller acquires the job's slot before :meth:`Submitter.submit`. A lost answer
gives the slot back while it is settled (it holds no task we know of), and takes it again to
adopt or to send again; ``submit`` returns with the slot held exactly when it returns a task id.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import anyio

from .._exceptions import (
    AmbiguousSubmitError,
    APIError,
    EmoError,
    UnresolvedSubmitError,
)
from .._models import OutcomeState, Task
from .._ratelimit import AdaptiveRateLimiter
from .._retry import billed_fence
from ._attribution import Decision, ListedTask, LostSubmit, Verdict
from ._job import (
    THROTTLED_FACTOR,
    EventKind,
    InFlight,
    Reporter,
    is_transient,
    pause_after,
    tries_for,
)
from ._policy import BatchPolicy, ReconcilePolicy

if TYPE_CHECKING:
    from .._journal import Candidate, Journal
    from .._owned import OwnedTasks
    from ._ports import Service
    from ._reconciler import Reconciler
    from ._slots import Slots

__all__ = ["MAX_SUBMITS", "Submitter", "default_submit_concurrency"]

logger = logging.getLogger("emo_async.batch")

#: How many times one job may be (re)submitted after a submit proved not to have landed.
MAX_SUBMITS = 4


def default_submit_concurrency(rate: float) -> int:
    """The most billed POSTs the adaptive window keeps in flight: enough to keep ``rate`` a
    second with answers that take up to a second (the limiter spaces them)."""
    return max(2, math.ceil(rate))


def window_for(rate: float, latency: float, cap: int) -> int:
    """Billed POSTs in flight so that answers taking ``latency`` seconds do not set the pace
    at ``rate`` a second: the bandwidth-delay product with half again as margin, at least 1.

    No more than that: every POST in flight when a process dies is an intent a later run must
    settle by evidence, and overlapping ones are harder to tell apart.
    """
    return max(1, min(cap, math.ceil(rate * latency * 1.5)))


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


class Submitter:
    """Sends billed POSTs, at most ``submit_concurrency`` at once and ``submit_rate`` a second."""

    def __init__(
        self,
        service: Service,
        journal: Journal | None,
        reporter: Reporter,
        reconciler: Reconciler,
        policy: BatchPolicy,
        slots: Slots,
        keep: Callable[[Sequence[Task]], None],
        *,
        rate: float | None = None,
        own_limiter: bool = True,
        write_intent: Callable[[InFlight, _dt.datetime], Awaitable[_dt.datetime]] | None = None,
        fence: Callable[[InFlight], Callable[[], None]] | None = None,
    ) -> None:
        self._service = service
        #: Records the intent (durably) and returns when; a shared batch reserves a quota slot.
        self._write_intent = write_intent or self._record_intent
        #: A shared batch: raises before any billed attempt once the job's claim may be lost.
        self._fence = fence
        self._journal = journal
        self._report = reporter
        self._reconciler = reconciler
        self._policy = policy
        self._slots = slots
        self._keep = keep
        # ``rate``: the pace this batch submits at (BatchRun knows the client's limit).
        self._pace = rate if rate is not None else (policy.submit_rate or 1.0)
        #: None: the window adapts to the answers' latency (see :func:`window_for`).
        self._fixed = policy.submit_concurrency
        self._cap = self._fixed or default_submit_concurrency(self._pace)
        self._latency: float | None = None
        self._inflight = anyio.CapacityLimiter(self._fixed or 1)
        self._rate = (
            AdaptiveRateLimiter("batch-submit", policy.submit_rate)
            if policy.submit_rate and own_limiter
            else None
        )
        # One submit at a time waits to witness lost answers' windows; the others go on.
        self._witness_waiting = False
        #: Jobs between taking a slot and having a task or an outcome, not counting those
        #: waiting on a lost answer: while any is left, a later witness may still come.
        self.active = 0
        self._input_closed = False

    @property
    def owned(self) -> OwnedTasks:
        """The client's registry of its tasks, POSTs out and unsettled lost answers."""
        return self._service.owned

    @property
    def concurrency(self) -> int:
        """Billed POSTs allowed in flight now."""
        return int(self._inflight.total_tokens)

    def _answered_after(self, seconds: float | None) -> None:
        """An answer took ``seconds`` on the wire: follow the latency (an EWMA that rises at
        once and falls slowly, so a slow spell widens the window without delay)."""
        if self._fixed is not None or seconds is None:
            return
        last = self._latency
        self._latency = seconds if last is None or seconds > last else 0.8 * last + 0.2 * seconds
        window = window_for(self._pace, self._latency, self._cap)
        if window != self._inflight.total_tokens:
            self._inflight.total_tokens = window

    def reserve(self) -> None:
        """Count a job that is about to call :meth:`submit` (call before starting its task)."""
        self.active += 1
        self._idle_changed()

    async def submit(self, item: InFlight) -> str | None:
        """Submit one job (reserved, its slot held); its task id, or None once its outcome is
        sent."""
        try:
            assert item.image_url
            assert item.audio_url
            assert item.face_bbox
            assert item.ext_bbox
            owned = self._service.owned
            if self._journal is None:
                earlier = owned.task_of(item.key)
                if earlier is not None:
                    # No journal, but this client already created this job's task (an earlier
                    # call was cancelled after the POST): follow it rather than pay again.
                    logger.info("%s: following its earlier task %s", item.name, earlier)
                    item.task_id = earlier
                    return earlier
                lost = owned.lost_of(item.key)
                if lost is not None:
                    # An earlier call was cancelled while its lost answer was being settled:
                    # settle that one first.
                    verdict = await self.settle(item, *lost)
                    if verdict == Verdict.ADOPT:
                        return item.task_id
                    if verdict != Verdict.RESEND:
                        return None
            return await self._submit(item)
        finally:
            self.active -= 1
            self._idle_changed()

    def close_input(self) -> None:
        """No new job will come to :meth:`submit` (those resent after a lost answer may)."""
        self._input_closed = True
        self._idle_changed()

    def _idle_changed(self) -> None:
        # With nothing left to send, no later submit can witness a lost answer's window.
        self._reconciler.no_more_witnesses(self._input_closed and self.active == 0)

    async def _submit(self, item: InFlight) -> str | None:
        # Up to MAX_SUBMITS sends, more while the account answers 429 (nothing created).
        for attempt in range(MAX_SUBMITS * THROTTLED_FACTOR):
            lost, failure, sent_at = await self._send(item)
            if lost is None and failure is None:
                return item.task_id
            if failure is not None:
                await self._clear_intent(item)
                retry = self._service.retry
                if is_transient(failure, retry.retry_after_max) and attempt + 1 < tries_for(
                    failure, MAX_SUBMITS
                ):
                    # A 429, a 503, or no connection at all: nothing was created.
                    self._slots.release_on_behalf_of(item)
                    try:
                        await pause_after(item, failure, attempt, retry)
                    finally:
                        await self._slots.acquire_on_behalf_of(item)
                    continue
                state = (
                    OutcomeState.REJECTED
                    if isinstance(failure, APIError)
                    and failure.status in (400, 413, 415)
                    and not failure.retryable
                    else OutcomeState.FAILED
                )
                self._slots.release_on_behalf_of(item)
                await self._report.emit(item, state, exc=failure)
                return None
            assert lost is not None
            logger.warning("%s: %s", item.name, lost)
            # While it waits on evidence, this job is no witness-to-be for the others.
            self.active -= 1
            self._idle_changed()
            try:
                verdict = await self.settle(item, sent_at, lost.failed_at, error=lost)
            finally:
                self.active += 1
            if verdict == Verdict.ADOPT:
                return item.task_id
            if verdict != Verdict.RESEND or attempt + 1 >= MAX_SUBMITS:
                if verdict == Verdict.RESEND:
                    break  # sent MAX_SUBMITS times, every one provably lost: give up
                return None
        self._slots.release_on_behalf_of(item)
        await self._report.emit(
            item, OutcomeState.FAILED, exc=EmoError(f"gave up after {MAX_SUBMITS} submits")
        )
        return None

    async def _send(
        self, item: InFlight
    ) -> tuple[AmbiguousSubmitError | None, EmoError | None, _dt.datetime]:
        """One billed POST; (lost answer, clear failure, when it was sent)."""
        async with self._inflight:
            if self._rate is not None:
                await self._rate.acquire()
            due = self._reconciler.witness_due()
            if (
                due is not None
                and not self._witness_waiting
                and (wait := (due - _now()).total_seconds()) > 0
            ):
                # A lost answer needs a later submit of ours to bound its window in the task
                # list: this one goes out just late enough to be that witness. One is enough:
                # the others go on, their tasks in the window are ours and accounted for.
                self._witness_waiting = True
                try:
                    await anyio.sleep(wait)
                finally:
                    self._witness_waiting = False
            sent_at = _now()
            if self._journal is not None:
                # Write-ahead: the intent is durable before any money can be spent.
                sent_at = await self._write_intent(item, sent_at)
            self._reconciler.note_sent(sent_at)
            # The POST and the recording of its answer go together: a cancellation waits for
            # both, so a task id that was created is never dropped on the floor.
            fence = self._fence(item) if self._fence is not None else None
            with (
                anyio.CancelScope(shield=True),
                self._reconciler.in_flight(sent_at, item.audio_seconds, item.ratio) as attempt,
                billed_fence(_each(fence, attempt)),
            ):
                try:
                    task = await self._service.submit(
                        item.image_url,  # type: ignore[arg-type]
                        item.audio_url,  # type: ignore[arg-type]
                        face_bbox=item.face_bbox,  # type: ignore[arg-type]
                        ext_bbox=item.ext_bbox,  # type: ignore[arg-type]
                        style_level=item.job.style_level,
                    )
                except AmbiguousSubmitError as exc:
                    return exc, None, sent_at
                except EmoError as exc:
                    return None, exc, sent_at
                self._answered_after(self._service.statistics().submit_answer_seconds)
                await self.accept(item, task.task_id, EventKind.SUBMITTED)
        return None, None, sent_at

    async def _record_intent(self, item: InFlight, at: _dt.datetime) -> _dt.datetime:
        assert self._journal is not None
        await self._journal.record_intent(item.key, at=at)
        return at

    async def accept(self, item: InFlight, task_id: str, kind: EventKind) -> None:
        """Make ``task_id`` the job's task: journal first, then everything else."""
        item.task_id = task_id
        self._service.owned.bind(item.key, task_id)
        if self._journal is not None:
            with anyio.CancelScope(shield=True):
                await self._journal.record_submitted(item.key, task_id, at=_now())
        self._report.event(kind, item, task_id)

    async def _clear_intent(self, item: InFlight) -> None:
        if self._journal is not None:
            await self._journal.clear_intent(item.key)

    async def settle(
        self,
        item: InFlight,
        sent_at: _dt.datetime,
        failed_at: _dt.datetime,
        *,
        error: BaseException | None = None,
    ) -> Verdict:
        """Settle a lost answer; the job's slot is held on entry.

        ADOPT: the job has its task, slot held. RESEND: the intent is cleared, slot held (the
        caller sends again). UNRESOLVED: the outcome is sent, slot released.
        """
        policy = self._policy.reconcile
        if policy == ReconcilePolicy.RESUBMIT:
            logger.warning("%s: sending again (reconcile='resubmit': may bill twice)", item.name)
            await self._clear_intent(item)
            return Verdict.RESEND
        self._slots.release_on_behalf_of(item)
        owned = self._service.owned
        owned.note_lost(
            item.key, sent_at, failed_at, audio_seconds=item.audio_seconds, ratio=item.ratio
        )
        if policy == ReconcilePolicy.FAIL:
            decision = Decision(Verdict.UNRESOLVED, "reconcile='fail': the task list was not read")
        else:
            self._report.event(EventKind.RECONCILING, item, str(error) if error else None)
            self._report.reconciling += 1
            try:
                decision = await self._reconciler.settle(
                    LostSubmit(
                        item.key,
                        sent_at=sent_at,
                        failed_at=failed_at,
                        audio_seconds=item.audio_seconds,
                        ratio=item.ratio,
                    )
                )
            finally:
                self._report.reconciling -= 1
        if decision.verdict == Verdict.ADOPT:
            assert decision.task_id is not None
            # Bound before the next checkpoint: a cancellation from here on still leaves the
            # job following its task.
            owned.bind(item.key, decision.task_id)
            owned.settled(item.key)
            await self._slots.acquire_on_behalf_of(item)
            logger.info("%s: adopted task %s (%s)", item.name, decision.task_id, decision.reason)
            self._service.owned.add(decision.task_id, sent_at=sent_at)
            await self.accept(item, decision.task_id, EventKind.ADOPTED)
            return Verdict.ADOPT
        if decision.verdict == Verdict.RESEND:
            logger.info("%s: sending again: %s", item.name, decision.reason)
            owned.settled(item.key)
            await self._clear_intent(item)
            await self._slots.acquire_on_behalf_of(item)
            return Verdict.RESEND
        await self._unresolved(item, decision)
        owned.settled(item.key)
        return Verdict.UNRESOLVED

    async def _unresolved(self, item: InFlight, decision: Decision) -> None:
        # A candidate adopted by another job since the decision is that job's, not a candidate.
        owned = self._service.owned
        candidates = [c for c in decision.candidates if c.task_id not in owned]
        finished = [self._reconciler.finished_task(c.task_id) for c in candidates]
        kept = [t for t in finished if t is not None and t.succeeded and t.video_url]
        logger.error(
            "%s: not resent, may have been billed: %s%s",
            item.name,
            decision.reason,
            f"; candidates {', '.join(c.task_id for c in candidates)}" if candidates else "",
        )
        if self._journal is not None:
            with anyio.CancelScope(shield=True):
                await self._journal.record_unresolved(
                    item.key,
                    reason=decision.reason,
                    candidates=[_candidate(c, self._reconciler) for c in candidates],
                )
        if kept:
            self._keep(kept)
        exc = UnresolvedSubmitError(
            decision.reason, candidates=[c.task_id for c in candidates], job=item.job
        )
        await self._report.emit(item, OutcomeState.UNRESOLVED, exc=exc, journal_phase=False)


def _each(fence: Callable[[], None] | None, attempt: Callable[[], None]) -> Callable[[], None]:
    """Before each billed attempt: the fence (which may stop it), then note it is going out."""

    def check() -> None:
        if fence is not None:
            fence()
        attempt()

    return check


def _candidate(listed: ListedTask, reconciler: Reconciler) -> Candidate:
    from .._download import url_deadline
    from .._journal import Candidate

    task = reconciler.finished_task(listed.task_id)
    url = task.video_url if task is not None else None
    return Candidate(
        task_id=listed.task_id,
        created_at=listed.created_at,
        status=listed.status,
        video_duration=listed.video_duration,
        video_url=url,
        url_deadline=url_deadline(url) if url else None,
    )
