"""The simulator's billing-bug knobs and ledger facts, over real loopback HTTP.

Lost and coded submits, a list that ignores ``page_no``, another program on the same key,
the inputs each task was made from, and the list's epochs under ``list_time_shift``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anyio
import attrs
import pytest
from _media_fixtures import FIXED, SUBMIT_PATH, Api, FileServer, job, portrait, wav

from emo_async.simulator import SIM_KEY, FaultConfig, Simulator, create_app
from emo_async.simulator._video import av_available

pytestmark = pytest.mark.anyio

TZ8 = _dt.timezone(_dt.timedelta(hours=8))


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
def api(sim: Simulator, session: aiohttp.ClientSession) -> Api:
    return Api(session, sim.base_url, sim.api_key)


async def _raw_submit(sim: Simulator, body: dict[str, Any]) -> None:
    """A submit on a fresh connection, expected to get no answer at all."""
    async with aiohttp.ClientSession() as fresh:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await fresh.post(
                sim.base_url + SUBMIT_PATH,
                json=body,
                headers={"Authorization": f"Bearer {sim.api_key}", "X-DashScope-Async": "enable"},
            )


async def _list(api: Api, **params: str) -> dict[str, Any]:
    status, body, _ = await api.call("GET", "/tasks", params=params)
    assert status == 200, body
    return body


async def _download(session: aiohttp.ClientSession, url: str) -> bytes:
    async with session.get(url) as resp:
        assert resp.status == 200
        return await resp.read()


class TestLostBeforeSubmit:
    """``lost_before_submit_rate`` drops a submit before any task exists."""

    async def test_no_answer_and_no_task(self, sim: Simulator, api: Api, files: FileServer) -> None:
        sim.set_faults(FaultConfig(lost_before_submit_rate=1.0))
        await _raw_submit(sim, job(files.add("i.png", portrait()), files.add("a.wav", wav())))
        assert sim.ledger.tasks_created == []
        assert list(sim.tasks) == []
        record = sim.ledger.requests[-1]
        assert (record.endpoint, record.status, record.fault) == ("submit", None, "lost")
        sim.set_faults(FaultConfig())
        assert (await _list(api))["total"] == 0

    async def test_it_wins_over_an_ambiguous_submit(
        self, sim: Simulator, files: FileServer
    ) -> None:
        # Both knobs at 1: the answer is lost before creation, so the ambiguous one never runs.
        sim.set_faults(FaultConfig(lost_before_submit_rate=1.0, ambiguous_submit_rate=1.0))
        await _raw_submit(sim, job(files.add("i.png", portrait()), files.add("a.wav", wav())))
        assert sim.ledger.tasks_created == []
        assert sim.ledger.requests[-1].fault == "lost"

    async def test_seeded_mix_creates_a_task_per_answered_submit(self, files: FileServer) -> None:
        faults = FaultConfig(seed=3, lost_before_submit_rate=0.5)
        config = attrs.evolve(FIXED, submit_qps=None, faults=faults)
        body = job(files.add("i.png", portrait()), files.add("a.wav", wav()))
        answered = 0
        async with Simulator(config) as sim:
            for _ in range(8):
                async with aiohttp.ClientSession() as fresh:
                    try:
                        async with fresh.post(
                            sim.base_url + SUBMIT_PATH,
                            json=body,
                            headers={
                                "Authorization": f"Bearer {sim.api_key}",
                                "X-DashScope-Async": "enable",
                            },
                        ) as resp:
                            assert resp.status == 200
                            answered += 1
                    except aiohttp.ServerDisconnectedError:
                        pass
            lost = sum(1 for r in sim.ledger.requests if r.fault == "lost")
            assert 0 < answered < 8
            assert lost == 8 - answered
            assert len(sim.ledger.tasks_created) == answered


class TestSubmitCode:
    """``submit_code_rate`` adds a top-level ``code`` to a successful submit answer."""

    @pytest.mark.parametrize("code", ["Success", 0])
    async def test_success_answer_with_a_code(
        self, sim: Simulator, api: Api, files: FileServer, code: str | int
    ) -> None:
        sim.set_faults(FaultConfig(submit_code_rate=1.0, submit_code=code))
        status, body = await api.submit(
            job(files.add("i.png", portrait()), files.add("a.wav", wav()))
        )
        assert status == 200
        assert body["code"] == code
        assert type(body["code"]) is type(code)
        assert body["message"] == "Success"
        task_id = body["output"]["task_id"]
        assert body["output"]["task_status"] == "PENDING"
        assert [t.task_id for t in sim.ledger.tasks_created] == [task_id]
        assert sim.ledger.requests[-1].fault == "submit_code"
        sim.clock.advance(10.0)
        assert (await api.task(task_id))["output"]["task_status"] == "SUCCEEDED"

    async def test_off_by_default(self, api: Api, files: FileServer) -> None:
        _, body = await api.submit(job(files.add("i.png", portrait()), files.add("a.wav", wav())))
        assert "code" not in body
        assert "message" not in body

    @pytest.mark.parametrize("bad", [True, 1.5, None])
    def test_code_must_be_str_or_int(self, bad: object) -> None:
        with pytest.raises(TypeError):
            FaultConfig(submit_code=bad)  # type: ignore[arg-type]


class TestListIgnoresPageNo:
    """``list_ignores_page_no`` serves page 1 for every ``page_no`` and no ``total_page``."""

    async def test_every_page_is_the_first(self, sim: Simulator, api: Api) -> None:
        ids = [sim.create_foreign_task(2.0) for _ in range(3)]
        normal = await _list(api, page_no="2", page_size="2")
        assert [d["task_id"] for d in normal["data"]] == [ids[0]]
        assert normal["total_page"] == 2

        sim.set_faults(FaultConfig(list_ignores_page_no=True))
        first = await _list(api, page_no="1", page_size="2")
        second = await _list(api, page_no="2", page_size="2")
        far = await _list(api, page_no="50", page_size="2")
        assert [d["task_id"] for d in first["data"]] == [ids[2], ids[1]]
        assert second["data"] == first["data"]
        assert far["data"] == first["data"]
        assert (second["page_no"], far["page_no"]) == (2, 50)
        assert second["total"] == 3
        assert "total_page" not in first
        assert "total_page" not in second


class TestOtherProgram:
    """Another program on the same account and key: billed tasks the client never made."""

    async def test_on_demand_foreign_task_is_billed_like_any_other(
        self, sim: Simulator, api: Api, session: aiohttp.ClientSession, files: FileServer
    ) -> None:
        status, out = await api.submit(
            job(files.add("i.png", portrait()), files.add("a.wav", wav(3.0)))
        )
        assert status == 200
        own = out["output"]["task_id"]
        foreign = sim.create_foreign_task(audio_seconds=3.9)
        assert sim.ledger.foreign_tasks == {foreign}
        assert own not in sim.ledger.foreign_tasks
        assert [(t.task_id, t.foreign) for t in sim.ledger.tasks_created] == [
            (own, False),
            (foreign, True),
        ]
        listed = {d["task_id"]: d for d in (await _list(api))["data"]}
        assert set(listed) == {own, foreign}
        assert listed[foreign]["api_key_id"] == listed[own]["api_key_id"]
        assert listed[foreign]["model_name"] == "emo-v1"
        assert sim.ledger.task_inputs(foreign).api_key_id == listed[own]["api_key_id"]

        sim.clock.advance(10.0)
        body = await api.task(foreign)
        assert body["output"]["task_status"] == "SUCCEEDED"
        assert body["usage"]["video_duration"] == 3.9
        assert (await api.task(own))["usage"]["video_duration"] == 3.0
        video = await _download(session, body["output"]["results"]["video_url"])
        assert video == sim.result_bytes(foreign) != sim.result_bytes(own)

    async def test_interval_creates_tasks_until_switched_off(
        self, sim: Simulator, api: Api
    ) -> None:
        started = time.monotonic()
        sim.set_faults(FaultConfig(seed=5, other_program_interval=0.1))
        await anyio.sleep(0.35)
        foreign = set(sim.ledger.foreign_tasks)
        body = await _list(api, page_size="100")
        elapsed = time.monotonic() - started
        listed = {d["task_id"] for d in body["data"]}
        # Made at exact multiples of the interval, so the count follows elapsed time.
        assert 3 <= len(foreign) <= len(listed) <= math.floor(elapsed / 0.1)
        assert foreign <= listed <= sim.ledger.foreign_tasks
        assert len({d["api_key_id"] for d in body["data"]}) == 1
        durations = [sim.ledger.task_inputs(t).audio_duration for t in foreign]
        assert all(2.0 <= d <= 8.0 for d in durations)
        assert len(set(durations)) > 1

        sim.set_faults(FaultConfig())
        stopped = len(sim.ledger.foreign_tasks)
        await anyio.sleep(0.25)
        assert (await _list(api, page_size="100"))["total"] == stopped
        sim.clock.advance(30.0)
        for task_id in foreign:
            answer = await api.task(task_id)
            assert answer["output"]["task_status"] == "SUCCEEDED"
            billed = sim.ledger.task_inputs(task_id).audio_duration
            assert answer["usage"]["video_duration"] == billed

    async def test_seeded_durations_repeat(self) -> None:
        async def durations() -> list[float]:
            async with Simulator(FIXED) as sim:
                sim.set_faults(FaultConfig(seed=8))
                ids = [sim.create_foreign_task() for _ in range(4)]
                return [sim.ledger.task_inputs(t).audio_duration for t in ids]

        assert await durations() == await durations()

    async def test_configured_at_start_and_cleared_by_reset(self) -> None:
        faults = FaultConfig(other_program_interval=0.05)
        async with Simulator(attrs.evolve(FIXED, faults=faults)) as sim:
            await anyio.sleep(0.2)
            assert len(sim.ledger.foreign_tasks) >= 3
            sim.ledger.reset()
            assert sim.ledger.foreign_tasks == set()

    async def test_requests_alone_bring_them_in(self) -> None:
        """Served by ``create_app`` (no ``Simulator`` to ask), a request makes the due tasks."""
        from aiohttp.test_utils import TestServer

        faults = FaultConfig(other_program_interval=0.05)
        app = create_app(attrs.evolve(FIXED, faults=faults))
        async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as client:
            await anyio.sleep(0.2)
            body = await _list(Api(client, str(server.make_url("/api/v1")), "sk-simulator"))
            assert body["total"] >= 3
            assert {d["task_id"] for d in body["data"]} <= app[SIM_KEY].ledger.foreign_tasks

    @pytest.mark.parametrize("seconds", [0.0, -1.0, 60.0, math.nan])
    async def test_bad_audio_seconds(self, sim: Simulator, seconds: float) -> None:
        with pytest.raises(ValueError, match="audio_seconds"):
            sim.create_foreign_task(seconds)

    @pytest.mark.parametrize("interval", [0.0, -1.0, math.inf])
    def test_bad_interval(self, interval: float) -> None:
        with pytest.raises(ValueError, match="other_program_interval"):
            FaultConfig(other_program_interval=interval)


class TestTaskInputs:
    """The ledger proves which inputs each task was made from; every video is its own."""

    async def test_inputs_and_videos_per_task(
        self, sim: Simulator, api: Api, session: aiohttp.ClientSession, files: FileServer
    ) -> None:
        image_a, image_b = portrait(), portrait(shade=30)
        audio_a, audio_b = wav(3.0), wav(2.0)
        urls = {
            "a": (files.add("a.png", image_a), files.add("a.wav", audio_a)),
            "b": (files.add("b.png", image_b), files.add("b.wav", audio_b)),
            "a-again": (files.add("a2.png", image_a), files.add("a2.wav", audio_a)),
        }
        ids = {}
        for name, (image, audio) in urls.items():
            status, out = await api.submit(job(image, audio))
            assert status == 200, out
            ids[name] = out["output"]["task_id"]
        key_id = (await _list(api))["data"][0]["api_key_id"]
        for name, (image, audio) in urls.items():
            inputs = sim.ledger.task_inputs(ids[name])
            assert (inputs.image_url, inputs.audio_url) == (image, audio)
            assert inputs.api_key_id == key_id
            assert inputs.style_level == "normal"
        a, b = sim.ledger.task_inputs(ids["a"]), sim.ledger.task_inputs(ids["b"])
        assert (a.audio_duration, b.audio_duration) == (3.0, 2.0)
        assert a.image_sha256 == hashlib.sha256(image_a).hexdigest()
        assert b.audio_sha256 == hashlib.sha256(audio_b).hexdigest()
        assert sim.ledger.task(ids["a"]).inputs == a

        sim.clock.advance(10.0)
        videos = {}
        for name, task_id in ids.items():
            url = (await api.task(task_id))["output"]["results"]["video_url"]
            videos[name] = await _download(session, url)
            assert videos[name] == sim.result_bytes(task_id)
        # Same inputs, two tasks: still two different files.
        assert len(set(videos.values())) == 3
        with pytest.raises(KeyError):
            sim.ledger.task_inputs("no-such-task")

    async def test_api_key_id_is_the_submitting_key(self, files: FileServer) -> None:
        config = attrs.evolve(FIXED, api_keys={"sk-one", "sk-two"})
        async with Simulator(config) as sim, aiohttp.ClientSession() as session:
            body = job(files.add("i.png", portrait()), files.add("a.wav", wav()))
            ids = {}
            for key in ("sk-one", "sk-two"):
                status, out = await Api(session, sim.base_url, key).submit(body)
                assert status == 200
                ids[key] = out["output"]["task_id"]
            listed = await _list(Api(session, sim.base_url, "sk-one"))
            by_id = {d["task_id"]: d["api_key_id"] for d in listed["data"]}
            for task_id in ids.values():
                assert sim.ledger.task_inputs(task_id).api_key_id == by_id[task_id]
            assert by_id[ids["sk-one"]] != by_id[ids["sk-two"]]

    @pytest.mark.skipif(not av_available(), reason="needs PyAV")
    async def test_real_videos_of_the_same_inputs_differ(self, files: FileServer) -> None:
        config = attrs.evolve(FIXED, real_video=True)
        async with Simulator(config) as sim, aiohttp.ClientSession() as session:
            api = Api(session, sim.base_url, sim.api_key)
            body = job(files.add("i.png", portrait()), files.add("a.wav", wav(1.0)))
            ids = []
            for _ in range(2):
                status, out = await api.submit(body)
                assert status == 200
                ids.append(out["output"]["task_id"])
            sim.clock.advance(10.0)
            data = []
            for task_id in ids:
                url = (await api.task(task_id))["output"]["results"]["video_url"]
                data.append(await _download(session, url))
            assert data[0] != data[1]
            assert ids[0].encode() in data[0]
            assert ids[1].encode() in data[1]


class TestListEpochs:
    """``gmt_create`` is epoch milliseconds; ``list_time_shift`` moves only the filter."""

    async def test_shift_moves_the_filter_not_the_epochs(
        self, sim: Simulator, api: Api, files: FileServer
    ) -> None:
        before = time.time()
        status, out = await api.submit(
            job(files.add("i.png", portrait()), files.add("a.wav", wav()))
        )
        assert status == 200
        task_id = out["output"]["task_id"]
        item = (await _list(api))["data"][0]
        assert item["task_id"] == task_id
        gmt_create = item["gmt_create"]
        assert isinstance(gmt_create, int)
        assert before - 1 <= gmt_create / 1000 <= time.time() + 1
        created = _dt.datetime.fromtimestamp(gmt_create / 1000, TZ8)

        def window(shift: float) -> dict[str, str]:
            fmt = "%Y%m%d%H%M%S"
            low = created - _dt.timedelta(seconds=5 - shift)
            high = created + _dt.timedelta(seconds=5 + shift)
            return {"start_time": low.strftime(fmt), "end_time": high.strftime(fmt)}

        assert [d["task_id"] for d in (await _list(api, **window(0)))["data"]] == [task_id]
        sim.set_faults(FaultConfig(list_time_shift=8 * 3600))
        assert (await _list(api, **window(0)))["total"] == 0
        # Asked 8 hours early, the shifted filter lands on the task again...
        shifted = await _list(api, **window(-8 * 3600))
        assert [d["task_id"] for d in shifted["data"]] == [task_id]
        # ...and the item's epochs are the true ones, unshifted.
        assert shifted["data"][0]["gmt_create"] == gmt_create
        sim.clock.advance(10.0)
        done = (await _list(api, **window(-8 * 3600)))["data"][0]
        assert done["gmt_create"] == gmt_create
        assert done["start_time"] == gmt_create  # a free slot: it started at once
        assert done["end_time"] - done["start_time"] == 10_000  # FIXED: 10 s of processing
