"""The examples of examples/ work against the simulator.

The FastAPI app runs in this test's event loop through httpx's ASGI transport (its lifespan
entered by hand, as a server would); the folder script runs as a subprocess with
``DASHSCOPE_API_KEY`` / ``DASHSCOPE_HTTP_BASE_URL`` pointing at the simulator.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import httpx
import pytest

from emo_async import PollPolicy
from emo_async._samples import make_portrait, make_voice_wav
from emo_async.simulator import Simulator, SimulatorConfig

pytestmark = pytest.mark.anyio

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered first, as an import would: pydantic resolves the annotations through it.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
async def fast_sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimulatorConfig(time_scale=0.01)) as sim:
        yield sim


class TestFastAPIApp:
    """examples/fastapi_app.py: one shared client, jobs in the background, videos served."""

    @pytest.fixture
    async def api(
        self, fast_sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> AsyncIterator[httpx.AsyncClient]:
        monkeypatch.setenv("DASHSCOPE_API_KEY", fast_sim.api_key)
        monkeypatch.setenv("DASHSCOPE_HTTP_BASE_URL", fast_sim.base_url)
        module = _load("fastapi_app")
        app = module.create_app(tmp_path / "jobs", poll=PollPolicy(target_delay=0.2))
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://app") as http,
        ):
            yield http

    async def _wait(self, api: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
        with anyio.fail_after(60):
            while True:
                answer = await api.get(f"/jobs/{job_id}")
                assert answer.status_code == 200
                view: dict[str, Any] = answer.json()
                if view["state"] not in ("queued", "running"):
                    return view
                await anyio.sleep(0.05)

    async def test_posted_jobs_become_the_servers_videos(
        self, api: httpx.AsyncClient, fast_sim: Simulator, tmp_path: Path
    ) -> None:
        """Two jobs posted at once are each billed once and served byte-exact."""
        portrait = make_portrait(tmp_path / "me.png", seed=1)
        ids = []
        for n in range(2):
            voice = make_voice_wav(tmp_path / f"hello{n}.wav", 1.0 + n / 2, seed=n)
            files = {
                "portrait": ("me.png", portrait.read_bytes(), "image/png"),
                "voice": (voice.name, voice.read_bytes(), "audio/wav"),
            }
            answer = await api.post("/jobs", files=files, data={"style_level": "calm"})
            assert answer.status_code == 202, answer.text
            assert answer.json()["state"] == "queued"
            ids.append(answer.json()["id"])
        for job_id in ids:
            view = await self._wait(api, job_id)
            assert view["state"] == "done", view
            video = await api.get(f"/jobs/{job_id}/video")
            assert video.status_code == 200
            assert video.headers["content-type"] == "video/mp4"
            assert video.content == fast_sim.result_bytes(view["task_id"])
            assert fast_sim.ledger.task_inputs(view["task_id"]).style_level == "calm"
        assert len(fast_sim.ledger.tasks_created) == 2
        assert fast_sim.ledger.duplicate_tasks() == {}
        # One client for the whole app: the portrait went up once per model, not per job.
        assert fast_sim.ledger.count("upload") == 2 + 2

    async def test_a_bad_voice_is_rejected_without_a_task(
        self, api: httpx.AsyncClient, fast_sim: Simulator, tmp_path: Path
    ) -> None:
        """A file that is no recording ends ``rejected``; nothing is submitted."""
        portrait = make_portrait(tmp_path / "me.png", seed=2)
        files = {
            "portrait": ("me.png", portrait.read_bytes(), "image/png"),
            "voice": ("voice.wav", b"RIFF but not really a wave file", "audio/wav"),
        }
        answer = await api.post("/jobs", files=files)
        assert answer.status_code == 202
        view = await self._wait(api, answer.json()["id"])
        assert view["state"] == "rejected"
        assert "audio" in view["error"]
        video = await api.get(f"/jobs/{view['id']}/video")
        assert video.status_code == 409
        assert fast_sim.ledger.tasks_created == []

    async def test_wrong_suffix_unknown_job(self, api: httpx.AsyncClient) -> None:
        """A voice that is not wav/mp3 is refused at once; an unknown job is a 404."""
        files = {"portrait": ("me.png", b"x", "image/png"), "voice": ("a.ogg", b"x", "audio/ogg")}
        answer = await api.post("/jobs", files=files)
        assert answer.status_code == 422
        assert (await api.get("/jobs/nope")).status_code == 404
        assert (await api.get("/jobs/nope/video")).status_code == 404


class TestFolderScript:
    """examples/folder.py: a folder of clips, one portrait, a batch into an output folder."""

    async def _run(self, sim: Simulator, *args: str | Path) -> tuple[int, str, str]:
        env = {
            **os.environ,
            "DASHSCOPE_API_KEY": sim.api_key,
            "DASHSCOPE_HTTP_BASE_URL": sim.base_url,
        }
        command = [sys.executable, str(EXAMPLES / "folder.py"), *map(str, args)]
        with anyio.fail_after(90):
            proc = await anyio.run_process(command, env=env, check=False)
        return proc.returncode, proc.stdout.decode(), proc.stderr.decode()

    async def test_every_clip_becomes_a_video_and_a_rerun_pays_nothing(
        self, fast_sim: Simulator, tmp_path: Path
    ) -> None:
        """Three clips, three videos, one summary; run again, everything is skipped."""
        voices = tmp_path / "voices"
        voices.mkdir()
        for n, seconds in enumerate((0.8, 1.2, 1.6)):
            make_voice_wav(voices / f"clip-{n}.wav", seconds, seed=n)
        (voices / "notes.txt").write_text("not a clip")
        portrait = make_portrait(tmp_path / "presenter.png", seed=3)
        out = tmp_path / "videos"

        code, stdout, stderr = await self._run(
            fast_sim, voices, portrait, out, "--poll-delay", "0.2"
        )
        assert code == 0, stderr
        assert "3 clips: 3 done; 0 from an earlier run" in stdout
        for n in range(3):
            assert f"clip-{n}: done" in stdout
        videos = sorted(p.name for p in out.glob("*.mp4"))
        assert videos == ["clip-0.mp4", "clip-1.mp4", "clip-2.mp4"]
        assert len(fast_sim.ledger.tasks_created) == 3
        saved = {p.read_bytes() for p in out.glob("*.mp4")}
        assert saved == {fast_sim.result_bytes(t.task_id) for t in fast_sim.ledger.tasks_created}

        code, stdout, _ = await self._run(fast_sim, voices, portrait, out, "--poll-delay", "0.2")
        assert code == 0
        assert "3 clips: 3 done; 3 from an earlier run" in stdout
        assert len(fast_sim.ledger.tasks_created) == 3

    async def test_an_empty_folder_is_a_usage_error(
        self, fast_sim: Simulator, tmp_path: Path
    ) -> None:
        """No clips: exit 2 and a message, no request."""
        portrait = make_portrait(tmp_path / "presenter.png", seed=3)
        code, _, stderr = await self._run(fast_sim, tmp_path, portrait, tmp_path / "out")
        assert code == 2
        assert "no .wav or .mp3 files" in stderr
        assert fast_sim.ledger.requests == []
