"""One download's attempts: requests with Range/If-Range, answers, and the pipelined writer."""

from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import aiohttp
import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .._exceptions import DownloadError, ResultExpiredError, parse_retry_after
from .._util import single_error
from ._partfile import _PartFile
from ._types import DownloadResult
from ._urls import _now, _raise_if_expired, redact_text, safe_cause
from ._wire import (
    _BROKEN_STREAM,
    ERROR_BODY_LIMIT,
    _oss_message,
    _parse_content_range,
    _Retry,
    _salvage,
)

if TYPE_CHECKING:
    from ._downloader import Downloader

logger = logging.getLogger("emo_async.download")

_WRITE_AHEAD = 3  # chunks between the socket reader and the file writer


class _Transfer(_PartFile):
    """One download: the attempts against the result host, feeding the ``.part``."""

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
        super().__init__(url, dest, expected_size=expected_size, expected_sha256=expected_sha256)
        self.owner = owner
        self.session = session
        self.deadline = deadline

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> DownloadResult:
        try:
            # Inside the try: a failure or a cancellation after the .part was opened (its
            # truncation, the sidecar, the rehash) must still close it.
            await self._prepare()
            await self._transfer()
            return await self._finish()
        finally:
            await self._close_file()

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
                cause: BaseException | None = safe_cause(exc)
                reason = redact_text(f"{type(exc).__name__}: {exc}")
                retry_after = None
            except _Retry as exc:
                cause, reason, retry_after = exc, exc.reason, exc.retry_after
            except aiohttp.ClientError as exc:
                # Not retried (too many redirects, a redirect to a bad URL, ...). aiohttp's
                # message carries the whole presigned URL, a credential: never pass it on.
                detail = redact_text(f"{type(exc).__name__}: {exc}")
                raise DownloadError(f"download of {self.shown} failed: {detail}") from safe_cause(
                    exc
                )
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
                body = await resp.content.read(ERROR_BODY_LIMIT)
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
