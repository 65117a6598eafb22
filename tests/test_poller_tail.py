"""The poller's tail: spare query budget spent on the tasks most likely finished, within a
credit per watched task, against the simulator over loopback HTTP on a fake clock (see
test_poller for the rig)."""

from __future__ import annotations

import pytest
from _media_fixtures import FileServer
from test_poller import rig

from emo_async import PollPolicy, TaskStatus

pytestmark = pytest.mark.anyio

#: Every simulated task takes exactly 10 s (test_poller's SIM).
TASK_SECONDS = 10.0


def _taught(poller_model: object, n: int = 8) -> None:
    """The model has seen tasks take 10 s (as the simulator's do)."""
    for _ in range(n):
        poller_model.observe(None, TASK_SECONDS)  # type: ignore[attr-defined]


def _policy(**kw: object) -> PollPolicy:
    base: dict[str, object] = {
        "target_delay": 5.0,
        "tail_delay": 1.0,
        "prior_base": 10.0,
        "prior_per_audio_second": 0.0,
        "fallback_interval": 60.0,
    }
    base.update(kw)
    return PollPolicy(**base)  # type: ignore[arg-type]


async def _notice_times(
    files: FileServer, policy: PollPolicy, query_rate: float | None, n: int
) -> tuple[list[float], float]:
    """Seconds from the tasks' end to the poller noticing it, and the tail credit spent."""
    async with rig(files, policy, query_rate=query_rate) as (r, tg):
        _taught(r.poller.model)
        ids = await r.submit(n)
        start = r.clock()
        r.wait_all(tg, ids)
        # The tasks end 9.5 s in (the simulator's clock is moved, not the poller's), just
        # after the poller's regular round at 9 s (0.9 x 10 s) saw them running.
        await r.clock.run_to(start + 9.5, lambda: r.spy.idle)
        assert r.results == {}
        r.sim.clock.advance(TASK_SECONDS)
        await r.run_until_done(ids)
        for task_id in ids:
            assert r.results[task_id][1].status == TaskStatus.SUCCEEDED
        return [r.results[i][0] - (start + 9.5) for i in ids], r.poller.tail_spent


class TestTail:
    @pytest.mark.parametrize("use_list", [True, False])
    async def test_the_last_tasks_are_noticed_within_the_tail_delay(
        self, files: FileServer, use_list: bool
    ) -> None:
        # Credit for a look at each (a batch of hundreds saves up plenty; three tasks do not).
        policy = _policy(use_list=use_list, tail_queries_per_task=1.0)
        fast, spent = await _notice_times(files, policy, query_rate=15.0, n=3)
        # Without the tail (as before): the next regular round, 5 s after the one at 9 s.
        slow, _ = await _notice_times(files, policy, query_rate=None, n=3)
        assert max(fast) <= 1.0
        assert min(slow) >= 4.0
        assert spent <= 2.0 + 3 * policy.tail_queries_per_task

    async def test_the_tail_is_off_when_the_regular_rounds_are_as_fast(
        self, files: FileServer
    ) -> None:
        policy = _policy(target_delay=1.0, tail_delay=1.0)
        delays, spent = await _notice_times(files, policy, query_rate=15.0, n=3)
        assert spent == 0.0
        assert max(delays) <= 1.0


class TestFrugal:
    @pytest.mark.parametrize("use_list", [True, False])
    async def test_extra_looks_never_cost_more_than_the_credit(
        self, files: FileServer, use_list: bool
    ) -> None:
        """Tasks that run far past their usual duration: the tail looks at them while its credit
        lasts, then only the regular rounds do."""
        policy = _policy(use_list=use_list, tail_queries_per_task=0.25)
        n = 8
        async with rig(files, policy, query_rate=15.0) as (r, tg):
            _taught(r.poller.model)
            ids = await r.submit(n)
            r.sim.clock.advance(1.0)  # running (queued tasks are not looked at by the tail)
            start = r.clock()
            r.wait_all(tg, ids)
            await r.clock.run_to(start + 120.0, lambda: r.spy.idle)
            assert r.results == {}  # never finished: the simulator's clock stood still
            gets = sum(1 for req in r.sim.ledger.requests if req.endpoint == "task_get")
            pages = sum(1 for req in r.sim.ledger.requests if req.endpoint == "task_list")
            spent = r.poller.tail_spent
            r.sim.clock.advance(TASK_SECONDS)
            await r.run_until_done(ids)
        assert r.poller.tail_rounds >= 1
        credit = 2.0 + n * policy.tail_queries_per_task
        assert 1.0 <= spent <= credit
        # The regular rounds: 9 s, then every 5 s up to 120 s (23 rounds), one page each (or
        # one query per task); the tail added at most its credit.
        regular = 23 * (1 if use_list else n)
        assert gets + pages <= regular + credit + (n if use_list else 0)
