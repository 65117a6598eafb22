"""Real MP4 results from the simulator (``SimulatorConfig(real_video=True)``, needs PyAV)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from emo_async import Client, PollPolicy
from emo_async._samples import make_portrait, make_voice_wav
from emo_async.simulator import FaultConfig, Simulator, SimulatorConfig
from emo_async.simulator._media import expand_box, sniff_image
from emo_async.simulator._video import VideoInputs, render_mp4

av: Any = pytest.importorskip("av")

pytestmark = pytest.mark.anyio

FAST_POLL = PollPolicy(target_delay=0.1, prior_base=0.0, prior_per_audio_second=0.0)


def _probe(data: bytes) -> dict[str, Any]:
    with av.open(io.BytesIO(data), "r") as container:
        video = container.streams.video[0]
        audio = container.streams.audio
        frames = sum(1 for _ in container.decode(video=0))
        return {
            "width": video.width,
            "height": video.height,
            "codec": video.codec_context.name,
            "pix_fmt": video.codec_context.pix_fmt,
            "duration": container.duration / 1_000_000,
            "audio": [a.codec_context.name for a in audio],
            "frames": frames,
            "fps": float(video.average_rate),
        }


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path]:
    image = make_portrait(tmp_path / "face.png", seed=7)
    voice = make_voice_wav(tmp_path / "voice.wav", 2.0, seed=2)
    return image, voice


class TestRenderMp4:
    """render_mp4 makes a decodable, deterministic clip of the right shape."""

    @pytest.mark.parametrize(("ratio", "size"), [("1:1", (512, 512)), ("3:4", (512, 704))])
    def test_decodes_with_size_duration_and_sound(
        self, inputs: tuple[Path, Path], ratio: str, size: tuple[int, int]
    ) -> None:
        image, voice = inputs
        info = sniff_image(image.read_bytes())
        assert info is not None
        assert info.face is not None
        ext = expand_box(info.face, info.width, info.height, ratio)
        assert ext is not None
        clip = VideoInputs(image.read_bytes(), voice.read_bytes(), info.face, ext, ratio, 3.0)
        data = render_mp4(clip)
        probe = _probe(data)
        assert (probe["width"], probe["height"]) == size
        assert probe["pix_fmt"] == "yuv420p"
        assert probe["codec"] in ("h264", "mpeg4")
        assert probe["audio"] == ["aac"]
        assert probe["duration"] == pytest.approx(2.0, abs=0.2)
        assert probe["frames"] == pytest.approx(2.0 * probe["fps"], abs=2)

    def test_same_inputs_same_bytes_other_generation_other_bytes(
        self, inputs: tuple[Path, Path]
    ) -> None:
        image, voice = inputs
        clip = VideoInputs(
            image.read_bytes(), voice.read_bytes(), (140, 80, 372, 370), (0, 0, 512, 512), "1:1", 2
        )
        assert render_mp4(clip) == render_mp4(clip)
        assert render_mp4(clip, generation=1) != render_mp4(clip)

    def test_undecodable_inputs_still_give_a_clip(self) -> None:
        clip = VideoInputs(
            b"not an image", b"not audio", (0, 0, 10, 10), (0, 0, 512, 704), "3:4", 1
        )
        probe = _probe(render_mp4(clip))
        assert (probe["width"], probe["height"]) == (512, 704)
        assert probe["duration"] == pytest.approx(1.0, abs=0.2)


class TestSimulatorRealVideo:
    """A task of a real-video simulator downloads as a playable MP4 of its inputs."""

    async def test_downloaded_result_decodes(
        self, inputs: tuple[Path, Path], tmp_path: Path
    ) -> None:
        image, voice = inputs
        config = SimulatorConfig(time_scale=0.005, real_video=True)
        async with (
            Simulator(config) as sim,
            Client(sim.api_key, base_url=sim.base_url, poll=FAST_POLL) as client,
        ):
            outcome = await client.generate(image, voice, tmp_path / "out" / "me.mp4", ratio="3:4")
            assert outcome.ok, outcome.error
            assert outcome.path is not None
            assert outcome.task_id is not None
            data = outcome.path.read_bytes()
            assert sim.result_bytes(outcome.task_id) == data
        probe = _probe(data)
        assert (probe["width"], probe["height"]) == (512, 704)
        assert probe["audio"] == ["aac"]
        assert probe["duration"] == pytest.approx(2.0, abs=0.2)

    async def test_broken_streams_resume_to_the_same_bytes(
        self, inputs: tuple[Path, Path], tmp_path: Path
    ) -> None:
        image, voice = inputs
        config = SimulatorConfig(
            time_scale=0.005,
            real_video=True,
            faults=FaultConfig(seed=3, truncate_rate=0.5),
        )
        async with (
            Simulator(config) as sim,
            Client(sim.api_key, base_url=sim.base_url, poll=FAST_POLL) as client,
        ):
            outcome = await client.generate(image, voice, tmp_path / "clip.mp4")
            assert outcome.ok, outcome.error
            assert outcome.path is not None
            assert outcome.task_id is not None
            assert outcome.path.read_bytes() == sim.result_bytes(outcome.task_id)
            assert any(r.fault == "truncate" for r in sim.ledger.requests)
        assert _probe(outcome.path.read_bytes())["width"] == 512
