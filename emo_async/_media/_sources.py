"""Where a job's inputs come from: local paths, http(s) and oss:// URLs, and the optional
network check of http(s) URLs."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import anyio
import attrs

from .._exceptions import Problem
from .._models import Job
from ._checks import _size_limit_text
from ._records import LIMITS, InputKind

if TYPE_CHECKING:
    import aiohttp

_URL_CHECK_TIMEOUT = 15.0


@attrs.frozen
class _Source:
    field: str
    source: str | Path
    kind: InputKind
    path: Path | None = None
    url: str | None = None


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


def _sources_of(job: Job) -> list[_Source | Problem]:
    return [_classify("image", job.image), _classify("audio", job.audio)]


def _local_keys(sources: Iterable[_Source | Problem]) -> list[tuple[str, Path]]:
    return [(s.field, s.path) for s in sources if isinstance(s, _Source) and s.path is not None]


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
