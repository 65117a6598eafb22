"""A task status nobody documented (``succeeded``, ``WARMING``), through a real socket.

The simulator never answers such a status, so its task answers pass through a small rewriting
proxy on 127.0.0.1: ``GET /tasks/{id}`` is forwarded to the simulator and the proxy replaces
``task_status`` for the tasks the test names. The poller runs on a fake clock (an hour of
polling takes milliseconds); every query is a real HTTP request through the proxy.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import anyio
import attrs
import pytest
from _fake_clock import FakeClock
from _media_fixtures import FileServer, portrait, wav
from aiohttp import web

from emo_async import (
    Client,
    JobFailedError,
    Limits,
    PollPolicy,
    RetryPolicy,
    Task,
    TaskListItem,
    TaskStatus,
    UnknownTaskStatusError,
)
from emo_async._poller import StatusPoller
from emo_async.simulator import Simulator, SimulatorConfig

pytestmark = pytest.mark.anyio

FACE, EXT = [298, 250, 502, 485], [165, 132, 635, 602]
SIM = SimulatorConfig(
    processing_base=10.0,
    processing_per_audio_second=0.0,
    processing_jitter=0.0,
    task_qps=None,
    list_qps=None,
    submit_qps=None,
)


@attrs.define(eq=False)
class RewritingProxy:
    """Forwards task queries to the simulator; ``status[task_id]`` replaces the answer's."""

    upstream: str
    session: aiohttp.ClientSession
    status: dict[str, str] = attrs.field(factory=dict)
    seen: list[tuple[str, str]] = attrs.field(factory=list)
    in_flight: int = 0

    def idle(self) -> bool:
        return self.in_flight == 0

    async def handle(self, request: web.Request) -> web.Response:
        url = self.upstream + request.rel_url.path_qs
        headers = {"Authorization": request.headers.get("Authorization", "")}
        async with self.session.get(url, headers=headers) as resp:
            body: dict[str, Any] = await resp.json()
            code = resp.status
        task_id = request.match_info["task_id"]
        output = body.get("output") or {}
        if task_id in self.status:
            output["task_status"] = self.status[task_id]
        self.seen.append((task_id, str(output.get("task_status"))))
        return web.json_response(body, status=code)


@asynccontextmanager
async def proxied(
    files: FileServer, policy: PollPolicy
) -> AsyncIterator[tuple[Simulator, RewritingProxy, StatusPoller, FakeClock, list[str]]]:
    image = files.add("face.png", portrait())
    audio = files.add("voice.wav", wav(1.0))
    async with Simulator(SIM) as sim, aiohttp.ClientSession() as session:
        origin = sim.base_url.removesuffix("/api/v1")
        proxy = RewritingProxy(origin, session)
        app = web.Application()
        app.router.add_get("/api/v1/tasks/{task_id}", proxy.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        direct = Client(sim.api_key, base_url=sim.base_url, limits=Limits(submit_qps=1000))
        via = Client(
            sim.api_key,
            base_url=f"http://127.0.0.1:{port}/api/v1",
            retry=RetryPolicy(attempts=1),
        )
        clock = FakeClock()

        async def no_list(max_pages: int) -> AsyncIterator[TaskListItem]:
            for _ in ():
                yield _

        async def fetch(task_id: str) -> Task:
            proxy.in_flight += 1
            try:
                return await via.get_task(task_id)
            finally:
                proxy.in_flight -= 1

        poller = StatusPoller(
            policy, fetch, no_list, clock=clock, move_on_after=clock.move_on_after
        )
        try:
            async with direct, via, anyio.create_task_group() as tg:
                task = await direct.submit(image, audio, face_bbox=FACE, ext_bbox=EXT)
                await tg.start(poller.run)
                yield sim, proxy, poller, clock, [task.task_id]
                tg.cancel_scope.cancel()
        finally:
            await runner.cleanup()


class TestUndocumentedStatus:
    """Not a finish: logged once, polled on until its deadline, then a specific error."""

    async def test_warming_forever_ends_in_a_specific_error_at_the_deadline(
        self, files: FileServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        policy = PollPolicy(target_delay=5.0, use_list=False, unknown_status_timeout=600.0)
        caught: list[BaseException] = []
        async with proxied(files, policy) as (sim, proxy, poller, clock, (task_id,)):
            proxy.status[task_id] = "WARMING"
            sim.clock.advance(20)  # finished at the simulator: only the answer says otherwise

            async def waiter() -> None:
                try:
                    await poller.wait(task_id)
                except Exception as exc:
                    caught.append(exc)

            with caplog.at_level(logging.WARNING, logger="emo_async.poller"):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(waiter)
                    start = clock()
                    # Just before the deadline the waiter still waits: WARMING is not a finish.
                    await clock.run_to(start + 590.0, proxy.idle)
                    assert caught == []
                    await clock.run_to(start + 620.0, proxy.idle)
                    tg.cancel_scope.cancel()
        [exc] = caught
        assert isinstance(exc, UnknownTaskStatusError)
        assert isinstance(exc, JobFailedError)  # callers that catch failures still catch it
        assert exc.task.status == "WARMING"
        assert exc.waited >= 600.0
        assert "WARMING" in str(exc)
        assert task_id in str(exc)
        # Polled on all along (about every target_delay), through the socket.
        looks = [s for tid, s in proxy.seen if tid == task_id]
        assert len(looks) >= 100
        assert set(looks) == {"WARMING"}
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert task_id in warnings[0].getMessage()
        assert "WARMING" in warnings[0].getMessage()

    async def test_lower_case_succeeded_is_not_a_finish_until_the_real_one(
        self, files: FileServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        policy = PollPolicy(target_delay=5.0, use_list=False, unknown_status_timeout=600.0)
        results: list[Task] = []
        async with proxied(files, policy) as (sim, proxy, poller, clock, (task_id,)):
            proxy.status[task_id] = "succeeded"
            sim.clock.advance(20)

            async def waiter() -> None:
                results.append(await poller.wait(task_id))

            with caplog.at_level(logging.WARNING, logger="emo_async.poller"):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(waiter)
                    start = clock()
                    await clock.run_to(start + 60.0, proxy.idle)
                    assert results == []  # not mistaken for SUCCEEDED (nor for a failure)
                    del proxy.status[task_id]  # the service speaks its documented status again
                    await clock.run_to(start + 70.0, proxy.idle)
                    tg.cancel_scope.cancel()
        [task] = results
        assert task.status == TaskStatus.SUCCEEDED
        assert task.video_url
        statuses = [s for tid, s in proxy.seen if tid == task_id]
        assert statuses.count("succeeded") >= 10
        assert statuses[-1] == "SUCCEEDED"
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert task_id in warnings[0]
        assert "'succeeded'" in warnings[0]

    def test_the_deadline_is_bounded_by_default(self) -> None:
        assert 0 < PollPolicy().unknown_status_timeout <= 24 * 3600
