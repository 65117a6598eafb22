"""The check before a batch: is the API host reachable, and does it take the key?

Without it, a run with no network fails its jobs one by one as each one's retries run out
(minutes), and a wrong key fails the first few jobs before the batch stops. One cheap
authenticated request settles both first: ``GET /tasks?page_size=1`` (one task-list page of one
task: one task query and one list page of the account's budget, no bill), on a short-lived
client of its own whose retries and timeouts are short, so the whole check takes at most
:data:`PREFLIGHT_SECONDS`. It costs one more connection (and TLS handshake) per run.
"""

from __future__ import annotations

import argparse
from typing import Final
from urllib.parse import urlsplit

import anyio

from emo_async import (
    APIError,
    AuthenticationError,
    RetryPolicy,
    Timeouts,
    TransportError,
)

from ._output import UsageError, make_client

__all__ = ["PREFLIGHT_SECONDS", "preflight"]

#: The longest the check may take, retries included.
PREFLIGHT_SECONDS: Final = 15.0
_RETRY: Final = RetryPolicy(
    attempts=3, timeout=PREFLIGHT_SECONDS, wait_initial=0.5, wait_max=2.0, budget_tokens=None
)
_TIMEOUTS: Final = Timeouts(connect=5.0, read=10.0, total=10.0)


def _host(base_url: str) -> str:
    parts = urlsplit(base_url)
    return parts.netloc or base_url


async def preflight(args: argparse.Namespace, key: str) -> None:
    """Raise :class:`UsageError` (exit 2, one line) if the API cannot be used at all.

    A refused key or an unreachable host stops the run; any other answer (429, 5xx, a list
    the account may not read) proves the host is there and is left to the batch.
    """
    client = make_client(args, key, retry=_RETRY, timeouts=_TIMEOUTS)
    where = _host(client.base_url)
    try:
        with anyio.fail_after(PREFLIGHT_SECONDS):
            async with client:
                await client.list_page(1, page_size=1)
    except AuthenticationError as exc:
        raise UsageError(
            f"the API key in ${args.api_key_env} was refused by {where}"
            f" ({exc.status} {exc.code or ''}): nothing was sent; set the right key".replace(
                " )", ")"
            )
        ) from None
    except TimeoutError:
        raise UsageError(
            f"{where} did not answer within {PREFLIGHT_SECONDS:.0f} s: nothing was sent;"
            " check the network, or --base-url"
        ) from None
    except TransportError as exc:
        raise UsageError(
            f"cannot reach {where} ({_reason(exc)}): nothing was sent; check the network,"
            " or --base-url"
        ) from None
    except APIError:
        return  # it answered: reachable, and the key was not refused


def _reason(exc: TransportError) -> str:
    """The last part of a transport error (the OS's words), without the request's URL."""
    text = str(exc)
    return text.rsplit(": ", 1)[-1] if ": " in text else text
