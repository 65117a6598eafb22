"""The retry loop every request goes through: rate limits, full-jitter backoff,
``Retry-After``, a retry budget, and the billed rule (a sent submit is never resent blindly).

Billed requests (the emo-v1 submit) are retried only when the request provably never reached
the server — the connection failed before the request headers went out (seen through
aiohttp's tracing hooks), or the server answered 429/503, which create nothing. Any other
failure after the request was sent raises :class:`AmbiguousSubmitError`: a task may exist,
and only the task list can tell.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import logging
import time
from collections.abc import Awaitable, Callable, Iterator

import anyio
import attrs

from ._answers import ApiResponse
from ._config import RetryPolicy
from ._exceptions import (
    AmbiguousSubmitError,
    APIError,
    RateLimitError,
    ServerError,
    TransportError,
)
from ._net import SendState
from ._ratelimit import AdaptiveRateLimiter

__all__ = ["HttpStatistics", "RetryBudget", "billed_fence", "with_retries"]

logger = logging.getLogger("emo_async")

# A check that each billed attempt passes right before it goes on the wire, after every wait
# (limiter, backoff): a worker of a shared batch may have lost its claim meanwhile, and then
# the job is another's, whose settling assumes nothing more will be sent.
_fence: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "emo_async_billed_fence", default=None
)


@contextlib.contextmanager
def billed_fence(check: Callable[[], None] | None) -> Iterator[None]:
    """Run ``check`` before every billed attempt made inside the block (this task only); it
    raises to stop the attempt, which is then never sent."""
    token = _fence.set(check)
    try:
        yield
    finally:
        _fence.reset(token)


class RetryBudget:
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
    #: Seconds the latest answered billed POST took on the wire (limiter waits excluded).
    last_billed_seconds: float | None = None


async def with_retries(
    send: Callable[[SendState], Awaitable[ApiResponse]],
    *,
    what: str,
    retry: RetryPolicy,
    limiter: AdaptiveRateLimiter | None,
    billed: bool,
    stats: HttpStatistics,
    budget: RetryBudget,
) -> ApiResponse:
    """Call ``send`` until it answers, the policy gives up, or the error is not retryable.

    Raises:
        APIError: the last error answer (at once when it is not retryable).
        AmbiguousSubmitError: a billed request was sent but got no usable answer.
        TransportError: no answer, after the retries.
    """
    started = time.monotonic()
    attempt = 0
    while True:
        if limiter is not None:
            await limiter.acquire()
        if billed and (fence := _fence.get()) is not None:
            fence()
        state = SendState()
        sent_at = _dt.datetime.now(_dt.UTC)
        on_wire = time.monotonic()
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
                        else min(exc.retry_after, retry.retry_after_max)
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
            if billed:
                stats.last_billed_seconds = time.monotonic() - on_wire
            if limiter is not None:
                limiter.on_success()
            budget.on_success()
            return result

        if retry_after is not None and retry_after > retry.retry_after_max:
            raise error
        wait = retry.backoff(attempt, retry_after=retry_after)
        attempt += 1
        elapsed = time.monotonic() - started
        if (
            attempt >= retry.attempts
            or (retry.timeout is not None and elapsed + wait > retry.timeout)
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
            retry.attempts,
        )
        await anyio.sleep(wait)
