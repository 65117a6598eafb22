"""The official SDK's 2.x client (``dashscope.AsyncClient``) drives the simulator end to end.

2.x has no EMO resource: its video resource submits to the wan path
(``aigc/video-generation/video-synthesis``). Its generic async-task helper, ``AsyncJobs``, is
what a 2.x user points at the EMO service, so that is what these tests drive. Only the client's
constructor knows about the simulator: an explicit ``base_url`` replaces the per-workspace
gateway host, and ``workspace`` still rides along as ``X-DashScope-WorkSpace``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from _media_fixtures import FileServer, portrait, wav

from emo_async.simulator import FaultConfig, Simulator, SimulatorConfig

pytest.importorskip("dashscope.v2")
from dashscope.v2 import AsyncClient
from dashscope.v2.errors import APIConnectionError, DashScopeError
from dashscope.v2.resources._jobs import AsyncJobs

pytestmark = pytest.mark.anyio

WORKSPACE = "ws-emo-sim"
EMO_SERVICE = "aigc/image2video/video-synthesis"


@pytest.fixture
def sdk_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Arguments win over the environment, but what a test leaves unset (retries, timeout)
    # comes from it or from ~/.dashscope/config.toml: a developer's settings must not steer it.
    for name in (
        "DASHSCOPE_API_KEY",
        "DASHSCOPE_BASE_URL",
        "DASHSCOPE_HTTP_BASE_URL",
        "DASHSCOPE_WORKSPACE",
        "DASHSCOPE_REGION",
        "DASHSCOPE_MAX_RETRIES",
        "DASHSCOPE_TIMEOUT",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DASHSCOPE_CONFIG", "/nonexistent/dashscope-config.toml")


def _client(sim: Simulator) -> AsyncClient:
    return AsyncClient(api_key=sim.api_key, base_url=sim.base_url, workspace=WORKSPACE)


@pytest.fixture
async def sim(sdk_env: None) -> AsyncIterator[Simulator]:
    # 1 real ms per simulated second: a 3 s clip finishes in ~20 ms. The workspace is
    # checked, so every API call must carry the header the 2.x client derives from it.
    config = SimulatorConfig(time_scale=0.001, workspace=WORKSPACE)
    async with Simulator(config) as simulator:
        yield simulator


async def _detect(client: AsyncClient, image_url: str) -> dict[str, Any]:
    # 2.x has no face-detect resource either; its transport is the client's own HTTP path.
    response = await client.transport.request(
        "POST",
        "/services/aigc/image2video/face-detect",
        json={
            "model": "emo-detect-v1",
            "input": {"image_url": image_url},
            "parameters": {"ratio": "1:1"},
        },
    )
    assert response.status_code == 200, response.text
    output: dict[str, Any] = response.json()["output"]
    assert output["check_pass"] is True
    return output


def _emo_input(files: FileServer, seconds: float, boxes: dict[str, Any]) -> dict[str, Any]:
    return {
        "image_url": files.add("face.png", portrait()),
        "audio_url": files.add("voice.wav", wav(seconds)),
        "face_bbox": boxes["face_bbox"],
        "ext_bbox": boxes["ext_bbox"],
    }


class TestDashscopeV2Jobs:
    """2.x's async jobs client submits, polls and reads the video URL as 1.x does."""

    async def test_create_wait_and_download(self, sim: Simulator, files: FileServer) -> None:
        async with _client(sim) as client:
            image_url = files.add("face.png", portrait())
            boxes = await _detect(client, image_url)
            jobs = AsyncJobs(client, EMO_SERVICE, "aigc")
            job = await jobs.create(
                model="emo-v1",
                input={
                    "image_url": image_url,
                    "audio_url": files.add("voice.wav", wav(3.0)),
                    "face_bbox": boxes["face_bbox"],
                    "ext_bbox": boxes["ext_bbox"],
                },
                parameters={"style_level": "normal"},
            )
            assert job.status == "PENDING"
            assert job.task_id
            done = await jobs.wait(job, poll_interval=0.02, max_interval=0.1, timeout=30)

        assert done.succeeded
        assert done.task_id == job.task_id
        assert done.usage is not None
        assert done.usage.model_dump()["video_duration"] == 3.0
        assert done.finished_at is not None
        # EMO answers output.results.video_url; 2.x's typed ``video_url`` view reads
        # output.video_url (the wan shape), so the raw output is where the URL is.
        assert done.output is not None
        video_url = done.output["results"]["video_url"]

        async with aiohttp.ClientSession() as session, session.get(video_url) as resp:
            assert resp.status == 200
            assert await resp.read() == sim.result_bytes(job.task_id)
        assert [t.task_id for t in sim.ledger.tasks_created] == [job.task_id]
        assert sim.ledger.count("submit") == 1
        assert sim.ledger.count("task_get") >= 1
        # Every API call passed the key and the workspace check; nothing was refused.
        assert sim.ledger.count(status=200) == len(sim.ledger.requests)
        assert sim.ledger.auth_leaks() == []

    async def test_documented_error_is_raised_with_its_code(
        self, sim: Simulator, files: FileServer
    ) -> None:
        async with _client(sim) as client:
            jobs = AsyncJobs(client, EMO_SERVICE, "aigc")
            with pytest.raises(DashScopeError) as caught:
                await jobs.create(
                    model="emo-v1",
                    input=_emo_input(
                        files,
                        1.0,
                        {"face_bbox": [298, 250, 502, 485], "ext_bbox": [165, 132, 635, 602]},
                    ),
                    parameters={"style_level": "furious"},
                )
        assert caught.value.status_code == 400
        assert caught.value.code == "InvalidParameter"
        assert caught.value.message == "The style_level is invalid."
        assert sim.ledger.tasks_created == []

    async def test_list_counts_the_task_but_reads_no_items(
        self, sim: Simulator, files: FileServer
    ) -> None:
        async with _client(sim) as client:
            boxes = await _detect(client, files.add("face.png", portrait()))
            jobs = AsyncJobs(client, EMO_SERVICE, "aigc")
            job = await jobs.create(model="emo-v1", input=_emo_input(files, 1.0, boxes))
            listed = await jobs.list(model_name="emo-v1")
        # The documented list answers its items in ``data``; 2.x's JobList reads ``tasks``, so
        # a 2.x user sees the count and no items. The simulator keeps the documented shape.
        assert listed.total == 1
        assert listed.tasks == []
        assert sim.ledger.count("task_list", status=200) == 1
        assert [t.task_id for t in sim.ledger.tasks_created] == [job.task_id]

    async def test_without_the_workspace_the_gateway_refuses(self, sim: Simulator) -> None:
        async with AsyncClient(api_key=sim.api_key, base_url=sim.base_url) as client:
            jobs = AsyncJobs(client, EMO_SERVICE, "aigc")
            with pytest.raises(DashScopeError) as caught:
                await jobs.fetch("no-such-task")
        assert caught.value.status_code == 403
        assert caught.value.code == "Workspace.AccessDenied"


class TestDashscopeV2LostAnswer:
    """What 2.x does when the billed POST's answer never arrives."""

    async def test_transport_resubmits_and_bills_every_attempt(
        self, sim: Simulator, files: FileServer
    ) -> None:
        async with _client(sim) as client:
            boxes = await _detect(client, files.add("face.png", portrait()))
            emo_input = _emo_input(files, 2.0, boxes)
            sim.set_faults(FaultConfig(ambiguous_submit_rate=1.0))
            jobs = AsyncJobs(client, EMO_SERVICE, "aigc")
            # The default client: max_retries=2, no idempotency key on the POST.
            with pytest.raises(APIConnectionError):
                await jobs.create(model="emo-v1", input=emo_input)
        # Each attempt created a task whose answer was lost: one request, three videos billed.
        assert sim.ledger.count("submit") == 3
        assert len(sim.ledger.tasks_created) == 3
        assert [len(ids) for ids in sim.ledger.duplicate_tasks().values()] == [3]

    async def test_a_code_on_a_successful_submit_raises_though_the_task_exists(
        self, sim: Simulator, files: FileServer
    ) -> None:
        async with _client(sim) as client:
            boxes = await _detect(client, files.add("face.png", portrait()))
            sim.set_faults(FaultConfig(submit_code_rate=1.0))
            jobs = AsyncJobs(client, EMO_SERVICE, "aigc")
            with pytest.raises(DashScopeError) as caught:
                await jobs.create(model="emo-v1", input=_emo_input(files, 1.0, boxes))
        # 2.x treats any top-level ``code`` on a 200 as a business failure; the billed task's
        # id survives only in the exception's body.
        assert caught.value.code == "Success"
        [created] = sim.ledger.tasks_created
        assert caught.value.body["output"]["task_id"] == created.task_id
