"""A Client's settings, resolved from its arguments, the environment and the key file.

Only ``Client()`` hands the environment to :func:`resolve_settings`: nothing else in the
package reads it. Per setting, the first that is set wins: explicit argument > 2.x variable >
1.x (legacy) variable > key file > default.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit, urlunsplit

import attrs

from ._config import (
    DEFAULT_BASE_URL,
    DEFAULT_RETRY_POLICY,
    DEFAULT_TIMEOUTS,
    RetryPolicy,
    Timeouts,
)
from ._net import is_loopback_host

__all__ = [
    "DEFAULT_API_KEY_FILE",
    "Settings",
    "check_base_url",
    "gateway_workspace",
    "resolve_settings",
]

#: Where the official SDK (2.x) keeps a key when ``DASHSCOPE_API_KEY_FILE_PATH`` names none.
DEFAULT_API_KEY_FILE: Final = "~/.dashscope/api_key"


@attrs.frozen(kw_only=True)
class Settings:
    """What a Client was configured with, after the environment was consulted (internal).

    Attributes:
        api_key: The key (never in repr).
        key_source: Where the key came from (``"argument"``, a variable name, or the key
            file's path): for error messages, never the key itself.
        base_url: The API base URL, normalised (no trailing slash, ``/api/v1`` added to a bare
            host) and checked (see :func:`check_base_url`).
        workspace: The workspace id, or None.
        timeouts: Per-phase timeouts.
        retry: The retry policy.
        log_level: A level for the ``emo_async`` logger, or None.
    """

    api_key: str = attrs.field(repr=False)
    key_source: str
    base_url: str
    workspace: str | None
    timeouts: Timeouts
    retry: RetryPolicy
    log_level: int | None


def resolve_settings(
    environ: Mapping[str, str],
    *,
    api_key: str | None,
    base_url: str | None,
    workspace: str | None,
    timeouts: Timeouts | None,
    retry: RetryPolicy | None,
    home: Callable[[str], str] = os.path.expanduser,
) -> Settings:
    """Explicit argument > 2.x variable > 1.x variable > key file > default, per setting.

    Raises:
        ValueError: no key anywhere, an unreadable key file that was named explicitly, or a
            variable whose value cannot be used (named in the message, never the key).
    """
    key, source = _resolve_key(environ, api_key, home)
    url = _normalise_base_url(
        base_url
        or _env(environ, "DASHSCOPE_BASE_URL", "DASHSCOPE_HTTP_BASE_URL")
        or DEFAULT_BASE_URL
    )
    # workspace="" is an explicit "none": it overrides DASHSCOPE_WORKSPACE.
    ws = workspace if workspace is not None else _env(environ, "DASHSCOPE_WORKSPACE")
    ws = _check_workspace(None if ws == "" else ws, url)
    if timeouts is None:
        timeouts = DEFAULT_TIMEOUTS
        raw = _env(environ, "DASHSCOPE_TIMEOUT")
        if raw:
            timeouts = attrs.evolve(DEFAULT_TIMEOUTS, total=_positive(raw, "DASHSCOPE_TIMEOUT"))
    if retry is None:
        retry = DEFAULT_RETRY_POLICY
        raw = _env(environ, "DASHSCOPE_MAX_RETRIES")
        if raw:
            retry = attrs.evolve(
                DEFAULT_RETRY_POLICY, attempts=_non_negative_int(raw, "DASHSCOPE_MAX_RETRIES") + 1
            )
    level_name = _env(environ, "DASHSCOPE_LOG", "DASHSCOPE_LOGGING_LEVEL")
    log_level = _log_level(level_name) if level_name else None
    return Settings(
        api_key=key,
        key_source=source,
        base_url=check_base_url(url),
        workspace=ws,
        timeouts=timeouts,
        retry=retry,
        log_level=log_level,
    )


def check_base_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"base_url must be an http(s) URL, got {url!r}")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ValueError(
            "base_url uses plain http:// to a non-loopback host; the API key would travel "
            f"unencrypted. Use https:// (got host {parts.hostname!r})."
        )
    if parts.username or parts.password:
        raise ValueError("base_url must not carry credentials")
    return url.rstrip("/")


def _env(environ: Mapping[str, str], *names: str) -> str | None:
    # An empty variable counts as unset (``export X=`` is how shells clear one).
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return value
    return None


def _resolve_key(
    environ: Mapping[str, str], api_key: str | None, home: Callable[[str], str]
) -> tuple[str, str]:
    if api_key is not None:
        if not api_key.strip():
            raise ValueError("api_key is empty")
        return api_key.strip(), "argument"
    key = _env(environ, "DASHSCOPE_API_KEY")
    if key:
        return key, "DASHSCOPE_API_KEY"
    named = _env(environ, "DASHSCOPE_API_KEY_FILE_PATH")
    path = Path(home(named or DEFAULT_API_KEY_FILE))
    try:
        key = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        if named:
            raise ValueError(
                f"DASHSCOPE_API_KEY_FILE_PATH names {str(path)!r}, which does not exist"
            ) from None
        key = ""
    except (OSError, UnicodeDecodeError) as exc:
        # Not chained: a decode error quotes the bytes it choked on.
        raise ValueError(
            f"the API key file {str(path)!r} cannot be read: {type(exc).__name__}"
        ) from None
    if not key:
        raise ValueError(
            "no API key: pass api_key=..., set DASHSCOPE_API_KEY, or put the key in "
            f"{DEFAULT_API_KEY_FILE} (or the file DASHSCOPE_API_KEY_FILE_PATH names); "
            "for the offline simulator, use emo_async.simulator"
        )
    if any(c.isspace() for c in key):
        # A file holding more than the key (a comment, a second line) is not sent as a header.
        raise ValueError(f"the API key file {str(path)!r} holds more than one word")
    return key, str(path)


def _normalise_base_url(url: str) -> str:
    parts = urlsplit(url.strip())
    if parts.query or parts.fragment:
        raise ValueError(f"base_url must not carry a query or fragment, got {url!r}")
    path = parts.path.rstrip("/")
    # The 2.x SDK's DASHSCOPE_BASE_URL is a bare gateway host; the REST paths live under
    # /api/v1 there as on the legacy host. A base URL with a path is taken as it is (a proxy
    # may mount the API elsewhere).
    if not path:
        path = "/api/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def gateway_workspace(url: str) -> str | None:
    """The workspace id a 2.x gateway host names (``{ws}.{region}.maas.aliyuncs.com``)."""
    host = (urlsplit(url).hostname or "").lower()
    labels = host.split(".")
    if len(labels) == 5 and labels[2:] == ["maas", "aliyuncs", "com"] and labels[0]:
        return labels[0]
    return None


def _check_workspace(workspace: str | None, base_url: str) -> str | None:
    from_host = gateway_workspace(base_url)
    if workspace is None:
        # The gateway host is built from the workspace id (2.x builds it that way): the id is
        # the host's first label, and a workspace key needs the header there as well.
        return from_host
    workspace = workspace.strip()
    if not workspace or not all(c.isalnum() or c in "-_." for c in workspace):
        raise ValueError(f"not a workspace id: {workspace!r}")
    if from_host is not None and from_host != workspace.lower():
        raise ValueError(
            f"the base URL is the gateway of workspace {from_host!r}, but the workspace is "
            f"{workspace!r}"
        )
    return workspace


def _positive(raw: str, name: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive number of seconds, got {raw!r}")
    return value


def _non_negative_int(raw: str, name: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{name} must be a whole number >= 0, got {raw!r}")
    return value


def _log_level(raw: str) -> int:
    if raw.isdigit():
        return int(raw)
    level = logging.getLevelName(raw.upper())
    if not isinstance(level, int):
        raise ValueError(f"DASHSCOPE_LOG must be a logging level such as 'info', got {raw!r}")
    return level
