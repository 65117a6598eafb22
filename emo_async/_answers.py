"""An API answer read: a success body, or the :class:`APIError` its status and code mean."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import attrs

from ._exceptions import ServerError, error_from_response

__all__ = ["MAX_BODY", "ApiResponse", "api_answer"]

logger = logging.getLogger("emo_async")

#: Error bodies and non-JSON bodies are cut to this many characters in messages.
_MAX_TEXT = 500
#: A JSON body larger than this is refused (a misbehaving server must not eat memory).
MAX_BODY = 8 * 1024 * 1024


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


def api_answer(
    what: str, status: int, raw: bytes, headers: Mapping[str, str], *, billed: bool
) -> ApiResponse:
    """An API answer as a success, or the :class:`APIError` it means."""
    rid_header = headers.get("X-Request-Id") or headers.get("x-request-id")
    body, text = _decode(raw)
    if len(raw) > MAX_BODY:
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
    elif billed and (task_id := _task_id(body)):
        # Whatever the status says, an answer to a billed submit that names its task is a task.
        logger.warning("%s -> %d, but it names task %s: taken as created", what, status, task_id)
        return ApiResponse(status=status, body=body, headers=headers)
    err = error_from_response(status, body, headers, request_id=rid_header)
    logger.debug("%s -> %d %s request_id=%s", what, status, err.code, err.request_id)
    raise err


#: Codes a 2xx answer may carry that mean success.
_SUCCESS_CODES: tuple[object, ...] = ("", "Success", "success", 0, "0")


def _task_id(body: Mapping[str, Any]) -> str | None:
    output = body.get("output")
    task_id = output.get("task_id") if isinstance(output, Mapping) else None
    return task_id if isinstance(task_id, str) and task_id else None


def _decode(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    text = raw[:_MAX_TEXT].decode("utf-8", "replace")
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None, text
    if not isinstance(value, dict):
        return None, text
    return value, text
