"""Uploads through the request path, against two scripted servers on 127.0.0.1: the API host
(the policy) and an upload host (the form). Retries, Retry-After, the policy refresh on a 403,
the cache, and the key: only the API host ever sees it."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

import emo_async
from emo_async import Client, Limits, RetryPolicy

pytestmark = pytest.mark.anyio

KEY = "sk-test-UPLOAD-0123456789"
VOICE = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(200))


@attrs.define
class Arrival:
    at: float
    host: str  # "api" or "upload"
    path: str
    authorization: str | None
    fields: dict[str, str]
    file: bytes = b""


@attrs.define
class Hosts:
    api: TestServer
    upload: TestServer
    arrivals: list[Arrival] = attrs.field(factory=list)
    #: Answers of the upload host, by arrival number (1-based); None: 200.
    upload_script: Callable[[int], web.Response | None] | None = None
    policy_ttl: int = 3600

    @property
    def base_url(self) -> str:
        return str(self.api.make_url("/api/v1"))

    def of(self, host: str) -> list[Arrival]:
        return [a for a in self.arrivals if a.host == host]


@pytest.fixture
async def hosts() -> AsyncIterator[Hosts]:
    holder: dict[str, Hosts] = {}

    async def api(request: web.Request) -> web.Response:
        h = holder["h"]
        h.arrivals.append(
            Arrival(time.monotonic(), "api", request.path, request.headers.get("Authorization"), {})
        )
        n = len(h.of("api"))
        return web.json_response(
            {
                "request_id": f"p{n}",
                "data": {
                    "policy": f"policy-{n}",
                    "signature": f"sig-{n}",
                    "upload_dir": f"dir/{n}",
                    "upload_host": str(h.upload.make_url("/")),
                    "expire_in_seconds": h.policy_ttl,
                    "oss_access_key_id": "ak",
                    "x_oss_object_acl": "private",
                    "x_oss_forbid_overwrite": "true",
                },
            }
        )

    async def upload(request: web.Request) -> web.Response:
        h = holder["h"]
        fields: dict[str, str] = {}
        file = b""
        reader = await request.multipart()
        async for part in reader:
            data = bytes(await part.read())  # type: ignore[union-attr]
            if part.name == "file":
                file = data
            else:
                fields[part.name or ""] = data.decode()
        h.arrivals.append(
            Arrival(
                time.monotonic(),
                "upload",
                request.path,
                request.headers.get("Authorization"),
                fields,
                file,
            )
        )
        if h.upload_script is not None:
            resp = h.upload_script(len(h.of("upload")))
            if resp is not None:
                return resp
        return web.Response(status=200)

    api_app = web.Application()
    api_app.router.add_route("*", "/{tail:.*}", api)
    upload_app = web.Application(client_max_size=16 * 1024 * 1024)
    upload_app.router.add_post("/", upload)
    api_server = TestServer(api_app, host="127.0.0.1")
    upload_server = TestServer(upload_app, host="127.0.0.1")
    await api_server.start_server()
    await upload_server.start_server()
    holder["h"] = Hosts(api_server, upload_server)
    try:
        yield holder["h"]
    finally:
        await upload_server.close()
        await api_server.close()


def make_client(h: Hosts, **kw: Any) -> Client:
    kw.setdefault("retry", RetryPolicy(attempts=4, wait_initial=0.01, wait_max=0.05))
    kw.setdefault("limits", Limits(policy_qps=200))
    return Client(KEY, base_url=h.base_url, **kw)


def oss_error(status: int, code: str, **headers: str) -> web.Response:
    body = f"<Error><Code>{code}</Code><Message>m</Message></Error>"
    return web.Response(status=status, text=body, content_type="application/xml", headers=headers)


@pytest.fixture
def voice(tmp_path: Path) -> Path:
    path = tmp_path / "voice clip.wav"
    path.write_bytes(VOICE)
    return path


class TestUpload:
    async def test_policy_with_key_form_without_it(self, hosts: Hosts, voice: Path) -> None:
        async with make_client(hosts) as client:
            url = await client.upload(voice)
        digest = hashlib.sha256(VOICE).hexdigest()
        assert url == f"oss://dir/1/{digest[:32]}/voice_clip.wav"
        (policy,) = hosts.of("api")
        (form,) = hosts.of("upload")
        assert policy.path == "/api/v1/uploads"
        assert policy.authorization == f"Bearer {KEY}"
        assert form.authorization is None
        assert form.fields["key"] == url.removeprefix("oss://")
        assert form.file == VOICE
        assert form.fields["policy"] == "policy-1"

    async def test_same_content_is_uploaded_once_by_concurrent_callers(
        self, hosts: Hosts, voice: Path
    ) -> None:
        urls: list[str] = []
        async with make_client(hosts) as client:

            async def one() -> None:
                urls.append(await client.upload(voice))

            async with anyio.create_task_group() as tg:
                for _ in range(8):
                    tg.start_soon(one)
            assert await client.upload_digest(voice, "f" * 64) != urls[0]  # other content
        assert len(set(urls)) == 1
        assert len(hosts.of("upload")) == 2
        assert len(hosts.of("api")) == 1  # one policy serves both

    async def test_remembered_upload_is_reused_without_a_request(
        self, hosts: Hosts, voice: Path
    ) -> None:
        import datetime as _dt

        client = make_client(hosts)
        later = _dt.datetime.now(_dt.UTC) + _dt.timedelta(hours=10)
        client.remember_upload("d" * 64, "emo-v1", "oss://seeded", later)
        client.remember_upload("e" * 64, "emo-v1", "oss://stale", later - _dt.timedelta(hours=9.5))
        async with client:
            assert await client.upload_digest(voice, "d" * 64) == "oss://seeded"
            assert await client.upload_digest(voice, "e" * 64) != "oss://stale"
        assert len(hosts.of("upload")) == 1

    async def test_5xx_and_429_are_retried_with_retry_after(
        self, hosts: Hosts, voice: Path
    ) -> None:
        def script(n: int) -> web.Response | None:
            if n == 1:
                return oss_error(503, "ServiceUnavailable")
            if n == 2:
                return oss_error(429, "Throttled", **{"Retry-After": "0.3"})
            return None

        hosts.upload_script = script
        async with make_client(hosts) as client:
            url = await client.upload(voice)
            stats = client.statistics()
        assert url.startswith("oss://")
        second, third = hosts.of("upload")[1:]
        assert third.at - second.at >= 0.3
        # Upload retries are not API requests.
        assert stats.retries == 0
        assert stats.requests == 1

    async def test_retries_stop_at_attempts(self, hosts: Hosts, voice: Path) -> None:
        hosts.upload_script = lambda n: oss_error(500, "InternalError")
        async with make_client(hosts) as client:
            with pytest.raises(emo_async.ServerError, match=r"upload of voice clip\.wav refused"):
                await client.upload(voice)
        assert len(hosts.of("upload")) == 4

    async def test_4xx_is_not_retried_nor_cached(self, hosts: Hosts, voice: Path) -> None:
        hosts.upload_script = lambda n: oss_error(400, "InvalidArgument") if n == 1 else None
        async with make_client(hosts) as client:
            with pytest.raises(emo_async.APIError) as info:
                await client.upload(voice)
            assert not info.value.retryable
            assert info.value.status == 400
            assert (await client.upload(voice)).startswith("oss://")
        assert len(hosts.of("upload")) == 2

    async def test_403_refreshes_the_policy_once(self, hosts: Hosts, voice: Path) -> None:
        hosts.upload_script = lambda n: oss_error(403, "AccessDenied") if n == 1 else None
        async with make_client(hosts) as client:
            url = await client.upload(voice)
        assert url.startswith("oss://dir/2/")
        assert [a.fields["policy"] for a in hosts.of("upload")] == ["policy-1", "policy-2"]
        assert len(hosts.of("api")) == 2

    async def test_a_second_403_is_an_error(self, hosts: Hosts, voice: Path) -> None:
        hosts.upload_script = lambda n: oss_error(403, "AccessDenied")
        async with make_client(hosts) as client:
            with pytest.raises(emo_async.APIError) as info:
                await client.upload(voice)
        assert info.value.status == 403
        assert not isinstance(info.value, emo_async.AuthenticationError)  # not about the key
        assert len(hosts.of("upload")) == 2

    async def test_409_file_already_exists_is_success(self, hosts: Hosts, voice: Path) -> None:
        hosts.upload_script = lambda n: oss_error(409, "FileAlreadyExists")
        async with make_client(hosts) as client:
            assert (await client.upload(voice)).startswith("oss://dir/1/")
        assert len(hosts.of("upload")) == 1

    async def test_a_large_file_is_streamed_and_retried_whole(
        self, hosts: Hosts, tmp_path: Path
    ) -> None:
        big = tmp_path / "big.wav"
        data = bytes(range(256)) * 8192  # 2 MiB: above the in-memory threshold
        big.write_bytes(data)
        hosts.upload_script = lambda n: oss_error(502, "BadGateway") if n == 1 else None
        async with make_client(hosts) as client:
            await client.upload(big)
        first, second = hosts.of("upload")
        assert second.file == data
        assert first.fields["key"] == second.fields["key"]

    async def test_upload_outside_the_context_is_refused(self, hosts: Hosts, voice: Path) -> None:
        with pytest.raises(emo_async.ClientClosedError):
            await make_client(hosts).upload(voice)
        assert hosts.arrivals == []
