"""Per-call options (``client.get_task(..., timeout=5)``): the timeout and extra headers of
every API request one call makes."""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType

import attrs

__all__ = ["CallOptions", "call_options", "current_call_options"]


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


def current_call_options() -> CallOptions:
    """The options of the call the running task is making (none outside a call)."""
    return _options.get()
