"""Real, playable MP4 results (``SimulatorConfig(real_video=True)``; needs PyAV).

A result is the portrait's ``ext_bbox`` crop at 512x512 (1:1) or 512x704 (3:4), gently swaying
and zooming, with a mouth that opens with the loudness of the voice, H.264 (``libx264``, else
MPEG-4 part 2) in yuv420p at 15 fps, the input audio as its AAC sound track, as long as the
audio. The same inputs give the same bytes. Encoding is CPU work: :class:`RealVideos` runs it
in a worker thread and keeps the results, so the event loop never waits on it.

Install PyAV with ``pip install 'emo-async[video]'``.
"""

from __future__ import annotations

import hashlib
import io
import math
from array import array
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.to_thread
import attrs

if TYPE_CHECKING:
    from ._state import SimTask

__all__ = ["FPS", "SIZES", "RealVideos", "VideoInputs", "av_available", "render_mp4"]

FPS: Final = 15
SIZES: Final = {"1:1": (512, 512), "3:4": (512, 704)}
_AUDIO_RATE: Final = 16000
#: How much larger than the frame the base picture is, so the camera has room to move.
_MARGIN: Final = 1.08
_CACHE_SIZE: Final = 64
_INPUT_LIMIT: Final = 64 * 1024 * 1024
_FALLBACK_COLOUR: Final = (96, 110, 130)
#: Zoom levels the camera moves between.
_ZOOMS: Final = (1.0, 1.01, 1.02, 1.03, 1.04)
#: A dark red mouth, in limited-range YCbCr.
_MOUTH: Final = (45, 120, 165)

Box = tuple[int, int, int, int]
Fetch = Callable[[str], Awaitable[bytes]]


def av_available() -> bool:
    """Whether PyAV can be imported (``pip install 'emo-async[video]'``)."""
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


@attrs.frozen
class VideoInputs:
    """What a result video is made from.

    Attributes:
        image: The portrait's bytes (None: a plain background).
        audio: The voice's bytes, WAV or MP3 (None: silence).
        face_bbox: The face box in the portrait.
        ext_bbox: The crop that becomes the frame.
        ratio: ``"1:1"`` or ``"3:4"``.
        audio_duration: Seconds of audio (used when the audio cannot be decoded).
    """

    image: bytes | None
    audio: bytes | None
    face_bbox: Box
    ext_bbox: Box
    ratio: str
    audio_duration: float


# --------------------------------------------------------------------------------------------
# Rendering (synchronous, CPU-bound: run it in a worker thread).


def _decode_audio(data: bytes | None, duration: float) -> array[int]:
    """Mono 16-bit samples at 16 kHz; silence of ``duration`` if the bytes do not decode."""
    import av

    samples = array("h")
    if data:
        try:
            with av.open(io.BytesIO(data), "r") as container:
                stream = container.streams.audio[0]
                resampler = av.AudioResampler(format="s16", layout="mono", rate=_AUDIO_RATE)
                frames: list[Any] = []
                for frame in container.decode(stream):
                    frames += resampler.resample(frame)
                frames += resampler.resample(None)
                for out in frames:
                    samples.frombytes(bytes(out.planes[0])[: out.samples * 2])
        except (av.FFmpegError, IndexError, ValueError):
            samples = array("h")
    if not samples:
        samples = array("h", bytes(2 * max(1, round(duration * _AUDIO_RATE))))
    return samples


def _envelope(samples: array[int], frames: int) -> list[float]:
    """Loudness per video frame, 0..1 (relative to the loudest frame)."""
    per = _AUDIO_RATE / FPS
    levels: list[float] = []
    for i in range(frames):
        chunk = samples[int(i * per) : int((i + 1) * per) : 4]
        levels.append(sum(abs(s) for s in chunk) / len(chunk) if chunk else 0.0)
    top = max(levels, default=0.0)
    if top <= 0:
        return [0.0] * frames
    # A little smoothing so the mouth does not flicker from frame to frame.
    smooth = [levels[0] / top]
    for level in levels[1:]:
        smooth.append(0.5 * smooth[-1] + 0.5 * level / top)
    return smooth


def _portrait(data: bytes | None, ext: Box) -> Any:
    from PIL import Image

    if data:
        try:
            with Image.open(io.BytesIO(data)) as im:
                rgb = im.convert("RGB")
            x1, y1, x2, y2 = ext
            x1, y1 = max(0, min(x1, rgb.width - 1)), max(0, min(y1, rgb.height - 1))
            x2, y2 = max(x1 + 1, min(x2, rgb.width)), max(y1 + 1, min(y2, rgb.height))
            return rgb.crop((x1, y1, x2, y2))
        except (OSError, ValueError, Image.DecompressionBombError):
            pass
    return Image.new("RGB", (max(1, ext[2] - ext[0]), max(1, ext[3] - ext[1])), _FALLBACK_COLOUR)


def _limited_range(image: Any) -> Any:
    """PIL's YCbCr is full range (JPEG); H.264's yuv420p is read as limited range (BT.601)."""
    luma = [16 + round(v * 219 / 255) for v in range(256)]
    chroma = [16 + round(v * 224 / 255) for v in range(256)]
    return image.point(luma + chroma + chroma)


def _plane(frame: Any, index: int, band: Any) -> None:
    plane = frame.planes[index]
    data = band.tobytes()
    if plane.line_size != band.width:
        pad = bytes(plane.line_size - band.width)
        data = b"".join(
            data[r * band.width : (r + 1) * band.width] + pad for r in range(band.height)
        )
    plane.update(data)


def render_mp4(inputs: VideoInputs, *, generation: int = 0, label: str = "") -> bytes:
    """Encode one result video (blocking; a 6 s clip takes a fraction of a second).

    Args:
        inputs: The portrait, the voice and the boxes.
        generation: Written into the file's metadata, so a rewritten object (the simulator's
            ETag-change fault) has other bytes.
        label: Also written into the metadata: the simulator passes the task id, so two tasks
            made from the same inputs still differ, and a test can tell whose video a file is.

    Returns:
        The MP4 file's bytes.
    """
    import av
    from PIL import Image, ImageDraw

    width, height = SIZES.get(inputs.ratio, SIZES["1:1"])
    samples = _decode_audio(inputs.audio, inputs.audio_duration)
    seconds = len(samples) / _AUDIO_RATE
    n_frames = max(1, math.ceil(seconds * FPS))
    levels = _envelope(samples, n_frames)

    crop = _portrait(inputs.image, inputs.ext_bbox)
    sx, sy = width / crop.width, height / crop.height
    fx1, fy1, fx2, fy2 = inputs.face_bbox
    ex1, ey1 = inputs.ext_bbox[0], inputs.ext_bbox[1]
    face_w = max(1.0, (fx2 - fx1) * sx)
    face_h = max(1.0, (fy2 - fy1) * sy)
    mouth = (((fx1 + fx2) / 2 - ex1) * sx, (fy1 - ey1) * sy + 0.78 * face_h)
    # The camera zooms between a few pre-scaled copies (resampling every frame would cost
    # ten times more) and pans inside them; everything is kept in limited-range YCbCr.
    bases = []
    for z in _ZOOMS:
        w, h = round(width * _MARGIN * z), round(height * _MARGIN * z)
        scaled = crop.resize((w, h), Image.Resampling.BILINEAR).convert("YCbCr")
        bases.append((_limited_range(scaled), _MARGIN * z))

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        name = f"result {label}" if label else "result"
        out.metadata["comment"] = f"emo_async simulator {name}, generation {generation}"
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        video: Any = out.add_stream(codec, rate=FPS)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        # One thread: the same inputs must give the same bytes.
        video.codec_context.thread_count = 1
        if codec == "libx264":
            video.options = {"preset": "ultrafast", "crf": "28"}
        else:
            video.bit_rate = 800_000
        audio: Any = out.add_stream("aac", rate=_AUDIO_RATE)
        audio.codec_context.layout = "mono"
        audio.bit_rate = 48_000

        for i in range(n_frames):
            t = i / FPS
            level = levels[i]
            phase = (1 - math.cos(2 * math.pi * t / 5.0)) / 2
            base, scale = bases[min(len(bases) - 1, int(phase * len(bases)))]
            slack_x, slack_y = base.width - width, base.height - height
            left = round(slack_x / 2 + math.sin(2 * math.pi * t / 4.0) * slack_x * 0.4)
            top = round(slack_y / 2 + math.sin(2 * math.pi * t / 3.0) * slack_y * 0.2 - 3 * level)
            left, top = min(max(0, left), slack_x), min(max(0, top), slack_y)
            shot = base.crop((left, top, left + width, top + height))
            if level > 0.05:
                mx, my = mouth[0] * scale - left, mouth[1] * scale - top
                half_w = face_w * scale * (0.12 + 0.04 * level)
                half_h = face_h * scale * 0.07 * level
                ImageDraw.Draw(shot).ellipse(
                    (mx - half_w, my - half_h, mx + half_w, my + half_h), fill=_MOUTH
                )
            y, cb, cr = shot.split()
            frame = av.VideoFrame(width, height, "yuv420p")
            _plane(frame, 0, y)
            _plane(frame, 1, cb.reduce(2))
            _plane(frame, 2, cr.reduce(2))
            frame.pts = i
            frame.time_base = Fraction(1, FPS)
            for packet in video.encode(frame):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)

        floats = array("f", [s / 32768.0 for s in samples])
        step = 1024
        for start in range(0, len(floats), step):
            part = floats[start : start + step]
            aframe = av.AudioFrame(format="flt", layout="mono", samples=len(part))
            aframe.planes[0].update(part.tobytes())
            aframe.sample_rate = _AUDIO_RATE
            aframe.pts = start
            aframe.time_base = Fraction(1, _AUDIO_RATE)
            for packet in audio.encode(aframe):
                out.mux(packet)
        for packet in audio.encode(None):
            out.mux(packet)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# The simulator's cache of result videos.


class RealVideos:
    """Result videos of one simulator: inputs kept per task, encoded once in a worker thread.

    Args:
        fetch: Reads an input URL's bytes (the simulator's input resolver).
        cache_size: Encoded videos kept in memory (an evicted one is encoded again, to the
            same bytes).

    Raises:
        RuntimeError: PyAV is not installed.
    """

    def __init__(self, fetch: Fetch, *, cache_size: int = _CACHE_SIZE) -> None:
        if not av_available():
            raise RuntimeError(
                "real_video=True needs PyAV: pip install 'emo-async[video]' (or pip install av)"
            )
        self._fetch = fetch
        self._inputs: dict[str, VideoInputs] = {}
        #: Input bytes by digest: a portrait shared by many tasks is kept once.
        self._blobs: dict[str, bytes] = {}
        self._videos: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._cache_size = cache_size
        self._encoding: dict[tuple[str, int], anyio.Event] = {}

    async def _read(self, url: object) -> bytes | None:
        if not isinstance(url, str):
            return None
        try:
            data = await self._fetch(url.strip())
        except Exception:  # the task still gets a video: a plain picture, or silence
            return None
        return self._blobs.setdefault(hashlib.sha256(data).hexdigest(), data)

    async def remember(
        self,
        task_id: str,
        *,
        image_url: object,
        audio_url: object,
        face_bbox: Box,
        ext_bbox: Box,
        ratio: str,
        audio_duration: float,
    ) -> None:
        """Keep what a new task's video will be made of (called by the submit handler)."""
        self._inputs[task_id] = VideoInputs(
            image=await self._read(image_url),
            audio=await self._read(audio_url),
            face_bbox=face_bbox,
            ext_bbox=ext_bbox,
            ratio=ratio,
            audio_duration=audio_duration,
        )

    def _inputs_of(self, task: SimTask) -> VideoInputs:
        found = self._inputs.get(task.task_id)
        if found is not None:
            return found
        side = 512 if task.ratio == "1:1" else 704
        return VideoInputs(
            image=None,
            audio=None,
            face_bbox=(128, 128, 384, 384),
            ext_bbox=(0, 0, 512, side),
            ratio=task.ratio,
            audio_duration=task.audio_duration,
        )

    def _store(self, key: tuple[str, int], data: bytes) -> bytes:
        self._videos[key] = data
        while len(self._videos) > self._cache_size:
            self._videos.popitem(last=False)
        return data

    async def get(self, task: SimTask) -> bytes:
        """The task's video; encoded in a worker thread on first use, then cached."""
        key = (task.task_id, task.media_generation)
        while True:
            data = self._videos.get(key)
            if data is not None:
                self._videos.move_to_end(key)
                return data
            pending = self._encoding.get(key)
            if pending is None:
                break
            await pending.wait()
        event = anyio.Event()
        self._encoding[key] = event
        try:
            inputs = self._inputs_of(task)
            data = await anyio.to_thread.run_sync(
                lambda: render_mp4(inputs, generation=task.media_generation, label=task.task_id)
            )
            return self._store(key, data)
        finally:
            del self._encoding[key]
            event.set()

    def get_sync(self, task: SimTask) -> bytes:
        """The task's video from the cache, or encoded here and now (blocking; for
        ``Simulator.result_bytes``, which is called once the video was served)."""
        key = (task.task_id, task.media_generation)
        data = self._videos.get(key)
        if data is not None:
            return data
        inputs = self._inputs_of(task)
        data = render_mp4(inputs, generation=task.media_generation, label=task.task_id)
        return self._store(key, data)
