"""The run: wires the stages, their streams and limits, and owns the task group.

* Jobs are pulled from the (possibly lazy) iterable only as the prepare stage has room.
* At most ``max_tasks`` tasks are open on the server; a slot frees as soon as its task ends
  (downloads overlap with new submits).
* A lost submit answer pauses only its own job while it is settled by evidence; the other
  jobs' submits go on, and are that evidence.
* One job's failure is that job's :class:`Outcome`; the batch goes on.
* Leaving the ``async with`` early cancels the rest and waits for it.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .._config import JOURNAL_FILE_NAME
from .._exceptions import DetectionRejectedError, EmoError, InputError, Problem
from .._models import Job, Outcome, OutcomeState, Task
from .._owned import OwnTask
from .._util import single_error
from ._finisher import Finisher
from ._job import BatchEvent, BatchStats, EventKind, InFlight, Reporter
from ._naming import FeedNames
from ._policy import BatchPolicy
from ._reconciler import Reconciler
from ._resumer import Resumer
from ._shared import JobDropped, SharedBatch, is_shared_journal
from ._slots import Slots
from ._stager import Stager
from ._submitter import Submitter

if TYPE_CHECKING:
    from .._client import Client
    from .._journal import JobRecord, Journal

__all__ = ["JOURNAL_NAME", "BatchRun", "make_reconciler"]

logger = logging.getLogger("emo_async.batch")

JOURNAL_NAME = JOURNAL_FILE_NAME
#: The journal's commit_delay during a batch (see Journal.commit_delay): in a busy batch another
#: job writes within it, and one fsync less per job is worth more than 0.1 s on a download.
_COMMIT_DELAY = 0.1


def make_reconciler(
    client: Client,
    policy: BatchPolicy,
    known: Callable[[], dict[str, OwnTask]] = dict,
    shared: SharedBatch | None = None,
    *,
    reserved: Mapping[str, Iterable[str]] | None = None,
) -> Reconciler:
    """A reconciler on the client's own time scale (its poll policy's target delay)."""
    unit = client.poll_policy.target_delay
    settle = min(2.0, 0.4 * unit)
    return Reconciler(
        client,
        known=known,
        pause=max(0.5 * unit, 0.01),
        patience=policy.reconcile_patience or max(24 * unit, 3 * settle),
        settle=settle,
        page_size=client.poll_policy.list_page_size,
        refresh=shared.refresh if shared is not None else None,
        competing=shared.competing if shared is not None else None,
        reserved=reserved,
    )


class BatchRun:
    """A running batch; see :meth:`Client.run_batch`."""

    def __init__(
        self,
        client: Client,
        jobs: Iterable[Job] | AsyncIterator[Job],
        out_dir: Path,
        *,
        journal: str | os.PathLike[str] | Journal | bool | None = True,
        policy: BatchPolicy | None = None,
        on_event: Callable[[BatchEvent], object] | None = None,
        batch: str | None = None,
    ) -> None:
        policy = policy or BatchPolicy()
        limit = client.limits.submit_qps
        if policy.submit_rate is not None and policy.submit_rate > limit:
            raise ValueError(
                f"submit_rate={policy.submit_rate} is above the client's limit of {limit}/s:"
                " raise it with Client(limits=Limits(submit_qps=...)) if the account allows"
            )
        downloads = client.limits.max_downloads
        if policy.download_concurrency is not None and policy.download_concurrency > downloads:
            # The client's downloader would cap it without a word.
            raise ValueError(
                f"download_concurrency={policy.download_concurrency} is above the client's"
                f" limit of {downloads}: raise it with Client(limits=Limits(max_downloads=...))"
            )
        #: The pace of this batch's submits; the adaptive in-flight window follows it.
        self._submit_pace = policy.submit_rate or limit
        # At the client's limit, the client's own submit limiter already holds the pace: a
        # second limiter in a row would only shave a few percent off it.
        self._own_submit_limiter = policy.submit_rate is not None and policy.submit_rate < limit
        self.policy = policy
        self._client = client
        self._jobs = jobs
        self._total: int | None = len(jobs) if hasattr(jobs, "__len__") else None  # type: ignore[arg-type]
        self.out_dir = out_dir
        self._journal_arg = journal
        self._journal: Journal | None = None
        self._batch = batch
        #: This worker's part in a shared batch (a ``postgresql://`` journal), else None.
        self.shared: SharedBatch | None = None
        if is_shared_journal(journal):
            if isinstance(journal, str) and not batch:
                raise ValueError(
                    "a postgresql:// journal is a shared batch: name it with batch='...'"
                )
            self._total = None
        elif batch is not None:
            raise ValueError("batch= names a shared batch: it needs a postgresql:// journal")
        self._on_event = on_event
        self._slots = Slots(policy.max_tasks)
        self._known: dict[str, OwnTask] = {}
        #: Candidates of jobs the journal records unresolved (task id → job keys): never
        #: adopted by another job.
        self._reserved: dict[str, set[str]] = {}
        self._handled: set[str] = set()
        self._names = FeedNames(out_dir)
        self._stack: AsyncExitStack | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._out_recv: MemoryObjectReceiveStream[Outcome] | None = None
        self._report: Reporter | None = None
        self._finisher: Finisher | None = None

    # -- the context manager -------------------------------------------------------------------

    async def __aenter__(self) -> AsyncIterator[Outcome]:
        stack = AsyncExitStack()
        await stack.__aenter__()
        self._stack = stack
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            await self._open_journal(stack)
            if self._journal is not None:
                await self._names.reserve_recorded(self._journal)
            send, recv = anyio.create_memory_object_stream[Outcome](
                max(64, self.policy.max_tasks * 4)
            )
            self._out_recv = recv
            self._report = Reporter(send, self._journal, self._on_event)
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

    def open_task_ids(self) -> set[str]:
        """Tasks of this batch still open on the server."""
        return set(self._finisher.open_tasks) if self._finisher is not None else set()

    async def _on_exit(self) -> None:
        open_tasks = self.open_task_ids()
        if self.policy.cancel_pending_on_exit and open_tasks:
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                for task_id in sorted(open_tasks):
                    try:
                        await self._client.cancel_task(task_id)
                        logger.info("cancelled pending task %s on exit", task_id)
                    except EmoError:
                        pass  # running tasks cannot be cancelled; that is fine

    async def _open_journal(self, stack: AsyncExitStack) -> None:
        arg = self._journal_arg
        if is_shared_journal(arg):
            client = self._client
            account = client.account_digest()
            if not client.shares_account:
                logger.warning(
                    "a shared batch on a client that does not share the account: each worker"
                    " spends the account's limits as if alone (429s) and polls on its own;"
                    " open it with Client(shared_account=<the same DSN>)"
                )
            self.shared = await SharedBatch.open(
                stack, arg, batch=self._batch, account=account, policy=self.policy
            )
            self._journal = self.shared.journal
        elif arg is not None and arg is not False:
            self._journal = await open_batch_journal(stack, arg, self.out_dir)
            self._known = await known_tasks(self._journal)
        if self._journal is not None:
            from .._journal import JobPhase

            async for rec in self._journal.records():
                if rec.phase == JobPhase.UNRESOLVED:
                    for c in await self._journal.candidates(rec.key):
                        self._reserved.setdefault(c.task_id, set()).add(rec.key)

    def stats(self) -> BatchStats:
        """A snapshot of the batch's progress."""
        throttled = self._client.statistics().throttled
        if self._report is None:
            return Reporter.idle(self._total, throttled)
        return self._report.stats(self._total, throttled)

    # -- the pipeline --------------------------------------------------------------------------

    async def _main(self, out: MemoryObjectSendStream[Outcome]) -> None:
        report = self._report
        assert report is not None
        client = self._client
        policy = self.policy
        prep_send, prep_recv = anyio.create_memory_object_stream[InFlight](0)
        sub_send, sub_recv = anyio.create_memory_object_stream[InFlight](policy.max_tasks)
        # This task owns every stream and closes each on the way out, even when the tasks that
        # use them were cancelled before they ran.
        async with out, prep_send, prep_recv, sub_send, sub_recv:
            stager = Stager(client, self._journal, report)
            finisher = Finisher(
                client,
                self._journal,
                report,
                self.out_dir,
                download_slots=(
                    anyio.CapacityLimiter(policy.download_concurrency)
                    if policy.download_concurrency
                    else None
                ),
            )
            self._finisher = finisher
            shared = self.shared
            known = (lambda: shared.known) if shared is not None else (lambda: self._known)
            reconciler = make_reconciler(client, policy, known, shared, reserved=self._reserved)
            async with anyio.create_task_group() as background:
                background.start_soon(reconciler.run)
                if shared is not None:
                    background.start_soon(shared.heartbeat)
                async with anyio.create_task_group() as tg:

                    def keep(tasks: Sequence[Task]) -> None:
                        for task in tasks:
                            tg.start_soon(finisher.keep, task)

                    submitter = Submitter(
                        client,
                        self._journal,
                        report,
                        reconciler,
                        policy,
                        self._slots,
                        keep,
                        rate=self._submit_pace,
                        own_limiter=self._own_submit_limiter,
                        write_intent=shared.write_intent if shared is not None else None,
                        fence=shared.fence if shared is not None else None,
                    )
                    resumer = None
                    if self._journal is not None:
                        resumer = Resumer(
                            self._journal,
                            report,
                            stager,
                            submitter,
                            finisher,
                            policy,
                            self._slots,
                            self._names.dest_for,
                            lambda item: self._track(finisher, item),
                            retry=client.retry,
                            timeouts=client.timeouts,
                        )
                        resumer.claimed = shared is not None
                        records = await resumer.load()
                        self._handled.update(resumer.resumed)
                        if shared is None:
                            # (A shared batch's folder may hold other workers' downloads.)
                            await self._cleanup_parts(records)
                        tg.start_soon(resumer.resume, records, tg)
                    if shared is not None:
                        assert resumer is not None
                        tg.start_soon(
                            functools.partial(
                                shared.feed,
                                prep_send,
                                jobs=self._jobs,
                                names=self._names,
                                report=report,
                                resumer=resumer,
                                handled=self._handled,
                                tg=tg,
                            )
                        )
                    else:
                        tg.start_soon(self._feed, prep_send)
                    remaining = [policy.prepare_concurrency]

                    async def prepare_worker() -> None:
                        try:
                            async for item in prep_recv:
                                if await self._prepare(item, stager, resumer):
                                    report.submitting += 1
                                    await sub_send.send(item)
                        finally:
                            remaining[0] -= 1
                            if remaining[0] == 0:
                                sub_send.close()  # the last preparer ends the submit input

                    for _ in range(policy.prepare_concurrency):
                        tg.start_soon(prepare_worker)
                    tg.start_soon(self._submit_worker, sub_recv, submitter, finisher, tg)
                # Every job is through: stop the reconciler's loop.
                background.cancel_scope.cancel()

    async def _cleanup_parts(self, resumable: Sequence[JobRecord]) -> None:
        """Remove ``.part`` files of ours that no resumable job will continue."""
        keep = [self._names.dest_for(InFlight(rec.job, key=rec.key)) for rec in resumable]
        await cleanup_parts(self.out_dir, keep)

    async def _feed(self, send: MemoryObjectSendStream[InFlight]) -> None:
        report = self._report
        assert report is not None
        async with send:
            jobs = self._jobs
            if hasattr(jobs, "__aiter__"):
                async for job in jobs:
                    report.seen += 1
                    await send.send(self._names.fed(job, report.seen))
            else:
                it: Iterator[Job] = iter(jobs)
                for job in it:
                    report.seen += 1
                    await send.send(self._names.fed(job, report.seen))
            if self._total is None:
                self._total = report.seen

    async def _prepare(
        self,
        item: InFlight,
        stager: Stager,
        resumer: Resumer | None,
    ) -> bool:
        """Validate, consult the journal, upload, detect. False when the job is settled."""
        report = self._report
        assert report is not None
        report.preparing += 1
        names = self._names
        position = names.position_of(item)
        try:
            claimed = item.key
            try:
                contents = await stager.validate(item)
                if claimed and item.key != claimed:
                    item.key = claimed  # the claimed job is the one that ends here
                    raise InputError(
                        [Problem("job", "its input files changed since it was enqueued")],
                        job_name=item.name,
                    )
            except InputError as exc:
                names.settle(item)
                report.event(EventKind.REJECTED, item, str(exc))
                await report.emit(item, OutcomeState.REJECTED, exc=exc)
                return False
            try:
                await names.await_booker(item, position)
                resumed = resumer is not None and item.key in resumer.resumed
                if item.key in self._handled and not resumed:
                    dup = InputError(
                        [Problem("job", "the same job appears twice in this batch")],
                        job_name=item.name,
                    )
                    await report.emit(item, OutcomeState.REJECTED, exc=dup, journal_phase=False)
                    return False
                if resumed:
                    item.dest, obstacle = names.dest_for(item), None
                else:
                    item.dest, obstacle = names.new_dest_for(item, position)
                # Taken before the journal is consulted: a second row of this job that is
                # validated meanwhile is a duplicate, not a second admission.
                self._handled.add(item.key)
            finally:
                names.settle(item)
            if obstacle is not None:
                # Refused before anything is spent, so the journal does not hold the job: it
                # runs once the obstacle is moved away.
                refused = InputError([Problem("name", obstacle)], job_name=item.name)
                report.event(EventKind.REJECTED, item, str(refused))
                await report.emit(item, OutcomeState.REJECTED, exc=refused, journal_phase=False)
                return False
            if resumer is not None and not await resumer.admit(item):
                return False
            try:
                await stager.stage(item, contents)
            except (InputError, DetectionRejectedError) as exc:
                await report.emit(item, OutcomeState.REJECTED, exc=exc)
                return False
            except Exception as exc:  # EmoError, or e.g. an input file deleted after validation
                logger.warning("%s: staging failed: %r", item.name, exc)
                await report.emit(item, OutcomeState.FAILED, exc=exc)
                return False
            return True
        finally:
            names.settle(item)  # also when validation raised something unexpected
            report.preparing -= 1

    async def _submit_worker(
        self,
        recv: MemoryObjectReceiveStream[InFlight],
        submitter: Submitter,
        finisher: Finisher,
        tg: anyio.abc.TaskGroup,
    ) -> None:
        report = self._report
        assert report is not None
        async with recv:
            async for item in recv:
                await self._slots.acquire_on_behalf_of(item)
                report.submitting -= 1
                submitter.reserve()
                # Each job submits in its own task: one pausing after a 429 or 503, or waiting on
                # a lost answer, holds up nobody behind it.
                tg.start_soon(self._submit_and_track, item, submitter, finisher)
        submitter.close_input()

    async def _submit_and_track(
        self, item: InFlight, submitter: Submitter, finisher: Finisher
    ) -> None:
        try:
            task_id = await submitter.submit(item)
        except JobDropped:
            self._release(item)  # another worker has it now: no outcome here
            return
        except BaseException:
            self._release(item)
            raise
        if task_id:
            await self._track(finisher, item)

    def _release(self, item: InFlight) -> None:
        try:
            self._slots.release_on_behalf_of(item)
        except RuntimeError:
            pass  # already released

    async def _track(self, finisher: Finisher, item: InFlight) -> None:
        await finisher.track(item, lambda: self._release(item))


async def open_batch_journal(
    stack: AsyncExitStack, arg: str | os.PathLike[str] | Journal | bool, out_dir: Path
) -> Journal:
    """The batch's journal: the one given, or opened (and closed with ``stack``)."""
    from .._journal import Journal, open_journal

    if isinstance(arg, Journal):
        journal = arg
    else:
        path = out_dir / JOURNAL_NAME if isinstance(arg, bool) else Path(os.fspath(arg))
        journal = await stack.enter_async_context(open_journal(path))
    # While the batch runs, finished tasks, saved videos and outcomes may wait a moment to
    # share the commit (the fsync) of another job's write; intents and task ids never wait.
    stack.callback(setattr, journal, "commit_delay", journal.commit_delay)
    journal.commit_delay = _COMMIT_DELAY
    return journal


async def known_tasks(journal: Journal) -> dict[str, OwnTask]:
    """Every task the journal records as some job's; the current attempts' with their times,
    which make them witnesses for lost answers too."""
    known = {tid: OwnTask(tid) for tid in await journal.known_task_ids()}
    async for rec in journal.records():
        if rec.task_id and rec.task_id in known:
            known[rec.task_id] = OwnTask(
                rec.task_id, sent_at=rec.intent_at, answered_at=rec.submitted_at
            )
    return known


async def cleanup_parts(out_dir: Path, keep: Sequence[Path]) -> None:
    """Remove partial downloads of ours in ``out_dir`` that nothing will continue."""
    from .._download import cleanup_orphans

    try:
        removed = await cleanup_orphans(out_dir, keep)
    except OSError as exc:
        logger.warning("could not clean partial downloads in %s: %s", out_dir, exc)
        return
    for path in removed:
        logger.info("removed an orphaned partial download: %s", path.name)
