"""The client: one connection pool, the limiters, the shared poller, the downloader."""

from __future__ import annotations

import datetime as _dt
import logging
import os
import warnings
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import urlsplit

import aiohttp
import anyio
import attrs
from anyio import AsyncContextManagerMixin

from ._config import (
    DEFAULT_DOWNLOAD_TIMEOUTS,
    DEFAULT_LIMITS,
    DEFAULT_MAX_LIST_PAGES,
    DEFAULT_POLL_POLICY,
    DETECT_MODEL,
    EMO_MODEL,
    RESULT_URL_VALIDITY,
    Limits,
    PollPolicy,
    RetryPolicy,
    Timeouts,
    resolve_settings,
)
from ._download import url_deadline
from ._exceptions import (
    AmbiguousSubmitError,
    ClientClosedError,
    JobCancelledError,
    JobFailedError,
)
from ._http import (
    HttpCore,
    call_options,
    env_proxy,
    is_loopback_host,
    make_trace_config,
    origin_of,
)
from ._models import (
    SERVER_TZ,
    BBox,
    Detection,
    Outcome,
    Task,
    TaskListItem,
    TaskPage,
    TaskStatus,
)
from ._owned import OwnedTasks, account_registry
from ._poller import PollerStatistics, StatusPoller
from ._ratelimit import AdaptiveRateLimiter, RateLimiterStatistics
from ._singleflight import SingleFlight
from ._upload import Uploader
from ._util import single_error
from ._version import __version__

if TYPE_CHECKING:
    from ._batch import BatchEvent, BatchPolicy, BatchRun, ReconcilePolicy
    from ._download import Downloader, DownloadResult
    from ._journal import Journal
    from ._models import Job

__all__ = ["Client", "ClientStatistics"]

logger = logging.getLogger("emo_async")

_SUBMIT_PATH = "/services/aigc/image2video/video-synthesis/"
_DETECT_PATH = "/services/aigc/image2video/face-detect"
_STYLES = ("normal", "calm", "active")


def _check_base_url(url: str) -> str:
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


@attrs.frozen
class ClientStatistics:
    """A snapshot of a client's activity.

    Attributes:
        requests: API requests sent (each retry counts).
        retries: Retries made.
        throttled: 429s received.
        server_errors: 5xx received.
        transport_errors: Requests that got no answer.
        limiters: The rate limiters, by endpoint family.
        poller: The shared poller.
    """

    requests: int
    retries: int
    throttled: int
    server_errors: int
    transport_errors: int
    limiters: Mapping[str, RateLimiterStatistics]
    poller: PollerStatistics


class Client(AsyncContextManagerMixin):
    """An asyncio client for DashScope's EMO models.

    Use it as an async context manager; it owns one connection pool, the rate limiters, one
    shared status poller and a downloader::

        async with Client() as client:
            outcome = await client.generate("me.png", "hello.wav", "out/hello.mp4")

    Where a block does not fit, ``client = await Client().__aenter__()`` opens it and
    ``await client.aclose()`` closes it (from the same task). A client is opened once.

    Configuration comes from the arguments, then from the environment, in one place (here,
    when the client is created), with the names of the official ``dashscope`` SDK. For each
    setting the first that is set wins: explicit argument > 2.x variable > 1.x (legacy)
    variable > key file > default:

    - ``api_key``: ``DASHSCOPE_API_KEY``, then the file ``DASHSCOPE_API_KEY_FILE_PATH`` names
      (default ``~/.dashscope/api_key``; a named file that is missing is an error);
    - ``base_url``: ``DASHSCOPE_BASE_URL``, then ``DASHSCOPE_HTTP_BASE_URL``, then Beijing;
    - ``workspace``: ``DASHSCOPE_WORKSPACE``, then the id a gateway base URL names;
    - ``timeouts``: ``DASHSCOPE_TIMEOUT`` (seconds, the request total) over
      ``DEFAULT_TIMEOUTS``;
    - ``retry``: ``DASHSCOPE_MAX_RETRIES`` (attempts - 1) over ``DEFAULT_RETRY_POLICY``;
    - the ``emo_async`` log level: ``DASHSCOPE_LOG``, then ``DASHSCOPE_LOGGING_LEVEL``.

    An empty variable counts as unset. The key read from a file is never logged nor shown.
    ``DASHSCOPE_LOG`` sets the level of the ``emo_async`` logger only when nobody set one
    (the application's own setting wins); no handler is ever added, so without a logging
    configuration Python shows WARNING and above only.

    Args:
        api_key: DashScope API key.
        base_url: API base URL: Beijing's ``https://dashscope.aliyuncs.com/api/v1`` by default,
            or a workspace gateway ``https://{workspace}.cn-beijing.maas.aliyuncs.com``. A
            bare host gets ``/api/v1``; a URL with a path is used as it is. Plain ``http://``
            is accepted only for loopback hosts (the simulator).
        workspace: Model Studio workspace id, sent as ``X-DashScope-WorkSpace`` on every API
            request (never to the upload or video hosts). A key that belongs to a workspace
            needs it; with a gateway base URL it defaults to the id the host names (a
            different one is an error). ``""`` means none, whatever the environment says.
        timeouts: Per-phase timeouts of API requests.
        retry: Retry policy of API requests and uploads (the billed submit is retried only
            when provably unsent).
        limits: Request rates and pool sizes.
        poll: How the shared poller spends its query budget.
        download_timeouts: Connect and per-read timeouts of downloads (never a total).
        trace_configs: ``aiohttp.TraceConfig`` objects attached to the API sessions (not the
            upload or download ones), e.g. for OpenTelemetry or request logging.

    Raises:
        ValueError: no API key, a bad base URL or workspace, or an unusable variable.
    """

    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str | None = None,
        workspace: str | None = None,
        timeouts: Timeouts | None = None,
        retry: RetryPolicy | None = None,
        limits: Limits = DEFAULT_LIMITS,
        poll: PollPolicy = DEFAULT_POLL_POLICY,
        download_timeouts: Timeouts = DEFAULT_DOWNLOAD_TIMEOUTS,
        trace_configs: Iterable[aiohttp.TraceConfig] = (),
    ) -> None:
        # The one place of the package that reads the environment.
        settings = resolve_settings(
            os.environ,
            api_key=api_key,
            base_url=base_url,
            workspace=workspace,
            timeouts=timeouts,
            retry=retry,
        )
        self.__key = settings.api_key
        self.base_url = _check_base_url(settings.base_url)
        #: The workspace id sent with every API request, or None.
        self.workspace = settings.workspace
        self.timeouts = settings.timeouts
        self.retry = settings.retry
        self._trace_configs = tuple(trace_configs)
        if settings.log_level is not None and logger.level == logging.NOTSET:
            logger.setLevel(settings.log_level)
        if settings.key_source not in ("argument", "DASHSCOPE_API_KEY"):
            logger.debug("API key read from %s", settings.key_source)
        self.limits = limits
        self.poll_policy = poll
        self.download_timeouts = download_timeouts
        #: Every task this client created, for its lifetime (see :mod:`emo_async._owned`).
        self.owned = OwnedTasks()
        self._state = "unopened"
        self._http: HttpCore | None = None
        self._poller: StatusPoller | None = None
        self._downloader: Downloader | None = None
        self._limiters = {
            "task": AdaptiveRateLimiter("task", limits.task_qps),
            "detect": AdaptiveRateLimiter("detect", limits.detect_qps),
            "submit": AdaptiveRateLimiter("submit", limits.submit_qps),
            "policy": AdaptiveRateLimiter("policy", limits.policy_qps),
            "cancel": AdaptiveRateLimiter("cancel", limits.cancel_qps),
            "list": AdaptiveRateLimiter("list", limits.list_qps),
        }
        self._uploader = Uploader(
            self._core, api_origin=self.api_origin, max_uploads=limits.max_uploads
        )
        self._detections: SingleFlight[tuple[str, str], Detection] = SingleFlight()
        self._tg: anyio.abc.TaskGroup | None = None

    def __repr__(self) -> str:
        # Never the key, not even a part of it.
        ws = f" workspace={self.workspace!r}" if self.workspace else ""
        return f"<Client base_url={self.base_url!r}{ws} state={self._state}>"

    @property
    def api_origin(self) -> tuple[str, str, int]:
        return origin_of(self.base_url)

    # -- lifecycle --------------------------------------------------------------------------

    @asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncGenerator[Self]:
        """Open the client: the connection pools, the shared poller and the downloader.

        Leaving closes them; tasks still waiting on the poller get
        :class:`ClientClosedError`.

        Raises:
            ClientClosedError: the client was opened (or closed) before.
        """
        if self._state != "unopened":
            raise ClientClosedError("a Client can be entered once; create a new one")
        from ._download import Downloader

        ua = f"emo-async/{__version__} aiohttp/{aiohttp.__version__}"
        connector = aiohttp.TCPConnector(limit=self.limits.max_connections, limit_per_host=0)
        # trust_env would make aiohttp look up proxies and .netrc in a worker thread on every
        # request (two thread hops, more than half the client's CPU per request): the
        # environment's proxy is read once here instead. Cookies are never kept.
        api_session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            trace_configs=list(self._trace_configs) or None,
        )
        # Billed requests go through a twin session on the same pool that traces whether the
        # request headers went out (what tells a safe retry from an ambiguous one).
        billed_session = aiohttp.ClientSession(
            connector=connector,
            connector_owner=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            trace_configs=[make_trace_config(), *self._trace_configs],
        )
        # Uploads: no key, ever. The environment's proxy is read once per upload host (by the
        # request path) rather than by aiohttp on every upload (two thread hops each, .netrc).
        ext_session = aiohttp.ClientSession(
            trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"User-Agent": ua},
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=self.download_timeouts.connect,
                sock_read=self.download_timeouts.read,
            ),
        )
        # While open, this client shares one registry of created tasks with every other open
        # client of this process on the same account and key.
        self.owned = account_registry.acquire(self.base_url, self.__key, self.owned)
        try:
            self._http = HttpCore(
                api_session,
                billed_session=billed_session,
                external_session=ext_session,
                external_timeouts=self.download_timeouts,
                proxy=env_proxy(self.base_url),
                base_url=self.base_url,
                api_key=self.__key,
                timeouts=self.timeouts,
                retry=self.retry,
                limiters=self._limiters,
                user_agent=ua,
                workspace=self.workspace,
            )
            self._poller = StatusPoller(self.poll_policy, self.get_task, self._sweep_pages)
            body_exc: BaseException | None = None
            try:
                async with (
                    Downloader(
                        max_concurrent=self.limits.max_downloads,
                        timeouts=self.download_timeouts,
                        retry=self.retry,
                        forbidden_origins=[self._origin_str()],
                    ) as downloader,
                    anyio.create_task_group() as tg,
                ):
                    self._downloader = downloader
                    self._tg = tg
                    await tg.start(self._poller.run)
                    self._state = "open"
                    try:
                        yield self
                    except BaseException as exc:
                        body_exc = exc
                        raise
                    finally:
                        self._state = "closed"
                        self._poller.fail_all(ClientClosedError("the client was closed"))
                        tg.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                single = single_error(group, body_exc)
                if single is None:
                    raise
                raise single from None
        finally:
            self._state = "closed"
            account_registry.release(self.base_url, self.__key)
            await billed_session.close()
            await api_session.close()
            await ext_session.close()

    async def aclose(self) -> None:
        """Close a client opened with ``await client.__aenter__()``, like leaving its
        ``async with`` block: it must run in the task that opened it.

        Closing twice does nothing. A client that was never opened is marked closed (it holds
        nothing yet), so it can no longer be opened. Inside an ``async with`` block, leave the
        block instead: closing there makes the block's own exit fail.
        """
        if self._state == "open":
            await self.__aexit__(None, None, None)
        else:
            self._state = "closed"

    def _origin_str(self) -> str:
        scheme, host, port = self.api_origin
        return f"{scheme}://{host}:{port}"

    def _core(self) -> HttpCore:
        if self._state != "open" or self._http is None:
            raise ClientClosedError(
                "the client is not open: use `async with Client(...) as client:`"
            )
        return self._http

    @property
    def poller(self) -> StatusPoller:
        self._core()
        assert self._poller is not None
        return self._poller

    @property
    def downloader(self) -> Downloader:
        self._core()
        assert self._downloader is not None
        return self._downloader

    def statistics(self) -> ClientStatistics:
        """Counts of requests, retries, throttling, and the poller's state."""
        http = self._http
        poller = self._poller
        return ClientStatistics(
            requests=http.stats.requests if http else 0,
            retries=http.stats.retries if http else 0,
            throttled=http.stats.throttled if http else 0,
            server_errors=http.stats.server_errors if http else 0,
            transport_errors=http.stats.transport_errors if http else 0,
            limiters={k: v.statistics() for k, v in self._limiters.items()},
            poller=poller.statistics()
            if poller
            else PollerStatistics(0, 0, 0, 0, self.poll_policy.use_list),
        )

    # -- single calls ------------------------------------------------------------------------

    @staticmethod
    def _oss_headers(*urls: str) -> dict[str, str]:
        if any(u.startswith("oss://") for u in urls):
            return {"X-DashScope-OssResourceResolve": "enable"}
        return {}

    async def detect(
        self,
        image_url: str,
        *,
        ratio: str = "1:1",
        timeout: float | None = None,  # noqa: ASYNC109 - one request's own limit, as httpx's
        extra_headers: Mapping[str, str] | None = None,
    ) -> Detection:
        """Run emo-detect-v1 on a portrait URL (``http(s)://`` or ``oss://``).

        Returns the answer whatever ``check_pass`` says; the batch turns a failed check into
        :class:`DetectionRejectedError`.
        ``timeout`` (seconds) bounds each API request of the call, body included, in place of
        ``Timeouts.total`` (retries are governed by the retry policy); ``extra_headers`` are
        added to them (never ``Authorization``: ``ValueError``).
        """
        if ratio not in ("1:1", "3:4"):
            raise ValueError(f"ratio must be '1:1' or '3:4', got {ratio!r}")
        with call_options(timeout, extra_headers):
            resp = await self._core().request(
                "POST",
                _DETECT_PATH,
                family="detect",
                json_body={
                    "model": DETECT_MODEL,
                    "input": {"image_url": image_url},
                    "parameters": {"ratio": ratio},
                },
                headers=self._oss_headers(image_url),
            )
        return Detection.from_json(resp.body, ratio=ratio)  # type: ignore[arg-type]

    async def submit(
        self,
        image_url: str,
        audio_url: str,
        *,
        face_bbox: BBox | Iterable[int],
        ext_bbox: BBox | Iterable[int],
        style_level: str = "normal",
        timeout: float | None = None,  # noqa: ASYNC109 - one request's own limit, as httpx's
        extra_headers: Mapping[str, str] | None = None,
    ) -> Task:
        """Create an emo-v1 task (billed). Sent at most once.

        ``timeout`` (seconds) bounds each API request of the call, body included, in place of
        ``Timeouts.total`` (retries are governed by the retry policy); ``extra_headers`` are
        added to them (never ``Authorization``: ``ValueError``).

        Raises:
            AmbiguousSubmitError: the request went out but no answer came back; a task may
                exist. It is never resent blindly: see :meth:`find_submitted_tasks`.
        """
        if style_level not in _STYLES:
            raise ValueError(f"style_level must be one of {_STYLES}, got {style_level!r}")
        body = {
            "model": EMO_MODEL,
            "input": {
                "image_url": image_url,
                "audio_url": audio_url,
                "face_bbox": list(face_bbox),
                "ext_bbox": list(ext_bbox),
            },
            "parameters": {"style_level": style_level},
        }
        headers = {"X-DashScope-Async": "enable", **self._oss_headers(image_url, audio_url)}
        sent_at = _dt.datetime.now(_dt.UTC)
        # Once the POST is out, its answer is money: a cancellation waits for it (bounded by
        # the request's timeouts), so the task id is recorded and the caller can be told.
        with anyio.CancelScope(shield=True), call_options(timeout, extra_headers):
            resp = await self._core().request(
                "POST", _SUBMIT_PATH, family="submit", json_body=body, headers=headers, billed=True
            )
            task = Task.from_json(resp.body)
            if task.task_id:
                self.owned.add(task.task_id, sent_at=sent_at, answered_at=_dt.datetime.now(_dt.UTC))
        if not task.task_id:
            # A success without an id: a task may well exist. Reconcile, never resend blindly.
            now = _dt.datetime.now(_dt.UTC)
            raise AmbiguousSubmitError(
                f"the submit answer (request_id={resp.request_id}) carries no task id",
                sent_at=now - _dt.timedelta(seconds=timeout or self.timeouts.total or 120.0),
                failed_at=now,
            )
        logger.info("submitted task %s (request_id=%s)", task.task_id, resp.request_id)
        return task

    async def get_task(
        self,
        task_id: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - one request's own limit, as httpx's
        extra_headers: Mapping[str, str] | None = None,
    ) -> Task:
        """One ``GET /tasks/{task_id}`` (counts against the task-query limit).

        ``timeout`` (seconds) bounds each API request of the call, body included, in place of
        ``Timeouts.total`` (retries are governed by the retry policy); ``extra_headers`` are
        added to them (never ``Authorization``: ``ValueError``).
        """
        _check_task_id(task_id)
        with call_options(timeout, extra_headers):
            resp = await self._core().request("GET", f"/tasks/{task_id}", family="task")
        task = Task.from_json(resp.body)
        if not task.task_id:
            task = attrs.evolve(task, task_id=task_id)
        return task

    async def cancel_task(
        self,
        task_id: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - one request's own limit, as httpx's
        extra_headers: Mapping[str, str] | None = None,
    ) -> Task:
        """Cancel a task that is still PENDING (DashScope cancels nothing else).

        ``timeout`` (seconds) bounds each API request of the call, body included, in place of
        ``Timeouts.total`` (retries are governed by the retry policy); ``extra_headers`` are
        added to them (never ``Authorization``: ``ValueError``).
        """
        _check_task_id(task_id)
        with call_options(timeout, extra_headers):
            resp = await self._core().request("POST", f"/tasks/{task_id}/cancel", family="cancel")
        task = Task.from_json(resp.body)
        if not task.task_id:
            task = Task(
                task_id=task_id,
                status=TaskStatus.CANCELED,
                request_id=resp.request_id,
                raw=resp.body,
            )
        return task

    async def list_page(
        self,
        page_no: int = 1,
        *,
        page_size: int = 100,
        start_time: _dt.datetime | None = None,
        end_time: _dt.datetime | None = None,
        status: str | None = None,
        model_name: str | None = EMO_MODEL,
        timeout: float | None = None,  # noqa: ASYNC109 - one request's own limit, as httpx's
        extra_headers: Mapping[str, str] | None = None,
    ) -> TaskPage:
        """One page of ``GET /tasks`` (newest first, as DashScope serves it).

        ``timeout`` (seconds) bounds each API request of the call, body included, in place of
        ``Timeouts.total`` (retries are governed by the retry policy); ``extra_headers`` are
        added to them (never ``Authorization``: ``ValueError``).
        """
        params: dict[str, str] = {"page_no": str(page_no), "page_size": str(page_size)}
        if start_time is not None:
            params["start_time"] = _server_stamp(start_time)
        if end_time is not None:
            params["end_time"] = _server_stamp(end_time)
        if status:
            params["status"] = status
        if model_name:
            params["model_name"] = model_name
        # A page counts against the list's own (undocumented) limit and the task queries'.
        with call_options(timeout, extra_headers):
            await self._limiters["list"].acquire()
            resp = await self._core().request("GET", "/tasks", family="task", params=params)
        if self._poller is not None:
            self._poller.note_list_page()
        body = resp.body
        data = body.get("data")
        if data is None and isinstance(body.get("output"), Mapping):
            data = body["output"].get("data")
        items = tuple(
            TaskListItem.from_json(item)
            for item in (data if isinstance(data, list) else [])
            if isinstance(item, Mapping)
        )
        return TaskPage(
            items=items,
            page_no=page_no,
            page_size=_as_int(body.get("page_size")) or page_size,
            total_page=_as_int(body.get("total_page")),
            total=_as_int(body.get("total")),
        )

    async def list_tasks(
        self,
        *,
        start_time: _dt.datetime | None = None,
        end_time: _dt.datetime | None = None,
        status: str | None = None,
        model_name: str | None = EMO_MODEL,
        page_size: int = 100,
        max_pages: int | None = DEFAULT_MAX_LIST_PAGES,
        timeout: float | None = None,  # noqa: ASYNC109 - one request's own limit, as httpx's
        extra_headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[TaskListItem]:
        """Iterate over ``GET /tasks``, page by page (newest first), at most ``max_pages``.

        Paging ends at ``total_page``, at a short or empty page, or when a page repeats the one
        before (a list that ignores ``page_no`` would otherwise be paged forever).
        ``timeout`` and ``extra_headers`` apply to each page's request (see
        :meth:`list_page`).
        """
        # Refused at the first iteration, before the first page's request is made.
        with call_options(timeout, extra_headers):
            pass
        page = 1
        previous: tuple[str, ...] | None = None
        while max_pages is None or page <= max_pages:
            got = await self.list_page(
                page,
                page_size=page_size,
                start_time=start_time,
                end_time=end_time,
                status=status,
                model_name=model_name,
                timeout=timeout,
                extra_headers=extra_headers,
            )
            ids = tuple(i.task_id for i in got.items)
            if ids and ids == previous:
                logger.warning("the task list repeats page %d: it ignores page_no", page - 1)
                return
            previous = ids
            for item in got.items:
                yield item
            if got.is_last:
                return
            page += 1

    def _sweep_pages(self, max_pages: int) -> AsyncIterator[TaskListItem]:
        return self.list_tasks(page_size=self.poll_policy.list_page_size, max_pages=max_pages)

    async def find_submitted_tasks(
        self,
        sent_at: _dt.datetime,
        failed_at: _dt.datetime,
        *,
        exclude: Iterable[str] = (),
        margin: float = 30.0,
    ) -> list[TaskListItem]:
        """Tasks created between ``sent_at`` and ``failed_at`` (± ``margin`` seconds, for clock
        skew between us and the server) that are not in ``exclude``: the candidates for an
        ambiguous submit."""
        lo = sent_at - _dt.timedelta(seconds=margin)
        hi = failed_at + _dt.timedelta(seconds=margin)
        skip = set(exclude)
        found: list[TaskListItem] = []
        # The list filters by whole seconds; widen by one and filter precisely here.
        async for item in self.list_tasks(
            start_time=lo - _dt.timedelta(seconds=1), end_time=hi + _dt.timedelta(seconds=1)
        ):
            if item.task_id in skip:
                continue
            if item.created_at is not None and not (lo <= item.created_at <= hi):
                continue
            found.append(item)
        return found

    async def wait(self, task_id: str, *, audio_seconds: float | None = None) -> Task:
        """Wait until the task is finished, through the shared poller.

        Returns the final snapshot whatever the outcome (check ``task.succeeded``). Takes no
        timeout: wrap it in ``anyio.fail_after`` for one.
        """
        _check_task_id(task_id)
        return await self.poller.wait(task_id, audio_seconds=audio_seconds)

    # -- uploads -----------------------------------------------------------------------------

    async def upload(
        self,
        path: str | os.PathLike[str],
        *,
        model: str = EMO_MODEL,
        timeout: float | None = None,  # noqa: ASYNC109 - one request's own limit, as httpx's
        extra_headers: Mapping[str, str] | None = None,
    ) -> str:
        """Upload a local file to DashScope's temporary storage; returns its ``oss://`` URL.

        One policy serves many uploads until it expires; the file is streamed, not read into
        memory; the same content is uploaded once per client (and reused for 47 h of its 48 h
        validity). Calls that carry an ``oss://`` URL send
        ``X-DashScope-OssResourceResolve: enable`` by themselves.

        ``timeout`` (seconds) bounds the policy request and the upload POST, each (the upload
        host has no total otherwise: a big file on a slow link is not an error);
        ``extra_headers`` go to the policy request only, never to the upload host (no
        ``Authorization``: ``ValueError``). A cached upload or policy makes no request.
        """
        from ._media import sha256_file

        with call_options(timeout, extra_headers):
            p = Path(path)
            digest = await anyio.to_thread.run_sync(sha256_file, p)
            return await self.upload_digest(p, digest, model=model)

    async def upload_digest(
        self, path: Path, digest: str, *, model: str = EMO_MODEL, content: bytes | None = None
    ) -> str:
        """:meth:`upload` for a file whose SHA-256 the caller already knows.

        ``content``: the file's bytes (those ``digest`` was computed from), when the caller has
        them already: they are sent as they are, without reading the file again.
        """
        return await self._uploader.upload(path, digest, model=model, content=content)

    def remember_upload(self, digest: str, model: str, url: str, expires_at: _dt.datetime) -> None:
        """Seed the upload cache (e.g. from a journal)."""
        self._uploader.remember(digest, model, url, expires_at)

    # -- detection with a cache --------------------------------------------------------------

    async def detect_cached(self, image_url: str, digest: str, ratio: str) -> Detection:
        """:meth:`detect` once per (image content, ratio) for this client; concurrent callers
        for the same portrait share one request."""
        return await self._detections.get_or_compute(
            (digest, ratio), lambda: self.detect(image_url, ratio=ratio)
        )

    def remember_detection(self, digest: str, ratio: str, detection: Detection) -> None:
        """Seed the detection cache (e.g. from a journal)."""
        self._detections.put((digest, ratio), detection)

    # -- downloads, one-call generation and batches -------------------------------------------

    async def download(
        self,
        task_or_url: Task | str,
        dest: str | os.PathLike[str],
        *,
        deadline: _dt.datetime | None = None,
    ) -> DownloadResult:
        """Stream a result video to ``dest`` (atomically: ``dest`` holds a complete, verified
        file or nothing). Never sends the API key to the video host."""
        if isinstance(task_or_url, Task):
            if not task_or_url.video_url:
                raise ValueError(f"task {task_or_url.task_id} has no video URL")
            url = task_or_url.video_url
            if deadline is None and url_deadline(url) is None and task_or_url.end_time:
                # No Expires in the URL: DashScope keeps results 24 h after the task ends.
                deadline = task_or_url.end_time + RESULT_URL_VALIDITY
        else:
            url = task_or_url
        return await self.downloader.download(url, Path(dest), deadline=deadline)

    async def generate(
        self,
        image: str | os.PathLike[str],
        audio: str | os.PathLike[str],
        dest: str | os.PathLike[str],
        *,
        style_level: str = "normal",
        ratio: str | None = None,
        face_bbox: BBox | None = None,
        ext_bbox: BBox | None = None,
    ) -> Outcome:
        """Validate, upload, detect, submit, wait and download one video.

        Returns an :class:`Outcome` (check ``outcome.ok``); raises :class:`InputError` or
        :class:`DetectionRejectedError` before anything is billed.
        """
        from ._batch import run_one
        from ._models import Job

        job = Job(
            image,
            audio,
            style_level=style_level,
            ratio=ratio,
            face_bbox=face_bbox,
            ext_bbox=ext_bbox,
            name=Path(dest).stem,
        )
        return await run_one(self, job, Path(dest))

    def run_batch(
        self,
        jobs: Iterable[Job] | AsyncIterator[Job],
        out_dir: str | os.PathLike[str],
        *,
        journal: str | os.PathLike[str] | Journal | bool | None = True,
        max_tasks: int = 10,
        submit_rate: float | None = None,
        submit_concurrency: int = 1,
        download_concurrency: int | None = None,
        prepare_concurrency: int = 4,
        reconcile: ReconcilePolicy | str = "reconcile",
        cancel_pending_on_exit: bool = False,
        rebill_expired: bool = False,
        on_event: Callable[[BatchEvent], object] | None = None,
        policy: BatchPolicy | None = None,
    ) -> BatchRun:
        """Run many jobs; an async context manager that yields outcomes as jobs finish.

        ::

            async with client.run_batch(jobs, "out/") as outcomes:
                async for outcome in outcomes:
                    print(outcome.job.display_name, outcome.state)

        Args:
            jobs: Jobs, from a list or a lazy (async) iterable; read as capacity frees up.
            out_dir: Where videos go, as ``{name}.mp4``.
            journal: ``True`` for ``<out_dir>/.emo-journal.sqlite3``, a path, an open
                :class:`Journal`, or ``None``/``False`` for none (no resume).
            max_tasks: Tasks open on the server at once (submitted, not finished).
            submit_rate: Submits per second for this batch (default: the client's limit;
                above it raises ``ValueError``: raise ``Limits.submit_qps`` instead).
            submit_concurrency: Billed POSTs in flight at once.
            download_concurrency: Downloads at once (default: the client's limit).
            prepare_concurrency: Jobs validated, uploaded and detected at once.
            reconcile: What to do with a submit whose answer was lost (see
                :class:`ReconcilePolicy`): ``"reconcile"`` (adopt a task only on proof it is
                this job's, send again only on proof none exists, else ``unresolved``),
                ``"resubmit"`` (send again: may bill twice), or ``"fail"`` (``unresolved``).
            cancel_pending_on_exit: On leaving early, cancel tasks still PENDING on the
                server.
            rebill_expired: Pay again for jobs whose paid video expired before it was saved.
            on_event: Called with a :class:`BatchEvent` on every stage change.
            policy: All of the above but ``journal`` and ``on_event`` as one
                :class:`BatchPolicy` (it wins over the separate arguments).
        """
        from ._batch import BatchPolicy, BatchRun

        if policy is None:
            policy = BatchPolicy(
                max_tasks=max_tasks,
                submit_rate=submit_rate,
                submit_concurrency=submit_concurrency,
                download_concurrency=download_concurrency,
                prepare_concurrency=prepare_concurrency,
                reconcile=reconcile,
                cancel_pending_on_exit=cancel_pending_on_exit,
                rebill_expired=rebill_expired,
            )
        return BatchRun(
            self, jobs, Path(out_dir), journal=journal, policy=policy, on_event=on_event
        )

    async def run_batch_all(
        self,
        jobs: Iterable[Job] | AsyncIterator[Job],
        out_dir: str | os.PathLike[str],
        **kwargs: Any,
    ) -> list[Outcome]:
        """:meth:`run_batch`, collected into a list (in completion order)."""
        async with self.run_batch(jobs, out_dir, **kwargs) as outcomes:
            return [o async for o in outcomes]

    async def wait_outcome(self, task: Task, *, audio_seconds: float | None = None) -> Task:
        """Wait for a task and raise if it did not succeed."""
        final = await self.wait(task.task_id, audio_seconds=audio_seconds)
        if final.status == TaskStatus.CANCELED:
            raise JobCancelledError(f"task {final.task_id} was cancelled")
        if not final.succeeded:
            raise JobFailedError(final)
        return final

    def __del__(self) -> None:
        if getattr(self, "_state", None) == "open":
            warnings.warn(
                "Client was not closed: use `async with Client(...)` or `await client.aclose()`",
                ResourceWarning,
                stacklevel=1,
            )


def _check_task_id(task_id: str) -> None:
    if not task_id or "/" in task_id or "?" in task_id or "#" in task_id or ".." in task_id:
        raise ValueError(f"not a task id: {task_id!r}")


def _server_stamp(when: _dt.datetime) -> str:
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.UTC)
    return when.astimezone(SERVER_TZ).strftime("%Y%m%d%H%M%S")


def _as_int(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload, no-any-return]
    except (TypeError, ValueError):
        return None
