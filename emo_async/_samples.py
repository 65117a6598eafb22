"""Sample media for tests, the demo and the benchmarks: portraits, voices, silent MP3s.

Everything is synthesised with the standard library and Pillow (imported on first use), and is
deterministic for a given seed. These functions do blocking file I/O: call them from sync code
or through ``anyio.to_thread.run_sync``.
"""

from __future__ import annotations

import math
import os
import random
import struct
import sys
import wave
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ._models import Job

if TYPE_CHECKING:
    from PIL import ImageDraw

__all__ = ["make_portrait", "make_sample_set", "make_silent_mp3", "make_voice_wav"]

_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "bmp": "BMP", "webp": "WEBP"}

#: The PNG text chunk the simulator reads to fake emo-detect-v1 / emo-v1 verdicts.
TRIGGER_KEY = "emo-sim"

_RGB = tuple[int, int, int]


# --------------------------------------------------------------------------------------------
# Portraits.


def _mix(a: _RGB, b: _RGB, t: float) -> _RGB:
    return (
        round(a[0] + (b[0] - a[0]) * t),
        round(a[1] + (b[1] - a[1]) * t),
        round(a[2] + (b[2] - a[2]) * t),
    )


def _pick(rng: random.Random, colours: list[_RGB]) -> _RGB:
    return colours[rng.randrange(len(colours))]


_SKINS: list[_RGB] = [(241, 204, 178), (224, 172, 135), (198, 142, 102), (141, 94, 62)]
_HAIRS: list[_RGB] = [(40, 28, 20), (92, 58, 32), (170, 120, 60), (25, 25, 30), (120, 120, 125)]
_CLOTHES: list[_RGB] = [(52, 84, 140), (150, 50, 60), (60, 120, 80), (90, 90, 100), (200, 150, 60)]
_BACKS: list[_RGB] = [(200, 220, 235), (230, 225, 210), (210, 230, 215), (235, 215, 220)]


def _draw_person(
    draw: ImageDraw.ImageDraw, cx: float, w: int, h: int, scale: float, rng: random.Random
) -> None:
    skin, hair, cloth = _pick(rng, _SKINS), _pick(rng, _HAIRS), _pick(rng, _CLOTHES)
    head_w = scale * 0.34
    head_h = head_w * 1.28
    head_top = h * 0.16 + rng.uniform(-0.02, 0.02) * h
    head_bottom = head_top + head_h
    # Shoulders and body: a rounded trapezoid running off the bottom edge.
    shoulder_y = head_bottom + head_h * 0.22
    body_w = head_w * 2.6
    draw.rounded_rectangle(
        (cx - body_w / 2, shoulder_y, cx + body_w / 2, h + head_h),
        radius=max(1, int(head_w * 0.55)),
        fill=cloth,
    )
    # Collar and neck.
    neck_w = head_w * 0.38
    draw.rectangle(
        (cx - neck_w / 2, head_bottom - head_h * 0.1, cx + neck_w / 2, shoulder_y + 4),
        fill=_mix(skin, (0, 0, 0), 0.12),
    )
    draw.polygon(
        [(cx - neck_w, shoulder_y), (cx, shoulder_y + head_h * 0.35), (cx + neck_w, shoulder_y)],
        fill=_mix(skin, (0, 0, 0), 0.12),
    )
    # Hair behind the head, then the face.
    draw.ellipse(
        (cx - head_w * 0.58, head_top - head_h * 0.08, cx + head_w * 0.58, head_top + head_h * 0.8),
        fill=hair,
    )
    draw.ellipse((cx - head_w / 2, head_top, cx + head_w / 2, head_bottom), fill=skin)
    # Ears.
    for side in (-1, 1):
        ex = cx + side * head_w * 0.5
        draw.ellipse(
            (
                ex - head_w * 0.07,
                head_top + head_h * 0.42,
                ex + head_w * 0.07,
                head_top + head_h * 0.6,
            ),
            fill=skin,
        )
    # Fringe.
    draw.chord(
        (
            cx - head_w * 0.52,
            head_top - head_h * 0.06,
            cx + head_w * 0.52,
            head_top + head_h * 0.42,
        ),
        start=180,
        end=360,
        fill=hair,
    )
    # Eyes, brows, nose, mouth.
    eye_y = head_top + head_h * 0.47
    eye_dx = head_w * 0.19
    eye_r = max(1.0, head_w * 0.055)
    for side in (-1, 1):
        ex = cx + side * eye_dx
        draw.ellipse(
            (ex - eye_r * 1.6, eye_y - eye_r, ex + eye_r * 1.6, eye_y + eye_r), fill=(250, 250, 250)
        )
        draw.ellipse(
            (ex - eye_r * 0.8, eye_y - eye_r * 0.8, ex + eye_r * 0.8, eye_y + eye_r * 0.8),
            fill=(45, 35, 30),
        )
        brow_y = eye_y - eye_r * 2.4
        draw.line(
            (ex - eye_r * 1.8, brow_y, ex + eye_r * 1.8, brow_y - eye_r * 0.3),
            fill=_mix(hair, (0, 0, 0), 0.2),
            width=max(1, int(eye_r * 0.6)),
        )
    nose_y = head_top + head_h * 0.63
    draw.line(
        (cx, eye_y + eye_r, cx - head_w * 0.03, nose_y, cx + head_w * 0.02, nose_y),
        fill=_mix(skin, (0, 0, 0), 0.25),
        width=max(1, int(eye_r * 0.4)),
    )
    mouth_y = head_top + head_h * 0.76
    mouth_w = head_w * rng.uniform(0.18, 0.26)
    draw.chord(
        (cx - mouth_w, mouth_y - head_h * 0.05, cx + mouth_w, mouth_y + head_h * 0.06),
        start=0,
        end=180,
        fill=(170, 60, 70),
    )


def make_portrait(
    path: str | os.PathLike[str],
    *,
    size: tuple[int, int] = (512, 640),
    fmt: str | None = None,
    seed: int = 0,
    people: int = 1,
    trigger: str | None = None,
) -> Path:
    """Draw a cartoon head-and-shoulders portrait and save it.

    Args:
        path: Where to write it.
        size: ``(width, height)`` in pixels.
        fmt: ``png``, ``jpg``/``jpeg``, ``bmp`` or ``webp``; from the suffix when None.
        seed: Same seed, same picture.
        people: How many people to draw (0 gives an empty background).
        trigger: Written as the PNG text chunk ``emo-sim``; the simulator reads it to fake a
            model verdict (e.g. ``"InvalidFile.Content:none"``). PNG only.

    Returns:
        The path written.
    """
    from PIL import Image, ImageDraw, PngImagePlugin

    out = Path(path)
    key = (fmt or out.suffix.lstrip(".")).lower()
    if key not in _FORMATS:
        raise ValueError(f"unknown image format {key!r}; use one of {', '.join(_FORMATS)}")
    pil_format = _FORMATS[key]
    if trigger is not None and pil_format != "PNG":
        raise ValueError("a trigger is written as a PNG text chunk; use a .png portrait")
    if people < 0:
        raise ValueError("people must be >= 0")
    w, h = size
    rng = random.Random(seed)
    top = _pick(rng, _BACKS)
    bottom = _mix(top, (90, 100, 120), rng.uniform(0.25, 0.5))
    im = Image.new("RGB", (w, h), top)
    draw = ImageDraw.Draw(im)
    # A vertical gradient: each row is one flat line, which keeps PNGs of any width small.
    for y in range(h):
        draw.line((0, y, w, y), fill=_mix(top, bottom, y / max(1, h - 1)))
    if people:
        slot = w / people
        scale = min(slot * 1.1, h * 0.9)
        for i in range(people):
            _draw_person(draw, slot * (i + 0.5), w, h, scale, rng)
    save_kwargs: dict[str, object] = {}
    if pil_format == "PNG" and trigger is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text(TRIGGER_KEY, trigger)
        save_kwargs["pnginfo"] = info
    elif pil_format == "JPEG":
        save_kwargs["quality"] = 90
    out.parent.mkdir(parents=True, exist_ok=True)
    im.save(out, format=pil_format, **save_kwargs)
    return out


# --------------------------------------------------------------------------------------------
# Voices.

_TABLE_SIZE = 2048


def _vowel_tables() -> list[list[float]]:
    # Single-cycle waveforms whose harmonic weights crudely follow the first two formants of
    # /a/, /i/ and /u/ for a ~150 Hz voice, so syllables change colour like speech does.
    shapes = [
        [1.0, 0.8, 0.9, 0.7, 0.9, 0.5, 0.3, 0.2, 0.15, 0.1],
        [1.0, 0.9, 0.3, 0.15, 0.1, 0.1, 0.2, 0.35, 0.3, 0.25],
        [1.0, 0.9, 0.5, 0.25, 0.1, 0.05, 0.04, 0.03, 0.02, 0.02],
    ]
    tables = []
    for weights in shapes:
        total = sum(weights)
        tables.append(
            [
                sum(
                    a * math.sin(2 * math.pi * (k + 1) * i / _TABLE_SIZE)
                    for k, a in enumerate(weights)
                )
                / total
                for i in range(_TABLE_SIZE)
            ]
        )
    return tables


def _envelope(n: int = 256) -> list[float]:
    # A raised-cosine syllable: fast attack, slower decay.
    out = []
    for i in range(n):
        t = i / (n - 1)
        out.append(math.sin(math.pi * t**0.7) ** 2)
    return out


def _voice_chunks(frames: int, sample_rate: int, rng: random.Random) -> Iterator[array[int]]:
    """Yield 16-bit mono samples of a voice-like signal, ``frames`` in total, in chunks."""
    tables = _vowel_tables()
    env = _envelope()
    env_last = len(env) - 1
    mask = _TABLE_SIZE - 1
    base = rng.uniform(110.0, 220.0)
    peak = 0.55 * 32767
    phase = 0.0
    done = 0
    syllables_left = rng.randint(2, 5)
    while done < frames:
        if syllables_left == 0:
            # A pause between words or phrases.
            n = min(frames - done, int(sample_rate * rng.uniform(0.12, 0.45)))
            yield array("h", bytes(2 * n))
            done += n
            syllables_left = rng.randint(2, 6)
            continue
        syllables_left -= 1
        n = min(frames - done, int(sample_rate * rng.uniform(0.11, 0.28)))
        table = tables[rng.randrange(len(tables))]
        # The pitch glides within a syllable and drifts across the phrase.
        base = min(260.0, max(90.0, base * rng.uniform(0.93, 1.07)))
        f_start = base * rng.uniform(0.92, 1.12)
        f_end = base * rng.uniform(0.85, 1.05)
        gain = peak * rng.uniform(0.6, 1.0)
        step0 = f_start * _TABLE_SIZE / sample_rate
        dstep = (f_end - f_start) * _TABLE_SIZE / sample_rate / max(1, n)
        env_scale = env_last / max(1, n - 1)
        noise = rng.random
        chunk = array("h", bytes(2 * n))
        for i in range(n):
            phase += step0 + dstep * i
            v = table[int(phase) & mask] * env[int(i * env_scale)] * gain
            chunk[i] = int(v + (noise() - 0.5) * 300.0)
        phase %= _TABLE_SIZE
        yield chunk
        done += n


def _write_wav(path: Path, sample_rate: int, chunks: Iterator[array[int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        for chunk in chunks:
            if sys.byteorder == "big":  # pragma: no cover - WAV samples are little-endian
                chunk.byteswap()
            w.writeframes(chunk.tobytes())


def make_voice_wav(
    path: str | os.PathLike[str],
    seconds: float,
    *,
    sample_rate: int = 16000,
    seed: int = 0,
) -> Path:
    """Write a voice-like mono 16-bit WAV of exactly ``int(seconds * sample_rate)`` frames.

    Syllables with a gliding pitch and harmonics, separated by pauses; written in chunks so a
    59-second file needs little memory.

    Returns:
        The path written.
    """
    if seconds < 0:
        raise ValueError("seconds must be >= 0")
    out = Path(path)
    frames = int(seconds * sample_rate)
    _write_wav(out, sample_rate, _voice_chunks(frames, sample_rate, random.Random(seed)))
    return out


# --------------------------------------------------------------------------------------------
# Silent MP3.

_MP3_RATE = 44100
_MP3_BITRATE = 128000
_MP3_SAMPLES = 1152
# MPEG-1 Layer III, no CRC; 128 kbit/s (index 9), 44.1 kHz (index 0); mono.
_MP3_HEADER = (0xFF, 0xFB, 0x90, 0xC0)
_MP3_SIDE_INFO = 17  # mono MPEG-1


def _mp3_frame(padded: bool, payload: bytes = b"") -> bytes:
    length = 144 * _MP3_BITRATE // _MP3_RATE + (1 if padded else 0)
    header = bytes(
        (_MP3_HEADER[0], _MP3_HEADER[1], _MP3_HEADER[2] | (0x02 if padded else 0), _MP3_HEADER[3])
    )
    body = bytes(_MP3_SIDE_INFO) + payload
    return header + body + bytes(length - len(header) - len(body))


def make_silent_mp3(path: str | os.PathLike[str], seconds: float) -> Path:
    """Write a valid, silent MPEG-1 Layer III stream (128 kbit/s, 44.1 kHz, mono).

    Each frame is a header and a zero payload (zero-length main data decodes to silence). A
    Xing/"Info" frame up front states the frame count, so readers report the duration exactly:
    ``seconds`` rounded to a whole frame (1152 samples, about 26 ms).

    Returns:
        The path written.
    """
    if seconds < 0:
        raise ValueError("seconds must be >= 0")
    out = Path(path)
    frames = max(1, round(seconds * _MP3_RATE / _MP3_SAMPLES))
    # CBR encoders pad some frames so the average frame is exactly 144 * bitrate / rate bytes.
    exact = 144 * _MP3_BITRATE / _MP3_RATE
    info = b"Info" + struct.pack(">I", 0x1) + struct.pack(">I", frames)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:
        f.write(_mp3_frame(False, info))
        plain = _mp3_frame(False)
        padded = _mp3_frame(True)
        buf = bytearray()
        for i in range(frames):
            buf += padded if math.floor((i + 1) * exact) - math.floor(i * exact) > 417 else plain
            if len(buf) >= 1 << 20:
                f.write(buf)
                buf.clear()
        f.write(buf)
    return out


# --------------------------------------------------------------------------------------------
# Sample sets.


def make_sample_set(
    out_dir: str | os.PathLike[str],
    n_jobs: int,
    *,
    portraits: int = 1,
    seconds: tuple[float, float] = (2.0, 6.0),
    seed: int = 0,
) -> list[Job]:
    """Write ``portraits`` PNG portraits and ``n_jobs`` voice WAVs, and return their jobs.

    Jobs are named ``clip-0001``, ``clip-0002``...; job ``i`` uses portrait ``i % portraits``.
    Durations are drawn uniformly from ``seconds``. Every WAV has different content (so
    content-hash caches see distinct files), cut from one synthesised voice so large sets are
    quick to make.

    Returns:
        The jobs, in order.
    """
    if n_jobs < 0 or portraits < 1:
        raise ValueError("n_jobs must be >= 0 and portraits >= 1")
    lo, hi = seconds
    if not 0 < lo <= hi:
        raise ValueError("seconds must be (low, high) with 0 < low <= high")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    images = [
        make_portrait(out / f"portrait-{k + 1:02d}.png", seed=seed * 1000 + k)
        for k in range(portraits)
    ]
    sample_rate = 16000
    slack = 8.0
    bank = array("h")
    for chunk in _voice_chunks(int((hi + slack) * sample_rate), sample_rate, rng):
        bank.extend(chunk)
    span = len(bank) - int(hi * sample_rate)
    jobs: list[Job] = []
    for i in range(n_jobs):
        frames = int(rng.uniform(lo, hi) * sample_rate)
        start = rng.randrange(max(1, span))
        clip = bank[start : start + frames]
        # Stamp the job index into the first two samples (inaudible) so no two clips are equal.
        if len(clip) >= 2:
            clip[0], clip[1] = i % 32768, (i // 32768) % 32768
        wav = out / f"clip-{i + 1:04d}.wav"
        _write_wav(wav, sample_rate, iter([clip]))
        jobs.append(Job(images[i % portraits], wav, name=f"clip-{i + 1:04d}"))
    return jobs
