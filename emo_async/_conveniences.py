"""The convenience layer of a :class:`Client`: download a result, generate one video, run a
batch, and wait for a task that must succeed; built on the single calls."""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ._calls import ApiCalls
from ._config import RESULT_URL_VALIDITY
from ._download import url_deadline
from ._exceptions import JobCancelledError, JobFailedError
from ._models import BBox, Outcome, Task, TaskStatus

if TYPE_CHECKING:
    from ._batch import BatchEvent, BatchPolicy, BatchRun, ReconcilePolicy
    from ._client import Client
    from ._download import Downloader, DownloadResult
    from ._journal import Journal
    from ._models import Job

__all__ = ["Conveniences"]


class Conveniences(ApiCalls):
    """The convenience layer of :class:`Client` (mixed into it; not usable on its own)."""

    if TYPE_CHECKING:
        # Supplied by Client.
        @property
        def downloader(self) -> Downloader: ...

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
        return await run_one(cast("Client", self), job, Path(dest))

    def run_batch(
        self,
        jobs: Iterable[Job] | AsyncIterator[Job],
        out_dir: str | os.PathLike[str],
        *,
        journal: str | os.PathLike[str] | Journal | bool | None = True,
        max_tasks: int = 10,
        submit_rate: float | None = None,
        submit_concurrency: int | None = None,
        download_concurrency: int | None = None,
        prepare_concurrency: int = 4,
        reconcile: ReconcilePolicy | str = "reconcile",
        cancel_pending_on_exit: bool = False,
        rebill_expired: bool = False,
        on_event: Callable[[BatchEvent], object] | None = None,
        policy: BatchPolicy | None = None,
        batch: str | None = None,
        lease: float = 30.0,
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
                :class:`Journal`, or ``None``/``False`` for none (no resume); or a
                ``postgresql://`` DSN: a batch shared with other workers (needs ``batch``).
                The jobs are then added to the batch (by key: adding them twice adds nothing)
                and this worker works on the batch, with the others, until every job of it
                has ended; it yields the outcomes of the jobs it settled itself.
            max_tasks: Tasks open on the server at once (submitted, not finished).
            submit_rate: Submits per second for this batch (default: the client's limit;
                above it raises ``ValueError``: raise ``Limits.submit_qps`` instead).
            submit_concurrency: Billed POSTs in flight at once (default ``None``: adapted to
                the answers' latency, so latency does not set the pace; see
                :class:`BatchPolicy`).
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
            batch: The shared batch's name (with a ``postgresql://`` journal only).
            lease: Seconds a worker of a shared batch holds its claims unrenewed; a dead
                worker's jobs go to the others after it.
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
                lease=lease,
            )
        return BatchRun(
            cast("Client", self),
            jobs,
            Path(out_dir),
            journal=journal,
            policy=policy,
            on_event=on_event,
            batch=batch,
        )

    def work_batch(
        self,
        out_dir: str | os.PathLike[str],
        *,
        journal: str,
        batch: str,
        **kwargs: Any,
    ) -> BatchRun:
        """Join a shared batch (a ``postgresql://`` journal) without adding jobs: work on its
        jobs with the other workers until every one has ended. The same options as
        :meth:`run_batch`; yields the outcomes of the jobs this worker settled."""
        return self.run_batch((), out_dir, journal=journal, batch=batch, **kwargs)

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
