"""Tiny, deterministic test media for the simulator tests (no dependency on emo_async)."""

from __future__ import annotations

import io
import math
import struct
import wave
from collections.abc import Mapping
from typing import Any

import aiohttp
from PIL import Image, ImageDraw, PngImagePlugin

from emo_async.simulator import SimulatorConfig

#: Where ``portrait()`` draws its face (an ellipse on a plain background).
#: Exactly 10 simulated seconds of processing per task, whatever the audio.
FIXED = SimulatorConfig(
    processing_base=10.0, processing_per_audio_second=0.0, processing_jitter=0.0
)

FACE_BOX = (300, 250, 500, 480)


def portrait(
    size: tuple[int, int] = (800, 1000),
    fmt: str = "PNG",
    *,
    trigger: str | None = None,
    face: tuple[int, int, int, int] | None = FACE_BOX,
    shade: int = 0,
) -> bytes:
    """A plain light background with one skin-coloured ellipse (the "face").

    ``trigger`` adds the ``emo-sim`` PNG text chunk; ``shade`` varies the background so two
    images can differ in content.
    """
    image = Image.new("RGB", size, (240 - shade, 240, 240))
    if face is not None:
        ImageDraw.Draw(image).ellipse(face, fill=(200, 150, 120))
    buf = io.BytesIO()
    if fmt == "PNG" and trigger is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("emo-sim", trigger)
        image.save(buf, "PNG", pnginfo=info)
    else:
        image.save(buf, fmt)
    return buf.getvalue()


def wav(seconds: float = 3.0, *, rate: int = 8000, width: int = 1, channels: int = 1) -> bytes:
    """A silent PCM WAV of the given duration."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(width)
        out.setframerate(rate)
        out.writeframes(b"\x80" * width * channels * round(rate * seconds))
    return buf.getvalue()


def mp3(seconds: float = 2.0) -> bytes:
    """A minimal CBR MP3: MPEG-1 Layer III frame headers (128 kb/s, 44.1 kHz, mono) with zero
    payload. mutagen reads its duration from the frame count."""
    header = struct.pack(">I", 0xFFFB90C4)
    frame_len = 144 * 128_000 // 44_100  # 417 bytes, no padding
    frames = math.ceil(seconds * 44_100 / 1152)
    return (header + bytes(frame_len - 4)) * frames


def ogg() -> bytes:
    """The start of an Ogg stream: a real audio type the service does not accept."""
    return b"OggS\x00\x02" + bytes(20) + b"\x01vorbis" + bytes(64)


class FileServer:
    """Serves test files over loopback HTTP (what a user's own file host would be)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.origin = ""
        self.hits = 0

    def add(self, name: str, data: bytes) -> str:
        """Publish ``data`` at ``/name``; returns its URL."""
        self.files[name] = data
        return self.url(name)

    def url(self, name: str) -> str:
        """URL of ``/name`` (which need not exist)."""
        return f"{self.origin}/{name}"


DETECT_PATH = "/services/aigc/image2video/face-detect"
SUBMIT_PATH = "/services/aigc/image2video/video-synthesis/"


class Api:
    """A thin JSON caller for the simulator's API (tests read status, body and headers)."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, api_key: str) -> None:
        self.session = session
        self.base_url = base_url
        self.api_key = api_key

    async def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        auth: bool = True,
    ) -> tuple[int, dict[str, Any], Mapping[str, str]]:
        hdrs = {"Authorization": f"Bearer {self.api_key}"} if auth else {}
        hdrs.update(headers or {})
        async with self.session.request(
            method, self.base_url + path, json=json, data=data, headers=hdrs, params=params
        ) as resp:
            body = await resp.json(content_type=None)
            return resp.status, body, resp.headers

    async def detect(self, image_url: str, ratio: str = "1:1") -> tuple[int, dict[str, Any]]:
        status, body, _ = await self.call(
            "POST",
            DETECT_PATH,
            json={
                "model": "emo-detect-v1",
                "input": {"image_url": image_url},
                "parameters": {"ratio": ratio},
            },
        )
        return status, body

    async def submit(
        self, body: dict[str, Any], *, headers: Mapping[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        status, out, _ = await self.call(
            "POST",
            SUBMIT_PATH,
            json=body,
            headers={"X-DashScope-Async": "enable", **(headers or {})},
        )
        return status, out

    async def task(self, task_id: str) -> dict[str, Any]:
        status, body, _ = await self.call("GET", f"/tasks/{task_id}")
        assert status == 200, body
        return body


def job(
    image_url: str,
    audio_url: str,
    *,
    face: list[int] | None = None,
    ext: list[int] | None = None,
    style: str | None = "normal",
) -> dict[str, Any]:
    """An emo-v1 submit body (boxes default to what the simulator detects in ``portrait()``)."""
    body: dict[str, Any] = {
        "model": "emo-v1",
        "input": {
            "image_url": image_url,
            "audio_url": audio_url,
            "face_bbox": face if face is not None else [298, 250, 502, 485],
            "ext_bbox": ext if ext is not None else [165, 132, 635, 602],
        },
    }
    if style is not None:
        body["parameters"] = {"style_level": style}
    return body
