"""Billing safety by evidence: the six ways a lost submit answer used to bill twice, abandon a
paid video or save another program's clip as ours, each reproduced against the simulator over
loopback HTTP and checked at the simulator's ledger and on disk.

The rule under test: resend only on proof that no task exists; adopt only on proof that the
task is ours; otherwise ``unresolved``, and every paid video kept.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path
from typing import Any

import anyio
import pytest
from test_batch import client_for, sim_config

from emo_async import Job, OutcomeState
from emo_async._journal import Journal, job_key
from emo_async._media import validate_job
from emo_async._samples import make_sample_set, make_voice_wav
from emo_async.simulator import FaultConfig, Simulator

pytestmark = pytest.mark.anyio


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read(path: Any) -> bytes:
    return Path(path).read_bytes()


def our_tasks(sim: Simulator) -> list[Any]:
    return [t for t in sim.ledger.tasks_created if t.task_id not in sim.ledger.foreign_tasks]


def submits(sim: Simulator) -> int:
    return sum(1 for r in sim.ledger.requests if r.endpoint == "submit")


def assert_files_hold_their_own_videos(sim: Simulator, outcomes: list[Any]) -> None:
    """Every saved file is the video of a task made from its own job's audio."""
    for o in outcomes:
        if o.state != OutcomeState.DONE:
            continue
        inputs = sim.ledger.task_inputs(o.task_id)
        assert o.task_id not in sim.ledger.foreign_tasks, o.job.display_name
        assert sha(o.path.read_bytes()) == sha(sim.result_bytes(o.task_id))
        assert Path(o.job.audio).name in inputs.audio_url or inputs.audio_url.startswith("oss://")


class TestSilenceIsNoProof:
    """Case 1: a list that cannot see the window, and lost answers without witnesses."""

    async def test_first_submit_of_a_run_lost_after_its_task_exists(self, tmp_path: Path) -> None:
        """One job, its answer lost, the list's time filter 8 h off: one task, adopted."""
        [job] = make_sample_set(tmp_path / "in", 1, seconds=(1.0, 2.0))
        faults = FaultConfig(seed=1, ambiguous_submit_rate=1.0, list_time_shift=8 * 3600)
        async with Simulator(sim_config(faults=faults)) as sim:
            async with client_for(sim) as client:
                with anyio.fail_after(60):
                    [o] = await client.run_batch_all([job], tmp_path / "out")
            assert len(sim.ledger.tasks_created) == 1
            assert submits(sim) == 1
            assert o.state == OutcomeState.DONE, o.error
            assert_files_hold_their_own_videos(sim, [o])

    async def test_every_answer_lost_bills_each_job_once_over_two_runs(
        self, tmp_path: Path
    ) -> None:
        """A proxy that drops every submit answer: one task per job, run after run."""
        jobs = make_sample_set(tmp_path / "in", 4, seconds=(1.0, 6.0), seed=3)
        faults = FaultConfig(seed=2, ambiguous_submit_rate=1.0, list_time_shift=8 * 3600)
        async with Simulator(sim_config(faults=faults)) as sim:
            for _ in range(2):
                async with client_for(sim) as client:
                    with anyio.fail_after(60):
                        outcomes = await client.run_batch_all(jobs, tmp_path / "out")
            assert sim.ledger.duplicate_tasks() == {}
            assert len(sim.ledger.tasks_created) == len(jobs)
            assert submits(sim) == len(jobs)
            assert all(o.state == OutcomeState.DONE for o in outcomes), outcomes
            assert_files_hold_their_own_videos(sim, outcomes)

    async def test_lost_before_any_task_exists_with_no_witness_is_not_resent(
        self, tmp_path: Path
    ) -> None:
        """Nothing proves absence (no later task of ours): one POST, the job unresolved."""
        [job] = make_sample_set(tmp_path / "in", 1, seconds=(1.0, 2.0))
        faults = FaultConfig(seed=1, lost_before_submit_rate=1.0)
        async with Simulator(sim_config(faults=faults)) as sim:
            async with client_for(sim) as client:
                with anyio.fail_after(60):
                    [o] = await client.run_batch_all([job], tmp_path / "out")
            assert submits(sim) == 1
            assert sim.ledger.tasks_created == []
            assert o.state == OutcomeState.UNRESOLVED
            assert o.error is not None
            assert o.error.kind == "UnresolvedSubmitError"

    async def test_lost_before_any_task_exists_is_resent_once_witnessed(
        self, tmp_path: Path
    ) -> None:
        """Witnesses on both sides and an empty window: proof of absence, sent again."""
        jobs = make_sample_set(tmp_path / "in", 8, seconds=(1.0, 6.0), seed=4)
        async with Simulator(sim_config()) as sim:
            armed: list[bool] = []

            def on_event(event: Any) -> None:
                if event.kind == "submitted" and len(armed) == 2:
                    sim.set_faults(FaultConfig(seed=9, lost_before_submit_rate=1.0))
                if event.kind == "reconciling":
                    sim.set_faults(FaultConfig())
                if event.kind == "submitted":
                    armed.append(True)

            async with client_for(sim) as client:
                with anyio.fail_after(60):
                    # One POST at a time: the faults are armed between two submits, and the
                    # jobs after the lost one are still to send (its witnesses).
                    outcomes = await client.run_batch_all(
                        jobs, tmp_path / "out", on_event=on_event, submit_concurrency=1
                    )
            lost = sum(1 for r in sim.ledger.requests if r.fault == "lost")
            assert lost >= 1
            assert sim.ledger.duplicate_tasks() == {}
            assert len(sim.ledger.tasks_created) == len(jobs)
            assert all(o.state == OutcomeState.DONE for o in outcomes), outcomes


class TestAnswersWithACode:
    """Case 2: a 200 answer carrying a task id and a ``code`` is a task."""

    @pytest.mark.parametrize("code", ["Success", 0])
    async def test_200_with_code_is_recorded_and_never_paid_again(
        self, tmp_path: Path, code: object
    ) -> None:
        jobs = make_sample_set(tmp_path / "in", 2, seconds=(1.0, 2.0))
        faults = FaultConfig(seed=1, submit_code_rate=1.0, submit_code=code)  # type: ignore[arg-type]
        async with Simulator(sim_config(faults=faults)) as sim:
            for _ in range(2):
                async with client_for(sim) as client:
                    outcomes = await client.run_batch_all(jobs, tmp_path / "out")
                assert all(o.state == OutcomeState.DONE for o in outcomes), outcomes
            assert len(sim.ledger.tasks_created) == len(jobs)


async def _journal_an_intent(out: Path, job: Job, at: dt.datetime) -> None:
    """What a process killed right after journalling its intent leaves behind."""
    v = await validate_job(job)
    key = job_key(job, image_digest=v.image.digest, audio_digest=v.audio.digest, ratio=v.ratio)
    async with await Journal.open(out / ".emo-journal.sqlite3") as journal:
        await journal.register(key, job)
        await journal.record_intent(key, at=at)


class TestAnotherProgramOnTheAccount:
    """Case 3: a resumed intent whose POST never left, another program's clip in its window."""

    async def test_foreign_clip_of_another_duration_is_not_adopted(self, tmp_path: Path) -> None:
        [job] = make_sample_set(tmp_path / "in", 1, seconds=(3.5, 3.5))
        out = tmp_path / "out"
        out.mkdir()
        async with Simulator(sim_config()) as sim:
            await _journal_an_intent(out, job, dt.datetime.now(dt.UTC))
            foreign = sim.create_foreign_task(audio_seconds=3.9)
            await anyio.sleep(0.2)  # it finishes
            async with client_for(sim) as client:
                with anyio.fail_after(60):
                    [o] = await client.run_batch_all([job], out)
            assert o.state == OutcomeState.UNRESOLVED
            assert o.task_id != foreign
            assert not any(p.suffix == ".mp4" for p in out.iterdir())
            assert submits(sim) == 0  # not resent either: the foreign task is unexplained
            assert our_tasks(sim) == []


class TestSharedAccount:
    """Case 4: three clients on one account at once, 10 % of answers lost after the task."""

    async def test_three_clients_no_duplicate_no_misattribution_no_lost_video(
        self, tmp_path: Path
    ) -> None:
        faults = FaultConfig(seed=11, ambiguous_submit_rate=0.1)
        async with Simulator(sim_config(faults=faults)) as sim:
            batches = [
                make_sample_set(tmp_path / f"in{i}", 40, seconds=(1.0, 20.0), seed=20 + i)
                for i in range(3)
            ]
            results: list[list[Any]] = [[], [], []]

            async def one(i: int) -> None:
                async with client_for(sim) as client:
                    results[i] = await client.run_batch_all(
                        batches[i], tmp_path / f"out{i}", max_tasks=10
                    )

            with anyio.fail_after(120):
                async with anyio.create_task_group() as tg:
                    for i in range(3):
                        tg.start_soon(one, i)
            outcomes = [o for r in results for o in r]
            lost = sum(1 for r in sim.ledger.requests if r.fault == "ambiguous")
            assert lost >= 5
            assert sim.ledger.duplicate_tasks() == {}
            assert len(sim.ledger.tasks_created) == 120
            for i, batch in enumerate(results):
                assert_files_hold_their_own_videos(sim, batch)
                for o in batch:
                    if o.state == OutcomeState.DONE:
                        assert o.path.parent == tmp_path / f"out{i}"
            # Every task that succeeded is in its job's file or kept as unattributed.
            saved = {o.task_id for o in outcomes if o.state == OutcomeState.DONE}
            kept = {
                p.stem
                for i in range(3)
                for p in (tmp_path / f"out{i}" / ".unattributed").glob("*.mp4")
            }
            assert {t.task_id for t in sim.ledger.tasks_created} <= saved | kept
            assert sum(o.state == OutcomeState.DONE for o in outcomes) >= 108


class TestCancellation:
    """Case 5: cancelling generate() while the billed POST is in flight."""

    async def test_cancelled_generate_keeps_its_task_and_never_pays_twice(
        self, tmp_path: Path, files: Any
    ) -> None:
        # Inputs on a plain HTTP server and boxes given: the submit is the only API request,
        # and every API request takes 0.3 s, so a cancellation 0.15 s in lands while the POST
        # is in flight. max_running=2 keeps most tasks PENDING a while.
        jobs = make_sample_set(tmp_path / "in", 12, seconds=(1.0, 6.0), seed=7)
        config = sim_config(faults=FaultConfig(latency=0.3), max_running=2)
        async with Simulator(config) as sim:
            async with client_for(sim) as client:
                boxes = await client.detect(files.add("p.png", read(jobs[0].image)))
            remote = [
                Job(
                    files.add(f"p{i}.png", read(j.image)),
                    files.add(f"a{i}.wav", read(j.audio)),
                    face_bbox=boxes.face_bbox,
                    ext_bbox=boxes.ext_bbox,
                    name=j.display_name,
                )
                for i, j in enumerate(jobs)
            ]
            out = tmp_path / "out"
            async with client_for(sim) as client:
                cancelled: list[Job] = []

                async def call(job: Job, cancel: bool) -> None:
                    dest = out / f"{job.display_name}.mp4"
                    with anyio.move_on_after(0.15 if cancel else 120) as scope:
                        await client.generate(
                            job.image,
                            job.audio,
                            dest,
                            face_bbox=job.face_bbox,
                            ext_bbox=job.ext_bbox,
                        )
                    if scope.cancelled_caught:
                        cancelled.append(job)

                with anyio.fail_after(120):
                    async with anyio.create_task_group() as tg:
                        for i, job in enumerate(remote):
                            tg.start_soon(call, job, i % 3 == 0)
                    # Calling again with the same inputs never pays twice.
                    async with anyio.create_task_group() as tg:
                        for job in list(cancelled):
                            tg.start_soon(call, job, False)
            assert len(cancelled) == 4
            live = [
                t for t in sim.ledger.tasks_created if sim.tasks[t.task_id].status != "CANCELED"
            ]
            assert len(live) == len(jobs)
            assert sim.ledger.duplicate_tasks() == {}
            for job in remote:
                assert (out / f"{job.display_name}.mp4").exists()


class TestExpired:
    """Case 6: a paid video whose URL expired is not bought again silently."""

    async def test_expired_job_is_reported_not_resubmitted_unless_asked(
        self, tmp_path: Path
    ) -> None:
        [job] = make_sample_set(tmp_path / "in", 1, seconds=(1.0, 2.0))
        out = tmp_path / "out"
        # The URL lives 1,500 simulated seconds (3 s at this time scale; Expires is whole
        # seconds, so less would expire before the first download).
        async with Simulator(sim_config(result_ttl=1500.0)) as sim:
            async with client_for(sim) as client:
                [first] = await client.run_batch_all([job], out)
            assert first.state == OutcomeState.DONE
            first.path.unlink()
            await anyio.sleep(3.5)
            async with client_for(sim) as client:
                [again] = await client.run_batch_all([job], out)
            assert again.state == OutcomeState.EXPIRED
            assert again.error is not None
            assert "rebill_expired" in again.error.message
            assert len(sim.ledger.tasks_created) == 1
            async with client_for(sim) as client:
                [paid] = await client.run_batch_all([job], out, rebill_expired=True)
            assert paid.state == OutcomeState.DONE
            assert len(sim.ledger.tasks_created) == 2


class TestChangedInputs:
    """A job's audio re-recorded at the same path while the journal holds its lost submit."""

    async def test_own_task_is_kept_and_the_old_job_never_sent_with_new_files(
        self, tmp_path: Path
    ) -> None:
        [job] = make_sample_set(tmp_path / "in", 1, seconds=(2.0, 2.0), seed=3)
        out = tmp_path / "out"
        faults = FaultConfig(seed=1, ambiguous_submit_rate=1.0)
        async with Simulator(sim_config(faults=faults)) as sim:
            async with client_for(sim) as client:
                [first] = await client.run_batch_all([job], out, reconcile="fail")
            assert first.state == OutcomeState.UNRESOLVED
            [ours] = sim.ledger.tasks_created
            await anyio.to_thread.run_sync(make_voice_wav, Path(job.audio), 4.0)
            sim.set_faults(FaultConfig())
            await anyio.sleep(0.2)  # the first task finishes
            async with client_for(sim) as client:
                outcomes = await client.run_batch_all([job], out)
            # Its own task, billed for the old audio, is no stranger to release: kept.
            assert (out / ".unattributed" / f"{ours.task_id}.mp4").exists()
            assert sim.ledger.duplicate_tasks() == {}
            assert len(sim.ledger.tasks_created) == 2  # the old task and the new audio's
            states = sorted(o.state for o in outcomes)
            assert states == sorted([OutcomeState.UNRESOLVED, OutcomeState.DONE])


class TestListPaging:
    """A task list that ignores ``page_no`` and sends no ``total_page`` is read once, not
    forever (issue 16), and proves nothing about its end to the reconciler (issue 14)."""

    async def test_paging_stops_at_a_repeated_page(self) -> None:
        async with Simulator(sim_config(faults=FaultConfig(list_ignores_page_no=True))) as sim:
            for _ in range(12):
                sim.create_foreign_task(audio_seconds=3.0)
            async with client_for(sim) as client:
                with anyio.fail_after(20):
                    items = [i async for i in client.list_tasks(page_size=5)]
            assert len(items) == 5
            assert sum(1 for r in sim.ledger.requests if r.endpoint == "task_list") == 2
