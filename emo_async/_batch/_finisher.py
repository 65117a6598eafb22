"""After the POST: wait for the task through the shared poller, download its video well
before the URL expires, record it done. Also keeps videos no job can claim yet
(``.unattributed/``): a paid video is never left to expire."""

from __future__ import annotations

import datetime as _dt
import logging
import re
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from .._config import RESULT_URL_VALIDITY
from .._exceptions import (
    EmoError,
    JobCancelledError,
    JobFailedError,
    JournalError,
    ResultExpiredError,
)
from .._models import OutcomeState, Task, TaskStatus
from ._job import TRANSIENT_TRIES, EventKind, InFlight, Reporter

if TYPE_CHECKING:
    from .._journal import Journal
    from ._ports import Service

__all__ = ["UNATTRIBUTED_DIR", "Finisher", "url_deadline_of"]

logger = logging.getLogger("emo_async.batch")

#: Where videos that may be a job's, but cannot be attributed, are kept (inside ``out_dir``).
UNATTRIBUTED_DIR = ".unattributed"
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def url_deadline_of(task: Task) -> _dt.datetime | None:
    """When the task's video URL stops working: from the URL's ``Expires``, else end + 24 h."""
    from .._download import url_deadline

    if task.video_url:
        found = url_deadline(task.video_url)
        if found is not None:
            return found
    if task.end_time is not None:
        return task.end_time + RESULT_URL_VALIDITY
    return None


class Finisher:
    """Waits for tasks and saves their videos."""

    def __init__(
        self,
        service: Service,
        journal: Journal | None,
        reporter: Reporter,
        out_dir: Path,
        *,
        download_slots: anyio.CapacityLimiter | None = None,
    ) -> None:
        self._service = service
        self._journal = journal
        self._report = reporter
        self._out_dir = out_dir
        self._download_slots = download_slots
        self._kept: dict[str, anyio.Event] = {}
        #: Task ids still open on the server (for cancel-on-exit).
        self.open_tasks: set[str] = set()

    async def track(self, item: InFlight, release: Callable[[], None]) -> None:
        """Wait for the job's task (``release`` frees its slot once the task ended), then
        download its video."""
        assert item.task_id is not None
        self.open_tasks.add(item.task_id)
        self._report.running += 1
        released = False

        def free() -> None:
            nonlocal released
            if not released:
                released = True
                self._report.running -= 1
                release()

        try:
            try:
                task = await self._service.wait(item.task_id, audio_seconds=item.audio_seconds)
            except Exception as exc:
                # The journal keeps the task as submitted: a later run picks it up again.
                free()
                await self._report.emit(item, OutcomeState.FAILED, exc=exc, journal_phase=False)
                return
            free()
            self.open_tasks.discard(item.task_id)
            self._report.event(EventKind.FINISHED, item, task.status.value)
            await self.finish(item, task)
        finally:
            free()

    async def finish(self, item: InFlight, task: Task) -> None:
        billed = task.video_duration
        if task.status == TaskStatus.CANCELED:
            exc_c = JobCancelledError(f"task {task.task_id} was cancelled", job=item.job)
            self._forget(item)
            await self._report.emit(item, OutcomeState.CANCELLED, exc=exc_c)
            return
        if task.succeeded and not task.video_url:
            task = await self._url_of(task)
        if task.succeeded and not task.video_url:
            # Paid for, and the URL may come: the journal keeps it submitted for a later run.
            await self._report.emit(
                item,
                OutcomeState.FAILED,
                exc=JobFailedError(task, job=item.job),
                billed=billed,
                journal_phase=False,
            )
            return
        if not task.succeeded or not task.video_url:
            self._forget(item)
            await self._report.emit(
                item, OutcomeState.FAILED, exc=JobFailedError(task, job=item.job)
            )
            return
        deadline = url_deadline_of(task)
        if self._journal is not None:
            await self._journal.record_finished(
                item.key, video_url=task.video_url, url_deadline=deadline, billed_seconds=billed
            )
        await self.download(item, task.video_url, deadline, billed)

    def _forget(self, item: InFlight) -> None:
        # A task that ended without a video is no reason to skip a new submit next time.
        if item.key and self._service.owned.task_of(item.key) == item.task_id:
            self._service.owned.unbind(item.key)

    async def _url_of(self, task: Task) -> Task:
        """A SUCCEEDED answer without a video URL: ask again a few times."""
        for attempt in range(3):
            await anyio.sleep(self._service.poll_policy.target_delay * (attempt + 1))
            try:
                again = await self._service.get_task(task.task_id)
            except EmoError:
                continue
            if again.video_url:
                return again
        return task

    async def download(
        self,
        item: InFlight,
        url: str,
        deadline: _dt.datetime | None,
        billed: float | None,
    ) -> None:
        assert item.dest is not None
        self._report.downloading += 1
        try:
            async with AsyncExitStack() as stack:
                if self._download_slots is not None:
                    await stack.enter_async_context(self._download_slots)
                result = await self._service.downloader.download(url, item.dest, deadline=deadline)
        except ResultExpiredError as exc:
            # Paid for and lost: say so in the log too, not only in an outcome nobody reads.
            logger.error(
                "%s: task %s was paid for but its video URL expired before it was saved (%s);"
                " it is not submitted again unless asked (rebill_expired)",
                item.name,
                item.task_id,
                exc,
            )
            self._forget(item)
            await self._report.emit(item, OutcomeState.EXPIRED, exc=exc, billed=billed)
            return
        except Exception as exc:  # DownloadError, or anything unexpected from the network
            # The journal keeps the job FINISHED: the next run resumes the download.
            await self._report.emit(
                item, OutcomeState.FAILED, exc=exc, billed=billed, journal_phase=False
            )
            return
        finally:
            self._report.downloading -= 1
        if self._journal is not None:
            with anyio.CancelScope(shield=True):
                await self._journal.record_done(
                    item.key,
                    path=str(result.path),
                    size=result.size,
                    sha256=result.sha256,
                    billed_seconds=billed,
                )
        self._report.event(EventKind.DOWNLOADED, item, str(result.path))
        await self._report.emit(
            item,
            OutcomeState.DONE,
            path=result.path,
            size=result.size,
            sha256=result.sha256,
            billed=billed,
            video_url=url,
        )

    async def keep(self, task: Task) -> Path | None:
        """Save a video no job can claim yet to ``<out>/.unattributed/<task_id>.mp4`` (once)."""
        if not task.video_url or not _SAFE_ID.match(task.task_id):
            logger.error("cannot keep task %r: no URL or an unsafe id", task.task_id)
            return None
        dest = self._out_dir / UNATTRIBUTED_DIR / f"{task.task_id}.mp4"
        seen = self._kept.get(task.task_id)
        if seen is not None:
            await seen.wait()
            return dest if dest.exists() else None
        self._kept[task.task_id] = done = anyio.Event()
        try:
            if dest.exists():
                return dest
            await anyio.Path(dest.parent).mkdir(exist_ok=True)
            for attempt in range(TRANSIENT_TRIES):
                try:
                    result = await self._service.downloader.download(
                        task.video_url, dest, deadline=url_deadline_of(task)
                    )
                    break
                except ResultExpiredError as exc:
                    logger.error(
                        "the video of task %s expired before it was kept: %s", task.task_id, exc
                    )
                    return None
                except Exception as exc:
                    # A paid video that may be a job's: worth more tries than a lost log line.
                    if attempt + 1 == TRANSIENT_TRIES:
                        logger.error("could not keep the video of task %s: %s", task.task_id, exc)
                        return None
                    wait = self._service.retry.backoff(attempt + 3, floor=0.5)
                    logger.info(
                        "keeping task %s failed (%s); again in %.2fs", task.task_id, exc, wait
                    )
                    await anyio.sleep(wait)
            logger.warning(
                "kept the video of task %s, which may be a job's, at %s", task.task_id, dest
            )
            if self._journal is not None:
                with anyio.CancelScope(shield=True):
                    try:
                        await self._journal.record_candidate_file(
                            task.task_id,
                            path=str(result.path),
                            size=result.size,
                            sha256=result.sha256,
                        )
                    except JournalError as exc:
                        # Attributed to a job while it downloaded (its candidates are then
                        # gone): that job has its own copy; this one stays, unrecorded.
                        logger.warning("kept task %s, not recorded: %s", task.task_id, exc)
            return result.path
        finally:
            done.set()
