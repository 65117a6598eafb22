"""The shared StatusPoller on its own, against the simulator over loopback HTTP.

Every status query is a real ``GET /tasks/{id}`` (or ``GET /tasks``) answered by the
simulator. Only time is fake: the poller's clock and timers (``clock=``/``move_on_after=``)
and the query limiter's (``clock=``/``sleep=``) run on a :class:`FakeClock`, so a minute of
polling takes a few milliseconds and each query's instant is exact. The simulator's task
lifecycle is moved with ``sim.clock.advance()``.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import attrs
import pytest
from _fake_clock import FakeClock, settle
from _media_fixtures import FileServer, portrait, wav

import emo_async
from emo_async import Client, Limits, PollPolicy, RetryPolicy, Task, TaskListItem, TaskStatus
from emo_async._poller import StatusPoller
from emo_async._ratelimit import AdaptiveRateLimiter
from emo_async.simulator import FaultConfig, Simulator, SimulatorConfig

pytestmark = pytest.mark.anyio

FACE, EXT = [298, 250, 502, 485], [165, 132, 635, 602]
#: Every task takes exactly 10 simulated seconds; the simulator never throttles.
SIM = SimulatorConfig(
    processing_base=10.0,
    processing_per_audio_second=0.0,
    processing_jitter=0.0,
    task_qps=None,
    list_qps=None,
    submit_qps=None,
    max_running=1000,
)


@attrs.define(eq=False)
class Spy:
    """The poller's view of the API: real client calls, timed on the fake clock."""

    client: Client
    clock: FakeClock
    page_size: int
    limiter: AdaptiveRateLimiter | None = None
    queries: list[tuple[float, str]] = attrs.field(factory=list)
    in_flight: int = 0

    @property
    def idle(self) -> bool:
        return self.in_flight == 0

    def first_query(self, task_id: str) -> float | None:
        return next((t for t, tid in self.queries if tid == task_id), None)

    async def fetch(self, task_id: str) -> Task:
        if self.limiter is not None:
            await self.limiter.acquire()
        self.queries.append((self.clock(), task_id))
        self.in_flight += 1
        try:
            return await self.client.get_task(task_id)
        finally:
            self.in_flight -= 1

    def list_tasks(self, max_pages: int) -> AsyncIterator[TaskListItem]:
        return self._pages(max_pages)

    async def _pages(self, max_pages: int) -> AsyncIterator[TaskListItem]:
        pages = self.client.list_tasks(page_size=self.page_size, max_pages=max_pages)
        while True:
            self.in_flight += 1
            try:
                item = await anext(pages)
            except StopAsyncIteration:
                return
            finally:
                self.in_flight -= 1
            yield item


@attrs.define(eq=False)
class Rig:
    sim: Simulator
    client: Client
    clock: FakeClock
    spy: Spy
    poller: StatusPoller
    image: str
    audio: str
    results: dict[str, tuple[float, Task]] = attrs.field(factory=dict)

    async def submit(self, n: int) -> list[str]:
        ids = []
        for _ in range(n):
            task = await self.client.submit(self.image, self.audio, face_bbox=FACE, ext_bbox=EXT)
            ids.append(task.task_id)
        return ids

    def wait_all(self, tg: anyio.abc.TaskGroup, ids: list[str], **kw: Any) -> None:
        """Start a waiter per task; each records (fake time, final snapshot)."""

        async def waiter(task_id: str) -> None:
            task = await self.poller.wait(task_id, **kw)
            self.results[task_id] = (self.clock(), task)

        for task_id in ids:
            tg.start_soon(waiter, task_id)

    async def run_until_done(self, ids: list[str]) -> None:
        """Jump from timer to timer (letting every request finish) until each task's waiter
        has its answer."""
        await self.clock.run_until(
            lambda: all(i in self.results for i in ids), lambda: self.spy.idle
        )

    def queried_at_server(self) -> list[str]:
        """Task ids of the ``GET /tasks/{id}`` the simulator received, in order."""
        requests = self.sim.ledger.requests
        return [r.path.rsplit("/", 1)[1] for r in requests if r.endpoint == "task_get"]


@asynccontextmanager
async def rig(
    files: FileServer,
    policy: PollPolicy,
    *,
    sim_config: SimulatorConfig = SIM,
    rate: float | None = None,
    query_rate: float | None = None,
) -> AsyncIterator[tuple[Rig, anyio.abc.TaskGroup]]:
    """A simulator, a client, and a poller on a fake clock, running in a task group;
    ``query_rate`` is the task-query rate the poller is told (None: no tail looks, as before
    the client told it)."""
    image = files.add("face.png", portrait())
    audio = files.add("voice.wav", wav(1.0))
    clock = FakeClock()
    async with Simulator(sim_config) as sim:
        client = Client(
            sim.api_key,
            base_url=sim.base_url,
            limits=Limits(task_qps=1000, list_qps=1000, submit_qps=1000),
            retry=RetryPolicy(attempts=1),
        )
        async with client:
            limiter = None
            if rate is not None:
                limiter = AdaptiveRateLimiter("task", rate, clock=clock, sleep=clock.sleep)
            spy = Spy(client, clock, policy.list_page_size, limiter)
            poller = StatusPoller(
                policy,
                spy.fetch,
                spy.list_tasks,
                clock=clock,
                move_on_after=clock.move_on_after,
                query_rate=None if query_rate is None else (lambda: query_rate),
            )
            r = Rig(sim, client, clock, spy, poller, image, audio)
            async with anyio.create_task_group() as tg:
                await tg.start(poller.run)
                yield r, tg
                tg.cancel_scope.cancel()


class TestBudget:
    """Many open tasks share one query budget: one query each once finished, never faster than
    the rate."""

    async def test_forty_tasks_one_query_each_within_the_rate(self, files: FileServer) -> None:
        policy = PollPolicy(target_delay=1.0, use_list=False)
        async with rig(files, policy, rate=10.0) as (r, tg):
            ids = await r.submit(40)
            r.sim.clock.advance(10)  # all finished
            start = r.clock()
            r.wait_all(tg, ids)
            await r.run_until_done(ids)
        assert sorted(r.queried_at_server()) == sorted(ids)  # once each, at the server too
        times = [t for t, _ in r.spy.queries]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert min(gaps) >= 1.0 / 10.0  # never more than 10 in any second
        # ... and the budget is used, not wasted: 40 queries in about 4 s.
        assert times[-1] - start == pytest.approx(39 * AdaptiveRateLimiter._SLACK / 10.0)
        for task_id in ids:
            _, task = r.results[task_id]
            assert (task.task_id, task.status) == (task_id, TaskStatus.SUCCEEDED)
        stats = r.poller.statistics()
        assert (stats.open_tasks, stats.task_queries, stats.finished) == (0, 40, 40)

    async def test_unfinished_tasks_are_looked_at_once_per_target_delay(
        self, files: FileServer
    ) -> None:
        policy = PollPolicy(target_delay=2.0, use_list=False)
        async with rig(files, policy) as (r, tg):
            ids = await r.submit(5)  # they take 10 simulated seconds; the clock stays still
            start = r.clock()
            r.wait_all(tg, ids)
            await r.clock.run_to(start + 9.0, lambda: r.spy.idle)
            assert r.results == {}
        # Rounds at 0, 2, 4, 6, 8 s: five looks at each task, no more.
        assert sorted(r.queried_at_server()) == sorted(ids * 5)
        for task_id in ids:
            looks = [t - start for t, tid in r.spy.queries if tid == task_id]
            assert looks == pytest.approx([0.0, 2.0, 4.0, 6.0, 8.0])


class TestTiming:
    """A task is first looked at near its expected end, learned from what was observed and
    scaled by its audio duration."""

    async def test_first_query_lands_at_the_learned_expected_end(self, files: FileServer) -> None:
        policy = PollPolicy(
            target_delay=1.0,
            use_list=False,
            prior_base=0.0,
            prior_per_audio_second=1.0,  # the shape: duration proportional to audio
            early_factor=0.9,
        )
        async with rig(files, policy) as (r, tg):
            [seen] = await r.submit(1)
            r.sim.clock.advance(10)  # it finished
            # Submitted 10 s ago, found finished at the first look: it took about 5 s (the
            # middle of what is known) for 2 s of audio, 2.5 s per audio second.
            r.poller.watch(seen, audio_seconds=2.0, submitted_at=r.clock() - 10.0)
            r.wait_all(tg, [seen], audio_seconds=2.0)
            await r.run_until_done([seen])
            short, long = await r.submit(2)
            start = r.clock()
            r.wait_all(tg, [short], audio_seconds=4.0)
            r.wait_all(tg, [long], audio_seconds=8.0)
            await r.clock.run_until(lambda: r.spy.first_query(long) is not None, lambda: r.spy.idle)
        assert r.results[seen][1].status == TaskStatus.SUCCEEDED
        # 0.9 (early_factor) x 2.5 s per audio second x the audio: not a query before that.
        assert r.spy.first_query(short) == pytest.approx(start + 9.0)
        assert r.spy.first_query(long) == pytest.approx(start + 18.0)

    async def test_without_observations_a_task_is_looked_at_at_once(
        self, files: FileServer
    ) -> None:
        async with rig(files, PollPolicy(target_delay=1.0, use_list=False)) as (r, tg):
            [task_id] = await r.submit(1)
            start = r.clock()
            r.wait_all(tg, [task_id], audio_seconds=30.0)
            await r.clock.run_until(lambda: bool(r.spy.queries), lambda: r.spy.idle)
        assert r.spy.first_query(task_id) == start


class TestWaiters:
    """Each waiter wakes with its own task's final snapshot, whatever the outcome."""

    async def test_each_waiter_gets_its_final_snapshot(self, files: FileServer) -> None:
        bad = files.add("nobody.png", portrait(trigger="InvalidFile.Content:none"))
        second: list[Task] = []
        async with rig(files, PollPolicy(target_delay=1.0, use_list=False)) as (r, tg):
            good = await r.submit(2)
            failed = await r.client.submit(bad, r.audio, face_bbox=FACE, ext_bbox=EXT)
            ids = [*good, failed.task_id]
            r.wait_all(tg, ids)

            async def second_waiter() -> None:
                second.append(await r.poller.wait(good[0]))

            tg.start_soon(second_waiter)
            await r.clock.run_to(r.clock() + 2.5, lambda: r.spy.idle)
            assert r.results == {}  # running: nobody is woken
            r.sim.clock.advance(10)
            await r.run_until_done(ids)
            await settle()
        for task_id in good:
            task = r.results[task_id][1]
            assert (task.task_id, task.status) == (task_id, TaskStatus.SUCCEEDED)
            assert task.video_url is not None
            assert task.video_url.startswith(r.sim.media_host)
        assert second == [r.results[good[0]][1]]
        lost = r.results[failed.task_id][1]
        assert (lost.task_id, lost.status) == (failed.task_id, TaskStatus.FAILED)
        assert lost.code == "InvalidFile.Content"
        assert r.poller.statistics().open_tasks == 0

    async def test_a_refused_query_fails_the_waiter(self, files: FileServer) -> None:
        async with rig(files, PollPolicy(target_delay=1.0)) as (r, _):
            [task_id] = await r.submit(1)
            revoked = Client("sk-revoked", base_url=r.sim.base_url, retry=RetryPolicy(attempts=1))
            async with revoked:
                r.spy.client = revoked
                with anyio.fail_after(2), pytest.raises(emo_async.InvalidApiKeyError):
                    await r.poller.wait(task_id)
        assert len(r.spy.queries) == 1  # not asked again: another query will not help


class TestSweep:
    """With the task list on, one ``GET /tasks`` finds the finished tasks and only those are
    queried one by one."""

    async def test_only_finished_tasks_are_queried(self, files: FileServer) -> None:
        policy = PollPolicy(target_delay=1.0, use_list=True, fallback_interval=60.0)
        async with rig(files, policy) as (r, tg):
            early = await r.submit(3)
            r.sim.clock.advance(10)
            late = await r.submit(3)  # still running
            r.sim.ledger.reset()
            r.wait_all(tg, early + late)
            await r.run_until_done(early)
            assert r.sim.ledger.count("task_list") == 1
            assert sorted(r.queried_at_server()) == sorted(early)
            assert not any(t in r.results for t in late)
            r.sim.clock.advance(10)
            await r.run_until_done(late)
        assert r.sim.ledger.count("task_list") == 2
        assert sorted(r.queried_at_server()) == sorted(early + late)
        assert all(r.results[t][1].succeeded for t in early + late)
        assert r.poller.statistics().list_enabled


class TestTrouble:
    """A vanished task and failing queries neither stop the poller nor make it hammer."""

    async def test_a_vanished_task_ends_unknown_after_the_grace(self, files: FileServer) -> None:
        config = attrs.evolve(SIM, task_retention=5.0)
        async with rig(files, PollPolicy(target_delay=5.0, use_list=False), sim_config=config) as (
            r,
            tg,
        ):
            [task_id] = await r.submit(1)
            r.sim.clock.advance(16)  # finished at 10, forgotten at 15
            start = r.clock()
            r.wait_all(tg, [task_id])
            await r.run_until_done([task_id])
        at, task = r.results[task_id]
        # UNKNOWN right after a submit is a lagging replica: asked again, once per
        # target_delay, until 30 s have passed; then the task is gone.
        assert (task.task_id, task.status) == (task_id, TaskStatus.UNKNOWN)
        assert 30.0 <= at - start <= 35.0
        assert len(r.queried_at_server()) == 7

    @pytest.mark.parametrize(
        "faults",
        [
            FaultConfig(error_rate={"task_get": 1.0}),
            FaultConfig(reset_rate={"task_get": 1.0}),
        ],
        ids=["5xx", "reset"],
    )
    async def test_failing_queries_are_retried_each_round(
        self, files: FileServer, faults: FaultConfig
    ) -> None:
        async with rig(files, PollPolicy(target_delay=1.0, use_list=False)) as (r, tg):
            ids = await r.submit(2)
            r.sim.clock.advance(10)
            r.sim.set_faults(faults)
            r.sim.ledger.reset()
            start = r.clock()
            r.wait_all(tg, ids)
            await r.clock.run_to(start + 4.5, lambda: r.spy.idle)
            assert r.results == {}
            # A round per target_delay (0, 1, 2, 3, 4 s), each task asked once per round.
            for task_id in ids:
                looks = [t - start for t, tid in r.spy.queries if tid == task_id]
                assert looks == pytest.approx([0.0, 1.0, 2.0, 3.0, 4.0])
            assert len(r.queried_at_server()) >= 10  # they did reach the simulator
            r.sim.set_faults(FaultConfig())
            await r.run_until_done(ids)
        assert all(r.results[t][1].succeeded for t in ids)
        assert r.results[ids[0]][0] - start <= 6.0
