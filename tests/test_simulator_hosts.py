"""The simulator's upload and media hosts, its fault knobs and its ledger, over loopback."""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import attrs
import pytest
from _media_fixtures import (
    DETECT_PATH,
    FIXED,
    SUBMIT_PATH,
    Api,
    FileServer,
    job,
    portrait,
    wav,
)

from emo_async.simulator import (
    SIM_KEY,
    FaultConfig,
    Ledger,
    RequestRecord,
    Simulator,
    SimulatorConfig,
    create_app,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
def api(sim: Simulator, session: aiohttp.ClientSession) -> Api:
    return Api(session, sim.base_url, sim.api_key)


async def _policy(api: Api, model: str = "emo-v1") -> dict[str, Any]:
    status, body, _ = await api.call(
        "GET", "/uploads", params={"action": "getPolicy", "model": model}
    )
    assert status == 200, body
    return dict(body["data"])


def _form(policy: dict[str, Any], name: str, data: bytes, *, skip: str = "") -> aiohttp.FormData:
    """The SDK's multipart form (dashscope/utils/oss_utils.py), file last."""
    form = aiohttp.FormData()
    fields = {
        "OSSAccessKeyId": policy["oss_access_key_id"],
        "Signature": policy["signature"],
        "policy": policy["policy"],
        "key": f"{policy['upload_dir']}/{name}",
        "x-oss-object-acl": policy["x_oss_object_acl"],
        "x-oss-forbid-overwrite": policy["x_oss_forbid_overwrite"],
        "success_action_status": "200",
        "x-oss-content-type": "application/octet-stream",
    }
    for key, value in fields.items():
        if key != skip:
            form.add_field(key, value)
    form.add_field("file", io.BytesIO(data), filename=name, content_type="application/octet-stream")
    return form


async def _upload(
    session: aiohttp.ClientSession, policy: dict[str, Any], name: str, data: bytes, **kw: Any
) -> tuple[int, str]:
    async with session.post(policy["upload_host"], data=_form(policy, name, data, **kw)) as resp:
        return resp.status, await resp.text()


async def _finished_task(api: Api, sim: Simulator, files: FileServer) -> tuple[str, str]:
    """Submit a 3 s job and run it to SUCCEEDED; returns (task id, video URL)."""
    image = files.add("i.png", portrait())
    status, body = await api.submit(job(image, files.add("a.wav", wav(3.0))))
    assert status == 200, body
    task_id = body["output"]["task_id"]
    sim.clock.advance(10.0)
    out = (await api.task(task_id))["output"]
    assert out["task_status"] == "SUCCEEDED"
    return task_id, out["results"]["video_url"]


class TestUpload:
    """getPolicy plus the OSS-like upload host, and ``oss://`` resolution."""

    async def test_policy_names_the_upload_listener(self, api: Api, sim: Simulator) -> None:
        policy = await _policy(api)
        assert policy["upload_host"] == sim.upload_host
        assert policy["x_oss_object_acl"] == "private"
        assert policy["x_oss_forbid_overwrite"] == "true"
        assert policy["expire_in_seconds"] == 300
        assert policy["upload_dir"].startswith("dashscope-instant/")
        for key in ("policy", "signature", "max_file_size_mb", "capacity_limit_mb"):
            assert policy[key]

    async def test_upload_then_submit_with_oss_urls(
        self, api: Api, sim: Simulator, session: aiohttp.ClientSession
    ) -> None:
        policy = await _policy(api)
        assert (await _upload(session, policy, "face.png", portrait()))[0] == 200
        assert (await _upload(session, policy, "voice.wav", wav(2.0)))[0] == 200
        body = job(
            f"oss://{policy['upload_dir']}/face.png", f"oss://{policy['upload_dir']}/voice.wav"
        )
        status, out = await api.submit(body)
        assert (status, out["code"]) == (400, "InvalidURL")
        status, out = await api.submit(body, headers={"X-DashScope-OssResourceResolve": "enable"})
        assert status == 200, out
        assert sim.tasks[out["output"]["task_id"]].audio_duration == pytest.approx(2.0)
        assert sim.ledger.auth_leaks() == []

    async def test_an_upload_is_readable_only_by_its_model(
        self, api: Api, session: aiohttp.ClientSession
    ) -> None:
        # DashScope binds a temporary file to the model named in getPolicy.
        oss = {"X-DashScope-OssResourceResolve": "enable"}
        urls = {}
        for model in ("emo-v1", "emo-detect-v1"):
            policy = await _policy(api, model)
            assert (await _upload(session, policy, "face.png", portrait()))[0] == 200
            urls[model] = f"oss://{policy['upload_dir']}/face.png"

        async def detect(url: str) -> tuple[int, dict[str, Any]]:
            body = {"model": "emo-detect-v1", "input": {"image_url": url}}
            status, out, _ = await api.call("POST", DETECT_PATH, json=body, headers=oss)
            return status, out

        status, out = await detect(urls["emo-v1"])
        assert (status, out["code"]) == (400, "InvalidURL")
        status, out = await detect(urls["emo-detect-v1"])
        assert status == 200, out
        assert out["output"]["check_pass"] is True
        voice = await _policy(api)
        assert (await _upload(session, voice, "voice.wav", wav(2.0)))[0] == 200
        audio = f"oss://{voice['upload_dir']}/voice.wav"
        status, out = await api.submit(job(urls["emo-detect-v1"], audio), headers=oss)
        assert (status, out["code"]) == (400, "InvalidURL")
        status, out = await api.submit(job(urls["emo-v1"], audio), headers=oss)
        assert status == 200, out

    async def test_forbid_overwrite(self, api: Api, session: aiohttp.ClientSession) -> None:
        policy = await _policy(api)
        assert (await _upload(session, policy, "a.wav", wav()))[0] == 200
        status, text = await _upload(session, policy, "a.wav", wav(1.0))
        assert status == 409
        assert "<Code>FileAlreadyExists</Code>" in text

    @pytest.mark.parametrize(
        "missing",
        ["x-oss-forbid-overwrite", "x-oss-object-acl", "Signature", "policy", "OSSAccessKeyId"],
    )
    async def test_missing_field_is_403(
        self, api: Api, session: aiohttp.ClientSession, missing: str
    ) -> None:
        policy = await _policy(api)
        status, text = await _upload(session, policy, "a.wav", wav(), skip=missing)
        assert status == 403
        assert text.startswith("<?xml")

    async def test_tampered_policy_and_foreign_key_are_403(
        self, api: Api, session: aiohttp.ClientSession
    ) -> None:
        policy = await _policy(api)
        forged = dict(policy, signature="AAAA" + policy["signature"][4:])
        assert (await _upload(session, forged, "a.wav", wav()))[0] == 403
        other = dict(policy, upload_dir="somewhere-else")
        assert (await _upload(session, other, "a.wav", wav()))[0] == 403

    async def test_expired_policy_and_upload(
        self, api: Api, sim: Simulator, session: aiohttp.ClientSession
    ) -> None:
        policy = await _policy(api)
        assert (await _upload(session, policy, "a.wav", wav()))[0] == 200
        sim.clock.advance(301)
        assert (await _upload(session, policy, "b.wav", wav()))[0] == 403
        image = f"oss://{policy['upload_dir']}/a.wav"
        sim.clock.advance(172800)
        status, out = await api.submit(
            job(image, image), headers={"X-DashScope-OssResourceResolve": "enable"}
        )
        assert (status, out["code"]) == (400, "InvalidURL")

    async def test_too_large_upload_is_refused(self, session: aiohttp.ClientSession) -> None:
        async with Simulator(SimulatorConfig(max_file_size_mb=1)) as sim:
            api = Api(session, sim.base_url, sim.api_key)
            policy = await _policy(api)
            status, text = await _upload(session, policy, "big.bin", bytes(1024 * 1024 + 1))
            assert status == 400
            assert "EntityTooLarge" in text


class TestMedia:
    """Signed, expiring video URLs with ETag, Range and If-Range."""

    async def test_full_download_matches_result_bytes(
        self, api: Api, sim: Simulator, files: FileServer, session: aiohttp.ClientSession
    ) -> None:
        task_id, url = await _finished_task(api, sim, files)
        async with session.get(url) as resp:
            data = await resp.read()
            assert resp.status == 200
            assert resp.headers["Content-Length"] == str(len(data))
            assert resp.headers["ETag"].startswith('"')
            assert resp.headers["Accept-Ranges"] == "bytes"
        assert data == sim.result_bytes(task_id)
        assert len(data) == 3 * 20_000
        assert data[4:8] == b"ftyp"
        assert sim.ledger.bytes_served("media") == len(data)

    async def test_big_result_streams_whole_and_ranged(
        self, files: FileServer, session: aiohttp.ClientSession
    ) -> None:
        # Several MiB: served in chunks, not one write; every byte and every range still right.
        config = attrs.evolve(FIXED, video_bytes_per_second=1_500_000)
        async with Simulator(config) as big:
            api = Api(session, big.base_url, big.api_key)
            task_id, url = await _finished_task(api, big, files)
            full = big.result_bytes(task_id)
            assert len(full) == 4_500_000
            async with session.get(url) as resp:
                assert resp.headers["Content-Length"] == str(len(full))
                assert await resp.read() == full
            async with session.get(url, headers={"Range": "bytes=1048570-"}) as resp:
                assert resp.status == 206
                assert await resp.read() == full[1048570:]

    async def test_media_bandwidth_paces_downloads(
        self, files: FileServer, session: aiohttp.ClientSession
    ) -> None:
        # 300 kB at 1 MB/s cannot arrive in less than ~0.3 s (a lower bound: a slow machine
        # only makes it later). Unpaced, the same bytes take a few milliseconds.
        config = attrs.evolve(FIXED, video_bytes_per_second=100_000, media_bandwidth=1_000_000)
        async with Simulator(config) as paced:
            api = Api(session, paced.base_url, paced.api_key)
            task_id, url = await _finished_task(api, paced, files)
            start = time.monotonic()
            async with session.get(url) as resp:
                data = await resp.read()
            elapsed = time.monotonic() - start
        assert data == paced.result_bytes(task_id)
        assert elapsed >= 0.25

    async def test_range_and_if_range(
        self, api: Api, sim: Simulator, files: FileServer, session: aiohttp.ClientSession
    ) -> None:
        task_id, url = await _finished_task(api, sim, files)
        full = sim.result_bytes(task_id)
        async with session.get(url) as resp:
            etag = resp.headers["ETag"]
        async with session.get(url, headers={"Range": "bytes=100-199", "If-Range": etag}) as resp:
            assert resp.status == 206
            assert resp.headers["Content-Range"] == f"bytes 100-199/{len(full)}"
            assert await resp.read() == full[100:200]
        async with session.get(url, headers={"Range": "bytes=1000-"}) as resp:
            assert resp.status == 206
            assert await resp.read() == full[1000:]
        async with session.get(url, headers={"Range": "bytes=100-", "If-Range": '"stale"'}) as resp:
            assert resp.status == 200
            assert await resp.read() == full
        async with session.get(url, headers={"Range": f"bytes={len(full)}-"}) as resp:
            assert resp.status == 416
            assert resp.headers["Content-Range"] == f"bytes */{len(full)}"

    async def test_expired_or_forged_url_is_403(
        self, api: Api, sim: Simulator, files: FileServer, session: aiohttp.ClientSession
    ) -> None:
        _, url = await _finished_task(api, sim, files)
        async with session.get(url.replace("Signature=", "Signature=x")) as resp:
            assert resp.status == 403
        sim.clock.advance(86400)
        async with session.get(url) as resp:
            assert resp.status == 403
            assert "Request has expired." in await resp.text()

    async def test_expires_is_real_time_of_expiry(
        self, api: Api, sim: Simulator, files: FileServer
    ) -> None:
        import time
        from urllib.parse import parse_qs, urlsplit

        task_id, url = await _finished_task(api, sim, files)
        expires = int(parse_qs(urlsplit(url).query)["Expires"][0])
        # The task ended just now (the jump reached its end) and the URL is valid 24 h after
        # the end: at time_scale=1 it expires about 86400 real seconds from now.
        assert abs(expires - (time.time() + 86400)) < 5
        assert sim.tasks[task_id].ended is not None

    async def test_truncated_body_then_clean_resume(
        self, api: Api, sim: Simulator, files: FileServer, session: aiohttp.ClientSession
    ) -> None:
        task_id, url = await _finished_task(api, sim, files)
        full = sim.result_bytes(task_id)
        sim.set_faults(FaultConfig(seed=4, truncate_rate=1.0))
        async with session.get(url) as resp:
            assert resp.headers["Content-Length"] == str(len(full))
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        record = sim.ledger.requests[-1]
        assert record.fault == "truncate"
        assert record.bytes_sent < len(full)
        sim.set_faults(FaultConfig())
        async with session.get(url, headers={"Range": f"bytes={record.bytes_sent}-"}) as resp:
            assert resp.status == 206
            assert full[: record.bytes_sent] + await resp.read() == full

    async def test_etag_change_rewrites_the_object(
        self, api: Api, sim: Simulator, files: FileServer, session: aiohttp.ClientSession
    ) -> None:
        task_id, url = await _finished_task(api, sim, files)
        async with session.get(url) as resp:
            first_tag, first = resp.headers["ETag"], await resp.read()
        sim.set_faults(FaultConfig(etag_change_rate=1.0))
        async with session.get(url, headers={"Range": "bytes=10-", "If-Range": first_tag}) as resp:
            assert resp.status == 200  # the object changed: a full body, never a splice
            second = await resp.read()
            assert resp.headers["ETag"] != first_tag
        assert second != first
        assert second == sim.result_bytes(task_id)

    async def test_ignore_range_fault(
        self, api: Api, sim: Simulator, files: FileServer, session: aiohttp.ClientSession
    ) -> None:
        task_id, url = await _finished_task(api, sim, files)
        sim.set_faults(FaultConfig(ignore_range_rate=1.0))
        async with session.get(url, headers={"Range": "bytes=10-"}) as resp:
            assert resp.status == 200
            assert await resp.read() == sim.result_bytes(task_id)

    async def test_authorization_on_media_host_is_a_leak(
        self, api: Api, sim: Simulator, files: FileServer, session: aiohttp.ClientSession
    ) -> None:
        _, url = await _finished_task(api, sim, files)
        async with session.get(url, headers={"Authorization": "Bearer sk-simulator"}) as resp:
            assert resp.status == 200
        leaks = sim.ledger.auth_leaks()
        assert [(r.role, r.endpoint) for r in leaks] == [("media", "media")]

    async def test_roles_are_told_apart_by_port(
        self, sim: Simulator, session: aiohttp.ClientSession
    ) -> None:
        async with session.get(f"{sim.media_host}/api/v1/tasks/x") as resp:
            assert resp.status == 404
        assert sim.ledger.requests[-1].role == "media"
        assert sim.ledger.requests[-1].endpoint == "other"


class TestFaults:
    """Seeded fault knobs: ambiguous submits, errors, resets, throttling."""

    async def test_ambiguous_submit_creates_exactly_one_task(
        self, sim: Simulator, files: FileServer
    ) -> None:
        sim.set_faults(FaultConfig(ambiguous_submit_rate=1.0))
        body = job(files.add("i.png", portrait()), files.add("a.wav", wav()))
        async with aiohttp.ClientSession() as fresh:
            with pytest.raises(aiohttp.ServerDisconnectedError):
                await fresh.post(
                    sim.base_url + SUBMIT_PATH,
                    json=body,
                    headers={
                        "Authorization": f"Bearer {sim.api_key}",
                        "X-DashScope-Async": "enable",
                    },
                )
        assert len(sim.ledger.tasks_created) == 1
        record = sim.ledger.requests[-1]
        assert (record.endpoint, record.status, record.fault) == ("submit", None, "ambiguous")
        assert list(sim.tasks) == [sim.ledger.tasks_created[0].task_id]

    async def test_error_rate_gives_500_or_503(self, sim: Simulator, api: Api) -> None:
        sim.set_faults(FaultConfig(seed=1, error_rate={"task_get": 1.0}))
        codes = set()
        for _ in range(12):
            status, body, _ = await api.call("GET", "/tasks/x")
            codes.add((status, body["code"]))
        assert codes == {(500, "InternalError"), (503, "ModelUnavailable")}
        assert {r.fault for r in sim.ledger.requests} == {"error"}

    async def test_reset_drops_the_connection(self, sim: Simulator) -> None:
        sim.set_faults(FaultConfig(reset_rate={"get_policy": 1.0}))
        async with aiohttp.ClientSession() as fresh:
            with pytest.raises(aiohttp.ClientError):
                await fresh.get(
                    sim.base_url + "/uploads?action=getPolicy&model=emo-v1",
                    headers={"Authorization": f"Bearer {sim.api_key}"},
                )
        assert sim.ledger.count("get_policy") >= 1
        assert all(r.status is None for r in sim.ledger.requests if r.endpoint == "get_policy")

    async def test_throttle_fault_with_retry_after(self, sim: Simulator, api: Api) -> None:
        sim.set_faults(FaultConfig(throttle_rate={"task_get": 1.0}, retry_after=0.5))
        status, body, headers = await api.call("GET", "/tasks/x")
        assert (status, body["code"]) == (429, "Throttling.RateQuota")
        assert headers["Retry-After"] == "0.5"
        assert sim.ledger.throttled("task_get") == 1

    async def test_faults_are_reproducible(self, files: FileServer) -> None:
        async def run() -> list[int | None]:
            faults = FaultConfig(seed=9, error_rate={"task_get": 0.5})
            async with (
                Simulator(SimulatorConfig(faults=faults)) as sim,
                aiohttp.ClientSession() as client,
            ):
                api = Api(client, sim.base_url, sim.api_key)
                for _ in range(15):
                    await api.call("GET", "/tasks/x")
                return [r.status for r in sim.ledger.requests]

        assert await run() == await run()


class TestLedger:
    """The ledger's queries."""

    def test_max_in_window_counts_arrivals(self) -> None:
        ledger = Ledger()
        for t in (0.0, 0.1, 0.5, 0.99, 1.0, 1.05, 3.0):
            ledger.record(
                RequestRecord(
                    t=t,
                    role="api",
                    endpoint="task_get",
                    method="GET",
                    path="/",
                    status=200,
                    authorization=True,
                )
            )
        assert ledger.max_in_window("task_get") == 5  # 0.1 .. 1.05
        assert ledger.max_in_window("task_get", window=0.1) == 3  # 0.99 .. 1.05
        assert ledger.max_in_window("submit") == 0
        ledger.reset()
        assert ledger.count() == 0

    async def test_duplicate_tasks_group_by_content(
        self, sim: Simulator, api: Api, files: FileServer
    ) -> None:
        image = portrait()
        body_a = job(files.add("a.png", image), files.add("a.wav", wav()))
        body_b = job(files.add("b.png", image), files.add("b.wav", wav()))  # same bytes
        body_c = job(files.add("c.png", image), files.add("c.wav", wav(2.0)))
        ids = []
        for body in (body_a, body_b, body_c):
            status, out = await api.submit(body)
            assert status == 200
            ids.append(out["output"]["task_id"])
        dupes = sim.ledger.duplicate_tasks()
        assert list(dupes.values()) == [ids[:2]]
        fingerprint = next(iter(dupes))
        assert sim.tasks[ids[0]].fingerprint == fingerprint
        assert len(fingerprint) == len(hashlib.sha256().hexdigest())


class TestFactory:
    """``create_app`` serves all three roles on one port, told apart by path."""

    async def test_single_port_app(self, files: FileServer) -> None:
        from aiohttp.test_utils import TestServer

        app = create_app(FIXED)
        async with TestServer(app, host="127.0.0.1") as server:
            base = str(server.make_url("/api/v1"))
            async with aiohttp.ClientSession() as client:
                api = Api(client, base, "sk-simulator")
                policy = await _policy(api)
                assert policy["upload_host"] == str(server.make_url("")).rstrip("/")
                assert (await _upload(client, policy, "a.wav", wav()))[0] == 200
                status, out = await api.submit(
                    job(files.add("i.png", portrait()), files.add("a.wav", wav()))
                )
                assert status == 200
                task_id = out["output"]["task_id"]
                app[SIM_KEY].clock.advance(10)
                url = (await api.task(task_id))["output"]["results"]["video_url"]
                assert url.startswith(base.removesuffix("/api/v1") + "/results/")
                async with client.get(url) as resp:
                    assert resp.status == 200
