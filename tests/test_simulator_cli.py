"""``python -m emo_async.simulator`` in its own process."""

from __future__ import annotations

import signal
import sys

import aiohttp
import anyio
import pytest

pytestmark = pytest.mark.anyio


class TestSimulatorProcess:
    """The simulator runs as a process, announces itself and stops cleanly on a signal."""

    @pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
    async def test_announces_serves_and_stops(self, signum: signal.Signals) -> None:
        command = [sys.executable, "-m", "emo_async.simulator", "--port", "0", "--api-key", "sk-x"]
        async with await anyio.open_process(command) as process:
            assert process.stdout is not None
            line = b""
            with anyio.fail_after(30):
                while not line.endswith(b"\n"):
                    line += await process.stdout.receive(1)
            fields = dict(part.split("=", 1) for part in line.decode().split()[1:])
            assert line.startswith(b"EMO_SIMULATOR ")
            assert fields["api_key"] == "sk-x"
            assert fields["base_url"].startswith("http://127.0.0.1:")
            assert fields["base_url"].endswith("/api/v1")
            async with (
                aiohttp.ClientSession() as session,
                session.get(
                    fields["base_url"] + "/tasks/nope",
                    headers={"Authorization": "Bearer sk-x"},
                ) as resp,
            ):
                assert resp.status == 200
                assert (await resp.json())["output"]["task_status"] == "UNKNOWN"
            process.send_signal(signum)
            with anyio.fail_after(30):
                assert await process.wait() == 0
