"""The public :class:`Downloader`: its session, its slots, and the checks before a transfer."""

from __future__ import annotations

import datetime as _dt
import logging
import math
from collections.abc import Collection
from pathlib import Path
from types import TracebackType

import aiohttp
import anyio
from yarl import URL

from .._config import DEFAULT_DOWNLOAD_TIMEOUTS, DEFAULT_RETRY_POLICY, RetryPolicy, Timeouts
from .._exceptions import ClientClosedError, DownloadError, ResultExpiredError
from .._version import __version__
from ._gate import _EDFGate
from ._transfer import _Transfer
from ._types import DownloadResult, DownloadStatistics
from ._urls import _aware, _now, _origin, _raise_if_expired, redact_url, url_deadline

__all__ = ["Downloader"]

logger = logging.getLogger("emo_async.download")

_USER_AGENT = f"emo_async/{__version__}"


class Downloader:
    """Streams result videos to disk: resumable, verified, atomic, earliest deadline first.

    It owns its own connection pool, whose only default header is ``User-Agent``: the API key
    never travels to a result host. Use it as ``async with Downloader() as dl:``.

    Args:
        max_concurrent: Downloads streaming at once; the others wait, the earliest URL deadline
            first.
        timeouts: ``connect`` and ``read`` (the longest gap between two reads) are used;
            downloads never have a total timeout.
        retry: ``attempts`` bounds consecutive failed attempts that received no new bytes (one
            that did resets the count); the waits are :meth:`RetryPolicy.backoff`'s, a
            ``Retry-After`` capped at ``retry_after_max``. ``timeout`` and the budget are not
            used: a download retries until its URL deadline.
        chunk_size: Bytes per write (and per hash update).
        forbidden_origins: URLs (or origins) that must never be downloaded from, e.g. the API
            host; any ``scheme://host:port`` that matches one of them is refused.
        safety_margin: Seconds. A backoff wait never runs into the last ``safety_margin``
            seconds before the URL deadline (the retry goes out earlier instead), and a
            download starting with less than this left is logged as a warning.
    """

    def __init__(
        self,
        *,
        max_concurrent: int = 4,
        timeouts: Timeouts = DEFAULT_DOWNLOAD_TIMEOUTS,
        retry: RetryPolicy = DEFAULT_RETRY_POLICY,
        chunk_size: int = 1 << 20,
        forbidden_origins: Collection[str] = (),
        safety_margin: float = 60.0,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        if safety_margin < 0:
            raise ValueError("safety_margin must not be negative")
        self.max_concurrent = max_concurrent
        self.timeouts = timeouts
        self.retry = retry
        self.chunk_size = chunk_size
        self.safety_margin = safety_margin
        self._forbidden = frozenset(_origin(URL(o)) for o in forbidden_origins)
        self._gate = _EDFGate(max_concurrent)
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._active_dests: set[str] = set()

    def __repr__(self) -> str:
        return f"Downloader(max_concurrent={self.max_concurrent}, chunk_size={self.chunk_size})"

    async def __aenter__(self) -> Downloader:
        if self._closed:
            raise ClientClosedError("this Downloader was closed; create a new one")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_concurrent + 2),
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=self.timeouts.connect,
                    sock_connect=self.timeouts.connect,
                    sock_read=self.timeouts.read,
                ),
                headers={"User-Agent": _USER_AGENT},
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                read_bufsize=max(1 << 16, min(self.chunk_size, 1 << 22)),
                trust_env=False,
            )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool; the downloader cannot be used afterwards."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            with anyio.CancelScope(shield=True):
                await session.close()

    def statistics(self) -> DownloadStatistics:
        """How many downloads hold a slot and how many wait."""
        return DownloadStatistics(
            active=self._gate.active, waiting=self._gate.waiting, max_concurrent=self.max_concurrent
        )

    async def download(
        self,
        url: str,
        dest: Path | str,
        *,
        deadline: _dt.datetime | None = None,
        expected_size: int | None = None,
        expected_sha256: str | None = None,
    ) -> DownloadResult:
        """Download ``url`` to ``dest``: all of it, verified, or nothing at ``dest``.

        Args:
            url: The presigned result URL.
            dest: The final path; its directory is created if missing. A ``.part`` and a
                ``.part.json`` next to it hold the partial download until it is complete.
            deadline: When the URL stops working; by default read from the URL
                (:func:`url_deadline`). Downloads are started earliest deadline first. A naive
                datetime is taken as UTC.
            expected_size: Refuse a file of another size.
            expected_sha256: Refuse a file with another SHA-256 (hex).

        Returns:
            The final path, size, sha256 and what it took.

        Raises:
            ResultExpiredError: The URL expired (before the start, while queued, between
                retries, or the server says so).
            DownloadError: A 4xx answer, a size or checksum mismatch, retries exhausted, a
                forbidden origin, or the disk refused (disk full, permission denied; the
                ``.part`` is then kept for a later resume). Its subclass :class:`NotMP4Error`:
                the bytes are not an MP4 (nothing is saved); :class:`PartInUseError`: another
                download (perhaps in another process) is writing the same ``.part``. No message
                shows the URL's query (its signature is a credential).
            ClientClosedError: The downloader is not open.
        """
        session = self._session
        if session is None:
            raise ClientClosedError("Downloader is not open; use `async with Downloader() as dl`")
        dest = Path(dest)
        try:
            parsed = URL(url)
        except (TypeError, ValueError) as exc:
            raise DownloadError(f"not a URL: {redact_url(url)}") from exc
        if parsed.scheme.lower() not in ("http", "https") or not parsed.host:
            raise DownloadError(f"not an http(s) URL: {redact_url(url)}")
        self._check_origin(parsed)
        if deadline is None:
            deadline = url_deadline(url)
        if deadline is not None:
            deadline = _aware(deadline)
        _raise_if_expired(deadline, url)

        key = str(dest.absolute())
        if key in self._active_dests:
            raise DownloadError(f"{dest} is already being downloaded")
        self._active_dests.add(key)
        try:
            timeout = None if deadline is None else (deadline - _now()).total_seconds()
            priority = math.inf if deadline is None else deadline.timestamp()
            if not await self._gate.acquire(priority, give_up_after=timeout):
                assert deadline is not None
                raise ResultExpiredError(
                    f"the video URL {redact_url(url)} expired at {deadline.isoformat()} "
                    "while waiting for a download slot"
                )
            try:
                _raise_if_expired(deadline, url, while_="while waiting for a download slot")
                if deadline is not None:
                    left = (deadline - _now()).total_seconds()
                    if left < self.safety_margin:
                        logger.warning(
                            "download of %s starts %.0f s before its URL expires",
                            redact_url(url),
                            left,
                        )
                transfer = _Transfer(
                    self,
                    session,
                    url,
                    dest,
                    deadline=deadline,
                    expected_size=expected_size,
                    expected_sha256=expected_sha256.lower() if expected_sha256 else None,
                )
                return await transfer.run()
            finally:
                self._gate.release()
        finally:
            self._active_dests.discard(key)

    def _check_origin(self, url: URL) -> None:
        if _origin(url) in self._forbidden:
            raise DownloadError(
                f"refusing to download from {redact_url(url)}: that origin is the API host, "
                "not a result host"
            )
