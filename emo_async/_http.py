"""The one request path to the DashScope API: :class:`HttpCore`.

It adds the auth header and the per-phase timeouts, reads a capped body, and hands every
request to the one retry loop (:mod:`._retry`); the answer is read by :mod:`._answers`.
Requests to the upload host take the same path on a session that carries no key.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from ._answers import MAX_BODY, ApiResponse, api_answer
from ._calloptions import CallOptions, call_options, current_call_options
from ._config import WORKSPACE_HEADER, RetryPolicy, Timeouts
from ._exceptions import RequestTimeoutError, TransportError
from ._net import SendState, env_proxy, is_loopback_host, make_trace_config, origin_of
from ._ratelimit import AdaptiveRateLimiter
from ._retry import HttpStatistics, RetryBudget, with_retries

__all__ = [
    "ApiResponse",
    "CallOptions",
    "HttpCore",
    "call_options",
    "env_proxy",
    "is_loopback_host",
    "make_trace_config",
    "origin_of",
]


class HttpCore:
    """Sends API requests for one :class:`Client` (internal), and the keyless requests to the
    upload host, through one retry loop."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        billed_session: aiohttp.ClientSession | None = None,
        external_session: aiohttp.ClientSession | None = None,
        proxy: str | None = None,
        base_url: str,
        api_key: str,
        timeouts: Timeouts,
        external_timeouts: Timeouts | None = None,
        retry: RetryPolicy,
        limiters: Mapping[str, AdaptiveRateLimiter],
        user_agent: str,
        workspace: str | None = None,
    ) -> None:
        self._session = session
        self._billed_session = billed_session or session
        self._external_session = external_session
        self._proxy = proxy
        self._external_proxies: dict[tuple[str, str, int], str | None] = {}
        self._base = base_url.rstrip("/")
        self._key = api_key
        self._timeouts = timeouts
        self._external_timeouts = external_timeouts or timeouts
        self._retry = retry
        self._limiters = limiters
        self._budget = RetryBudget(retry.budget_tokens, retry.budget_refill)
        # The upload host is another failure domain: its outage must not spend the API's budget.
        self._external_budget = RetryBudget(retry.budget_tokens, retry.budget_refill)
        self._ua = user_agent
        self._workspace = workspace
        self.stats = HttpStatistics()
        #: Requests to hosts other than the API (uploads); not part of the API's statistics.
        self.external_stats = HttpStatistics()

    @property
    def base_url(self) -> str:
        return self._base

    def _timeout(self, total: float | None) -> aiohttp.ClientTimeout:
        t = self._timeouts
        if total is None:
            return aiohttp.ClientTimeout(total=t.total, sock_connect=t.connect, sock_read=t.read)
        return aiohttp.ClientTimeout(
            total=total, sock_connect=min(t.connect, total), sock_read=min(t.read, total)
        )

    async def request(
        self,
        method: str,
        path: str,
        *,
        family: str,
        json_body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        billed: bool = False,
    ) -> ApiResponse:
        """Send one API request, with retries, and return the parsed success body.

        Raises:
            APIError: the server answered with an error (after retries where they apply).
            AmbiguousSubmitError: a billed request was sent but got no usable answer.
            TransportError: no answer (after retries).
        """
        url = self._base + path
        options = current_call_options()
        hdrs = {
            "Accept": "application/json",
            "User-Agent": self._ua,
        }
        if self._workspace is not None:
            # A workspace key needs it on every API request, the task queries included.
            hdrs[WORKSPACE_HEADER] = self._workspace
        if json_body is not None:
            hdrs["Content-Type"] = "application/json"
        if headers:
            hdrs.update(headers)
        for name, value in options.extra_headers.items():
            # The caller's spelling of a header replaces ours whatever its case.
            for ours in [h for h in hdrs if h.lower() == name.lower()]:
                del hdrs[ours]
            hdrs[name] = value
        hdrs["Authorization"] = f"Bearer {self._key}"
        data = json.dumps(json_body, separators=(",", ":")) if json_body is not None else None
        session = self._billed_session if billed else self._session
        timeout = self._timeout(options.timeout)
        what = f"{method} {path}"

        async def send(state: SendState) -> ApiResponse:
            status, raw, resp_headers = await self._exchange(
                session,
                method,
                url,
                what=what,
                headers=hdrs,
                data=data,
                params=params,
                client_timeout=timeout,
                proxy=self._proxy,
                state=state,
                limit=MAX_BODY + 1,
            )
            return api_answer(what, status, raw, resp_headers, billed=billed)

        return await with_retries(
            send,
            what=what,
            retry=self._retry,
            limiter=self._limiters[family],
            billed=billed,
            stats=self.stats,
            budget=self._budget,
        )

    async def send_external(
        self,
        method: str,
        url: str,
        *,
        what: str,
        prepare: Callable[[], tuple[Any, Mapping[str, str]]],
        interpret: Callable[[int, bytes, Mapping[str, str]], ApiResponse],
        read_limit: int = 4096,
    ) -> ApiResponse:
        """Send a request to a host that is not the API (the upload host), through the same
        retries, backoff, Retry-After handling and transport-error mapping as API requests.

        It goes out on the external session, which carries no key: no ``Authorization`` header
        ever reaches such a host. Its timeouts are the external ones (connect and per-read, no
        total: a large upload on a slow link is not an error).

        Args:
            what: How messages and logs name the request (never the URL: it may be signed).
            prepare: Builds the body and its headers afresh for every attempt (a streamed
                body cannot be replayed).
            interpret: Turns (status, the body's first ``read_limit`` bytes, headers) into
                the answer, or raises the :class:`APIError` it means (its class decides
                whether the request is retried).
        """
        session = self._external_session
        if session is None:
            raise RuntimeError("this HttpCore has no session for external hosts")
        if origin_of(url) == origin_of(self._base):
            raise ValueError(f"{what}: the API host is not an external host")
        origin = origin_of(url)
        if origin not in self._external_proxies:
            self._external_proxies[origin] = env_proxy(url)
        proxy = self._external_proxies[origin]
        t = self._external_timeouts
        total = current_call_options().timeout
        timeout = aiohttp.ClientTimeout(
            total=total,
            sock_connect=t.connect if total is None else min(t.connect, total),
            sock_read=t.read if total is None else min(t.read, total),
        )

        async def send(state: SendState) -> ApiResponse:
            data, headers = prepare()
            if any(name.lower() == "authorization" for name in headers):
                raise ValueError(f"{what}: an external host never gets an Authorization header")
            status, raw, resp_headers = await self._exchange(
                session,
                method,
                url,
                what=what,
                headers=headers,
                data=data,
                params=None,
                client_timeout=timeout,
                proxy=proxy,
                state=state,
                limit=read_limit,
            )
            return interpret(status, raw, resp_headers)

        return await with_retries(
            send,
            what=what,
            retry=self._retry,
            limiter=None,
            billed=False,
            stats=self.external_stats,
            budget=self._external_budget,
        )

    async def _exchange(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: str,
        *,
        what: str,
        headers: Mapping[str, str],
        data: Any,
        params: Mapping[str, str] | None,
        client_timeout: aiohttp.ClientTimeout,
        proxy: str | None,
        state: SendState,
        limit: int,
    ) -> tuple[int, bytes, dict[str, str]]:
        """One request: (status, the body's first ``limit`` bytes, headers), or a
        :class:`TransportError`."""
        try:
            async with session.request(
                method,
                url,
                data=data,
                params=params,
                headers=headers,
                timeout=client_timeout,
                allow_redirects=False,
                proxy=proxy,
                trace_request_ctx=state,
            ) as resp:
                raw = await _read_capped(resp.content, limit)
                return resp.status, raw, dict(resp.headers)
        except TimeoutError as exc:
            raise RequestTimeoutError(f"{what}: timed out") from exc
        except aiohttp.ClientError as exc:
            # Not chained: aiohttp errors can carry the request headers, Authorization included.
            raise TransportError(f"{what}: {type(exc).__name__}: {exc}") from None


async def _read_capped(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """The whole body, or its first ``limit`` bytes.

    ``StreamReader.read(n)`` returns whatever has arrived so far, at most ``n`` bytes: for an
    answer that comes in several packets that is only its beginning (read as "not JSON"), and
    a huge answer was never seen to be huge.
    """
    buf = bytearray()
    async for chunk in stream.iter_chunked(64 * 1024):
        buf += chunk
        if len(buf) >= limit:
            break
    return bytes(buf[:limit])
