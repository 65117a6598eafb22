"""The simulator's API host over real loopback sockets: shapes, documented errors, lifecycle."""

from __future__ import annotations

import datetime as _dt
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anyio
import attrs
import pytest
from _media_fixtures import (
    FIXED,
    SUBMIT_PATH,
    Api,
    FileServer,
    job,
    mp3,
    ogg,
    portrait,
    wav,
)

from emo_async.simulator import Simulator, SimulatorConfig

pytestmark = pytest.mark.anyio


@pytest.fixture
async def api(sim: Simulator) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as session:
        yield Api(session, sim.base_url, sim.api_key)


@pytest.fixture
def inputs(files: FileServer) -> dict[str, str]:
    return {"image": files.add("face.png", portrait()), "audio": files.add("voice.wav", wav(3.0))}


async def _submit_ok(api: Api, inputs: dict[str, str], **kw: Any) -> str:
    status, body = await api.submit(job(inputs["image"], inputs["audio"], **kw))
    assert status == 200, body
    return str(body["output"]["task_id"])


class TestDetect:
    """emo-detect-v1 finds the drawn face and answers boxes of the requested aspect."""

    @pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "WEBP"])
    @pytest.mark.parametrize(("ratio", "aspect"), [("1:1", 1.0), ("3:4", 0.75)])
    async def test_boxes_have_the_ratio_and_contain_the_face(
        self, api: Api, files: FileServer, fmt: str, ratio: str, aspect: float
    ) -> None:
        url = files.add(f"p.{fmt.lower()}", portrait(fmt=fmt))
        status, body = await api.detect(url, ratio)
        assert status == 200, body
        out = body["output"]
        assert out["check_pass"] is True
        assert body["usage"] == {"image_count": 1}
        assert isinstance(body["request_id"], str)
        fx1, fy1, fx2, fy2 = out["face_bbox"]
        ex1, ey1, ex2, ey2 = out["ext_bbox"]
        # The drawn ellipse is (300, 250, 500, 480); JPEG blurs its edge by a few pixels.
        assert abs(fx1 - 300) <= 6
        assert abs(fy1 - 250) <= 6
        assert abs(fx2 - 500) <= 6
        assert abs(fy2 - 480) <= 6
        assert (ex2 - ex1) / (ey2 - ey1) == aspect
        assert 0 <= ex1 <= fx1
        assert 0 <= ey1 <= fy1
        assert fx2 <= ex2 <= 800
        assert fy2 <= ey2 <= 1000

    async def test_detection_is_deterministic(self, api: Api, files: FileServer) -> None:
        first = await api.detect(files.add("a.png", portrait()))
        second = await api.detect(files.add("b.png", portrait()))
        assert first[1]["output"] == second[1]["output"]

    async def test_face_too_large_for_the_ratio_fails_the_check(
        self, api: Api, files: FileServer
    ) -> None:
        url = files.add("big.png", portrait((1000, 420), face=(100, 10, 900, 410)))
        status, body = await api.detect(url, "3:4")
        assert status == 200
        assert body["output"]["check_pass"] is False
        assert body["output"]["message"].startswith("The proportion of the detected person")

    @pytest.mark.parametrize(
        ("trigger", "message"),
        [
            ("InvalidFile.Content:none", "The input image has no human body."),
            ("InvalidFile.Content:multi", "The input image has multi human bodies."),
            ("InvalidFile.BodyProportion", "The proportion of the detected person"),
            ("InvalidFile.Value", "The value of the image is invalid"),
            ("InvalidFile.FrontBody", "The pose of the detected person is invalid"),
            ("InvalidFile.FullFace", "please upload other image with whole face."),
            ("InvalidFile.FacePose", "with the expected oriention."),
        ],
    )
    async def test_content_triggers_fail_the_check(
        self, api: Api, files: FileServer, trigger: str, message: str
    ) -> None:
        url = files.add("t.png", portrait(trigger=trigger))
        status, body = await api.detect(url)
        assert status == 200
        assert body["output"]["check_pass"] is False
        assert message in body["output"]["message"]

    async def test_resolution_out_of_range_is_400(self, api: Api, files: FileServer) -> None:
        status, body = await api.detect(files.add("s.png", portrait((399, 600), face=None)))
        assert status == 400
        assert body["code"] == "InvalidFile.Resolution"

    async def test_unreachable_image_is_invalid_url(self, api: Api, files: FileServer) -> None:
        status, body = await api.detect(files.url("missing.png"))
        assert status == 400
        assert body["code"] == "InvalidURL"
        assert "JPEG, JPG, PNG, BMP, and WEBP" in body["message"]


class TestSubmitErrors:
    """Every error row of the emo-v1 document, answered synchronously at submit."""

    async def test_happy_submit_answers_pending(self, api: Api, inputs: dict[str, str]) -> None:
        status, body = await api.submit(job(inputs["image"], inputs["audio"]))
        assert status == 200
        assert body["output"]["task_status"] == "PENDING"
        assert len(body["output"]["task_id"]) == 36
        assert isinstance(body["request_id"], str)

    async def test_without_trailing_slash_works_too(self, api: Api, inputs: dict[str, str]) -> None:
        status, body, _ = await api.call(
            "POST",
            SUBMIT_PATH.rstrip("/"),
            json=job(inputs["image"], inputs["audio"]),
            headers={"X-DashScope-Async": "enable"},
        )
        assert status == 200, body

    async def test_missing_async_header_is_refused(self, api: Api, inputs: dict[str, str]) -> None:
        status, body, _ = await api.call(
            "POST", SUBMIT_PATH, json=job(inputs["image"], inputs["audio"])
        )
        assert status == 403
        assert body["code"] == "AccessDenied"
        assert body["message"] == "current user api does not support synchronous calls"

    @pytest.mark.parametrize(
        "mutate",
        [
            pytest.param(lambda b: b["input"].pop("face_bbox"), id="no-face-bbox"),
            pytest.param(lambda b: b["input"].update(face_bbox=[1, 2, 3]), id="3-numbers"),
            pytest.param(lambda b: b["input"].update(ext_bbox=[10, 10, 5, 50]), id="x1>x2"),
            pytest.param(lambda b: b["input"].update(ext_bbox=[0, 0, 400, 300]), id="4:3-ext"),
            pytest.param(lambda b: b.pop("input"), id="no-input"),
        ],
    )
    async def test_bad_parameters(self, api: Api, inputs: dict[str, str], mutate: Any) -> None:
        body = job(inputs["image"], inputs["audio"])
        mutate(body)
        status, out = await api.submit(body)
        assert status == 400
        assert out["code"] == "InvalidParameter"
        assert out["message"] == (
            "The request is missing required parameters or in a wrong format, please check "
            "the parameters that you send."
        )

    async def test_bad_style_level(self, api: Api, inputs: dict[str, str]) -> None:
        status, out = await api.submit(job(inputs["image"], inputs["audio"], style="wild"))
        assert (status, out["code"], out["message"]) == (
            400,
            "InvalidParameter",
            "The style_level is invalid.",
        )

    async def test_malformed_json(self, api: Api) -> None:
        status, out, _ = await api.call(
            "POST", SUBMIT_PATH, data=b"{not json", headers={"X-DashScope-Async": "enable"}
        )
        assert (status, out["code"]) == (400, "InvalidParameter")

    @pytest.mark.parametrize("payload", [b"GIF89a" + bytes(64), b"hello", None])
    async def test_image_unreachable_or_wrong_format(
        self, api: Api, files: FileServer, inputs: dict[str, str], payload: bytes | None
    ) -> None:
        url = files.add("x.img", payload) if payload is not None else files.url("nothing.png")
        status, out = await api.submit(job(url, inputs["audio"]))
        assert (status, out["code"]) == (400, "InvalidURL")
        assert out["message"] == (
            "The request URL is invalid, please check the request URL is available and the "
            "request image format is one of the following types: JPEG, JPG, PNG, BMP, and WEBP."
        )

    @pytest.mark.parametrize(
        "audio", ["", "ftp://127.0.0.1/a.wav", "http://198.51.100.7/a.wav", "http://example.com/a"]
    )
    async def test_missing_or_foreign_url(
        self, api: Api, inputs: dict[str, str], audio: str
    ) -> None:
        status, out = await api.submit(job(inputs["image"], audio))
        assert (status, out["code"]) == (400, "InvalidURL")
        assert out["message"] == "Required URL is missing or invalid, please check the request URL."

    async def test_audio_of_60_seconds_is_too_long(
        self, api: Api, files: FileServer, inputs: dict[str, str]
    ) -> None:
        status, out = await api.submit(job(inputs["image"], files.add("long.wav", wav(60.0))))
        assert (status, out["code"], out["message"]) == (
            400,
            "InvalidURL",
            "The input audio is longer than 60s!",
        )

    async def test_long_mp3_is_too_long(
        self, api: Api, files: FileServer, inputs: dict[str, str]
    ) -> None:
        status, out = await api.submit(job(inputs["image"], files.add("long.mp3", mp3(61.0))))
        assert (status, out["message"]) == (400, "The input audio is longer than 60s!")

    async def test_audio_over_15_mb(
        self, api: Api, files: FileServer, inputs: dict[str, str]
    ) -> None:
        big = wav(58.0, rate=48_000, width=3, channels=2)  # under 60 s, but 16.7 MB
        status, out = await api.submit(job(inputs["image"], files.add("big.wav", big)))
        assert (status, out["code"], out["message"]) == (
            400,
            "InvalidURL",
            "File size is larger than 15MB.",
        )

    @pytest.mark.parametrize("payload", [ogg(), b"just text, no audio at all"])
    async def test_audio_of_another_type(
        self, api: Api, files: FileServer, inputs: dict[str, str], payload: bytes
    ) -> None:
        status, out = await api.submit(job(inputs["image"], files.add("a.ogg", payload)))
        assert (status, out["code"], out["message"]) == (
            400,
            "InvalidURL",
            "File type is not supported. Allowed types are: .wav, .mp3.",
        )

    @pytest.mark.parametrize("size", [(399, 800), (7001, 500)])
    async def test_resolution(
        self, api: Api, files: FileServer, inputs: dict[str, str], size: tuple[int, int]
    ) -> None:
        url = files.add("r.png", portrait(size, face=None))
        status, out = await api.submit(
            job(url, inputs["audio"], face=[0, 0, 10, 10], ext=[0, 0, 20, 20])
        )
        assert (status, out["code"]) == (400, "InvalidFile.Resolution")
        assert out["message"] == (
            "The image resolution is invalid, please make sure that the largest length of image "
            "is smaller than 7000, and the smallest length of image is larger than 400."
        )

    async def test_mp3_is_accepted_with_its_duration(
        self, api: Api, files: FileServer, inputs: dict[str, str], sim: Simulator
    ) -> None:
        status, out = await api.submit(job(inputs["image"], files.add("v.mp3", mp3(4.0))))
        assert status == 200, out
        assert sim.tasks[out["output"]["task_id"]].audio_duration == pytest.approx(4.0, abs=0.05)

    async def test_inputs_are_fetched_once(
        self, api: Api, files: FileServer, inputs: dict[str, str]
    ) -> None:
        await _submit_ok(api, inputs)
        hits = files.hits
        await _submit_ok(api, inputs)
        assert files.hits == hits


class TestContentErrors:
    """Content triggers make an emo-v1 task FAIL with the documented code and message."""

    @pytest.mark.parametrize(
        ("trigger", "code"),
        [
            ("InvalidFile.Content:none", "InvalidFile.Content"),
            ("InvalidFile.Content:multi", "InvalidFile.Content"),
            ("InvalidFile.BodyProportion", "InvalidFile.BodyProportion"),
            ("InvalidFile.Value", "InvalidFile.Value"),
            ("InvalidFile.FrontBody", "InvalidFile.FrontBody"),
            ("InvalidFile.FullFace", "InvalidFile.FullFace"),
            ("InvalidFile.FacePose", "InvalidFile.FacePose"),
        ],
    )
    async def test_trigger_fails_the_task(
        self, api: Api, files: FileServer, sim: Simulator, trigger: str, code: str
    ) -> None:
        image = files.add("c.png", portrait(trigger=trigger))
        task_id = await _submit_ok(api, {"image": image, "audio": files.add("a.wav", wav())})
        sim.clock.advance(5.0)
        out = (await api.task(task_id))["output"]
        assert out["task_status"] == "FAILED"
        assert out["code"] == code
        assert "please upload other" in out["message"].lower()
        assert "results" not in out

    async def test_content_rule_by_hash_for_jpeg(self, files: FileServer) -> None:
        data = portrait(fmt="JPEG")
        config = attrs.evolve(
            FIXED, content_rules={hashlib.sha256(data).hexdigest(): "InvalidFile.Value"}
        )
        async with Simulator(config) as sim, aiohttp.ClientSession() as session:
            api = Api(session, sim.base_url, sim.api_key)
            _, body = await api.detect(files.add("d.jpg", data))
            assert body["output"]["check_pass"] is False
            assert "clearer image" in body["output"]["message"]


class TestAuthAndLimits:
    """Bearer keys, token buckets and unknown paths."""

    @pytest.mark.parametrize("header", [None, "Bearer sk-wrong", "sk-simulator"])
    async def test_bad_key_is_401(self, sim: Simulator, header: str | None) -> None:
        headers = {"Authorization": header} if header else {}
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{sim.base_url}/tasks/x", headers=headers) as resp:
                body = await resp.json()
        assert resp.status == 401
        assert body["code"] == "InvalidApiKey"
        assert body["message"] == "Invalid API-key provided."

    async def test_burst_over_the_rate_is_throttled(self, api: Api, sim: Simulator) -> None:
        async def one(results: list[int]) -> None:
            status, body, headers = await api.call("GET", "/tasks/nope")
            results.append(status)
            if status == 429:
                assert body["code"] == "Throttling.RateQuota"
                assert body["message"] == "Requests rate limit exceeded, please try again later."
                assert "Retry-After" not in headers

        results: list[int] = []
        async with anyio.create_task_group() as tg:
            for _ in range(45):
                tg.start_soon(one, results)
        assert results.count(429) > 0
        assert sim.ledger.throttled("task_get") == results.count(429)
        assert sim.ledger.max_in_window("task_get") == 45

    async def test_client_at_the_rate_is_never_refused(self) -> None:
        async with (
            Simulator(SimulatorConfig(task_qps=20.0)) as sim,
            aiohttp.ClientSession() as session,
        ):
            api = Api(session, sim.base_url, sim.api_key)
            for _ in range(30):
                status, _body, _ = await api.call("GET", "/tasks/nope")
                assert status == 200
                await anyio.sleep(1 / 20)
            assert sim.ledger.throttled() == 0

    async def test_unknown_path_is_404_json(self, api: Api) -> None:
        status, body, _ = await api.call("GET", "/no/such/thing")
        assert status == 404
        assert body["code"]
        assert body["request_id"]


class TestLifecycle:
    """PENDING → PRE-PROCESSING → RUNNING → POST-PROCESSING → SUCCEEDED, FIFO behind the cap."""

    async def test_task_walks_every_status(
        self, api: Api, sim: Simulator, inputs: dict[str, str]
    ) -> None:
        task_id = await _submit_ok(api, inputs)
        seen = [(await api.task(task_id))["output"]["task_status"]]
        for step in (0.5, 1.0, 8.0, 1.0):  # ends of the 10/80/10 % stages of 10 s
            sim.clock.advance(step)
            seen.append((await api.task(task_id))["output"]["task_status"])
        assert seen == [
            "PRE-PROCESSING",
            "PRE-PROCESSING",
            "RUNNING",
            "POST-PROCESSING",
            "SUCCEEDED",
        ]
        body = await api.task(task_id)
        out = body["output"]
        assert out["results"]["video_url"].startswith(sim.media_host + "/results/")
        assert body["usage"] == {"video_duration": 3.0, "video_ratio": "1:1"}
        fmt = "%Y-%m-%d %H:%M:%S.%f"
        submit = _dt.datetime.strptime(out["submit_time"], fmt)
        end = _dt.datetime.strptime(out["end_time"], fmt)
        assert _dt.datetime.strptime(out["scheduled_time"], fmt) >= submit
        # Answer times are on the real clock: 10 simulated seconds at this time_scale.
        assert (end - submit).total_seconds() == pytest.approx(
            10.0 * sim.config.time_scale, abs=0.05
        )

    async def test_processing_time_grows_with_audio(self, files: FileServer) -> None:
        config = SimulatorConfig(processing_base=15, processing_per_audio_second=2.0, seed=3)
        async with Simulator(config) as sim, aiohttp.ClientSession() as session:
            api = Api(session, sim.base_url, sim.api_key)
            image = files.add("i.png", portrait())
            short = await _submit_ok(api, {"image": image, "audio": files.add("s.wav", wav(2))})
            long = await _submit_ok(api, {"image": image, "audio": files.add("l.wav", wav(40))})
            assert sim.tasks[long].processing_seconds > sim.tasks[short].processing_seconds + 40
            assert sim.tasks[short].processing_seconds == pytest.approx(19, rel=0.5)

    async def test_concurrency_cap_queues_fifo(self, files: FileServer) -> None:
        async with (
            Simulator(attrs.evolve(FIXED, max_running=2)) as sim,
            aiohttp.ClientSession() as session,
        ):
            api = Api(session, sim.base_url, sim.api_key)
            inputs = {"image": files.add("i.png", portrait()), "audio": files.add("a.wav", wav())}
            ids = [await _submit_ok(api, inputs) for _ in range(3)]
            sim.clock.advance(1.5)
            statuses = [(await api.task(t))["output"]["task_status"] for t in ids]
            assert statuses == ["RUNNING", "RUNNING", "PENDING"]
            assert "scheduled_time" not in (await api.task(ids[2]))["output"]
            sim.clock.advance(9.0)
            statuses = [(await api.task(t))["output"]["task_status"] for t in ids]
            assert statuses == ["SUCCEEDED", "SUCCEEDED", "PRE-PROCESSING"]
            assert sim.ledger.max_running_observed == 2

    async def test_cancel_pending_then_refuse_running(self, files: FileServer) -> None:
        async with (
            Simulator(attrs.evolve(FIXED, max_running=1)) as sim,
            aiohttp.ClientSession() as session,
        ):
            api = Api(session, sim.base_url, sim.api_key)
            inputs = {"image": files.add("i.png", portrait()), "audio": files.add("a.wav", wav())}
            running, queued, third = [await _submit_ok(api, inputs) for _ in range(3)]
            status, body, _ = await api.call("POST", f"/tasks/{queued}/cancel")
            assert status == 200
            assert body["output"]["task_status"] == "CANCELED"
            status, body, _ = await api.call("POST", f"/tasks/{running}/cancel")
            assert (status, body["code"]) == (400, "UnsupportedOperation")
            sim.clock.advance(10.5)
            assert (await api.task(queued))["output"]["task_status"] == "CANCELED"
            # The canceled task gave its place to the next one.
            assert (await api.task(third))["output"]["task_status"] == "PRE-PROCESSING"

    async def test_unknown_and_expired_tasks_read_unknown(
        self, api: Api, sim: Simulator, inputs: dict[str, str]
    ) -> None:
        body = await api.task("00000000-0000-4000-8000-000000000000")
        assert body["output"]["task_status"] == "UNKNOWN"
        task_id = await _submit_ok(api, inputs)
        sim.clock.advance(10.0 + 86400.0)
        assert (await api.task(task_id))["output"]["task_status"] == "UNKNOWN"

    async def test_sdk_style_task_list(self, api: Api, sim: Simulator, files: FileServer) -> None:
        image = files.add("i.png", portrait())
        ids = []
        for n in range(5):
            audio = files.add(f"a{n}.wav", wav(1 + n))
            ids.append(await _submit_ok(api, {"image": image, "audio": audio}))
            sim.clock.advance(3.0)
        # 15 s passed: tasks 0 and 1 (ended at 10 s and 13 s) are done, the others still run.
        status, body, _ = await api.call("GET", "/tasks", params={"page_no": "1", "page_size": "2"})
        assert status == 200
        assert body["total"] == 5
        assert body["total_page"] == 3
        assert body["page_no"] == 1
        assert body["page_size"] == 2
        assert [d["task_id"] for d in body["data"]] == [ids[4], ids[3]]
        item = body["data"][0]
        assert item["model_name"] == "emo-v1"
        assert isinstance(item["gmt_create"], int)
        assert item["request_id"]
        assert item["api_key_id"]
        _, page3, _ = await api.call("GET", "/tasks", params={"page_no": "3", "page_size": "2"})
        assert [d["task_id"] for d in page3["data"]] == [ids[0]]
        _, done, _ = await api.call("GET", "/tasks", params={"status": "SUCCEEDED"})
        assert [d["task_id"] for d in done["data"]] == [ids[1], ids[0]]
        _, one, _ = await api.call("GET", "/tasks", params={"task_id": ids[2]})
        assert [d["task_id"] for d in one["data"]] == [ids[2]]
        _, none, _ = await api.call("GET", "/tasks", params={"model_name": "wanx-v1"})
        assert none["total"] == 0
        # Creation-time window in UTC+8, YYYYMMDDhhmmss.
        tz8 = _dt.timezone(_dt.timedelta(hours=8))
        created = _dt.datetime.fromtimestamp(item["gmt_create"] / 1000, tz8)
        after = (created - _dt.timedelta(seconds=1)).strftime("%Y%m%d%H%M%S")
        _, recent, _ = await api.call("GET", "/tasks", params={"start_time": after})
        assert ids[4] in [d["task_id"] for d in recent["data"]]
        assert ids[0] not in [d["task_id"] for d in recent["data"]]
        status, _, _ = await api.call("GET", "/tasks", params={"start_time": "yesterday"})
        assert status == 400


class TestWithoutValidation:
    """``validate_inputs=False`` skips downloads (for throughput runs with fake URLs)."""

    async def test_fake_urls_are_accepted_and_never_fetched(self) -> None:
        config = attrs.evolve(FIXED, validate_inputs=False)
        async with Simulator(config) as sim, aiohttp.ClientSession() as session:
            api = Api(session, sim.base_url, sim.api_key)
            body = job(
                "http://example.com/a.png", "http://example.com/a.wav", ext=[0, 0, 3000, 4000]
            )
            status, out = await api.submit(body)
            assert status == 200, out
            snapshot = sim.tasks[out["output"]["task_id"]]
            assert snapshot.audio_duration == 10.0
            assert snapshot.ratio == "3:4"
            assert snapshot.status == "PRE-PROCESSING"
