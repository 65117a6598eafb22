"""The batch runner and the shared poller against the simulator, over loopback sockets.

Every limit is checked where it matters: at the simulator (its ledger), not in the client.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import attrs
import pytest

import emo_async
from emo_async import Client, Job, Limits, OutcomeState, PollPolicy, RetryPolicy
from emo_async._samples import make_portrait, make_sample_set, make_voice_wav
from emo_async.simulator import FaultConfig, Simulator, SimulatorConfig

pytestmark = pytest.mark.anyio

FAST_RETRY = RetryPolicy(attempts=8, wait_initial=0.02, wait_max=0.2)


def sim_config(**kw: Any) -> SimulatorConfig:
    base: dict[str, Any] = {
        "time_scale": 0.002,
        "submit_qps": None,
        "task_qps": 50.0,
        "list_qps": 50.0,
        "detect_qps": 50.0,
        "policy_qps": None,
        "max_running": 1000,
        # The upload policy would otherwise last 0.6 s at this time scale.
        "policy_ttl": 1e7,
    }
    base.update(kw)
    return SimulatorConfig(**base)


def client_for(sim: Simulator, **kw: Any) -> Client:
    kw.setdefault("limits", Limits(task_qps=40, submit_qps=200, detect_qps=40, policy_qps=100))
    kw.setdefault("poll", PollPolicy(target_delay=0.05))
    kw.setdefault("retry", FAST_RETRY)
    return Client(sim.api_key, base_url=sim.base_url, **kw)


def client_tasks() -> int:
    """asyncio tasks running emo_async client code (the simulator's are not counted)."""
    count = 0
    for task in asyncio.all_tasks():
        code = getattr(task.get_coro(), "cr_code", None)
        name = getattr(code, "co_filename", "")
        if "/emo_async/" in name and "/simulator/" not in name:
            count += 1
    return count


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digests(paths: set[Path]) -> list[str]:
    return [sha(p.read_bytes()) for p in paths]


def check_settled(sim: Simulator, outcomes: list[emo_async.Outcome], out: Path) -> None:
    """The billing rule's promises, checked at the simulator and on disk: no task twice, every
    saved file the video of a task made from its own job's audio, every task we created either
    in its job's file or kept in ``.unattributed/``, and every job done or unresolved."""
    assert sim.ledger.duplicate_tasks() == {}
    done = [o for o in outcomes if o.state == OutcomeState.DONE]
    assert {o.state for o in outcomes} <= {OutcomeState.DONE, OutcomeState.UNRESOLVED}
    check_done(sim, done)
    for o in done:
        assert o.task_id is not None
        assert sim.ledger.task_inputs(o.task_id).audio_sha256 == sha(Path(o.job.audio).read_bytes())
    kept = {p.stem for p in (out / ".unattributed").glob("*.mp4")}
    mine = {t.task_id for t in sim.ledger.tasks_created} - sim.ledger.foreign_tasks
    assert mine <= {o.task_id for o in done} | kept


def check_done(sim: Simulator, outcomes: list[emo_async.Outcome]) -> None:
    for o in outcomes:
        assert o.state == OutcomeState.DONE, (o.job.display_name, o.error)
        assert o.path is not None
        assert o.task_id is not None
        data = o.path.read_bytes()
        assert sha(data) == o.sha256 == sha(sim.result_bytes(o.task_id))
        assert o.size == len(data)
        assert not o.path.with_name(o.path.name + ".part").exists()


class TestBatch:
    """A batch finishes every job correctly within every configured limit."""

    async def test_batch_completes_within_limits(self, tmp_path: Path) -> None:
        jobs = make_sample_set(tmp_path / "in", 120, portraits=3, seconds=(1.0, 4.0))
        async with Simulator(sim_config()) as sim:
            async with client_for(sim, limits=Limits(task_qps=20, submit_qps=40)) as client:
                outcomes = await client.run_batch_all(
                    jobs, tmp_path / "out", max_tasks=8, submit_rate=30
                )
            check_done(sim, outcomes)
            assert len(outcomes) == 120
            assert {o.job.display_name for o in outcomes} == {j.display_name for j in jobs}
            ledger = sim.ledger
            assert ledger.max_running_observed <= 8
            assert ledger.max_in_window("submit") <= 30
            assert ledger.max_in_window("task_get") + 0 <= 20
            assert ledger.throttled() == 0
            assert ledger.duplicate_tasks() == {}
            assert ledger.auth_leaks() == []
            # Frugal: at most ~1.5 status queries per job (list pages included).
            queries = ledger.count("task_get") + ledger.count("task_list")
            assert queries <= 1.6 * len(jobs), queries

    @pytest.mark.slow
    async def test_thousand_jobs(self, tmp_path: Path) -> None:
        jobs = make_sample_set(tmp_path / "in", 1000, portraits=4, seconds=(1.0, 3.0))
        async with Simulator(sim_config(time_scale=0.001, task_qps=60.0)) as sim:
            async with client_for(sim, limits=Limits(task_qps=40, submit_qps=200)) as client:
                outcomes = await client.run_batch_all(
                    jobs, tmp_path / "out", max_tasks=40, prepare_concurrency=8
                )
            check_done(sim, outcomes)
            assert len(outcomes) == 1000
            assert sim.ledger.max_running_observed <= 40
            task_requests = [
                r.t for r in sim.ledger.requests if r.endpoint in ("task_get", "task_list")
            ]
            task_requests.sort()
            worst = max(
                sum(1 for t in task_requests[i : i + 60] if t < start + 1.0)
                for i, start in enumerate(task_requests)
            )
            assert worst <= 40
            assert sim.ledger.duplicate_tasks() == {}
            queries = sim.ledger.count("task_get") + sim.ledger.count("task_list")
            assert queries <= 1.5 * len(jobs), queries

    async def test_shared_portrait_is_detected_and_uploaded_once(self, tmp_path: Path) -> None:
        jobs = make_sample_set(tmp_path / "in", 200, portraits=1, seconds=(0.5, 1.0))
        async with Simulator(sim_config()) as sim:
            async with client_for(sim) as client:
                outcomes = await client.run_batch_all(
                    jobs, tmp_path / "out", max_tasks=50, prepare_concurrency=8
                )
            assert all(o.ok for o in outcomes)
            assert sim.ledger.count("detect") == 1
            # the portrait once per model (emo-detect-v1, emo-v1) + 200 distinct voices
            assert sim.ledger.count("upload") == 202
            assert sim.ledger.count("get_policy") <= 3

    async def test_uploads_carry_the_bytes_that_were_validated(self, tmp_path: Path) -> None:
        jobs = make_sample_set(tmp_path / "in", 3, portraits=1, seconds=(0.5, 1.0))
        # Over 1 MiB: streamed from disk; the others are sent from the bytes validation read.
        long = make_voice_wav(tmp_path / "in" / "long.wav", 40.0, sample_rate=16000)
        jobs.append(Job(jobs[0].image, long, name="long"))
        async with Simulator(sim_config()) as sim:
            async with client_for(sim) as client:
                outcomes = await client.run_batch_all(jobs, tmp_path / "out", max_tasks=10)
            check_done(sim, outcomes)
            stored = sorted(sha(bytes(obj.data)) for obj in sim._state.uploads.values())
        inputs = {Path(j.image) for j in jobs} | {Path(j.audio) for j in jobs}
        # The portrait goes up once per model (emo-detect-v1 and emo-v1).
        [portrait] = file_digests({Path(jobs[0].image)})
        assert stored == sorted([*file_digests(inputs), portrait])

    async def test_one_bad_job_is_its_own_outcome(self, tmp_path: Path) -> None:
        jobs = make_sample_set(tmp_path / "in", 4, portraits=1, seconds=(1.0, 2.0))
        text = tmp_path / "in" / "not-audio.wav"
        text.write_text("this is not a wav file\n")
        nobody = make_portrait(tmp_path / "in" / "empty.png", trigger="InvalidFile.Content:none")
        bad = [
            Job(jobs[0].image, text, name="bad-audio"),
            Job(nobody, jobs[0].audio, name="nobody"),
            Job(jobs[0].image, jobs[1].audio, name="bad-style", style_level="wild"),
        ]
        async with Simulator(sim_config()) as sim:
            async with client_for(sim) as client:
                outcomes = await client.run_batch_all(bad + jobs, tmp_path / "out")
            by_name = {o.job.display_name: o for o in outcomes}
            assert by_name["bad-audio"].state == OutcomeState.REJECTED
            assert by_name["bad-audio"].error is not None
            assert "text" in by_name["bad-audio"].error.message
            assert by_name["nobody"].state == OutcomeState.REJECTED
            assert by_name["nobody"].error is not None
            assert by_name["nobody"].error.kind == "DetectionRejectedError"
            assert by_name["bad-style"].state == OutcomeState.REJECTED
            check_done(sim, [by_name[j.display_name] for j in jobs])
            # Nothing was billed for the rejected jobs.
            assert len(sim.ledger.tasks_created) == len(jobs)

    async def test_task_that_fails_on_the_server_is_a_failed_outcome(self, tmp_path: Path) -> None:
        image = make_portrait(tmp_path / "back.png", trigger="InvalidFile.FrontBody")
        audio = make_voice_wav(tmp_path / "a.wav", 1.0)
        job = Job(
            image, audio, name="back", face_bbox=(100, 100, 300, 300), ext_bbox=(0, 0, 400, 400)
        )
        async with Simulator(sim_config()) as sim:
            async with client_for(sim) as client:
                [outcome] = await client.run_batch_all([job], tmp_path / "out")
        assert outcome.state == OutcomeState.FAILED
        assert outcome.error is not None
        assert outcome.error.code == "InvalidFile.FrontBody"
        assert outcome.task_id is not None

    async def test_lazy_jobs_are_pulled_with_backpressure(self, tmp_path: Path) -> None:
        jobs = make_sample_set(tmp_path / "in", 60, portraits=1, seconds=(0.5, 1.0))
        pulled = 0

        def gen() -> Iterator[Job]:
            nonlocal pulled
            for j in jobs:
                pulled += 1
                yield j

        async with Simulator(sim_config(time_scale=0.01)) as sim:
            async with client_for(sim) as client:
                async with client.run_batch(
                    gen(), tmp_path / "out", max_tasks=2, prepare_concurrency=1
                ) as outcomes:
                    first = await outcomes.__anext__()
                    pulled_at_first = pulled
                    rest = [o async for o in outcomes]
        assert first.ok
        assert pulled_at_first < 15
        assert len(rest) == 59

    async def test_async_iterable_of_jobs(self, tmp_path: Path) -> None:
        jobs = make_sample_set(tmp_path / "in", 5, portraits=1, seconds=(0.5, 1.0))

        async def agen() -> AsyncIterator[Job]:
            for j in jobs:
                await anyio.lowlevel.checkpoint()
                yield j

        async with Simulator(sim_config()) as sim:
            async with client_for(sim) as client:
                outcomes = await client.run_batch_all(agen(), tmp_path / "out")
        assert sorted(o.job.display_name for o in outcomes) == sorted(j.display_name for j in jobs)

    async def test_duplicate_job_is_rejected_not_billed_twice(self, tmp_path: Path) -> None:
        [job] = make_sample_set(tmp_path / "in", 1)
        async with Simulator(sim_config()) as sim:
            async with client_for(sim) as client:
                outcomes = await client.run_batch_all([job, job], tmp_path / "out")
            states = sorted(o.state.value for o in outcomes)
            assert states == ["done", "rejected"]
            assert len(sim.ledger.tasks_created) == 1

    async def test_expired_url_is_an_expired_outcome(self, tmp_path: Path) -> None:
        jobs = make_sample_set(tmp_path / "in", 2, portraits=1)
        async with Simulator(sim_config()) as sim:

            def on_event(event: emo_async.BatchEvent) -> None:
                if event.kind == "finished":
                    sim.clock.advance(25 * 3600)  # the URL's 24 h run out before the download

            async with client_for(sim) as client:
                outcomes = await client.run_batch_all(
                    jobs, tmp_path / "out", on_event=on_event, max_tasks=1
                )
        assert [o.state for o in outcomes] == [OutcomeState.EXPIRED] * 2
        assert all(o.error and "expire" in o.error.message.lower() for o in outcomes)
        assert list((tmp_path / "out").glob("*.mp4")) == []


class TestFaults:
    """Faults on the server never cost a duplicate task or a lost job."""

    async def test_ambiguous_submits_are_reconciled_without_duplicates(
        self, tmp_path: Path
    ) -> None:
        jobs = make_sample_set(tmp_path / "in", 40, portraits=2, seconds=(0.5, 1.5))
        faults = FaultConfig(seed=7, ambiguous_submit_rate=0.3, error_rate={"submit": 0.1})
        async with Simulator(sim_config(faults=faults)) as sim:
            async with client_for(sim) as client:
                outcomes = await client.run_batch_all(jobs, tmp_path / "out", max_tasks=10)
            # Durations of 0.5-1.5 s and 40 % of answers lost: some lost tasks cannot be told
            # apart by what they billed. Those jobs end unresolved, never resent or guessed.
            check_settled(sim, outcomes, tmp_path / "out")
            # Only a job whose submit answer was lost may end other than done (how many of
            # those stay unresolved depends on how their windows overlapped in time).
            lost = sum(1 for r in sim.ledger.requests if r.endpoint == "submit" and r.fault)
            assert lost > 0
            done = sum(o.state == OutcomeState.DONE for o in outcomes)
            assert done >= len(jobs) - lost
            assert done >= len(jobs) // 2, (done, lost)

    async def test_many_lost_answers_and_errors_end_without_duplicates(
        self, tmp_path: Path
    ) -> None:
        # A third of the answers lost (the task exists), a tenth 500s (nothing exists) and a
        # tenth 503s (paused outside the submit lock while other jobs submit).
        jobs = make_sample_set(tmp_path / "in", 60, portraits=2, seconds=(0.5, 1.5))
        faults = FaultConfig(seed=11, ambiguous_submit_rate=0.35, error_rate={"submit": 0.2})
        async with Simulator(sim_config(faults=faults)) as sim:
            async with client_for(sim) as client:
                run = client.run_batch(jobs, tmp_path / "out", max_tasks=20)
                async with run as outcomes:
                    got = [o async for o in outcomes]
            check_settled(sim, got, tmp_path / "out")
            assert sum(o.state == OutcomeState.DONE for o in got) >= 40
            lost = sum(1 for r in sim.ledger.requests if r.fault == "ambiguous")
            assert lost >= 10

    async def test_a_task_list_blind_to_the_window_never_causes_a_resend(
        self, tmp_path: Path
    ) -> None:
        # Once the first submit has landed, every third answer is lost after its task was
        # created, and the task list reads its time filter 8 hours off (a time-zone mix-up).
        # No time filter is sent, so the zone cannot hide anything: each lost answer's task is
        # found by the epochs of its witnesses and adopted; nothing is sent again.
        jobs = make_sample_set(tmp_path / "in", 12, portraits=1, seconds=(0.5, 1.0))
        blind = FaultConfig(seed=5, ambiguous_submit_rate=0.34, list_time_shift=8 * 3600)
        async with Simulator(sim_config()) as sim:
            armed: list[bool] = []

            def on_event(event: emo_async.BatchEvent) -> None:
                if event.kind == "submitted" and not armed:
                    armed.append(True)  # once: each set_faults reseeds the dice
                    sim.set_faults(blind)

            async with client_for(sim) as client:
                outcomes = await client.run_batch_all(
                    jobs, tmp_path / "out", max_tasks=12, on_event=on_event
                )
            lost = sum(1 for r in sim.ledger.requests if r.fault == "ambiguous")
            assert lost >= 1
            assert sim.ledger.duplicate_tasks() == {}
            assert len(sim.ledger.tasks_created) == len(jobs)
            check_settled(sim, outcomes, tmp_path / "out")
            assert sum(o.state == OutcomeState.DONE for o in outcomes) >= len(jobs) - 2

    async def test_a_huge_retry_after_on_the_task_list_does_not_stall_the_batch(
        self, tmp_path: Path
    ) -> None:
        # Every answer to a submit is lost and the task list answers 429 "Retry-After: 3600":
        # the list proves nothing, so the batch ends with its lost submits unresolved (kept
        # for a later run to settle), nothing resent.
        jobs = make_sample_set(tmp_path / "in", 3, portraits=1, seconds=(0.5, 1.0))
        faults = FaultConfig(
            seed=2, ambiguous_submit_rate=1.0, throttle_rate={"task_list": 1.0}, retry_after=3600
        )
        retry = attrs.evolve(FAST_RETRY, retry_after_max=0.05)
        async with Simulator(sim_config(faults=faults)) as sim:
            async with client_for(sim, retry=retry) as client:
                with anyio.fail_after(60):
                    outcomes = await client.run_batch_all(jobs, tmp_path / "out", max_tasks=3)
            assert [o.state for o in outcomes] == [OutcomeState.UNRESOLVED] * 3
            assert len(sim.ledger.tasks_created) == 3
            assert sim.ledger.duplicate_tasks() == {}

    async def test_query_errors_and_throttling_do_not_stop_polling(self, tmp_path: Path) -> None:
        jobs = make_sample_set(tmp_path / "in", 30, portraits=1, seconds=(0.5, 1.5))
        faults = FaultConfig(
            seed=3,
            error_rate={"task_get": 0.2, "task_list": 0.2},
            throttle_rate={"task_get": 0.1},
            reset_rate={"task_get": 0.1},
        )
        async with Simulator(sim_config(faults=faults)) as sim:
            async with client_for(sim) as client:
                outcomes = await client.run_batch_all(jobs, tmp_path / "out", max_tasks=10)
            check_done(sim, outcomes)

    async def test_poller_without_task_list(self, tmp_path: Path) -> None:
        jobs = make_sample_set(tmp_path / "in", 20, portraits=1, seconds=(0.5, 1.5))
        async with Simulator(sim_config()) as sim:
            async with client_for(sim, poll=PollPolicy(target_delay=0.05, use_list=False)) as c:
                outcomes = await c.run_batch_all(jobs, tmp_path / "out", max_tasks=10)
            check_done(sim, outcomes)
            assert sim.ledger.count("task_list") == 0

    async def test_broken_task_list_falls_back_to_direct_queries(self, tmp_path: Path) -> None:
        jobs = make_sample_set(tmp_path / "in", 20, portraits=1, seconds=(0.5, 1.5))
        faults = FaultConfig(seed=1, error_rate={"task_list": 1.0})
        async with Simulator(sim_config(faults=faults)) as sim:
            async with client_for(sim, retry=RetryPolicy(attempts=2, wait_initial=0.01)) as c:
                outcomes = await c.run_batch_all(jobs, tmp_path / "out", max_tasks=10)
            check_done(sim, outcomes)


class TestCancellation:
    """Leaving a batch early cancels its work promptly and leaks nothing."""

    async def test_leaving_early_is_prompt_and_clean(self, tmp_path: Path) -> None:
        jobs = make_sample_set(tmp_path / "in", 30, portraits=1, seconds=(2.0, 3.0))
        async with Simulator(sim_config(time_scale=0.2, max_running=3)) as sim:
            async with client_for(sim) as client:
                baseline = client_tasks()
                with anyio.fail_after(2):
                    async with client.run_batch(
                        jobs, tmp_path / "out", max_tasks=6, cancel_pending_on_exit=True
                    ) as outcomes:
                        with anyio.move_on_after(1.0):
                            async for _ in outcomes:
                                pass
                await anyio.sleep(0.05)
                assert client_tasks() <= baseline
                assert client.poller.statistics().open_tasks == 0
            states = {sim.tasks[t].status for t in sim.tasks}
            assert "CANCELED" in {str(s) for s in states}
            assert list((tmp_path / "out").glob("*.mp4")) == []

    async def test_exception_in_body_propagates_unwrapped(self, tmp_path: Path) -> None:
        jobs = make_sample_set(tmp_path / "in", 2, portraits=1)
        async with Simulator(sim_config()) as sim:
            async with client_for(sim) as client:
                with pytest.raises(KeyError):
                    async with client.run_batch(jobs, tmp_path / "out"):
                        raise KeyError("mine")
            with pytest.raises(KeyError):
                async with client_for(sim):
                    raise KeyError("mine too")


class TestSingleCalls:
    """generate() and wait() go through the same machinery as the batch."""

    async def test_generate_one_video(self, tmp_path: Path) -> None:
        image = make_portrait(tmp_path / "me.jpg", size=(600, 800))
        audio = make_voice_wav(tmp_path / "hi.wav", 2.0)
        async with Simulator(sim_config()) as sim:
            async with client_for(sim) as client:
                outcome = await client.generate(image, audio, tmp_path / "out" / "hi.mp4")
            assert outcome.ok
            assert outcome.path == tmp_path / "out" / "hi.mp4"
            assert outcome.task_id is not None
            assert outcome.path.read_bytes() == sim.result_bytes(outcome.task_id)
            assert outcome.billed_seconds == pytest.approx(2.0, abs=0.05)
            assert sim.ledger.auth_leaks() == []

    async def test_generate_with_bad_input_raises_before_any_request(self, tmp_path: Path) -> None:
        image = make_portrait(tmp_path / "small.png", size=(300, 300))
        audio = make_voice_wav(tmp_path / "long.wav", 61.0)
        async with Simulator(sim_config()) as sim:
            async with client_for(sim) as client:
                with pytest.raises(emo_async.InputError) as info:
                    await client.generate(image, audio, tmp_path / "x.mp4", style_level="loud")
            fields = sorted(p.field for p in info.value.problems)
            assert fields == ["audio", "image", "style_level"]
            assert sim.ledger.count() == 0

    async def test_many_waiters_share_one_poller(self, tmp_path: Path) -> None:
        [job] = make_sample_set(tmp_path / "in", 1)
        async with Simulator(sim_config(time_scale=0.01)) as sim:
            async with client_for(sim) as client:
                image = await client.upload(job.image)
                audio = await client.upload(job.audio)
                det = await client.detect(await client.upload(job.image, model="emo-detect-v1"))
                assert det.face_bbox
                assert det.ext_bbox
                tasks = [
                    await client.submit(
                        image, audio, face_bbox=det.face_bbox, ext_bbox=det.ext_bbox
                    )
                    for _ in range(25)
                ]
                results: list[emo_async.Task] = []

                async def wait_one(t: emo_async.Task) -> None:
                    results.append(await client.wait(t.task_id))

                async with anyio.create_task_group() as tg:
                    for t in tasks:
                        tg.start_soon(wait_one, t)
                assert all(r.succeeded and r.video_url for r in results)
            queries = sim.ledger.count("task_get") + sim.ledger.count("task_list")
            assert queries <= 2 * len(tasks)
