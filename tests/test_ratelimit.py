"""The adaptive limiter as callers see it: when ``acquire()`` hands out permits.

A fake clock (``clock=``/``sleep=``) stands in for time, so every permit's instant is exact
and a test of 200 callers at 20/s takes milliseconds, not ten seconds. One test keeps the real
clock, to show the defaults still wait for real.
"""

from __future__ import annotations

import bisect
import itertools
import time

import anyio
import pytest
from _fake_clock import FakeClock, settle

from emo_async._ratelimit import AdaptiveRateLimiter

pytestmark = pytest.mark.anyio

SLACK = 1.02  # the limiter spaces permits 2 % wider than 1/rate


def limiter(rate: float, clock: FakeClock, **kw: float) -> AdaptiveRateLimiter:
    return AdaptiveRateLimiter("t", rate, clock=clock, sleep=clock.sleep, **kw)


async def grants(lim: AdaptiveRateLimiter, clock: FakeClock, n: int) -> list[float]:
    """Instants of ``n`` permits taken one after another by one caller."""
    times: list[float] = []
    async with anyio.create_task_group() as tg:

        async def take() -> None:
            for _ in range(n):
                await lim.acquire()
                times.append(clock())

        tg.start_soon(take)
        await clock.run_until(lambda: len(times) == n)
    return times


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def most_in_window(times: list[float], window: float = 1.0) -> int:
    times = sorted(times)
    return max(bisect.bisect_left(times, t + window) - i for i, t in enumerate(times))


class TestSpacing:
    """Permits are evenly spaced at the rate, without a burst, however many callers ask."""

    async def test_one_caller_gets_evenly_spaced_permits(self) -> None:
        clock = FakeClock()
        times = await grants(limiter(10.0, clock), clock, 21)
        assert times[0] == 1000.0  # the first permit is free
        assert gaps(times) == pytest.approx([SLACK / 10.0] * 20)

    async def test_200_callers_never_exceed_the_rate_and_are_served_in_order(self) -> None:
        clock = FakeClock()
        lim = limiter(20.0, clock)
        arrivals: list[tuple[float, int]] = []

        async def caller(i: int) -> None:
            await lim.acquire()
            arrivals.append((clock(), i))

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(caller, i)
            await clock.run_until(lambda: len(arrivals) == 200)
        times = [t for t, _ in arrivals]
        assert most_in_window(times) <= 20
        assert min(gaps(times)) == pytest.approx(SLACK / 20.0)
        # The whole budget is used: 199 gaps of SLACK/20 s, not more.
        assert times[-1] - times[0] == pytest.approx(199 * SLACK / 20.0)
        assert [i for _, i in arrivals] == list(range(200))  # fair: first come, first served
        stats = lim.statistics()
        assert (stats.acquired, stats.waiting) == (200, 0)

    async def test_waiting_callers_are_counted(self) -> None:
        clock = FakeClock()
        lim = limiter(1.0, clock)
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(lim.acquire)
            await settle()
            # One permit went out at once; of the other four, one waits on the clock and three
            # on the lock.
            assert lim.statistics().waiting == 4
            assert lim.statistics().acquired == 1
            tg.cancel_scope.cancel()
        assert lim.statistics().waiting == 0

    async def test_the_real_clock_is_the_default(self) -> None:
        lim = AdaptiveRateLimiter("t", 50.0)
        start = time.monotonic()
        for _ in range(6):
            await lim.acquire()
        assert time.monotonic() - start >= 5 * SLACK / 50.0 * 0.95


class TestAdaptation:
    """A 429 halves the spacing rate, successes bring it back, Retry-After holds everyone."""

    async def test_a_429_halves_the_rate(self) -> None:
        clock = FakeClock()
        lim = limiter(10.0, clock)
        before = await grants(lim, clock, 5)
        lim.on_throttle()
        after = await grants(lim, clock, 6)
        assert gaps(before) == pytest.approx([SLACK / 10.0] * 4)
        # The next permit keeps the slot it already had; from there on, twice as far apart.
        assert after[0] - before[-1] == pytest.approx(SLACK / 10.0)
        assert gaps(after) == pytest.approx([SLACK / 5.0] * 5)
        assert lim.statistics().throttled == 1

    async def test_successes_bring_the_rate_back_towards_the_ceiling(self) -> None:
        clock = FakeClock()
        lim = limiter(10.0, clock)
        lim.on_throttle()
        clock.advance(0.5)  # out of the 429's burst
        cut = gaps(await grants(lim, clock, 3))
        for _ in range(20):
            clock.advance(0.01)
            lim.on_success()
        recovered = gaps(await grants(lim, clock, 4))
        assert cut == pytest.approx([SLACK / 5.0] * 2)
        assert all(SLACK / 10.0 <= g <= SLACK / 9.0 for g in recovered[1:]), recovered
        for _ in range(40):
            clock.advance(0.01)
            lim.on_success()
        assert gaps(await grants(lim, clock, 3))[1:] == pytest.approx([SLACK / 10.0])

    async def test_retry_after_pauses_every_caller(self) -> None:
        clock = FakeClock()
        lim = limiter(100.0, clock)
        await grants(lim, clock, 1)
        lim.on_throttle(retry_after=3.0)
        lim.pause(1.0)  # a shorter pause does not shorten the longer one
        served: list[float] = []

        async def caller() -> None:
            await lim.acquire()
            served.append(clock())

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(caller)
            await clock.run_until(lambda: len(served) == 10)
        assert min(served) == pytest.approx(1003.0)
        # After the pause, the halved rate: no burst of everything that queued up meanwhile.
        assert gaps(served) == pytest.approx([SLACK / 50.0] * 9)

    async def test_a_quiet_spell_restores_the_ceiling(self) -> None:
        clock = FakeClock()
        lim = limiter(10.0, clock, recover_seconds=5.0)
        lim.on_throttle()
        clock.advance(5.0)
        assert gaps(await grants(lim, clock, 3)) == pytest.approx([SLACK / 10.0] * 2)
