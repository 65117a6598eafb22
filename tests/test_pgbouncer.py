"""Everything PostgreSQL-backed works behind PgBouncer in transaction mode: each transaction
may run on a different server connection, so no session state (prepared statements, SET,
session advisory locks, LISTEN) may be relied on. A real PgBouncer in front of a real server.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from test_batch import check_done, client_for, sim_config
from test_shared_batch import BATCH, by_job, videos

import emo_async
from emo_async import Limits
from emo_async._owned import account_registry
from emo_async._pg.testing import PostgresNotInstalled, TempPgBouncer, TempPostgres
from emo_async._samples import make_sample_set
from emo_async.simulator import Simulator

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def separate(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each worker stands for a process of its own (see test_shared_batch).
    monkeypatch.setattr(account_registry, "acquire", lambda base, key, mine: mine)
    monkeypatch.setattr(account_registry, "release", lambda base, key: None)


@pytest.fixture
def bouncer(pg_server: TempPostgres) -> Iterator[TempPgBouncer]:
    try:
        b = TempPgBouncer(pg_server)
    except PostgresNotInstalled:
        if os.environ.get("EMO_ASYNC_REQUIRE_POSTGRES") == "1":
            raise
        pytest.skip("pgbouncer is not installed")
    try:
        yield b
    finally:
        b.stop()


async def test_workers_and_shared_account_behind_pgbouncer(
    tmp_path: Path, pg_server: TempPostgres, bouncer: TempPgBouncer
) -> None:
    name = f"b_{os.getpid()}_{id(tmp_path) % 100000}"
    pg_server.create_database(name)
    dsn = bouncer.dsn(name)
    jobs = make_sample_set(tmp_path / "in", 30, portraits=2, seconds=(0.5, 1.5))
    outs = [tmp_path / f"out{i}" for i in range(2)]
    results: list[list[emo_async.Outcome]] = [[], []]
    async with Simulator(sim_config(task_qps=10.0, list_qps=10.0)) as sim:
        limits = Limits(task_qps=10, submit_qps=200, detect_qps=40, policy_qps=100)

        async def one(i: int) -> None:
            # Migrations, claims, the quota's lock, the shared limiters and the poller's
            # lease all go through the bouncer.
            async with client_for(sim, limits=limits, shared_account=dsn) as client:
                results[i] = await client.run_batch_all(
                    jobs, outs[i], journal=dsn, batch=BATCH, max_tasks=6, lease=2.0
                )

        async with anyio.create_task_group() as tg:
            for i in range(2):
                tg.start_soon(one, i)
        outcomes = [o for r in results for o in r]
        check_done(sim, outcomes)
        assert by_job(outcomes) == Counter(j.display_name for j in jobs)
        assert sim.ledger.duplicate_tasks() == {}
        assert sim.ledger.max_running_observed <= 6
        assert sim.ledger.throttled() == 0
        times = sorted(r.t for r in sim.ledger.requests if r.endpoint in ("task_get", "task_list"))
        busiest = max(
            (sum(1 for u in times[i:] if u < t + 1.0) for i, t in enumerate(times)), default=0
        )
        assert busiest <= 10 + 1, busiest  # the account's task queries, GETs and pages together
        assert videos(outs) == Counter(j.display_name for j in jobs)
