"""Pins the public signatures: mypy (strict) checks this file and is never asked to run it.

Every call spells its arguments out, by keyword where the API takes keywords, and every result
goes through ``assert_type``: renaming a parameter, making a keyword positional-only, narrowing
an accepted type or changing a return type breaks ``mypy``, and so CI.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import assert_type

import attrs

import emo_async
from emo_async import (
    DEFAULT_LIMITS,
    DEFAULT_POLL_POLICY,
    DEFAULT_RETRY_POLICY,
    DEFAULT_TIMEOUTS,
    APIError,
    BatchEvent,
    Client,
    ClientStatistics,
    Detection,
    DownloadResult,
    ErrorInfo,
    Estimate,
    EventKind,
    InputError,
    Job,
    JournalSummary,
    Limits,
    Outcome,
    OutcomeState,
    PollPolicy,
    Problem,
    RetryPolicy,
    Task,
    TaskListItem,
    TaskStatus,
    Timeouts,
    ValidatedJob,
)


def config_objects() -> None:
    timeouts = Timeouts(connect=5.0, read=30.0, total=None)
    assert_type(timeouts.total, float | None)
    retry = RetryPolicy(
        attempts=3,
        timeout=60.0,
        wait_initial=0.1,
        wait_max=5.0,
        wait_jitter=True,
        wait_exp_base=2.0,
        retry_after_max=60.0,
        budget_tokens=None,
        budget_refill=0.5,
    )
    assert_type(retry.attempts, int)
    limits = Limits(
        task_qps=15.0,
        detect_qps=4.0,
        submit_qps=2.0,
        policy_qps=50.0,
        cancel_qps=5.0,
        list_qps=5.0,
        max_connections=64,
        max_uploads=4,
        max_downloads=4,
    )
    assert_type(limits.task_qps, float)
    poll = PollPolicy(
        target_delay=5.0,
        use_list=True,
        list_page_size=100,
        fallback_interval=60.0,
        prior_base=20.0,
        prior_per_audio_second=3.0,
        early_factor=0.9,
    )
    assert_type(poll.use_list, bool)
    assert_type(attrs.evolve(DEFAULT_TIMEOUTS, read=120.0), Timeouts)
    assert_type(DEFAULT_LIMITS, Limits)
    assert_type(DEFAULT_POLL_POLICY, PollPolicy)
    assert_type(DEFAULT_RETRY_POLICY, RetryPolicy)
    assert_type(emo_async.DEFAULT_BASE_URL, str)
    assert_type(emo_async.__version__, str)


def client_construction() -> Client:
    assert_type(Client(), Client)
    return Client(
        "sk-key",
        base_url="http://127.0.0.1:8000/api/v1",
        timeouts=DEFAULT_TIMEOUTS,
        retry=DEFAULT_RETRY_POLICY,
        limits=DEFAULT_LIMITS,
        poll=DEFAULT_POLL_POLICY,
        download_timeouts=emo_async.DEFAULT_DOWNLOAD_TIMEOUTS,
    )


def jobs_and_outcomes(job: Job, outcome: Outcome) -> None:
    assert_type(Job("me.png", Path("hello.wav")), Job)
    assert_type(
        Job(
            Path("me.png"),
            "https://example.com/hello.wav",
            name="hello",
            style_level="active",
            ratio="3:4",
            face_bbox=(1, 2, 3, 4),
            ext_bbox=(0, 0, 10, 10),
        ),
        Job,
    )
    assert_type(job.image, str | Path)
    assert_type(job.audio, str | Path)
    assert_type(job.name, str | None)
    assert_type(job.face_bbox, tuple[int, int, int, int] | None)
    assert_type(job.display_name, str)

    assert_type(outcome.job, Job)
    assert_type(outcome.state, OutcomeState)
    assert_type(outcome.ok, bool)
    assert_type(outcome.task_id, str | None)
    assert_type(outcome.path, Path | None)
    assert_type(outcome.size, int | None)
    assert_type(outcome.sha256, str | None)
    assert_type(outcome.billed_seconds, float | None)
    assert_type(outcome.video_url, str | None)
    assert_type(outcome.error, ErrorInfo | None)
    assert_type(outcome.exception, BaseException | None)
    assert_type(OutcomeState("done"), OutcomeState)


def tasks(task: Task, item: TaskListItem, detection: Detection) -> None:
    assert_type(task.task_id, str)
    assert_type(task.status, TaskStatus)
    assert_type(task.succeeded, bool)
    assert_type(task.is_terminal, bool)
    assert_type(task.video_url, str | None)
    assert_type(task.end_time, dt.datetime | None)
    assert_type(task.code, str | None)
    assert_type(item.status, TaskStatus)
    assert_type(item.created_at, dt.datetime | None)
    assert_type(detection.check_pass, bool)
    assert_type(detection.face_bbox, tuple[int, int, int, int] | None)


def errors(api: APIError, bad: InputError) -> None:
    assert_type(api.status, int)
    assert_type(api.code, str | None)
    assert_type(api.retryable, bool)
    assert_type(bad.problems, tuple[Problem, ...])
    assert_type(bad.job_name, str | None)


async def single_calls(client: Client, job: Job) -> None:
    async with client:
        outcome = await client.generate(
            "me.png",
            Path("hello.wav"),
            "out/hello.mp4",
            style_level="normal",
            ratio="1:1",
            face_bbox=(1, 2, 3, 4),
            ext_bbox=(0, 0, 10, 10),
        )
        assert_type(outcome, Outcome)
        image_url = await client.upload(Path("me.png"), model="emo-v1")
        assert_type(image_url, str)
        detection = await client.detect(image_url, ratio="3:4")
        assert_type(detection, Detection)
        task = await client.submit(
            image_url,
            "oss://voice.wav",
            face_bbox=(1, 2, 3, 4),
            ext_bbox=[0, 0, 10, 10],
            style_level="calm",
        )
        assert_type(task, Task)
        assert_type(await client.get_task(task.task_id), Task)
        assert_type(await client.wait(task.task_id, audio_seconds=3.5), Task)
        assert_type(await client.cancel_task(task.task_id), Task)
        result = await client.download(task, Path("out/x.mp4"), deadline=None)
        assert_type(result, DownloadResult)
        assert_type(result.path, Path)
        assert_type(result.sha256, str)
        assert_type(await client.download("https://x/y.mp4", "out/y.mp4"), DownloadResult)
        pages = client.list_tasks(
            start_time=dt.datetime.now(dt.UTC),
            end_time=None,
            status="SUCCEEDED",
            model_name="emo-v1",
            page_size=100,
            max_pages=2,
        )
        assert_type(pages, AsyncIterator[TaskListItem])
        stats = client.statistics()
        assert_type(stats, ClientStatistics)
        assert_type(stats.requests, int)
        assert_type(stats.limiters["task"].rate, float)
        assert_type(stats.poller.open_tasks, int)
        assert_type(client.base_url, str)


async def batches(client: Client, jobs: list[Job]) -> None:
    def on_event(event: BatchEvent) -> None:
        assert_type(event.kind, EventKind)

    async def lazy() -> AsyncIterator[Job]:
        for job in jobs:
            yield job

    async with client.run_batch(
        jobs,
        Path("out"),
        journal=True,
        max_tasks=10,
        submit_rate=None,
        download_concurrency=None,
        prepare_concurrency=4,
        reconcile="reconcile",
        cancel_pending_on_exit=False,
        on_event=on_event,
    ) as outcomes:
        assert_type(outcomes, AsyncIterator[Outcome])
        async for outcome in outcomes:
            assert_type(outcome, Outcome)
    async with client.run_batch(lazy(), "out", journal=None) as more:
        assert_type(more, AsyncIterator[Outcome])
    assert_type(await client.run_batch_all(jobs, "out", max_tasks=4), list[Outcome])


async def offline(jobs: list[Job]) -> None:
    validated = await emo_async.validate_job(jobs[0], check_urls=False, session=None)
    assert_type(validated, ValidatedJob)
    assert_type(validated.job, Job)
    estimate = await emo_async.estimate(jobs)
    assert_type(estimate, Estimate)
    assert_type(estimate.billed_seconds, float)
    assert_type(estimate.by_ratio, Mapping[str, int])
    summary = await emo_async.read_summary("out/.emo-journal.sqlite3", now=None)
    assert_type(summary, JournalSummary)
    async with emo_async.open_journal(Path("out/.emo-journal.sqlite3")) as journal:
        assert_type(journal, emo_async.Journal)
    assert_type(emo_async.url_deadline("https://x/y.mp4?Expires=1"), dt.datetime | None)
