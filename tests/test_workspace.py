"""Workspaces: the header on every API request and nowhere else, the simulator's check, the
errors it maps to, and the 2.x gateway base URL (all through real sockets on 127.0.0.1)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

import emo_async
from emo_async import Client, Limits, PollPolicy, RetryPolicy
from emo_async._samples import make_portrait, make_voice_wav
from emo_async.simulator import Simulator, SimulatorConfig

pytestmark = pytest.mark.anyio

WS = "ws-2c0f1d"
HEADER = "X-DashScope-WorkSpace"
FAST_RETRY = RetryPolicy(attempts=4, wait_initial=0.01, wait_max=0.05)


def sim_config(**kw: Any) -> SimulatorConfig:
    base: dict[str, Any] = {
        "time_scale": 0.002,
        "submit_qps": None,
        "task_qps": 50.0,
        "detect_qps": 50.0,
        "policy_qps": None,
        "policy_ttl": 1e7,
    }
    base.update(kw)
    return SimulatorConfig(**base)


def client_for(sim: Simulator, **kw: Any) -> Client:
    kw.setdefault("limits", Limits(task_qps=40, submit_qps=200, detect_qps=40, policy_qps=100))
    kw.setdefault("poll", PollPolicy(target_delay=0.05))
    kw.setdefault("retry", FAST_RETRY)
    return Client(sim.api_key, base_url=sim.base_url, **kw)


@pytest.fixture(autouse=True)
def _no_workspace_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DASHSCOPE_WORKSPACE", "DASHSCOPE_BASE_URL", "DASHSCOPE_HTTP_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


class TestSimulatorCheck:
    """A simulator with a workspace refuses API requests that do not name it."""

    async def test_missing_header_is_workspace_access_denied(self) -> None:
        async with Simulator(sim_config(workspace=WS)) as sim:
            async with client_for(sim) as client:
                with pytest.raises(emo_async.WorkspaceAccessDeniedError) as info:
                    await client.get_task("t-1")
            err = info.value
            assert (err.status, err.code) == (403, "Workspace.AccessDenied")
            assert isinstance(err, emo_async.AccessDeniedError)
            assert isinstance(err, emo_async.AuthenticationError)
            assert isinstance(err, emo_async.WorkspaceError)
            # Not retried: a wrong workspace stays wrong.
            assert sim.ledger.count("task_get") == 1

    async def test_wrong_workspace_is_workspace_not_found(self) -> None:
        async with Simulator(sim_config(workspace=WS)) as sim:
            async with client_for(sim, workspace="ws-other") as client:
                with pytest.raises(emo_async.WorkspaceNotFoundError) as info:
                    await client.get_task("t-1")
            err = info.value
            assert (err.status, err.code) == (404, "WorkSpaceNotFound")
            assert isinstance(err, emo_async.NotFoundError)
            assert isinstance(err, emo_async.WorkspaceError)
            assert not isinstance(err, emo_async.AuthenticationError)
            assert sim.ledger.count("task_get") == 1

    async def test_a_bad_key_is_reported_before_the_workspace(self) -> None:
        async with Simulator(sim_config(workspace=WS)) as sim:
            client = Client("sk-wrong", base_url=sim.base_url, retry=FAST_RETRY)
            async with client:
                with pytest.raises(emo_async.InvalidApiKeyError):
                    await client.get_task("t-1")

    async def test_without_a_workspace_nothing_is_checked(self) -> None:
        async with Simulator(sim_config()) as sim:
            for ws in (None, "ws-anything"):
                async with client_for(sim, workspace=ws) as client:
                    task = await client.get_task("t-1")
                assert task.status == emo_async.TaskStatus.UNKNOWN

    async def test_every_request_of_a_whole_video_carries_the_workspace(
        self, tmp_path: Path
    ) -> None:
        """Upload policy, detect, submit, task queries, list and cancel all pass the check;
        uploads and the video download work with no header at all."""
        image = make_portrait(tmp_path / "me.jpg", size=(600, 800))
        audio = make_voice_wav(tmp_path / "hi.wav", 2.0)
        async with Simulator(sim_config(workspace=WS)) as sim:
            async with client_for(sim, workspace=WS) as client:
                outcome = await client.generate(image, audio, tmp_path / "out" / "hi.mp4")
                assert outcome.ok, outcome
                assert [i.task_id async for i in client.list_tasks()] == [outcome.task_id]
                with pytest.raises(emo_async.UnsupportedOperationError):
                    await client.cancel_task(str(outcome.task_id))
            seen = {r.endpoint for r in sim.ledger.requests}
            assert {"get_policy", "upload", "detect", "submit", "task_get", "media"} <= seen
            assert {"task_list", "task_cancel"} <= seen
            assert [r for r in sim.ledger.requests if r.status in (403, 404)] == []
            assert sim.ledger.auth_leaks() == []


@attrs.define
class Recorder:
    """An API host and a second host (uploads and videos) on two loopback ports, recording
    the headers each request arrived with."""

    api: TestServer
    other: TestServer
    seen: list[tuple[str, str, dict[str, str]]] = attrs.field(factory=list)

    def headers_of(self, role: str) -> list[dict[str, str]]:
        return [h for r, _, h in self.seen if r == role]


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    holder: dict[str, Recorder] = {}
    video = b"\x00\x00\x00\x18ftypmp42" + bytes(2000)

    async def api(request: web.Request) -> web.StreamResponse:
        rec = holder["r"]
        rec.seen.append(("api", request.path, dict(request.headers)))
        other = str(rec.other.make_url("")).rstrip("/")
        if request.path == "/api/v1/uploads":
            data = {
                "upload_host": other + "/",
                "upload_dir": "dashscope-instant/x",
                "policy": "p",
                "signature": "s",
                "oss_access_key_id": "ak",
                "expire_in_seconds": 300,
            }
            return web.json_response({"request_id": "r", "data": data})
        return web.json_response(
            {
                "request_id": "r",
                "output": {
                    "task_id": "t-1",
                    "task_status": "SUCCEEDED",
                    "results": {"video_url": other + "/v.mp4"},
                    "end_time": "2030-01-01 00:00:00.000",
                },
                "usage": {"video_duration": 1.0},
            }
        )

    async def host(request: web.Request) -> web.StreamResponse:
        await request.read()
        holder["r"].seen.append(("other", request.path, dict(request.headers)))
        if request.method == "POST":
            return web.Response(status=200)
        return web.Response(body=video, content_type="video/mp4")

    api_app = web.Application()
    api_app.router.add_route("*", "/{tail:.*}", api)
    host_app = web.Application()
    host_app.router.add_route("*", "/{tail:.*}", host)
    api_server = TestServer(api_app, host="127.0.0.1")
    host_server = TestServer(host_app, host="127.0.0.1")
    await api_server.start_server()
    await host_server.start_server()
    holder["r"] = Recorder(api_server, host_server)
    try:
        yield holder["r"]
    finally:
        await api_server.close()
        await host_server.close()


class TestHeaderPlacement:
    """The workspace goes to the API host only; per-call headers likewise."""

    async def test_upload_and_video_hosts_never_see_it(
        self, recorder: Recorder, tmp_path: Path
    ) -> None:
        src = tmp_path / "a.wav"
        src.write_bytes(b"RIFF" + bytes(100))
        client = Client(
            "sk-rec", base_url=str(recorder.api.make_url("/api/v1")), workspace=WS, retry=FAST_RETRY
        )
        async with client:
            url = await client.upload(src, extra_headers={"X-Trace": "t1"})
            task = await client.get_task("t-1")
            assert task.video_url is not None
            await client.download(task, tmp_path / "v.mp4")
        assert url.startswith("oss://")
        api = recorder.headers_of("api")
        other = recorder.headers_of("other")
        assert len(api) == 2
        assert [r[1] for r in recorder.seen if r[0] == "other"] == ["/", "/v.mp4"]
        assert all(h.get(HEADER) == WS for h in api)
        assert api[0].get("X-Trace") == "t1"
        for h in other:
            lowered = {k.lower() for k in h}
            assert HEADER.lower() not in lowered
            assert "authorization" not in lowered
            assert "x-trace" not in lowered

    async def test_a_call_may_name_another_workspace(self, recorder: Recorder) -> None:
        client = Client("sk-rec", base_url=str(recorder.api.make_url("/api/v1")), workspace=WS)
        async with client:
            await client.get_task("t-1", extra_headers={"x-dashscope-workspace": "ws-b"})
            await client.get_task("t-1")
        sent = [
            [v for k, v in h.items() if k.lower() == HEADER.lower()]
            for h in recorder.headers_of("api")
        ]
        assert sent == [["ws-b"], [WS]]


class TestBaseURL:
    """The legacy host and the 2.x gateway host, with or without ``/api/v1``."""

    @pytest.mark.parametrize(
        ("url", "expected"),
        [
            ("https://dashscope.aliyuncs.com/api/v1", "https://dashscope.aliyuncs.com/api/v1"),
            ("https://dashscope.aliyuncs.com", "https://dashscope.aliyuncs.com/api/v1"),
            (
                f"https://{WS}.cn-beijing.maas.aliyuncs.com",
                f"https://{WS}.cn-beijing.maas.aliyuncs.com/api/v1",
            ),
            (
                f"https://{WS}.cn-beijing.maas.aliyuncs.com/api/v1/",
                f"https://{WS}.cn-beijing.maas.aliyuncs.com/api/v1",
            ),
        ],
    )
    def test_forms_accepted(self, url: str, expected: str) -> None:
        assert Client("sk-x", base_url=url).base_url == expected

    def test_gateway_host_names_the_workspace(self) -> None:
        client = Client("sk-x", base_url=f"https://{WS}.cn-beijing.maas.aliyuncs.com")
        assert client.workspace == WS
        assert Client("sk-x", base_url="https://dashscope.aliyuncs.com").workspace is None

    def test_gateway_of_another_workspace_is_refused(self) -> None:
        with pytest.raises(ValueError, match="gateway of workspace"):
            Client("sk-x", base_url=f"https://{WS}.cn-beijing.maas.aliyuncs.com", workspace="ws-b")

    @pytest.mark.parametrize("bad", [" ", "ws a", "ws\r\nX-Evil: 1", "ws/1"])
    def test_bad_workspace_ids_refused(self, bad: str) -> None:
        with pytest.raises(ValueError, match="workspace"):
            Client("sk-x", base_url="http://127.0.0.1:1/api/v1", workspace=bad)

    async def test_a_bare_host_reaches_the_api_under_api_v1(self) -> None:
        async with Simulator(sim_config(workspace=WS)) as sim:
            bare = sim.base_url.removesuffix("/api/v1")
            assert bare != sim.base_url
            async with Client(sim.api_key, base_url=bare, workspace=WS) as client:
                await client.get_task("t-1")
            assert [r.path for r in sim.ledger.requests] == ["/api/v1/tasks/t-1"]

    async def test_gateway_host_is_where_the_client_connects(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A loopback proxy sees the client open a tunnel to the workspace's gateway."""
        seen: list[bytes] = []

        async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append((await reader.readuntil(b"\r\n\r\n")).split(b"\r\n", 1)[0])
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(proxy, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        for name in ("HTTPS_PROXY", "NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{port}")
        try:
            client = Client(
                "sk-x",
                base_url=f"https://{WS}.cn-beijing.maas.aliyuncs.com",
                retry=RetryPolicy(attempts=1),
            )
            async with client:
                with pytest.raises(emo_async.EmoError):
                    await client.get_task("abc")
        finally:
            server.close()
            await server.wait_closed()
        assert seen == [f"CONNECT {WS}.cn-beijing.maas.aliyuncs.com:443 HTTP/1.1".encode()]
