"""The request path, against a scripted aiohttp server on 127.0.0.1: error mapping, retries,
Retry-After, the retry budget, billed-submit safety, and the key's secrecy."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

import emo_async
from emo_async import Client, Limits, RetryPolicy, Timeouts
from emo_async._ratelimit import AdaptiveRateLimiter

pytestmark = pytest.mark.anyio

KEY = "sk-test-SECRET-0123456789"

Script = Callable[[web.Request, int], web.StreamResponse | None]


@attrs.define
class Scripted:
    """A loopback server whose answers a test scripts; it records every arrival."""

    server: TestServer
    arrivals: list[tuple[float, str, str, bool]] = attrs.field(factory=list)
    script: Script | None = None

    @property
    def base_url(self) -> str:
        return str(self.server.make_url("/api/v1"))

    def count(self, path_part: str = "") -> int:
        return sum(1 for a in self.arrivals if path_part in a[2])


@pytest.fixture
async def scripted() -> AsyncIterator[Scripted]:
    holder: dict[str, Scripted] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        s = holder["s"]
        await request.read()
        if request.path.startswith("/slow/"):
            await asyncio.sleep(2)
        s.arrivals.append(
            (time.monotonic(), request.method, request.path, "Authorization" in request.headers)
        )
        n = sum(1 for a in s.arrivals if a[2] == request.path)
        if s.script is not None:
            resp = s.script(request, n)
            if resp is not None:
                return resp
        return web.json_response(
            {"request_id": f"r{n}", "output": {"task_id": "t1", "task_status": "RUNNING"}}
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    holder["s"] = Scripted(server)
    try:
        yield holder["s"]
    finally:
        await server.close()


def fast_retry(**kw: Any) -> RetryPolicy:
    return RetryPolicy(**{"attempts": 4, "wait_initial": 0.01, "wait_max": 0.05, **kw})


def make_client(s: Scripted, **kw: Any) -> Client:
    kw.setdefault("retry", fast_retry())
    kw.setdefault("limits", Limits(task_qps=200, submit_qps=200, cancel_qps=200))
    return Client(KEY, base_url=s.base_url, **kw)


def err(status: int, code: str, message: str = "m", **headers: str) -> web.Response:
    return web.json_response(
        {"request_id": "rid-1", "code": code, "message": message}, status=status, headers=headers
    )


ERROR_TABLE = [
    (400, "InvalidParameter", emo_async.InvalidParameterError),
    (400, "InvalidURL", emo_async.InvalidURLError),
    (400, "InvalidFile.Content", emo_async.InvalidFileContentError),
    (400, "InvalidFile.BodyProportion", emo_async.InvalidFileBodyProportionError),
    (400, "InvalidFile.Resolution", emo_async.InvalidFileResolutionError),
    (400, "InvalidFile.Value", emo_async.InvalidFileValueError),
    (400, "InvalidFile.FrontBody", emo_async.InvalidFilePoseError),
    (400, "InvalidFile.FullFace", emo_async.InvalidFilePoseError),
    (400, "InvalidFile.FacePose", emo_async.InvalidFilePoseError),
    (400, "InvalidFile.SomethingNew", emo_async.InvalidFileError),
    (400, "DataInspectionFailed", emo_async.DataInspectionFailedError),
    (400, "UnsupportedOperation", emo_async.UnsupportedOperationError),
    (400, "Arrearage", emo_async.QuotaExhaustedError),
    (401, "InvalidApiKey", emo_async.InvalidApiKeyError),
    (403, "AccessDenied", emo_async.AccessDeniedError),
    (403, "Model.AccessDenied", emo_async.AccessDeniedError),
    (404, "ModelNotFound", emo_async.NotFoundError),
    (403, "Workspace.AccessDenied", emo_async.WorkspaceAccessDeniedError),
    (404, "WorkSpaceNotFound", emo_async.WorkspaceNotFoundError),
    (429, "Throttling.AllocationQuota", emo_async.QuotaExhaustedError),
    (429, "PrepaidBillOverdue", emo_async.QuotaExhaustedError),
    (429, "CommodityNotPurchased", emo_async.QuotaExhaustedError),
]

RETRYABLE_TABLE = [
    (429, "Throttling", emo_async.RateLimitError),
    (429, "Throttling.RateQuota", emo_async.RateLimitError),
    (429, "LimitRequests", emo_async.RateLimitError),
    (500, "InternalError", emo_async.InternalServerError),
    (500, "InternalError.Algo", emo_async.InternalServerError),
    (500, "InternalError.Timeout", emo_async.InternalServerError),
    (500, "SystemError", emo_async.InternalServerError),
    (503, "ModelUnavailable", emo_async.ModelUnavailableError),
]


class TestErrorMapping:
    """Every documented code surfaces as its own catchable class with its data."""

    @pytest.mark.parametrize(("status", "code", "cls"), ERROR_TABLE)
    async def test_final_error_is_specific_and_not_retried(
        self, scripted: Scripted, status: int, code: str, cls: type[Exception]
    ) -> None:
        scripted.script = lambda r, n: err(status, code, "the message")
        async with make_client(scripted) as client:
            with pytest.raises(cls) as info:
                await client.get_task("abc")
        e = info.value
        assert isinstance(e, emo_async.APIError)
        assert (e.status, e.code, e.message, e.request_id) == (
            status,
            code,
            "the message",
            "rid-1",
        )
        assert scripted.count("/tasks/abc") == 1

    @pytest.mark.parametrize(("status", "code", "cls"), RETRYABLE_TABLE)
    async def test_retryable_error_is_retried_then_raised(
        self, scripted: Scripted, status: int, code: str, cls: type[Exception]
    ) -> None:
        scripted.script = lambda r, n: err(status, code)
        async with make_client(scripted, retry=fast_retry(attempts=3)) as client:
            with pytest.raises(cls):
                await client.get_task("abc")
        assert scripted.count("/tasks/abc") == 3

    async def test_200_with_code_is_an_error(self, scripted: Scripted) -> None:
        scripted.script = lambda r, n: err(200, "InvalidParameter", "hidden in a 200")
        async with make_client(scripted) as client:
            with pytest.raises(emo_async.InvalidParameterError, match="hidden in a 200"):
                await client.get_task("abc")

    async def test_200_with_code_and_task_id_is_an_error_unless_billed(
        self, scripted: Scripted
    ) -> None:
        scripted.script = lambda r, n: web.json_response(
            {"code": "InternalError", "message": "m", "output": {"task_id": "abc"}}
        )
        async with make_client(scripted, retry=fast_retry(attempts=1)) as client:
            with pytest.raises(emo_async.InternalServerError):
                await client.get_task("abc")

    @pytest.mark.parametrize("code", ["Success", "success", 0, "0", ""])
    async def test_200_with_a_success_code_is_a_success(
        self, scripted: Scripted, code: object
    ) -> None:
        scripted.script = lambda r, n: web.json_response(
            {
                "request_id": "r",
                "code": code,
                "output": {"task_id": "abc", "task_status": "RUNNING"},
            }
        )
        async with make_client(scripted) as client:
            task = await client.get_task("abc")
        assert task.status == emo_async.TaskStatus.RUNNING
        assert scripted.count("/tasks/abc") == 1

    async def test_non_json_error_body_becomes_server_error(self, scripted: Scripted) -> None:
        scripted.script = lambda r, n: web.Response(status=502, text="<html>bad gateway</html>")
        async with make_client(scripted, retry=fast_retry(attempts=2)) as client:
            with pytest.raises(emo_async.ServerError, match="bad gateway") as info:
                await client.get_task("abc")
        assert info.value.status == 502

    async def test_non_json_success_body_is_an_error_not_a_crash(self, scripted: Scripted) -> None:
        scripted.script = lambda r, n: web.Response(status=200, text="not json")
        async with make_client(scripted, retry=fast_retry(attempts=1)) as client:
            with pytest.raises(emo_async.ServerError, match="not JSON"):
                await client.get_task("abc")

    async def test_response_missing_status_is_not_a_verdict(self, scripted: Scripted) -> None:
        scripted.script = lambda r, n: web.json_response({"request_id": "x"})
        async with make_client(scripted) as client:
            task = await client.get_task("abc")
        assert task.task_id == "abc"
        assert task.status.value == "MISSING"
        assert not task.is_terminal


class TestRetries:
    """Reads ride out 429 and 5xx; Retry-After is honoured; the budget stops amplification."""

    async def test_429_then_success(self, scripted: Scripted) -> None:
        scripted.script = lambda r, n: err(429, "Throttling.RateQuota") if n < 3 else None
        async with make_client(scripted) as client:
            task = await client.get_task("abc")
            assert client.statistics().throttled == 2
        assert task.status == emo_async.TaskStatus.RUNNING
        assert scripted.count("/tasks/abc") == 3

    @pytest.mark.parametrize(
        "headers",
        [{"Retry-After": "0.3"}, {"retry-after-ms": "300"}],
    )
    async def test_retry_after_is_honoured(
        self, scripted: Scripted, headers: dict[str, str]
    ) -> None:
        scripted.script = lambda r, n: err(429, "Throttling", **headers) if n == 1 else None
        async with make_client(scripted) as client:
            await client.get_task("abc")
        first, second = (a[0] for a in scripted.arrivals[:2])
        assert second - first >= 0.3

    async def test_retry_after_http_date_is_parsed(self) -> None:
        when = emo_async._exceptions.parse_retry_after(
            {"Retry-After": "Wed, 21 Oct 2099 07:28:00 GMT"}
        )
        assert when is not None
        assert when > 3600

    async def test_retry_after_beyond_ceiling_raises_instead_of_waiting(
        self, scripted: Scripted
    ) -> None:
        scripted.script = lambda r, n: err(429, "Throttling", **{"Retry-After": "3600"})
        async with make_client(scripted, retry=fast_retry(retry_after_max=10)) as client:
            with pytest.raises(emo_async.RateLimitError) as info:
                await client.get_task("abc")
        assert info.value.retry_after == 3600
        assert scripted.count("/tasks/abc") == 1

    async def test_retry_budget_stops_amplifying_an_outage(self, scripted: Scripted) -> None:
        scripted.script = lambda r, n: err(503, "ModelUnavailable")
        policy = fast_retry(attempts=10, budget_tokens=4, budget_refill=0.1)
        async with make_client(scripted, retry=policy) as client:
            for i in range(5):
                with pytest.raises(emo_async.ModelUnavailableError):
                    await client.get_task(f"t{i}")
        # 4 tokens, retries allowed while more than half remain: 2 retries in total, so
        # 5 first tries + 2 retries instead of 5 x 10 requests.
        assert len(scripted.arrivals) == 7

    async def test_connection_refused_is_a_transport_error(self) -> None:
        import socket

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        client = Client(KEY, base_url=f"http://127.0.0.1:{port}/api/v1", retry=fast_retry())
        async with client:
            with pytest.raises(emo_async.TransportError) as info:
                await client.get_task("abc")
        assert KEY not in str(info.value)


class TestBackoff:
    """One formula for every wait: full jitter under an exponential ceiling capped at wait_max;
    a Retry-After is a floor, capped at retry_after_max."""

    def test_full_jitter_stays_under_the_exponential_ceiling(self) -> None:
        policy = RetryPolicy(wait_initial=0.5, wait_max=3.0, wait_exp_base=2.0)
        for attempt, ceiling in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 3.0), (10, 3.0)]:
            waits = [policy.backoff(attempt) for _ in range(400)]
            assert all(0.0 <= w <= ceiling for w in waits)
            assert max(waits) > 0.8 * ceiling  # spread over the whole range, not a constant
            assert min(waits) < 0.2 * ceiling

    def test_without_jitter_the_ceiling_itself(self) -> None:
        policy = RetryPolicy(wait_initial=0.5, wait_max=3.0, wait_jitter=False)
        assert [policy.backoff(n) for n in range(4)] == [0.5, 1.0, 2.0, 3.0]
        assert policy.backoff(100_000) == 3.0  # no overflow on a very late attempt
        assert policy.backoff(-1) == 0.5

    def test_retry_after_is_a_floor_capped_at_retry_after_max(self) -> None:
        policy = RetryPolicy(wait_initial=0.5, wait_max=3.0, retry_after_max=10.0)
        assert all(policy.backoff(0, retry_after=7.0) == 7.0 for _ in range(50))
        assert policy.backoff(0, retry_after=3600.0) == 10.0
        # A Retry-After shorter than the jittered wait does not shorten it.
        fixed = RetryPolicy(wait_initial=2.0, wait_jitter=False)
        assert fixed.backoff(0, retry_after=0.1) == 2.0
        assert fixed.backoff(0, retry_after=-5.0) == 2.0


class TestBilledSubmit:
    """A submit is resent only when provably nothing was created."""

    BOX = (0, 0, 100, 100)

    async def submit(self, client: Client) -> emo_async.Task:
        return await client.submit(
            "http://127.0.0.1/i.png",
            "http://127.0.0.1/a.wav",
            face_bbox=self.BOX,
            ext_bbox=self.BOX,
        )

    async def test_submit_sends_async_header_and_body(self, scripted: Scripted) -> None:
        seen: dict[str, Any] = {}

        def script(r: web.Request, n: int) -> web.Response:
            seen["async"] = r.headers.get("X-DashScope-Async")
            seen["oss"] = r.headers.get("X-DashScope-OssResourceResolve")
            return web.json_response(
                {"request_id": "r", "output": {"task_id": "T", "task_status": "PENDING"}}
            )

        scripted.script = script
        async with make_client(scripted) as client:
            task = await self.submit(client)
        assert task.task_id == "T"
        assert seen == {"async": "enable", "oss": None}

    @pytest.mark.parametrize("code", ["InternalError.Algo", "Success"])
    async def test_200_with_code_and_task_id_is_a_created_task(
        self, scripted: Scripted, code: str
    ) -> None:
        scripted.script = lambda r, n: web.json_response(
            {
                "request_id": "r",
                "code": code,
                "message": "m",
                "output": {"task_id": "T-200", "task_status": "PENDING"},
            }
        )
        async with make_client(scripted) as client:
            task = await self.submit(client)
        assert task.task_id == "T-200"
        assert scripted.count("video-synthesis") == 1

    @pytest.mark.parametrize("status", [400, 500, 503])
    async def test_any_status_naming_a_task_is_a_created_task(
        self, scripted: Scripted, status: int
    ) -> None:
        """An answer to the billed submit that carries a task id is a task, whatever its status
        (never an error that drops the id, never a retry that pays twice)."""
        scripted.script = lambda r, n: web.json_response(
            {"request_id": "r", "code": "X", "output": {"task_id": "T-ANY"}}, status=status
        )
        async with make_client(scripted) as client:
            task = await self.submit(client)
        assert task.task_id == "T-ANY"
        assert scripted.count("video-synthesis") == 1

    async def test_200_with_code_and_no_task_id_stays_an_error(self, scripted: Scripted) -> None:
        scripted.script = lambda r, n: err(200, "InvalidParameter", "hidden in a 200")
        async with make_client(scripted) as client:
            with pytest.raises(emo_async.InvalidParameterError, match="hidden in a 200"):
                await self.submit(client)
        assert scripted.count("video-synthesis") == 1

    async def test_500_on_submit_is_ambiguous_and_never_resent(self, scripted: Scripted) -> None:
        scripted.script = lambda r, n: err(500, "InternalError")
        async with make_client(scripted) as client:
            with pytest.raises(emo_async.AmbiguousSubmitError) as info:
                await self.submit(client)
        assert scripted.count("video-synthesis") == 1
        assert info.value.sent_at <= info.value.failed_at

    async def test_reset_after_send_is_ambiguous_and_never_resent(self, scripted: Scripted) -> None:
        def script(r: web.Request, n: int) -> None:
            assert r.transport is not None
            r.transport.close()
            return None

        scripted.script = script
        async with make_client(scripted) as client:
            with pytest.raises(emo_async.AmbiguousSubmitError):
                await self.submit(client)
        assert scripted.count("video-synthesis") == 1

    async def test_read_timeout_after_send_is_ambiguous(self, scripted: Scripted) -> None:
        client = Client(
            KEY,
            base_url=str(scripted.server.make_url("/slow/api/v1")),
            timeouts=Timeouts(connect=1, read=0.2, total=5),
            retry=fast_retry(),
        )
        async with client:
            with pytest.raises(emo_async.AmbiguousSubmitError):
                await self.submit(client)

    @pytest.mark.parametrize(
        ("status", "code"), [(429, "Throttling.RateQuota"), (503, "ModelUnavailable")]
    )
    async def test_status_that_creates_nothing_is_retried(
        self, scripted: Scripted, status: int, code: str
    ) -> None:
        scripted.script = lambda r, n: err(status, code) if n == 1 else None
        async with make_client(scripted) as client:
            await self.submit(client)
        assert scripted.count("video-synthesis") == 2

    async def test_oss_inputs_get_the_resolve_header(self, scripted: Scripted) -> None:
        seen: list[str | None] = []

        def script(r: web.Request, n: int) -> None:
            seen.append(r.headers.get("X-DashScope-OssResourceResolve"))
            return None

        scripted.script = script
        async with make_client(scripted) as client:
            await client.submit(
                "oss://d/i.png", "http://x/a.wav", face_bbox=self.BOX, ext_bbox=self.BOX
            )
            await client.detect("oss://d/i.png")
        assert seen == ["enable", "enable"]


class TestDetectionCache:
    """detect_cached: one request per (portrait, ratio) for concurrent callers; a failure is
    not cached."""

    @staticmethod
    def detection(r: web.Request, n: int) -> web.Response:
        return web.json_response(
            {
                "request_id": f"d{n}",
                "output": {"check_pass": True, "face_bbox": [1, 2, 3, 4], "ext_bbox": [0, 0, 9, 9]},
            }
        )

    async def test_concurrent_callers_share_one_request(self, scripted: Scripted) -> None:
        import anyio

        def script(r: web.Request, n: int) -> web.Response:
            return self.detection(r, n)

        scripted.script = script
        results: list[emo_async.Detection] = []
        async with make_client(scripted, limits=Limits(detect_qps=200)) as client:

            async def one() -> None:
                results.append(await client.detect_cached("http://127.0.0.1/i.png", "d1", "1:1"))

            async with anyio.create_task_group() as tg:
                for _ in range(10):
                    tg.start_soon(one)
            other = await client.detect_cached("http://127.0.0.1/i.png", "d1", "3:4")
        assert scripted.count("face-detect") == 2
        assert {d.request_id for d in results} == {"d1"}
        assert other.ratio == "3:4"

    async def test_a_failed_detection_is_not_cached(self, scripted: Scripted) -> None:
        def script(r: web.Request, n: int) -> web.Response:
            return err(400, "InvalidURL") if n == 1 else self.detection(r, n)

        scripted.script = script
        async with make_client(scripted, limits=Limits(detect_qps=200)) as client:
            with pytest.raises(emo_async.InvalidURLError):
                await client.detect_cached("http://127.0.0.1/i.png", "d1", "1:1")
            det = await client.detect_cached("http://127.0.0.1/i.png", "d1", "1:1")
            again = await client.detect_cached("http://127.0.0.1/i.png", "d1", "1:1")
        assert det.check_pass
        assert det is again
        assert scripted.count("face-detect") == 2


class TestPerCallOptions:
    """``timeout=`` and ``extra_headers=`` on the single calls, and ``Task.raw``."""

    async def test_extra_headers_reach_the_server(self, scripted: Scripted) -> None:
        seen: list[dict[str, str]] = []

        def script(r: web.Request, n: int) -> web.StreamResponse | None:
            seen.append(dict(r.headers))
            return None

        scripted.script = script
        async with make_client(scripted) as client:
            await client.get_task("t1", extra_headers={"X-Trace-Id": "abc"})
            await client.cancel_task("t1", extra_headers={"X-Trace-Id": "def"})
            await client.get_task("t1")
        assert [h.get("X-Trace-Id") for h in seen] == ["abc", "def", None]
        assert all(h["Authorization"] == f"Bearer {KEY}" for h in seen)

    @pytest.mark.parametrize("name", ["Authorization", "authorization", " AUTHORIZATION"])
    async def test_authorization_cannot_be_overridden(self, scripted: Scripted, name: str) -> None:
        bad = {name: "Bearer sk-other"}
        async with make_client(scripted) as client:
            with pytest.raises(ValueError, match="Authorization"):
                await client.get_task("t1", extra_headers=bad)
            with pytest.raises(ValueError, match="Authorization"):
                await client.submit(
                    "https://x/i.png",
                    "https://x/a.wav",
                    face_bbox=TestBilledSubmit.BOX,
                    ext_bbox=TestBilledSubmit.BOX,
                    extra_headers=bad,
                )
            with pytest.raises(ValueError, match="Authorization"):
                await client.detect("https://x/i.png", extra_headers=bad)
            with pytest.raises(ValueError, match="Authorization"):
                await client.list_page(extra_headers=bad)
            with pytest.raises(ValueError, match="Authorization"):
                async for _ in client.list_tasks(extra_headers=bad):
                    pass
            with pytest.raises(ValueError, match="Authorization"):
                await client.cancel_task("t1", extra_headers=bad)
        assert scripted.arrivals == []

    async def test_timeout_bounds_the_request(self, scripted: Scripted) -> None:
        # /slow/ answers after 2 s; the client's own total is 120 s.
        client = Client(
            KEY,
            base_url=str(scripted.server.make_url("/slow/api/v1")),
            retry=RetryPolicy(attempts=1),
        )
        async with client:
            started = time.monotonic()
            with pytest.raises(emo_async.RequestTimeoutError):
                await client.get_task("t1", timeout=0.3)
            assert time.monotonic() - started < 1.5
            # Without the option the same request waits for its answer.
            task = await client.get_task("t1")
        assert task.status == emo_async.TaskStatus.RUNNING

    @pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan")])
    async def test_bad_timeouts_refused(self, scripted: Scripted, bad: float) -> None:
        async with make_client(scripted) as client:
            with pytest.raises(ValueError, match="timeout"):
                await client.get_task("t1", timeout=bad)
        assert scripted.arrivals == []

    async def test_task_raw_is_the_whole_body_read_only(self, scripted: Scripted) -> None:
        body = {
            "request_id": "r9",
            "output": {"task_id": "t1", "task_status": "RUNNING", "future_field": [1, 2]},
            "usage": {"video_duration": 3.5},
            "extra": "kept",
        }
        scripted.script = lambda r, n: web.json_response(body)
        async with make_client(scripted) as client:
            task = await client.get_task("t1")
            again = await client.get_task("t1")
        assert dict(task.raw) == body
        assert task.raw["output"]["future_field"] == [1, 2]
        with pytest.raises(TypeError):
            task.raw["extra"] = "changed"  # type: ignore[index]
        # Not part of equality nor repr (the repr would otherwise grow with every body).
        assert task == attrs.evolve(again, raw={})
        assert "kept" not in repr(task)
        assert emo_async.Task("t1", emo_async.TaskStatus.RUNNING).raw == {}


class TestClientSetup:
    """Configuration errors are clear and come before any request."""

    def test_missing_key_is_a_clear_error(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
        with pytest.raises(ValueError, match="DASHSCOPE_API_KEY"):
            Client()

    def test_environment_fallbacks(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("DASHSCOPE_API_KEY", KEY)
        monkeypatch.setenv("DASHSCOPE_HTTP_BASE_URL", "http://127.0.0.1:9/api/v1/")
        client = Client()
        assert client.base_url == "http://127.0.0.1:9/api/v1"

    async def test_default_base_url_is_beijing(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """With no base_url and no DASHSCOPE_HTTP_BASE_URL, requests really go to Beijing's
        host, over TLS on 443: a loopback proxy sees where the client connects."""
        seen: list[bytes] = []

        async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append((await reader.readuntil(b"\r\n\r\n")).split(b"\r\n", 1)[0])
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(proxy, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        for name in ("DASHSCOPE_HTTP_BASE_URL", "HTTPS_PROXY", "NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{port}")
        try:
            client = Client(KEY, retry=RetryPolicy(attempts=1))
            assert client.base_url == "https://dashscope.aliyuncs.com/api/v1"
            async with client:
                with pytest.raises(emo_async.EmoError):
                    await client.get_task("abc")
        finally:
            server.close()
            await server.wait_closed()
        assert seen == [b"CONNECT dashscope.aliyuncs.com:443 HTTP/1.1"]

    @pytest.mark.parametrize(
        "url", ["http://dashscope.aliyuncs.com/api/v1", "ftp://x/api", "http://user:pw@127.0.0.1/"]
    )
    def test_unsafe_base_url_refused(self, url: str) -> None:
        with pytest.raises(ValueError, match="base_url"):
            Client(KEY, base_url=url)

    def test_repr_never_shows_the_key(self) -> None:
        client = Client(KEY, base_url="http://127.0.0.1:1/api/v1")
        assert KEY not in repr(client)
        assert KEY[-6:] not in repr(client)

    async def test_use_outside_context_is_a_programming_error(self, scripted: Scripted) -> None:
        client = make_client(scripted)
        with pytest.raises(emo_async.ClientClosedError):
            await client.get_task("abc")
        async with client:
            pass
        with pytest.raises(RuntimeError):
            await client.get_task("abc")

    async def test_bad_task_id_refused_locally(self, scripted: Scripted) -> None:
        async with make_client(scripted) as client:
            with pytest.raises(ValueError, match="task id"):
                await client.get_task("../uploads")
        assert scripted.arrivals == []


class TestSecrecy:
    """The key appears in no log line, exception or repr, even at DEBUG."""

    async def test_key_absent_from_logs_and_errors(
        self, scripted: Scripted, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.DEBUG)
        scripted.script = lambda r, n: err(401, "InvalidApiKey", "Invalid API-key provided.")
        async with make_client(scripted) as client:
            with pytest.raises(emo_async.InvalidApiKeyError) as info:
                await client.get_task("abc")
            texts = [str(info.value), repr(info.value), repr(client), repr(client.statistics())]
        texts += [r.getMessage() for r in caplog.records]
        texts += [json.dumps(r.__dict__, default=str) for r in caplog.records]
        assert not any(KEY in t for t in texts)
        assert all(a[3] for a in scripted.arrivals)


class TestRateLimit:
    """The configured rate holds at the server with 200 concurrent callers."""

    async def test_200_callers_never_exceed_qps(self, scripted: Scripted) -> None:
        import anyio

        qps = 50.0
        async with Client(KEY, base_url=scripted.base_url, limits=Limits(task_qps=qps)) as client:
            async with anyio.create_task_group() as tg:
                for i in range(200):
                    tg.start_soon(client.get_task, f"t{i}")
        times = sorted(a[0] for a in scripted.arrivals)
        assert len(times) == 200
        worst = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
        assert worst <= qps

    async def test_429_lowers_the_rate_and_success_restores_it(self, scripted: Scripted) -> None:
        def script(r: web.Request, n: int) -> web.Response | None:
            return err(429, "Throttling.RateQuota") if len(scripted.arrivals) <= 2 else None

        scripted.script = script
        async with make_client(scripted) as client:
            await client.get_task("abc")
            lim = client.statistics().limiters["task"]
            assert lim.rate < lim.max_rate
            assert lim.throttled == 2
            for i in range(100):
                await client.get_task(f"x{i}")
            assert client.statistics().limiters["task"].rate > lim.rate

    async def test_a_burst_of_429s_is_undone_by_a_few_successes(self, scripted: Scripted) -> None:
        import anyio

        # A 429 burst (the later ones were in flight already: one cut), a moment of calm, then
        # twenty successes: back near the ceiling (aiming a little below the rate that drew
        # the 429s, then probing up), however high it is.
        def script(r: web.Request, n: int) -> web.Response | None:
            return err(429, "Throttling.RateQuota") if len(scripted.arrivals) <= 3 else None

        scripted.script = script
        async with make_client(scripted, retry=fast_retry(attempts=5)) as client:
            await client.get_task("abc")
            lim = client.statistics().limiters["task"]
            assert lim.throttled == 3
            assert lim.rate == pytest.approx(lim.max_rate / 2)
            await anyio.sleep(0.3)  # successes right after a 429 belong to its burst
            for i in range(20):
                await client.get_task(f"x{i}")
            after = client.statistics().limiters["task"]
            assert 0.9 * after.max_rate <= after.rate <= after.max_rate


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def limiter(rate: float, **kw: Any) -> tuple[AdaptiveRateLimiter, FakeClock]:
    clock = FakeClock()
    return AdaptiveRateLimiter("t", rate, clock=clock, **kw), clock


def successes(lim: AdaptiveRateLimiter, clock: FakeClock, n: int, gap: float = 0.01) -> None:
    for _ in range(n):
        clock.t += gap
        lim.on_success()


class TestAdaptiveRateLimiter:
    """Recovery is proportionate at any ceiling, follows a real limit below the ceiling, and is
    complete after a quiet spell."""

    @pytest.mark.parametrize("ceiling", [2.0, 40.0, 400.0])
    def test_a_cut_is_undone_by_the_same_number_of_successes_at_any_ceiling(
        self, ceiling: float
    ) -> None:
        lim, clock = limiter(ceiling)
        lim.on_throttle()
        assert lim.rate == pytest.approx(ceiling / 2)
        clock.t += 0.5  # past the burst
        successes(lim, clock, 10)
        assert 0.85 * ceiling < lim.rate < ceiling
        successes(lim, clock, 10)
        assert lim.rate >= 0.9 * ceiling
        successes(lim, clock, 30)  # probing above the target, where the 429 came from
        assert lim.rate == pytest.approx(ceiling)

    def test_successes_inside_a_429_burst_do_not_raise_the_rate(self) -> None:
        lim, clock = limiter(40.0)
        for _ in range(20):
            lim.on_throttle()  # in flight together: one cut
            clock.t += 0.01
            lim.on_success()
        assert lim.rate == pytest.approx(20.0)
        assert lim.statistics().throttled == 20

    def test_a_limit_below_the_ceiling_is_followed_not_overrun(self) -> None:
        # Configured at 100/s against an account that throttles above 20/s: the rate comes
        # down to the limit and then probes above it only slowly.
        lim, clock = limiter(100.0)
        throttled = 0
        for _ in range(3000):
            clock.t += 1.05 / lim.rate
            if lim.rate > 20.0:
                throttled += 1
                lim.on_throttle()
            else:
                lim.on_success()
        assert 10.0 <= lim.rate <= 22.0
        seconds = clock.t - 1000.0
        assert throttled < 0.1 * 3000, (throttled, seconds)

    def test_the_floor_holds_and_is_left_in_a_few_dozen_successes(self) -> None:
        lim, clock = limiter(100.0)
        for _ in range(10):
            lim.on_throttle()
            clock.t += 1.0  # each 429 a separate event
        assert lim.rate == pytest.approx(lim.min_rate)
        successes(lim, clock, 40)
        # Heads back to the rate the last cut came from (the floor), then probes above it.
        assert lim.rate > lim.min_rate

    def test_a_quiet_spell_restores_the_ceiling(self) -> None:
        lim, clock = limiter(10.0, recover_seconds=5.0)
        lim.on_throttle()
        clock.t += 1.0
        lim.on_throttle()
        assert lim.rate == pytest.approx(2.5)
        clock.t += 5.0
        assert lim.rate == pytest.approx(10.0)
        assert lim.statistics().rate == pytest.approx(10.0)

    def test_bad_settings_are_refused(self) -> None:
        bad: list[dict[str, float]] = [
            {"decrease": 1.0},
            {"recovery": 0.0},
            {"probe": -0.1},
            {"recover_seconds": 0.0},
        ]
        for kw in bad:
            with pytest.raises(ValueError, match="must be"):
                AdaptiveRateLimiter("t", 1.0, **kw)  # type: ignore[arg-type]
