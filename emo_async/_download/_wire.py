"""HTTP details of a ranged download: Content-Range, retryable failures, OSS error bodies."""

from __future__ import annotations

import re

import aiohttp

CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*$", re.IGNORECASE)
ERROR_BODY_LIMIT = 16 * 1024


def _parse_content_range(value: str | None) -> tuple[int | None, int | None, int | None] | None:
    if value is None:
        return None
    match = CONTENT_RANGE.match(value)
    if match is None:
        return None
    start, end, total = match.groups()
    return (
        int(start) if start is not None else None,
        int(end) if end is not None else None,
        int(total) if total != "*" else None,
    )


class _Retry(Exception):
    """An attempt failed in a way that another attempt may fix."""

    def __init__(self, reason: str, *, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


_BROKEN_STREAM: tuple[type[BaseException], ...] = (
    aiohttp.ClientPayloadError,
    aiohttp.ClientConnectionError,
    TimeoutError,
)


def _salvage(content: aiohttp.StreamReader) -> bytes:
    # Once a stream holds an exception (a cut connection), aiohttp's readers raise it and drop
    # the body bytes still buffered. Those bytes arrived intact; keeping them means the resume
    # asks for exactly what is missing. Private API, so any surprise just means "nothing".
    read_nowait = getattr(content, "_read_nowait", None)
    if read_nowait is None:
        return b""
    try:
        data = read_nowait(-1)
    except Exception:
        return b""
    return data if isinstance(data, bytes) else b""


def _strong(etag: str) -> bool:
    # RFC 9110 §13.1.5: If-Range needs a strong validator.
    return not etag.startswith("W/")


def _oss_message(body: bytes) -> str:
    text = body.decode("utf-8", errors="replace")
    match = re.search(r"<Message>(.*?)</Message>", text, re.DOTALL)
    if match:
        return match.group(1).strip()[:200]
    return text.strip()[:200]
