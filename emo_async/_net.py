"""Where API requests go and what they reveal: origins, the environment's proxy, loopback
hosts, and the tracing hook that tells whether a request's headers reached the wire."""

from __future__ import annotations

from types import SimpleNamespace
from urllib.parse import urlsplit

import aiohttp

__all__ = ["SendState", "env_proxy", "is_loopback_host", "make_trace_config", "origin_of"]


def origin_of(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL, with default ports filled in."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return scheme, (parts.hostname or "").lower(), port


def env_proxy(url: str) -> str | None:
    """The proxy the environment (``HTTPS_PROXY``, ``NO_PROXY``, ...) names for ``url``, read
    once rather than on every request."""
    import urllib.request

    parts = urlsplit(url)
    host = parts.hostname or ""
    if urllib.request.proxy_bypass(host) or is_loopback_host(host):
        return None
    return urllib.request.getproxies().get(parts.scheme)


def is_loopback_host(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def make_trace_config() -> aiohttp.TraceConfig:
    """Tracing that records, per request, whether its headers reached the wire."""

    async def _sent(
        session: aiohttp.ClientSession,
        ctx: SimpleNamespace,
        params: aiohttp.TraceRequestHeadersSentParams,
    ) -> None:
        req_ctx = getattr(ctx, "trace_request_ctx", None)
        if isinstance(req_ctx, SendState):
            req_ctx.headers_sent = True

    tc = aiohttp.TraceConfig()
    tc.on_request_headers_sent.append(_sent)
    return tc


class SendState:
    __slots__ = ("headers_sent",)

    def __init__(self) -> None:
        self.headers_sent = False
