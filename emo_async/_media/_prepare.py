"""Probing and hashing a job's local files (cached by file identity), and assembling the
results into a validated job or its problems."""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TypeAlias

import anyio
import anyio.to_thread

from .._exceptions import Problem
from .._models import Job
from ._audio import probe_audio
from ._checks import _aspect_of, check_audio, check_boxes, check_image, check_ratio, check_style
from ._hashing import _hash_file
from ._image import probe_image
from ._records import LIMITS, AudioInfo, ImageInfo, MediaProbeError, PreparedInput, ValidatedJob
from ._sources import _Source

_Probed: TypeAlias = "tuple[ImageInfo | AudioInfo, str] | MediaProbeError"

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
