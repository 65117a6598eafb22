"""Uploads to DashScope's temporary storage (OSS): the policy cache, the form, the upload cache.

A policy (``GET /uploads?action=getPolicy``, on the API host, with the key) names an upload
host and signs a POST form; the file then goes to that host in a multipart form, without the
key. Both go through the client's one request path (:class:`HttpCore`): the same retries,
backoff, ``Retry-After`` handling and timeouts as every API request.
"""

from __future__ import annotations

import datetime as _dt
import mimetypes
import os
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import attrs

from ._config import EMO_MODEL, UPLOAD_REUSE_MARGIN, UPLOAD_VALIDITY
from ._exceptions import APIError, RateLimitError, ServerError, parse_retry_after
from ._http import ApiResponse, HttpCore, origin_of
from ._singleflight import SingleFlight

__all__ = ["Uploader"]


@attrs.frozen
class _Policy:
    data: Mapping[str, Any]
    expires: float  # monotonic
    margin: float


class Uploader:
    """Uploads local files for one :class:`Client` (internal).

    Args:
        core: The client's request path (raises :class:`ClientClosedError` when it is not open).
        api_origin: The API's (scheme, host, port): a policy naming it as upload host is refused.
        max_uploads: Uploads in flight at once.
    """

    def __init__(
        self,
        core: Callable[[], HttpCore],
        *,
        api_origin: tuple[str, str, int],
        max_uploads: int,
    ) -> None:
        self._core = core
        self._api_origin = api_origin
        self._slots = anyio.CapacityLimiter(max_uploads)
        self._policies: dict[str, _Policy] = {}
        self._policy_lock = anyio.Lock()
        self._uploads: SingleFlight[tuple[str, str], tuple[str, _dt.datetime]] = SingleFlight(
            fresh=lambda hit: hit[1] - _dt.datetime.now(_dt.UTC) > UPLOAD_REUSE_MARGIN
        )

    async def upload(
        self, path: Path, digest: str, *, model: str = EMO_MODEL, content: bytes | None = None
    ) -> str:
        """The ``oss://`` URL of ``path`` (whose SHA-256 is ``digest``) for ``model``: uploaded
        once per content and model, reused while it stays valid long enough."""

        async def upload() -> tuple[str, _dt.datetime]:
            async with self._slots:
                url = await self._upload_once(path, digest, model, content)
            return url, _dt.datetime.now(_dt.UTC) + UPLOAD_VALIDITY

        url, _ = await self._uploads.get_or_compute((digest, model), upload)
        return url

    def remember(self, digest: str, model: str, url: str, expires_at: _dt.datetime) -> None:
        """Seed the upload cache (e.g. from a journal)."""
        self._uploads.put((digest, model), (url, expires_at))

    async def _policy(self, model: str) -> Mapping[str, Any]:
        cached = self._policies.get(model)
        if cached is not None and cached.expires - time.monotonic() > cached.margin:
            return cached.data  # the common case, without taking the lock
        async with self._policy_lock:
            cached = self._policies.get(model)
            if cached is not None and cached.expires - time.monotonic() > cached.margin:
                return cached.data
            resp = await self._core().request(
                "GET",
                "/uploads",
                family="policy",
                params={"action": "getPolicy", "model": model},
            )
            data = resp.body.get("data")
            if not isinstance(data, Mapping) or not data.get("upload_host"):
                raise APIError(
                    "the upload policy answer has no data.upload_host",
                    status=resp.status,
                    request_id=resp.request_id,
                )
            ttl = _as_int(data.get("expire_in_seconds")) or 300
            # Renew a little before it expires: 30 s, or a fifth of a short lifetime.
            self._policies[model] = _Policy(
                data=data, expires=time.monotonic() + ttl, margin=min(30.0, ttl / 5)
            )
            return data

    def _form(
        self, policy: Mapping[str, Any], path: Path, digest: str, mime: str
    ) -> tuple[str, str, dict[str, str]]:
        host = str(policy["upload_host"])
        if origin_of(host) == self._api_origin:
            # The upload session never carries the key, but an upload host equal to the API
            # host means the policy is not what we think.
            raise APIError("the upload policy names the API host", status=200)
        # Content-addressed keys: the same bytes get the same object; forbid-overwrite is safe.
        key = f"{str(policy.get('upload_dir', '')).rstrip('/')}/{digest[:32]}/{_safe_base(path)}"
        fields = {
            "OSSAccessKeyId": str(policy.get("oss_access_key_id", "")),
            "Signature": str(policy.get("signature", "")),
            "policy": str(policy.get("policy", "")),
            "key": key,
            "x-oss-object-acl": str(policy.get("x_oss_object_acl", "private")),
            "x-oss-forbid-overwrite": str(policy.get("x_oss_forbid_overwrite", "true")),
            "success_action_status": "200",
            "x-oss-content-type": mime,
        }
        return host, key, fields

    async def _upload_once(
        self, path: Path, digest: str, model: str, content: bytes | None = None
    ) -> str:
        if content is not None:
            size = len(content)
        else:
            # One thread hop: the size, and the bytes themselves when the file is small.
            size, content = await anyio.to_thread.run_sync(_read_small, path, _SMALL_UPLOAD)
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        used = await self._policy(model)
        try:
            return await self._post(used, path, digest, mime, size, content)
        except APIError as exc:
            if exc.status != 403:
                raise
        # Most likely the policy expired earlier than our clock said (clock skew): fetch a
        # fresh one and try once more.
        cached = self._policies.get(model)
        if cached is not None and cached.data is used:
            self._policies.pop(model, None)  # once, not by every upload that saw it
        return await self._post(await self._policy(model), path, digest, mime, size, content)

    async def _post(
        self,
        policy: Mapping[str, Any],
        path: Path,
        digest: str,
        mime: str,
        size: int,
        content: bytes | None,
    ) -> str:
        host, key, fields = self._form(policy, path, digest, mime)
        what = f"upload of {path.name}"

        def prepare() -> tuple[Any, Mapping[str, str]]:
            form = _Form(fields, path, size, mime, content)
            return form.body, {"Content-Type": form.content_type}

        def interpret(status: int, raw: bytes, headers: Mapping[str, str]) -> ApiResponse:
            text = raw.decode("utf-8", "replace")
            if status in (200, 201, 204) or (status == 409 and "FileAlreadyExists" in text):
                # A 409 on the same content-addressed key: an earlier upload of these bytes.
                return ApiResponse(status=status, body={}, headers=headers)
            message = f"{what} refused: HTTP {status}: {text[:200]}"
            # The class says whether trying later may help (the request path retries those,
            # and the batch retries a job whose upload failed with a retryable error).
            if status == 429:
                raise RateLimitError(message, status=status, retry_after=parse_retry_after(headers))
            if status >= 500:
                raise ServerError(message, status=status)
            raise APIError(message, status=status)

        await self._core().send_external(
            "POST", host, what=what, prepare=prepare, interpret=interpret
        )
        return f"oss://{key}"


#: Files up to this size are read in one go and sent as one buffer; larger ones are streamed.
_SMALL_UPLOAD = 1 << 20


def _read_small(path: Path, limit: int) -> tuple[int, bytes | None]:
    """The size of ``path``, and its bytes when it holds at most ``limit``."""
    with path.open("rb") as f:
        data = f.read(limit + 1)
        if len(data) > limit:
            return os.fstat(f.fileno()).st_size, None
    return len(data), data


class _Form:
    """The upload's multipart form, built by hand: the fields and the file part's header are one
    buffer, so a small file goes out in one write instead of aiohttp's two per field."""

    def __init__(
        self, fields: Mapping[str, str], path: Path, size: int, mime: str, content: bytes | None
    ) -> None:
        from aiohttp.helpers import content_disposition_header

        boundary = uuid.uuid4().hex
        self.content_type = f"multipart/form-data; boundary={boundary}"
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
            for name, value in fields.items()
        ]
        disposition = content_disposition_header("form-data", name="file", filename=path.name)
        parts.append(
            f"--{boundary}\r\nContent-Type: {mime}\r\nContent-Disposition: {disposition}\r\n\r\n"
        )
        head = "".join(parts).encode("utf-8")
        tail = f"\r\n--{boundary}--\r\n".encode("ascii")
        self.body: bytes | _StreamedForm = (
            head + content + tail if content is not None else _StreamedForm(head, path, size, tail)
        )


class _StreamedForm(aiohttp.payload.Payload):
    """A form whose file is streamed from disk in worker threads, its size known up front (so
    the form has a Content-Length, as OSS expects).

    Each chunk is read by a thread that opens and closes the file itself: aiohttp cancels the
    writer when the upload host answers early (a 5xx before the body is read), and a file
    opened in a thread whose awaiting task was cancelled would be left open (a leaked handle).
    """

    _CHUNK = 1 << 18

    def __init__(self, head: bytes, path: Path, size: int, tail: bytes) -> None:
        super().__init__(path, content_type=None)
        self._head, self._path, self._file_size, self._tail = head, path, size, tail

    @property
    def size(self) -> int | None:
        return len(self._head) + self._file_size + len(self._tail)

    async def write(self, writer: aiohttp.abc.AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(
        self, writer: aiohttp.abc.AbstractStreamWriter, content_length: int | None
    ) -> None:
        await writer.write(self._head)
        offset = 0
        while offset < self._file_size:
            want = min(self._CHUNK, self._file_size - offset)
            data = await anyio.to_thread.run_sync(_read_at, self._path, offset, want)
            if not data:
                # Shorter than announced: fail the request rather than leave it hanging.
                raise aiohttp.ClientPayloadError(f"{self._path.name} shrank during its upload")
            await writer.write(data)
            offset += len(data)
        await writer.write(self._tail)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("a file upload is not text")


def _read_at(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(size)


def _safe_base(path: Path) -> str:
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in path.name)[:80]
    return name or f"file-{uuid.uuid4().hex[:8]}"


def _as_int(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload, no-any-return]
    except (TypeError, ValueError):
        return None
