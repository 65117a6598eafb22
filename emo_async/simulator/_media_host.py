"""The media host: result videos at signed URLs, with ETags, ranges, pacing and faults."""

from __future__ import annotations

import asyncio
import datetime as _dt
import hashlib
import hmac
import time
import uuid
from typing import Final

from aiohttp import web

from ._core import SimState, hmac_b64, request_ctx
from ._errors import ApiError
from ._media import video_bytes
from ._middleware import MEDIA_PATH
from ._state import SimTask

__all__ = ["MediaHost", "etag", "media_signature", "result_video"]

RESULT_BUCKET: Final = "dashscope-result-sim"
_MEDIA_CHUNK: Final = 1 << 20
_CACHED_VIDEOS: Final = 32


def media_signature(state: SimState, task_id: str, expires: int) -> str:
    """OSS's query-string signature of a result URL."""
    return hmac_b64(
        state.media_secret, f"GET\n\n\n{expires}\n/{RESULT_BUCKET}/results/{task_id}.mp4"
    )


def result_video(state: SimState, task: SimTask) -> bytes:
    """The current bytes of a task's video (cached for the few most recent)."""
    if state.real_videos is not None:
        return state.real_videos.get_sync(task)
    key = (task.task_id, task.media_generation)
    data = state.videos.get(key)
    if data is None:
        size = round(task.audio_duration * state.config.video_bytes_per_second)
        data = video_bytes(state.config.seed, task.task_id, task.media_generation, size)
        state.videos[key] = data
        while len(state.videos) > _CACHED_VIDEOS:
            state.videos.popitem(last=False)
    else:
        state.videos.move_to_end(key)
    return data


def etag(task: SimTask) -> str:
    """The ETag of a task's video; a rewritten object has a new one."""
    digest = hashlib.sha1(f"{task.task_id}:{task.media_generation}".encode()).hexdigest()
    return f'"{digest.upper()}"'


class MediaHost:
    """Answers every request of the media listener (``GET``/``HEAD /results/<id>.mp4``)."""

    def __init__(self, state: SimState) -> None:
        self._state = state

    async def media(self, request: web.Request) -> web.StreamResponse:
        """Serve a result video: signature and expiry checks, then Range/If-Range."""
        state = self._state
        match = MEDIA_PATH.match(request.path)
        assert match is not None
        task_id = match["task_id"]
        query = request.query
        expires_raw, key_id, signature = (
            query.get("Expires"),
            query.get("OSSAccessKeyId"),
            query.get("Signature"),
        )
        if not expires_raw or not key_id or not signature:
            raise ApiError(403, "AccessDenied", "AccessDenied: the request is not signed.")
        try:
            expires = int(expires_raw)
        except ValueError:
            raise ApiError(403, "AccessDenied", "Invalid Expires.") from None
        if key_id != state.media_key_id or not hmac.compare_digest(
            signature, media_signature(state, task_id, expires)
        ):
            raise ApiError(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided.",
            )
        now = state.store.catch_up()
        task = state.store.raw(task_id)
        if time.time() > expires:
            raise ApiError(403, "AccessDenied", "Request has expired.")
        if task is None or task.status(now) != "SUCCEEDED":
            raise ApiError(404, "NoSuchKey", "The specified key does not exist.")
        ended = task.ended
        assert ended is not None
        if now >= ended + state.config.result_ttl:
            raise ApiError(403, "AccessDenied", "Request has expired.")
        ctx = request_ctx(request)
        if state.roll(state.faults.etag_change_rate):
            task.media_generation += 1
            ctx.fault = "etag_change"
        if state.real_videos is not None:
            data = await state.real_videos.get(task)  # encoded in a worker thread
        else:
            data = result_video(state, task)
        tag = etag(task)
        last_modified = _dt.datetime.fromtimestamp(state.clock.wall(ended), _dt.UTC).strftime(
            "%a, %d %b %Y %H:%M:%S GMT"
        )
        headers = {
            "ETag": tag,
            "Last-Modified": last_modified,
            "Accept-Ranges": "bytes",
            "x-oss-request-id": uuid.uuid4().hex[:24].upper(),
        }
        total = len(data)
        status, start, stop = 200, 0, total
        range_header = request.headers.get("Range")
        if range_header is not None:
            if_range = request.headers.get("If-Range")
            honour = if_range is None or if_range.strip() in (tag, last_modified)
            if honour and state.roll(state.faults.ignore_range_rate):
                ctx.fault = "ignore_range"
                honour = False
            if honour:
                parsed = _parse_range(range_header, total)
                if isinstance(parsed, str):
                    headers["Content-Range"] = f"bytes */{total}"
                    ctx.bytes_sent = 0
                    return web.Response(status=416, headers=headers)
                if parsed is not None:
                    start, stop = parsed
                    status = 206
                    headers["Content-Range"] = f"bytes {start}-{stop - 1}/{total}"
        body = memoryview(data)[start:stop]
        if request.method != "HEAD" and body and state.roll(state.faults.truncate_rate):
            ctx.fault = "truncate"
            cut = state.fault_rng.randrange(0, len(body))
            response = web.StreamResponse(status=status, headers=headers)
            response.content_type = "video/mp4"
            response.content_length = len(body)
            await response.prepare(request)
            await _write_chunks(response, body[:cut], state.config.media_bandwidth)
            ctx.bytes_sent = cut
            if request.transport is not None:
                request.transport.close()
            return response
        ctx.bytes_sent = 0 if request.method == "HEAD" else len(body)
        if request.method == "HEAD" or (
            len(body) <= _MEDIA_CHUNK and state.config.media_bandwidth is None
        ):
            return web.Response(
                body=bytes(body), status=status, headers=headers, content_type="video/mp4"
            )
        # Big objects go out a chunk at a time, as an object store streams them: one giant
        # transport.write would copy the whole video into the transport's buffer first.
        response = web.StreamResponse(status=status, headers=headers)
        response.content_type = "video/mp4"
        response.content_length = len(body)
        await response.prepare(request)
        await _write_chunks(response, body, state.config.media_bandwidth)
        await response.write_eof()
        return response


async def _write_chunks(
    response: web.StreamResponse, body: memoryview, bandwidth: float | None
) -> None:
    chunk = _MEDIA_CHUNK if bandwidth is None else max(1, min(_MEDIA_CHUNK, int(bandwidth / 50)))
    start = time.monotonic()
    for offset in range(0, len(body), chunk):
        if bandwidth is not None:
            # Paced on the total so far, so sleep granularity does not add up.
            ahead = start + offset / bandwidth - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)
        await response.write(body[offset : offset + chunk])


def _parse_range(header: str, total: int) -> tuple[int, int] | str | None:
    """(start, stop) of a single byte range, ``"unsatisfiable"``, or None (ignore the header)."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, sep, last = spec.strip().partition("-")
    if not sep:
        return None
    try:
        if first == "":
            suffix = int(last)
            if suffix <= 0:
                return "unsatisfiable"
            return (max(0, total - suffix), total)
        start = int(first)
        stop = total if last == "" else min(int(last) + 1, total)
    except ValueError:
        return None
    if start >= total or start < 0:
        return "unsatisfiable"
    if stop <= start:
        return None
    return (start, stop)
