"""A user's files are safe from the downloader: nothing deleted or overwritten that isn't ours
(issue 16), no non-video saved as a result, and no signed URL in an error.

Every test talks real HTTP: to the simulator's media host, the test media server, or a small
aiohttp app on 127.0.0.1.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from _media_server import MediaServer
from aiohttp import web
from aiohttp.test_utils import TestServer

from emo_async import Client, Limits, OutcomeState, PollPolicy, RetryPolicy
from emo_async._download import Downloader, NotMP4Error, cleanup_orphans, part_paths
from emo_async._exceptions import DownloadError
from emo_async._samples import make_sample_set
from emo_async.simulator import Simulator, SimulatorConfig

pytestmark = pytest.mark.anyio

FAST = RetryPolicy(attempts=4, wait_initial=0.001, wait_max=0.01)
SECRETS = ("SECRETSIG", "LTAIKEYID", "TOKEN123", "Signature=", "OSSAccessKeyId", "Expires=")


@pytest.fixture
async def media() -> AsyncIterator[MediaServer]:
    server = MediaServer()
    test_server = TestServer(server.app, host="127.0.0.1")
    await test_server.start_server()
    server.base_url = str(test_server.make_url("")).rstrip("/")
    try:
        yield server
    finally:
        server.release.set()
        await test_server.close()


async def serve(routes: dict[str, Any]) -> TestServer:
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


def sim_config(**kw: Any) -> SimulatorConfig:
    base: dict[str, Any] = {
        "time_scale": 0.002,
        "submit_qps": None,
        "policy_qps": None,
        "max_running": 1000,
        "policy_ttl": 1e7,
    }
    base.update(kw)
    return SimulatorConfig(**base)


def client_for(sim: Simulator) -> Client:
    return Client(
        sim.api_key,
        base_url=sim.base_url,
        limits=Limits(task_qps=40, submit_qps=200, detect_qps=40, policy_qps=100),
        poll=PollPolicy(target_delay=0.05),
        retry=RetryPolicy(attempts=8, wait_initial=0.02, wait_max=0.2),
    )


class TestCleanupTouchesOnlyOurs:
    """Cleanup removes only partial files a sidecar of ours claims and no live download holds."""

    async def test_batch_leaves_a_users_part_files_alone(self, tmp_path: Path) -> None:
        jobs = make_sample_set(tmp_path / "in", 1, seconds=(0.5, 1.0))
        out = tmp_path / "out"
        out.mkdir()
        planted = {
            "ubuntu-24.04.iso.part": b"half an ISO",
            "thesis.pdf.part.json": b'{"version": 1}',
            "backup.tar.part": b"tar",
            "backup.tar.part.json": b"{}",
        }
        for name, data in planted.items():
            (out / name).write_bytes(data)
        async with Simulator(sim_config()) as sim, client_for(sim) as client:
            outcomes = await client.run_batch_all(jobs, out)
        assert [o.state for o in outcomes] == [OutcomeState.DONE]
        for name, data in planted.items():
            assert (out / name).read_bytes() == data

    async def test_second_batch_spares_the_first_ones_live_download(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO, logger="emo_async")
        first = make_sample_set(tmp_path / "in1", 1, seconds=(1.5, 1.5))
        second = make_sample_set(tmp_path / "in2", 1, seconds=(0.5, 0.5))
        second = [j.__class__(j.image, j.audio, name="second") for j in second]
        out = tmp_path / "out"
        # ~300 kB at 100 kB/s: the first download is still streaming when the second starts.
        config = sim_config(video_bytes_per_second=200_000, media_bandwidth=100_000)
        results: dict[str, list[Any]] = {}
        async with Simulator(config) as sim, client_for(sim) as client:

            async def run(name: str, jobs: list[Any], journal: Path) -> None:
                results[name] = await client.run_batch_all(jobs, out, journal=journal)

            async with anyio.create_task_group() as tg:
                tg.start_soon(run, "first", first, tmp_path / "j1.sqlite3")
                with anyio.fail_after(30):
                    while not list(out.glob("*.part")):
                        await anyio.sleep(0.01)
                (live,) = out.glob("*.part")
                tg.start_soon(run, "second", second, tmp_path / "j2.sqlite3")
            (done,) = results["first"]
            assert done.state == OutcomeState.DONE
            assert done.task_id is not None
            assert done.path is not None
            assert done.path.read_bytes() == sim.result_bytes(done.task_id)
        assert results["second"][0].state == OutcomeState.DONE
        assert live.name not in caplog.text  # "removed orphaned partial download ..."
        assert "orphaned" not in caplog.text

    async def test_cleanup_skips_a_part_held_by_a_download(
        self, media: MediaServer, tmp_path: Path
    ) -> None:
        obj = media.add("a.mp4", 500_000, hold_after=100_000)
        dest = tmp_path / "a.mp4"
        part, meta = part_paths(dest)
        async with Downloader(retry=FAST, chunk_size=16_384) as dl:
            async with anyio.create_task_group() as tg:

                async def download() -> None:
                    await dl.download(media.url("a.mp4"), dest)

                tg.start_soon(download)
                await media.holding.wait()
                while part.stat().st_size == 0:
                    await anyio.sleep(0.005)
                assert meta.exists()
                assert await cleanup_orphans(tmp_path, keep=()) == []
                assert part.exists()
                assert meta.exists()
                media.release.set()
        assert dest.read_bytes() == obj.data
        assert not part.exists()
        assert not meta.exists()


class TestNoSymlinkIsFollowed:
    """Files we write in the output folder are never written through a planted symlink."""

    async def test_symlinked_sidecar_target_stays_untouched(
        self, media: MediaServer, tmp_path: Path
    ) -> None:
        media.add("a.mp4", 200_000)
        outside = tmp_path / "outside"
        outside.mkdir()
        victim = outside / "settings.json"
        victim.write_bytes(b"precious")
        out = tmp_path / "out"
        out.mkdir()
        dest = out / "a.mp4"
        _, meta = part_paths(dest)
        meta.symlink_to(victim)
        async with Downloader(retry=FAST) as dl:
            with pytest.raises(DownloadError):
                await dl.download(media.url("a.mp4"), dest)
        assert victim.read_bytes() == b"precious"
        assert meta.is_symlink()
        assert not dest.exists()


class TestResultMustBeAVideo:
    """Bytes that do not start like an MP4 never reach the final path."""

    async def test_html_answer_is_refused(self, tmp_path: Path) -> None:
        page = b"<html><body>Welcome to the hotel wifi</body></html>" * 200

        async def handler(request: web.Request) -> web.Response:
            return web.Response(body=page, content_type="video/mp4")

        server = await serve({"/v.mp4": handler})
        dest = tmp_path / "v.mp4"
        try:
            async with Downloader(retry=FAST) as dl:
                with pytest.raises(NotMP4Error, match="not an MP4"):
                    await dl.download(str(server.make_url("/v.mp4")), dest)
        finally:
            await server.close()
        assert not dest.exists()
        assert not part_paths(dest)[0].exists()

    async def test_simulator_results_are_accepted(self, tmp_path: Path) -> None:
        jobs = make_sample_set(tmp_path / "in", 1, seconds=(0.5, 1.0))
        async with Simulator(sim_config()) as sim, client_for(sim) as client:
            (outcome,) = await client.run_batch_all(jobs, tmp_path / "out")
            assert outcome.state == OutcomeState.DONE, outcome.error
            assert outcome.task_id is not None
            assert outcome.path is not None
            data = outcome.path.read_bytes()
            assert data == sim.result_bytes(outcome.task_id)
            assert data[4:8] == b"ftyp"


def signed(server: TestServer, path: str) -> str:
    expires = int(time.time()) + 86400
    query = (
        f"OSSAccessKeyId=LTAIKEYID&Expires={expires}&Signature=SECRETSIG&security-token=TOKEN123"
    )
    return f"{server.make_url(path)}?{query}"


def assert_no_secret(exc: BaseException) -> None:
    shown = "".join(traceback.format_exception(exc)) + repr(exc)
    for secret in SECRETS:
        assert secret not in shown, (secret, shown)


class TestErrorsNeverShowTheSignedUrl:
    """A presigned URL is a credential: errors show it without its query."""

    async def test_redirect_loop(self, tmp_path: Path) -> None:
        server: TestServer

        async def loop(request: web.Request) -> web.Response:
            raise web.HTTPFound(signed(server, "/loop"))

        server = await serve({"/loop": loop})
        try:
            async with Downloader(retry=FAST) as dl:
                with pytest.raises(DownloadError, match="TooManyRedirects") as info:
                    await dl.download(signed(server, "/loop"), tmp_path / "v.mp4")
        finally:
            await server.close()
        assert_no_secret(info.value)
        assert "/loop" in str(info.value)

    async def test_redirect_to_a_non_http_url(self, tmp_path: Path) -> None:
        async def away(request: web.Request) -> web.Response:
            raise web.HTTPFound("ftp://files.example/v.mp4?Signature=SECRETSIG&OSSAccessKeyId=x")

        server = await serve({"/away": away})
        try:
            async with Downloader(retry=FAST) as dl:
                with pytest.raises(DownloadError) as info:
                    await dl.download(signed(server, "/away"), tmp_path / "v.mp4")
        finally:
            await server.close()
        assert_no_secret(info.value)
        assert not (tmp_path / "v.mp4").exists()
