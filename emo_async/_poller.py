"""One shared status poller for every open task of a client.

A per-task sleep loop spends the account's 20 task queries per second long before 500 tasks are
open. The poller instead owns every open task and decides when each is next looked at:

* Until a task could plausibly be finished, it is not queried at all. The poller learns the
  shortest plausible duration online (from what it observed, scaled by audio duration) and
  starts with "any time" so the first tasks are not noticed late.
* Once tasks are due, one ``GET /tasks`` sweep (the task list, up to ``list_page_size`` tasks
  per request) says which of them finished; only those get a ``GET /tasks/{id}`` (the list has
  no result URLs). Without the list (``use_list=False``, or after the list missed a finished
  task), due tasks are queried one by one.
* Every due task is looked at once per ``target_delay``: that bounds the delay between a task
  finishing and the client noticing, rate permitting. All queries go through the client's
  task-query limiter, so the account limit holds whatever the number of tasks.
* Sweeps are spent in proportion to finishes. A round sends one only when the durations seen
  so far say it should find ``sweep_finds`` finished tasks a page (or half the tasks it looks
  for, when few are left), and at least every ``2.5 x target_delay``: when tasks end more slowly
  than that, noticing them a round later costs little and halves the list pages per job. Nor
  does a round sweep while the tasks already known finished keep the query budget busy past
  the next round and the sweep's own answer: what it found could not be fetched sooner. When
  the last sweep found finishes about as fast as the budget fetches them (the budget binds),
  the next one goes out as soon as that is no longer so, whatever it is expected to find: an
  idle second of a binding budget is a second added to the batch.
* The tail: while the task-query budget has room (at most half the client's task-query rate)
  and the tail credit lasts (``tail_queries_per_task`` per watched task), the tasks most likely
  finished — by the durations observed so far, those past their usual duration first — are
  looked at every ``tail_delay`` instead of every ``target_delay``: one list page for all of
  them, or a direct query when one is left. A batch's last tasks are so noticed within about
  ``tail_delay`` of finishing, and the batch pays at most ``tail_queries_per_task`` a job for it.
* 429s and 5xx never stop it: the request path backs off, and a failed query is simply tried
  again on the next round.
* A status the documents do not list (``succeeded``, ``WARMING``) is not a finish: it is logged
  once at WARNING and the task is polled on, until ``unknown_status_timeout`` has passed since
  the first such answer; then its waiter gets :class:`UnknownTaskStatusError`.

Waiters (``Client.wait`` and the batch runner) park on an event per task.
"""

from __future__ import annotations

import bisect
import datetime as _dt
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import attrs
from anyio.abc import TaskStatus as AnyioTaskStatus

from ._config import PollPolicy
from ._exceptions import APIError, EmoError, UnknownTaskStatusError
from ._models import Task, TaskListItem, TaskStatus
from ._ratelimit import Clock

__all__ = ["DurationModel", "PollerStatistics", "StatusPoller"]

logger = logging.getLogger("emo_async.poller")

FetchTask = Callable[[str], Awaitable[Task]]
#: Yields the newest tasks first, reading at most ``max_pages`` pages.
ListTasks = Callable[[int], AsyncIterator[TaskListItem]]
#: A cancel scope that expires after that many seconds of the poller's :data:`Clock`.
Timeout = Callable[[float], anyio.CancelScope]

#: A task reported UNKNOWN this soon after we started watching it is asked again: right after
#: a submit it means "not visible yet", not "expired".
_UNKNOWN_GRACE = 30.0
#: Tail looks use at most this share of the client's task-query rate: the rest stays for the
#: regular rounds, the queries of finished tasks and anyone else using the client.
_TAIL_SHARE = 0.5
#: An extra look is worth its query when it finds a finished task at least this often (a list
#: page: when it is expected to find this many).
_TAIL_WORTH = 0.25
#: The budget binds when the last sweep found finishes at this share of the task-query rate
#: or more (a hair under 1: a rate measured over a few seconds is not exact).
_BINDING = 0.9
#: A regular sweep not worth its pages still goes out once this many ``target_delay`` have
#: passed since the last one.
_SWEEP_STRETCH = 2.5
#: Until as many durations were seen as tasks are open (or this many), they may be the first
#: wave's fastest only, the rest still running, and would call every older task finished:
#: sweeps keep to the stretched cadence.
_SWEEP_MODEL_MIN = 64
#: The tail credit a client starts with, and the most it saves up (a long-lived client must not
#: spend on one small batch what thousands of earlier tasks earned).
_TAIL_CREDIT_START = 2.0
_TAIL_CREDIT_CAP = 64.0


class DurationModel:
    """Learns how soon after submission a task can be finished, from what it observed.

    Durations are measured on our clock (submit → first seen finished), so they hold whatever
    the server's clock or speed. The shape ``base + per_second * audio`` comes from the
    policy's prior; the scale is learned as a low quantile of observed/shape ratios, which
    stays early (cheap) rather than late (slow to notice).
    """

    def __init__(self, policy: PollPolicy, *, window: int = 256, quantile: float = 0.1) -> None:
        self._base = policy.prior_base
        self._per = policy.prior_per_audio_second
        self._early = policy.early_factor
        self._ratios: deque[float] = deque(maxlen=window)
        self._sorted: list[float] = []
        self._q = quantile
        self.observations = 0

    def _shape(self, audio_seconds: float | None) -> float:
        audio = audio_seconds if audio_seconds is not None else 10.0
        return max(1e-6, self._base + self._per * max(0.0, audio))

    def observe(self, audio_seconds: float | None, duration: float) -> None:
        if duration <= 0 or not math.isfinite(duration):
            return
        ratio = duration / self._shape(audio_seconds)
        if len(self._ratios) == self._ratios.maxlen:
            old = self._ratios.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        self._ratios.append(ratio)
        bisect.insort(self._sorted, ratio)
        self.observations += 1

    def earliest(self, audio_seconds: float | None) -> float:
        """Seconds after submission before which the task is not worth a query."""
        if not self._sorted:
            return 0.0
        idx = min(len(self._sorted) - 1, int(self._q * len(self._sorted)))
        return self._early * self._sorted[idx] * self._shape(audio_seconds)

    def hazard(self, audio_seconds: float | None, seen_running: float, elapsed: float) -> float:
        """How likely a task still running ``seen_running`` seconds after submission has
        finished by ``elapsed``, by the durations seen so far (0 before any was seen; 1 past the
        longest seen)."""
        ratios = self._sorted
        if not ratios:
            return 0.0
        shape = self._shape(audio_seconds)
        if elapsed / shape >= ratios[-1]:
            return 1.0
        n = len(ratios)
        before = bisect.bisect_right(ratios, seen_running / shape) / n
        by_now = bisect.bisect_right(ratios, elapsed / shape) / n
        return max(0.0, by_now - before) / (1.0 - before)

    def typical(self, audio_seconds: float | None) -> float | None:
        """The median duration seen for this audio length, once anything was observed."""
        if not self._sorted:
            return None
        return self._sorted[len(self._sorted) // 2] * self._shape(audio_seconds)


@attrs.frozen
class PollerStatistics:
    """A snapshot of the poller.

    Attributes:
        open_tasks: Tasks being watched.
        task_queries: ``GET /tasks/{id}`` sent.
        list_queries: ``GET /tasks`` pages sent.
        finished: Tasks seen finished.
        list_enabled: Whether sweeps are in use.
    """

    open_tasks: int
    task_queries: int
    list_queries: int
    finished: int
    list_enabled: bool


@attrs.define(eq=False)
class _Entry:
    task_id: str
    audio_seconds: float | None
    submitted: float  # our monotonic clock
    submitted_wall: _dt.datetime
    earliest: float
    next_direct: float
    #: Before this, the task cannot plausibly be finished (the model's guess at watch time).
    plausible: float = 0.0
    waiters: int = 0
    done: anyio.Event = attrs.field(factory=anyio.Event)
    result: Task | None = None
    error: BaseException | None = None
    querying: bool = False
    seen_finished_in_list: bool = False
    list_absent: int = 0
    last_nonterminal: float = 0.0
    #: The last answer said PENDING: queued on the server, not worth a tail look.
    pending: bool = False
    #: The query in flight is a tail look, paid from the tail credit unless it finds an end.
    tail_look: bool = False
    #: When the task first answered a status nobody documented (None: its status is known).
    unknown_since: float | None = None
    warned_statuses: set[str] = attrs.field(factory=set)


class StatusPoller:
    """Polls every open task of one client within the task-query budget (internal; one per
    :class:`Client`, started in its task group)."""

    def __init__(
        self,
        policy: PollPolicy,
        fetch: FetchTask,
        list_tasks: ListTasks,
        *,
        max_concurrent_queries: int = 16,
        clock: Clock = time.monotonic,
        move_on_after: Timeout = anyio.move_on_after,
        query_rate: Callable[[], float] | None = None,
        list_rate: Callable[[], float] | None = None,
    ) -> None:
        self.policy = policy
        # The client's task-query rate right now (it falls after a 429): what the tail looks
        # may use a share of. Without it, no tail looks.
        self._query_rate = query_rate
        # The list pages' rate: a sweep of several pages takes their spacing to answer.
        self._list_rate = list_rate
        # Tests pass a fake clock and its timeout, to step through hours of polling at once.
        self._clock = clock
        self._move_on_after = move_on_after
        self._fetch = fetch
        self._list = list_tasks
        self._entries: dict[str, _Entry] = {}
        self._wakeup = anyio.Event()
        self._query_slots = anyio.CapacityLimiter(max_concurrent_queries)
        self.model = DurationModel(policy)
        self._list_enabled = policy.use_list
        self._blind: set[str] = set()
        self._task_queries = 0
        self._list_queries = 0
        self._finished = 0
        self._tg: anyio.abc.TaskGroup | None = None
        self._tail_credit = _TAIL_CREDIT_START
        self._last_round = -math.inf
        self._last_sweep = -math.inf
        #: Finished tasks per second the last regular sweep found, over the time since the
        #: one before: at the query rate or above, the query budget binds.
        self._find_rate = 0.0
        #: How long the last sweep took to answer, per page it read (list pages have a rate
        #: of their own: a sweep of two pages takes at least one page's spacing longer).
        self._page_seconds = 0.0
        self._tail_recheck = -math.inf
        #: Tail rounds run, and what they cost beyond finding finished tasks (statistics).
        self.tail_rounds = 0
        self.tail_spent = 0.0

    # -- public -----------------------------------------------------------------------------

    def watch(
        self,
        task_id: str,
        *,
        audio_seconds: float | None = None,
        submitted_at: float | None = None,
    ) -> None:
        """Start watching a task (idempotent); ``submitted_at`` is on the poller's clock."""
        if task_id in self._entries:
            return
        now = self._clock()
        submitted = submitted_at if submitted_at is not None else now
        earliest = submitted + self.model.earliest(audio_seconds)
        self._tail_credit = min(
            _TAIL_CREDIT_CAP, self._tail_credit + self.policy.tail_queries_per_task
        )
        self._entries[task_id] = _Entry(
            task_id=task_id,
            audio_seconds=audio_seconds,
            submitted=submitted,
            submitted_wall=_dt.datetime.now(_dt.UTC) - _dt.timedelta(seconds=now - submitted),
            earliest=earliest,
            plausible=earliest,
            # With list sweeps, a task is queried directly only once a sweep says it finished
            # (or as a fallback, rarely); without them, as soon as it is due.
            next_direct=earliest + (self.policy.fallback_interval if self._list_enabled else 0.0),
            last_nonterminal=submitted,
        )
        self._wakeup.set()

    async def wait(self, task_id: str, *, audio_seconds: float | None = None) -> Task:
        """Wait until the task is finished and return its final snapshot."""
        self.watch(task_id, audio_seconds=audio_seconds)
        entry = self._entries[task_id]
        entry.waiters += 1
        try:
            await entry.done.wait()
        finally:
            entry.waiters -= 1
            if entry.waiters == 0 and self._entries.get(task_id) is entry:
                # Finished, or its last waiter was cancelled: either way nobody needs it polled.
                self._entries.pop(task_id, None)
        if entry.error is not None:
            raise entry.error
        assert entry.result is not None
        return entry.result

    def forget(self, task_id: str) -> None:
        """Stop watching a task nobody waits for any more."""
        entry = self._entries.get(task_id)
        if entry is not None and entry.waiters == 0:
            self._entries.pop(task_id, None)

    @property
    def list_enabled(self) -> bool:
        return self._list_enabled

    def statistics(self) -> PollerStatistics:
        return PollerStatistics(
            open_tasks=sum(1 for e in self._entries.values() if not e.done.is_set()),
            task_queries=self._task_queries,
            list_queries=self._list_queries,
            finished=self._finished,
            list_enabled=self._list_enabled,
        )

    # -- the loop ---------------------------------------------------------------------------

    async def run(self, *, task_status: AnyioTaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The poller's loop; runs until cancelled."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            next_round = 0.0
            while True:
                open_entries = [e for e in self._entries.values() if not e.done.is_set()]
                if not open_entries:
                    self._wakeup = anyio.Event()
                    await self._wakeup.wait()
                    continue
                now = self._clock()
                earliest_due = min(e.earliest for e in open_entries)
                wake_at = max(next_round, earliest_due)
                tail_at = self._tail_at()
                if wake_at > now and tail_at <= now:
                    if await self._tail_round(tg, open_entries, now):
                        # It was a round: the regular cadence counts from it.
                        next_round = now + self.policy.target_delay
                    else:
                        self._tail_recheck = now + self.policy.tail_delay / 4
                    continue
                if wake_at > now:
                    self._wakeup = anyio.Event()
                    with self._move_on_after(min(wake_at, tail_at) - now):
                        await self._wakeup.wait()
                    continue
                next_round = now + self.policy.target_delay
                self._last_round = now
                await self._round(tg, open_entries, now)

    def _tail_at(self) -> float:
        """When a tail round may next run (infinity while tail looks are off or unaffordable)."""
        policy = self.policy
        if (
            self._query_rate is None
            or policy.tail_delay >= policy.target_delay
            or self._tail_credit < 1.0
            or not self.model.observations
        ):
            return math.inf
        return max(self._last_round + policy.tail_delay, self._tail_recheck)

    def _likelihood(self, entry: _Entry, now: float) -> float:
        return self.model.hazard(
            entry.audio_seconds,
            entry.last_nonterminal - entry.submitted,
            now - entry.submitted,
        )

    async def _tail_round(self, tg: anyio.abc.TaskGroup, entries: list[_Entry], now: float) -> bool:
        """Spend spare budget on the open tasks most likely finished; False if none is worth a
        look now."""
        assert self._query_rate is not None
        policy = self.policy
        # Looks this round may take within the share of the rate (one round per tail_delay).
        allowance = _TAIL_SHARE * self._query_rate() * policy.tail_delay
        scored = sorted(
            (
                (self._likelihood(e, now), e)
                for e in entries
                if not e.querying
                and not e.pending
                and e.plausible <= now
                and now - e.last_nonterminal >= policy.tail_delay
            ),
            key=lambda pair: pair[0],
            reverse=True,
        )
        if not scored or self._backlogged(entries, policy.tail_delay):
            return False
        if self._list_enabled and len(scored) >= 2:
            pages = self._pages(entries)
            expected = sum(score for score, _ in scored)
            if expected < _TAIL_WORTH or pages > min(allowance, self._tail_credit):
                return False
            before = self._list_queries
            self._last_round = now
            self.tail_rounds += 1
            await self._round(tg, entries, now, due=[e for _, e in scored], tail=True)
            # At least a page, whoever counted it.
            self._spend(max(1, self._list_queries - before))
            return True
        picked = [
            e
            for score, e in scored[: int(min(allowance, self._tail_credit))]
            if score >= _TAIL_WORTH
        ]
        if not picked:
            return False
        self._last_round = now
        self.tail_rounds += 1
        for e in picked:
            # Paid up front, refunded if it finds the task finished (that query was due anyway).
            e.tail_look = True
            self._spend(1.0)
            self._spawn_query(tg, e)
        return True

    def _spend(self, queries: float) -> None:
        self._tail_credit -= queries
        self.tail_spent += queries

    async def _round(
        self,
        tg: anyio.abc.TaskGroup,
        entries: list[_Entry],
        now: float,
        *,
        due: list[_Entry] | None = None,
        tail: bool = False,
    ) -> None:
        if due is None:
            due = [e for e in entries if e.earliest <= now and not e.querying]
        if not due:
            return
        if self._list_enabled and len(due) >= 2:
            if not tail and not self._sweep_worth(entries, due, now):
                return
            since, self._last_sweep = now - self._last_sweep, now
            before = self._list_queries
            listed = await self._sweep(entries)
            # A page's round trip, the list rate's spacing between pages left out.
            read = max(1, self._list_queries - before)
            took, gap = max(0.0, self._clock() - now), self._page_gap()
            self._page_seconds = took / read if took / read >= gap else took - (read - 1) * gap
            if listed is not None and not tail and math.isfinite(since):
                finds = sum(1 for e in due if (st := listed.get(e.task_id)) and st.is_terminal)
                self._find_rate = finds / max(since, self.policy.target_delay)
            if listed is not None:
                for e in due:
                    status = listed.get(e.task_id)
                    if status is not None and not status.is_terminal and status.is_known:
                        # Seen running (or queued) at the start of this sweep.
                        e.last_nonterminal = max(e.last_nonterminal, now)
                        e.pending = status == TaskStatus.PENDING
                    if tail:
                        # A tail round may come right after the submit, before a lagging list
                        # shows the task: absences count in regular rounds only.
                        if status is not None and status.is_terminal and not e.querying:
                            e.seen_finished_in_list = True
                            self._spawn_query(tg, e)
                        continue
                    e.list_absent = 0 if status is not None else e.list_absent + 1
                    if e.list_absent >= 2 and e.task_id not in self._blind:
                        self._blind.add(e.task_id)
                        if len(self._blind) >= 3:
                            self._list_enabled = False
                            logger.warning(
                                "the task list does not show our tasks; polling tasks one by one"
                            )
                    finished = status is not None and status.is_terminal
                    if e.querying:
                        continue
                    if finished or e.list_absent >= 2 or self._fallback_due(e, now):
                        e.seen_finished_in_list = finished
                        self._spawn_query(tg, e)
                return
        for e in due:
            self._spawn_query(tg, e)

    def _fallback_due(self, entry: _Entry, now: float) -> bool:
        """Whether a task the list shows running is queried directly anyway, in case the list
        lags: not before a usual duration has passed, plus ``fallback_interval`` (a task
        watched before any duration was seen would otherwise be asked while surely running)."""
        typical = self.model.typical(entry.audio_seconds) or 0.0
        return now >= max(
            entry.next_direct, entry.submitted + typical + self.policy.fallback_interval
        )

    def _pages(self, entries: list[_Entry]) -> int:
        """List pages a sweep reads to see every open task not already being queried."""
        return max(
            1, math.ceil(sum(1 for e in entries if not e.querying) / self.policy.list_page_size)
        )

    def _backlogged(self, entries: list[_Entry], horizon: float) -> bool:
        """Whether the queries already waiting keep the budget busy for ``horizon`` seconds:
        a look now would find tasks that could not be fetched any sooner, and its own queries
        would delay those waiting."""
        if self._query_rate is None:
            return False
        waiting = sum(1 for e in entries if e.querying)
        return waiting > 0 and waiting >= self._query_rate() * horizon

    def _sweep_answer(self, entries: list[_Entry]) -> float:
        """Seconds a sweep now would take to answer: each page's round trip, and the list
        rate's spacing between its pages."""
        rtt = self._page_seconds
        return rtt + (self._pages(entries) - 1) * max(rtt, self._page_gap())

    def _page_gap(self) -> float:
        return 1.0 / self._list_rate() if self._list_rate is not None else 0.0

    def _sweep_worth(self, entries: list[_Entry], due: list[_Entry], now: float) -> bool:
        """Whether a regular round's sweep is worth its pages now."""
        policy = self.policy
        # Backlogged past the next round and this sweep's own answer: its finds could not be
        # fetched any sooner. Short of that, it goes out now so that they queue up before
        # the budget idles.
        if self._backlogged(entries, policy.target_delay + self._sweep_answer(entries)):
            return False
        stretch = _SWEEP_STRETCH * policy.target_delay
        # Rounds come every target_delay: a hair of slack so float sums do not skip one.
        if policy.sweep_finds <= 0 or now - self._last_sweep >= stretch * (1 - 1e-6):
            return True
        # Queued tasks cannot have ended: a later sweep will see them started.
        running = [e for e in due if not e.pending]
        if not running:
            return False
        # With few tasks open (a batch's end), waiting for many finds would wait for the last.
        unseen = sum(1 for e in entries if not e.querying and not e.pending)
        wanted = min(policy.sweep_finds * self._pages(entries), unseen / 2)
        if self._query_rate is not None and self._find_rate >= _BINDING * self._query_rate():
            # Tasks end about as fast as the budget can fetch them, or faster: the budget
            # binds, and every second it idles delays the batch's end by as much. A sweep that
            # keeps it busy is worth its pages whatever it finds.
            return True
        expected = sum(self._likelihood(e, now) for e in running)
        if self.model.observations < min(len(entries), _SWEEP_MODEL_MIN):
            # The model may know only the fastest tasks yet and overrate every finish: it
            # decides only whether the budget would idle before the stretched sweep, with
            # more tasks probably finished than it could fetch by then (cheap where the
            # budget is large; where it is small, the very case it may bind).
            if self._query_rate is None or not self.model.observations:
                return False
            until_stretch = stretch - (now - self._last_sweep)
            return expected >= max(wanted, self._query_rate() * until_stretch)
        return expected >= wanted

    async def _sweep(self, entries: list[_Entry]) -> dict[str, TaskStatus] | None:
        """List the newest tasks until every open one was seen: their statuses by id.

        No time filter: the list's time parameters are in the server's clock and zone, and a
        skew must not blind the poller. Our open tasks are among the newest, so a page or two
        covers them.
        """
        # Tasks already being queried need no list: reading on for them costs pages.
        wanted = {e.task_id for e in entries if not e.querying}
        if not wanted:
            return {}
        max_pages = 1 + math.ceil(len(wanted) / self.policy.list_page_size)
        listed: dict[str, TaskStatus] = {}
        try:
            async for item in self._list(max_pages):
                if item.task_id in wanted:
                    listed[item.task_id] = item.status
                    if len(listed) == len(wanted):
                        break
        except EmoError as exc:
            logger.info("task list sweep failed (%s); querying due tasks directly", exc)
            return None
        return listed

    def note_list_page(self) -> None:
        """Called by the list iterator for each page it fetched (statistics)."""
        self._list_queries += 1

    def _spawn_query(self, tg: anyio.abc.TaskGroup, entry: _Entry) -> None:
        entry.querying = True
        tg.start_soon(self._query, entry)

    async def _query(self, entry: _Entry) -> None:
        tail_look, entry.tail_look = entry.tail_look, False
        try:
            async with self._query_slots:
                self._task_queries += 1
                task = await self._fetch(entry.task_id)
        except APIError as exc:
            if not exc.retryable:
                # A revoked key, a refused request: asking again will not help. The waiter
                # gets the error (the batch keeps the task in its journal for a later run).
                logger.warning("status query for %s refused: %s", entry.task_id, exc)
                self._fail(entry, exc)
                return
            self._retry_later(entry, exc)
            return
        except Exception as exc:
            # Throttling, 5xx or a dropped connection after retries, or an answer we could not
            # read: try again next round rather than stop watching a billed task.
            self._retry_later(entry, exc)
            return
        finally:
            entry.querying = False
        now = self._clock()
        if task.status == TaskStatus.UNKNOWN and now - entry.submitted < _UNKNOWN_GRACE:
            # Just submitted, yet "does not exist": a lagging replica, not an expired task.
            self._retry_later(entry, None)
            return
        if task.status.is_terminal:
            if tail_look:
                self._tail_credit += 1.0
                self.tail_spent -= 1.0
                self._wakeup.set()  # the credit may allow a tail round the loop gave up on
            self._finish(entry, task, now)
            return
        if entry.seen_finished_in_list:
            entry.seen_finished_in_list = False
        if self._undocumented(entry, task, now):
            return
        entry.last_nonterminal = now
        entry.pending = task.status == TaskStatus.PENDING
        if task.status == TaskStatus.PENDING:
            # Queued behind the account's concurrency cap: it has not started yet.
            wait = max(self.policy.target_delay, self.model.earliest(entry.audio_seconds))
            entry.earliest = now + wait
        else:
            entry.earliest = now + (self.policy.target_delay if self._list_enabled else 0.0)
        entry.next_direct = now + (
            self.policy.fallback_interval if self._list_enabled else self.policy.target_delay
        )
        if not self._list_enabled:
            entry.earliest = max(entry.earliest, entry.next_direct)

    def _undocumented(self, entry: _Entry, task: Task, now: float) -> bool:
        """Track a status the documents do not list; True if the task was given up on."""
        if task.status.is_known:
            entry.unknown_since = None
            return False
        if task.status.value not in entry.warned_statuses:
            entry.warned_statuses.add(task.status.value)
            logger.warning(
                "task %s answered the undocumented status %r: treated as not finished for up"
                " to %.0f s",
                entry.task_id,
                task.status.value,
                self.policy.unknown_status_timeout,
            )
        if entry.unknown_since is None:
            entry.unknown_since = now
        waited = now - entry.unknown_since
        if waited >= self.policy.unknown_status_timeout:
            self._fail(entry, UnknownTaskStatusError(task, waited=waited))
            return True
        return False

    def _retry_later(self, entry: _Entry, exc: BaseException | None) -> None:
        if exc is not None:
            logger.info("status query for %s failed: %s", entry.task_id, exc)
        now = self._clock()
        entry.next_direct = now + self.policy.target_delay
        entry.earliest = max(entry.earliest, now + self.policy.target_delay / 2)

    def _fail(self, entry: _Entry, exc: BaseException) -> None:
        entry.error = exc
        entry.done.set()

    def _finish(self, entry: _Entry, task: Task, now: float) -> None:
        # The task finished somewhere between our last non-terminal look and now.
        finished_at = (entry.last_nonterminal + now) / 2
        self.model.observe(entry.audio_seconds, max(1e-3, finished_at - entry.submitted))
        entry.result = task
        self._finished += 1
        # Without waiters the entry stays until someone calls wait() or forget().
        entry.done.set()

    def fail_all(self, exc: BaseException) -> None:
        """Wake every waiter with an error (the client is closing)."""
        for entry in self._entries.values():
            if not entry.done.is_set():
                self._fail(entry, exc)
