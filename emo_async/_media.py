"""Local validation of a job's inputs, before anything is uploaded, detected or billed.

Formats are told from the bytes, never from the file name: a PNG named ``.jpg`` is a PNG, and
a text file named ``.wav`` is refused as text. Image headers are read with Pillow and audio
durations with mutagen; both are imported on first use so ``import emo_async`` stays light.
File work runs in worker threads (one hop per file); the event loop never blocks.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import stat
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import attrs

from ._exceptions import InputError, Problem
from ._models import Job

if TYPE_CHECKING:
    import aiohttp

__all__ = [
    "LIMITS",
    "AudioInfo",
    "Estimate",
    "ImageInfo",
    "MediaLimits",
    "MediaProbeError",
    "PreparedInput",
    "ValidatedJob",
    "check_audio",
    "check_boxes",
    "check_image",
    "check_ratio",
    "check_style",
    "estimate",
    "probe_audio",
    "probe_image",
    "sha256_file",
    "validate_job",
]

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

_CHUNK = 1024 * 1024
_SNIFF = 64
_URL_CHECK_TIMEOUT = 15.0


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


# --------------------------------------------------------------------------------------------
# Sniffing and probing (sync; called from worker threads).


def _sniff(head: bytes) -> str | None:
    """Name the format of a file from its first bytes, or None when unknown."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head.startswith(b"BM"):
        return "bmp"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    if head.startswith(b"ID3"):
        return "mp3"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        version = (head[1] >> 3) & 0x3
        layer = (head[1] >> 1) & 0x3
        # Version 01 and layer 00 are reserved; ADTS AAC (0xFFF1/0xFFF9) has layer 00.
        if version != 1 and layer != 0:
            return {1: "mp3", 2: "mp2", 3: "mp1"}[layer]
        if layer == 0:
            return "aac"
    if head.startswith(b"OggS"):
        return "ogg"
    if head.startswith(b"fLaC"):
        return "flac"
    if head[4:8] == b"ftyp":
        return "mp4"
    if head.startswith(b"FORM") and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head.startswith(b"#!AMR"):
        return "amr"
    if head.startswith(b"%PDF"):
        return "pdf"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if _looks_like_text(head):
        return "text"
    return None


def _looks_like_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # The sniff window may cut a multi-byte character in half.
        try:
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text)
    return printable >= 0.95 * len(text)


_IMAGE_KINDS = frozenset({"png", "jpeg", "webp", "gif", "bmp", "tiff"})
_AUDIO_KINDS = frozenset({"wav", "mp3", "mp2", "mp1", "aac", "ogg", "flac", "mp4", "aiff", "amr"})


def _describe(kind: str) -> str:
    if kind == "text":
        return "a text file"
    if kind in _AUDIO_KINDS:
        return f"{kind.upper()} audio"
    if kind in _IMAGE_KINDS:
        return f"a {kind.upper()} image"
    return f"a {kind.upper()} file"


def _open_checked(path: Path) -> tuple[int, bytes]:
    """Stat and read the first bytes of ``path``, turning OS errors into probe errors."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MediaProbeError(f"{str(path)!r} does not exist") from None
    except PermissionError:
        raise MediaProbeError(f"{str(path)!r} cannot be read: permission denied") from None
    except OSError as exc:
        raise MediaProbeError(f"{str(path)!r} cannot be read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise MediaProbeError(f"{str(path)!r} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise MediaProbeError(f"{str(path)!r} is not a regular file")
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF)
    except PermissionError:
        raise MediaProbeError(f"{str(path)!r} cannot be read: permission denied") from None
    except IsADirectoryError:
        raise MediaProbeError(f"{str(path)!r} is a directory, not a file") from None
    except OSError as exc:
        raise MediaProbeError(f"{str(path)!r} cannot be read: {exc.strerror or exc}") from None
    if st.st_size == 0 or not head:
        raise MediaProbeError(f"{str(path)!r} is empty (0 bytes)")
    return st.st_size, head


def probe_image(path: str | os.PathLike[str]) -> ImageInfo:
    """Read an image's format and dimensions from its header.

    Args:
        path: A local file.

    Returns:
        Its :class:`ImageInfo`; the format comes from the bytes, not the name.

    Raises:
        MediaProbeError: Missing, unreadable, a directory, empty, not an image, or a corrupt
            or truncated header.
    """
    p = Path(path)
    size, head = _open_checked(p)
    kind = _sniff(head)
    if kind is not None and kind not in _IMAGE_KINDS:
        raise MediaProbeError(f"{str(p)!r} is {_describe(kind)}, not an image")

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Only the header is read; a huge size is reported as a size problem instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                with Image.open(p) as im:
                    fmt, (width, height) = im.format, im.size
            except Image.DecompressionBombError:
                fmt, (width, height) = _open_without_bomb_check(p, head)
    except UnidentifiedImageError:
        if kind is not None:
            # The magic bytes say what it is; Pillow could not read the rest of the header.
            raise MediaProbeError(
                f"{str(p)!r} has a truncated or corrupt {kind.upper()} header"
            ) from None
        raise MediaProbeError(f"{str(p)!r} is not an image in a format we know") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError) as exc:
        what = (kind or "image").upper()
        raise MediaProbeError(
            f"{str(p)!r} has a truncated or corrupt {what} header ({exc})"
        ) from None
    name = (fmt or kind or "unknown").lower()
    if name == "mpo":
        # Phone cameras write MPO: a JPEG stream with extra pictures appended.
        name = "jpeg"
    if width <= 0 or height <= 0:
        raise MediaProbeError(f"{str(p)!r} has an invalid size {width}x{height}")
    return ImageInfo(format=name, width=int(width), height=int(height), size=size)


def _open_without_bomb_check(p: Path, head: bytes) -> tuple[str | None, tuple[int, int]]:
    # Image.open refuses sizes beyond 2x MAX_IMAGE_PIXELS before we can read them; the format
    # plugins themselves do not, and we only need the header.
    from PIL import Image

    Image.init()
    with open(p, "rb") as fp:
        for ident in Image.ID:
            factory, accept = Image.OPEN[ident]
            if accept is not None and not accept(head):
                continue
            fp.seek(0)
            im = factory(fp, str(p))
            try:
                return im.format, im.size
            finally:
                im.close()
    raise MediaProbeError(f"{str(p)!r} is not an image in a format we know")


def probe_audio(path: str | os.PathLike[str]) -> AudioInfo:
    """Read an audio file's format, duration, sample rate and channels from its headers.

    Args:
        path: A local file.

    Returns:
        Its :class:`AudioInfo`; the format comes from the bytes, not the name.

    Raises:
        MediaProbeError: Missing, unreadable, a directory, empty, not WAV/MP3 audio, or a
            corrupt or truncated header.
    """
    p = Path(path)
    size, head = _open_checked(p)
    kind = _sniff(head)
    if kind not in ("wav", "mp3", "mp2", "mp1"):
        what = f"is {_describe(kind)}" if kind else "holds no audio format we know"
        raise MediaProbeError(f"{str(p)!r} {what}, not WAV or MP3 audio")

    import mutagen

    try:
        if kind == "wav":
            from mutagen.wave import WAVE

            winfo: Any = WAVE(p).info  # type: ignore[no-untyped-call]
            fmt = "wav"
        else:
            from mutagen.mp3 import MP3

            winfo = MP3(p).info  # type: ignore[no-untyped-call]
            layer = int(getattr(winfo, "layer", 3) or 3)
            fmt = "mp3" if layer == 3 else f"mp{layer}"
    except (mutagen.MutagenError, OSError, ValueError, EOFError) as exc:
        raise MediaProbeError(
            f"{str(p)!r} has a truncated or corrupt {kind.upper()} header ({exc})"
        ) from None
    duration = float(getattr(winfo, "length", 0.0) or 0.0)
    sample_rate = int(getattr(winfo, "sample_rate", 0) or 0)
    channels = int(getattr(winfo, "channels", 0) or 0)
    if not math.isfinite(duration) or sample_rate <= 0:
        raise MediaProbeError(f"{str(p)!r} has a corrupt {kind.upper()} header (no sample rate)")
    return AudioInfo(
        format=fmt, duration=duration, size=size, sample_rate=sample_rate, channels=channels
    )


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of a file, read in 1 MiB chunks so memory stays flat."""
    return _hash_file(path, 0)[0]


def _hash_file(path: str | os.PathLike[str], keep: int) -> tuple[str, bytes | None]:
    """SHA-256 (hex) of a file, and its bytes when it holds at most ``keep`` (else None)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if keep > 0:
            # One byte more than the file holds (at most the limit): a short read is the whole
            # file; a full one means it is over the limit, or grew, and the rest is hashed.
            want = min(keep, os.fstat(f.fileno()).st_size) + 1
            data = f.read(want)
            h.update(data)
            if len(data) < want:
                return h.hexdigest(), data
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest(), None


# --------------------------------------------------------------------------------------------
# Checks (pure; each returns every problem it finds).


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.2f}".rstrip("0").rstrip(".")


def check_image(info: ImageInfo) -> list[Problem]:
    """Problems of an image against the documented limits."""
    problems: list[Problem] = []
    if info.format not in LIMITS.image_formats:
        problems.append(
            Problem("image", f"format {info.format} is not accepted", LIMITS.image_format_names)
        )
    short, long = min(info.width, info.height), max(info.width, info.height)
    if short < LIMITS.image_min_side:
        problems.append(
            Problem(
                "image",
                f"shortest side {short} px ({info.width}x{info.height}) is too small",
                f">= {LIMITS.image_min_side} px",
            )
        )
    if long > LIMITS.image_max_side:
        problems.append(
            Problem(
                "image",
                f"longest side {long} px ({info.width}x{info.height}) is too large",
                f"<= {LIMITS.image_max_side} px",
            )
        )
    return problems


def _size_limit_text() -> str:
    return f"< {LIMITS.audio_max_bytes:,} bytes (15 MB)"


def check_audio(info: AudioInfo) -> list[Problem]:
    """Problems of an audio file against the documented limits."""
    problems: list[Problem] = []
    if info.format not in LIMITS.audio_formats:
        problems.append(
            Problem("audio", f"format {info.format} is not accepted", LIMITS.audio_format_names)
        )
    if info.size >= LIMITS.audio_max_bytes:
        problems.append(
            Problem("audio", f"size {info.size:,} bytes is too large", _size_limit_text())
        )
    if info.duration >= LIMITS.audio_max_seconds:
        problems.append(
            Problem(
                "audio",
                f"duration {_fmt_s(info.duration)} s is too long",
                f"< {_fmt_s(LIMITS.audio_max_seconds)} s",
            )
        )
    elif info.duration <= 0:
        problems.append(Problem("audio", "duration 0 s: the file holds no sound", "> 0 s"))
    return problems


def check_style(style_level: object) -> list[Problem]:
    """Problems of a ``style_level`` (one of normal, calm, active)."""
    if isinstance(style_level, str) and style_level in LIMITS.style_levels:
        return []
    return [
        Problem(
            "style_level",
            f"style_level {style_level!r} is not accepted",
            " | ".join(LIMITS.style_levels),
        )
    ]


def check_ratio(ratio: object) -> list[Problem]:
    """Problems of a ``ratio`` (None, ``"1:1"`` or ``"3:4"``)."""
    if ratio is None or (isinstance(ratio, str) and ratio in LIMITS.ratios):
        return []
    return [Problem("ratio", f"ratio {ratio!r} is not accepted", " | ".join(LIMITS.ratios))]


def _box_shape(field: str, box: object) -> tuple[tuple[int, int, int, int] | None, list[Problem]]:
    shape = "4 integers [x1, y1, x2, y2]"
    if isinstance(box, str | bytes) or not isinstance(box, Sequence):
        return None, [Problem(field, f"{field} {box!r} is not a list", shape)]
    items = list(box)
    if len(items) != 4:
        return None, [Problem(field, f"{field} {box!r} has {len(items)} values", shape)]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        return None, [Problem(field, f"{field} {box!r} holds values that are not integers", shape)]
    x1, y1, x2, y2 = items
    problems: list[Problem] = []
    if x1 >= x2 or y1 >= y2:
        problems.append(
            Problem(field, f"{field} {items!r} is empty or inverted", "x1 < x2, y1 < y2")
        )
    if min(items) < 0:
        problems.append(Problem(field, f"{field} {items!r} has a negative coordinate", ">= 0"))
    return (x1, y1, x2, y2), problems


def _aspect_of(box: tuple[int, int, int, int]) -> str | None:
    """``"1:1"`` or ``"3:4"`` (width:height) when the box has that aspect within ±1 px."""
    w, h = box[2] - box[0], box[3] - box[1]
    if w <= 0 or h <= 0:
        return None
    for name, (a, b) in (("1:1", (1, 1)), ("3:4", (3, 4))):
        # ±1 px of rounding on either side: the detector rounds its box to whole pixels.
        if abs(w - h * a / b) <= 1 or abs(h - w * b / a) <= 1:
            return name
    return None


def check_boxes(
    face_bbox: object,
    ext_bbox: object,
    image: ImageInfo | None,
    *,
    ratio: str | None = None,
) -> list[Problem]:
    """Problems of the detection boxes a job carries.

    Both boxes or neither (then detection supplies them). Each is 4 integers
    ``[x1, y1, x2, y2]`` with ``x1 < x2`` and ``y1 < y2``, inside the image when its size is
    known; ``ext_bbox`` has aspect (width:height) 1:1 or 3:4 within ±1 px, matching ``ratio``
    when one is asked for; the face lies inside ``ext_bbox``.
    """
    if face_bbox is None and ext_bbox is None:
        return []
    if face_bbox is None or ext_bbox is None:
        given, missing = (
            ("ext_bbox", "face_bbox") if face_bbox is None else ("face_bbox", "ext_bbox")
        )
        return [Problem(missing, f"{given} was given without {missing}", "both boxes or neither")]
    face, problems = _box_shape("face_bbox", face_bbox)
    ext, ext_problems = _box_shape("ext_bbox", ext_bbox)
    problems += ext_problems
    if image is not None:
        for field, box in (("face_bbox", face), ("ext_bbox", ext)):
            if box is not None and (box[2] > image.width or box[3] > image.height):
                problems.append(
                    Problem(
                        field,
                        f"{field} {list(box)!r} reaches outside the {image.width}x{image.height} "
                        "image",
                        f"x2 <= {image.width}, y2 <= {image.height}",
                    )
                )
    if ext is not None and ext[2] > ext[0] and ext[3] > ext[1]:
        aspect = _aspect_of(ext)
        w, h = ext[2] - ext[0], ext[3] - ext[1]
        if aspect is None:
            problems.append(
                Problem(
                    "ext_bbox",
                    f"ext_bbox {list(ext)!r} is {w}x{h}, neither 1:1 nor 3:4 (width:height)",
                    "aspect 1:1 or 3:4, ±1 px",
                )
            )
        elif ratio in LIMITS.ratios and aspect != ratio:
            problems.append(
                Problem(
                    "ext_bbox",
                    f"ext_bbox {list(ext)!r} is {aspect} but the job asks for ratio {ratio}",
                    f"aspect {ratio}",
                )
            )
    if face is not None and ext is not None:
        if not (
            face[0] >= ext[0] and face[1] >= ext[1] and face[2] <= ext[2] and face[3] <= ext[3]
        ):
            problems.append(
                Problem(
                    "face_bbox",
                    f"face_bbox {list(face)!r} is not inside ext_bbox {list(ext)!r}",
                    "face_bbox inside ext_bbox",
                )
            )
    return problems


# --------------------------------------------------------------------------------------------
# Prepared inputs and validated jobs.


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


@attrs.frozen
class _Source:
    field: str
    source: str | Path
    kind: InputKind
    path: Path | None = None
    url: str | None = None


_Probed: TypeAlias = "tuple[ImageInfo | AudioInfo, str] | MediaProbeError"


def _classify(field: str, value: object) -> _Source | Problem:
    if isinstance(value, os.PathLike):
        return _Source(field, Path(value), "local", path=Path(value))
    if not isinstance(value, str):
        return Problem(field, f"{value!r} is neither a path nor a URL", "path or http(s) URL")
    text = value.strip()
    if not text:
        return Problem(field, "no file given (empty string)", "path or http(s) URL")
    scheme, sep, _ = text.partition(":")
    # "C:\\x.png" has a one-letter "scheme": a Windows drive, i.e. a path.
    if (
        not sep
        or len(scheme) < 2
        or not scheme.replace("+", "").replace("-", "").replace(".", "").isalnum()
    ):
        return _Source(field, value, "local", path=Path(value))
    scheme = scheme.lower()
    allowed = "http://, https:// or oss://"
    if scheme not in ("http", "https", "oss"):
        hint = "; pass a local path instead" if scheme == "file" else ""
        return Problem(
            field, f"URL scheme {scheme}: of {_short(text)} is not accepted{hint}", allowed
        )
    try:
        parts = urlsplit(text)
        host = parts.hostname if scheme != "oss" else parts.netloc
        _ = parts.port
    except ValueError as exc:
        return Problem(field, f"URL {_short(text)} is malformed ({exc})", allowed)
    if not host:
        return Problem(field, f"URL {_short(text)} has no host", allowed)
    kind: InputKind = "oss" if scheme == "oss" else "url"
    return _Source(field, value, kind, url=text)


def _short(text: str, n: int = 80) -> str:
    return repr(text if len(text) <= n else text[: n - 3] + "...")


#: (field, device, inode, size, mtime_ns, ctime_ns) -> (info, digest): a portrait shared by 800
#: jobs is probed and hashed once, not 800 times. The inode names the file whatever path leads
#: to it (no resolve() needed); a changed file has a new size, mtime or ctime (ctime cannot be
#: set back by hand).
_PROBE_CACHE: dict[tuple[str, int, int, int, int, int], tuple[ImageInfo | AudioInfo, str]] = {}
_PROBE_CACHE_MAX = 4096


def _prepare_local(field: str, path: Path) -> _Probed:
    return _prepare_keeping(field, path, 0)[0]


def _prepare_keeping(field: str, path: Path, keep: int) -> tuple[_Probed, bytes | None]:
    """Probe and hash a file (cached); also its bytes, when it was read now and holds at most
    ``keep`` (an upload can then send the very bytes that were hashed, without reading again)."""
    try:
        st = os.stat(path)
        cache_key = (field, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    except OSError:
        cache_key = None
    if cache_key is not None and cache_key in _PROBE_CACHE:
        return _PROBE_CACHE[cache_key], None
    try:
        info: ImageInfo | AudioInfo = probe_image(path) if field == "image" else probe_audio(path)
        digest, content = _hash_file(path, keep)
        result = (info, digest)
        if cache_key is not None:
            if len(_PROBE_CACHE) >= _PROBE_CACHE_MAX:
                _PROBE_CACHE.pop(next(iter(_PROBE_CACHE)))
            _PROBE_CACHE[cache_key] = result
        return result, content
    except MediaProbeError as exc:
        return exc, None
    except OSError as exc:
        # The file changed or vanished between the probe and the hash.
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
        return MediaProbeError(f"{str(path)!r} cannot be read: {reason}"), None


def _probe_problem(field: str, exc: MediaProbeError) -> Problem:
    limit = LIMITS.image_format_names if field == "image" else LIMITS.audio_format_names
    return Problem(field, str(exc), limit)


def _assemble(
    job: Job,
    sources: Sequence[_Source | Problem],
    probed: Mapping[tuple[str, Path], _Probed],
) -> tuple[ValidatedJob | None, list[Problem]]:
    problems: list[Problem] = []
    prepared: dict[str, PreparedInput] = {}
    for src in sources:
        if isinstance(src, Problem):
            problems.append(src)
            continue
        if src.kind == "local":
            assert src.path is not None
            result = probed[(src.field, src.path)]
            if isinstance(result, MediaProbeError):
                problems.append(_probe_problem(src.field, result))
                continue
            info, digest = result
            if isinstance(info, ImageInfo):
                problems += check_image(info)
                prepared[src.field] = PreparedInput(
                    src.source, "local", src.path, None, digest, image=info
                )
            else:
                problems += check_audio(info)
                prepared[src.field] = PreparedInput(
                    src.source, "local", src.path, None, digest, audio=info
                )
        else:
            assert src.url is not None
            digest = hashlib.sha256(("url:" + src.url).encode()).hexdigest()
            prepared[src.field] = PreparedInput(src.source, src.kind, None, src.url, digest)
    problems += check_style(job.style_level)
    problems += check_ratio(job.ratio)
    image = prepared.get("image")
    problems += check_boxes(
        job.face_bbox,
        job.ext_bbox,
        image.image if image is not None else None,
        ratio=job.ratio,
    )
    if problems or "image" not in prepared or "audio" not in prepared:
        return None, problems
    ratio = job.ratio
    if ratio is None and job.ext_bbox is not None:
        ratio = _aspect_of(job.ext_bbox)
    return (
        ValidatedJob(
            job=job, image=prepared["image"], audio=prepared["audio"], ratio=ratio or "1:1"
        ),
        problems,
    )


def _prepare_locals(
    keys: Iterable[tuple[str, Path]], keep: int
) -> tuple[dict[tuple[str, Path], _Probed], dict[str, bytes]]:
    probed: dict[tuple[str, Path], _Probed] = {}
    contents: dict[str, bytes] = {}
    for key in dict.fromkeys(keys):
        probed[key], content = _prepare_keeping(*key, keep)
        if content is not None:
            contents[key[0]] = content
    return probed, contents


async def _probe_all(
    keys: Iterable[tuple[str, Path]], limiter: anyio.CapacityLimiter | None = None
) -> dict[tuple[str, Path], _Probed]:
    results: dict[tuple[str, Path], _Probed] = {}

    async def one(key: tuple[str, Path]) -> None:
        results[key] = await anyio.to_thread.run_sync(
            _prepare_local, key[0], key[1], limiter=limiter
        )

    async with anyio.create_task_group() as tg:
        for key in dict.fromkeys(keys):
            tg.start_soon(one, key)
    return results


def _sources_of(job: Job) -> list[_Source | Problem]:
    return [_classify("image", job.image), _classify("audio", job.audio)]


def _local_keys(sources: Iterable[_Source | Problem]) -> list[tuple[str, Path]]:
    return [(s.field, s.path) for s in sources if isinstance(s, _Source) and s.path is not None]


async def validate_job(
    job: Job,
    *,
    check_urls: bool = False,
    session: aiohttp.ClientSession | None = None,
) -> ValidatedJob:
    """Check a job's inputs against the documented limits, before anything is spent.

    Local files are probed (from their bytes) and hashed in worker threads. ``http(s)://`` and
    ``oss://`` inputs are checked for their form only, unless ``check_urls`` is true and a
    ``session`` is given: then each http(s) URL gets a HEAD (or, if HEAD is refused, a
    ``Range: bytes=0-0`` GET) and must answer 2xx; audio must announce a size under the limit.
    The session should carry no API key: these requests go to third-party hosts.

    Args:
        job: The job.
        check_urls: Probe http(s) URLs over the network (off by default).
        session: The session for those probes.

    Returns:
        The :class:`ValidatedJob`, with content digests and the effective ratio.

    Raises:
        InputError: Listing every problem of the job at once.
    """
    validated, _ = await _validate(job, check_urls=check_urls, session=session, keep=0)
    return validated


async def validate_keeping(job: Job, keep: int) -> tuple[ValidatedJob, Mapping[str, bytes]]:
    """:func:`validate_job`, also returning the bytes of each local input of at most ``keep``
    bytes that was read (hashed) now: ``{"image": ..., "audio": ...}``, either may be missing.

    The batch uploads these very bytes instead of reading the files again.
    """
    return await _validate(job, check_urls=False, session=None, keep=keep)


async def _validate(
    job: Job, *, check_urls: bool, session: aiohttp.ClientSession | None, keep: int
) -> tuple[ValidatedJob, Mapping[str, bytes]]:
    sources = _sources_of(job)
    keys = _local_keys(sources)
    # One thread hop for the job's files, one after the other: the batch validates several
    # jobs at once, so a hop per file would only add overhead.
    probed: Mapping[tuple[str, Path], _Probed] = {}
    contents: Mapping[str, bytes] = {}
    if keys:
        probed, contents = await anyio.to_thread.run_sync(_prepare_locals, keys, keep)
    validated, problems = _assemble(job, sources, probed)
    if check_urls and session is not None:
        problems += await _check_urls(
            [s for s in sources if isinstance(s, _Source) and s.kind == "url"], session
        )
    if problems or validated is None:
        raise InputError(problems, job_name=job.display_name)
    return validated, contents


async def _check_urls(sources: Sequence[_Source], session: aiohttp.ClientSession) -> list[Problem]:
    found: dict[int, list[Problem]] = {}

    async def one(i: int, src: _Source) -> None:
        found[i] = await _check_url(src, session)

    async with anyio.create_task_group() as tg:
        for i, src in enumerate(sources):
            tg.start_soon(one, i, src)
    return [p for i in sorted(found) for p in found[i]]


async def _check_url(src: _Source, session: aiohttp.ClientSession) -> list[Problem]:
    import aiohttp

    assert src.url is not None
    url, field = src.url, src.field
    timeout = aiohttp.ClientTimeout(total=_URL_CHECK_TIMEOUT)
    size: int | None = None
    try:
        async with session.head(url, allow_redirects=True, timeout=timeout) as resp:
            status = resp.status
            size = _int_or_none(resp.headers.get("Content-Length"))
        # Many hosts refuse HEAD (405/501), and presigned URLs are often signed for GET only
        # (403); a one-byte ranged GET costs about the same and is what the server will do.
        if status >= 400 and status not in (404, 410):
            headers = {"Range": "bytes=0-0"}
            async with session.get(
                url, headers=headers, allow_redirects=True, timeout=timeout
            ) as resp:
                status = resp.status
                if status == 206:
                    total = resp.headers.get("Content-Range", "").rpartition("/")[2]
                    size = _int_or_none(total)
                else:
                    size = _int_or_none(resp.headers.get("Content-Length"))
    except (aiohttp.ClientError, TimeoutError) as exc:
        reason = str(exc) or type(exc).__name__
        return [Problem(field, f"URL {_short(url)} is unreachable: {reason}", "a reachable URL")]
    if status >= 400:
        return [Problem(field, f"URL {_short(url)} answered HTTP {status}", "HTTP 2xx")]
    if field == "audio" and size is not None and size >= LIMITS.audio_max_bytes:
        return [Problem("audio", f"URL {_short(url)} holds {size:,} bytes", _size_limit_text())]
    return []


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------
# Estimates.


@attrs.frozen
class Estimate:
    """What a batch would bill, from local files only (no request is made).

    Attributes:
        jobs: Jobs given.
        valid: Jobs that passed validation.
        billed_seconds: Sum of the valid jobs' audio durations (local audio only).
        by_ratio: Valid jobs per ratio, ``{"1:1": n, "3:4": m}``.
        billed_seconds_by_ratio: ``billed_seconds`` split the same way.
        unknown_duration: Valid jobs whose audio is a URL: counted, but their seconds are not
            in ``billed_seconds``.
        errors: One :class:`InputError` per invalid job.
    """

    jobs: int
    valid: int
    billed_seconds: float
    by_ratio: Mapping[str, int]
    billed_seconds_by_ratio: Mapping[str, float]
    unknown_duration: int
    errors: tuple[InputError, ...]


async def estimate(jobs: Iterable[Job]) -> Estimate:
    """Validate jobs locally and sum what they would bill, without any network request.

    Each distinct local file is probed and hashed once, however many jobs share it.
    """
    job_list = list(jobs)
    sources = [_sources_of(job) for job in job_list]
    keys = [key for srcs in sources for key in _local_keys(srcs)]
    probed = await _probe_all(keys, anyio.CapacityLimiter(8))
    by_ratio = {r: 0 for r in LIMITS.ratios}
    seconds_by_ratio = {r: 0.0 for r in LIMITS.ratios}
    errors: list[InputError] = []
    valid = unknown = 0
    for job, srcs in zip(job_list, sources, strict=True):
        validated, problems = _assemble(job, srcs, probed)
        if validated is None:
            errors.append(InputError(problems, job_name=job.display_name))
            continue
        valid += 1
        by_ratio[validated.ratio] = by_ratio.get(validated.ratio, 0) + 1
        seconds = validated.billed_seconds_estimate
        if seconds is None:
            unknown += 1
        else:
            seconds_by_ratio[validated.ratio] = seconds_by_ratio.get(validated.ratio, 0.0) + seconds
    return Estimate(
        jobs=len(job_list),
        valid=valid,
        billed_seconds=sum(seconds_by_ratio.values()),
        by_ratio=by_ratio,
        billed_seconds_by_ratio=seconds_by_ratio,
        unknown_duration=unknown,
        errors=tuple(errors),
    )
