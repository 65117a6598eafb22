"""The batch runner: validate → upload → detect → journal the intent → submit → poll →
download, each stage with its own limit, connected with backpressure.

* Jobs are pulled from the (possibly lazy) iterable only as the prepare stage has room.
* At most ``max_tasks`` tasks are open on the server; a slot frees as soon as its task ends
  (downloads overlap with new submits).
* Submits are serialised (one billed POST in flight per batch, at ``submit_rate``): an
  ambiguous submit can then be matched to exactly one task in the task list, so it is
  reconciled — adopted, or resubmitted only when the list proves nothing was created. No
  other POST goes out while one is being reconciled; a 429 or 503 pause holds no lock.
* One job's failure is that job's :class:`Outcome`; the batch goes on.
* Leaving the ``async with`` early cancels the rest and waits for it.
"""

from __future__ import annotations

import collections
import datetime as _dt
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .._config import DETECT_MODEL, EMO_MODEL
from .._exceptions import (
    AmbiguousSubmitError,
    APIError,
    DetectionRejectedError,
    EmoError,
    InputError,
    JobFailedError,
    Problem,
    RateLimitError,
    ResultExpiredError,
    TransportError,
)
from .._models import ErrorInfo, Job, Outcome, OutcomeState, Task, TaskStatus
from .._ratelimit import AdaptiveRateLimiter
from .._util import single_error

if TYPE_CHECKING:
    from .._client import Client
    from .._journal import JobRecord, Journal
    from .._media import ValidatedJob

__all__ = ["BatchEvent", "BatchRun", "BatchStats", "run_one"]

logger = logging.getLogger("emo_async.batch")

RECONCILE_POLICIES = ("reconcile", "resubmit", "fail")
_JOURNAL_NAME = ".emo-journal.sqlite3"
#: How many times one job may be (re)submitted after a submit proved not to have landed.
_MAX_SUBMITS = 4
#: Pauses between task-list checks when reconciling, as fractions of the poll policy's
#: target delay (5 s by default: 0, 0.5 s, 2 s): an eventually consistent list gets time to
#: catch up before we conclude that nothing was created, in the client's own time scale.
_RECONCILE_PAUSES = (0.0, 0.1, 0.4)
#: How far before a lost submit our own answered submits count as witnesses that the task
#: list covers its window (half the window's ±30 s margin for clock skew).
_WITNESS_SLACK = _dt.timedelta(seconds=15)
#: Batch-level tries of a step that failed transiently without creating anything (a 429, a 503,
#: a 5xx or no answer to an unbilled request). The request path's own retries are capped by a
#: client-wide retry budget that a long batch under load spends quickly; without these, one
#: throttled submit or detection would fail its job although nothing happened on the server.
_TRANSIENT_TRIES = 5
_DEFAULT_URL_LIFETIME = _dt.timedelta(hours=24)
#: Local inputs up to this size are kept in memory from validation to upload (one read, not two).
_KEEP_BYTES = 1 << 20
#: The journal's commit_delay during a batch (see Journal.commit_delay): in a busy batch another
#: job writes within it, and one fsync less per job is worth more than 0.1 s on a download.
_COMMIT_DELAY = 0.1


@attrs.frozen
class BatchEvent:
    """Something happened to one job.

    Attributes:
        kind: ``"validated"``, ``"rejected"``, ``"uploaded"``, ``"detected"``,
            ``"submitted"``, ``"adopted"``, ``"finished"``, ``"downloaded"``, ``"outcome"``,
            ``"skipped"`` or ``"resumed"``.
        name: The job's display name.
        task_id: Its task, when there is one.
        detail: Free text (a state, an error).
    """

    kind: str
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
        done, failed, rejected, expired, cancelled, skipped: Outcomes so far (skipped = done in
            an earlier run, counted in ``done`` too).
        billed_seconds: Seconds of video billed so far.
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

    @property
    def finished(self) -> int:
        return self.done + self.failed + self.rejected + self.expired + self.cancelled


@attrs.define(eq=False)
class _Item:
    job: Job
    key: str = ""
    validated: ValidatedJob | None = None
    image_url: str | None = None
    audio_url: str | None = None
    face_bbox: tuple[int, int, int, int] | None = None
    ext_bbox: tuple[int, int, int, int] | None = None
    audio_seconds: float | None = None
    task_id: str | None = None
    submitted_at: float | None = None
    record: JobRecord | None = None
    dest: Path | None = None


class _Countdown:
    """Calls ``action`` when ``tick`` was called ``n`` times."""

    def __init__(self, n: int, action: Callable[[], object]) -> None:
        self._n = n
        self._action = action

    def tick(self) -> None:
        self._n -= 1
        if self._n == 0:
            self._action()


class _Counters:
    def __init__(self) -> None:
        self.seen = 0
        self.preparing = 0
        self.submitting = 0
        self.running = 0
        self.downloading = 0
        self.states: dict[OutcomeState, int] = dict.fromkeys(OutcomeState, 0)
        self.skipped = 0
        self.billed = 0.0


class BatchRun:
    """A running batch; see :meth:`Client.run_batch`."""

    def __init__(
        self,
        client: Client,
        jobs: Iterable[Job] | AsyncIterator[Job],
        out_dir: Path,
        *,
        journal: str | os.PathLike[str] | Journal | bool | None = True,
        max_tasks: int = 10,
        submit_rate: float | None = None,
        download_concurrency: int | None = None,
        prepare_concurrency: int = 4,
        reconcile: str = "reconcile",
        cancel_pending_on_exit: bool = False,
        on_event: Callable[[BatchEvent], Any] | None = None,
        dest_override: Path | None = None,
    ) -> None:
        if max_tasks < 1:
            raise ValueError("max_tasks must be >= 1")
        if prepare_concurrency < 1:
            raise ValueError("prepare_concurrency must be >= 1")
        if reconcile not in RECONCILE_POLICIES:
            raise ValueError(f"reconcile must be one of {RECONCILE_POLICIES}, got {reconcile!r}")
        self._client = client
        self._jobs = jobs
        self._total: int | None = len(jobs) if hasattr(jobs, "__len__") else None  # type: ignore[arg-type]
        self.out_dir = out_dir
        self._journal_arg = journal
        self._journal: Journal | None = None
        self._max_tasks = max_tasks
        self._submit_limiter = (
            AdaptiveRateLimiter("batch-submit", submit_rate) if submit_rate else None
        )
        self._download_slots = (
            anyio.CapacityLimiter(download_concurrency) if download_concurrency else None
        )
        self._prepare_n = prepare_concurrency
        self._reconcile = reconcile
        self._cancel_pending = cancel_pending_on_exit
        self._on_event = on_event
        self._dest_override = dest_override
        self._c = _Counters()
        self._started = time.monotonic()
        self._task_slots = anyio.CapacityLimiter(max_tasks)
        self._submit_lock = anyio.Lock()
        # Set once every intent left open by an earlier run is reconciled. No new submit goes
        # out before: a new task created in an open intent's window would make its task-list
        # match ambiguous (two unknown tasks, two open intents, neither attributable).
        self._intents_settled = anyio.Event()
        self._known_ids: set[str] = set()
        #: (sent, answered, task id) of this run's latest submits that got an answer: the
        #: witnesses that the task list really covers a reconcile window.
        self._landed: collections.deque[tuple[_dt.datetime, _dt.datetime, str]] = collections.deque(
            maxlen=256
        )
        self._handled: set[str] = set()
        self._resumed: set[str] = set()
        self._open_tasks: set[str] = set()
        self._names: Any = None
        self._stack: AsyncExitStack | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._out_send: MemoryObjectSendStream[Outcome] | None = None
        self._out_recv: MemoryObjectReceiveStream[Outcome] | None = None

    # -- the context manager -------------------------------------------------------------------

    async def __aenter__(self) -> AsyncIterator[Outcome]:
        from .._names import OutputNames

        stack = AsyncExitStack()
        await stack.__aenter__()
        self._stack = stack
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._names = OutputNames(self.out_dir)
            await self._open_journal(stack)
            await self._reserve_recorded_paths()
            send, recv = anyio.create_memory_object_stream[Outcome](max(64, self._max_tasks * 4))
            self._out_send, self._out_recv = send, recv
            stack.push_async_callback(self._on_exit)
            tg = await stack.enter_async_context(anyio.create_task_group())
            self._tg = tg
            tg.start_soon(self._main, send)
        except BaseException:
            await stack.__aexit__(None, None, None)
            raise
        return self._iterate(recv)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._stack is not None
        if self._tg is not None:
            # Leaving the block ends the batch: whatever is still running is cancelled.
            self._tg.cancel_scope.cancel()
        if self._out_recv is not None:
            self._out_recv.close()
        try:
            return await self._stack.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            single = single_error(group, exc)
            if single is None:
                raise
            if single is exc:
                return False
            raise single from None

    async def _iterate(self, recv: MemoryObjectReceiveStream[Outcome]) -> AsyncIterator[Outcome]:
        async with recv:
            async for outcome in recv:
                yield outcome

    async def _on_exit(self) -> None:
        if self._cancel_pending and self._open_tasks:
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                for task_id in list(self._open_tasks):
                    try:
                        await self._client.cancel_task(task_id)
                        logger.info("cancelled pending task %s on exit", task_id)
                    except EmoError:
                        pass  # running tasks cannot be cancelled; that is fine

    async def _open_journal(self, stack: AsyncExitStack) -> None:
        from .._journal import Journal, open_journal

        arg = self._journal_arg
        if arg is None or arg is False:
            return
        if isinstance(arg, Journal):
            self._journal = arg
        else:
            path = self.out_dir / _JOURNAL_NAME if arg is True else Path(os.fspath(arg))
            self._journal = await stack.enter_async_context(open_journal(path))
        # While the batch runs, finished tasks, saved videos and outcomes may wait a moment to
        # share the commit (the fsync) of another job's write; intents and task ids never wait.
        stack.callback(setattr, self._journal, "commit_delay", self._journal.commit_delay)
        self._journal.commit_delay = _COMMIT_DELAY
        self._known_ids |= await self._journal.known_task_ids()

    async def _reserve_recorded_paths(self) -> None:
        """Paths earlier runs saved videos at stay with their jobs (see OutputNames.reserve)."""
        if self._journal is None:
            return
        async for rec in self._journal.records():
            if rec.path:
                self._names.reserve(Path(rec.path), rec.job.display_name, rec.key)

    def stats(self) -> BatchStats:
        """A snapshot of the batch's progress."""
        c = self._c
        elapsed = time.monotonic() - self._started
        finished = sum(c.states.values())
        eta = None
        if self._total is not None and finished - c.skipped > 0:
            rate = (finished - c.skipped) / elapsed
            eta = max(0.0, (self._total - finished) / rate) if rate > 0 else None
        return BatchStats(
            total=self._total,
            seen=c.seen,
            preparing=c.preparing,
            submitting=c.submitting,
            running=c.running,
            downloading=c.downloading,
            done=c.states[OutcomeState.DONE],
            failed=c.states[OutcomeState.FAILED],
            rejected=c.states[OutcomeState.REJECTED],
            expired=c.states[OutcomeState.EXPIRED],
            cancelled=c.states[OutcomeState.CANCELLED],
            skipped=c.skipped,
            billed_seconds=c.billed,
            throttled=self._client.statistics().throttled,
            elapsed=elapsed,
            eta=eta,
        )

    def _event(self, kind: str, item: _Item, detail: str | None = None) -> None:
        if self._on_event is not None:
            try:
                self._on_event(BatchEvent(kind, item.job.display_name, item.task_id, detail))
            except Exception:  # a progress display must never break the batch
                logger.exception("on_event callback failed")

    # -- the pipeline --------------------------------------------------------------------------

    async def _main(self, out: MemoryObjectSendStream[Outcome]) -> None:
        prep_send, prep_recv = anyio.create_memory_object_stream[_Item](0)
        sub_send, sub_recv = anyio.create_memory_object_stream[_Item](self._max_tasks)
        # This task owns every stream and closes each on the way out, even when the tasks
        # that use them were cancelled before they ran. The tasks close them too, to signal
        # the end of their stage (closing twice is harmless).
        async with out, prep_send, prep_recv, sub_send, sub_recv:
            resumable = await self._load_resumable()
            await self._cleanup_parts(resumable)
            preparers = _Countdown(self._prepare_n, sub_send.close)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._resume_journal, resumable, tg, out)
                tg.start_soon(self._feed, prep_send)
                for _ in range(self._prepare_n):
                    tg.start_soon(self._prepare_worker, prep_recv, sub_send, out, preparers)
                tg.start_soon(self._submit_worker, sub_recv, tg, out)

    async def _cleanup_parts(self, resumable: list[JobRecord]) -> None:
        """Remove ``.part`` files no resumable job will continue."""
        from .._download import cleanup_orphans

        keep = []
        for rec in resumable:
            item = _Item(rec.job, key=rec.key)
            keep.append(self._dest_for(item))
        try:
            removed = await cleanup_orphans(self.out_dir, keep)
        except OSError as exc:
            logger.warning("could not clean partial downloads in %s: %s", self.out_dir, exc)
            return
        for path in removed:
            logger.info("removed an orphaned partial download: %s", path.name)

    async def _feed(self, send: MemoryObjectSendStream[_Item]) -> None:
        async with send:
            jobs = self._jobs
            if hasattr(jobs, "__aiter__"):
                async for job in jobs:
                    self._c.seen += 1
                    await send.send(_Item(job))
            else:
                it: Iterator[Job] = iter(jobs)
                for job in it:
                    self._c.seen += 1
                    await send.send(_Item(job))
            if self._total is None:
                self._total = self._c.seen

    async def _emit(
        self,
        out: MemoryObjectSendStream[Outcome],
        item: _Item,
        state: OutcomeState,
        *,
        exc: BaseException | None = None,
        path: Path | None = None,
        size: int | None = None,
        sha256: str | None = None,
        billed: float | None = None,
        video_url: str | None = None,
        journal_phase: bool = True,
    ) -> None:
        error = ErrorInfo.from_exception(exc) if exc is not None else None
        if self._journal is not None and item.key and journal_phase and state != OutcomeState.DONE:
            from .._journal import JobPhase

            with anyio.CancelScope(shield=True):
                await self._journal.record_terminal(
                    item.key, JobPhase(state.value), error=error, billed_seconds=billed
                )
        self._c.states[state] += 1
        if billed:
            self._c.billed += billed
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
        self._event("outcome", item, state.value)
        await out.send(outcome)

    async def _prepare_worker(
        self,
        recv: MemoryObjectReceiveStream[_Item],
        send: MemoryObjectSendStream[_Item],
        out: MemoryObjectSendStream[Outcome],
        done: _Countdown,
    ) -> None:
        try:
            async for item in recv:
                self._c.preparing += 1
                try:
                    ready = await self._prepare(item, out)
                finally:
                    self._c.preparing -= 1
                if ready:
                    self._c.submitting += 1
                    await send.send(item)
        finally:
            done.tick()  # the last preparer to finish ends the submit stage's input

    async def _prepare(self, item: _Item, out: MemoryObjectSendStream[Outcome]) -> bool:
        """Validate, look up the journal, upload, detect. False when the job is settled."""
        from .._journal import JobPhase, job_key
        from .._media import validate_keeping

        try:
            # Small local files come back with their bytes: the upload sends the very bytes
            # that were hashed, without a second read (the job keeps them until staged).
            v, contents = await validate_keeping(item.job, _KEEP_BYTES)
        except InputError as exc:
            self._event("rejected", item, str(exc))
            await self._emit(out, item, OutcomeState.REJECTED, exc=exc)
            return False
        item.validated = v
        self._event("validated", item)
        item.audio_seconds = v.billed_seconds_estimate
        item.key = job_key(
            item.job, image_digest=v.image.digest, audio_digest=v.audio.digest, ratio=v.ratio
        )
        if item.key in self._resumed:
            return False  # already picked up from the journal at start
        if item.key in self._handled:
            dup = InputError(
                [Problem("job", "the same job appears twice in this batch")],
                job_name=item.job.display_name,
            )
            await self._emit(out, item, OutcomeState.REJECTED, exc=dup, journal_phase=False)
            return False
        self._handled.add(item.key)
        item.dest = self._dest_for(item)
        if self._journal is not None:
            rec = await self._journal.register(item.key, item.job)
            item.record = rec
            if rec.phase == JobPhase.DONE:
                if rec.path and await _file_ok(Path(rec.path), rec.size):
                    self._c.skipped += 1
                    item.task_id = rec.task_id
                    self._event("skipped", item, rec.path)
                    self._c.states[OutcomeState.DONE] += 1
                    await out.send(
                        Outcome(
                            job=item.job,
                            state=OutcomeState.DONE,
                            task_id=rec.task_id,
                            path=Path(rec.path),
                            size=rec.size,
                            sha256=rec.sha256,
                            billed_seconds=rec.billed_seconds,
                        )
                    )
                    return False
                logger.warning("%s: journal says done but the file is missing", rec.name)
                phase = await self._journal.record_file_missing(item.key)
                if phase == JobPhase.FINISHED and rec.video_url:
                    # The URL may still be valid: download again, nothing to pay.
                    item.task_id = rec.task_id
                    await self._download(
                        item, rec.video_url, rec.url_deadline, rec.billed_seconds, out
                    )
                    return False
                logger.warning(
                    "%s: the video URL has expired; generating the video again", rec.name
                )
            if rec.phase in (JobPhase.INTENT, JobPhase.SUBMITTED, JobPhase.FINISHED):
                # Resumed from the journal at start (see _resume_journal).
                return False
        for attempt in range(_TRANSIENT_TRIES):
            try:
                await self._stage_inputs(item, contents)
            except (InputError, DetectionRejectedError) as exc:
                await self._emit(out, item, OutcomeState.REJECTED, exc=exc)
                return False
            except EmoError as exc:
                if self._transient(exc) and attempt + 1 < _TRANSIENT_TRIES:
                    await self._pause_after(item, exc, attempt)
                    continue
                await self._emit(out, item, OutcomeState.FAILED, exc=exc)
                return False
            except Exception as exc:  # e.g. an input file deleted after validation
                logger.warning("%s: staging failed: %r", item.job.display_name, exc)
                await self._emit(out, item, OutcomeState.FAILED, exc=exc)
                return False
            return True
        raise AssertionError("unreachable")  # pragma: no cover

    async def _stage_inputs(self, item: _Item, contents: Mapping[str, bytes] | None = None) -> None:
        """Turn local inputs into oss:// URLs and find the boxes (both cached).

        ``contents``: the bytes of small local inputs, read when they were validated.
        """
        v = item.validated
        assert v is not None
        contents = contents or {}
        item.image_url = await self._staged_url(v.image, contents.get("image"))
        item.audio_url = await self._staged_url(v.audio, contents.get("audio"))
        if item.job.face_bbox is not None and item.job.ext_bbox is not None:
            item.face_bbox, item.ext_bbox = item.job.face_bbox, item.job.ext_bbox
            return
        detection = None
        if self._journal is not None:
            detection = await self._journal.get_detection(v.image.digest, v.ratio)
            if detection is not None:
                self._client.remember_detection(v.image.digest, v.ratio, detection)
        if detection is None:
            # A temporary upload is readable only by the model its policy named: emo-detect-v1
            # gets its own copy of a local portrait.
            detect_url = await self._staged_url(v.image, contents.get("image"), model=DETECT_MODEL)
            detection = await self._client.detect_cached(detect_url, v.image.digest, v.ratio)
            if self._journal is not None:
                await self._journal.put_detection(v.image.digest, v.ratio, detection)
        self._event("detected", item, "pass" if detection.check_pass else detection.message)
        if not detection.check_pass or not detection.face_bbox or not detection.ext_bbox:
            raise DetectionRejectedError(detection)
        item.face_bbox, item.ext_bbox = detection.face_bbox, detection.ext_bbox

    async def _staged_url(
        self, prepared: Any, content: bytes | None = None, *, model: str = EMO_MODEL
    ) -> str:
        if prepared.kind != "local":
            return str(prepared.url)
        if self._journal is not None:
            cached = await self._journal.get_upload(prepared.digest, model)
            if cached is not None:
                return cached
        url = await self._client.upload_digest(
            prepared.path, prepared.digest, content=content, model=model
        )
        if self._journal is not None:
            await self._journal.put_upload(
                prepared.digest,
                model,
                url,
                expires_at=_dt.datetime.now(_dt.UTC) + _dt.timedelta(hours=48),
            )
        return url

    def _dest_for(self, item: _Item) -> Path:
        if self._dest_override is not None:
            return self._dest_override
        path: Path = self._names.assign(item.job.display_name, item.key)
        return path

    async def _submit_worker(
        self,
        recv: MemoryObjectReceiveStream[_Item],
        tg: anyio.abc.TaskGroup,
        out: MemoryObjectSendStream[Outcome],
    ) -> None:
        async with recv:
            # Intents left open by an earlier run are settled first, and before this worker
            # takes a task slot: settling them needs slots too.
            await self._intents_settled.wait()
            async for item in recv:
                await self._task_slots.acquire_on_behalf_of(item)
                self._c.submitting -= 1
                # Each job submits in its own task: one pausing after a 429 or 503 must not
                # hold up the jobs behind it (the POSTs themselves still go out one at a time,
                # under the submit lock).
                tg.start_soon(self._submit_and_track, item, out)

    async def _submit_and_track(self, item: _Item, out: MemoryObjectSendStream[Outcome]) -> None:
        try:
            ok = await self._submit(item, out)
        except BaseException:
            self._task_slots.release_on_behalf_of(item)
            raise
        if ok:
            await self._track(item, out)
        else:
            self._task_slots.release_on_behalf_of(item)

    async def _submit(self, item: _Item, out: MemoryObjectSendStream[Outcome]) -> bool:
        """Journal the intent, send the billed POST once, reconcile if the answer is lost.

        The submit lock is held from the intent through the POST and, for a lost answer,
        through its reconciling: with no other POST of ours in flight, the one unknown task in
        the list can only be this one. A pause after a 429 or 503 (nothing was created) is
        taken outside the lock, so other jobs submit meanwhile.
        """
        assert item.image_url
        assert item.audio_url
        assert item.face_bbox
        assert item.ext_bbox
        await self._intents_settled.wait()
        for attempt in range(_MAX_SUBMITS):
            pause: EmoError | None = None
            async with self._submit_lock:
                if self._submit_limiter is not None:
                    await self._submit_limiter.acquire()
                sent_at = _dt.datetime.now(_dt.UTC)
                if self._journal is not None:
                    # Write-ahead: the intent is durable before any money can be spent.
                    await self._journal.record_intent(item.key, at=sent_at)
                try:
                    task = await self._client.submit(
                        item.image_url,
                        item.audio_url,
                        face_bbox=item.face_bbox,
                        ext_bbox=item.ext_bbox,
                        style_level=item.job.style_level,
                    )
                except AmbiguousSubmitError as exc:
                    logger.warning("%s: %s", item.job.display_name, exc)
                    adopted = await self._resolve_ambiguous(item, exc.sent_at, exc.failed_at)
                    if adopted is True:
                        return True
                    if adopted is None:
                        # The journal keeps the intent: a later run reconciles it again, where
                        # recording "failed" would let it resubmit and maybe pay twice.
                        await self._emit(
                            out, item, OutcomeState.FAILED, exc=exc, journal_phase=False
                        )
                        return False
                    continue  # provably not created: send again
                except APIError as exc:
                    if self._journal is not None:
                        await self._journal.clear_intent(item.key)
                    if self._transient(exc) and attempt + 1 < _MAX_SUBMITS:
                        # A 429 or 503 creates nothing (a 500 is raised as ambiguous): wait
                        # and send again rather than fail a job nothing happened to.
                        pause = exc
                    else:
                        state = (
                            OutcomeState.REJECTED
                            if exc.status in (400, 413, 415) and not exc.retryable
                            else OutcomeState.FAILED
                        )
                        await self._emit(out, item, state, exc=exc)
                        return False
                except EmoError as exc:
                    # Transport failure before the request went out: nothing was created.
                    if self._journal is not None:
                        await self._journal.clear_intent(item.key)
                    if self._transient(exc) and attempt + 1 < _MAX_SUBMITS:
                        pause = exc
                    else:
                        await self._emit(out, item, OutcomeState.FAILED, exc=exc)
                        return False
                except Exception as exc:  # a bug, not a server answer: keep the intent open
                    logger.exception("%s: unexpected error while submitting", item.job.display_name)
                    await self._emit(out, item, OutcomeState.FAILED, exc=exc, journal_phase=False)
                    return False
                else:
                    self._landed.append((sent_at, _dt.datetime.now(_dt.UTC), task.task_id))
                    await self._accept(item, task.task_id, "submitted")
                    return True
            if pause is not None:
                await self._pause_after(item, pause, attempt)
        exc2 = EmoError(f"gave up after {_MAX_SUBMITS} submits that did not land")
        await self._emit(out, item, OutcomeState.FAILED, exc=exc2)
        return False

    async def _accept(self, item: _Item, task_id: str, kind: str) -> None:
        item.task_id = task_id
        item.submitted_at = time.monotonic()
        self._known_ids.add(task_id)
        self._open_tasks.add(task_id)
        if self._journal is not None:
            with anyio.CancelScope(shield=True):
                await self._journal.record_submitted(
                    item.key, task_id, at=_dt.datetime.now(_dt.UTC)
                )
        self._c.running += 1
        self._event(kind, item, task_id)

    async def _resolve_ambiguous(
        self, item: _Item, sent_at: _dt.datetime, failed_at: _dt.datetime
    ) -> bool | None:
        """True: a task was found and adopted. False: provably none, send again. None: give up
        (policy ``fail``, or the list cannot tell)."""
        if self._reconcile == "fail":
            return None
        if self._reconcile == "resubmit":
            if self._journal is not None:
                await self._journal.clear_intent(item.key)
            return False
        unit = self._client.poll_policy.target_delay
        for pause in _RECONCILE_PAUSES:
            await anyio.sleep(pause * unit)
            listed = await self._list_candidates(item, sent_at, failed_at)
            if listed is None:
                # The list never answered: that proves nothing, and resending could bill twice.
                return None
            found, seen = listed
            if len(found) == 1:
                logger.info("%s: adopted task %s", item.job.display_name, found[0].task_id)
                await self._accept(item, found[0].task_id, "adopted")
                return True
            if len(found) > 1:
                logger.error(
                    "%s: %d unknown tasks in the submit window; not guessing",
                    item.job.display_name,
                    len(found),
                )
                return None
        witnesses = self._witnesses(sent_at, failed_at)
        if witnesses and not witnesses & seen:
            # Our own tasks from just before this submit are missing from the same window:
            # the list does not cover it (a time-zone or clock mix-up, a lagging index), so
            # its silence proves nothing, and resending could bill twice.
            logger.error(
                "%s: the task list shows none of our %d tasks submitted just before; "
                "not resending a submit whose fate it cannot show",
                item.job.display_name,
                len(witnesses),
            )
            return None
        if self._journal is not None:
            await self._journal.clear_intent(item.key)
        return False

    def _witnesses(self, sent_at: _dt.datetime, failed_at: _dt.datetime) -> set[str]:
        """Our answered submits that any list covering this window must show.

        Those sent at most ``_WITNESS_SLACK`` before it and answered by then: with the
        window's ±30 s margin they fall inside it even if the server's clock is that far off.
        """
        lo = sent_at - _WITNESS_SLACK
        hi = failed_at + _WITNESS_SLACK
        return {tid for sent, answered, tid in self._landed if lo <= sent and answered <= hi}

    async def _list_candidates(
        self, item: _Item, sent_at: _dt.datetime, failed_at: _dt.datetime
    ) -> tuple[list[Any], set[str]] | None:
        """Unknown tasks created in the submit window and the ids of all tasks listed in it,
        or None if the list kept failing."""
        for attempt in range(_TRANSIENT_TRIES):
            try:
                items = await self._client.find_submitted_tasks(sent_at, failed_at)
                seen = {i.task_id for i in items}
                return [i for i in items if i.task_id not in self._known_ids], seen
            except EmoError as exc:
                logger.warning("reconciling %s: task list failed: %s", item.job.display_name, exc)
                if attempt + 1 < _TRANSIENT_TRIES:
                    await self._pause_after(item, exc, attempt)
        return None

    def _transient(self, exc: EmoError) -> bool:
        """Failed for now, created nothing, and worth another try later."""
        if isinstance(exc, AmbiguousSubmitError):
            return False
        if isinstance(exc, RateLimitError):
            return exc.retry_after is None or exc.retry_after <= self._client.retry.retry_after_max
        if isinstance(exc, APIError):
            return exc.retryable
        return isinstance(exc, TransportError)

    async def _pause_after(self, item: _Item, exc: EmoError, attempt: int) -> None:
        # Longer than the request path's own backoff: by now its budget is spent, which means
        # the service is struggling; Retry-After is honoured.
        policy = self._client.retry
        wait = policy.wait_max * random.uniform(0.5, 1.0) * min(1.0, 0.25 * 2**attempt)
        retry_after = getattr(exc, "retry_after", None)
        if retry_after:
            # Capped like the request path's: a list answering "Retry-After: 3600" while a lost
            # submit is reconciled would otherwise hold every submit of the batch for an hour.
            wait = max(wait, min(retry_after, policy.retry_after_max))
        logger.info(
            "%s: %s; trying again in %.2fs", item.job.display_name, type(exc).__name__, wait
        )
        await anyio.sleep(wait)

    async def _track(self, item: _Item, out: MemoryObjectSendStream[Outcome]) -> None:
        """Wait for one task, then download its video."""
        assert item.task_id is not None
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._c.running -= 1
                self._task_slots.release_on_behalf_of(item)

        try:
            try:
                task = await self._client.wait(item.task_id, audio_seconds=item.audio_seconds)
            except Exception as exc:
                # The journal keeps the task as submitted: a later run picks it up again.
                release()
                await self._emit(out, item, OutcomeState.FAILED, exc=exc, journal_phase=False)
                return
            release()
            self._open_tasks.discard(item.task_id)
            self._event("finished", item, task.status.value)
            await self._finish(item, task, out)
        finally:
            release()

    async def _finish(self, item: _Item, task: Task, out: MemoryObjectSendStream[Outcome]) -> None:
        billed = task.video_duration
        if task.status == TaskStatus.CANCELED:
            from .._exceptions import JobCancelledError

            exc_c = JobCancelledError(f"task {task.task_id} was cancelled", job=item.job)
            await self._emit(out, item, OutcomeState.CANCELLED, exc=exc_c)
            return
        if task.succeeded and not task.video_url:
            task = await self._url_of(task)
        if task.succeeded and not task.video_url:
            # Paid for, and the URL may come: the journal keeps it submitted for a later run.
            await self._emit(
                out,
                item,
                OutcomeState.FAILED,
                exc=JobFailedError(task, job=item.job),
                billed=billed,
                journal_phase=False,
            )
            return
        if not task.succeeded or not task.video_url:
            await self._emit(out, item, OutcomeState.FAILED, exc=JobFailedError(task, job=item.job))
            return
        deadline = _url_deadline(task)
        if self._journal is not None:
            await self._journal.record_finished(
                item.key, video_url=task.video_url, url_deadline=deadline, billed_seconds=billed
            )
        await self._download(item, task.video_url, deadline, billed, out)

    async def _url_of(self, task: Task) -> Task:
        """A SUCCEEDED answer without a video URL: ask again a few times."""
        for attempt in range(3):
            await anyio.sleep(self._client.poll_policy.target_delay * (attempt + 1))
            try:
                again = await self._client.get_task(task.task_id)
            except EmoError:
                continue
            if again.video_url:
                return again
        return task

    async def _download(
        self,
        item: _Item,
        url: str,
        deadline: _dt.datetime | None,
        billed: float | None,
        out: MemoryObjectSendStream[Outcome],
    ) -> None:
        assert item.dest is not None
        self._c.downloading += 1
        try:
            async with AsyncExitStack() as stack:
                if self._download_slots is not None:
                    await stack.enter_async_context(self._download_slots)
                result = await self._client.downloader.download(url, item.dest, deadline=deadline)
        except ResultExpiredError as exc:
            # Paid for and lost: say so in the log too, not only in an outcome nobody reads.
            logger.error(
                "%s: task %s was paid for but its video URL expired before it was saved (%s);"
                " it is not resubmitted in this run",
                item.job.display_name,
                item.task_id,
                exc,
            )
            await self._emit(out, item, OutcomeState.EXPIRED, exc=exc, billed=billed)
            return
        except Exception as exc:  # DownloadError, or anything unexpected from the network
            # The journal keeps the job FINISHED: the next run resumes the download.
            await self._emit(
                out, item, OutcomeState.FAILED, exc=exc, billed=billed, journal_phase=False
            )
            return
        finally:
            self._c.downloading -= 1
        if self._journal is not None:
            with anyio.CancelScope(shield=True):
                await self._journal.record_done(
                    item.key,
                    path=str(result.path),
                    size=result.size,
                    sha256=result.sha256,
                    billed_seconds=billed,
                )
        self._event("downloaded", item, str(result.path))
        await self._emit(
            out,
            item,
            OutcomeState.DONE,
            path=result.path,
            size=result.size,
            sha256=result.sha256,
            billed=billed,
            video_url=url,
        )

    # -- resume ----------------------------------------------------------------------------

    async def _load_resumable(self) -> list[JobRecord]:
        if self._journal is None:
            return []
        from .._journal import JobPhase

        records = [
            r
            for r in await self._journal.unfinished()
            if r.phase in (JobPhase.INTENT, JobPhase.SUBMITTED, JobPhase.FINISHED)
        ]
        for rec in records:
            self._handled.add(rec.key)
            self._resumed.add(rec.key)
        return records

    async def _resume_journal(
        self,
        records: list[JobRecord],
        tg: anyio.abc.TaskGroup,
        out: MemoryObjectSendStream[Outcome],
    ) -> None:
        """Pick up what an earlier run left: poll submitted tasks, download finished ones,
        reconcile intents whose answer was lost."""
        from .._journal import JobPhase

        try:
            # Open intents first: new submits wait for them (see _intents_settled).
            intents = [r for r in records if r.phase == JobPhase.INTENT]
            for rec in intents:
                item = _Item(rec.job, key=rec.key, record=rec, task_id=rec.task_id)
                item.dest = self._dest_for(item)
                self._event("resumed", item, rec.phase.value)
                await self._resume_intent(item, tg, out)
        finally:
            self._intents_settled.set()
        for rec in records:
            if rec.phase == JobPhase.INTENT:
                continue
            item = _Item(rec.job, key=rec.key, record=rec, task_id=rec.task_id)
            item.dest = self._dest_for(item)
            self._event("resumed", item, rec.phase.value)
            if rec.phase == JobPhase.FINISHED and rec.video_url:
                tg.start_soon(
                    self._download, item, rec.video_url, rec.url_deadline, rec.billed_seconds, out
                )
            elif rec.phase == JobPhase.SUBMITTED and rec.task_id:
                await self._task_slots.acquire_on_behalf_of(item)
                item.submitted_at = time.monotonic()
                self._open_tasks.add(rec.task_id)
                self._c.running += 1
                tg.start_soon(self._track, item, out)

    async def _resume_intent(
        self, item: _Item, tg: anyio.abc.TaskGroup, out: MemoryObjectSendStream[Outcome]
    ) -> None:
        rec = item.record
        assert rec is not None
        assert self._journal is not None
        sent = rec.intent_at or _dt.datetime.now(_dt.UTC)
        await self._task_slots.acquire_on_behalf_of(item)
        async with self._submit_lock:
            # The dead process may have retried the POST (429, 503, Retry-After) long after
            # the intent; nothing of it can be created after now.
            outcome = await self._resolve_ambiguous(item, sent, _dt.datetime.now(_dt.UTC))
        if outcome is True:
            tg.start_soon(self._track, item, out)
            return
        self._task_slots.release_on_behalf_of(item)
        if outcome is None:
            # Kept as an intent in the journal (see _submit): the next run reconciles it again.
            await self._emit(
                out,
                item,
                OutcomeState.FAILED,
                exc=EmoError("an earlier submit's fate could not be established"),
                journal_phase=False,
            )
            return
        # Provably never created (the journal is back to "new"): prepare and submit afresh, in
        # the background, since _submit waits for every open intent to be settled.
        tg.start_soon(self._resubmit, item, tg, out)

    async def _resubmit(
        self, item: _Item, tg: anyio.abc.TaskGroup, out: MemoryObjectSendStream[Outcome]
    ) -> None:
        from .._media import validate_job

        try:
            item.validated = v = await validate_job(item.job)
            item.audio_seconds = v.billed_seconds_estimate
            await self._stage_inputs(item)
        except (InputError, DetectionRejectedError) as exc:
            await self._emit(out, item, OutcomeState.REJECTED, exc=exc)
            return
        except EmoError as exc:
            await self._emit(out, item, OutcomeState.FAILED, exc=exc)
            return
        await self._intents_settled.wait()
        await self._task_slots.acquire_on_behalf_of(item)
        if await self._submit(item, out):
            tg.start_soon(self._track, item, out)
        else:
            self._task_slots.release_on_behalf_of(item)


def _url_deadline(task: Task) -> _dt.datetime | None:
    from .._download import url_deadline

    if task.video_url:
        found = url_deadline(task.video_url)
        if found is not None:
            return found
    if task.end_time is not None:
        return task.end_time + _DEFAULT_URL_LIFETIME
    return None


async def _file_ok(path: Path, size: int | None) -> bool:
    try:
        st = await anyio.Path(path).stat()
    except OSError:
        return False
    return size is None or st.st_size == size


async def run_one(client: Client, job: Job, dest: Path) -> Outcome:
    """The one-call path behind :meth:`Client.generate` (no journal)."""
    run = BatchRun(client, [job], dest.parent, journal=None, max_tasks=1, dest_override=dest)
    async with run as outcomes:
        async for outcome in outcomes:
            if outcome.state == OutcomeState.REJECTED and outcome.exception is not None:
                raise outcome.exception
            return outcome
    raise EmoError("the job produced no outcome")  # pragma: no cover
