"""The official ``dashscope`` SDK, a client no one here wrote, drives the simulator end to end."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import anyio.to_thread
import pytest
from _media_fixtures import FileServer, portrait, wav

from emo_async.simulator import Simulator, SimulatorConfig

dashscope = pytest.importorskip("dashscope")
from dashscope.client.base_api import BaseApi, BaseAsyncApi  # noqa: E402

pytestmark = pytest.mark.anyio


@pytest.fixture
def sdk_base_url() -> Iterator[None]:
    saved = dashscope.base_http_api_url
    try:
        yield
    finally:
        dashscope.base_http_api_url = saved


@pytest.fixture
async def sim(sdk_base_url: None) -> AsyncIterator[Simulator]:
    # 1 real ms per simulated second: a 3 s clip finishes in ~20 ms, well inside the SDK's
    # first 1 s sleep.
    async with Simulator(SimulatorConfig(time_scale=0.001)) as simulator:
        dashscope.base_http_api_url = simulator.base_url
        yield simulator


class TestDashscopeSdk:
    """dashscope 2.x detects, submits, waits and lists through its generic APIs."""

    async def test_detect_submit_wait_and_download(self, sim: Simulator, files: FileServer) -> None:
        image_url = files.add("face.png", portrait())
        audio_url = files.add("voice.wav", wav(3.0))

        def detect() -> Any:
            return BaseApi.call(
                model="emo-detect-v1",
                input={"image_url": image_url},
                task_group="aigc",
                task="image2video",
                function="face-detect",
                api_key=sim.api_key,
                ratio="1:1",
            )

        detected = await anyio.to_thread.run_sync(detect)
        assert detected.status_code == 200, detected
        assert detected.output["check_pass"] is True

        def submit_and_wait() -> tuple[Any, Any]:
            submitted = BaseAsyncApi.async_call(
                model="emo-v1",
                input={
                    "image_url": image_url,
                    "audio_url": audio_url,
                    "face_bbox": detected.output["face_bbox"],
                    "ext_bbox": detected.output["ext_bbox"],
                },
                task_group="aigc",
                task="image2video",
                function="video-synthesis",
                api_key=sim.api_key,
                style_level="normal",
            )
            assert submitted.status_code == 200, submitted
            return submitted, BaseAsyncApi.wait(submitted, api_key=sim.api_key)

        submitted, done = await anyio.to_thread.run_sync(submit_and_wait)
        task_id = submitted.output["task_id"]
        assert submitted.output["task_status"] == "PENDING"
        assert done.status_code == 200, done
        assert done.output["task_status"] == "SUCCEEDED"
        assert done.usage["video_duration"] == 3.0
        assert done.usage["video_ratio"] == "1:1"
        video_url = done.output["results"]["video_url"]

        fetched = await anyio.to_thread.run_sync(
            lambda: BaseAsyncApi.fetch(task_id, api_key=sim.api_key)
        )
        assert fetched.output["results"]["video_url"] == video_url

        listed = await anyio.to_thread.run_sync(
            lambda: BaseAsyncApi.list(model_name="emo-v1", api_key=sim.api_key)
        )
        assert listed.status_code == 200
        assert [item["task_id"] for item in listed.output["data"]] == [task_id]

        async with aiohttp.ClientSession() as session, session.get(video_url) as resp:
            assert resp.status == 200
            assert await resp.read() == sim.result_bytes(task_id)
        assert sim.ledger.auth_leaks() == []
        assert [t.task_id for t in sim.ledger.tasks_created] == [task_id]

    async def test_sdk_sees_documented_errors(self, sim: Simulator, files: FileServer) -> None:
        def submit() -> Any:
            return BaseAsyncApi.async_call(
                model="emo-v1",
                input={
                    "image_url": files.add("face.png", portrait()),
                    "audio_url": files.add("voice.wav", wav(1.0)),
                    "face_bbox": [298, 250, 502, 485],
                    "ext_bbox": [165, 132, 635, 602],
                },
                task_group="aigc",
                task="image2video",
                function="video-synthesis",
                api_key=sim.api_key,
                style_level="furious",
            )

        response = await anyio.to_thread.run_sync(submit)
        assert response.status_code == 400
        assert response.code == "InvalidParameter"
        assert response.message == "The style_level is invalid."
