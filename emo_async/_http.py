"""The one request path to the DashScope API.

Auth header, per-phase timeouts, client-side rate limits, retries with full-jitter backoff, a
retry budget, ``Retry-After``, and status → exception mapping all live here, once.

Billed requests (the emo-v1 submit) follow a stricter rule: they are retried only when the
request provably never reached the server — the connection failed before the request headers
went out (seen through aiohttp's tracing hooks), or the server answered 429/503, which create
nothing. Any other failure after the request was sent raises :class:`AmbiguousSubmitError`:
a task may exist, and only the task list can tell.
"""

from __future__ import annotations

import contextvars
import datetime as _dt
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType, SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import anyio
import attrs

from ._config import WORKSPACE_HEADER, RetryPolicy, Timeouts
from ._exceptions import (
    AmbiguousSubmitError,
    APIError,
    RateLimitError,
    RequestTimeoutError,
    ServerError,
    TransportError,
    error_from_response,
)
from ._ratelimit import AdaptiveRateLimiter

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

logger = logging.getLogger("emo_async")

#: Error bodies and non-JSON bodies are cut to this many characters in messages.
_MAX_TEXT = 500
#: A JSON body larger than this is refused (a misbehaving server must not eat memory).
_MAX_BODY = 8 * 1024 * 1024


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
        if isinstance(req_ctx, _SendState):
            req_ctx.headers_sent = True

    tc = aiohttp.TraceConfig()
    tc.on_request_headers_sent.append(_sent)
    return tc


@attrs.frozen
class CallOptions:
    """Options of one single call (``client.get_task(..., timeout=5)``), for every API request
    the call makes.

    Attributes:
        timeout: Seconds allowed for each API request of the call, body included (replaces
            ``Timeouts.total``; connect and read are capped to it). None: the client's.
        extra_headers: Headers added to each API request of the call (never to the upload
            host); they win over the client's own, except ``Authorization``, which they may
            not name.
    """

    timeout: float | None = None
    extra_headers: Mapping[str, str] = attrs.field(factory=lambda: MappingProxyType({}))


_NO_OPTIONS = CallOptions()
# A context variable rather than a parameter threaded through every helper: a call's requests
# may be made by collaborators (the uploader fetches its policy) that know nothing of options.
_options: contextvars.ContextVar[CallOptions] = contextvars.ContextVar(
    "emo_async_call_options", default=_NO_OPTIONS
)


@contextmanager
def call_options(
    timeout: float | None = None, extra_headers: Mapping[str, str] | None = None
) -> Iterator[None]:
    """Apply per-call options to the API requests made inside the block (this task only).

    Raises:
        ValueError: ``extra_headers`` names ``Authorization``, or a bad ``timeout``.
    """
    if timeout is None and not extra_headers:
        yield
        return
    if timeout is not None and not (timeout > 0 and timeout != float("inf")):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    headers: dict[str, str] = {}
    for name, value in (extra_headers or {}).items():
        if name.strip().lower() == "authorization":
            raise ValueError("extra_headers may not set Authorization: pass api_key= instead")
        if any(c in "\r\n" for c in f"{name}{value}"):
            raise ValueError(f"extra_headers: header {name!r} holds a line break")
        headers[name] = str(value)
    token = _options.set(CallOptions(timeout, MappingProxyType(headers)))
    try:
        yield
    finally:
        _options.reset(token)


class _SendState:
    __slots__ = ("headers_sent",)

    def __init__(self) -> None:
        self.headers_sent = False


@attrs.frozen
class ApiResponse:
    """A successful answer: status, parsed JSON body and headers."""

    status: int
    body: Mapping[str, Any]
    headers: Mapping[str, str] = attrs.field(repr=False)

    @property
    def request_id(self) -> str | None:
        rid = self.body.get("request_id")
        return str(rid) if rid else None


class _RetryBudget:
    """gRPC-style retry throttling: retries stop once the budget is half spent."""

    def __init__(self, tokens: float | None, refill: float) -> None:
        self._max = tokens
        self._tokens = tokens or 0.0
        self._refill = refill

    def on_success(self) -> None:
        if self._max is not None:
            self._tokens = min(self._max, self._tokens + self._refill)

    def try_spend(self) -> bool:
        if self._max is None:
            return True
        if self._tokens - 1 < self._max / 2:
            return False
        self._tokens -= 1
        return True


@attrs.define
class HttpStatistics:
    requests: int = 0
    retries: int = 0
    throttled: int = 0
    server_errors: int = 0
    transport_errors: int = 0


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
        self._budget = _RetryBudget(retry.budget_tokens, retry.budget_refill)
        # The upload host is another failure domain: its outage must not spend the API's budget.
        self._external_budget = _RetryBudget(retry.budget_tokens, retry.budget_refill)
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
        options = _options.get()
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

        async def send(state: _SendState) -> ApiResponse:
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
                limit=_MAX_BODY + 1,
            )
            return _api_answer(what, status, raw, resp_headers, billed=billed)

        return await self._with_retries(
            send,
            what=what,
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
        total = _options.get().timeout
        timeout = aiohttp.ClientTimeout(
            total=total,
            sock_connect=t.connect if total is None else min(t.connect, total),
            sock_read=t.read if total is None else min(t.read, total),
        )

        async def send(state: _SendState) -> ApiResponse:
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

        return await self._with_retries(
            send,
            what=what,
            limiter=None,
            billed=False,
            stats=self.external_stats,
            budget=self._external_budget,
        )

    async def _with_retries(
        self,
        send: Callable[[_SendState], Awaitable[ApiResponse]],
        *,
        what: str,
        limiter: AdaptiveRateLimiter | None,
        billed: bool,
        stats: HttpStatistics,
        budget: _RetryBudget,
    ) -> ApiResponse:
        started = time.monotonic()
        attempt = 0
        while True:
            if limiter is not None:
                await limiter.acquire()
            state = _SendState()
            sent_at = _dt.datetime.now(_dt.UTC)
            stats.requests += 1
            try:
                result = await send(state)
            except TransportError as exc:
                stats.transport_errors += 1
                if billed and state.headers_sent:
                    raise AmbiguousSubmitError(
                        f"{what}: the request was sent but no answer came back "
                        f"({exc}); a task may have been created",
                        sent_at=sent_at,
                        failed_at=_dt.datetime.now(_dt.UTC),
                    ) from exc
                error: Exception = exc
                retry_after = None
            except APIError as exc:
                if isinstance(exc, RateLimitError):
                    stats.throttled += 1
                    # The family pauses for Retry-After, but no longer than retry_after_max:
                    # past that the error goes to the caller, and a pause of an hour would
                    # silently hold every later request of the family.
                    if limiter is not None:
                        limiter.on_throttle(
                            None
                            if exc.retry_after is None
                            else min(exc.retry_after, self._retry.retry_after_max)
                        )
                elif isinstance(exc, ServerError):
                    stats.server_errors += 1
                if billed and isinstance(exc, ServerError) and exc.status != 503:
                    # A 500 on a billed POST does not prove nothing was created.
                    raise AmbiguousSubmitError(
                        f"{what}: the server failed after receiving the request "
                        f"({exc}); a task may have been created",
                        sent_at=sent_at,
                        failed_at=_dt.datetime.now(_dt.UTC),
                    ) from exc
                if not exc.retryable:
                    raise
                error = exc
                retry_after = exc.retry_after if isinstance(exc, RateLimitError) else None
            else:
                if limiter is not None:
                    limiter.on_success()
                budget.on_success()
                return result

            if retry_after is not None and retry_after > self._retry.retry_after_max:
                raise error
            wait = self._retry.backoff(attempt, retry_after=retry_after)
            attempt += 1
            elapsed = time.monotonic() - started
            if (
                attempt >= self._retry.attempts
                or (self._retry.timeout is not None and elapsed + wait > self._retry.timeout)
                or not budget.try_spend()
            ):
                raise error
            stats.retries += 1
            logger.info(
                "retrying %s in %.2fs after %s (attempt %d of %d)",
                what,
                wait,
                type(error).__name__,
                attempt + 1,
                self._retry.attempts,
            )
            await anyio.sleep(wait)

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
        state: _SendState,
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


def _api_answer(
    what: str, status: int, raw: bytes, headers: Mapping[str, str], *, billed: bool
) -> ApiResponse:
    """An API answer as a success, or the :class:`APIError` it means."""
    rid_header = headers.get("X-Request-Id") or headers.get("x-request-id")
    body, text = _decode(raw)
    if len(raw) > _MAX_BODY:
        body, text = None, "response body too large"
    if 200 <= status < 300:
        if body is None:
            raise ServerError(
                f"the server answered {status} with a body that is not JSON: {text!r}",
                status=status,
                code=None,
                request_id=rid_header,
            )
        code = body.get("code")
        if code is not None and code not in _SUCCESS_CODES:
            task_id = _task_id(body)
            if not (billed and task_id):
                # A 200 whose body carries a business code is an error (DashScope does this).
                raise error_from_response(status, body, headers, request_id=rid_header)
            # A billed submit that names its task created it, whatever the code says: raising
            # would lose the id of a task that is billed and running.
            logger.warning(
                "%s -> %d with code %r, but it names task %s: taken as created",
                what,
                status,
                code,
                task_id,
            )
        logger.debug("%s -> %d request_id=%s", what, status, body.get("request_id"))
        return ApiResponse(status=status, body=body, headers=headers)
    if body is None:
        body = {"message": f"HTTP {status}: {text}" if text else f"HTTP {status}"}
    err = error_from_response(status, body, headers, request_id=rid_header)
    logger.debug("%s -> %d %s request_id=%s", what, status, err.code, err.request_id)
    raise err


#: Codes a 2xx answer may carry that mean success.
_SUCCESS_CODES: tuple[object, ...] = ("", "Success", "success", 0, "0")


def _task_id(body: Mapping[str, Any]) -> str | None:
    output = body.get("output")
    task_id = output.get("task_id") if isinstance(output, Mapping) else None
    return task_id if isinstance(task_id, str) and task_id else None


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


def _path(url: str) -> str:
    # Logs and messages carry the path only: never a query (signatures) or credentials.
    return urlsplit(url).path


def _decode(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    text = raw[:_MAX_TEXT].decode("utf-8", "replace")
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None, text
    if not isinstance(value, dict):
        return None, text
    return value, text
