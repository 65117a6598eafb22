"""Fetching and sniffing the inputs named by a request (http(s) on loopback, or ``oss://``)."""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

import aiohttp
import anyio.to_thread
from yarl import URL

from ._errors import ApiError, Msg
from ._media import AudioInfo, ImageInfo, sniff_audio, sniff_image

__all__ = ["AUDIO_MAX_BYTES", "InputResolver", "is_loopback_url"]

AUDIO_MAX_BYTES = 15 * 1024 * 1024
IMAGE_MAX_BYTES = 64 * 1024 * 1024
_CACHE_SIZE = 4096
_T = TypeVar("_T")
OSS_HEADER = "X-DashScope-OssResourceResolve"


class _FetchError(Exception):
    """The input could not be downloaded."""


class _TooLarge(Exception):
    """The input is larger than allowed."""


def is_loopback_url(url: URL) -> bool:
    """Only loopback may be fetched: traffic must never leave the machine."""
    host = (url.host or "").strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class InputResolver:
    """Downloads inputs (cached by URL) and reads their real format from the bytes."""

    def __init__(
        self,
        *,
        timeout: float,
        lookup_upload: Callable[[str, str | None], bytes | bytearray | None],
    ) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._lookup_upload = lookup_upload
        self._session: aiohttp.ClientSession | None = None
        self._images: OrderedDict[str, ImageInfo | None] = OrderedDict()
        self._audio: OrderedDict[str, AudioInfo | None] = OrderedDict()

    async def start(self) -> None:
        """Open the download session."""
        self._session = aiohttp.ClientSession(
            timeout=self._timeout, auto_decompress=False, trust_env=False
        )

    async def aclose(self) -> None:
        """Close the download session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def image(self, url: object, *, oss_enabled: bool, model: str | None = None) -> ImageInfo:
        """Fetch and sniff an image; raises the documented InvalidURL errors."""
        text = _check_url(url, oss_enabled=oss_enabled)
        key = _cache_key(text, model)
        if key in self._images:
            self._images.move_to_end(key)
            cached = self._images[key]
        else:
            try:
                data = await self._fetch(text, IMAGE_MAX_BYTES, model)
            except (_FetchError, _TooLarge):
                raise ApiError.invalid_url(Msg.BAD_IMAGE_URL) from None
            cached = await anyio.to_thread.run_sync(sniff_image, data)
            _remember(self._images, key, cached)
        if cached is None:
            raise ApiError.invalid_url(Msg.BAD_IMAGE_URL)
        return cached

    async def audio(self, url: object, *, oss_enabled: bool, model: str | None = None) -> AudioInfo:
        """Fetch and sniff an audio file; raises the documented InvalidURL errors."""
        text = _check_url(url, oss_enabled=oss_enabled)
        key = _cache_key(text, model)
        if key in self._audio:
            self._audio.move_to_end(key)
            cached = self._audio[key]
        else:
            try:
                data = await self._fetch(text, AUDIO_MAX_BYTES, model)
            except _FetchError:
                raise ApiError.invalid_url(Msg.MISSING_URL) from None
            except _TooLarge:
                raise ApiError.invalid_url(Msg.AUDIO_TOO_LARGE) from None
            if data[:3] == b"ID3" or data[:1] == b"\xff":
                cached = await anyio.to_thread.run_sync(sniff_audio, data)
            else:
                cached = sniff_audio(data)
            _remember(self._audio, key, cached)
        if cached is None:
            raise ApiError.invalid_url(Msg.AUDIO_TYPE)
        if cached.duration >= 60.0:
            raise ApiError.invalid_url(Msg.AUDIO_TOO_LONG)
        return cached

    async def _fetch(self, text: str, limit: int, model: str | None) -> bytes:
        if text.startswith("oss://"):
            found = self._lookup_upload(text.removeprefix("oss://"), model)
            if found is None:
                raise _FetchError
            if len(found) > limit:
                raise _TooLarge
            return bytes(found)
        if self._session is None:
            raise RuntimeError("the input resolver is not started")
        try:
            async with self._session.get(URL(text, encoded=True), allow_redirects=False) as resp:
                if resp.status != 200:
                    raise _FetchError
                if resp.content_length is not None and resp.content_length > limit:
                    raise _TooLarge
                buf = bytearray()
                async for chunk in resp.content.iter_chunked(256 * 1024):
                    buf += chunk
                    if len(buf) > limit:
                        raise _TooLarge
                return bytes(buf)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise _FetchError from exc


def _cache_key(text: str, model: str | None) -> str:
    # A temporary upload reads differently per model (only its own model may read it).
    return f"{model}|{text}" if text.startswith("oss://") else text


def _check_url(url: object, *, oss_enabled: bool) -> str:
    if not isinstance(url, str) or not url.strip():
        raise ApiError.invalid_url(Msg.MISSING_URL)
    text = url.strip()
    if text.startswith("oss://"):
        if not oss_enabled or len(text) <= len("oss://"):
            raise ApiError.invalid_url(Msg.MISSING_URL)
        return text
    try:
        parsed = URL(text)
    except ValueError:
        raise ApiError.invalid_url(Msg.MISSING_URL) from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ApiError.invalid_url(Msg.MISSING_URL)
    if not is_loopback_url(parsed):
        raise ApiError.invalid_url(Msg.MISSING_URL)
    return text


def _remember(cache: OrderedDict[str, _T], key: str, value: _T) -> None:
    cache[key] = value
    if len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
