"""Input sniffing (real formats from the bytes), the face "detector" and result videos.

All functions here are synchronous and CPU-bound: callers run the image and MP3 parsers in a
worker thread.
"""

from __future__ import annotations

import hashlib
import io
import math
import random
import struct
from typing import Literal

import attrs

__all__ = [
    "AudioInfo",
    "ImageInfo",
    "expand_box",
    "sniff_audio",
    "sniff_image",
    "video_bytes",
]

Box = tuple[int, int, int, int]

#: Formats the emo-v1 document accepts (Pillow's names; MPO is a multi-picture JPEG).
IMAGE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "WEBP"})
MIN_SIDE = 400
MAX_SIDE = 7000
#: PNG text chunk whose value names a content error (see the package docstring).
TRIGGER_KEY = "emo-sim"


@attrs.frozen(kw_only=True)
class ImageInfo:
    """What the simulator learned from an image's bytes."""

    format: str
    width: int
    height: int
    sha256: str
    trigger: str | None
    face: Box | None

    @property
    def resolution_ok(self) -> bool:
        """Shortest side ≥ 400 px and longest side ≤ 7000 px."""
        return min(self.width, self.height) >= MIN_SIDE and max(self.width, self.height) <= MAX_SIDE


@attrs.frozen(kw_only=True)
class AudioInfo:
    """What the simulator learned from an audio file's bytes."""

    format: Literal["wav", "mp3"]
    duration: float
    sha256: str
    size: int


def sniff_image(data: bytes) -> ImageInfo | None:
    """Parse an image; None if it is not a JPEG, PNG, BMP or WEBP image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format or ""
            if fmt not in IMAGE_FORMATS:
                return None
            width, height = im.size
            trigger: str | None = None
            if fmt == "PNG":
                text = im.info.get(TRIGGER_KEY)
                trigger = str(text) if text is not None else None
            face: Box | None = None
            if min(width, height) >= MIN_SIDE and max(width, height) <= MAX_SIDE:
                face = _find_face(im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return ImageInfo(
        format=fmt,
        width=width,
        height=height,
        sha256=hashlib.sha256(data).hexdigest(),
        trigger=trigger,
        face=face,
    )


def _find_face(im: object) -> Box:
    """The "face": the top of whatever differs from the background.

    The background of each row is estimated from its two edge pixels (so vertical gradients
    and vignettes are background, not subject); pixels further than a threshold from it are
    the subject. The head is the subject's top: the horizontal extent of the subject in the
    upper quarter of its height, and 1.25 x that width tall. A plain image, or one whose
    subject fills the frame (a photo), gets a centred box (30 % of the short side, centre at
    42 % of the height).
    """
    from PIL import Image

    assert isinstance(im, Image.Image)
    width, height = im.size
    if im.format == "JPEG":
        im.draft("RGB", (256, 256))
    small = im.convert("RGB")
    small.thumbnail((128, 128))
    sw, sh = small.size
    px = small.load()
    assert px is not None
    rows: list[tuple[int, int] | None] = []
    for y in range(sh):
        left, right = px[0, y], px[sw - 1, y]
        assert isinstance(left, tuple)
        assert isinstance(right, tuple)
        bg = [(int(a) + int(b)) / 2 for a, b in zip(left, right, strict=False)]
        xs = [x for x in range(sw) if _distance(px[x, y], bg) > 36]
        rows.append((xs[0], xs[-1] + 1) if len(xs) >= 2 else None)
    head = _head_rows(rows, sw)
    if head is not None:
        x1, top, x2, y2 = head
        fx, fy = width / sw, height / sh
        return (
            max(0, math.floor(x1 * fx)),
            max(0, math.floor(top * fy)),
            min(width, math.ceil(x2 * fx)),
            min(height, math.ceil(y2 * fy)),
        )
    side = max(2, round(0.3 * min(width, height)))
    cx, cy = width / 2, 0.42 * height
    x1 = min(max(0, round(cx - side / 2)), width - side)
    y1 = min(max(0, round(cy - side / 2)), height - side)
    return (x1, y1, x1 + side, y1 + side)


def _distance(pixel: object, bg: list[float]) -> float:
    if not isinstance(pixel, tuple):
        return 0.0
    return sum(abs(int(c) - g) for c, g in zip(pixel, bg, strict=False))


def _head_rows(rows: list[tuple[int, int] | None], sw: int) -> tuple[int, int, int, int] | None:
    """The head in the per-row subject extents: from the first row down, until a sudden
    widening (the shoulders), a gap, or 1.25 x its width in height."""
    start = next((y for y, r in enumerate(rows) if r is not None), None)
    if start is None:
        return None
    first = rows[start]
    assert first is not None
    x1, x2 = first
    max_w = x2 - x1
    end = start + 1
    for y in range(start + 1, len(rows)):
        r = rows[y]
        if r is None:
            break
        w = r[1] - r[0]
        if y - start > 0.3 * (x2 - x1) and w > 1.4 * max_w + 2:
            break  # the shoulders (ears and hair widen a head far less)
        nx1, nx2 = min(x1, r[0]), max(x2, r[1])
        if y + 1 - start > 1.25 * (nx2 - nx1) + 1:
            break
        x1, x2, max_w, end = nx1, nx2, max(max_w, w), y + 1
    if not (2 <= x2 - x1 < 0.9 * sw) or start >= 0.9 * len(rows):
        return None
    return (x1, start, x2, end)


def expand_box(face: Box, width: int, height: int, ratio: str) -> Box | None:
    """The dynamic region (``ext_bbox``) around a face: exactly 1:1 or 3:4, inside the image,
    containing the face; None when no such box exists (the person is too large)."""
    a, b = (1, 1) if ratio == "1:1" else (3, 4)
    fx1, fy1, fx2, fy2 = face
    fw, fh = fx2 - fx1, fy2 - fy1
    k_min = max(math.ceil(fw / a), math.ceil(fh / b), 1)
    k_max = min(width // a, height // b)
    if k_min > k_max:
        return None
    # A head shot is about twice the face height; a half-body about 3.2 face heights.
    k = min(max(round(fh * (2.0 if ratio == "1:1" else 3.2) / b), k_min), k_max)
    w, h = a * k, b * k
    face_cy = (fy1 + fy2) / 2
    want_x = round((fx1 + fx2) / 2 - w / 2)
    want_y = round(face_cy - (0.5 if ratio == "1:1" else 0.3) * h)
    x1 = min(max(want_x, max(0, fx2 - w)), min(fx1, width - w))
    y1 = min(max(want_y, max(0, fy2 - h)), min(fy1, height - h))
    return (x1, y1, x1 + w, y1 + h)


def sniff_audio(data: bytes) -> AudioInfo | None:
    """Parse a WAV or MP3 file; None for any other type (or an unreadable file)."""
    digest = hashlib.sha256(data).hexdigest()
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        duration = _wav_duration(data)
        if duration is None:
            return None
        return AudioInfo(format="wav", duration=duration, sha256=digest, size=len(data))
    if data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0):
        duration = _mp3_duration(data)
        if duration is None:
            return None
        return AudioInfo(format="mp3", duration=duration, sha256=digest, size=len(data))
    return None


def _wav_duration(data: bytes) -> float | None:
    pos = 12
    byte_rate = 0
    while pos + 8 <= len(data):
        chunk_id = data[pos : pos + 4]
        (size,) = struct.unpack_from("<I", data, pos + 4)
        body = pos + 8
        if chunk_id == b"fmt " and size >= 16 and body + 16 <= len(data):
            byte_rate = struct.unpack_from("<I", data, body + 8)[0]
        elif chunk_id == b"data":
            if byte_rate <= 0:
                return None
            # Streaming writers leave the size at 0 or 0xFFFFFFFF: trust the bytes present.
            available = len(data) - body
            data_size = available if size in (0, 0xFFFFFFFF) else min(size, available)
            return data_size / byte_rate
        pos = body + size + (size & 1)
    return None


def _mp3_duration(data: bytes) -> float | None:
    from mutagen import MutagenError
    from mutagen.mp3 import MP3

    try:
        audio = MP3(io.BytesIO(data))  # type: ignore[no-untyped-call]
    except (MutagenError, ValueError, struct.error, EOFError):
        return None
    length = float(getattr(audio.info, "length", 0.0) or 0.0)
    return length if length > 0 else None


_FTYP = b"\x00\x00\x00\x1cftypisom\x00\x00\x02\x00isomiso2avc1mp41"


def video_bytes(seed: int, task_id: str, generation: int, size: int) -> bytes:
    """Deterministic stand-in for a result video: an MP4 ``ftyp`` box, then one ``mdat`` box of
    seeded pseudo-random bytes, ``size`` bytes in all (at least 64)."""
    size = max(64, size)
    payload = random.Random(f"{seed}:{task_id}:{generation}").randbytes(size - len(_FTYP) - 8)
    return _FTYP + struct.pack(">I", size - len(_FTYP)) + b"mdat" + payload
