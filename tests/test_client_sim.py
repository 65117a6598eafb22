"""Client calls against the simulator: the rate limit seen by the server with many callers, and
a large upload that keeps the client's memory flat (simulator in its own process)."""

from __future__ import annotations

import os
import sys
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from emo_async import Client, Limits, RetryPolicy
from emo_async.simulator import Simulator, SimulatorConfig

pytestmark = pytest.mark.anyio


class TestRateAtTheServer:
    """The configured query rate holds at the simulator with 200 concurrent callers."""

    async def test_200_concurrent_callers(self) -> None:
        qps = 40.0
        async with Simulator(SimulatorConfig(task_qps=qps * 2)) as sim:
            client = Client(sim.api_key, base_url=sim.base_url, limits=Limits(task_qps=qps))
            async with client, anyio.create_task_group() as tg:
                for i in range(200):
                    tg.start_soon(client.get_task, f"task-{i}")
            assert sim.ledger.count("task_get") == 200
            assert sim.ledger.max_in_window("task_get", 1.0) <= qps
            assert sim.ledger.throttled() == 0

    async def test_server_throttling_is_ridden_out(self) -> None:
        # The client is configured above the account limit; 429s slow it down, nobody fails.
        async with Simulator(SimulatorConfig(task_qps=20)) as sim:
            client = Client(
                sim.api_key,
                base_url=sim.base_url,
                limits=Limits(task_qps=100),
                retry=RetryPolicy(attempts=20, wait_initial=0.05, wait_max=1.0, budget_tokens=None),
            )
            async with client:
                async with anyio.create_task_group() as tg:
                    for i in range(80):
                        tg.start_soon(client.get_task, f"task-{i}")
                stats = client.statistics()
            assert sim.ledger.count("task_get", status=200) == 80
            assert stats.throttled > 0
            assert stats.limiters["task"].rate < 100

    @pytest.mark.parametrize("shared", [True, False])
    async def test_list_pages_share_the_task_budget_unless_told_apart(self, shared: bool) -> None:
        limits = Limits(task_qps=50, list_qps=50, list_shares_task_qps=shared)
        async with Simulator(SimulatorConfig()) as sim:
            async with Client(sim.api_key, base_url=sim.base_url, limits=limits) as client:
                for _ in range(3):
                    await client.list_page()
                await client.get_task("task-1")
                stats = client.statistics()
            assert sim.ledger.count("task_list") == 3
            assert stats.limiters["list"].acquired == 3
            assert stats.limiters["task"].acquired == (4 if shared else 1)


@pytest.fixture
async def sim_process() -> AsyncIterator[tuple[str, str]]:
    """The simulator in its own process: (base_url, api_key)."""
    command = [sys.executable, "-m", "emo_async.simulator", "--port", "0"]
    env = {**os.environ, "EMO_SIM_API_KEY": "sk-m"}
    async with await anyio.open_process(command, env=env) as process:
        assert process.stdout is not None
        line = b""
        with anyio.fail_after(30):
            while not line.endswith(b"\n"):
                line += await process.stdout.receive(1)
        fields = dict(part.split("=", 1) for part in line.decode().split()[1:])
        try:
            yield fields["base_url"], "sk-m"
        finally:
            process.terminate()
            with anyio.fail_after(30):
                await process.wait()


class TestUploadMemory:
    """Uploads stream from disk: a 14 MB file does not sit in the client's memory."""

    async def test_14mb_upload_keeps_memory_flat(
        self, tmp_path: Path, sim_process: tuple[str, str]
    ) -> None:
        base_url, key = sim_process
        big = tmp_path / "long.wav"
        with big.open("wb") as f:
            f.write(b"RIFF" + (14 * 1024 * 1024).to_bytes(4, "little") + b"WAVE")
            chunk = bytes(range(256)) * 4096
            for _ in range(14):
                f.write(chunk)
        async with Client(key, base_url=base_url) as client:
            warm = tmp_path / "warm.wav"
            warm.write_bytes(b"RIFF\x04\x00\x00\x00WAVE")
            await client.upload(warm)  # policy and connection set up outside the measurement
            tracemalloc.start()
            try:
                url = await client.upload(big)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
        assert url.startswith("oss://")
        assert peak < 4 * 1024 * 1024, peak


class TestLifecycle:
    """aclose() after a manual __aenter__, like httpx; help() shows the Client's own docs."""

    async def test_aclose_closes_a_manually_entered_client(self, sim: Simulator) -> None:
        import emo_async

        client = Client(sim.api_key, base_url=sim.base_url)
        assert await client.__aenter__() is client
        assert [t async for t in client.list_tasks(max_pages=1)] == []
        http = client._http
        assert http is not None
        await client.aclose()
        assert "state=closed" in repr(client)
        assert http._session.closed
        with pytest.raises(emo_async.ClientClosedError):
            await client.get_task("t1")
        await client.aclose()  # twice: nothing happens
        with pytest.raises(emo_async.ClientClosedError):
            async with client:
                pass
        assert sim.ledger.count() == 1

    async def test_a_cancelled_block_still_closes_every_session(self, sim: Simulator) -> None:
        with anyio.CancelScope() as scope:
            async with Client(sim.api_key, base_url=sim.base_url) as client:
                http = client._http
                assert http is not None
                scope.cancel()
                await anyio.sleep(1)  # cancelled here: the block is left under cancellation
        assert scope.cancelled_caught
        sessions = [http._session, http._billed_session, http._external_session]
        assert all(s is not None and s.closed for s in sessions)

    async def test_aclose_of_a_never_opened_client_marks_it_closed(self, sim: Simulator) -> None:
        import emo_async

        client = Client(sim.api_key, base_url=sim.base_url)
        await client.aclose()
        assert "state=closed" in repr(client)
        with pytest.raises(emo_async.ClientClosedError, match="entered once"):
            await client.__aenter__()
        assert sim.ledger.count() == 0

    def test_help_shows_the_clients_own_docs(self) -> None:
        import pydoc

        import emo_async

        assert (emo_async.Client.__doc__ or "").startswith("An asyncio client for DashScope")
        text = pydoc.plain(pydoc.render_doc(emo_async.Client))
        head = "\n".join(text.splitlines()[:12])
        assert "An asyncio client for DashScope's EMO models." in head
        assert "aclose" in text
        # anyio's placeholder for the abstract method is not what a user should read.
        assert "Implement your async context manager logic here" not in text
        assert "Open the client" in text


class TestTracing:
    """``trace_configs=`` sees every API request (billed ones included), and nothing else."""

    async def test_a_trace_config_sees_the_api_requests(self, tmp_path: Path) -> None:
        from types import SimpleNamespace

        import aiohttp

        from emo_async import PollPolicy
        from emo_async._samples import make_portrait, make_voice_wav

        seen: list[tuple[str, str, int]] = []

        async def on_end(
            session: aiohttp.ClientSession,
            ctx: SimpleNamespace,
            params: aiohttp.TraceRequestEndParams,
        ) -> None:
            seen.append((params.method, params.url.path, params.response.status))

        trace = aiohttp.TraceConfig()
        trace.on_request_end.append(on_end)
        image = make_portrait(tmp_path / "me.jpg", size=(600, 800))
        audio = make_voice_wav(tmp_path / "hi.wav", 2.0)
        config = SimulatorConfig(time_scale=0.002, policy_ttl=1e7, task_qps=50.0)
        async with Simulator(config) as sim:
            client = Client(
                sim.api_key,
                base_url=sim.base_url,
                trace_configs=[trace],
                poll=PollPolicy(target_delay=0.05, use_list=False),
                limits=Limits(task_qps=40, detect_qps=40),
            )
            async with client:
                outcome = await client.generate(image, audio, tmp_path / "out.mp4")
            assert outcome.ok
            api = [r for r in sim.ledger.requests if r.role == "api"]
            assert len(api) >= 4
            assert len(sim.ledger.requests) > len(api)  # uploads and the download happened
        # Exactly the API requests (uploads run concurrently: order aside), the billed submit
        # among them.
        assert sorted((m, p) for m, p, _ in seen) == sorted((r.method, r.path) for r in api)
        assert ("POST", "/api/v1/services/aigc/image2video/video-synthesis/") in {
            (m, p) for m, p, _ in seen
        }
