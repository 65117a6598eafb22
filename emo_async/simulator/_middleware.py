"""In front of every handler: routing by role, auth, rate limits, the fault dice, the ledger."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

from ._core import API_PREFIX, SimState, drop, json_response, oss_error, request_ctx, rid
from ._errors import ApiError, Msg
from ._ledger import RequestRecord

__all__ = ["Handler", "Middleware", "classify"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MEDIA_PATH: Final = re.compile(r"^/results/(?P<task_id>[^/]+)\.mp4$")
_TASK_PATH: Final = re.compile(r"^/api/v1/tasks/(?P<task_id>[^/]+)$")
_CANCEL_PATH: Final = re.compile(r"^/api/v1/tasks/(?P<task_id>[^/]+)/cancel$")

WORKSPACE_HEADER: Final = "X-DashScope-WorkSpace"
# Our wording: the general error table names the codes, not these messages.
_WORKSPACE_DENIED: Final = "You do not have access to the workspace of this request."
_WORKSPACE_NOT_FOUND: Final = "The workspace specified by X-DashScope-WorkSpace does not exist."


def classify(method: str, path: str) -> tuple[str, str]:
    """(role, endpoint) a request path belongs to; endpoint ``"other"`` if none."""
    if path.startswith(API_PREFIX + "/") or path == API_PREFIX:
        sub = path[len(API_PREFIX) :]
        if method == "POST" and sub == "/services/aigc/image2video/face-detect":
            return "api", "detect"
        if method == "POST" and sub in (
            "/services/aigc/image2video/video-synthesis",
            "/services/aigc/image2video/video-synthesis/",
        ):
            return "api", "submit"
        if method == "GET" and sub in ("/tasks", "/tasks/"):
            return "api", "task_list"
        if method == "GET" and _TASK_PATH.match(path):
            return "api", "task_get"
        if method == "POST" and _CANCEL_PATH.match(path):
            return "api", "task_cancel"
        if method == "GET" and sub == "/uploads":
            return "api", "get_policy"
        return "api", "other"
    if path.startswith("/results/"):
        if method in ("GET", "HEAD") and MEDIA_PATH.match(path):
            return "media", "media"
        return "media", "other"
    if path == "/" and method == "POST":
        return "upload", "upload"
    return "upload", "other"


class Middleware:
    """The application's one middleware.

    The API host's handlers are routed by aiohttp; the upload and media hosts answer every
    request their listener gets (a real OSS host has no ``/api/v1``), so they are called
    here, by role.
    """

    def __init__(self, state: SimState, *, upload: Handler, media: Handler) -> None:
        self._state = state
        self._upload = upload
        self._media = media

    def role_of(self, request: web.Request) -> str | None:
        """The role of the listener that got the request (None: route by path)."""
        port_roles = self._state.port_roles
        if not port_roles or request.transport is None:
            return None
        sockname = request.transport.get_extra_info("sockname")
        if isinstance(sockname, tuple) and len(sockname) >= 2:
            return port_roles.get(int(sockname[1]))
        return None

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Answer one request and write it in the ledger."""
        arrival = time.monotonic()
        self._state.other_program.catch_up()
        path_role, endpoint = classify(request.method, request.path)
        role = self.role_of(request) or path_role
        if role != path_role:
            endpoint = "other"
        ctx = request_ctx(request)
        status: int | None = None
        try:
            response = await self._dispatch(request, handler, role, endpoint)
            if not ctx.dropped:
                status = response.status
                if ctx.bytes_sent is None:
                    body = response.body if isinstance(response, web.Response) else None
                    ctx.bytes_sent = len(body) if isinstance(body, bytes | bytearray) else 0
                    if request.method == "HEAD":
                        ctx.bytes_sent = 0
            return response
        finally:
            self._state.ledger.record(
                RequestRecord(
                    t=arrival,
                    role=role,
                    endpoint=endpoint,
                    method=request.method,
                    path=request.path,
                    status=status,
                    authorization="Authorization" in request.headers,
                    fault=ctx.fault,
                    bytes_sent=ctx.bytes_sent or 0,
                )
            )

    def _error(self, role: str, exc: ApiError) -> web.Response:
        if role == "api":
            body = {"request_id": rid(), "code": exc.code, "message": exc.message}
            return json_response(body, exc.status, exc.headers)
        return oss_error(exc.status, exc.code, exc.message, exc.headers)

    def _throttle(self) -> ApiError:
        headers = {}
        retry_after = self._state.faults.retry_after
        if retry_after is not None:
            headers["Retry-After"] = f"{retry_after:g}"
        return ApiError(429, "Throttling.RateQuota", Msg.RATE_QUOTA, headers=headers)

    async def _dispatch(
        self, request: web.Request, handler: Handler, role: str, endpoint: str
    ) -> web.StreamResponse:
        state = self._state
        faults = state.faults
        ctx = request_ctx(request)
        try:
            if role == "api" and request.can_read_body:
                # A real server has the whole request before it takes its time over it: read
                # the body first, so a client that gives up during the latency does not
                # un-send its request (a submit still creates its task, as it would there).
                await request.read()
            if faults.latency > 0 or faults.latency_jitter > 0:
                await asyncio.sleep(
                    faults.latency + state.fault_rng.uniform(0, faults.latency_jitter)
                )
            if state.roll(faults.slow_rate):
                ctx.fault = "slow"
                await asyncio.sleep(faults.slow_delay)
            if endpoint == "other":
                if role == "api":
                    raise ApiError(404, "NotFound", Msg.NOT_FOUND)
                raise ApiError(404, "NoSuchKey", "The specified key does not exist.")
            if role == "api":
                self._authenticate(request)
                self._check_workspace(request)
                bucket = state.buckets.get(endpoint)
                if bucket is not None and not bucket.take():
                    raise self._throttle()
            if state.roll(faults.throttle_rate.get(endpoint, 0.0)):
                ctx.fault = "throttle"
                raise self._throttle()
            if state.roll(faults.error_rate.get(endpoint, 0.0)):
                ctx.fault = "error"
                if state.fault_rng.random() < 0.5:
                    raise ApiError(500, "InternalError", Msg.INTERNAL)
                raise ApiError(503, "ModelUnavailable", Msg.UNAVAILABLE)
            if state.roll(faults.reset_rate.get(endpoint, 0.0)):
                return drop(request, "reset")
            if role == "media":
                return await self._media(request)
            if role == "upload":
                return await self._upload(request)
            return await handler(request)
        except ApiError as exc:
            return self._error(role, exc)
        except web.HTTPException as exc:
            # aiohttp's own refusals (body too large, bad request line...) in our error format.
            if exc.status < 400:
                raise
            return self._error(
                role,
                ApiError(
                    exc.status,
                    "InvalidParameter" if exc.status < 500 else "InternalError",
                    exc.reason,
                ),
            )

    def _check_workspace(self, request: web.Request) -> None:
        expected = self._state.config.workspace
        if expected is None:
            return
        # Header names are case-insensitive; the id is compared exactly (inferred).
        sent = request.headers.get(WORKSPACE_HEADER, "").strip()
        if not sent:
            raise ApiError(403, "Workspace.AccessDenied", _WORKSPACE_DENIED)
        if sent != expected:
            raise ApiError(404, "WorkSpaceNotFound", _WORKSPACE_NOT_FOUND)

    def _authenticate(self, request: web.Request) -> None:
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or key.strip() not in self._state.config.api_keys:
            raise ApiError(401, "InvalidApiKey", Msg.INVALID_KEY)
