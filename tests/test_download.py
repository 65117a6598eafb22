from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import resource
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest
from _media_server import MediaObject, MediaServer, make_bytes
from aiohttp.test_utils import TestServer

from emo_async._config import RetryPolicy, Timeouts
from emo_async._download import (
    Downloader,
    DownloadResult,
    _partfile,
    cleanup_orphans,
    part_paths,
    redact_url,
    url_deadline,
)
from emo_async._exceptions import ClientClosedError, DownloadError, ResultExpiredError

pytestmark = pytest.mark.anyio

CHUNK = 64 * 1024
SIZE = 1_000_003  # not a multiple of anything
FAST = RetryPolicy(attempts=4, wait_initial=0.001, wait_max=0.01)


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


def downloader(**kwargs: object) -> Downloader:
    options: dict[str, object] = {"chunk_size": CHUNK, "retry": FAST, "safety_margin": 0.0}
    options.update(kwargs)
    return Downloader(**options)  # type: ignore[arg-type]


def assert_clean(result: DownloadResult, obj: MediaObject) -> None:
    assert result.path.read_bytes() == obj.data
    assert result.sha256 == obj.sha256
    assert result.size == len(obj.data)
    part, meta = part_paths(result.path)
    assert not part.exists()
    assert not meta.exists()


def write_our_sidecar(meta: Path) -> None:
    """A sidecar as a crashed download of ours leaves it."""
    fields = {"version": 1, "owner": "emo_async", "part": meta.name.removesuffix(".json")}
    fields.update({"url_sha256": "0" * 64, "resource_sha256": "1" * 64, "etag": '"e"'})
    meta.write_text(json.dumps(fields))


def listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def soon(seconds: float) -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC) + _dt.timedelta(seconds=seconds)


class TestUrlDeadline:
    """The deadline is read from the presigned URL."""

    def test_reads_oss_v1_expires(self) -> None:
        url = "http://b.oss-cn-shanghai.aliyuncs.com/x.mp4?Expires=1700000000&Signature=s"
        assert url_deadline(url) == _dt.datetime(2023, 11, 14, 22, 13, 20, tzinfo=_dt.UTC)

    def test_reads_v4_date_plus_seconds(self) -> None:
        url = "https://h/x.mp4?x-oss-date=20240101T000000Z&x-oss-expires=86400&x-oss-signature=s"
        assert url_deadline(url) == _dt.datetime(2024, 1, 2, tzinfo=_dt.UTC)
        s3 = "https://h/x.mp4?X-Amz-Date=20240101T000000Z&X-Amz-Expires=60"
        assert url_deadline(s3) == _dt.datetime(2024, 1, 1, 0, 1, tzinfo=_dt.UTC)

    @pytest.mark.parametrize(
        "url", ["http://h/x.mp4", "http://h/x?Expires=soon", "http://h/x?Expires=1e400", "::"]
    )
    def test_missing_or_garbage_gives_none(self, url: str) -> None:
        assert url_deadline(url) is None

    def test_redaction_drops_the_signature(self) -> None:
        shown = redact_url("https://user:pw@h:8443/a/b.mp4?Expires=1&Signature=SECRET#frag")
        assert shown == "https://h:8443/a/b.mp4"


class TestHappyPath:
    """A plain download lands complete, verified and alone."""

    async def test_file_matches_and_part_files_are_gone(
        self, media: MediaServer, tmp_path: Path
    ) -> None:
        obj = media.add("a.mp4", SIZE, reject_head=True)
        async with downloader() as dl:
            result = await dl.download(media.url("a.mp4"), tmp_path / "out" / "a.mp4")
        assert [r.method for r in media.requests] == ["GET"]
        assert_clean(result, obj)
        assert result.bytes_transferred == SIZE
        assert (result.resumes, result.restarts) == (0, 0)
        assert listing(tmp_path / "out") == ["a.mp4"]

    async def test_early_writeback_keeps_the_file_intact(
        self, media: MediaServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(_partfile, "_WRITEBACK_EVERY", 2 * CHUNK)
        obj = media.add("a.mp4", SIZE, cut_at=[333_333])
        async with downloader() as dl:
            result = await dl.download(media.url("a.mp4"), tmp_path / "a.mp4")
        assert_clean(result, obj)

    async def test_no_authorization_header_is_ever_sent(
        self, media: MediaServer, tmp_path: Path
    ) -> None:
        media.add("a.mp4", SIZE, cut_at=[300_000])
        async with downloader() as dl:
            await dl.download(media.url("a.mp4"), tmp_path / "a.mp4")
        assert len(media.requests) == 2
        for request in media.requests:
            assert "Authorization" not in request.headers
            assert "Cookie" not in request.headers
            assert request.headers["Accept-Encoding"] == "identity"

    async def test_forbidden_origin_is_refused_without_a_request(
        self, media: MediaServer, tmp_path: Path
    ) -> None:
        media.add("a.mp4", SIZE)
        async with downloader(forbidden_origins=[media.base_url + "/api/v1"]) as dl:
            with pytest.raises(DownloadError, match="API host"):
                await dl.download(media.url("a.mp4"), tmp_path / "a.mp4")
        assert media.requests == []
        assert not (tmp_path / "a.mp4").exists()

    async def test_expected_size_and_sha256_are_accepted(
        self, media: MediaServer, tmp_path: Path
    ) -> None:
        obj = media.add("a.mp4", SIZE)
        async with downloader() as dl:
            result = await dl.download(
                media.url("a.mp4"),
                tmp_path / "a.mp4",
                expected_size=SIZE,
                expected_sha256=obj.sha256.upper(),
            )
        assert_clean(result, obj)

    async def test_closed_downloader_refuses(self, tmp_path: Path) -> None:
        dl = downloader()
        with pytest.raises(ClientClosedError):
            await dl.download("http://127.0.0.1:1/a.mp4", tmp_path / "a.mp4")
        async with dl:
            pass
        with pytest.raises(ClientClosedError):
            await dl.__aenter__()

    async def test_logs_never_show_the_query(
        self, media: MediaServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        media.add("a.mp4", SIZE, cut_at=[200_000], fail_503=1)
        caplog.set_level(logging.DEBUG, logger="emo_async.download")
        async with downloader() as dl:
            await dl.download(media.url("a.mp4"), tmp_path / "a.mp4")
        assert "restarting" not in caplog.text
        assert "interrupted" in caplog.text
        assert "Signature" not in caplog.text
        assert "Expires=" not in caplog.text


class TestResume:
    """A broken stream resumes where it broke, and never splices two versions."""

    @pytest.mark.parametrize(
        "cuts",
        [
            [1],
            [CHUNK - 1],
            [CHUNK * 3 + 17, CHUNK * 3 + 18, CHUNK * 7],
            [100_000, 400_000, 700_000, SIZE - 1],
        ],
    )
    async def test_truncation_resumes_without_refetching(
        self, media: MediaServer, tmp_path: Path, cuts: list[int]
    ) -> None:
        obj = media.add("a.mp4", SIZE, cut_at=list(cuts))
        async with downloader() as dl:
            result = await dl.download(media.url("a.mp4"), tmp_path / "a.mp4")
        assert_clean(result, obj)
        assert result.bytes_transferred <= SIZE + CHUNK * len(cuts)
        assert result.resumes == len(cuts)
        assert result.restarts == 0
        ranged = media.ranged("a.mp4")
        assert [r.headers["Range"] for r in ranged] == [f"bytes={c}-" for c in cuts]
        assert all(r.headers["If-Range"] == obj.etag for r in ranged)

    async def test_changed_etag_restarts_with_the_new_object(
        self, media: MediaServer, tmp_path: Path
    ) -> None:
        old = media.add("a.mp4", SIZE, cut_at=[400_000])
        new = MediaObject.build(SIZE + 5, seed=99)
        media.faults["a.mp4"].change_on_request = 2
        media.faults["a.mp4"].change_to = new
        async with downloader() as dl:
            result = await dl.download(media.url("a.mp4"), tmp_path / "a.mp4")
        data = result.path.read_bytes()
        assert data == new.data
        assert data[:400_000] != old.data[:400_000]
        assert result.sha256 == new.sha256
        assert result.restarts == 1
        assert result.bytes_transferred == 400_000 + len(new.data)

    async def test_206_with_a_new_etag_restarts(self, media: MediaServer, tmp_path: Path) -> None:
        # A server that skips the If-Range check but reports the new ETag on its 206.
        media.add("a.mp4", SIZE, cut_at=[300_000], ignore_if_range=True)
        new = MediaObject.build(SIZE, seed=7)
        media.faults["a.mp4"].change_on_request = 2
        media.faults["a.mp4"].change_to = new
        async with downloader() as dl:
            result = await dl.download(media.url("a.mp4"), tmp_path / "a.mp4")
        assert result.path.read_bytes() == new.data
        assert result.restarts == 1
        assert [r.headers.get("Range") for r in media.requests] == [None, "bytes=300000-", None]

    async def test_ignored_range_restarts_from_zero(
        self, media: MediaServer, tmp_path: Path
    ) -> None:
        obj = media.add("a.mp4", SIZE, cut_at=[500_000], ignore_range=True)
        async with downloader() as dl:
            result = await dl.download(media.url("a.mp4"), tmp_path / "a.mp4")
        assert_clean(result, obj)
        assert result.restarts == 1
        assert result.bytes_transferred == 500_000 + SIZE

    async def test_without_validators_restarts_instead_of_guessing(
        self, media: MediaServer, tmp_path: Path
    ) -> None:
        obj = media.add("a.mp4", SIZE, cut_at=[500_000], no_validators=True)
        async with downloader() as dl:
            result = await dl.download(media.url("a.mp4"), tmp_path / "a.mp4")
        assert_clean(result, obj)
        assert media.ranged("a.mp4") == []
        assert result.restarts == 1

    async def test_last_modified_is_used_for_a_weak_etag(
        self, media: MediaServer, tmp_path: Path
    ) -> None:
        obj = media.add("a.mp4", SIZE, cut_at=[500_000])
        obj.etag = "W/" + obj.etag
        async with downloader() as dl:
            result = await dl.download(media.url("a.mp4"), tmp_path / "a.mp4")
        assert_clean(result, obj)
        assert [r.headers["If-Range"] for r in media.ranged("a.mp4")] == [obj.last_modified]

    async def test_503_is_retried(self, media: MediaServer, tmp_path: Path) -> None:
        obj = media.add("a.mp4", SIZE, fail_503=2)
        async with downloader() as dl:
            result = await dl.download(media.url("a.mp4"), tmp_path / "a.mp4")
        assert_clean(result, obj)
        assert len(media.requests) == 3

    async def test_retry_after_is_honoured_and_capped(self, tmp_path: Path) -> None:
        from aiohttp import web

        body = make_bytes(10_000, seed=3)
        arrivals: list[float] = []

        async def handler(request: web.Request) -> web.Response:
            arrivals.append(time.monotonic())
            if len(arrivals) == 1:
                return web.Response(status=503, headers={"Retry-After": "0.3"})
            if len(arrivals) == 2:
                return web.Response(status=503, headers={"Retry-After": "3600"})
            return web.Response(body=body, content_type="video/mp4")

        app = web.Application()
        app.router.add_get("/v.mp4", handler)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        policy = RetryPolicy(attempts=4, wait_initial=0.001, wait_max=0.01, retry_after_max=0.5)
        try:
            async with downloader(retry=policy) as dl:
                with anyio.fail_after(10):
                    result = await dl.download(str(server.make_url("/v.mp4")), tmp_path / "v.mp4")
        finally:
            await server.close()
        assert result.path.read_bytes() == body
        assert arrivals[1] - arrivals[0] >= 0.3
        # An hour's Retry-After is waited only up to retry_after_max.
        assert 0.5 <= arrivals[2] - arrivals[1] < 5.0

    async def test_retries_stop_without_progress(self, media: MediaServer, tmp_path: Path) -> None:
        media.add("a.mp4", SIZE, always_503=True)
        async with downloader() as dl:
            with pytest.raises(DownloadError, match="4 times in a row"):
                await dl.download(media.url("a.mp4"), tmp_path / "a.mp4")
        assert len(media.requests) == FAST.attempts
        assert not (tmp_path / "a.mp4").exists()

    async def test_progress_resets_the_retry_count(
        self, media: MediaServer, tmp_path: Path
    ) -> None:
        cuts = [50_000 * i for i in range(1, 12)]  # more breaks than attempts
        obj = media.add("a.mp4", SIZE, cut_at=list(cuts))
        async with downloader() as dl:
            result = await dl.download(media.url("a.mp4"), tmp_path / "a.mp4")
        assert_clean(result, obj)
        assert result.resumes == len(cuts)

    async def test_client_error_is_not_retried(self, media: MediaServer, tmp_path: Path) -> None:
        media.add("a.mp4", SIZE, status=404)
        async with downloader() as dl:
            with pytest.raises(DownloadError, match="HTTP 404"):
                await dl.download(media.url("a.mp4"), tmp_path / "a.mp4")
        assert len(media.requests) == 1

    async def test_read_timeout_resumes(self, media: MediaServer, tmp_path: Path) -> None:
        obj = media.add("a.mp4", 300_000, hold_after=100_000)
        timeouts = Timeouts(connect=5.0, read=0.2, total=None)
        async with downloader(timeouts=timeouts) as dl:
            async with anyio.create_task_group() as tg:

                async def release_when_retried() -> None:
                    await media.disconnected.wait()
                    media.release.set()

                tg.start_soon(release_when_retried)
                result = await dl.download(media.url("a.mp4"), tmp_path / "a.mp4")
        assert_clean(result, obj)
        assert result.resumes == 1
        assert result.bytes_transferred == 300_000


class TestVerification:
    """A wrong file never reaches its final path."""

    async def test_sha256_mismatch_leaves_nothing(self, media: MediaServer, tmp_path: Path) -> None:
        media.add("a.mp4", SIZE)
        dest = tmp_path / "a.mp4"
        async with downloader() as dl:
            with pytest.raises(DownloadError, match="sha256"):
                await dl.download(media.url("a.mp4"), dest, expected_sha256="0" * 64)
        assert listing(tmp_path) == []

    async def test_size_mismatch_fails_before_streaming(
        self, media: MediaServer, tmp_path: Path
    ) -> None:
        media.add("a.mp4", SIZE)
        async with downloader() as dl:
            with pytest.raises(DownloadError, match="expected 5"):
                await dl.download(media.url("a.mp4"), tmp_path / "a.mp4", expected_size=5)
        assert listing(tmp_path) == []


class TestExpiry:
    """An expired URL is reported as such, loudly and at once."""

    async def test_expired_url_is_not_requested(self, media: MediaServer, tmp_path: Path) -> None:
        media.add("a.mp4", SIZE)
        async with downloader() as dl:
            with pytest.raises(ResultExpiredError, match="expired at"):
                await dl.download(media.url("a.mp4", expires=time.time() - 5), tmp_path / "a.mp4")
        assert media.requests == []
        assert listing(tmp_path) == []

    async def test_server_saying_expired_gives_result_expired(
        self, media: MediaServer, tmp_path: Path
    ) -> None:
        media.add("a.mp4", SIZE)
        url = media.url("a.mp4", expires=time.time() - 5)
        async with downloader() as dl:
            with pytest.raises(ResultExpiredError, match="Request has expired"):
                # A caller-supplied deadline (e.g. a skewed clock) does not stop OSS saying no.
                await dl.download(url, tmp_path / "a.mp4", deadline=soon(3600))
        assert len(media.requests) == 1
        assert not (tmp_path / "a.mp4").exists()

    async def test_deadline_passing_while_queued(self, media: MediaServer, tmp_path: Path) -> None:
        media.add("slow.mp4", SIZE, hold_after=0)
        media.add("b.mp4", SIZE)
        async with downloader(max_concurrent=1) as dl, anyio.create_task_group() as tg:
            tg.start_soon(dl.download, media.url("slow.mp4"), tmp_path / "slow.mp4")
            await media.holding.wait()
            with pytest.raises(ResultExpiredError, match="waiting for a download slot"):
                await dl.download(media.url("b.mp4"), tmp_path / "b.mp4", deadline=soon(0.2))
            assert dl.statistics().waiting == 0
            media.release.set()
        assert "b.mp4" not in media.started
        assert not (tmp_path / "b.mp4").exists()
        assert (tmp_path / "slow.mp4").read_bytes() == media.objects["slow.mp4"].data


class TestScheduling:
    """Waiting downloads start earliest deadline first, never more than the limit at once."""

    async def test_earliest_deadline_first(self, media: MediaServer, tmp_path: Path) -> None:
        media.add("first.mp4", 200_000, hold_after=0)
        now = time.time()
        # (name, Expires in the URL, explicit deadline): explicit wins over the URL.
        plan = [
            ("late.mp4", now + 3000, None),
            ("tie1.mp4", now + 1000, None),
            ("never.mp4", None, None),
            ("mid.mp4", now + 9999, soon(2000)),
            ("tie2.mp4", now + 1000, None),
            ("early.mp4", now + 500, None),
        ]
        for name, _, _ in plan:
            media.add(name, 100_000)
        async with downloader(max_concurrent=1) as dl, anyio.create_task_group() as tg:
            tg.start_soon(dl.download, media.url("first.mp4"), tmp_path / "first.mp4")
            await media.holding.wait()
            for name, expires, deadline in plan:
                url = media.url(name, expires=expires)
                if expires is None:
                    url = url.split("?", 1)[0]
                tg.start_soon(
                    lambda u=url, n=name, d=deadline: dl.download(u, tmp_path / n, deadline=d)
                )
                await anyio.wait_all_tasks_blocked()
            assert dl.statistics().waiting == len(plan)
            assert dl.statistics().active == 1
            media.release.set()
        order = [n for n in media.started if n != "first.mp4"]
        assert order == ["early.mp4", "tie1.mp4", "tie2.mp4", "mid.mp4", "late.mp4", "never.mp4"]
        assert media.max_in_flight == 1

    async def test_concurrency_limit_holds(self, media: MediaServer, tmp_path: Path) -> None:
        names = [f"v{i}.mp4" for i in range(8)]
        for i, name in enumerate(names):
            media.add(name, 300_000, seed=i, slow=0.001)
        async with downloader(max_concurrent=3) as dl, anyio.create_task_group() as tg:
            for name in names:
                tg.start_soon(dl.download, media.url(name), tmp_path / name)
        assert media.max_in_flight == 3
        for name in names:
            assert (tmp_path / name).read_bytes() == media.objects[name].data


class TestCancellation:
    """Cancelling closes the stream, keeps the .part and never leaves a file at dest."""

    async def test_cancel_mid_stream_then_resume(self, media: MediaServer, tmp_path: Path) -> None:
        obj = media.add("a.mp4", SIZE, hold_after=5 * CHUNK)
        dest = tmp_path / "a.mp4"
        part, meta = part_paths(dest)
        async with downloader() as dl:
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(dl.download, media.url("a.mp4"), dest)
                    await media.holding.wait()
                    while part.stat().st_size < 4 * CHUNK:
                        await anyio.sleep(0.005)
                    scope.cancel()
            with anyio.fail_after(10):  # a safety net, not a timing assertion
                await media.disconnected.wait()
            assert not dest.exists()
            held = part.stat().st_size
            assert held >= 4 * CHUNK
            assert meta.exists()
            assert dl.statistics().active == 0

            media.release.set()
            result = await dl.download(media.url("a.mp4"), dest)
        assert_clean(result, obj)
        assert result.resumes == 1
        assert result.bytes_transferred == SIZE - held


class TestDiskErrors:
    """Disk errors fail one download with a clear message; the .part stays, others go on."""

    async def test_parent_is_a_file(self, media: MediaServer, tmp_path: Path) -> None:
        ok = media.add("ok.mp4", SIZE)
        media.add("bad.mp4", SIZE)
        (tmp_path / "blocker").write_bytes(b"not a directory")
        results: dict[str, object] = {}

        async def run(name: str, dest: Path) -> None:
            try:
                results[name] = await dl.download(media.url(name), dest)
            except DownloadError as exc:
                results[name] = exc

        async with downloader() as dl, anyio.create_task_group() as tg:
            tg.start_soon(run, "bad.mp4", tmp_path / "blocker" / "sub" / "bad.mp4")
            tg.start_soon(run, "ok.mp4", tmp_path / "ok.mp4")
        error = results["bad.mp4"]
        assert isinstance(error, DownloadError)
        assert "blocker" in str(error)
        assert isinstance(error.__cause__, OSError)
        assert (tmp_path / "ok.mp4").read_bytes() == ok.data

    async def test_dest_is_a_directory(self, media: MediaServer, tmp_path: Path) -> None:
        media.add("a.mp4", SIZE)
        (tmp_path / "a.mp4").mkdir()
        async with downloader() as dl:
            with pytest.raises(DownloadError, match="is a directory"):
                await dl.download(media.url("a.mp4"), tmp_path / "a.mp4")
        assert media.requests == []

    async def test_write_failure_keeps_part_for_resume(
        self, media: MediaServer, tmp_path: Path, small_file_limit: int
    ) -> None:
        obj = media.add("a.mp4", SIZE)
        dest = tmp_path / "a.mp4"
        part, _ = part_paths(dest)
        async with downloader() as dl:
            with pytest.raises(DownloadError, match="disk full") as info:
                await dl.download(media.url("a.mp4"), dest)
            assert isinstance(info.value.__cause__, OSError)
            assert str(part) in str(info.value)
            assert not dest.exists()
            assert 0 < part.stat().st_size <= small_file_limit
            held = part.stat().st_size
            resource.setrlimit(resource.RLIMIT_FSIZE, _UNLIMITED)
            result = await dl.download(media.url("a.mp4"), dest)
        assert_clean(result, obj)
        assert result.bytes_transferred == SIZE - held

    async def test_symlinked_part_is_not_followed(self, media: MediaServer, tmp_path: Path) -> None:
        media.add("a.mp4", SIZE)
        victim = tmp_path / "victim"
        victim.write_bytes(b"precious")
        dest = tmp_path / "a.mp4"
        part_paths(dest)[0].symlink_to(victim)
        async with downloader() as dl:
            with pytest.raises(DownloadError):
                await dl.download(media.url("a.mp4"), dest)
        assert victim.read_bytes() == b"precious"


_UNLIMITED = resource.getrlimit(resource.RLIMIT_FSIZE)


@pytest.fixture
def small_file_limit() -> Iterator[int]:
    """Make writes past 300 kB fail with EFBIG, as a full disk would fail them."""
    limit = 300_000
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, _UNLIMITED[1]))
    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, _UNLIMITED)
        signal.signal(signal.SIGXFSZ, old_handler)


class TestCrossProcessResume:
    """A new Downloader (another process) resumes a .part through its sidecar."""

    async def _interrupt(self, media: MediaServer, dest: Path) -> int:
        part, _ = part_paths(dest)
        async with downloader() as first:
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(first.download, media.url("a.mp4"), dest)
                    await media.holding.wait()
                    while part.stat().st_size < 3 * CHUNK:
                        await anyio.sleep(0.005)
                    scope.cancel()
        media.release.set()
        return part.stat().st_size

    async def test_new_downloader_resumes_from_sidecar(
        self, media: MediaServer, tmp_path: Path
    ) -> None:
        obj = media.add("a.mp4", SIZE, hold_after=4 * CHUNK)
        dest = tmp_path / "a.mp4"
        held = await self._interrupt(media, dest)
        sidecar = json.loads(part_paths(dest)[1].read_text())
        assert sidecar["etag"] == obj.etag
        assert sidecar["total"] == SIZE
        text = json.dumps(sidecar)
        assert "Signature" not in text
        assert media.base_url not in text
        async with downloader() as second:
            result = await second.download(media.url("a.mp4"), dest)
        assert_clean(result, obj)
        assert result.bytes_transferred == SIZE - held
        assert media.ranged("a.mp4")[-1].headers["Range"] == f"bytes={held}-"

    async def test_resigned_url_still_resumes(self, media: MediaServer, tmp_path: Path) -> None:
        obj = media.add("a.mp4", SIZE, hold_after=4 * CHUNK)
        dest = tmp_path / "a.mp4"
        held = await self._interrupt(media, dest)
        async with downloader() as second:
            resigned = media.url("a.mp4", expires=time.time() + 7200)
            result = await second.download(resigned, dest)
        assert_clean(result, obj)
        assert result.bytes_transferred == SIZE - held

    async def test_part_without_matching_sidecar_starts_over(
        self, media: MediaServer, tmp_path: Path
    ) -> None:
        obj = media.add("a.mp4", SIZE)
        dest = tmp_path / "a.mp4"
        part, meta = part_paths(dest)
        part.write_bytes(b"garbage from something else" * 1000)
        meta.write_text(json.dumps({"version": 1, "url_sha256": "x", "resource_sha256": "y"}))
        async with downloader() as dl:
            result = await dl.download(media.url("a.mp4"), dest)
        assert_clean(result, obj)
        assert result.bytes_transferred == SIZE
        assert media.ranged("a.mp4") == []

    async def test_changed_object_behind_a_sidecar_restarts(
        self, media: MediaServer, tmp_path: Path
    ) -> None:
        media.add("a.mp4", SIZE, hold_after=4 * CHUNK)
        dest = tmp_path / "a.mp4"
        await self._interrupt(media, dest)
        new = MediaObject.build(SIZE, seed=42)
        media.objects["a.mp4"] = new
        async with downloader() as second:
            result = await second.download(media.url("a.mp4"), dest)
        assert result.path.read_bytes() == new.data
        assert result.sha256 == hashlib.sha256(new.data).hexdigest()
        assert result.restarts == 1


class TestCleanupOrphans:
    """Orphaned partial files are removed unless a pending download owns them."""

    async def test_removes_unowned_parts_only(self, tmp_path: Path) -> None:
        for name in ["a.mp4.part", "b.mp4.part", "c.mp4", "d.mp4.part"]:
            (tmp_path / name).write_bytes(b"x")
        for stem in ["a.mp4", "b.mp4"]:
            write_our_sidecar(tmp_path / f"{stem}.part.json")
        os.mkdir(tmp_path / "dir.part")
        removed = await cleanup_orphans(
            tmp_path, keep=[tmp_path / "a.mp4", tmp_path / "d.mp4.part"]
        )
        assert sorted(p.name for p in removed) == ["b.mp4.part", "b.mp4.part.json"]
        left = listing(tmp_path)
        assert left == ["a.mp4.part", "a.mp4.part.json", "c.mp4", "d.mp4.part", "dir.part"]

    async def test_missing_directory_is_fine(self, tmp_path: Path) -> None:
        assert await cleanup_orphans(tmp_path / "nope", keep=()) == []

    async def test_removes_sidecar_writes_a_kill_cut_short(self, tmp_path: Path) -> None:
        # write_sidecar writes <meta>.<8 hex>.tmp then renames it: killed in between, the
        # temporary file is left, empty (killed before its one write) or complete.
        (tmp_path / "b.mp4.part").write_bytes(b"x")
        write_our_sidecar(tmp_path / "b.mp4.part.json")
        (tmp_path / "b.mp4.part.json.0123abcd.tmp").write_bytes(b"")
        write_our_sidecar(tmp_path / "c.mp4.part.json")  # complete, never renamed:
        os.rename(tmp_path / "c.mp4.part.json", tmp_path / "c.mp4.part.json.89abcdef.tmp")
        (tmp_path / "e.mp4.part.json.00000000.tmp").write_bytes(b"")  # nothing else left
        (tmp_path / "a.mp4.part").write_bytes(b"x")  # resumed: left alone with its temp
        (tmp_path / "a.mp4.part.json.11111111.tmp").write_bytes(b"")
        (tmp_path / "f.mp4.part.json.22222222.tmp").write_text("a user's own file")
        (tmp_path / "g.mp4.part.json.xyz.tmp").write_bytes(b"")  # not our name
        (tmp_path / "h.mp4.part").write_bytes(b"x")  # a .part with no sidecar: not ours
        (tmp_path / "h.mp4.part.json.33333333.tmp").write_bytes(b"")
        removed = await cleanup_orphans(tmp_path, keep=[tmp_path / "a.mp4"])
        assert sorted(p.name for p in removed) == [
            "b.mp4.part",
            "b.mp4.part.json",
            "b.mp4.part.json.0123abcd.tmp",
            "c.mp4.part.json.89abcdef.tmp",
            "e.mp4.part.json.00000000.tmp",
        ]
        assert listing(tmp_path) == [
            "a.mp4.part",
            "a.mp4.part.json.11111111.tmp",
            "f.mp4.part.json.22222222.tmp",
            "g.mp4.part.json.xyz.tmp",
            "h.mp4.part",
            "h.mp4.part.json.33333333.tmp",
        ]

    async def test_download_removes_its_own_cut_short_sidecar_write(
        self, media: MediaServer, tmp_path: Path
    ) -> None:
        obj = media.add("a.mp4", SIZE)
        dest = tmp_path / "a.mp4"
        (tmp_path / "a.mp4.part.json.0123abcd.tmp").write_bytes(b"")
        (tmp_path / "b.mp4.part.json.0123abcd.tmp").write_bytes(b"")  # another download's
        async with downloader() as dl:
            result = await dl.download(media.url("a.mp4"), dest)
        assert_clean(result, obj)
        assert listing(tmp_path) == ["a.mp4", "b.mp4.part.json.0123abcd.tmp"]
