"""``python -m emo_async.simulator`` in its own process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import anyio
import pytest

pytestmark = pytest.mark.anyio

KEY = "sk-sim-cli-SECRET-0815"
COMMAND = [sys.executable, "-m", "emo_async.simulator", "--port", "0"]


async def _announce(process: anyio.abc.Process) -> dict[str, str]:
    assert process.stdout is not None
    line = b""
    with anyio.fail_after(30):
        while not line.endswith(b"\n"):
            line += await process.stdout.receive(1)
    assert line.startswith(b"EMO_SIMULATOR ")
    return dict(part.split("=", 1) for part in line.decode().split()[1:])


@asynccontextmanager
async def simulator(argv: list[str], env: dict[str, str]) -> AsyncIterator[anyio.abc.Process]:
    """The process; killed on the way out if it still runs (a failed assertion must not
    leave the test waiting for it)."""
    async with await anyio.open_process(argv, env=env) as process:
        try:
            yield process
        finally:
            if process.returncode is None:
                process.kill()
                with anyio.fail_after(30):
                    await process.wait()


async def _status_with(base_url: str, key: str) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(base_url + "/tasks/nope", headers={"Authorization": f"Bearer {key}"}) as resp,
    ):
        return resp.status


class TestSimulatorProcess:
    """The simulator runs as a process, announces itself and stops cleanly on a signal."""

    @pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
    async def test_announces_serves_and_stops(self, signum: signal.Signals) -> None:
        env = {**os.environ, "EMO_SIM_API_KEY": KEY}
        async with simulator(COMMAND, env) as process:
            fields = await _announce(process)
            # Where the key is configured, never the key itself.
            assert fields == {"base_url": fields["base_url"], "api_key_from": "env:EMO_SIM_API_KEY"}
            assert fields["base_url"].startswith("http://127.0.0.1:")
            assert fields["base_url"].endswith("/api/v1")
            async with (
                aiohttp.ClientSession() as session,
                session.get(
                    fields["base_url"] + "/tasks/nope",
                    headers={"Authorization": f"Bearer {KEY}"},
                ) as resp,
            ):
                assert resp.status == 200
                assert (await resp.json())["output"]["task_status"] == "UNKNOWN"
            assert await _status_with(fields["base_url"], "sk-simulator") == 401
            process.send_signal(signum)
            with anyio.fail_after(30):
                assert await process.wait() == 0
            assert process.stdout is not None
            rest = b""
            async for chunk in process.stdout:
                rest += chunk
            assert KEY.encode() not in rest


class TestTheKeyStaysOffTheCommandLine:
    """A key on the command line is visible to every user in ``ps``: it is not accepted."""

    def test_api_key_option_is_refused(self) -> None:
        result = subprocess.run(
            [*COMMAND, "--api-key", KEY], capture_output=True, timeout=15, check=False
        )
        assert result.returncode == 2
        assert b"--api-key" in result.stderr
        assert KEY.encode() not in result.stdout + result.stderr

    async def test_key_file_and_default(self, tmp_path: Path) -> None:
        keys = tmp_path / "keys"
        keys.write_text(f"{KEY}\nsk-second\n", encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if k != "EMO_SIM_API_KEY"}
        async with simulator([*COMMAND, "--api-key-file", str(keys)], env) as process:
            fields = await _announce(process)
            assert fields["api_key_from"] == f"file:{keys}"
            assert await _status_with(fields["base_url"], "sk-second") == 200
            assert await _status_with(fields["base_url"], "sk-simulator") == 401
            process.terminate()
            with anyio.fail_after(30):
                await process.wait()
        async with simulator(COMMAND, env) as process:
            fields = await _announce(process)
            assert fields["api_key_from"] == "default"
            assert await _status_with(fields["base_url"], "sk-simulator") == 200
            process.terminate()
            with anyio.fail_after(30):
                await process.wait()
