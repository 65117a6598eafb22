"""The single-flight cache: one computation per key for concurrent callers, failures not kept."""

from __future__ import annotations

import anyio
import pytest

from emo_async._singleflight import SingleFlight

pytestmark = pytest.mark.anyio


async def test_concurrent_callers_share_one_computation() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    calls = 0
    results: list[int] = []

    async def compute() -> int:
        nonlocal calls
        calls += 1
        await anyio.sleep(0.05)
        return 42

    async def caller() -> None:
        results.append(await flight.get_or_compute("k", compute))

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(caller)
    assert calls == 1
    assert results == [42] * 20
    assert await flight.get_or_compute("k", compute) == 42
    assert calls == 1


async def test_a_failure_is_not_cached_and_a_waiter_computes_afresh() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    attempts: list[str] = []

    async def compute() -> str:
        attempts.append("try")
        await anyio.sleep(0.05)
        if len(attempts) == 1:
            raise RuntimeError("first one fails")
        return "ok"

    outcomes: list[object] = []

    async def caller() -> None:
        try:
            outcomes.append(await flight.get_or_compute("k", compute))
        except RuntimeError as exc:
            outcomes.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(caller)
            await anyio.sleep(0.01)  # the first caller is the one that computes
    assert len(attempts) == 2
    assert isinstance(outcomes[0], RuntimeError)
    assert outcomes[1:] == ["ok", "ok"]


async def test_a_cancelled_computation_leaves_the_key_free() -> None:
    flight: SingleFlight[str, str] = SingleFlight()

    async def slow() -> str:
        await anyio.sleep(10)
        return "never"

    with anyio.move_on_after(0.05):
        await flight.get_or_compute("k", slow)

    async def fast() -> str:
        return "fast"

    with anyio.fail_after(1):
        assert await flight.get_or_compute("k", fast) == "fast"


async def test_stale_values_are_computed_again_and_seeds_are_served() -> None:
    flight: SingleFlight[str, int] = SingleFlight(fresh=lambda v: v > 0)
    flight.put("seeded", 7)
    flight.put("stale", -1)

    async def compute() -> int:
        return 5

    assert flight.get("seeded") == 7
    assert flight.get("stale") is None
    assert await flight.get_or_compute("seeded", compute) == 7
    assert await flight.get_or_compute("stale", compute) == 5
