"""Checks of probed inputs and job options against the documented limits (pure; each returns
every problem it finds)."""

from __future__ import annotations

from collections.abc import Sequence

from .._exceptions import Problem
from ._records import LIMITS, AudioInfo, ImageInfo


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
