"""One account shared by several clients through PostgreSQL: one rate budget, one poller.

Each "process" here is a client (or a limiter) with a pool of its own, on a real PostgreSQL
server, against the simulator on 127.0.0.1; rates are measured where they matter: at the
simulator's ledger, or at the instants permits were handed out.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest

from emo_async import Client, Limits, PollPolicy
from emo_async._pg import migrate, open_pool
from emo_async._pg._account import SharedAccount
from emo_async._pg._limits import SharedRateLimiter
from emo_async._samples import make_portrait, make_voice_wav
from emo_async.simulator import Simulator, SimulatorConfig

pytestmark = pytest.mark.anyio


def most_in_window(times: list[float], window: float = 1.0) -> int:
    times = sorted(times)
    return max((bisect.bisect_left(times, t + window) - i for i, t in enumerate(times)), default=0)


async def limiter_in_own_pool(dsn: str, rate: float, stack: Any) -> SharedRateLimiter:
    pool = await open_pool(dsn)
    stack.push_async_callback(pool.close)
    await migrate(pool)
    lim = SharedRateLimiter(pool, "acct", "task", rate)
    await lim.setup()
    return lim


@pytest.fixture
async def two_limiters(pg_dsn: str) -> AsyncIterator[tuple[SharedRateLimiter, SharedRateLimiter]]:
    from contextlib import AsyncExitStack

    async with AsyncExitStack() as stack:
        a = await limiter_in_own_pool(pg_dsn, 10.0, stack)
        b = await limiter_in_own_pool(pg_dsn, 10.0, stack)
        yield a, b


class TestSharedLimits:
    async def test_two_pools_never_exceed_the_rate_together(
        self, two_limiters: tuple[SharedRateLimiter, SharedRateLimiter]
    ) -> None:
        grants: dict[str, list[float]] = {"a": [], "b": []}

        async def caller(lim: SharedRateLimiter, who: str) -> None:
            while True:
                await lim.acquire()
                grants[who].append(time.monotonic())

        with anyio.move_on_after(3.0):
            async with anyio.create_task_group() as tg:
                for lim, who in zip(two_limiters, "ab", strict=True):
                    for _ in range(4):
                        tg.start_soon(caller, lim, who)
        both = grants["a"] + grants["b"]
        # Alone, each would take 10 a second; together they share 10 (spaced 5 % wider).
        assert most_in_window(both) <= 10
        assert len(both) >= 25  # and they do use the budget: ~3 s at 10/s
        assert min(len(grants["a"]), len(grants["b"])) >= 8  # both get served

    async def test_a_429_seen_by_one_slows_the_other(
        self, two_limiters: tuple[SharedRateLimiter, SharedRateLimiter]
    ) -> None:
        a, b = two_limiters
        a.on_throttle()
        await a._send()
        await b.refresh()
        assert b.rate == pytest.approx(5.0)
        times = []
        for _ in range(6):
            await b.acquire()
            times.append(time.monotonic())
        # Spaced for 5/s (0.21 s), not 10/s.
        assert (times[-1] - times[0]) / 5 >= 0.2
        # Successes bring it back up, for everyone (the calm period after a 429 passed).
        await anyio.sleep(0.3)
        for _ in range(12):
            b.on_success()
            await b._send()
        await a.refresh()
        assert a.rate > 9.0

    async def test_a_retry_after_seen_by_one_pauses_the_other(
        self, two_limiters: tuple[SharedRateLimiter, SharedRateLimiter]
    ) -> None:
        a, b = two_limiters
        await b.acquire()
        a.on_throttle(retry_after=1.0)
        await a._send()
        t0 = time.monotonic()
        await b.acquire()
        assert time.monotonic() - t0 >= 0.9


# -- clients ---------------------------------------------------------------------------------

POLL = PollPolicy(target_delay=0.2, use_list=False)


def inputs(tmp_path: Path, n: int) -> tuple[Path, list[Path]]:
    image = make_portrait(tmp_path / "me.jpg", size=(600, 800))
    audios = [make_voice_wav(tmp_path / f"a{i}.wav", 1.0 + 0.01 * i) for i in range(n)]
    return image, audios


def client(sim: Simulator, shared: SharedAccount | str, **kw: Any) -> Client:
    return Client(
        sim.api_key,
        base_url=sim.base_url,
        poll=POLL,
        limits=kw.pop("limits", Limits(task_qps=10, detect_qps=4, submit_qps=4)),
        shared_account=shared,
        **kw,
    )


async def leader_of(dsn: str) -> str | None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT owner FROM emo_account_leader WHERE lease_until > clock_timestamp()"
        )
        row = await cur.fetchone()
    return None if row is None else str(row[0])


async def until(check: Any, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not await check():
            await anyio.sleep(0.05)


class TestOnePoller:
    async def test_closing_the_leader_hands_its_tasks_over(
        self, pg_dsn: str, tmp_path: Path
    ) -> None:
        image, audios = inputs(tmp_path, 4)
        shared = SharedAccount(pg_dsn, lease_seconds=1.5)
        config = SimulatorConfig(
            time_scale=0.01, processing_base=200, processing_per_audio_second=0.0,
            processing_jitter=0.0, policy_ttl=1e7,
        )  # fmt: skip
        async with Simulator(config) as sim, anyio.create_task_group() as outer:
            leader = client(sim, shared)
            stop_leader = anyio.Event()

            async def leader_process() -> None:
                async with leader:
                    await stop_leader.wait()

            outer.start_soon(leader_process)
            await until(lambda: _true(leader._account is not None and leader._account.terms == 1))
            async with client(sim, shared) as follower:
                assert follower._account is not None
                outcomes: list[Any] = []

                async def one(i: int) -> None:
                    outcomes.append(
                        await follower.generate(image, audios[i], tmp_path / f"o{i}.mp4")
                    )

                async with anyio.create_task_group() as tg:
                    for i in range(4):
                        tg.start_soon(one, i)
                    # Tasks submitted (2 s each): the leader goes away while they run.
                    await until(lambda: _true(len(sim.tasks) == 4))
                    assert follower._account.terms == 0
                    assert follower.statistics().poller.task_queries == 0
                    stop_leader.set()
                    # Released on close: the follower need not wait for the lease to run out.
                    await until(lambda: _true(follower._account.terms == 1), timeout=1.0)
                assert [o.ok for o in outcomes] == [True] * 4
                assert await leader_of(pg_dsn) == follower._account.owner
                # The follower polled the tasks itself once it took over.
                assert follower.statistics().poller.task_queries >= 4

    async def test_a_dead_leaders_lease_runs_out_then_another_polls(
        self, pg_dsn: str, tmp_path: Path
    ) -> None:
        image, audios = inputs(tmp_path, 2)
        shared = SharedAccount(pg_dsn, lease_seconds=1.0)
        config = SimulatorConfig(time_scale=0.002, policy_ttl=1e7)
        async with Simulator(config) as sim, client(sim, shared) as c:
            assert c._account is not None
            # A process that held the lease and died (no release): 2 s left on its lease.
            async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
                await conn.execute(
                    "UPDATE emo_account_leader SET owner = 'dead:1',"
                    " lease_until = clock_timestamp() + interval '2 seconds'"
                )
            c._account.lease.term = None
            await anyio.sleep(0.5)  # our heartbeat notices it lost the lease
            t0 = time.monotonic()
            got = await c.generate(image, audios[0], tmp_path / "o.mp4")
            waited = time.monotonic() - t0
            assert got.ok
            assert waited >= 1.0  # nobody polled until the dead lease expired
            assert await leader_of(pg_dsn) == c._account.owner


async def _true(value: bool) -> bool:
    return value


class TestSharedClients:
    async def test_clients_generating_at_once_stay_within_the_account_rate(
        self, pg_dsn: str, tmp_path: Path
    ) -> None:
        n_clients, per_client, rate = 3, 6, 4.0
        image, audios = inputs(tmp_path, n_clients * per_client)
        config = SimulatorConfig(
            time_scale=0.02, processing_base=100, processing_per_audio_second=0.0,
            task_qps=rate, list_qps=rate, policy_ttl=1e7,
        )  # fmt: skip
        limits = Limits(task_qps=rate, list_qps=rate, detect_qps=4, submit_qps=4)
        outcomes: list[Any] = []
        async with Simulator(config) as sim:

            async def process(k: int) -> None:
                async with client(sim, pg_dsn, limits=limits) as c:

                    async def one(i: int) -> None:
                        j = k * per_client + i
                        outcomes.append(await c.generate(image, audios[j], tmp_path / f"o{j}.mp4"))

                    async with anyio.create_task_group() as tg:
                        for i in range(per_client):
                            tg.start_soon(one, i)

            with anyio.fail_after(90):
                async with anyio.create_task_group() as tg:
                    for k in range(n_clients):
                        tg.start_soon(process, k)
            queries = [r for r in sim.ledger.requests if r.endpoint in ("task_get", "task_list")]
            statuses = [r.status for r in sim.ledger.requests]
        assert len(outcomes) == n_clients * per_client
        assert all(o.ok for o in outcomes)
        assert 429 not in statuses
        assert len(queries) >= n_clients * per_client
        assert most_in_window([r.t for r in queries]) <= rate
