from __future__ import annotations

import hashlib
import os
import struct
import threading
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import anyio
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from PIL import Image

from emo_async import _media
from emo_async._exceptions import InputError, Problem
from emo_async._media import (
    LIMITS,
    AudioInfo,
    ImageInfo,
    MediaProbeError,
    _prepare,
    check_audio,
    check_boxes,
    check_image,
    check_ratio,
    check_style,
    estimate,
    probe_audio,
    probe_image,
    sha256_file,
    validate_job,
)
from emo_async._models import Job
from emo_async._samples import make_portrait, make_silent_mp3, make_voice_wav

# --------------------------------------------------------------------------------------------
# Helpers and fixtures.


def padded_wav(path: Path, *, total_size: int, seconds: float, sample_rate: int = 8000) -> Path:
    """A WAV of ``seconds`` of silence grown to ``total_size`` bytes by a sparse JUNK chunk."""
    data = bytes(2 * int(seconds * sample_rate))
    head = 12 + (8 + 16) + 8  # RIFF header, fmt chunk, JUNK chunk header
    junk = total_size - head - 8 - len(data)
    assert junk >= 0
    assert junk % 2 == 0
    fmt = struct.pack("<HHIIHH", 1, 1, sample_rate, 2 * sample_rate, 2, 16)
    with open(path, "wb") as f:
        f.write(b"RIFF" + struct.pack("<I", total_size - 8) + b"WAVE")
        f.write(b"fmt " + struct.pack("<I", 16) + fmt)
        f.write(b"JUNK" + struct.pack("<I", junk))
        f.seek(junk, os.SEEK_CUR)  # sparse: no 15 MB of zeros written
        f.write(b"data" + struct.pack("<I", len(data)) + data)
    assert path.stat().st_size == total_size
    return path


@pytest.fixture
def portrait(tmp_path: Path) -> Path:
    return make_portrait(tmp_path / "portrait.png")


@pytest.fixture
def voice(tmp_path: Path) -> Path:
    return make_voice_wav(tmp_path / "voice.wav", 1.5, sample_rate=8000)


def png_header(width: int, height: int) -> bytes:
    """A PNG of just a signature, an IHDR declaring the size, and IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def digest_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bytes_of(path: Path) -> bytes:
    return path.read_bytes()


def replace_keeping_size_and_mtime(path: Path, scratch: Path) -> None:
    """Replace ``path`` (by a rename, as editors and sync tools do) with other bytes of the
    same size and the same mtime."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one sample changed: the same size, another digest
    st = path.stat()
    scratch.write_bytes(bytes(data))
    os.utime(scratch, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(scratch, path)
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)


@pytest.fixture
def unreadable_voice(voice: Path) -> Iterator[Path]:
    if os.geteuid() == 0:
        pytest.skip("root reads chmod 000 files")
    voice.chmod(0)
    yield voice
    voice.chmod(0o644)


def problems_of(exc: pytest.ExceptionInfo[InputError]) -> list[Problem]:
    return list(exc.value.problems)


async def problems_for(job: Job) -> list[Problem]:
    with pytest.raises(InputError) as exc:
        await validate_job(job)
    return problems_of(exc)


# --------------------------------------------------------------------------------------------
# Probing.


class TestProbeImage:
    """probe_image reads the format and size from the bytes."""

    @pytest.mark.parametrize(
        ("suffix", "fmt"),
        [("png", "png"), ("jpg", "jpeg"), ("jpeg", "jpeg"), ("bmp", "bmp"), ("webp", "webp")],
    )
    def test_reads_each_accepted_format(self, tmp_path: Path, suffix: str, fmt: str) -> None:
        path = make_portrait(tmp_path / f"p.{suffix}", size=(420, 500))
        info = probe_image(path)
        assert info == ImageInfo(format=fmt, width=420, height=500, size=path.stat().st_size)
        assert check_image(info) == []

    def test_png_named_jpg_is_a_png(self, tmp_path: Path) -> None:
        path = make_portrait(tmp_path / "photo.jpg", fmt="png")
        assert probe_image(path).format == "png"

    def test_gif_is_probed_but_rejected(self, tmp_path: Path) -> None:
        path = tmp_path / "anim.gif"
        Image.new("RGB", (500, 500), (200, 10, 10)).save(path, format="GIF")
        info = probe_image(path)
        assert info.format == "gif"
        [problem] = check_image(info)
        assert problem.field == "image"
        assert "gif" in problem.message
        assert problem.limit is not None
        assert "webp" in problem.limit

    def test_truncated_png_header_is_an_error(self, tmp_path: Path, portrait: Path) -> None:
        for n in (20, 40):
            path = tmp_path / f"cut{n}.png"
            path.write_bytes(portrait.read_bytes()[:n])
            with pytest.raises(MediaProbeError, match="truncated or corrupt PNG"):
                probe_image(path)

    def test_text_file_is_named_as_text(self, tmp_path: Path) -> None:
        path = tmp_path / "face.png"
        path.write_text("not a picture at all\n")
        with pytest.raises(MediaProbeError, match="text file"):
            probe_image(path)

    def test_audio_file_is_not_an_image(self, voice: Path) -> None:
        with pytest.raises(MediaProbeError, match="WAV audio, not an image"):
            probe_image(voice)

    def test_unknown_bytes_are_an_error(self, tmp_path: Path) -> None:
        path = tmp_path / "x.png"
        path.write_bytes(bytes(range(256)))
        with pytest.raises(MediaProbeError, match="not an image"):
            probe_image(path)


class TestProbeAudio:
    """probe_audio reads format and duration from the bytes."""

    def test_wav_duration_is_exact(self, tmp_path: Path) -> None:
        path = make_voice_wav(tmp_path / "v.wav", 2.5, sample_rate=8000)
        info = probe_audio(path)
        assert info.format == "wav"
        assert info.duration == pytest.approx(2.5)
        assert (info.sample_rate, info.channels) == (8000, 1)
        assert info.size == path.stat().st_size

    def test_mp3_is_read(self, tmp_path: Path) -> None:
        info = probe_audio(make_silent_mp3(tmp_path / "s.mp3", 3.0))
        assert info.format == "mp3"
        assert info.duration == pytest.approx(3.0, abs=0.03)
        assert info.sample_rate == 44100

    def test_mp3_named_wav_is_an_mp3(self, tmp_path: Path) -> None:
        assert probe_audio(make_silent_mp3(tmp_path / "s.wav", 1.0)).format == "mp3"

    def test_text_named_wav_names_its_real_type(self, tmp_path: Path) -> None:
        path = tmp_path / "voice.wav"
        path.write_text("hello, I am a text file\n")
        with pytest.raises(MediaProbeError, match="is a text file, not WAV or MP3"):
            probe_audio(path)

    def test_ogg_is_rejected(self, tmp_path: Path) -> None:
        path = tmp_path / "voice.ogg"
        path.write_bytes(b"OggS\x00\x02" + bytes(100))
        with pytest.raises(MediaProbeError, match="OGG audio, not WAV or MP3"):
            probe_audio(path)

    def test_image_is_not_audio(self, portrait: Path) -> None:
        with pytest.raises(MediaProbeError, match="PNG image, not WAV or MP3"):
            probe_audio(portrait)

    def test_truncated_wav_header_is_an_error(self, tmp_path: Path, voice: Path) -> None:
        path = tmp_path / "cut.wav"
        path.write_bytes(voice.read_bytes()[:20])
        with pytest.raises(MediaProbeError, match="truncated or corrupt WAV"):
            probe_audio(path)


class TestProbeFileErrors:
    """Missing, empty, directory and unreadable paths raise MediaProbeError, not OSError."""

    @pytest.mark.parametrize("probe", [probe_image, probe_audio])
    def test_missing_file(self, tmp_path: Path, probe: object) -> None:
        with pytest.raises(MediaProbeError, match="does not exist"):
            probe(tmp_path / "nope.wav")  # type: ignore[operator]

    @pytest.mark.parametrize("probe", [probe_image, probe_audio])
    def test_empty_file(self, tmp_path: Path, probe: object) -> None:
        path = tmp_path / "empty.png"
        path.touch()
        with pytest.raises(MediaProbeError, match="empty"):
            probe(path)  # type: ignore[operator]

    @pytest.mark.parametrize("probe", [probe_image, probe_audio])
    def test_directory(self, tmp_path: Path, probe: object) -> None:
        with pytest.raises(MediaProbeError, match="directory"):
            probe(tmp_path)  # type: ignore[operator]

    @pytest.mark.skipif(
        not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads chmod 000 files"
    )
    def test_unreadable_file(self, portrait: Path) -> None:
        portrait.chmod(0)
        try:
            with pytest.raises(MediaProbeError, match="permission denied"):
                probe_image(portrait)
        finally:
            portrait.chmod(0o644)


class TestSha256File:
    """sha256_file hashes the whole content."""

    def test_matches_hashlib(self, tmp_path: Path) -> None:
        path = tmp_path / "blob"
        data = os.urandom(3 * 1024 * 1024 + 17)
        path.write_bytes(data)
        assert sha256_file(path) == hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# Limits, both sides of every boundary.


class TestImageLimits:
    """Shortest side >= 400 px, longest side <= 7000 px."""

    @pytest.mark.parametrize(
        ("size", "ok"),
        [((400, 600), True), ((399, 600), False), ((600, 400), True), ((600, 399), False)],
    )
    def test_shortest_side(self, tmp_path: Path, size: tuple[int, int], ok: bool) -> None:
        problems = check_image(probe_image(make_portrait(tmp_path / "p.png", size=size)))
        if ok:
            assert problems == []
        else:
            [problem] = problems
            assert "399 px" in problem.message
            assert problem.limit == ">= 400 px"

    @pytest.mark.parametrize(("size", "ok"), [((7000, 400), True), ((7001, 400), False)])
    def test_longest_side(self, tmp_path: Path, size: tuple[int, int], ok: bool) -> None:
        path = make_portrait(tmp_path / "wide.png", size=size)
        assert path.stat().st_size < 200_000
        problems = check_image(probe_image(path))
        if ok:
            assert problems == []
        else:
            [problem] = problems
            assert "7001 px" in problem.message
            assert problem.limit == "<= 7000 px"

    @pytest.mark.parametrize("side", [10_000, 20_000])
    def test_huge_declared_size_is_a_size_problem(self, tmp_path: Path, side: int) -> None:
        # Only a header: Pillow's decompression-bomb guard must not turn this into a crash.
        path = tmp_path / "huge.png"
        path.write_bytes(png_header(side, side))
        [problem] = check_image(probe_image(path))
        assert f"{side} px" in problem.message

    def test_tall_side_is_checked_too(self) -> None:
        [problem] = check_image(ImageInfo("png", 400, 7001, 1000))
        assert "7001" in problem.message


class TestAudioLimits:
    """wav/mp3, size < 15 MB (15,000,000 bytes), duration < 60 s."""

    @pytest.mark.parametrize(("seconds", "ok"), [(59.9, True), (60.0, False)])
    def test_wav_duration(self, tmp_path: Path, seconds: float, ok: bool) -> None:
        path = make_voice_wav(tmp_path / "v.wav", seconds, sample_rate=4000)
        problems = check_audio(probe_audio(path))
        if ok:
            assert problems == []
        else:
            assert problems == [Problem("audio", "duration 60 s is too long", "< 60 s")]

    @pytest.mark.parametrize(("seconds", "ok"), [(59.9, True), (60.0, False)])
    def test_mp3_duration(self, tmp_path: Path, seconds: float, ok: bool) -> None:
        problems = check_audio(probe_audio(make_silent_mp3(tmp_path / "s.mp3", seconds)))
        assert (problems == []) is ok

    def test_duration_message_names_value_and_limit(self) -> None:
        [problem] = check_audio(AudioInfo("wav", 61.2, 1000, 16000, 1))
        assert problem == Problem("audio", "duration 61.2 s is too long", "< 60 s")

    @pytest.mark.parametrize(
        ("size", "ok"),
        [(LIMITS.audio_max_bytes - 2, True), (LIMITS.audio_max_bytes, False)],
    )
    def test_wav_size(self, tmp_path: Path, size: int, ok: bool) -> None:
        info = probe_audio(padded_wav(tmp_path / "big.wav", total_size=size, seconds=1.0))
        assert info.duration == pytest.approx(1.0)
        problems = check_audio(info)
        if ok:
            assert problems == []
        else:
            [problem] = problems
            assert "15,000,000 bytes" in problem.message
            assert problem.limit is not None
            assert "15,000,000" in problem.limit

    def test_size_limit_is_the_stricter_reading(self) -> None:
        assert LIMITS.audio_max_bytes == 15_000_000
        assert check_audio(AudioInfo("mp3", 1.0, 14_999_999, 44100, 1)) == []
        assert len(check_audio(AudioInfo("mp3", 1.0, 15_000_000, 44100, 1))) == 1

    def test_other_format_is_rejected(self) -> None:
        [problem] = check_audio(AudioInfo("mp2", 1.0, 1000, 44100, 1))
        assert problem.limit == "wav, mp3"

    def test_empty_audio_is_rejected(self, tmp_path: Path) -> None:
        problems = check_audio(probe_audio(make_voice_wav(tmp_path / "z.wav", 0.0)))
        assert [p.field for p in problems] == ["audio"]


class TestStyleAndRatio:
    """style_level is normal|calm|active; ratio is None, 1:1 or 3:4."""

    @pytest.mark.parametrize("style", ["normal", "calm", "active"])
    def test_known_styles(self, style: str) -> None:
        assert check_style(style) == []

    def test_wild_is_rejected(self) -> None:
        [problem] = check_style("wild")
        assert "'wild'" in problem.message
        assert problem.limit == "normal | calm | active"

    def test_ratios(self) -> None:
        assert check_ratio(None) == check_ratio("1:1") == check_ratio("3:4") == []
        [problem] = check_ratio("16:9")
        assert problem.field == "ratio"


class TestCheckBoxes:
    """Boxes are 4 ints, ordered, inside the image, ext 1:1 or 3:4 around the face."""

    image = ImageInfo("png", 1000, 1200, 1)

    def test_good_boxes(self) -> None:
        assert check_boxes([300, 300, 500, 550], [200, 200, 700, 700], self.image) == []
        assert check_boxes([300, 300, 500, 550], [200, 200, 500, 600], self.image) == []

    def test_one_pixel_of_rounding_is_allowed(self) -> None:
        assert check_boxes([300, 300, 500, 550], [200, 200, 701, 700], self.image) == []
        assert check_boxes([300, 300, 500, 550], [200, 200, 501, 600], self.image) == []

    def test_no_boxes_is_fine(self) -> None:
        assert check_boxes(None, None, self.image) == []

    def test_one_box_alone_is_a_problem(self) -> None:
        [problem] = check_boxes([1, 1, 5, 5], None, self.image)
        assert problem.field == "ext_bbox"

    def test_wrong_length(self) -> None:
        problems = check_boxes([1, 2, 3], [0, 0, 10, 10], self.image)
        assert any(p.field == "face_bbox" and "3 values" in p.message for p in problems)

    def test_not_integers(self) -> None:
        problems = check_boxes([1.5, 2, 30, 40], [0, 0, 100, 100], self.image)
        assert any("not integers" in p.message for p in problems)
        assert check_boxes("1,2,3,4", [0, 0, 100, 100], self.image)[0].field == "face_bbox"

    def test_inverted(self) -> None:
        problems = check_boxes([50, 10, 50, 40], [0, 0, 100, 100], self.image)
        assert [p.limit for p in problems] == ["x1 < x2, y1 < y2"]

    def test_outside_the_image(self) -> None:
        problems = check_boxes([900, 900, 1000, 1000], [800, 800, 1100, 1100], self.image)
        [problem] = problems
        assert problem.field == "ext_bbox"
        assert "1000x1200" in problem.message

    def test_aspect_2_3_is_rejected(self) -> None:
        [problem] = check_boxes([110, 110, 150, 150], [100, 100, 300, 400], self.image)
        assert "200x300" in problem.message
        assert problem.limit == "aspect 1:1 or 3:4, ±1 px"

    def test_face_outside_ext(self) -> None:
        [problem] = check_boxes([10, 10, 90, 90], [100, 100, 400, 400], self.image)
        assert problem.field == "face_bbox"
        assert "not inside" in problem.message

    def test_ratio_must_match_ext(self) -> None:
        [problem] = check_boxes([110, 110, 150, 150], [100, 100, 400, 400], self.image, ratio="3:4")
        assert "asks for ratio 3:4" in problem.message


# --------------------------------------------------------------------------------------------
# validate_job.


@pytest.mark.parametrize("size", [1, 99, 100, 101, 5000])
@pytest.mark.parametrize("keep", [0, 1, 100, 1 << 20])
def test_hash_file_keeps_the_bytes_of_files_within_the_limit(
    tmp_path: Path, size: int, keep: int
) -> None:
    path = tmp_path / "f.bin"
    data = os.urandom(size)
    path.write_bytes(data)
    digest, content = _media._hash_file(path, keep)
    assert digest == hashlib.sha256(data).hexdigest() == sha256_file(path)
    assert content == (data if 0 < size <= keep else None)


class TestValidateJob:
    """validate_job probes, hashes and checks a job, and lists every problem at once."""

    @pytest.mark.anyio
    async def test_valid_local_job(self, portrait: Path, voice: Path) -> None:
        v = await validate_job(Job(portrait, str(voice)))
        assert v.image.kind == v.audio.kind == "local"
        assert v.image.path == portrait
        assert v.audio.source == str(voice)
        assert v.image.digest == digest_of(portrait)
        assert v.image.image is not None
        assert v.image.image.format == "png"
        assert v.billed_seconds_estimate == pytest.approx(1.5)
        assert v.ratio == "1:1"

    @pytest.mark.anyio
    async def test_png_named_jpg_is_accepted(self, tmp_path: Path, voice: Path) -> None:
        image = make_portrait(tmp_path / "photo.jpg", fmt="png")
        v = await validate_job(Job(image, voice))
        assert v.image.image is not None
        assert v.image.image.format == "png"

    @pytest.mark.anyio
    async def test_urls_are_accepted_without_network(self) -> None:
        url = "https://example.invalid/a.png"
        v = await validate_job(Job(url, "oss://dashscope-instant/abc/voice.wav"))
        assert (v.image.kind, v.audio.kind) == ("url", "oss")
        assert v.image.digest == hashlib.sha256(b"url:" + url.encode()).hexdigest()
        assert v.billed_seconds_estimate is None

    @pytest.mark.anyio
    @pytest.mark.parametrize(
        ("source", "needle"),
        [
            ("file:///tmp/a.png", "scheme file:"),
            ("ftp://host/a.png", "scheme ftp:"),
            ("http://", "has no host"),
            ("https:///a.png", "has no host"),
            ("data:image/png;base64,AAAA", "scheme data:"),
            ("oss://", "has no host"),
        ],
    )
    async def test_bad_urls_are_rejected(self, voice: Path, source: str, needle: str) -> None:
        [problem] = await problems_for(Job(source, voice))
        assert problem.field == "image"
        assert needle in problem.message

    @pytest.mark.anyio
    async def test_missing_directory_and_empty_are_problems(
        self, tmp_path: Path, voice: Path
    ) -> None:
        empty = tmp_path / "empty.wav"
        empty.touch()
        problems = await problems_for(Job(tmp_path / "missing.png", empty))
        assert [
            (p.field, "does not exist" in p.message or "empty" in p.message) for p in problems
        ] == [
            ("image", True),
            ("audio", True),
        ]
        [problem] = await problems_for(Job(tmp_path, voice))
        assert "directory" in problem.message

    @pytest.mark.anyio
    async def test_text_named_wav_is_rejected(self, tmp_path: Path, portrait: Path) -> None:
        fake = tmp_path / "voice.wav"
        fake.write_text("RIFF? no, just words\n")
        [problem] = await problems_for(Job(portrait, fake))
        assert problem.field == "audio"
        assert "text file" in problem.message
        assert problem.limit == "wav, mp3"

    @pytest.mark.anyio
    async def test_every_problem_in_one_error(self, tmp_path: Path) -> None:
        small = make_portrait(tmp_path / "small.png", size=(300, 300))
        fake = tmp_path / "voice.wav"
        fake.write_text("words\n")
        job = Job(small, fake, style_level="wild", name="three")
        with pytest.raises(InputError) as exc:
            await validate_job(job)
        assert [p.field for p in exc.value.problems] == ["image", "audio", "style_level"]
        assert exc.value.job_name == "three"
        assert "job 'three'" in str(exc.value)

    @pytest.mark.anyio
    async def test_boxes_outside_the_image_are_found(self, voice: Path, portrait: Path) -> None:
        job = Job(portrait, voice, face_bbox=[100, 100, 200, 200], ext_bbox=[0, 0, 600, 600])
        [problem] = await problems_for(job)
        assert problem.field == "ext_bbox"
        assert "512x640" in problem.message

    @pytest.mark.anyio
    async def test_ratio_comes_from_ext_bbox(self, portrait: Path, voice: Path) -> None:
        job = Job(portrait, voice, face_bbox=[200, 150, 300, 260], ext_bbox=[100, 40, 400, 440])
        assert (await validate_job(job)).ratio == "3:4"
        assert (await validate_job(Job(portrait, voice, ratio="3:4"))).ratio == "3:4"

    @pytest.mark.anyio
    async def test_unreadable_file_is_a_problem(
        self, portrait: Path, unreadable_voice: Path
    ) -> None:
        [problem] = await problems_for(Job(portrait, unreadable_voice))
        assert "permission denied" in problem.message

    @pytest.mark.anyio
    async def test_validate_keeping_returns_the_bytes_it_hashed(
        self, tmp_path: Path, portrait: Path, voice: Path
    ) -> None:
        v, contents = await _media.validate_keeping(Job(portrait, voice), 1 << 20)
        assert contents == {"image": bytes_of(portrait), "audio": bytes_of(voice)}
        assert v.image.digest == hashlib.sha256(contents["image"]).hexdigest()
        assert v.audio.digest == hashlib.sha256(contents["audio"]).hexdigest()
        # Known files are not read again (the probe cache), so there are no bytes to give.
        again, contents = await _media.validate_keeping(Job(portrait, voice), 1 << 20)
        assert contents == {}
        assert (again.image.digest, again.audio.digest) == (v.image.digest, v.audio.digest)
        # A file over the limit is hashed whole all the same, and not kept.
        other = make_voice_wav(tmp_path / "other.wav", 1.0, sample_rate=8000)
        v, contents = await _media.validate_keeping(Job(portrait, other), 100)
        assert "audio" not in contents
        assert v.audio.digest == digest_of(other)
        assert (await validate_job(Job(portrait, other))).audio.digest == digest_of(other)

    @pytest.mark.anyio
    async def test_a_file_replaced_with_the_same_size_and_mtime_is_read_again(
        self, tmp_path: Path, portrait: Path, voice: Path
    ) -> None:
        first = await validate_job(Job(portrait, voice))
        replace_keeping_size_and_mtime(voice, tmp_path / "replacement.wav")
        second = await validate_job(Job(portrait, voice))
        assert first.audio.digest != second.audio.digest == digest_of(voice)

    @pytest.mark.anyio
    async def test_does_not_block_the_loop(
        self, monkeypatch: pytest.MonkeyPatch, portrait: Path, voice: Path
    ) -> None:
        # The hash waits until the loop has ticked 5 times: if validate_job ran it on the loop,
        # the ticker could not tick and the wait would give up.
        released = threading.Event()
        # Patched where the prober looks it up.
        real = _prepare._hash_file

        def gated_hash(path: str | os.PathLike[str], keep: int) -> tuple[str, bytes | None]:
            assert released.wait(10), "the event loop did not tick while a file was hashed"
            return real(path, keep)

        monkeypatch.setattr(_prepare, "_hash_file", gated_hash)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await anyio.sleep(0.01)
                ticks += 1
                if ticks >= 5:
                    released.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            validated = await validate_job(Job(portrait, voice))
            tg.cancel_scope.cancel()
        assert ticks >= 5
        assert validated.audio.digest == _media.sha256_file(voice)


# --------------------------------------------------------------------------------------------
# check_urls against a local server.


@pytest.fixture
async def url_server() -> AsyncIterator[tuple[TestServer, list[tuple[str, str, str | None]]]]:
    seen: list[tuple[str, str, str | None]] = []

    @web.middleware
    async def record(request: web.Request, handler: object) -> web.StreamResponse:
        seen.append((request.method, request.path, request.headers.get("Range")))
        return await handler(request)  # type: ignore[operator, no-any-return]

    async def ok(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"x" * 1000)

    async def no_head(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Range") == "bytes=0-0":
            return web.Response(status=206, body=b"x", headers={"Content-Range": "bytes 0-0/1000"})
        return web.Response(body=b"x" * 1000)

    async def big(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 16_000_000
        await resp.prepare(request)
        return resp

    async def big_no_head(request: web.Request) -> web.StreamResponse:
        return web.Response(status=206, body=b"x", headers={"Content-Range": "bytes 0-0/16000000"})

    app = web.Application(middlewares=[record])
    app.router.add_get("/ok.png", ok)
    app.router.add_get("/ok.wav", ok)
    app.router.add_get("/nohead.wav", no_head, allow_head=False)
    app.router.add_get("/big.wav", big)
    app.router.add_get("/bignohead.wav", big_no_head, allow_head=False)
    server = TestServer(app, host="127.0.0.1")
    async with server:
        yield server, seen


class TestCheckUrls:
    """check_urls=True asks http(s) hosts with HEAD, or a ranged GET when HEAD is refused."""

    @pytest.mark.anyio
    async def test_reachable_urls_pass(
        self, url_server: tuple[TestServer, list[tuple[str, str, str | None]]]
    ) -> None:
        server, seen = url_server
        job = Job(str(server.make_url("/ok.png")), str(server.make_url("/ok.wav")))
        async with aiohttp.ClientSession() as session:
            await validate_job(job, check_urls=True, session=session)
        assert sorted(seen) == [("HEAD", "/ok.png", None), ("HEAD", "/ok.wav", None)]

    @pytest.mark.anyio
    async def test_404_is_a_problem(
        self, url_server: tuple[TestServer, list[tuple[str, str, str | None]]]
    ) -> None:
        server, _ = url_server
        job = Job(str(server.make_url("/missing.png")), str(server.make_url("/ok.wav")))
        async with aiohttp.ClientSession() as session:
            with pytest.raises(InputError) as exc:
                await validate_job(job, check_urls=True, session=session)
        [problem] = exc.value.problems
        assert problem.field == "image"
        assert "HTTP 404" in problem.message

    @pytest.mark.anyio
    async def test_head_refused_uses_ranged_get(
        self, url_server: tuple[TestServer, list[tuple[str, str, str | None]]]
    ) -> None:
        server, seen = url_server
        job = Job(str(server.make_url("/ok.png")), str(server.make_url("/nohead.wav")))
        async with aiohttp.ClientSession() as session:
            await validate_job(job, check_urls=True, session=session)
        calls = [s for s in seen if s[1] == "/nohead.wav"]
        assert calls == [("HEAD", "/nohead.wav", None), ("GET", "/nohead.wav", "bytes=0-0")]

    @pytest.mark.anyio
    @pytest.mark.parametrize("path", ["/big.wav", "/bignohead.wav"])
    async def test_too_large_audio_is_a_problem(
        self, url_server: tuple[TestServer, list[tuple[str, str, str | None]]], path: str
    ) -> None:
        server, _ = url_server
        job = Job(str(server.make_url("/ok.png")), str(server.make_url(path)))
        async with aiohttp.ClientSession() as session:
            with pytest.raises(InputError) as exc:
                await validate_job(job, check_urls=True, session=session)
        [problem] = exc.value.problems
        assert problem.field == "audio"
        assert "16,000,000 bytes" in problem.message

    @pytest.mark.anyio
    async def test_off_by_default(
        self, url_server: tuple[TestServer, list[tuple[str, str, str | None]]]
    ) -> None:
        server, seen = url_server
        job = Job(str(server.make_url("/missing.png")), str(server.make_url("/big.wav")))
        async with aiohttp.ClientSession() as session:
            await validate_job(job, session=session)
        assert seen == []

    @pytest.mark.anyio
    async def test_unreachable_host_is_a_problem(self, portrait: Path) -> None:
        # A port nobody listens on: bind one, note it, close it.
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        await listener.aclose()
        job = Job(portrait, f"http://127.0.0.1:{port}/voice.wav")
        async with aiohttp.ClientSession() as session:
            with pytest.raises(InputError) as exc:
                await validate_job(job, check_urls=True, session=session)
        [problem] = exc.value.problems
        assert "unreachable" in problem.message


# --------------------------------------------------------------------------------------------
# estimate.


class TestEstimate:
    """estimate sums audio durations and splits them by ratio, locally."""

    @pytest.mark.anyio
    async def test_sums_and_splits(self, tmp_path: Path, portrait: Path) -> None:
        a = make_voice_wav(tmp_path / "a.wav", 2.0, sample_rate=8000)
        b = make_voice_wav(tmp_path / "b.wav", 3.0, sample_rate=8000)
        c = make_voice_wav(tmp_path / "c.wav", 4.5, sample_rate=8000)
        bad = make_portrait(tmp_path / "tiny.png", size=(100, 100))
        jobs = [
            Job(portrait, a),
            Job(portrait, b, ratio="3:4"),
            Job(portrait, c, face_bbox=[200, 150, 300, 260], ext_bbox=[100, 40, 400, 440]),
            Job(portrait, "https://example.invalid/v.mp3"),
            Job(bad, a, name="bad"),
        ]
        result = await estimate(jobs)
        assert (result.jobs, result.valid, result.unknown_duration) == (5, 4, 1)
        assert result.billed_seconds == pytest.approx(9.5)
        assert dict(result.by_ratio) == {"1:1": 2, "3:4": 2}
        assert dict(result.billed_seconds_by_ratio) == pytest.approx({"1:1": 2.0, "3:4": 7.5})
        [error] = result.errors
        assert error.job_name == "bad"

    @pytest.mark.anyio
    async def test_shared_portrait_is_probed_once(
        self, monkeypatch: pytest.MonkeyPatch, portrait: Path, voice: Path
    ) -> None:
        calls: list[Path] = []
        real = _prepare.probe_image

        def counting(path: str | os.PathLike[str]) -> ImageInfo:
            calls.append(Path(path))
            return real(path)

        monkeypatch.setattr(_prepare, "probe_image", counting)
        result = await estimate([Job(portrait, voice, name=f"j{i}") for i in range(20)])
        assert result.valid == 20
        assert result.billed_seconds == pytest.approx(30.0)
        assert calls == [portrait]

    @pytest.mark.anyio
    async def test_empty(self) -> None:
        result = await estimate([])
        assert (result.jobs, result.valid, result.billed_seconds) == (0, 0, 0.0)
