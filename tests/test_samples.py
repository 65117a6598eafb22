from __future__ import annotations

import hashlib
import wave
from array import array
from pathlib import Path
from typing import Any

import pytest
from mutagen.mp3 import MP3
from PIL import Image

from emo_async._media import check_audio, check_image, probe_audio, probe_image
from emo_async._models import Job
from emo_async._samples import (
    TRIGGER_KEY,
    make_portrait,
    make_sample_set,
    make_silent_mp3,
    make_voice_wav,
)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class TestMakePortrait:
    """make_portrait draws a deterministic cartoon person in the asked format and size."""

    @pytest.mark.parametrize(
        ("suffix", "pil"),
        [("png", "PNG"), ("jpg", "JPEG"), ("jpeg", "JPEG"), ("bmp", "BMP"), ("webp", "WEBP")],
    )
    def test_format_from_suffix(self, tmp_path: Path, suffix: str, pil: str) -> None:
        path = make_portrait(tmp_path / f"p.{suffix}", size=(410, 520))
        with Image.open(path) as im:
            assert (im.format, im.size) == (pil, (410, 520))

    def test_explicit_format_wins_over_suffix(self, tmp_path: Path) -> None:
        path = make_portrait(tmp_path / "p.jpg", fmt="png")
        assert path.read_bytes().startswith(b"\x89PNG")

    def test_unknown_format_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="unknown image format"):
            make_portrait(tmp_path / "p.gif")

    def test_same_seed_same_bytes(self, tmp_path: Path) -> None:
        a = make_portrait(tmp_path / "a.png", seed=7)
        b = make_portrait(tmp_path / "b.png", seed=7)
        c = make_portrait(tmp_path / "c.png", seed=8)
        assert sha(a) == sha(b) != sha(c)

    def test_draws_a_person_over_the_background(self, tmp_path: Path) -> None:
        person = make_portrait(tmp_path / "p.png", seed=3)
        empty = make_portrait(tmp_path / "e.png", seed=3, people=0)
        with Image.open(person) as p, Image.open(empty) as e:
            # Face at the upper middle, body at the bottom middle; corners are background.
            for xy in [(256, 230), (256, 600)]:
                assert p.getpixel(xy) != e.getpixel(xy)
            assert p.getpixel((2, 2)) == e.getpixel((2, 2))
            colours = p.getcolors(maxcolors=1 << 16)
            assert colours is not None
            assert len(colours) > 10

    def test_several_people(self, tmp_path: Path) -> None:
        one = make_portrait(tmp_path / "one.png", size=(1200, 600), people=1)
        three = make_portrait(tmp_path / "three.png", size=(1200, 600), people=3)
        with Image.open(one) as a, Image.open(three) as b:
            # With three people, the left and right thirds hold bodies too.
            assert a.getpixel((200, 590)) != b.getpixel((200, 590))
            assert a.getpixel((1000, 590)) != b.getpixel((1000, 590))

    def test_trigger_is_a_png_text_chunk(self, tmp_path: Path) -> None:
        path = make_portrait(tmp_path / "t.png", trigger="InvalidFile.Content:none")
        with Image.open(path) as im:
            assert isinstance(im, Image.Image)
            assert im.info[TRIGGER_KEY] == "InvalidFile.Content:none"

    def test_trigger_needs_png(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="PNG"):
            make_portrait(tmp_path / "t.jpg", trigger="x")

    def test_default_portrait_passes_validation(self, tmp_path: Path) -> None:
        assert check_image(probe_image(make_portrait(tmp_path / "p.png"))) == []


class TestMakeVoiceWav:
    """make_voice_wav writes mono 16-bit voice-like audio of an exact length."""

    @pytest.mark.parametrize(("seconds", "rate"), [(1.0, 16000), (2.345, 8000), (0.01, 22050)])
    def test_exact_frame_count(self, tmp_path: Path, seconds: float, rate: int) -> None:
        path = make_voice_wav(tmp_path / "v.wav", seconds, sample_rate=rate)
        with wave.open(str(path)) as w:
            assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, rate)
            assert w.getnframes() == int(seconds * rate)

    def test_sounds_like_speech(self, tmp_path: Path) -> None:
        path = make_voice_wav(tmp_path / "v.wav", 6.0, sample_rate=8000)
        with wave.open(str(path)) as w:
            samples = array("h", w.readframes(w.getnframes()))
        window = 400  # 50 ms
        levels = [
            max(abs(s) for s in samples[i : i + window])
            for i in range(0, len(samples) - window, window)
        ]
        loud = sum(level > 8000 for level in levels)
        quiet = sum(level < 200 for level in levels)
        # Syllables and pauses both, and no clipping.
        assert loud > len(levels) // 4
        assert quiet > 2
        assert max(abs(s) for s in samples) < 32767

    def test_deterministic(self, tmp_path: Path) -> None:
        a = make_voice_wav(tmp_path / "a.wav", 1.0, seed=1)
        b = make_voice_wav(tmp_path / "b.wav", 1.0, seed=1)
        c = make_voice_wav(tmp_path / "c.wav", 1.0, seed=2)
        assert sha(a) == sha(b) != sha(c)

    def test_passes_validation(self, tmp_path: Path) -> None:
        info = probe_audio(make_voice_wav(tmp_path / "v.wav", 3.0))
        assert info.duration == pytest.approx(3.0)
        assert check_audio(info) == []


class TestMakeSilentMp3:
    """make_silent_mp3 writes a valid MPEG-1 Layer III stream of about the asked duration."""

    @pytest.mark.parametrize("seconds", [0.5, 4.0, 59.9])
    def test_mutagen_reads_the_duration(self, tmp_path: Path, seconds: float) -> None:
        path = make_silent_mp3(tmp_path / "s.mp3", seconds)
        info: Any = MP3(path).info  # type: ignore[no-untyped-call]
        assert info.length == pytest.approx(seconds, abs=0.03)
        assert (info.layer, info.sample_rate, info.bitrate) == (3, 44100, 128000)

    def test_frames_are_back_to_back(self, tmp_path: Path) -> None:
        data = make_silent_mp3(tmp_path / "s.mp3", 1.0).read_bytes()
        pos = frames = 0
        while pos < len(data):
            assert data[pos] == 0xFF
            assert data[pos + 1] == 0xFB
            pos += 417 + ((data[pos + 2] >> 1) & 1)
            frames += 1
        assert pos == len(data)
        assert frames == 1 + round(44100 / 1152)

    def test_bitrate_is_128k_on_average(self, tmp_path: Path) -> None:
        path = make_silent_mp3(tmp_path / "s.mp3", 30.0)
        frames = round(30.0 * 44100 / 1152) + 1
        assert path.stat().st_size == pytest.approx(frames * 144 * 128000 / 44100, abs=2)


class TestMakeSampleSet:
    """make_sample_set writes portraits and distinct WAVs and returns named jobs."""

    def test_jobs(self, tmp_path: Path) -> None:
        jobs = make_sample_set(tmp_path / "set", 12, portraits=3, seconds=(1.0, 2.0), seed=5)
        assert [j.name for j in jobs] == [f"clip-{i:04d}" for i in range(1, 13)]
        assert all(isinstance(j, Job) for j in jobs)
        assert len({j.image for j in jobs}) == 3
        assert jobs[0].image == jobs[3].image
        for job in jobs:
            assert isinstance(job.audio, Path)
            info = probe_audio(job.audio)
            assert 1.0 <= info.duration <= 2.0
            assert check_audio(info) == []
        assert len({sha(Path(j.audio)) for j in jobs}) == 12

    def test_deterministic(self, tmp_path: Path) -> None:
        a = make_sample_set(tmp_path / "a", 3, seed=1)
        b = make_sample_set(tmp_path / "b", 3, seed=1)
        assert [sha(Path(j.audio)) for j in a] == [sha(Path(j.audio)) for j in b]

    def test_bad_arguments(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="seconds"):
            make_sample_set(tmp_path, 1, seconds=(3.0, 2.0))
        with pytest.raises(ValueError, match="portraits"):
            make_sample_set(tmp_path, 1, portraits=0)
