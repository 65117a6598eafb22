"""A batch several workers share through a journal that claims (the PostgreSQL one).

Each worker (its id: host, pid and a random part) claims jobs with a lease it renews every
third of the lease, works them through the ordinary stages, and gives the claims back when it
leaves. What this module adds to a batch of one process:

* **The feed is the claims.** A job claimed in its first phase is validated, staged and
  submitted as usual; one claimed further on (a dead worker's, after its lease) goes through
  the resume paths (settle, track, download). With nothing to claim, the worker stops once
  the batch has no unfinished job, and otherwise claims again a moment later.
* **The intent is a reservation.** :meth:`SharedBatch.write_intent` records it with
  ``reserve_submit``: the open-task quota holds across workers, and a job whose claim was lost
  is dropped (:class:`JobDropped`) before anything is sent.
* **Lost answers see every worker.** Every task id of the account is ours-not-a-candidate, and
  another worker's open intent overlapping a lost submit's window forbids adopting (the
  reconciler waits, then leaves it unresolved with its candidates kept).
* **PostgreSQL down** is waited out for a while (:data:`DB_PATIENCE`) and then ends the run
  with :class:`~emo_async._pg.PostgresUnavailable`: never a fallback, never a billed POST
  without its intent, and everything stays resumable by another worker.

Importing this module does not import psycopg; opening a shared batch does.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import inspect
import logging
import math
import os
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, Final

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from .._exceptions import InputError
from .._models import Job, OutcomeState
from .._owned import OwnTask
from ._job import InFlight, Reporter

if TYPE_CHECKING:
    from .._journal import JobRecord
    from .._journal.protocol import ClaimingStore, OpenIntent
    from ._attribution import LostSubmit
    from ._naming import FeedNames
    from ._policy import BatchPolicy
    from ._resumer import Resumer

__all__ = [
    "DB_PATIENCE",
    "JobDropped",
    "SharedBatch",
    "account_fingerprint",
    "is_shared_journal",
    "open_shared_batch",
    "worker_id",
]

logger = logging.getLogger("emo_async.batch")

#: Seconds a write waits out an unreachable PostgreSQL (a restart) before the run ends.
DB_PATIENCE: Final = 30.0
#: Seconds between two claims while the batch has unfinished jobs that others hold.
CLAIM_PAUSE: Final = 1.0
#: Tolerance between a host's clock and the database's, on top of the measured offset.
CLOCK_MARGIN: Final = _dt.timedelta(seconds=5)
#: The part of a lease after its last renewal within which a billed attempt may still go out:
#: the rest covers the clocks' rates and the request's way to the server.
LEASE_USE: Final = 0.8
#: How long after its intent an unresolved submit of another worker may still have created
#: its task: its request path gave up long before (retry timeout + total + limiter slack).
INTENT_HORIZON: Final = _dt.timedelta(seconds=600)


class JobDropped(Exception):
    """Another worker owns the job now (this worker's claim ran out): it is left to that one,
    with nothing sent and no outcome here."""


def worker_id() -> str:
    """``host:pid:random``: the owner of this worker's claims."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def account_fingerprint(base_url: str, workspace: str | None, api_key: str) -> str:
    """Who the account is, for the shared journal: a digest, never the key."""
    text = "\0".join(("emo-account-v1", base_url.rstrip("/"), workspace or "", api_key))
    return hashlib.sha256(text.encode()).hexdigest()


def is_shared_journal(arg: object) -> bool:
    """A ``postgresql://`` DSN, or an open journal that claims."""
    if isinstance(arg, str):
        from .._pg import is_dsn

        return is_dsn(arg)
    return all(hasattr(arg, m) for m in ("claim", "reserve_submit", "open_intents"))


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


async def _patiently(call: Callable[[], Awaitable[Any]], doing: str, patience: float) -> Any:
    """Run a journal call, waiting out an unreachable server for up to ``patience`` seconds."""
    from .._pg import PostgresUnavailable

    deadline = anyio.current_time() + patience
    pause = 0.2
    while True:
        try:
            return await call()
        except PostgresUnavailable as exc:
            if anyio.current_time() + pause > deadline:
                raise
            logger.warning("%s: PostgreSQL unreachable, trying again: %s", doing, exc)
            await anyio.sleep(pause)
            pause = min(pause * 2, 2.0)


#: Writes after the task id is recorded that another worker may have overtaken; a refusal of
#: one is news that came too late, not an error of this run (see :class:`PatientJournal`).
_MOVED_ON_ELSEWHERE = frozenset(
    {"record_status", "record_finished", "record_done", "record_terminal"}
)


class PatientJournal:
    """A shared journal whose every call waits out a short outage (a server restart) before
    giving up; a write that may have been committed is repeated, which every transition
    allows (each is idempotent). Claims are the exception: see :meth:`SharedBatch.claim`."""

    def __init__(self, inner: ClaimingStore, patience: float) -> None:
        self._inner = inner
        self._patience = patience

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        @functools.wraps(attr)
        async def call(*args: Any, **kwargs: Any) -> Any:
            from .._exceptions import JournalError

            try:
                return await _patiently(lambda: attr(*args, **kwargs), name, self._patience)
            except JournalError as exc:
                if name not in _MOVED_ON_ELSEWHERE:
                    raise
                # The job moved on under another worker (it took the job over after this one
                # lost its claim, and finished it): its task id is recorded already, so no
                # paid video is lost; this worker's late news is dropped, not its whole run.
                logger.warning("%s: not recorded, the job moved on elsewhere: %s", name, exc)
                return None

        return call

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._inner, name, value)


class SharedBatch:
    """This worker's part in a shared batch (see the module docstring).

    Attributes:
        journal: The shared journal, waiting out short outages.
        owner: This worker's id.
        release_on_exit: Give the claims back on leaving (a killed worker does not; tests
            stand in for one by clearing it).
        known: Every task id of the account, ours-not-a-candidate for lost answers.
    """

    def __init__(
        self,
        journal: ClaimingStore,
        policy: BatchPolicy,
        *,
        owner: str | None = None,
        patience: float = DB_PATIENCE,
    ) -> None:
        self.raw = journal
        self.batch: str = getattr(journal, "batch", "")
        self.journal: Any = PatientJournal(journal, patience)
        self.owner = owner or worker_id()
        self.lease = policy.lease
        self.policy = policy
        self.patience = patience
        self.release_on_exit = True
        self.known: dict[str, OwnTask] = {}
        self._intents: list[OpenIntent] = []
        self._offset = _dt.timedelta(0)  # database clock − this host's clock
        self._maybe_orphans = False
        #: Jobs claimed by this worker and still in its hands.
        self._held: set[str] = set()
        #: Job → until when (``anyio.current_time()``) its claim is surely still this
        #: worker's: renewals that began before then extend it, a failed one does not.
        self._sure_until: dict[str, float] = {}

    @classmethod
    async def open(
        cls,
        stack: AsyncExitStack,
        arg: object,
        *,
        batch: str | None,
        account: str,
        policy: BatchPolicy,
    ) -> SharedBatch:
        """Open (or take) the shared journal; the claims are given back and a journal opened
        here closed with ``stack``."""
        journal: Any = arg
        if isinstance(arg, str):
            if not batch:
                raise ValueError("a postgresql:// journal needs batch='name' (the shared batch)")
            from .._journal.postgres import PostgresJournal

            journal = await PostgresJournal.open(arg, batch=batch, account=account)
            stack.push_async_callback(journal.aclose)
        shared = cls(journal, policy)
        stack.push_async_callback(shared._leave)
        logger.info("worker %s on batch %s (%s)", shared.owner, journal.batch, journal.path)
        return shared

    async def _leave(self) -> None:
        if not self.release_on_exit:
            return
        from .._pg import PostgresUnavailable

        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            try:
                n = await self.raw.release_claims(self.owner)
            except PostgresUnavailable as exc:
                logger.warning("could not give back claims (they return after the lease): %s", exc)
            else:
                if n:
                    logger.info("gave back %d unfinished claim(s)", n)

    # ---- claims and the feed

    async def heartbeat(self) -> None:
        """Renew this worker's claims every third of the lease (runs until cancelled)."""
        from .._pg import PostgresUnavailable

        while True:
            await anyio.sleep(self.lease / 3)
            began = anyio.current_time()
            try:
                await self.raw.heartbeat(self.owner, self.lease)
            except PostgresUnavailable as exc:
                logger.warning("heartbeat failed (claims run out after the lease): %s", exc)
                continue
            # Only a claim still surely ours when the renewal was done was renewed by it: one
            # that ran out meanwhile may be another worker's, whatever the renewal says.
            done = anyio.current_time()
            for key, until in self._sure_until.items():
                if until > done:
                    self._sure_until[key] = max(until, began + self.lease * LEASE_USE)

    async def claim(self, limit: int) -> list[JobRecord]:
        """Claim up to ``limit`` jobs. A claim whose answer was lost may have been committed:
        those jobs are then ours without our knowing, so they are given back at once."""
        from .._pg import PostgresUnavailable

        if self._maybe_orphans:
            await self.journal.release_claims(self.owner, await self._orphans())
            self._maybe_orphans = False
        began = anyio.current_time()
        try:
            records = list(await self.raw.claim(self.owner, limit, self.lease))
        except PostgresUnavailable:
            self._maybe_orphans = True
            raise
        for rec in records:
            self._sure_until[rec.key] = began + self.lease * LEASE_USE
        return records

    async def _orphans(self) -> list[str]:
        claimed = await self.journal.claimed_keys(self.owner)
        return [k for k in claimed if k not in self._held]

    async def remaining(self) -> int:
        """Jobs of the batch still to be worked by someone (unresolved ones are settled by
        their claimer, not waited for)."""
        summary = await self.journal.summary()
        return sum(summary.by_phase.get(p, 0) for p in ("new", "intent", "submitted", "finished"))

    async def feed(
        self,
        send: MemoryObjectSendStream[InFlight],
        *,
        jobs: Iterable[Job] | AsyncIterator[Job],
        names: FeedNames,
        report: Reporter,
        resumer: Resumer,
        handled: set[str],
        tg: anyio.abc.TaskGroup,
    ) -> None:
        """Enqueue ``jobs``, then feed the claims until the batch has nothing left to do."""
        from .._pg import PostgresUnavailable

        async with send:
            await self.enqueue(jobs, report)
            limit = max(1, self.policy.prepare_concurrency)
            outage_since: float | None = None
            while True:
                try:
                    records = await self.claim(limit)
                    left = 0 if records else await self.remaining()
                except PostgresUnavailable as exc:
                    now = anyio.current_time()
                    outage_since = outage_since or now
                    if now - outage_since > self.patience:
                        raise
                    logger.warning("claiming: PostgreSQL unreachable, trying again: %s", exc)
                    await anyio.sleep(CLAIM_PAUSE)
                    continue
                outage_since = None
                if not records:
                    if left == 0:
                        return
                    await anyio.sleep(CLAIM_PAUSE)
                    continue
                for rec in records:
                    self._held.add(rec.key)
                    await self._dispatch(rec, send, names, report, resumer, handled, tg)

    async def _dispatch(
        self,
        rec: JobRecord,
        send: MemoryObjectSendStream[InFlight],
        names: FeedNames,
        report: Reporter,
        resumer: Resumer,
        handled: set[str],
        tg: anyio.abc.TaskGroup,
    ) -> None:
        from .._journal import JobPhase

        if rec.phase == JobPhase.NEW:
            # Claimed again after a drop is no duplicate: keys are unique in the batch.
            handled.discard(rec.key)
            resumer.resumed.discard(rec.key)
            report.seen += 1
            item = names.fed(rec.job, report.seen)
            item.key, item.record = rec.key, rec
            await send.send(item)
        else:
            resumer.resumed.add(rec.key)
            await resumer.resume([rec], tg)

    async def enqueue(self, jobs: Iterable[Job] | AsyncIterator[Job], report: Reporter) -> int:
        """Add jobs to the batch by key (idempotent); a job that cannot be valid is rejected
        here, by this worker, and never enqueued."""
        from .._journal import job_key
        from .._media import validate_job

        added = 0
        chunk: list[tuple[str, Job]] = []

        async def one(job: Job) -> None:
            try:
                v = await validate_job(job)
            except InputError as exc:
                await report.emit(InFlight(job), OutcomeState.REJECTED, exc=exc)
                return
            key = job_key(
                job, image_digest=v.image.digest, audio_digest=v.audio.digest, ratio=v.ratio
            )
            chunk.append((key, job))

        async def flush() -> None:
            nonlocal added
            if chunk:
                added += await self.journal.enqueue(list(chunk))
                chunk.clear()

        if hasattr(jobs, "__aiter__"):
            async for job in jobs:
                await one(job)
                if len(chunk) >= 500:
                    await flush()
        else:
            for job in jobs:
                await one(job)
                if len(chunk) >= 500:
                    await flush()
        await flush()
        if added:
            logger.info("enqueued %d new job(s) in batch %s", added, self.batch)
        return added

    def settled(self, key: str) -> None:
        """A held job left this worker's hands (ended, or dropped)."""
        self._held.discard(key)

    # ---- the billed path

    async def write_intent(self, item: InFlight, at: _dt.datetime) -> _dt.datetime:
        """Record the intent through the quota; returns when it was recorded (our clock).

        Raises:
            JobDropped: The claim is another worker's now: nothing was recorded or sent.
            PostgresUnavailable: The server stayed unreachable: nothing may be sent.
        """
        from .._journal.postgres_claims import ClaimLostError

        while True:
            try:
                ok = await self.journal.reserve_submit(
                    item.key, self.owner, self.policy.max_tasks, at=at
                )
            except ClaimLostError as exc:
                logger.warning("%s: dropped, another worker has it now: %s", item.name, exc)
                self.settled(item.key)
                raise JobDropped(str(exc)) from None
            if ok:
                return at
            # The account-wide quota is full: another worker's task ends soon.
            await anyio.sleep(0.2)
            at = _now()

    def fence(self, item: InFlight) -> Callable[[], None]:
        """The check before each billed attempt of ``item`` (after its intent, after every
        wait at a limiter or a backoff): once its claim may have run out, another worker may
        have taken the job and settled its intent on the evidence that nothing was sent, so
        nothing is. The intent stays, for whoever holds the job to settle.

        Raises (from the check):
            JobDropped: The claim may be another worker's now.
        """

        def check() -> None:
            if anyio.current_time() < self._sure_until.get(item.key, -math.inf):
                return
            logger.warning(
                "%s: its claim may have run out before its submit went out (the database was"
                " out of reach); not sent, left to whoever holds the job",
                item.name,
            )
            self.settled(item.key)
            # If the claim is still ours after all, nobody else would take the job while our
            # heartbeat renews it: the next claim gives it back (see :meth:`_orphans`), and
            # whoever claims it next settles its intent.
            self._maybe_orphans = True
            raise JobDropped(f"the claim on job {item.key} may have run out before its submit")

        return check

    # ---- lost answers

    async def refresh(self) -> None:
        """Read every worker's open intents, then every task id of the account (in that
        order: a submit answered between the two reads is in the second), and the database's
        clock."""
        intents = await self.raw.open_intents()
        ids = await self.raw.known_task_ids()
        t0 = _now()
        server = await self.raw.server_now()
        t1 = _now()
        self._offset = server - (t0 + (t1 - t0) / 2)
        self._intents = intents
        self.known = {tid: self.known.get(tid) or OwnTask(tid) for tid in ids}

    def competing(self, lost: LostSubmit) -> bool:
        """Whether another worker's open intent may have created a task in this lost submit's
        window (database clock, with a margin): then no task in it can be proven ours."""
        from .._journal import JobPhase

        lo = lost.sent_at + self._offset - CLOCK_MARGIN
        hi = lost.failed_at + self._offset + CLOCK_MARGIN + _dt.timedelta(seconds=5)
        for oi in self._intents:
            if oi.owner == self.owner or (oi.batch == self.batch and oi.key == lost.key):
                continue
            if oi.server_at is None:
                return True
            end = oi.server_at + INTENT_HORIZON if oi.phase == JobPhase.UNRESOLVED else None
            if oi.server_at <= hi and (end is None or end >= lo):
                return True
        return False


@contextlib.asynccontextmanager
async def open_shared_batch(dsn: str, *, batch: str, client: Any) -> AsyncIterator[Any]:
    """Open the shared batch ``batch`` of ``client``'s account in the PostgreSQL journal at
    ``dsn`` (``emo-async status``/``cancel``: read it, cancel its tasks); closed on leaving.

    The client need not be open: only its base URL, workspace and key name the account.

    Raises:
        PostgresUnavailable: The server cannot be reached (or the extra is not installed).
    """
    from .._journal.postgres import PostgresJournal

    account = client.account_digest()
    journal = await PostgresJournal.open(dsn, batch=batch, account=account)
    try:
        yield journal
    finally:
        await journal.aclose()
