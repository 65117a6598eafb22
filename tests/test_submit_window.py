"""Billed POSTs in flight adapt to the network's latency (issue 17): on a fast network one at a
time (the fewest open intents if the process dies), on a slow one enough that the latency does
not set the pace. Measured at the simulator, through its latency knob on every request."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_batch import check_done, client_for, sim_config

from emo_async import Limits
from emo_async._batch._submitter import default_submit_concurrency, window_for
from emo_async._samples import make_sample_set
from emo_async.simulator import FaultConfig, Simulator

pytestmark = pytest.mark.anyio


class TestWindow:
    def test_the_window_is_the_bandwidth_delay_product_with_margin(self) -> None:
        assert window_for(10, 0.0, 10) == 1
        assert window_for(10, 0.005, 10) == 1
        assert window_for(10, 0.15, 10) == 3  # ceil(10 x 0.15 x 1.5)
        assert window_for(10, 5.0, 10) == 10  # capped
        assert window_for(2, 0.15, default_submit_concurrency(2)) == 1


def submit_rate_seen(sim: Simulator) -> float:
    times = sorted(r.t for r in sim.ledger.requests if r.endpoint == "submit")
    return (len(times) - 1) / (times[-1] - times[0])


class TestAdaptiveSubmits:
    async def test_latency_does_not_set_the_pace(self, tmp_path: Path) -> None:
        # 150 ms before every answer: one POST at a time could not exceed 6.7/s.
        jobs = make_sample_set(tmp_path / "in", 40, portraits=1, seconds=(0.5, 1.0))
        config = sim_config(faults=FaultConfig(latency=0.15))
        async with Simulator(config) as sim:
            limits = Limits(task_qps=40, submit_qps=10, detect_qps=40, policy_qps=100)
            async with client_for(sim, limits=limits) as client:
                outcomes = await client.run_batch_all(jobs, tmp_path / "out", max_tasks=40)
            check_done(sim, outcomes)
            assert sim.ledger.duplicate_tasks() == {}
            assert sim.ledger.throttled() == 0
            rate = submit_rate_seen(sim)
        assert 8.5 <= rate <= 10.5, rate

    async def test_one_at_a_time_when_the_pace_allows(self, tmp_path: Path) -> None:
        # With a fixed window of 1 the same batch is latency-bound: the adaptive default is
        # what makes the difference above.
        jobs = make_sample_set(tmp_path / "in", 20, portraits=1, seconds=(0.5, 1.0))
        config = sim_config(faults=FaultConfig(latency=0.15))
        async with Simulator(config) as sim:
            limits = Limits(task_qps=40, submit_qps=10, detect_qps=40, policy_qps=100)
            async with client_for(sim, limits=limits) as client:
                outcomes = await client.run_batch_all(
                    jobs, tmp_path / "out", max_tasks=40, submit_concurrency=1
                )
            check_done(sim, outcomes)
            rate = submit_rate_seen(sim)
        assert rate < 7.0, rate
