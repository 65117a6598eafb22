"""Frugal rounds: list sweeps spent in proportion to finishes, and none while the tasks
already known finished keep the query budget busy; against the simulator over loopback HTTP on
a fake clock (see test_poller for the rig)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from _media_fixtures import FileServer
from test_poller import Rig, rig

from emo_async import PollPolicy, TaskStatus
from emo_async._poller import StatusPoller

pytestmark = pytest.mark.anyio

#: Every simulated task takes exactly 10 s (test_poller's SIM).
TASK_SECONDS = 10.0


def _taught(r: Rig, n: int = 8) -> None:
    """The model has seen tasks take 10 s (as the simulator's do)."""
    for _ in range(n):
        r.poller.model.observe(None, TASK_SECONDS)


def _policy(**kw: object) -> PollPolicy:
    base: dict[str, object] = {
        "target_delay": 1.0,
        "prior_base": 10.0,
        "prior_per_audio_second": 0.0,
        "fallback_interval": 60.0,
    }
    base.update(kw)
    return PollPolicy(**base)  # type: ignore[arg-type]


def _count(r: Rig, endpoint: str) -> int:
    return sum(1 for req in r.sim.ledger.requests if req.endpoint == endpoint)


class TestInProportion:
    @pytest.mark.parametrize("finds", [None, 0.0], ids=["default", "off"])
    async def test_a_steady_flow_costs_a_page_per_few_finishes(
        self, files: FileServer, finds: float | None
    ) -> None:
        """Two tasks end per second and rounds come every second: sweeping every round (as
        ``sweep_finds=0`` does) costs half a page per job; waiting until a sweep should find
        four costs a quarter, and no task waits more than three rounds to be noticed."""
        n, gap = 40, 0.5
        policy = _policy() if finds is None else _policy(sweep_finds=finds)
        async with rig(files, policy) as (r, tg):
            _taught(r)
            r.sim.ledger.reset()
            submitted: dict[str, float] = {}
            for _ in range(n):
                [task_id] = await r.submit(1)
                submitted[task_id] = r.clock()
                r.poller.watch(task_id, submitted_at=r.clock())
                r.wait_all(tg, [task_id])
                await r.clock.run_to(r.clock() + gap, lambda: r.spy.idle)
                r.sim.clock.advance(gap)
            while len(r.results) < n:
                await r.clock.run_to(r.clock() + gap, lambda: r.spy.idle)
                r.sim.clock.advance(gap)
            pages, gets = _count(r, "task_list"), _count(r, "task_get")
        assert all(task.status == TaskStatus.SUCCEEDED for _, task in r.results.values())
        assert gets <= n + 1  # the last task alone is asked directly
        late = [r.results[t][0] - (at + TASK_SECONDS) for t, at in submitted.items()]
        if finds is None:
            assert pages <= 0.3 * n
            # Three rounds (a sweep not worth its page waits 2.5 of them at most), plus the
            # step of this test's clock the end may fall in.
            assert max(late) <= 3 * 1.0 + gap
        else:
            assert pages >= 0.45 * n
            assert max(late) <= 1.0 + gap


class TestBacklog:
    async def test_no_sweep_while_known_finishes_keep_the_budget_busy(
        self, files: FileServer
    ) -> None:
        """Twelve tasks found finished at 2 queries/s keep the budget busy for 6 s: the rounds
        in between would find the four still running could not be fetched sooner, so they do
        not sweep; once the queue is nearly empty they do again."""
        policy = _policy()
        async with rig(files, policy, rate=2.0, query_rate=2.0) as (r, tg):
            _taught(r)
            early = await r.submit(12)
            r.sim.clock.advance(TASK_SECONDS)
            late = await r.submit(4)  # running: they end 10 s from now
            start = r.clock()
            for task_id in early + late:
                # Watched as if long overdue: the model says every round is worth a sweep.
                r.poller.watch(task_id, submitted_at=start - 3 * TASK_SECONDS)
            r.sim.ledger.reset()
            r.wait_all(tg, early + late)
            await r.clock.run_to(start + 5.5, lambda: r.spy.idle)
            during = _count(r, "task_list")
            assert sum(1 for t in early if t in r.results) >= 10
            await r.clock.run_to(start + 7.5, lambda: r.spy.idle)
            after = _count(r, "task_list")
            r.sim.clock.advance(TASK_SECONDS)
            await r.run_until_done(late)
        # The first round's sweep, then none while 2 or more GETs wait (until about 5 s).
        assert during <= 2
        assert after >= during + 1  # and sweeps resume once the queue drains
        assert all(r.results[t][1].succeeded for t in early + late)

    async def test_a_sweep_does_not_page_on_for_tasks_being_fetched(
        self, files: FileServer
    ) -> None:
        """The tasks already known finished are not looked for again in the list: a sweep
        stops at the page that shows the rest."""
        policy = _policy(list_page_size=5)
        async with rig(files, policy, rate=4.0, query_rate=4.0) as (r, tg):
            _taught(r)
            early = await r.submit(10)
            r.sim.clock.advance(TASK_SECONDS)
            late = await r.submit(3)
            start = r.clock()
            # Fetched newest first, so the oldest, on the list's last page, wait longest.
            for task_id in [*reversed(early), *late]:
                r.poller.watch(task_id, submitted_at=start - 3 * TASK_SECONDS)
            r.sim.ledger.reset()
            r.wait_all(tg, early + late)
            # The first sweep reads all three pages (13 tasks, 5 a page) and finds ten ended.
            await r.clock.run_to(start + 0.5, lambda: r.spy.idle)
            assert _count(r, "task_list") == 3
            pages = [3]
            for k in range(1, 6):
                await r.clock.run_to(start + k + 0.5, lambda: r.spy.idle)
                pages.append(_count(r, "task_list"))
            r.sim.clock.advance(TASK_SECONDS)
            await r.run_until_done(early + late)
        sweeps = [b - a for a, b in itertools.pairwise(pages)]
        # The three still running are on the newest page: one page a sweep from then on.
        assert any(sweeps)
        assert max(sweeps) == 1


class TestFallback:
    async def test_tasks_watched_before_any_duration_are_not_asked_while_surely_running(
        self, files: FileServer
    ) -> None:
        """The direct query that guards against a lagging list waits a usual duration plus
        ``fallback_interval``, also for tasks watched before the model knew that duration."""
        policy = _policy(fallback_interval=5.0)
        async with rig(files, policy) as (r, tg):
            ids = await r.submit(4)
            start = r.clock()
            r.wait_all(tg, ids)  # watched knowing nothing: due at once
            await r.clock.run_to(start + 0.5, lambda: r.spy.idle)
            _taught(r)  # other tasks then showed that they take 10 s
            r.sim.ledger.reset()
            await r.clock.run_to(start + 9.5, lambda: r.spy.idle)
            assert _count(r, "task_list") >= 2  # the list did show them running
            assert _count(r, "task_get") == 0
            r.sim.clock.advance(TASK_SECONDS)
            await r.run_until_done(ids)
        assert all(r.results[t][1].succeeded for t in ids)


class TestBindingBudget:
    """When tasks end as fast as the query budget fetches them, or faster, a sweep goes out as
    soon as the known finishes no longer fill the budget past its answer, not when the page
    economy or the model would send one: every second the budget idles then delays the end."""

    @staticmethod
    def _poller(
        query_rate: float, list_rate: float, watched: int, querying: int
    ) -> tuple[StatusPoller, list[Any]]:
        now = [100.0]

        async def unused(*_: object) -> Any:
            raise AssertionError("no request in this test")

        poller = StatusPoller(
            _policy(list_page_size=5),
            unused,
            unused,  # type: ignore[arg-type]
            clock=lambda: now[0],
            query_rate=lambda: query_rate,
            list_rate=lambda: list_rate,
        )
        for i in range(watched):
            poller.watch(f"t{i}", submitted_at=now[0] - 1.0)
        entries = list(poller._entries.values())
        for e in entries[:querying]:
            e.querying = True
        return poller, entries

    def test_a_binding_budget_sweeps_before_it_idles(self) -> None:
        # 2 GETs/s; the last sweep, 1 s ago, found 2 finishes over 1 s: the budget binds.
        # 1 GET still waits and 20 tasks are open (4 pages: it would want 10 finds a sweep).
        poller, entries = self._poller(2.0, 10.0, watched=21, querying=1)
        poller._last_sweep, poller._find_rate = 99.0, 2.0
        due = [e for e in entries if not e.querying]
        assert poller._sweep_worth(entries, due, 100.0)
        # Found at half the budget's pace: the budget does not bind, and the page economy
        # waits for enough finishes (or the stretch).
        poller._find_rate = 1.0
        assert not poller._sweep_worth(entries, due, 100.0)

    def test_a_queue_past_the_next_round_and_the_answer_waits(self) -> None:
        # 4 pages at 2 pages/s take 1.5 s to answer: with the 1 s round, 2.5 s of GETs (5 at
        # 2/s) already waiting keep the budget busy until the sweep's finds arrive.
        poller, entries = self._poller(2.0, 2.0, watched=25, querying=5)
        poller._last_sweep, poller._find_rate = 99.0, 5.0
        due = [e for e in entries if not e.querying]
        assert not poller._sweep_worth(entries, due, 100.0)
        entries[4].querying = False  # one fewer: the budget would idle before the answer
        due = [e for e in entries if not e.querying]
        assert poller._sweep_worth(entries, due, 100.0)

    @pytest.mark.parametrize(("query_rate", "sweeps"), [(2.0, True), (50.0, False)])
    def test_an_early_model_sweeps_only_when_the_budget_would_idle(
        self, query_rate: float, sweeps: bool
    ) -> None:
        # One task seen finished after 0.5 s; 30 watched 1 s ago: the model, knowing only that
        # one, calls them all finished. 1 s after the last sweep (1.5 s until the stretched
        # one), 30 probable finishes would idle a budget of 2/s (3 fetches by then), not
        # one of 50/s (75): only the small budget is worth an early page.
        poller, entries = self._poller(query_rate, 10.0, watched=30, querying=0)
        poller.model.observe(None, 0.5)
        poller._last_sweep = 99.0
        assert poller._sweep_worth(entries, entries, 100.0) is sweeps
