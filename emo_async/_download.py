"""Downloads that never lose a video: streamed, resumable, verified, atomic, deadline-aware.

A result URL is a presigned OSS URL that stops working 24 hours after the task ended, so the
downloader has its own session (which never carries the API key), starts the downloads whose
URLs expire first, and resumes a broken stream instead of starting over. Bytes go to
``<dest>.part``; only a complete, verified file is renamed to ``dest``. A small
``<dest>.part.json`` sidecar lets another process resume the ``.part`` later.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import heapq
import itertools
import json
import logging
import math
import os
import re
import sys
from collections.abc import Collection
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

import aiofiles
import aiofiles.os
import aiohttp
import anyio
import attrs
from aiofiles.threadpool.binary import AsyncBufferedReader
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from yarl import URL

from ._config import DEFAULT_DOWNLOAD_TIMEOUTS, DEFAULT_RETRY_POLICY, RetryPolicy, Timeouts
from ._exceptions import ClientClosedError, DownloadError, ResultExpiredError, parse_retry_after
from ._util import single_error
from ._version import __version__

__all__ = [
    "DownloadResult",
    "DownloadStatistics",
    "Downloader",
    "cleanup_orphans",
    "part_paths",
    "redact_url",
    "url_deadline",
]

logger = logging.getLogger("emo_async.download")

_USER_AGENT = f"emo_async/{__version__}"
_SIDECAR_VERSION = 1
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*$", re.IGNORECASE)
_ERROR_BODY_LIMIT = 16 * 1024
_REHASH_BLOCK = 1 << 20
_WRITEBACK_EVERY = 8 << 20
_WRITE_AHEAD = 3  # chunks between the socket reader and the file writer
_FADVISE = getattr(os, "posix_fadvise", None) if sys.platform.startswith("linux") else None
_DONTNEED: int = getattr(os, "POSIX_FADV_DONTNEED", 4)


@attrs.frozen
class DownloadResult:
    """A finished download.

    Attributes:
        path: The final file (complete and verified).
        size: Its size in bytes.
        sha256: Its SHA-256 (hex), computed while it was written.
        bytes_transferred: Body bytes received and written by this call, across resumes and
            restarts (bytes already in a ``.part`` from an earlier run are not counted).
        resumes: Requests that asked for the rest of a partial file (``Range``).
        restarts: Times a partial file was thrown away and the download began again at 0.
    """

    path: Path
    size: int
    sha256: str
    bytes_transferred: int
    resumes: int
    restarts: int


@attrs.frozen
class DownloadStatistics:
    """A snapshot of a :class:`Downloader`.

    Attributes:
        active: Downloads holding a slot.
        waiting: Downloads queued for a slot.
        max_concurrent: The number of slots.
    """

    active: int
    waiting: int
    max_concurrent: int


def redact_url(url: str | URL) -> str:
    """``url`` without query, fragment or user info: what may be logged (signatures are
    secrets too)."""
    try:
        parsed = URL(str(url))
        return str(parsed.with_user(None).with_query(None).with_fragment(None))
    except (TypeError, ValueError):
        return "<unparsable URL>"


def url_deadline(url: str) -> _dt.datetime | None:
    """When a presigned URL stops working, read from its query string (UTC-aware).

    Understands OSS V1 (``Expires=<unix seconds>``), OSS V2 (``x-oss-expires=<unix seconds>``),
    OSS V4 (``x-oss-date`` + ``x-oss-expires`` seconds) and S3 V4 (``X-Amz-Date`` +
    ``X-Amz-Expires``). Returns ``None`` when the URL says nothing usable.
    """
    try:
        query = URL(url).query
    except (TypeError, ValueError):
        return None
    params = {k.lower(): v for k, v in query.items()}
    try:
        if "expires" in params:
            return _dt.datetime.fromtimestamp(int(params["expires"]), _dt.UTC)
        for date_key, expires_key in (
            ("x-oss-date", "x-oss-expires"),
            ("x-amz-date", "x-amz-expires"),
        ):
            if expires_key not in params:
                continue
            seconds = int(params[expires_key])
            if date_key in params:
                signed = _dt.datetime.strptime(params[date_key], "%Y%m%dT%H%M%SZ")
                return signed.replace(tzinfo=_dt.UTC) + _dt.timedelta(seconds=seconds)
            if expires_key == "x-oss-expires":
                return _dt.datetime.fromtimestamp(seconds, _dt.UTC)
    except (ValueError, OverflowError, OSError):
        return None
    return None


def part_paths(dest: Path) -> tuple[Path, Path]:
    """The ``.part`` file and its ``.part.json`` sidecar for a final path."""
    return dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".part.json")


async def cleanup_orphans(out_dir: Path | str, keep: Collection[Path | str]) -> list[Path]:
    """Delete ``.part`` and ``.part.json`` files in ``out_dir`` that no pending download owns.

    Args:
        out_dir: The directory to sweep (not recursive; a missing directory is fine).
        keep: Downloads that will resume: their final paths, or their ``.part`` paths.

    Returns:
        The files deleted.
    """
    root = Path(out_dir)
    return await anyio.to_thread.run_sync(_cleanup_orphans_sync, root, [Path(p) for p in keep])


def _cleanup_orphans_sync(root: Path, keep: list[Path]) -> list[Path]:
    try:
        real_root = root.resolve()
    except OSError:
        return []
    protected: set[str] = set()
    for path in keep:
        name = path.name
        for tail in (".part.json", ".part"):
            if name.endswith(tail):
                name = name[: -len(tail)]
                break
        try:
            same_dir = path.parent.resolve() == real_root
        except OSError:
            same_dir = False
        if same_dir:
            protected.update({name + ".part", name + ".part.json"})
    removed: list[Path] = []
    try:
        entries = list(os.scandir(root))
    except (FileNotFoundError, NotADirectoryError):
        return []
    for entry in entries:
        if not entry.name.endswith((".part", ".part.json")) or entry.name in protected:
            continue
        if entry.is_dir(follow_symlinks=False):
            continue
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            continue
        removed.append(Path(entry.path))
        logger.info("removed orphaned partial download %s", entry.path)
    return removed


# --------------------------------------------------------------------------------------------
# Earliest-deadline-first slots.


@attrs.define(order=False, eq=False)
class _Waiter:
    key: float
    seq: int
    event: anyio.Event = attrs.field(factory=anyio.Event)
    granted: bool = False
    abandoned: bool = False

    def __lt__(self, other: _Waiter) -> bool:
        return (self.key, self.seq) < (other.key, other.seq)


class _EDFGate:
    """At most ``slots`` holders; waiters get a slot in order of ``key`` (ties: arrival)."""

    def __init__(self, slots: int) -> None:
        self._slots = slots
        self._free = slots
        self._heap: list[_Waiter] = []
        self._seq = itertools.count()

    @property
    def active(self) -> int:
        return self._slots - self._free

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._heap if not w.abandoned)

    async def acquire(self, key: float, *, give_up_after: float | None) -> bool:
        """Take a slot; ``False`` if ``give_up_after`` seconds passed first (no slot is held)."""
        if self._free > 0:
            # release() hands slots to live waiters first, so a free slot means nobody waits.
            self._free -= 1
            return True
        waiter = _Waiter(key, next(self._seq))
        heapq.heappush(self._heap, waiter)
        try:
            with anyio.move_on_after(
                math.inf if give_up_after is None else max(0.0, give_up_after)
            ):
                await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                self.release()
            else:
                waiter.abandoned = True
            raise
        if not waiter.granted:
            waiter.abandoned = True
            return False
        return True

    def release(self) -> None:
        while self._heap:
            waiter = heapq.heappop(self._heap)
            if waiter.abandoned:
                continue
            waiter.granted = True
            waiter.event.set()
            return
        self._free += 1


# --------------------------------------------------------------------------------------------
# The downloader.


def _origin(url: URL) -> tuple[str, str, int | None]:
    return (url.scheme.lower(), (url.host or "").lower().rstrip("."), url.port)


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _aware(when: _dt.datetime) -> _dt.datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=_dt.UTC)


def _describe_os_error(exc: OSError) -> str:
    code = exc.errno
    if code is not None and code in {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}:
        return "disk full"
    if code in {errno.EACCES, errno.EPERM}:
        return "permission denied"
    if code == errno.EROFS:
        return "permission denied (read-only file system)"
    if code == errno.EFBIG:
        return "disk full (file too large)"
    return exc.strerror or type(exc).__name__


def _os_download_error(action: str, path: Path, exc: OSError) -> DownloadError:
    return DownloadError(f"{_describe_os_error(exc)} while {action} {path}: {exc}")


def _nofollow_opener(path: str, flags: int) -> int:
    # A planted symlink named like our .part must not make us overwrite its target.
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o666)


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _parse_content_range(value: str | None) -> tuple[int | None, int | None, int | None] | None:
    if value is None:
        return None
    match = _CONTENT_RANGE.match(value)
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
                ``.part`` is then kept for a later resume).
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


def _raise_if_expired(
    deadline: _dt.datetime | None,
    url: str,
    *,
    while_: str = "",
    cause: BaseException | None = None,
) -> None:
    if deadline is None or _now() < deadline:
        return
    where = f" {while_}" if while_ else ""
    raise ResultExpiredError(
        f"the video URL {redact_url(url)} expired at {deadline.isoformat()}{where}"
    ) from cause


class _Transfer:
    """One download's state: the open ``.part``, the hash so far, the validators."""

    def __init__(
        self,
        owner: Downloader,
        session: aiohttp.ClientSession,
        url: str,
        dest: Path,
        *,
        deadline: _dt.datetime | None,
        expected_size: int | None,
        expected_sha256: str | None,
    ) -> None:
        self.owner = owner
        self.session = session
        self.url = url
        self.shown = redact_url(url)
        self.dest = dest
        self.part, self.meta = part_paths(dest)
        self.deadline = deadline
        self.expected_size = expected_size
        self.expected_sha256 = expected_sha256
        self.file: AsyncBufferedReader | None = None
        self.hasher = hashlib.sha256()
        self.have = 0
        self.etag: str | None = None
        self.last_modified: str | None = None
        self.total: int | None = None
        self.saved_meta: dict[str, Any] | None = None
        self.transferred = 0
        self.unflushed = 0
        self.resumes = 0
        self.restarts = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> DownloadResult:
        await self._prepare()
        try:
            await self._transfer()
            return await self._finish()
        finally:
            await self._close_file()

    async def _prepare(self) -> None:
        meta = await anyio.to_thread.run_sync(self._prepare_sync)
        resume = meta is not None
        if resume:
            assert meta is not None
            self.etag = meta.get("etag")
            self.last_modified = meta.get("last_modified")
            total = meta.get("total")
            self.total = total if isinstance(total, int) else None
            self.saved_meta = meta
        try:
            with anyio.CancelScope(shield=True):
                if resume:
                    self.file = await aiofiles.open(self.part, "r+b", opener=_nofollow_opener)
                else:
                    self.file = await aiofiles.open(self.part, "w+b", opener=_nofollow_opener)
        except OSError as exc:
            raise _os_download_error("creating", self.part, exc) from exc
        if resume:
            try:
                await self._rehash()
            except OSError as exc:
                raise _os_download_error("reading", self.part, exc) from exc
            if self.have == 0 or (self.total is not None and self.have > self.total):
                await self._restart("the partial file does not fit its sidecar", count=False)
            else:
                logger.info("resuming %s from byte %d (found %s)", self.shown, self.have, self.part)

    def _prepare_sync(self) -> dict[str, Any] | None:
        if self.dest.is_dir():
            raise DownloadError(f"destination {self.dest} is a directory")
        try:
            self.dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _os_download_error("creating the directory", self.dest.parent, exc) from exc
        try:
            if not self.part.is_file() or self.part.is_symlink():
                return None
            raw = self.meta.read_text(encoding="utf-8")
            meta = json.loads(raw)
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("version") != _SIDECAR_VERSION:
            return None
        url_hash, resource_hash = _url_hashes(self.url)
        # The same object under a re-signed URL may resume: If-Range guards against a change.
        if meta.get("url_sha256") != url_hash and meta.get("resource_sha256") != resource_hash:
            return None
        etag, last_modified = meta.get("etag"), meta.get("last_modified")
        if not (isinstance(etag, str) and _strong(etag)) and not isinstance(last_modified, str):
            return None
        return meta

    async def _rehash(self) -> None:
        assert self.file is not None
        await self.file.seek(0)
        while True:
            block = await self.file.read(_REHASH_BLOCK)
            if not block:
                break
            self.hasher.update(block)
            self.have += len(block)

    async def _close_file(self) -> None:
        file, self.file = self.file, None
        if file is None:
            return
        with anyio.CancelScope(shield=True):
            try:
                await file.close()
            except OSError as exc:
                logger.warning("closing %s failed: %s", self.part, exc)

    # -- the attempts ------------------------------------------------------------------------

    async def _transfer(self) -> None:
        owner = self.owner
        failures = 0
        high_water = self.have
        while True:
            _raise_if_expired(self.deadline, self.url)
            try:
                await self._attempt()
                return
            except _BROKEN_STREAM as exc:
                cause: BaseException = exc
                reason = f"{type(exc).__name__}: {exc}"
                retry_after = None
            except _Retry as exc:
                cause, reason, retry_after = exc, exc.reason, exc.retry_after
            if self.have > high_water:
                high_water = self.have
                failures = 0
            else:
                failures += 1
            if failures >= owner.retry.attempts:
                _raise_if_expired(self.deadline, self.url, cause=cause)
                raise DownloadError(
                    f"download of {self.shown} failed {failures} times in a row without "
                    f"progress; last: {reason}"
                ) from cause
            wait = owner.retry.backoff(failures - 1, retry_after=retry_after)
            if self.deadline is not None:
                left = (self.deadline - _now()).total_seconds()
                _raise_if_expired(self.deadline, self.url, while_="before a retry", cause=cause)
                wait = min(wait, max(0.0, left - owner.safety_margin))
            logger.info(
                "download of %s interrupted at byte %d (%s); retrying in %.2f s",
                self.shown,
                self.have,
                reason,
                wait,
            )
            await anyio.sleep(wait)

    async def _attempt(self) -> None:
        headers = {"Accept-Encoding": "identity"}
        if self.have > 0:
            validator = self._validator()
            if validator is None:
                await self._restart("no ETag or Last-Modified to resume with")
            else:
                headers["Range"] = f"bytes={self.have}-"
                headers["If-Range"] = validator
                self.resumes += 1
        ranged = "Range" in headers
        async with self.session.get(self.url, headers=headers, allow_redirects=True) as resp:
            try:
                for hop in (*resp.history, resp):
                    self.owner._check_origin(hop.url)
                await self._handle(resp, ranged)
            except BaseException:
                # Drop the connection now rather than drain a body nobody will read.
                resp.close()
                raise

    async def _handle(self, resp: aiohttp.ClientResponse, ranged: bool) -> None:
        status = resp.status
        if status == 206:
            await self._accept_partial(resp, ranged)
        elif status == 200:
            if self.have > 0:
                await self._restart(
                    "the server sent the whole object (Range ignored or object changed)"
                )
            await self._adopt_validators(resp, total=resp.content_length)
        elif status == 416:
            crange = _parse_content_range(resp.headers.get("Content-Range"))
            server_total = crange[2] if crange else None
            known_total = self.total if self.total is not None else server_total
            if self.have > 0 and known_total is not None and self.have == known_total:
                self.total = known_total
                return
            await self._restart("416 Range Not Satisfiable")
            raise _Retry("416 Range Not Satisfiable")
        else:
            await self._refuse(resp)
        if (
            self.expected_size is not None
            and self.total is not None
            and self.total != self.expected_size
        ):
            await self._discard()
            raise DownloadError(
                f"{self.shown} is {self.total} bytes, expected {self.expected_size}"
            )
        await self._stream(resp)
        if self.total is not None and self.have < self.total:
            raise _Retry(f"short body: {self.have} of {self.total} bytes")
        if self.total is not None and self.have > self.total:
            await self._discard()
            raise DownloadError(f"{self.shown} sent {self.have} bytes, more than its {self.total}")

    async def _accept_partial(self, resp: aiohttp.ClientResponse, ranged: bool) -> None:
        crange = _parse_content_range(resp.headers.get("Content-Range"))
        etag = resp.headers.get("ETag")
        if not ranged or crange is None or crange[0] is None:
            await self._restart("206 without a usable Content-Range")
            raise _Retry("206 without a usable Content-Range")
        start, _end, total = crange
        if etag is not None and self.etag is not None and etag != self.etag:
            await self._restart("the object changed (new ETag on a 206)")
            raise _Retry("the object changed (ETag)")
        if start != self.have or (
            total is not None and self.total is not None and total != self.total
        ):
            await self._restart(f"206 for bytes {start}- when {self.have} were held")
            raise _Retry("206 range does not continue the partial file")
        if total is not None and self.total is None:
            self.total = total
            await self._save_meta()

    async def _adopt_validators(self, resp: aiohttp.ClientResponse, *, total: int | None) -> None:
        self.etag = resp.headers.get("ETag")
        self.last_modified = resp.headers.get("Last-Modified")
        self.total = total
        await self._save_meta()

    async def _refuse(self, resp: aiohttp.ClientResponse) -> NoReturn:
        status = resp.status
        if status in (408, 429) or status >= 500:
            raise _Retry(f"HTTP {status}", retry_after=parse_retry_after(resp.headers))
        past = self.deadline is not None and _now() >= self.deadline
        if status in (401, 403, 404):
            try:
                body = await resp.content.read(_ERROR_BODY_LIMIT)
            except _BROKEN_STREAM:
                body = b""
            if past or (status == 403 and b"expire" in body.lower()):
                when = f" at {self.deadline.isoformat()}" if self.deadline is not None else ""
                raise ResultExpiredError(
                    f"the video URL {self.shown} expired{when} (HTTP {status}: "
                    f"{_oss_message(body) or 'no message'})"
                )
            raise DownloadError(
                f"HTTP {status} for {self.shown}: {_oss_message(body) or resp.reason or ''}"
            )
        raise DownloadError(f"HTTP {status} for {self.shown}: {resp.reason or 'unexpected answer'}")

    async def _stream(self, resp: aiohttp.ClientResponse) -> None:
        # Two stages so the disk and the network overlap: this task reads the socket and hashes,
        # a writer task in the same task group writes to the ``.part`` through aiofiles' thread.
        # At most _WRITE_AHEAD chunks wait between them, so memory stays flat.
        send, receive = anyio.create_memory_object_stream[list[bytes]](_WRITE_AHEAD)
        broken: BaseException | None = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._write_all, receive)
                try:
                    await self._read_all(resp, send)
                except _BROKEN_STREAM as exc:
                    # Let the writer finish what was read before raising.
                    broken = exc
                finally:
                    # The writer stops once the queue is empty. If the writer failed instead,
                    # the task group has cancelled this task already.
                    send.close()
        except BaseExceptionGroup as group:
            error = single_error(group)
            if error is None:
                raise
            raise error from error.__cause__
        finally:
            receive.close()
        if broken is not None:
            raise broken

    async def _read_all(
        self, resp: aiohttp.ClientResponse, send: MemoryObjectSendStream[list[bytes]]
    ) -> None:
        # One piece per network read, as aiohttp buffered it: no joins, no copies here. Pieces
        # are hashed as they come and handed to the writer about ``chunk_size`` bytes at a time.
        chunk_size = self.owner.chunk_size
        pieces: list[bytes] = []
        held = 0
        try:
            async for data, _ in resp.content.iter_chunks():
                if not data:
                    continue
                self.hasher.update(data)
                pieces.append(data)
                held += len(data)
                if held >= chunk_size:
                    await send.send(pieces)
                    pieces, held = [], 0
        except _BROKEN_STREAM:
            # Bytes that arrived before the break are good: keep them, so the resume asks for
            # exactly what is missing.
            rest = _salvage(resp.content)
            if rest:
                self.hasher.update(rest)
                pieces.append(rest)
            if pieces:
                await send.send(pieces)
            raise
        if pieces:
            await send.send(pieces)

    async def _write_all(self, receive: MemoryObjectReceiveStream[list[bytes]]) -> None:
        # Not ``async with receive``: closing it on a write error would fail the reader's
        # ``send`` with a second error; the task group cancels the reader instead.
        async for pieces in receive:
            await self._write(pieces)

    async def _write(self, pieces: list[bytes]) -> None:
        assert self.file is not None
        try:
            # Shielded: a cancelled await would leave the write running in its thread while
            # the file gets closed or truncated under it.
            with anyio.CancelScope(shield=True):
                await self.file.writelines(pieces)
        except OSError as exc:
            raise _os_download_error("writing", self.part, exc) from exc
        size = sum(map(len, pieces))
        self.have += size
        self.transferred += size
        self.unflushed += size
        if self.unflushed >= _WRITEBACK_EVERY:
            self.unflushed = 0
            await self._start_writeback()

    async def _start_writeback(self) -> None:
        # Start writing dirty pages to disk now (asynchronously, WB_SYNC_NONE) and drop the
        # ones already written, so the final fsync waits for a tail instead of the whole file,
        # and a long batch does not fill the page cache with videos. Linux only; best effort.
        if _FADVISE is None:
            return
        assert self.file is not None
        try:
            await self.file.flush()
            await anyio.to_thread.run_sync(_FADVISE, self.file.fileno(), 0, 0, _DONTNEED)
        except OSError as exc:
            raise _os_download_error("writing", self.part, exc) from exc

    # -- state changes -----------------------------------------------------------------------

    def _validator(self) -> str | None:
        if self.etag is not None and _strong(self.etag):
            return self.etag
        return self.last_modified

    async def _restart(self, reason: str, *, count: bool = True) -> None:
        assert self.file is not None
        if self.have > 0:
            logger.info("restarting %s from byte 0: %s", self.shown, reason)
            if count:
                self.restarts += 1
        try:
            await self.file.seek(0)
            await self.file.truncate(0)
        except OSError as exc:
            raise _os_download_error("truncating", self.part, exc) from exc
        self.hasher = hashlib.sha256()
        self.have = 0
        self.etag = self.last_modified = None
        self.total = None

    async def _save_meta(self) -> None:
        url_hash, resource_hash = _url_hashes(self.url)
        meta: dict[str, Any] = {
            "version": _SIDECAR_VERSION,
            "url_sha256": url_hash,
            "resource_sha256": resource_hash,
            "etag": self.etag,
            "last_modified": self.last_modified,
            "total": self.total,
        }
        if meta == self.saved_meta:
            return
        try:
            # One thread hop that opens, writes and closes: cancelled in the middle of an
            # aiofiles open, the file object would be left open (a leaked handle).
            await anyio.to_thread.run_sync(_write_text, self.meta, json.dumps(meta))
        except OSError as exc:
            raise _os_download_error("writing", self.meta, exc) from exc
        self.saved_meta = meta

    async def _discard(self) -> None:
        await self._close_file()
        for path in (self.part, self.meta):
            try:
                await aiofiles.os.remove(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.warning("could not remove %s: %s", path, exc)

    async def _finish(self) -> DownloadResult:
        digest = self.hasher.hexdigest()
        if self.expected_size is not None and self.have != self.expected_size:
            await self._discard()
            raise DownloadError(
                f"{self.shown} gave {self.have} bytes, expected {self.expected_size}"
            )
        if self.expected_sha256 is not None and digest != self.expected_sha256:
            await self._discard()
            raise DownloadError(
                f"{self.shown} has sha256 {digest}, expected {self.expected_sha256}"
            )
        file = self.file
        assert file is not None
        try:
            await file.flush()
            await anyio.to_thread.run_sync(os.fsync, file.fileno())
        except OSError as exc:
            raise _os_download_error("saving", self.part, exc) from exc
        await self._close_file()
        try:
            await aiofiles.os.replace(self.part, self.dest)
        except OSError as exc:
            raise _os_download_error("moving into place", self.dest, exc) from exc
        try:
            await anyio.to_thread.run_sync(_fsync_dir, self.dest.parent)
            await aiofiles.os.remove(self.meta)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("after saving %s: %s", self.dest, exc)
        logger.debug(
            "saved %s (%d bytes, %d transferred, %d resumes, %d restarts) from %s",
            self.dest,
            self.have,
            self.transferred,
            self.resumes,
            self.restarts,
            self.shown,
        )
        return DownloadResult(
            path=self.dest,
            size=self.have,
            sha256=digest,
            bytes_transferred=self.transferred,
            resumes=self.resumes,
            restarts=self.restarts,
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


def _url_hashes(url: str) -> tuple[str, str]:
    resource = redact_url(url)
    return (
        hashlib.sha256(url.encode("utf-8")).hexdigest(),
        hashlib.sha256(resource.encode("utf-8")).hexdigest(),
    )


def _oss_message(body: bytes) -> str:
    text = body.decode("utf-8", errors="replace")
    match = re.search(r"<Message>(.*?)</Message>", text, re.DOTALL)
    if match:
        return match.group(1).strip()[:200]
    return text.strip()[:200]


def _write_text(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.write(text)
