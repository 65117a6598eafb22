"""Presigned result URLs: what may be shown of them, and when they stop working."""

from __future__ import annotations

import datetime as _dt
import hashlib
import re

from yarl import URL

from .._exceptions import ResultExpiredError

__all__ = ["redact_text", "redact_url", "url_deadline"]

_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_SECRET_PARAM = re.compile(
    r"(?i)\b(signature|ossaccesskeyid|expires|security-?token|x-oss-[a-z0-9-]+|x-amz-[a-z0-9-]+)"
    r"=[^&\s'\"<>]*"
)


def redact_url(url: str | URL) -> str:
    """``url`` without query, fragment or user info: what may be logged (signatures are
    secrets too)."""
    try:
        parsed = URL(str(url))
        return str(parsed.with_user(None).with_query(None).with_fragment(None))
    except (TypeError, ValueError):
        return "<unparsable URL>"


def redact_text(text: str) -> str:
    """``text`` with every URL in it redacted (:func:`redact_url`) and any stray signing
    parameter (``Signature=``, ``OSSAccessKeyId=``, ``Expires=``, security tokens) blanked."""

    def url(match: re.Match[str]) -> str:
        found = match.group(0)
        return redact_url(found) if any(c in found for c in "?#@") else found

    text = _URL_IN_TEXT.sub(url, text)
    return _SECRET_PARAM.sub(lambda m: f"{m.group(1)}=<redacted>", text)


def safe_cause(exc: BaseException) -> BaseException | None:
    """``exc`` if it can be chained to an error we raise, ``None`` if its message would show a
    signed URL (aiohttp puts the full URL in some of its errors)."""
    for shown in (str(exc), repr(exc)):
        if redact_text(shown) != shown:
            return None
    return exc


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


def _origin(url: URL) -> tuple[str, str, int | None]:
    return (url.scheme.lower(), (url.host or "").lower().rstrip("."), url.port)


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _aware(when: _dt.datetime) -> _dt.datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=_dt.UTC)


def _url_hashes(url: str) -> tuple[str, str]:
    resource = redact_url(url)
    return (
        hashlib.sha256(url.encode("utf-8")).hexdigest(),
        hashlib.sha256(resource.encode("utf-8")).hexdigest(),
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
