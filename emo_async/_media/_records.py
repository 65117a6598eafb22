"""The records of media validation: the documented limits, what a header says, and a job
whose inputs passed every check."""

from __future__ import annotations

from pathlib import Path
from typing import Final, Literal, TypeAlias

import attrs

from .._models import Job

InputKind: TypeAlias = Literal["local", "url", "oss"]


@attrs.frozen(kw_only=True)
class MediaLimits:
    """The documented input limits of emo-v1 (see ``reference/emo-v1-api.zh.txt``)."""

    image_formats: frozenset[str] = frozenset({"jpeg", "png", "bmp", "webp"})
    #: File-name spellings the document lists; "jpg" and "jpeg" are the same bytes.
    image_format_names: str = "jpg, jpeg, png, bmp, webp"
    image_min_side: int = 400
    image_max_side: int = 7000
    audio_formats: frozenset[str] = frozenset({"wav", "mp3"})
    audio_format_names: str = "wav, mp3"
    # The document says "< 15M" (error text: "larger than 15MB") without saying whether M is
    # 10**6 or 2**20. We take the stricter reading, 15 * 1000 * 1000 bytes, so a file we pass is
    # never refused by the server for its size (15 MiB would let 15.0-15.7 MB files through).
    audio_max_bytes: int = 15 * 1000 * 1000
    #: Exclusive: the duration must be strictly less than this.
    audio_max_seconds: float = 60.0
    style_levels: tuple[str, ...] = ("normal", "calm", "active")
    ratios: tuple[str, ...] = ("1:1", "3:4")


LIMITS: Final = MediaLimits()


class MediaProbeError(ValueError):
    """A file could not be read as media: missing, unreadable, empty, corrupt or unknown."""


@attrs.frozen
class ImageInfo:
    """What an image's header says.

    Attributes:
        format: ``"jpeg"``, ``"png"``, ``"bmp"``, ``"webp"``, or another name Pillow gives
            (``"gif"``, ``"tiff"``...), lower case.
        width, height: Pixels.
        size: File size in bytes.
    """

    format: str
    width: int
    height: int
    size: int


@attrs.frozen
class AudioInfo:
    """What an audio file's header says.

    Attributes:
        format: ``"wav"``, ``"mp3"`` or another name (``"mp2"``...).
        duration: Seconds.
        size: File size in bytes.
        sample_rate: Hz.
        channels: Channel count.
    """

    format: str
    duration: float
    size: int
    sample_rate: int
    channels: int


@attrs.frozen
class PreparedInput:
    """One input of a job, classified, probed and hashed.

    Attributes:
        source: The value as the job gave it.
        kind: ``"local"`` (a file), ``"url"`` (http/https) or ``"oss"`` (an ``oss://`` upload).
        path: The local file (``local`` only).
        url: The URL (``url`` and ``oss`` only).
        digest: SHA-256 hex of the file's content; for URLs, of ``"url:" + url``.
        image: The image header (local images only).
        audio: The audio header (local audio only).
    """

    source: str | Path
    kind: InputKind
    path: Path | None
    url: str | None
    digest: str
    image: ImageInfo | None = None
    audio: AudioInfo | None = None


@attrs.frozen
class ValidatedJob:
    """A job whose inputs passed every local check.

    Attributes:
        job: The job.
        image, audio: Its prepared inputs.
        ratio: The effective ratio: the job's, else the aspect of its ``ext_bbox``, else 1:1.
    """

    job: Job
    image: PreparedInput
    audio: PreparedInput
    ratio: str

    @property
    def billed_seconds_estimate(self) -> float | None:
        """The audio duration (what emo-v1 bills), when the audio is a local file."""
        return self.audio.audio.duration if self.audio.audio is not None else None
