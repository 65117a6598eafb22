"""A batch run as a separate process, for the kill and interrupt tests (tests/test_resume.py).

Usage::

    DASHSCOPE_API_KEY=... python tests/_batch_runner.py BASE_URL OUT_DIR MANIFEST_DIR \
        [--kill-at KIND:N] [--max-tasks N]

``MANIFEST_DIR/manifest.json`` lists the jobs (``[{"image", "audio", "name"}]``). The batch runs
with the default journal (``OUT_DIR/.emo-journal.sqlite3``) and prints one JSON line per event
(``{"type": "event", ...}``) and per outcome (``{"type": "outcome", ...}``) on stdout, then
``{"type": "end"}``. The API key comes from the environment, never from the command line.

``--kill-at KIND:N`` makes the process SIGKILL itself at the N-th such moment of this run
(``KIND:NAME``: at that moment of the job named NAME):

* ``intent``: right after the N-th intent is committed, before its submit POST is sent;
* ``presubmit``: the N-th submit was answered (the task exists), its task id not yet committed;
* ``submitted``: right after the N-th task id is committed;
* ``download``: while the N-th finished task's video is being downloaded (a ``.part`` file
  with data exists); if the download completes before that is seen, just before its ``done``
  record is committed (reported as ``predone``);
* ``predone``: the N-th download is complete (file renamed), its ``done`` not yet committed.

Before killing itself it prints ``{"type": "kill", "kind": ..., ...}`` on stdout.
SIGINT ends the run cleanly with exit status 130 (after printing ``{"type": "interrupted"}``); a
journal that cannot be used (locked, foreign, damaged) ends it with status 2 after printing
``{"type": "error", "error": <class name>, "message": ...}``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio

from emo_async import BatchEvent, Client, Job, JournalError
from emo_async._config import Limits, PollPolicy, RetryPolicy
from emo_async._download import part_paths
from emo_async._journal import Journal
from emo_async._util import single_error

KINDS = ("intent", "presubmit", "submitted", "download", "predone")

_out_lock = threading.Lock()


def emit(record: dict[str, Any]) -> None:
    line = json.dumps(record, sort_keys=True)
    with _out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def die(kind: str, **detail: Any) -> None:
    emit({"type": "kill", "kind": kind, **detail})
    os.kill(os.getpid(), signal.SIGKILL)


class KillJournal(Journal):
    """A journal that kills its process at one chosen moment of the write-ahead protocol."""

    def __init__(self, path: Path, conn: Any, lock_fd: int) -> None:
        super().__init__(path, conn, lock_fd)
        self.kill_kind: str | None = None
        self.kill_n = 0
        self.kill_name: str | None = None
        self.out_dir = Path()
        self._counts: dict[str, int] = {}
        self._download_key: str | None = None

    async def _hit(self, kind: str, key: str) -> bool:
        if self.kill_kind != kind:
            return False
        if self.kill_name is not None:
            rec = await self.get(key)
            return rec is not None and rec.name == self.kill_name
        self._counts[kind] = self._counts.get(kind, 0) + 1
        return self._counts[kind] == self.kill_n

    async def record_intent(self, key: str, *, at: _dt.datetime) -> None:
        await super().record_intent(key, at=at)
        if await self._hit("intent", key):
            die("intent", key=key)

    async def record_submitted(self, key: str, task_id: str, *, at: _dt.datetime) -> None:
        if await self._hit("presubmit", key):
            die("presubmit", key=key, task_id=task_id)
        await super().record_submitted(key, task_id, at=at)
        if await self._hit("submitted", key):
            die("submitted", key=key, task_id=task_id)

    async def record_finished(
        self,
        key: str,
        *,
        video_url: str,
        url_deadline: _dt.datetime | None,
        billed_seconds: float | None,
    ) -> None:
        await super().record_finished(
            key, video_url=video_url, url_deadline=url_deadline, billed_seconds=billed_seconds
        )
        if await self._hit("download", key):
            rec = await self.get(key)
            assert rec is not None
            part, _ = part_paths(self.out_dir / f"{rec.name}.mp4")
            self._download_key = key
            # A thread, not a task: it must fire while the event loop is busy downloading.
            threading.Thread(target=_kill_when_partial, args=(part, key), daemon=True).start()

    async def record_done(
        self,
        key: str,
        *,
        path: str,
        size: int,
        sha256: str,
        billed_seconds: float | None = None,
    ) -> None:
        if self._download_key == key:
            die("predone", key=key, fallback=True)
        if await self._hit("predone", key):
            die("predone", key=key, fallback=False)
        await super().record_done(
            key, path=path, size=size, sha256=sha256, billed_seconds=billed_seconds
        )


def _kill_when_partial(part: Path, key: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            size = part.stat().st_size
        except OSError:
            size = 0
        if size > 0:
            die("download", key=key, part_bytes=size)
        time.sleep(0.0005)


def load_jobs(manifest_dir: Path) -> list[Job]:
    items = json.loads((manifest_dir / "manifest.json").read_text())
    return [Job(Path(i["image"]), Path(i["audio"]), name=i["name"]) for i in items]


def on_event(event: BatchEvent) -> None:
    emit(
        {
            "type": "event",
            "kind": event.kind,
            "name": event.name,
            "task_id": event.task_id,
            "detail": event.detail,
        }
    )


async def run(args: argparse.Namespace) -> int:
    out_dir = Path(args.out_dir)
    jobs = load_jobs(Path(args.manifest_dir))
    kind, n, name = None, 0, None
    if args.kill_at:
        kind, _, which = args.kill_at.partition(":")
        if kind not in KINDS:
            raise SystemExit(f"unknown kill kind {kind!r}; expected one of {KINDS}")
        if which.isdigit() or not which:
            n = int(which or "1")
        else:
            name = which
    client = Client(
        base_url=args.base_url,
        poll=PollPolicy(target_delay=0.05, fallback_interval=0.5, prior_base=0.2),
        limits=Limits(task_qps=200, submit_qps=100, detect_qps=100, policy_qps=100),
        retry=RetryPolicy(wait_initial=0.05, wait_max=0.5),
    )
    journal = await KillJournal.open(out_dir / ".emo-journal.sqlite3")
    assert isinstance(journal, KillJournal)
    journal.kill_kind, journal.kill_n, journal.kill_name = kind, n, name
    journal.out_dir = out_dir
    try:
        async with (
            client,
            client.run_batch(
                jobs, out_dir, journal=journal, max_tasks=args.max_tasks, on_event=on_event
            ) as outcomes,
        ):
            async for o in outcomes:
                emit(
                    {
                        "type": "outcome",
                        "name": o.job.display_name,
                        "state": o.state.value,
                        "task_id": o.task_id,
                        "path": str(o.path) if o.path else None,
                        "sha256": o.sha256,
                        "error": o.error.to_json() if o.error else None,
                    }
                )
    finally:
        await journal.aclose()
    emit({"type": "end"})
    return 0


async def run_until_signal(args: argparse.Namespace) -> int:
    """``run`` under a SIGINT/SIGTERM watcher that cancels it, as the emo-async CLI does.

    Relying on asyncio's default Ctrl-C handling (a native cancel of the main task) is racy:
    a cancel that lands inside a shielded journal write can be absorbed, and the run then
    carries on to its end. An explicit cancel scope is what a well-behaved app uses.
    """
    interrupted = False

    async def watch(scope: anyio.CancelScope) -> None:
        nonlocal interrupted
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                interrupted = True
                scope.cancel()
                return

    result = 0
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch, tg.cancel_scope)
            result = await run(args)
            tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # A JournalError (exit 2) and the like come out of the task group on their own.
        single = single_error(group)
        if single is None:
            raise
        raise single from None
    if interrupted:
        raise KeyboardInterrupt
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("base_url")
    parser.add_argument("out_dir")
    parser.add_argument("manifest_dir")
    parser.add_argument("--kill-at", default=None)
    parser.add_argument("--max-tasks", type=int, default=6)
    args = parser.parse_args()
    try:
        return anyio.run(run_until_signal, args)
    except KeyboardInterrupt:
        emit({"type": "interrupted"})
        return 130
    except JournalError as exc:
        emit({"type": "error", "error": type(exc).__name__, "message": str(exc)})
        return 2


if __name__ == "__main__":
    sys.exit(main())
