"""What an earlier run left: skip what is done, refuse to pay again for what expired, settle
open intents and unresolved jobs by evidence, follow submitted tasks, finish downloads."""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from .._config import DEFAULT_RETRY_POLICY, DEFAULT_TIMEOUTS
from .._exceptions import (
    DetectionRejectedError,
    EmoError,
    InputError,
    Problem,
    ResultExpiredError,
)
from .._models import OutcomeState
from ._attribution import Verdict
from ._job import EventKind, InFlight, Reporter

if TYPE_CHECKING:
    from .._config import RetryPolicy, Timeouts
    from .._journal import JobRecord, Journal
    from ._finisher import Finisher
    from ._policy import BatchPolicy
    from ._slots import Slots
    from ._stager import Stager
    from ._submitter import Submitter

__all__ = ["Resumer"]

logger = logging.getLogger("emo_async.batch")

_DEFAULT_RETRY_TIMEOUT = DEFAULT_RETRY_POLICY.timeout or 300.0
_DEFAULT_TOTAL = DEFAULT_TIMEOUTS.total or 120.0
#: Slack for the wait at the submit limiter, which the retry timeout does not count.
_LIMITER_MARGIN = 120.0
#: How far another host's clock may be behind ours (a shared batch's claimed intents).
_CLAIMED_MARGIN = _dt.timedelta(seconds=5)


async def _file_ok(path: Path, size: int | None) -> bool:
    try:
        st = await anyio.Path(path).stat()
    except OSError:
        return False
    return size is None or st.st_size == size


class Resumer:
    """Reads the journal at the start of a run and for every job fed to it."""

    def __init__(
        self,
        journal: Journal,
        reporter: Reporter,
        stager: Stager,
        submitter: Submitter,
        finisher: Finisher,
        policy: BatchPolicy,
        slots: Slots,
        dest_for: Callable[[InFlight], Path],
        track: Callable[[InFlight], Coroutine[Any, Any, None]],
        *,
        retry: RetryPolicy,
        timeouts: Timeouts,
    ) -> None:
        self._journal = journal
        self._report = reporter
        self._stager = stager
        self._submitter = submitter
        self._finisher = finisher
        self._policy = policy
        self._slots = slots
        self._dest_for = dest_for
        self._track = track
        self._started = _dt.datetime.now(_dt.UTC)
        self._retry = retry
        self._timeouts = timeouts
        #: Keys picked up from the journal at start (the feed skips them).
        self.resumed: set[str] = set()
        #: A shared batch: records come one by one from claims (a dead worker's, after its
        #: lease), not all at start, and their intent times are another host's clock.
        self.claimed = False

    async def load(self) -> list[JobRecord]:
        from .._journal import JobPhase

        open_phases = (
            JobPhase.INTENT,
            JobPhase.UNRESOLVED,
            JobPhase.SUBMITTED,
            JobPhase.FINISHED,
        )
        if self.claimed:
            return []  # claims bring them, a few at a time
        records = [r for r in await self._journal.unfinished() if r.phase in open_phases]
        self.resumed.update(r.key for r in records)
        return records

    async def admit(self, item: InFlight) -> bool:
        """Whether a validated job from the feed still needs staging and submitting."""
        from .._journal import JobPhase

        if item.key in self.resumed:
            return False  # picked up from the journal at start: its outcome comes from there
        rec = await self._journal.register(item.key, item.job)
        item.record = rec
        phase = rec.phase
        if phase == JobPhase.DONE:
            if rec.path and await _file_ok(Path(rec.path), rec.size):
                item.task_id = rec.task_id
                self._report.event(EventKind.SKIPPED, item, rec.path)
                await self._report.emit(
                    item,
                    OutcomeState.DONE,
                    path=Path(rec.path),
                    size=rec.size,
                    sha256=rec.sha256,
                    billed=rec.billed_seconds,
                    skipped=True,
                )
                return False
            logger.warning("%s: journal says done but the file is missing", rec.name)
            phase = await self._journal.record_file_missing(item.key)
            if phase == JobPhase.FINISHED and rec.video_url:
                # The URL may still be valid: download again, nothing to pay.
                item.task_id = rec.task_id
                await self._finisher.download(item, rec.video_url, rec.url_deadline, None)
                return False
        if phase == JobPhase.EXPIRED:
            if not self._policy.rebill_expired:
                item.task_id = rec.task_id
                exc = ResultExpiredError(
                    f"task {rec.task_id} was paid for but its video expired before it was saved;"
                    " it is not submitted again unless asked (rebill_expired=True,"
                    " --rebill-expired)",
                    job=item.job,
                )
                logger.error("%s: %s", rec.name, exc)
                await self._report.emit(item, OutcomeState.EXPIRED, exc=exc, journal_phase=False)
                return False
            logger.warning("%s: its paid video expired; paying for it again as asked", rec.name)
            await self._journal.reset_expired(item.key)
        return True

    async def resume(self, records: list[JobRecord], tg: anyio.abc.TaskGroup) -> None:
        from .._journal import JobPhase

        # Every intent of an earlier run is noted lost at once, before any is settled: until
        # each is, no other lost answer adopts a task it may have made.
        now = _dt.datetime.now(_dt.UTC)
        for rec in records:
            if rec.phase in (JobPhase.INTENT, JobPhase.UNRESOLVED):
                self._submitter.owned.note_lost(rec.key, rec.intent_at or rec.updated_at, now)
        for rec in records:
            item = InFlight(rec.job, key=rec.key, record=rec, task_id=rec.task_id)
            item.dest = self._dest_for(item)
            self._report.event(EventKind.RESUMED, item, rec.phase.value)
            if rec.phase in (JobPhase.INTENT, JobPhase.UNRESOLVED):
                tg.start_soon(self._settle, item)
            elif rec.phase == JobPhase.FINISHED and rec.video_url:
                tg.start_soon(self._finisher.download, item, rec.video_url, rec.url_deadline, None)
            elif rec.phase == JobPhase.SUBMITTED and rec.task_id:
                await self._take_slot(item)
                tg.start_soon(self._track, item)

    async def _settle(self, item: InFlight) -> None:
        """An intent (or an unresolved job) of an earlier run: the POST may have gone out at
        any time from its intent until that process ended, before this run started."""
        rec = item.record
        assert rec is not None
        try:
            from .._journal import job_key
            from .._media import validate_job

            v = await validate_job(item.job)
            key = job_key(
                item.job, image_digest=v.image.digest, audio_digest=v.audio.digest, ratio=v.ratio
            )
            if key == rec.key:
                item.validated = v
                item.audio_seconds = v.billed_seconds_estimate
                item.ratio = v.ratio
            else:
                # The files at its paths are no longer what it submitted: their duration says
                # nothing about its task, and they must not be sent under its name.
                logger.warning(
                    "%s: its inputs changed since its submit; it is settled without them and"
                    " never sent again (the changed inputs are a job of their own)",
                    item.name,
                )
        except (InputError, OSError) as exc:
            # Its files changed or went: settling can still adopt nothing, prove absence, or
            # keep it unresolved; it just cannot be sent again.
            logger.warning("%s: cannot read its inputs again: %s", item.name, exc)
        sent = rec.intent_at or rec.updated_at
        if self.claimed:
            # Another worker's intent, on its host's clock: widened by a margin. It lost its
            # lease before this claim, so its POST was out (or never sent) before now.
            sent -= _CLAIMED_MARGIN
            gave_up = _dt.datetime.now(_dt.UTC)
        else:
            gave_up = self._gave_up(sent)
        await self._take_slot(item)
        verdict = await self._submitter.settle(item, sent, gave_up)
        if verdict == Verdict.ADOPT:
            await self._track(item)
        elif verdict == Verdict.RESEND:
            await self._resend(item)

    async def _take_slot(self, item: InFlight) -> None:
        """Hold a slot of ``max_tasks`` for a job already open on the server.

        A claimed job (a dead worker's) already counts in the batch's quota across workers,
        and this worker's new jobs may hold every local slot while they wait for that very
        quota: it gets a loan (:class:`Slots`) instead of waiting, which would deadlock.
        """
        if self.claimed:
            self._slots.lend(item)
        else:
            await self._slots.acquire_on_behalf_of(item)

    def _gave_up(self, sent: _dt.datetime) -> _dt.datetime:
        """The latest moment the dead process can have been waiting for that POST's answer:
        its request path gives up after ``retry.timeout`` plus one request's ``total``
        timeout (else: when this run started). A narrower window leaves fewer strangers.

        The dead process's settings are not known: the larger of this run's and the defaults
        is taken, with a margin for the rate limiter's wait before the last attempt.
        """
        retry, timeouts = self._retry, self._timeouts
        if retry.timeout is None or timeouts.total is None:
            return self._started
        seconds = (
            max(retry.timeout, _DEFAULT_RETRY_TIMEOUT)
            + max(timeouts.total, _DEFAULT_TOTAL)
            + _LIMITER_MARGIN
        )
        return min(self._started, sent + _dt.timedelta(seconds=seconds))

    async def _resend(self, item: InFlight) -> None:
        """Provably never created: stage and submit afresh (the slot is held)."""
        try:
            if item.validated is None:
                raise InputError(
                    [
                        Problem(
                            "job",
                            "its inputs changed or went since its intent (it provably created"
                            " no task); changed files are a job of their own",
                        )
                    ],
                    job_name=item.name,
                )
            await self._stager.stage(item)
        except (InputError, DetectionRejectedError) as exc:
            self._slots.release_on_behalf_of(item)
            await self._report.emit(item, OutcomeState.REJECTED, exc=exc)
            return
        except EmoError as exc:
            self._slots.release_on_behalf_of(item)
            await self._report.emit(item, OutcomeState.FAILED, exc=exc)
            return
        from ._shared import JobDropped

        self._submitter.reserve()
        try:
            task_id = await self._submitter.submit(item)
        except JobDropped:
            self._slots.release_on_behalf_of(item)
            return
        if task_id:
            await self._track(item)
