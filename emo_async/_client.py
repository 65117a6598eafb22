"""The client: one connection pool, the limiters, the shared poller, the downloader.

:class:`Client` holds the lifecycle (sessions, poller, downloader, task group), the caches and
the statistics; its calls come from :mod:`._calls` and its conveniences from
:mod:`._conveniences`, and its configuration from :mod:`._settings`.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import warnings
from collections.abc import AsyncGenerator, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Self

import aiohttp
import anyio
import attrs
from anyio import AsyncContextManagerMixin

from ._calloptions import call_options
from ._calls import _check_task_id
from ._config import (
    DEFAULT_DOWNLOAD_TIMEOUTS,
    DEFAULT_LIMITS,
    DEFAULT_POLL_POLICY,
    EMO_MODEL,
    Limits,
    PollPolicy,
    RetryPolicy,
    Timeouts,
)
from ._conveniences import Conveniences
from ._exceptions import ClientClosedError
from ._http import HttpCore
from ._models import Detection
from ._net import env_proxy, make_trace_config, origin_of
from ._owned import OwnedTasks, account_registry
from ._poller import PollerStatistics, StatusPoller
from ._ratelimit import AdaptiveRateLimiter, RateLimiterStatistics
from ._settings import resolve_settings
from ._singleflight import SingleFlight
from ._upload import Uploader
from ._util import single_error
from ._version import __version__

if TYPE_CHECKING:
    from ._download import Downloader
    from ._models import Task
    from ._pg._account import AccountLink, SharedAccount

__all__ = ["Client", "ClientStatistics"]

logger = logging.getLogger("emo_async")
#: Seconds a closing client waits for its shared account to hand its leases over.
_CLOSE_PATIENCE = 10.0


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
        submit_answer_seconds: How long the latest answered submit took on the wire (rate
            limiter waits excluded), or None before the first.
    """

    requests: int
    retries: int
    throttled: int
    server_errors: int
    transport_errors: int
    limiters: Mapping[str, RateLimiterStatistics]
    poller: PollerStatistics
    submit_answer_seconds: float | None = None


class Client(Conveniences, AsyncContextManagerMixin):
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
        shared_account: A ``postgresql://`` DSN (or a ``SharedAccount`` to tune it) through
            which this client shares the account with other processes: its rate limits (one
            budget and one adaptive state for all) and one status poller for every process's
            tasks, run by whichever process holds the account's lease. Needs the
            ``postgres`` extra; without it nothing changes.

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
        shared_account: str | SharedAccount | None = None,
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
        self.base_url = settings.base_url
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
        if isinstance(shared_account, str) and not shared_account.startswith(
            ("postgresql://", "postgres://")
        ):
            raise ValueError("shared_account must be a postgresql:// DSN")
        self._shared = shared_account
        self._account: AccountLink | None = None

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
            if self._shared is not None:
                from ._pg._account import open_link

                self._account = await open_link(
                    self._shared,
                    base_url=self.base_url,
                    workspace=self.workspace,
                    api_key=self.__key,
                    limits=self.limits,
                )
                # Same families, but the account's rows: the request path cannot tell.
                self._limiters = dict(self._account.limiters)
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
            task_limiter, list_limiter = self._limiters["task"], self._limiters["list"]
            self._poller = StatusPoller(
                self.poll_policy,
                self.get_task,
                self._sweep_pages,
                query_rate=lambda: task_limiter.rate,
                list_rate=lambda: list_limiter.rate,
            )
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
                    if self._account is not None:
                        # This client's poller runs only while it polls for the account.
                        await tg.start(self._account.run, self._poller)
                    else:
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
                        if self._account is not None:
                            self._account.fail_all(ClientClosedError("the client was closed"))
                        tg.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                single = single_error(group, body_exc)
                if single is None:
                    raise
                raise single from None
        finally:
            self._state = "closed"
            # Shielded, and bounded: leaving under a cancellation must still close everything
            # (the first cancelled await would otherwise skip the rest, and leak sessions).
            with anyio.CancelScope(shield=True):
                try:
                    if self._account is not None:
                        with anyio.move_on_after(_CLOSE_PATIENCE):
                            await self._account.aclose()
                finally:
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

    def account_digest(self) -> str:
        """Who this client's account is, as PostgreSQL backends record it: a one-way digest
        of the base URL, the workspace and the key (never the key itself)."""
        from ._batch._shared import account_fingerprint

        return account_fingerprint(self.base_url, self.workspace, self.__key)

    @property
    def shares_account(self) -> bool:
        """Whether this client shares its account's limits and poller through PostgreSQL."""
        return self._shared is not None

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

    async def wait(self, task_id: str, *, audio_seconds: float | None = None) -> Task:
        """Wait until the task is finished, through the shared poller (the account's, with
        ``shared_account``).

        Returns the final snapshot whatever the outcome (check ``task.succeeded``). Takes no
        timeout: wrap it in ``anyio.fail_after`` for one.
        """
        if self._account is None:
            return await super().wait(task_id, audio_seconds=audio_seconds)
        _check_task_id(task_id)
        self._core()
        return await self._account.wait(task_id, audio_seconds=audio_seconds)

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
            submit_answer_seconds=http.stats.last_billed_seconds if http else None,
        )

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

    def __del__(self) -> None:
        if getattr(self, "_state", None) == "open":
            warnings.warn(
                "Client was not closed: use `async with Client(...)` or `await client.aclose()`",
                ResourceWarning,
                stacklevel=1,
            )
