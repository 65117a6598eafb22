"""Settling lost submit answers: one background loop reads the task list for all of them at
once and applies the attribution rule (:mod:`._attribution`) until each is decided.

A lost answer pauses nothing but its own job: other submits go on, and are the very evidence
(witnesses) the rule needs.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import anyio
import attrs

from .._exceptions import EmoError
from .._models import Task, TaskListItem
from .._owned import OwnTask
from ._attribution import (
    Decision,
    Evidence,
    Flight,
    ListedTask,
    LostSubmit,
    Verdict,
    decide,
    to_query,
)

if TYPE_CHECKING:
    from ._ports import Service

__all__ = ["Reconciler", "Sweep", "sweep_task_list"]

logger = logging.getLogger("emo_async.batch")

#: Reads of the task list in a row that may fail before the pending lost submits are decided
#: on no evidence at all (which leaves them unresolved, for a later run to settle).
_MAX_FAILED_READS = 20
#: The key suffix of a lost submit's stand-in for another worker's overlapping intent.
_TWIN = "\x00twin"


@attrs.frozen
class Sweep:
    """What one read of the task list showed, and how much of it is proven complete."""

    items: tuple[TaskListItem, ...]
    complete_after: _dt.datetime | None
    reached_end: bool


async def sweep_task_list(
    client: Service,
    lost: Sequence[LostSubmit],
    own: Mapping[str, OwnTask],
    *,
    page_size: int,
    max_pages: int,
    skew: _dt.timedelta,
) -> Sweep:
    """Read the list newest first until every lost submit's earlier witness is passed.

    Whether the pages were in order is checked, not assumed: only an ordered read proves that
    nothing newer than its last row was left out. No time filter is sent, so the list's
    reading of ``start_time``/``end_time`` (its zone) cannot hide anything.
    """
    need = {ls.key: ls.sent_at for ls in lost}
    bounds: dict[str, _dt.datetime] = {}
    items: dict[str, TaskListItem] = {}
    ordered = True
    oldest: _dt.datetime | None = None
    previous: tuple[str, ...] | None = None
    for page_no in range(1, max_pages + 1):
        page = await client.list_page(page_no, page_size=page_size)
        ids = tuple(i.task_id for i in page.items)
        if ids and ids == previous:
            # The list ignores page_no: what it showed is all it will show.
            logger.warning("the task list repeats its pages; reading stops at page %d", page_no)
            break
        previous = ids
        for item in page.items:
            if item.created_at is None or (oldest is not None and item.created_at > oldest):
                ordered = False
            elif oldest is None or item.created_at < oldest:
                oldest = item.created_at
            items.setdefault(item.task_id, item)
            mine = own.get(item.task_id)
            if mine is None or mine.answered_at is None or item.created_at is None:
                continue
            for key, sent in list(need.items()):
                if mine.answered_at <= sent:
                    bounds[key] = item.created_at - skew
                    del need[key]
        if page.proves_end or (page.total is not None and len(items) >= page.total):
            return Sweep(tuple(items.values()), oldest if ordered else None, True)
        if ordered and not need and oldest is not None and oldest < min(bounds.values()):
            break
    return Sweep(tuple(items.values()), oldest if ordered else None, False)


@attrs.define(eq=False)
class _Pending:
    lost: LostSubmit
    since: float
    done: anyio.Event = attrs.Factory(anyio.Event)
    decision: Decision | None = None
    witnessed: bool = False


class Reconciler:
    """Decides lost submits, all pending ones together, until each has a verdict.

    Args:
        client: Reads the task list and queries candidates.
        known: Our tasks beyond the client's own (those a journal records).
        pause: Seconds between two reads of the list while something is pending.
        patience: Seconds a lost submit waits for a later task of ours to bound its window.
        settle: Seconds after a failure during which the POST may still create its task.
        refresh: Called after each read of the list, before deciding: brings ``known`` up to
            date (a shared journal: every task id of the account, every worker's intents).
            Tasks answered while the list was read are then known too.
        competing: Whether another worker's open intent overlaps a lost submit's window: no
            task in it can then be proven ours (the submit waits, then ends unresolved).
        reserved: Candidates of lost submits left unresolved earlier (a journal's), task id →
            those jobs' keys: no other job's lost submit adopts one. Those this reconciler
            leaves unresolved join them.
    """

    def __init__(
        self,
        client: Service,
        *,
        known: Callable[[], Mapping[str, OwnTask]] = dict,
        pause: float,
        patience: float,
        settle: float,
        page_size: int = 100,
        max_pages: int = 50,
        refresh: Callable[[], Awaitable[None]] | None = None,
        competing: Callable[[LostSubmit], bool] | None = None,
        reserved: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        self._client = client
        self._refresh = refresh
        self._competing = competing
        self._known = known
        self._pause = pause
        self._patience = patience
        self._settle = _dt.timedelta(seconds=settle)
        self._page_size = page_size
        self._max_pages = max_pages
        self._pending: dict[str, _Pending] = {}
        self._wake = anyio.Event()
        self._finished: dict[str, Task] = {}
        self._no_more_witnesses = False
        self._failed_reads = 0
        self._reserved: dict[str, set[str]] = {
            task: set(keys) for task, keys in (reserved or {}).items()
        }
        self.rounds = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def no_more_witnesses(self, value: bool = True) -> None:
        """No further submit of ours will come (the batch has nothing left to send)."""
        self._no_more_witnesses = value
        self._wake.set()

    async def settle(self, lost: LostSubmit) -> Decision:
        """Wait for the verdict on one lost submit."""
        entry = _Pending(lost, anyio.current_time())
        self._pending[lost.key] = entry
        self._wake.set()
        try:
            await entry.done.wait()
        finally:
            self._pending.pop(lost.key, None)
        assert entry.decision is not None
        return entry.decision

    def witness_due(self) -> _dt.datetime | None:
        """The earliest time a submit of ours can witness every pending lost answer's window
        (sent after its failure plus the settling delay), while one is still wanted."""
        due = [e.lost.failed_at + self._settle for e in self._pending.values() if not e.witnessed]
        return max(due) if due else None

    def note_sent(self, sent_at: _dt.datetime) -> None:
        """A submit of ours went out: it bounds the windows of lost answers settled before."""
        for entry in self._pending.values():
            if sent_at >= entry.lost.failed_at + self._settle:
                entry.witnessed = True

    def in_flight(
        self, sent_at: _dt.datetime, audio_seconds: float | None, ratio: str | None
    ) -> contextlib.AbstractContextManager[Callable[[], None]]:
        """Around a billed POST of ours (see :meth:`OwnedTasks.out`): registered with the
        client's registry, which every batch and call on the account reads."""
        return self._client.owned.out(sent_at, audio_seconds, ratio)

    def _flights(self, deciding: set[str]) -> list[Flight]:
        """Our POSTs out now, and lost answers on this account not decided in this round."""
        owned = self._client.owned
        return [
            *(Flight(*out) for out in owned.posts_out()),
            *(
                Flight(sent, audio, ratio)
                for key, sent, audio, ratio in owned.unsettled()
                if key not in deciding
            ),
        ]

    def finished_task(self, task_id: str) -> Task | None:
        """A candidate's final snapshot, when a round queried it."""
        return self._finished.get(task_id)

    async def run(self) -> None:
        """The loop; runs until cancelled with the batch's task group."""
        while True:
            if not self._pending:
                self._wake = anyio.Event()
                await self._wake.wait()
                continue
            # The first read waits out the settling delay: a task created late is then listed.
            await anyio.sleep(max(self._pause, self._settle.total_seconds()))
            if self._pending:
                await self._round()

    async def _round(self) -> None:
        self.rounds += 1
        now = anyio.current_time()
        entries = list(self._pending.values())
        losts = [
            attrs.evolve(
                e.lost,
                patience_over=self._no_more_witnesses or now - e.since >= self._patience,
            )
            for e in entries
        ]
        # POSTs out when this round began: one that fails while the list is read is a lost
        # submit this round does not decide, and its task still no other's to adopt.
        losts_keys = {e.lost.key for e in entries}
        flying = self._flights(losts_keys)
        before = {**self._known(), **self._client.owned.snapshot()}
        skew = _dt.timedelta(seconds=1)
        try:
            found = await sweep_task_list(
                self._client,
                losts,
                before,
                page_size=self._page_size,
                max_pages=self._max_pages,
                skew=skew,
            )
        except EmoError as exc:
            # Nothing read proves nothing, and deciding on it would give up on tasks the list
            # would show next time: wait for a read that works, for a while.
            self._failed_reads += 1
            logger.warning("reconciling %d lost submit(s): task list failed: %s", len(losts), exc)
            if self._failed_reads < _MAX_FAILED_READS:
                return
            found = Sweep((), None, False)
        else:
            self._failed_reads = 0
        if self._refresh is not None:
            try:
                await self._refresh()
            except EmoError as exc:
                # Without every worker's tasks, another's would look like strangers: no
                # decision this round.
                logger.warning("reconciling: the shared journal could not be read: %s", exc)
                return
        # Tasks answered while the list was read are ours too: taken after it, they are never
        # mistaken for strangers.
        own = {**self._known(), **self._client.owned.snapshot()}
        ev = self._evidence(found, own, skew)
        for task_id in sorted(to_query(losts, ev)):
            try:
                self._finished[task_id] = await self._client.get_task(task_id)
            except EmoError as exc:
                logger.info("reconciling: query of candidate %s failed: %s", task_id, exc)
        if self._finished:
            # Answers that came in during those queries are ours as well.
            own = {**self._known(), **self._client.owned.snapshot()}
            ev = self._evidence(found, own, skew)
        contested = {ls.key for ls in losts if self._competing and self._competing(ls)}
        # Another worker's open intent is a lost submit we cannot see the audio of: it stands
        # in as a twin of each submit it overlaps, so no task one of them matches is adopted,
        # and no task is taken for ours in a way that would explain it away for the others.
        twins = [attrs.evolve(ls, key=ls.key + _TWIN) for ls in losts if ls.key in contested]
        flights = [*flying, *self._flights(losts_keys)]
        decisions = decide([*losts, *twins], ev, flights=flights, reserved=self._reserved)
        for key, decision in decisions.items():
            if key.endswith(_TWIN):
                continue
            if key in contested and decision.verdict != Verdict.RESEND:
                if not next(ls.patience_over for ls in losts if ls.key == key):
                    # Once that intent is answered its task is known: wait for it.
                    logger.debug("reconciling %s: another worker's submit overlaps", key)
                    continue
                why = f"{decision.reason}; another worker's unanswered submit overlaps"
                if decision.verdict == Verdict.ADOPT:  # the twin rules it out; never adopt
                    kept = tuple(t for t in ev.listed if t.task_id == decision.task_id)
                    decision = Decision(Verdict.UNRESOLVED, why, candidates=kept)
                else:
                    decision = attrs.evolve(decision, reason=why)
            if decision.verdict == Verdict.WAIT:
                logger.debug("reconciling %s: waiting (%s)", key, decision.reason)
                continue
            entry = self._pending.get(key)
            if entry is None or entry.decision is not None:
                continue
            if decision.verdict == Verdict.ADOPT:
                assert decision.task_id is not None
                if decision.task_id in self._client.owned or decision.task_id in self._known():
                    # Answered to a submit of ours since the evidence was taken: not this one's.
                    continue
                # Ours from this instant: the next round must not offer it to anyone else.
                self._client.owned.add(decision.task_id, sent_at=entry.lost.sent_at)
            elif decision.verdict == Verdict.UNRESOLVED:
                for c in decision.candidates:
                    self._reserved.setdefault(c.task_id, set()).add(key)
            entry.decision = decision
            entry.done.set()

    def _evidence(self, found: Sweep, own: Mapping[str, OwnTask], skew: _dt.timedelta) -> Evidence:
        listed = []
        for item in found.items:
            status = item.status.value
            task = self._finished.get(item.task_id)
            if task is not None and task.is_terminal:
                status = task.status.value
            listed.append(
                ListedTask(
                    item.task_id,
                    item.created_at,
                    status,
                    video_duration=task.video_duration if task is not None else None,
                    video_ratio=task.video_ratio if task is not None else None,
                )
            )
        return Evidence(
            own=own,
            listed=listed,
            complete_after=found.complete_after,
            reached_end=found.reached_end,
            settle=self._settle,
            skew=skew,
        )
