"""The single API calls of a :class:`Client`: detect, submit, get, cancel, list and wait.

Each builds its request (or its loop of pages) and reads the answer into a model. The client
mixes them in and supplies the rest: the open request path, the limiters and the poller.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import TYPE_CHECKING

import anyio
import attrs

from ._calloptions import call_options
from ._config import DEFAULT_MAX_LIST_PAGES, DETECT_MODEL, EMO_MODEL
from ._exceptions import AmbiguousSubmitError
from ._models import SERVER_TZ, BBox, Detection, Task, TaskListItem, TaskPage, TaskStatus

if TYPE_CHECKING:
    from ._config import Limits, PollPolicy, Timeouts
    from ._http import HttpCore
    from ._owned import OwnedTasks
    from ._poller import StatusPoller
    from ._ratelimit import AdaptiveRateLimiter

__all__ = ["ApiCalls"]

logger = logging.getLogger("emo_async")

_SUBMIT_PATH = "/services/aigc/image2video/video-synthesis/"
_DETECT_PATH = "/services/aigc/image2video/face-detect"
_STYLES = ("normal", "calm", "active")


class ApiCalls:
    """The single API calls of :class:`Client` (mixed into it; not usable on its own)."""

    if TYPE_CHECKING:
        # Supplied by Client.
        owned: OwnedTasks
        limits: Limits
        timeouts: Timeouts
        poll_policy: PollPolicy
        _limiters: dict[str, AdaptiveRateLimiter]
        _poller: StatusPoller | None

        def _core(self) -> HttpCore: ...

        @property
        def poller(self) -> StatusPoller: ...

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
        # A page counts against the list's own (undocumented) limit, and against the task
        # queries' unless the account is known to keep them apart.
        shared = self.limits.list_shares_task_qps
        with call_options(timeout, extra_headers):
            if shared:
                await self._limiters["list"].acquire()
            resp = await self._core().request(
                "GET", "/tasks", family="task" if shared else "list", params=params
            )
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
