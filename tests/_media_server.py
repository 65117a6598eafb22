"""A small OSS-like media host for download tests, with fault switches.

It serves deterministic bytes with ``ETag``, ``Last-Modified``, ``Content-Length`` and
``Accept-Ranges``; honours ``Range: bytes=N-`` (206) with ``If-Range``; answers a presigned URL
whose ``Expires`` has passed with OSS's 403 XML; and can cut bodies, change objects, ignore
ranges, stall, or fail with 503.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from email.utils import formatdate

import attrs
from aiohttp import web
from multidict import CIMultiDict

EXPIRED_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error>\n  <Code>AccessDenied</Code>\n'
    "  <Message>Request has expired.</Message>\n  <RequestId>5F0000000000000000000000</RequestId>\n"
    "  <HostId>media.test</HostId>\n</Error>\n"
)
PIECE = 16 * 1024


#: An MP4's opening ``ftyp`` box: the downloader refuses a result that does not start with one.
FTYP = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2"


def make_bytes(size: int, seed: int) -> bytes:
    """``size`` seeded pseudo-random bytes behind an MP4 ``ftyp`` box (cut if ``size`` is
    smaller)."""
    return (FTYP + random.Random(seed).randbytes(size))[:size]


@attrs.define
class MediaObject:
    data: bytes
    etag: str
    last_modified: str

    @classmethod
    def build(cls, size: int, seed: int) -> MediaObject:
        data = make_bytes(size, seed)
        etag = '"' + hashlib.sha256(data).hexdigest()[:24] + '"'
        return cls(data, etag, formatdate(1_700_000_000 + seed, usegmt=True))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@attrs.define
class Faults:
    """Switches for one object."""

    #: Absolute offsets: a response reaching the next one is cut there (once per offset).
    cut_at: list[int] = attrs.Factory(list)
    #: Before answering this request number (1-based), replace the object with ``change_to``.
    change_on_request: int | None = None
    change_to: MediaObject | None = None
    ignore_range: bool = False
    #: Honour Range without checking If-Range (a broken server: it would splice).
    ignore_if_range: bool = False
    reject_head: bool = False
    #: Seconds to sleep between pieces.
    slow: float = 0.0
    #: Answer this many requests with 503 first.
    fail_503: int = 0
    #: Always answer 503.
    always_503: bool = False
    #: Answer with this status (e.g. 404) instead of the object.
    status: int | None = None
    no_validators: bool = False
    #: After sending this many bytes of a body, stall until ``release`` is set or the client
    #: goes away.
    hold_after: int | None = None


@attrs.define
class Recorded:
    method: str
    name: str
    headers: CIMultiDict[str]


class MediaServer:
    """The aiohttp application plus its state; tests drive it through ``objects``/``faults``."""

    def __init__(self) -> None:
        self.objects: dict[str, MediaObject] = {}
        self.faults: dict[str, Faults] = {}
        self.requests: list[Recorded] = []
        self.counts: dict[str, int] = {}
        self.base_url = ""
        self.in_flight = 0
        self.max_in_flight = 0
        self.started: list[str] = []
        self.release = asyncio.Event()
        self.holding = asyncio.Event()
        self.disconnected = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_route("*", "/{name}", self._handle)

    def add(self, name: str, size: int, *, seed: int = 1, **faults: object) -> MediaObject:
        obj = MediaObject.build(size, seed)
        self.objects[name] = obj
        self.faults[name] = Faults(**faults)  # type: ignore[arg-type]
        return obj

    def url(self, name: str, *, expires: float | None = None) -> str:
        expires = time.time() + 3600 if expires is None else expires
        return (
            f"{self.base_url}/{name}?Expires={int(expires)}"
            "&OSSAccessKeyId=LTAItest&Signature=c2VjcmV0LXNpZ25hdHVyZQ%3D%3D"
        )

    def ranged(self, name: str) -> list[Recorded]:
        return [r for r in self.requests if r.name == name and "Range" in r.headers]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.requests.append(Recorded(request.method, name, CIMultiDict(request.headers)))
        self.started.append(name)
        expires = request.query.get("Expires")
        if expires is not None and int(expires) < time.time():
            return web.Response(status=403, text=EXPIRED_XML, content_type="application/xml")
        if name not in self.objects:
            return web.Response(status=404, text="<Error><Code>NoSuchKey</Code></Error>")
        faults = self.faults[name]
        count = self.counts[name] = self.counts.get(name, 0) + 1
        if faults.change_on_request == count and faults.change_to is not None:
            self.objects[name] = faults.change_to
        if faults.status is not None:
            return web.Response(status=faults.status, text="<Error><Code>Nope</Code></Error>")
        if faults.always_503 or faults.fail_503 > 0:
            faults.fail_503 = max(0, faults.fail_503 - 1)
            return web.Response(status=503, text="busy")
        if request.method == "HEAD" and faults.reject_head:
            return web.Response(status=405)
        obj = self.objects[name]
        return await self._serve(request, obj, faults)

    async def _serve(
        self, request: web.Request, obj: MediaObject, faults: Faults
    ) -> web.StreamResponse:
        size = len(obj.data)
        start, status = 0, 200
        headers: dict[str, str] = {"Accept-Ranges": "bytes", "Content-Type": "video/mp4"}
        if not faults.no_validators:
            headers["ETag"] = obj.etag
            headers["Last-Modified"] = obj.last_modified
        wanted = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        if wanted and not faults.ignore_range:
            valid = (
                if_range is None
                or faults.ignore_if_range
                or (not faults.no_validators and if_range in (obj.etag, obj.last_modified))
            )
            if valid:
                first = int(wanted.removeprefix("bytes=").split("-", 1)[0])
                if first >= size:
                    headers["Content-Range"] = f"bytes */{size}"
                    return web.Response(status=416, headers=headers)
                start, status = first, 206
                headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
        headers["Content-Length"] = str(size - start)
        resp = web.StreamResponse(status=status, headers=headers)
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            pos = start
            cut = next((c for c in faults.cut_at if start <= c < size), None)
            if cut is not None:
                faults.cut_at.remove(cut)
            while pos < size:
                end = min(size, pos + PIECE)
                if cut is not None and end > cut:
                    end = cut
                if faults.hold_after is not None and pos >= faults.hold_after:
                    if not await self._hold(request):
                        return resp
                if end > pos:
                    await resp.write(obj.data[pos:end])
                pos = end
                if cut is not None and pos >= cut:
                    assert request.transport is not None
                    request.transport.close()
                    return resp
                if faults.slow:
                    await asyncio.sleep(faults.slow)
            await resp.write_eof()
            return resp
        finally:
            self.in_flight -= 1

    async def _hold(self, request: web.Request) -> bool:
        """Stall; ``False`` if the client went away meanwhile."""
        self.holding.set()
        try:
            while not self.release.is_set():
                transport = request.transport
                if transport is None or transport.is_closing():
                    self.disconnected.set()
                    return False
                await asyncio.sleep(0.005)
        except asyncio.CancelledError:
            # aiohttp cancels the handler when the client disconnects.
            self.disconnected.set()
            raise
        return True
