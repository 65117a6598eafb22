"""Resuming a batch from its journal (issue #7): kills, interrupts and every resume path.

The kill test runs the batch in a subprocess (tests/_batch_runner.py) against a simulator served
by this test's event loop, SIGKILLs it at 20 moments and restarts it each time; the ledger of the
simulator then proves that no job was paid for twice.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import json
import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from emo_async import (
    BatchEvent,
    Client,
    Job,
    JournalCorruptError,
    JournalLockedError,
    Outcome,
    OutcomeState,
)
from emo_async._config import Limits, PollPolicy, RetryPolicy
from emo_async._journal import JobPhase, JobRecord, Journal
from emo_async._samples import make_sample_set
from emo_async.simulator import FaultConfig, Simulator, SimulatorConfig

RUNNER = Path(__file__).with_name("_batch_runner.py")
JOURNAL = ".emo-journal.sqlite3"
#: How long a child may take to stop after SIGINT before the test calls it hung.
INTERRUPT_GRACE = 10.0


# --------------------------------------------------------------------------------------------
# Helpers.


def write_manifest(directory: Path, n: int, *, part: int = 0) -> list[Job]:
    """Add ``n`` jobs (a fresh sample set) to ``directory/manifest.json``; return all jobs."""
    manifest = directory / "manifest.json"
    items = json.loads(manifest.read_text()) if manifest.exists() else []
    fresh = make_sample_set(directory / f"set{part}", n, portraits=2, seconds=(1.0, 2.0), seed=part)
    items += [
        {"image": str(j.image), "audio": str(j.audio), "name": f"s{part}-{j.display_name}"}
        for j in fresh
    ]
    manifest.write_text(json.dumps(items))
    return [Job(Path(i["image"]), Path(i["audio"]), name=i["name"]) for i in items]


@attrs.define
class ChildRun:
    """What one runner process printed, and how it ended."""

    returncode: int | None = None
    lines: list[dict[str, Any]] = attrs.field(factory=list)
    stderr: str = ""
    #: Task ids open (submitted, not seen finished) when the test killed or interrupted it.
    open_at_kill: int = 0
    #: Seconds from SIGINT to the child's exit, and whether it outlived INTERRUPT_GRACE.
    interrupt_to_exit: float | None = None
    hung: bool = False

    @property
    def outcomes(self) -> list[dict[str, Any]]:
        return [r for r in self.lines if r["type"] == "outcome"]

    @property
    def kill(self) -> dict[str, Any] | None:
        return next((r for r in self.lines if r["type"] == "kill"), None)

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.lines if r["type"] == "event" and r["kind"] == kind]


class _OpenTasks:
    """Follows a child's events: which tasks are open on the server right now."""

    def __init__(self) -> None:
        self.open: set[str] = set()
        self.changed = anyio.Event()

    def feed(self, rec: dict[str, Any]) -> None:
        if rec["type"] != "event":
            return
        kind, task_id = rec["kind"], rec["task_id"]
        if kind in ("submitted", "adopted") or (kind == "resumed" and rec["detail"] == "submitted"):
            if task_id:
                self.open.add(task_id)
        elif kind == "finished":
            self.open.discard(task_id)
        self.changed.set()
        self.changed = anyio.Event()


# A killer decides when the test kills the child from outside (None: never).
Killer = Callable[[Process, _OpenTasks, ChildRun], Any]


async def run_child(
    sim: Simulator,
    out_dir: Path,
    manifest_dir: Path,
    *,
    kill_at: str | None = None,
    killer: Killer | None = None,
    extra: tuple[str, ...] = (),
    interrupt_after_submits: int | None = None,
) -> ChildRun:
    """Run tests/_batch_runner.py to its end (or death) while this loop serves ``sim``."""
    cmd = [sys.executable, str(RUNNER), sim.base_url, str(out_dir), str(manifest_dir), *extra]
    if kill_at:
        cmd += ["--kill-at", kill_at]
    # The key goes through the environment only: never on a command line others can read.
    env = {**os.environ, "DASHSCOPE_API_KEY": sim.api_key}
    run = ChildRun()
    tracker = _OpenTasks()
    async with await anyio.open_process(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        assert proc.stdout is not None
        assert proc.stderr is not None
        stdout, stderr = proc.stdout, proc.stderr
        submits = 0
        interrupted = False
        exited = anyio.Event()

        async def read_stdout() -> None:
            nonlocal submits, interrupted
            buffered = BufferedByteReceiveStream(stdout)
            while True:
                try:
                    line = await buffered.receive_until(b"\n", 1 << 20)
                except (anyio.EndOfStream, anyio.IncompleteRead):
                    return
                rec = json.loads(line)
                run.lines.append(rec)
                tracker.feed(rec)
                if rec["type"] == "event" and rec["kind"] in ("submitted", "adopted"):
                    submits += 1
                    if (
                        interrupt_after_submits is not None
                        and submits >= interrupt_after_submits
                        and not interrupted
                    ):
                        interrupted = True
                        run.open_at_kill = len(tracker.open)
                        readers.start_soon(watchdog)
                        proc.send_signal(signal.SIGINT)

        async def watchdog() -> None:
            # Not a timing assertion: a child that ignores Ctrl-C would otherwise hang the test.
            started = anyio.current_time()
            with anyio.move_on_after(INTERRUPT_GRACE) as scope:
                await exited.wait()
            run.interrupt_to_exit = anyio.current_time() - started
            if scope.cancelled_caught:
                run.hung = True
                proc.kill()

        async def read_stderr() -> None:
            chunks = [chunk async for chunk in stderr]
            run.stderr = b"".join(chunks).decode("utf-8", "replace")

        with anyio.fail_after(60):
            async with anyio.create_task_group() as readers:
                # The readers end at EOF, so every line the child wrote is read.
                readers.start_soon(read_stdout)
                readers.start_soon(read_stderr)
                async with anyio.create_task_group() as killers:
                    if killer is not None:
                        killers.start_soon(killer, proc, tracker, run)
                    run.returncode = await proc.wait()
                    exited.set()
                    killers.cancel_scope.cancel()
    return run


def kill_mid_poll(rng: random.Random) -> Killer:
    """Kill a little after a task was submitted, while tasks are open on the server."""

    async def killer(proc: Process, tracker: _OpenTasks, run: ChildRun) -> None:
        while True:
            while not tracker.open:
                await tracker.changed.wait()
            await anyio.sleep(rng.uniform(0.01, 0.08))
            if tracker.open:
                run.open_at_kill = len(tracker.open)
                proc.kill()
                return

    return killer


def kill_at_random(rng: random.Random) -> Killer:
    """Kill at a random moment of the run (start-up included)."""

    async def killer(proc: Process, tracker: _OpenTasks, run: ChildRun) -> None:
        await anyio.sleep(rng.uniform(0.8, 2.2))
        run.open_at_kill = len(tracker.open)
        proc.kill()

    return killer


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def journal_records(path: Path) -> list[JobRecord]:
    journal = await Journal.open(path)
    try:
        return [rec async for rec in journal.records()]
    finally:
        await journal.aclose()


# --------------------------------------------------------------------------------------------
# The kill test.

# 20 kills: every kind of moment, deterministically, plus random ones (seeded).
KILL_SCHEDULE: tuple[str, ...] = (
    "intent:2",
    "presubmit:1",
    "poll",
    "download:1",
    "submitted:2",
    "random",
    "intent:3",
    "presubmit:3",
    "predone:1",
    "poll",
    "download:2",
    "random",
    "intent:1",
    "presubmit:2",
    "submitted:1",
    "poll",
    "download:1",
    "predone:2",
    "intent:4",
    "random",
)
KILL_JOBS = 20


def kill_sim_config() -> SimulatorConfig:
    return SimulatorConfig(
        time_scale=0.01,
        submit_qps=200.0,
        task_qps=400.0,
        list_qps=200.0,
        detect_qps=200.0,
        # Big results (2-4 MB) so that a kill can land in the middle of a download.
        video_bytes_per_second=2_000_000,
        seed=7,
    )


@pytest.mark.slow
@pytest.mark.timeout(180)
class TestKillAndRestart:
    """A batch SIGKILLed at 20 moments and restarted each time pays for every job at most
    once, and keeps every video it paid for."""

    @pytest.mark.anyio
    async def test_twenty_kills_leave_every_job_done_once(self, tmp_path: Path) -> None:
        manifest_dir, out_dir = tmp_path / "in", tmp_path / "out"
        jobs = await anyio.to_thread.run_sync(write_manifest, manifest_dir, KILL_JOBS)
        rng = random.Random(20240607)
        runs: list[ChildRun] = []
        kinds: Counter[str] = Counter()
        left_open = 0
        async with Simulator(kill_sim_config()) as sim:
            for step in KILL_SCHEDULE:
                if len(jobs) - len(sim.ledger.tasks_created) < KILL_JOBS:
                    # Keep work ahead of the kills, as a user appending to a manifest would:
                    # every scheduled kill then lands in a batch with work left to do.
                    jobs = await anyio.to_thread.run_sync(
                        functools.partial(write_manifest, manifest_dir, KILL_JOBS, part=len(runs))
                    )
                if step == "poll":
                    run = await run_child(sim, out_dir, manifest_dir, killer=kill_mid_poll(rng))
                elif step == "random":
                    run = await run_child(sim, out_dir, manifest_dir, killer=kill_at_random(rng))
                else:
                    run = await run_child(sim, out_dir, manifest_dir, kill_at=step)
                runs.append(run)
                # Intents a kill leaves open (several when POSTs were pipelined): each is a
                # lost submit the next run must settle by evidence.
                left_open += sum(
                    r.phase == JobPhase.INTENT for r in await journal_records(out_dir / JOURNAL)
                )
                assert run.returncode == -signal.SIGKILL, (step, run.returncode, run.stderr[-3000:])
                assert "Traceback" not in run.stderr, run.stderr[-3000:]
                kill = run.kill
                if kill is not None:
                    kinds[kill["kind"]] += 1
                elif step == "poll":
                    kinds["mid-poll" if run.open_at_kill else "poll-missed"] += 1
                else:
                    kinds[f"random({'tasks open' if run.open_at_kill else 'no task open'})"] += 1
            # One more job, as a user appending to the manifest: its submit is the later
            # witness that lets intents killed before their POST be proven absent and sent
            # again (alone, a resumed intent cannot be, and stays unresolved).
            jobs = await anyio.to_thread.run_sync(
                functools.partial(write_manifest, manifest_dir, 1, part=len(runs) + 100)
            )
            final = await run_child(sim, out_dir, manifest_dir)
            runs.append(final)
            names = {j.display_name for j in jobs}
            assert final.returncode == 0, final.stderr[-3000:]
            assert final.lines[-1] == {"type": "end"}

            # Every job has exactly one terminal outcome in the final run: done, or unresolved
            # when the kills left lost submits of the same billed duration whose windows
            # overlap (the rule does not guess between them)...
            final_states = Counter((o["name"], o["state"]) for o in final.outcomes)
            assert sorted(n for n, _ in final_states) == sorted(names)
            assert set(final_states.values()) == {1}
            unresolved = [o for o in final.outcomes if o["state"] == "unresolved"]
            assert {s for _, s in final_states} <= {"done", "unresolved"}
            assert len(unresolved) <= left_open, (left_open, kinds, unresolved)
            # ...and no run ended a job any other way.
            others = [
                o for r in runs for o in r.outcomes if o["state"] not in ("done", "unresolved")
            ]
            assert others == []

            records = await journal_records(out_dir / JOURNAL)
            assert sorted(r.name for r in records) == sorted(names)
            done = [r for r in records if r.phase == JobPhase.DONE]
            assert {r.phase for r in records} <= {JobPhase.DONE, JobPhase.UNRESOLVED}
            for rec in done:
                assert rec.task_id is not None
                assert rec.path is not None
                expected = hashlib.sha256(sim.result_bytes(rec.task_id)).hexdigest()
                assert sha256_file(Path(rec.path)) == expected == rec.sha256, rec.name
            assert sorted(p.name for p in out_dir.glob("*.mp4")) == sorted(
                f"{r.name}.mp4" for r in done
            )
            leftovers = sorted(p.name for p in out_dir.glob("*.part*"))
            assert leftovers == [], (leftovers, records)
            # The ledger: 0 duplicate tasks, at most one task per job, and every task either a
            # job's saved video or kept in .unattributed/ for its unresolved job.
            assert sim.ledger.duplicate_tasks() == {}
            assert len(sim.ledger.tasks_created) <= len(jobs)
            kept = {p.stem for p in (out_dir / ".unattributed").glob("*.mp4")}
            saved = {r.task_id for r in done}
            assert {t.task_id for t in sim.ledger.tasks_created} <= saved | kept
            adopted = {e["task_id"] for r in runs for e in r.events("adopted")}
            # The download kills cut a video short: part of it was on disk, not all of it.
            sizes = {r.key: r.size for r in records}
            for r in runs:
                if r.kill and r.kill["kind"] == "download":
                    assert 0 < r.kill["part_bytes"] < (sizes[r.kill["key"]] or 0)

        print(f"\nkills: {dict(kinds)}; runs: {len(runs)}; adopted: {len(adopted)}")
        assert len(runs) == len(KILL_SCHEDULE) + 1
        # Each deterministic kind of moment was really hit.
        for kind in ("intent", "presubmit", "submitted", "download", "predone", "mid-poll"):
            assert kinds[kind] > 0, kinds


# --------------------------------------------------------------------------------------------
# Resume semantics, in-process.


class _Crash(Exception):
    """Stands for the process dying at a chosen moment of the write-ahead protocol."""


class CrashJournal(Journal):
    """Raises :class:`_Crash` at one moment: ``intent`` (committed, POST not sent),
    ``presubmit`` (POST answered, task id not committed) or ``finished`` (committed, video not
    downloaded); at the ``crash_nth`` such moment, or at the one of the job ``crash_name``."""

    crash_at = ""
    crash_nth = 1
    crash_name: str | None = None
    _seen = 0

    async def _crash(self, moment: str, key: str) -> bool:
        if moment != self.crash_at:
            return False
        if self.crash_name is not None:
            rec = await self.get(key)
            return rec is not None and rec.name == self.crash_name
        self._seen += 1
        return self._seen == self.crash_nth

    async def record_intent(self, key: str, *, at: _dt.datetime) -> None:
        await super().record_intent(key, at=at)
        if await self._crash("intent", key):
            raise _Crash

    async def record_submitted(self, key: str, task_id: str, *, at: _dt.datetime) -> None:
        if await self._crash("presubmit", key):
            raise _Crash
        await super().record_submitted(key, task_id, at=at)

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
        if await self._crash("finished", key):
            raise _Crash


def fast_client(sim: Simulator) -> Client:
    return Client(
        sim.api_key,
        base_url=sim.base_url,
        poll=PollPolicy(target_delay=0.05, fallback_interval=0.5, prior_base=0.2),
        limits=Limits(task_qps=200, submit_qps=100, detect_qps=100, policy_qps=100),
        retry=RetryPolicy(wait_initial=0.05, wait_max=0.5),
    )


def resume_sim_config() -> SimulatorConfig:
    return SimulatorConfig(
        time_scale=0.005, submit_qps=100.0, task_qps=200.0, list_qps=100.0, detect_qps=100.0
    )


@attrs.define
class BatchResult:
    outcomes: list[Outcome]
    events: list[BatchEvent]

    def kinds(self, kind: str) -> list[BatchEvent]:
        return [e for e in self.events if e.kind == kind]


async def run_batch(sim: Simulator, jobs: list[Job], out_dir: Path, **kwargs: Any) -> BatchResult:
    events: list[BatchEvent] = []
    async with fast_client(sim) as client:
        outcomes = await client.run_batch_all(jobs, out_dir, on_event=events.append, **kwargs)
    return BatchResult(outcomes, events)


async def crash_batch(
    sim: Simulator,
    jobs: list[Job],
    out_dir: Path,
    at: str,
    *,
    nth: int = 1,
    name: str | None = None,
    **kwargs: Any,
) -> None:
    """Run a batch that "dies" at ``at``, leaving its journal as a killed process would."""
    journal = await CrashJournal.open(out_dir / JOURNAL)
    assert isinstance(journal, CrashJournal)
    journal.crash_at, journal.crash_nth, journal.crash_name = at, nth, name
    try:
        async with fast_client(sim) as client:
            with pytest.raises(_Crash):
                await client.run_batch_all(jobs, out_dir, journal=journal, **kwargs)
    finally:
        await journal.aclose()


async def phases(out_dir: Path) -> list[JobPhase]:
    return [r.phase for r in await journal_records(out_dir / JOURNAL)]


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(resume_sim_config()) as simulator:
        yield simulator


@pytest.fixture
def one_job(tmp_path: Path) -> list[Job]:
    return make_sample_set(tmp_path / "in", 1, seconds=(1.0, 1.5))


class TestResume:
    """A batch started again on its journal picks up exactly where the last one stopped."""

    @pytest.mark.anyio
    async def test_rerun_of_a_completed_batch_submits_nothing(
        self, sim: Simulator, tmp_path: Path
    ) -> None:
        jobs = make_sample_set(tmp_path / "in", 3, seconds=(1.0, 1.5))
        out_dir = tmp_path / "out"
        first = await run_batch(sim, jobs, out_dir)
        assert [o.state for o in first.outcomes] == [OutcomeState.DONE] * 3
        submits, tasks = sim.ledger.count("submit"), len(sim.ledger.tasks_created)

        again = await run_batch(sim, jobs, out_dir)

        assert sim.ledger.count("submit") == submits
        assert len(sim.ledger.tasks_created) == tasks == 3
        assert sorted((o.job.display_name, o.state, o.sha256) for o in again.outcomes) == sorted(
            (o.job.display_name, o.state, o.sha256) for o in first.outcomes
        )
        assert len(again.kinds("skipped")) == 3
        assert again.kinds("submitted") == again.kinds("finished") == []

    @pytest.mark.anyio
    async def test_finished_job_with_a_valid_url_is_downloaded_without_submitting(
        self, sim: Simulator, tmp_path: Path, one_job: list[Job]
    ) -> None:
        out_dir = tmp_path / "out"
        await crash_batch(sim, one_job, out_dir, "finished")
        assert await phases(out_dir) == [JobPhase.FINISHED]
        assert list(out_dir.glob("*.mp4")) == []
        submits = sim.ledger.count("submit")

        result = await run_batch(sim, one_job, out_dir)

        assert sim.ledger.count("submit") == submits == 1
        [outcome] = result.outcomes
        assert outcome.state == OutcomeState.DONE
        assert outcome.task_id is not None
        assert outcome.path is not None
        expected = hashlib.sha256(sim.result_bytes(outcome.task_id)).hexdigest()
        assert sha256_file(outcome.path) == outcome.sha256 == expected
        assert [e.detail for e in result.kinds("resumed")] == ["finished"]
        assert await phases(out_dir) == [JobPhase.DONE]

    @pytest.mark.anyio
    async def test_finished_job_whose_url_expired_is_reported_expired_not_resubmitted(
        self,
        sim: Simulator,
        tmp_path: Path,
        one_job: list[Job],
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        out_dir = tmp_path / "out"
        await crash_batch(sim, one_job, out_dir, "finished")
        submits, tasks = sim.ledger.count("submit"), len(sim.ledger.tasks_created)
        sim.clock.advance(25 * 3600)  # past the 24 h the video URL lives

        with caplog.at_level(logging.WARNING, logger="emo_async"):
            result = await run_batch(sim, one_job, out_dir)

        [outcome] = result.outcomes
        assert outcome.state == OutcomeState.EXPIRED
        assert outcome.error is not None
        assert "expired" in outcome.error.message
        assert outcome.error.kind == "ResultExpiredError"
        # Loudly: a log line names the job, not only the outcome.
        loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert any(one_job[0].display_name in r.getMessage() for r in loud), loud
        # Not silently paid for again in this run.
        assert sim.ledger.count("submit") == submits
        assert len(sim.ledger.tasks_created) == tasks == 1
        assert await phases(out_dir) == [JobPhase.EXPIRED]
        assert list(out_dir.glob("*.mp4")) == []

    @pytest.mark.anyio
    async def test_intent_without_a_task_is_resubmitted_exactly_once(
        self, sim: Simulator, tmp_path: Path, one_job: list[Job]
    ) -> None:
        out_dir = tmp_path / "out"
        await crash_batch(sim, one_job, out_dir, "intent")
        assert sim.ledger.count("submit") == 0
        assert await phases(out_dir) == [JobPhase.INTENT]

        # Alone, nothing can witness that the list covers the intent's window: an empty list
        # is no proof, so the job is left unresolved, not sent again.
        alone = await run_batch(sim, one_job, out_dir)
        [outcome] = alone.outcomes
        assert outcome.state == OutcomeState.UNRESOLVED
        assert sim.ledger.count("submit") == 0
        assert await phases(out_dir) == [JobPhase.UNRESOLVED]

        # With another job in the run, its task witnesses the window: proof of absence, and
        # the intent is sent again exactly once.
        other = make_sample_set(tmp_path / "in2", 1, seconds=(2.0, 2.5), seed=9)
        result = await run_batch(sim, one_job + other, out_dir)
        assert {o.job.display_name: o.state for o in result.outcomes} == {
            one_job[0].display_name: OutcomeState.DONE,
            other[0].display_name: OutcomeState.DONE,
        }
        assert sim.ledger.count("submit") == 2
        assert sim.ledger.duplicate_tasks() == {}
        assert [e.detail for e in result.kinds("resumed")] == ["unresolved"]
        assert result.kinds("adopted") == []
        assert sim.ledger.count("task_list") >= 1  # the list was asked before sending again

    @pytest.mark.anyio
    async def test_intent_whose_task_exists_is_adopted(
        self, sim: Simulator, tmp_path: Path, one_job: list[Job]
    ) -> None:
        out_dir = tmp_path / "out"
        await crash_batch(sim, one_job, out_dir, "presubmit")
        [orphan] = sim.ledger.tasks_created
        assert await phases(out_dir) == [JobPhase.INTENT]

        result = await run_batch(sim, one_job, out_dir)

        [outcome] = result.outcomes
        assert outcome.state == OutcomeState.DONE
        assert outcome.task_id == orphan.task_id
        assert [e.task_id for e in result.kinds("adopted")] == [orphan.task_id]
        assert sim.ledger.count("submit") == 1
        assert sim.ledger.duplicate_tasks() == {}
        records = await journal_records(out_dir / JOURNAL)
        assert [(r.phase, r.task_id) for r in records] == [(JobPhase.DONE, orphan.task_id)]

    @pytest.mark.anyio
    @pytest.mark.parametrize("moment", ["intent", "presubmit"])
    async def test_reconcile_fail_gives_an_unresolved_outcome(
        self, sim: Simulator, tmp_path: Path, one_job: list[Job], moment: str
    ) -> None:
        out_dir = tmp_path / "out"
        await crash_batch(sim, one_job, out_dir, moment)
        submits = sim.ledger.count("submit")

        result = await run_batch(sim, one_job, out_dir, reconcile="fail")

        [outcome] = result.outcomes
        assert outcome.state == OutcomeState.UNRESOLVED
        assert outcome.error is not None
        assert "reconcile='fail'" in outcome.error.message
        assert sim.ledger.count("submit") == submits
        # The journal keeps it unresolved: a later run may still settle it, never pay twice.
        assert await phases(out_dir) == [JobPhase.UNRESOLVED]

    @pytest.mark.anyio
    async def test_intent_is_not_resubmitted_while_the_task_list_cannot_tell(
        self, sim: Simulator, tmp_path: Path, one_job: list[Job]
    ) -> None:
        out_dir = tmp_path / "out"
        await crash_batch(sim, one_job, out_dir, "presubmit")
        [orphan] = sim.ledger.tasks_created
        sim.set_faults(FaultConfig(error_rate={"task_list": 1.0}))

        result = await run_batch(sim, one_job, out_dir)

        # A list that answers only errors proves nothing: sending again could pay twice.
        assert sim.ledger.count("task_list") > 0
        assert sim.ledger.count("submit") == 1
        assert [t.task_id for t in sim.ledger.tasks_created] == [orphan.task_id]
        [outcome] = result.outcomes
        assert outcome.state == OutcomeState.UNRESOLVED
        assert await phases(out_dir) == [JobPhase.UNRESOLVED]  # left for a later run
        # The next run, with a working list, still finds and adopts the task.
        sim.set_faults(FaultConfig())
        again = await run_batch(sim, one_job, out_dir)
        assert [(o.state, o.task_id) for o in again.outcomes] == [
            (OutcomeState.DONE, orphan.task_id)
        ]
        assert sim.ledger.duplicate_tasks() == {}

    @pytest.mark.slow
    @pytest.mark.anyio
    async def test_open_intents_and_new_submits_settle_each_other(self, tmp_path: Path) -> None:
        # Slow tasks (about 2 s), one task slot. A resumed intent no longer holds back new
        # submits: they are the witnesses that bound its window, and a lost answer gives its
        # slot back while it is settled.
        config = attrs.evolve(resume_sim_config(), time_scale=0.1)
        manifest_dir, out_dir = tmp_path / "in", tmp_path / "out"
        await anyio.to_thread.run_sync(write_manifest, manifest_dir, 3)
        async with Simulator(config) as sim:
            # Run 1 dies with two tasks submitted and the third task's id lost.
            first = await run_child(sim, out_dir, manifest_dir, kill_at="presubmit:3")
            assert first.returncode == -signal.SIGKILL
            assert sorted(await phases(out_dir)).count(JobPhase.INTENT) == 1
            # Run 2, one task at a time and one job more, dies when the new job's task id
            # comes back: two intents open, two unknown tasks, told apart by what they billed.
            jobs = await anyio.to_thread.run_sync(
                functools.partial(write_manifest, manifest_dir, 1, part=1)
            )
            late = jobs[-1].display_name
            second = await run_child(
                sim,
                out_dir,
                manifest_dir,
                kill_at=f"presubmit:{late}",
                extra=("--max-tasks", "1"),
            )
            assert second.returncode == -signal.SIGKILL

            third = await run_child(sim, out_dir, manifest_dir)

            assert third.returncode == 0, third.stderr[-3000:]
            assert sorted((o["name"], o["state"]) for o in third.outcomes) == sorted(
                (j.display_name, "done") for j in jobs
            )
            assert sim.ledger.duplicate_tasks() == {}
            assert len(sim.ledger.tasks_created) == len(jobs)


class TestJournalGuards:
    """A journal in use, foreign or damaged stops the batch before anything is spent."""

    @pytest.mark.anyio
    async def test_second_batch_on_the_same_journal_is_refused(
        self, sim: Simulator, tmp_path: Path
    ) -> None:
        jobs = make_sample_set(tmp_path / "in", 2, seconds=(1.0, 1.5))
        out_dir = tmp_path / "out"
        async with fast_client(sim) as client, client.run_batch(jobs, out_dir) as outcomes:
            with pytest.raises(JournalLockedError) as info:
                async with client.run_batch(jobs, out_dir):
                    pass  # pragma: no cover
            states = [o.state async for o in outcomes]
        message = str(info.value)
        assert str(out_dir / JOURNAL) in message
        assert "in use" in message
        assert "twice" in message
        assert states == [OutcomeState.DONE] * 2
        assert len(sim.ledger.tasks_created) == 2

    @pytest.mark.anyio
    async def test_batch_in_another_process_is_refused_with_a_clear_message(
        self, sim: Simulator, tmp_path: Path
    ) -> None:
        manifest_dir, out_dir = tmp_path / "in", tmp_path / "out"
        await anyio.to_thread.run_sync(write_manifest, manifest_dir, 1)
        journal = await Journal.open(out_dir / JOURNAL)
        try:
            run = await run_child(sim, out_dir, manifest_dir)
        finally:
            await journal.aclose()
        assert run.returncode == 2, run.stderr
        [error] = [r for r in run.lines if r["type"] == "error"]
        assert error["error"] == "JournalLockedError"
        assert f"pid {os.getpid()}" in error["message"]
        assert "Traceback" not in run.stderr
        assert sim.ledger.count() == 0

    @pytest.mark.anyio
    @pytest.mark.parametrize("kind", ["garbage", "foreign", "damaged"])
    async def test_corrupt_or_foreign_journal_is_refused_and_left_unchanged(
        self, sim: Simulator, tmp_path: Path, one_job: list[Job], kind: str
    ) -> None:
        out_dir = tmp_path / "out"
        out_dir.mkdir()
        path = out_dir / JOURNAL
        if kind == "garbage":
            path.write_bytes(b"this is not a database\n" * 100)
        elif kind == "foreign":
            with contextlib.closing(sqlite3.connect(path)) as conn:
                conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
                conn.execute("INSERT INTO invoices (total) VALUES (12.5)")
                conn.commit()
        else:
            await run_batch(sim, one_job, out_dir)
            size = path.stat().st_size
            with path.open("r+b") as fh:  # smash every page after the first
                fh.seek(4096)
                fh.write(b"\xa5" * (size - 4096))
        before = path.read_bytes()
        submits = sim.ledger.count("submit")

        with pytest.raises(JournalCorruptError) as info:
            await run_batch(sim, one_job, out_dir)

        assert str(path) in str(info.value)
        assert path.read_bytes() == before
        assert sim.ledger.count("submit") == submits


@pytest.mark.slow
class TestInterrupt:
    """Ctrl-C stops a batch promptly and cleanly; the next run finishes it, paying once."""

    @pytest.mark.anyio
    async def test_sigint_stops_cleanly_and_a_restart_completes(self, tmp_path: Path) -> None:
        manifest_dir, out_dir = tmp_path / "in", tmp_path / "out"
        jobs = await anyio.to_thread.run_sync(write_manifest, manifest_dir, 16)
        async with Simulator(kill_sim_config()) as sim:
            run = await run_child(sim, out_dir, manifest_dir, interrupt_after_submits=4)

            assert not run.hung, run.stderr[-3000:]
            assert run.returncode == 130, run.stderr[-3000:]
            assert run.lines[-1] == {"type": "interrupted"}
            assert "Traceback" not in run.stderr, run.stderr[-3000:]
            assert run.open_at_kill > 0  # it was interrupted with work in flight
            # The journal is consistent: an interrupt is not a failure, every task it names
            # exists, every file it names is whole.
            records = await journal_records(out_dir / JOURNAL)
            assert all(not r.phase.is_terminal or r.phase is JobPhase.DONE for r in records)
            for rec in records:
                if rec.phase in (JobPhase.SUBMITTED, JobPhase.FINISHED, JobPhase.DONE):
                    assert rec.task_id in sim.tasks
                if rec.phase is JobPhase.DONE:
                    assert rec.path is not None
                    assert rec.task_id is not None
                    expected = hashlib.sha256(sim.result_bytes(rec.task_id)).hexdigest()
                    assert sha256_file(Path(rec.path)) == expected
            assert all(o["state"] == "done" for o in run.outcomes)

            again = await run_child(sim, out_dir, manifest_dir)

            assert again.returncode == 0, again.stderr[-3000:]
            assert sorted(o["name"] for o in again.outcomes) == sorted(j.display_name for j in jobs)
            assert {o["state"] for o in again.outcomes} == {"done"}
            assert {r.phase for r in await journal_records(out_dir / JOURNAL)} == {JobPhase.DONE}
            assert sim.ledger.duplicate_tasks() == {}
            assert len(sim.ledger.tasks_created) == len(jobs)
        print(f"\nSIGINT to exit: {run.interrupt_to_exit:.2f} s; tasks open: {run.open_at_kill}")
