"""Attacks on the fixes of commit 9cf2b44 (issue 17): a lost submit waits for our POSTs still
out (``Flight``) and for our other lost submits before it adopts; candidates of submits left
unresolved are ``reserved``; an unresolved submit keeps every unexplained finished task of its
proof window.

The fixes see the POSTs and lost submits of *one batch* (its reconciler). These tests put our
other billed POSTs where that reconciler cannot see them, though the client can: another batch
of a client sharing this one's task registry (two clients in one process, a documented setup),
and a lost answer the client noted in an earlier, cancelled call (no journal). And one attack on
the reserving: a resumed unresolved job against its own candidates.

Every money check is :func:`check_money` (or its several-batch form here): one task per job's
audio, each saved file its own job's video, every task of ours saved or kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from test_batch import client_for, sha, sim_config
from test_break_pipelined import AnswerEater, check_money, relay_client

import emo_async
from emo_async import OutcomeState, Timeouts
from emo_async._samples import make_sample_set
from emo_async.simulator import FaultConfig, Simulator

pytestmark = pytest.mark.anyio


def check_money_many(
    sim: Simulator,
    batches: list[tuple[list[emo_async.Job], list[emo_async.Outcome], Path]],
    label: str = "",
) -> dict[str, Any]:
    """:func:`check_money` for several batches on one account: every task of ours is some
    batch's, saved for its job or kept in that batch's ``.unattributed/``."""
    audio_of: dict[int, dict[str, str]] = {}
    for n, (jobs, outcomes, _) in enumerate(batches):
        names = sorted(o.job.display_name for o in outcomes)
        assert names == sorted(j.display_name for j in jobs), f"{label}: batch {n}: outcomes"
        audio_of[n] = {j.display_name: sha(Path(j.audio).read_bytes()) for j in jobs}
    mine = [t for t in sim.ledger.tasks_created if t.task_id not in sim.ledger.foreign_tasks]
    by_audio: dict[str, list[str]] = {}
    for t in mine:
        by_audio.setdefault(sim.ledger.task_inputs(t.task_id).audio_sha256, []).append(t.task_id)
    twice = {a: ids for a, ids in by_audio.items() if len(ids) > 1}
    problems: list[str] = []
    if twice:
        problems.append(f"billed twice: {twice}")
    saved: dict[str, str] = {}
    kept: set[str] = set()
    for n, (_, outcomes, out) in enumerate(batches):
        for o in outcomes:
            if o.state != OutcomeState.DONE:
                continue
            assert o.task_id is not None
            assert o.path is not None
            made_from = sim.ledger.task_inputs(o.task_id).audio_sha256
            if made_from != audio_of[n][o.job.display_name]:
                problems.append(
                    f"batch {n}: {o.job.display_name} saved task {o.task_id}, made from other audio"
                )
            assert o.path.read_bytes() == sim.result_bytes(o.task_id)
            saved[o.task_id] = o.job.display_name
        for p in (out / ".unattributed").glob("*.mp4"):
            assert p.read_bytes() == sim.result_bytes(p.stem)
            kept.add(p.stem)
    abandoned = [t.task_id for t in mine if t.task_id not in saved and t.task_id not in kept]
    if abandoned:
        problems.append(f"paid videos abandoned: {abandoned}")
    assert not problems, f"{label}: " + "; ".join(problems)
    return {"tasks": len(mine), "kept": len(kept)}


def audio_sha(job: emo_async.Job) -> str:
    return sha(Path(job.audio).read_bytes())


def named(jobs: list[emo_async.Job], prefix: str) -> list[emo_async.Job]:
    return [attrs.evolve(j, name=f"{prefix}-{i:02d}") for i, j in enumerate(jobs, 1)]


async def test_two_clients_in_one_process_a_held_post_of_the_other_is_not_adopted(
    tmp_path: Path,
) -> None:
    """Two clients on one account in one process (docs/processes.md: they share one task
    registry, "so a task one of them created is never a stranger to another"), each running a
    batch. Batch 1's only job A has its POST cut before it reaches the server (no task). Just
    after, batch 2's first job B (same audio duration as A) has its task created and its
    answer held by a middlebox until the client times out. Batch 1's reconciler sees B's
    finished task in A's window, billed for A's duration, with no Flight of its own that may
    have made it: A adopts it (B's clip saved as A's). B then times out; the task list shows
    its task accounted for (adopted) and later submits of batch 2 witness the window: B is
    sent again (billed twice).

    Batch 2's other jobs are 2.0 s long: billed for clearly other audio than A's, they stand in
    nobody's way. Seen (every run): ``A-01: adopted task T`` then ``B-01: sending again``; the
    ledger holds two tasks made from B-01's audio, and A-01's file is T, made from B-01's."""
    a = named(make_sample_set(tmp_path / "a", 1, seconds=(1.0, 1.0), seed=31), "A")
    b = named(make_sample_set(tmp_path / "b", 1, seconds=(1.0, 1.0), seed=32), "B")
    rest = named(make_sample_set(tmp_path / "c", 30, portraits=2, seconds=(2.0, 2.0), seed=33), "C")
    jobs2 = b + rest
    assert len({audio_sha(j) for j in a + jobs2}) == len(a + jobs2)
    out1, out2 = tmp_path / "out1", tmp_path / "out2"
    config = sim_config(
        faults=FaultConfig(latency=0.15), processing_base=2.0, processing_per_audio_second=1.0
    )
    # Submit 1 is A's (batch 1 has no other job), submit 2 B's (batch 2 starts once A's POST is
    # out, and prepares one job at a time).
    actions: dict[int, tuple[Any, ...]] = {1: ("drop", 2.0), 2: ("hold",)}
    results: dict[int, list[emo_async.Outcome]] = {}
    async with Simulator(config) as sim, AnswerEater(sim.base_url, actions) as relay:
        async with (
            relay_client(sim, relay) as c1,
            relay_client(sim, relay, timeouts=Timeouts(connect=5.0, read=5.0, total=4.0)) as c2,
        ):
            assert c1.owned is c2.owned  # one registry: the promise under attack

            async def batch1() -> None:
                results[1] = await c1.run_batch_all(a, out1, max_tasks=5)

            async def batch2() -> None:
                while relay.submits < 1:
                    await anyio.sleep(0.005)
                results[2] = await c2.run_batch_all(jobs2, out2, max_tasks=5, prepare_concurrency=1)

            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(batch1)
                    tg.start_soon(batch2)
        assert relay.submits >= len(a) + len(jobs2)
        check_money_many(
            sim, [(a, results[1], out1), (jobs2, results[2], out2)], "two clients, one process"
        )


async def test_a_lost_answer_left_by_a_cancelled_call_is_not_adopted_by_another(
    tmp_path: Path,
) -> None:
    """No journal; one client. Call 1: A's POST never reaches the server, F's (sent just after,
    same duration) creates its task T and loses its answer. Both are being settled (F waits:
    A's POST is a Flight that may have made T) when the caller cancels the call; the client
    keeps both lost answers noted (``OwnedTasks.note_lost``) so that a later call settles them
    first instead of sending again blindly.

    Call 2 runs the jobs again, one task at a time, A first and F last. A's lost answer is
    settled at once: T is the only unknown task in its window billed for its duration, and
    nothing in this call's reconciler says F's lost POST may have made it (F's job has not come
    up yet). A adopts T: F's clip saved as A's. When F comes up, T is ours and accounted for,
    and this call's submits witness F's window: F is sent again (billed twice).

    Seen (every run): ``J-03: adopted task T`` (A) then ``J-04: sending again: the task list
    provably shows no task of this job`` (F); the ledger holds two tasks made from J-04's audio.
    """
    base = named(make_sample_set(tmp_path / "in", 8, portraits=2, seconds=(1.0, 1.0), seed=41), "J")
    p1, p2, a, f, p5, p6, x1, x2 = base
    # No journal: the second call writes elsewhere (it follows the first call's tasks).
    out, out2 = tmp_path / "out", tmp_path / "out2"
    config = sim_config(
        faults=FaultConfig(latency=0.15), processing_base=2.0, processing_per_audio_second=1.0
    )
    actions: dict[int, tuple[Any, ...]] = {3: ("drop", 0.5), 4: ("cut",)}
    async with Simulator(config) as sim, AnswerEater(sim.base_url, actions) as relay:
        async with relay_client(sim, relay) as client:
            seen: list[str] = []
            with anyio.CancelScope() as scope:

                def on_event(event: emo_async.BatchEvent) -> None:
                    seen.append(str(event.kind))
                    if seen.count("reconciling") == 2:
                        scope.cancel()

                with anyio.fail_after(30):
                    await client.run_batch_all(
                        [p1, p2, a, f, p5, p6],
                        out,
                        journal=False,
                        max_tasks=6,
                        prepare_concurrency=1,
                        on_event=on_event,
                    )
            assert seen.count("reconciling") == 2, seen
            # Both lost answers are noted by the client, to be settled by a later call.
            assert len(client.owned._lost) == 2
            jobs2 = [a, p1, p2, x1, x2, p5, p6, f]
            with anyio.fail_after(60):
                outcomes = await client.run_batch_all(
                    jobs2, out2, journal=False, max_tasks=1, prepare_concurrency=1
                )
        check_money(sim, jobs2, outcomes, out2, "lost answers left by a cancelled call")


async def test_a_later_run_settles_an_unresolved_job_whose_task_is_alone_in_its_window(
    tmp_path: Path,
) -> None:
    """Run 1 (the attack of ``test_a_task_created_after_the_give_up_is_kept_when_not_resent``):
    A's POST is held 0.7 s on the way and the client gives up at 0.5 s; its task T is created
    after the give-up, the job ends unresolved and T, now a candidate, is kept. Money is safe.

    Run 2, on the same out dir, without faults: the journal resumes A with the window from its
    intent to this run's start. T is the only task in it we cannot account for, billed for A's
    audio, and A the only lost submit it matches: proof of identity by the rule (a later run
    "tries again", docs/journal.md). But the run loads every journal candidate as ``reserved``
    (claimed by an unresolved submit), A's own included, so T counts as claimed twice and A
    ends unresolved again ("task T matches this job and another lost submit"), forever.

    Seen (every run): run 2's A outcome ``unresolved``, candidates [T], T made from A's audio."""
    jobs = make_sample_set(tmp_path / "in", 20, portraits=2, seconds=(1.0, 1.0), seed=11)
    out = tmp_path / "out"
    config = sim_config(
        faults=FaultConfig(latency=0.15), processing_base=2.0, processing_per_audio_second=1.0
    )
    async with Simulator(config) as sim:
        async with AnswerEater(sim.base_url, {3: ("delay", 0.7, 0.25, 0.5)}) as relay:
            timeouts = Timeouts(connect=5.0, read=5.0, total=0.5)
            async with relay_client(sim, relay, timeouts=timeouts) as client:
                with anyio.fail_after(60):
                    first = await client.run_batch_all(jobs, out, max_tasks=20)
        check_money(sim, jobs, first, out, "run 1")
        [left] = [o for o in first if o.state == OutcomeState.UNRESOLVED]
        audio = audio_sha(left.job)
        [task] = [
            t.task_id
            for t in sim.ledger.tasks_created
            if sim.ledger.task_inputs(t.task_id).audio_sha256 == audio
        ]
        assert (out / ".unattributed" / f"{task}.mp4").exists()
        async with client_for(sim) as client:
            with anyio.fail_after(60):
                second = await client.run_batch_all(jobs, out, max_tasks=20)
        check_money(sim, jobs, second, out, "run 2")
        [again] = [o for o in second if o.job.display_name == left.job.display_name]
        assert (again.state, again.task_id) == (OutcomeState.DONE, task), again


async def test_resumed_intents_settled_one_at_a_time_do_not_adopt_each_others_task(
    tmp_path: Path,
) -> None:
    """The journal (the default) after a run left with two lost answers being settled: A's
    POST never reached the server, F's (same duration, sent just after) made task T. Both are
    open intents; three longer jobs S1-S3 are submitted, their tasks still running.

    Run 2, on the same out dir, one task at a time (``max_tasks=1``). The resumer walks the
    records in register order: an intent starts settling (after it takes a task slot), a
    submitted job takes a slot *in the walk itself*, so the walk waits at S2 and S3 for the
    slots of S1 and S2. A gets its slot when S2 ends, gives it back at once and is pending
    alone; F's settling has not even started (the walk is waiting for S3). Nothing tells A's
    reconciler that F's lost POST may have made T (no Flight, no pending lost submit): T is the
    only unknown task in A's window billed for A's audio, and A adopts it. F, settled once S3
    ends, finds T ours and ends unresolved: F's clip saved as A's.

    Seen (every run): ``J-01: adopted task T (… the only unknown task in the submit window
    billed 1.0 s for 1.0 s of audio)``, then ``J-05: not resent … (no later task of ours bounds
    the window yet)``; the ledger says T was made from J-05's (F's) audio."""
    pair = make_sample_set(tmp_path / "w", 2, seconds=(1.0, 1.0), seed=51)
    longer = [
        make_sample_set(tmp_path / f"s{i}", 1, seconds=(s, s), seed=52 + i)[0]
        for i, s in enumerate((8.0, 9.0, 10.0))
    ]
    # Register (and submit) order: A, S1, S2, S3, F.
    jobs = named([pair[0], *longer, pair[1]], "J")
    out = tmp_path / "out"
    # Tasks take 0.6 s + 0.4 s per second of audio (real time): A's and F's 1 s, S's 3.8-4.6 s.
    config = sim_config(
        faults=FaultConfig(latency=0.15), processing_base=300.0, processing_per_audio_second=200.0
    )
    actions: dict[int, tuple[Any, ...]] = {1: ("drop", 2.5), 5: ("cut",)}
    async with Simulator(config) as sim:
        async with AnswerEater(sim.base_url, actions) as relay:
            async with relay_client(sim, relay) as client:
                seen: list[str] = []
                with anyio.CancelScope() as scope:

                    def on_event(event: emo_async.BatchEvent) -> None:
                        seen.append(str(event.kind))
                        if seen.count("reconciling") == 2:
                            scope.cancel()

                    with anyio.fail_after(30):
                        await client.run_batch_all(
                            jobs,
                            out,
                            max_tasks=10,
                            submit_concurrency=5,
                            prepare_concurrency=1,
                            on_event=on_event,
                        )
            assert seen.count("reconciling") == 2, seen
            assert relay.submits == 5
        async with client_for(sim) as client:
            with anyio.fail_after(60):
                outcomes = await client.run_batch_all(jobs, out, max_tasks=1)
        check_money(sim, jobs, outcomes, out, "resumed intents one at a time")


async def test_concurrent_generate_calls_do_not_adopt_each_others_task(tmp_path: Path) -> None:
    """Two ``generate()`` calls at once on one client (the web-app case of docs/processes.md).
    Call A's POST is cut before it reaches the server (no task); call B's, sent just after with
    audio of the same duration, creates its task T and its answer is held by a middlebox until
    the client times out. A's lost answer is settled by A's own reconciler, which knows only
    A's POST: T is finished, the only unknown task in A's window, billed for A's duration, and
    A adopts it: B's clip saved as A's file. B, timed out, finds T ours and ends unresolved.

    Seen (every run): A's outcome ``done`` with task T, B's ``unresolved``; the ledger says T
    was made from B's audio."""
    [a, b] = make_sample_set(tmp_path / "in", 2, portraits=2, seconds=(1.0, 1.0), seed=61)
    out = tmp_path / "out"
    out.mkdir()
    config = sim_config(
        faults=FaultConfig(latency=0.15), processing_base=2.0, processing_per_audio_second=1.0
    )
    actions: dict[int, tuple[Any, ...]] = {1: ("drop", 2.0), 2: ("hold",)}
    outcomes: list[emo_async.Outcome] = []
    async with Simulator(config) as sim, AnswerEater(sim.base_url, actions) as relay:
        timeouts = Timeouts(connect=5.0, read=5.0, total=4.0)
        async with relay_client(sim, relay, timeouts=timeouts) as client:

            async def call(job: emo_async.Job, name: str, after: int) -> None:
                while relay.submits < after:
                    await anyio.sleep(0.005)
                outcomes.append(await client.generate(job.image, job.audio, out / f"{name}.mp4"))

            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(call, a, "A", 0)
                    tg.start_soon(call, b, "B", 1)
        assert relay.submits >= 2
        jobs = [attrs.evolve(a, name="A"), attrs.evolve(b, name="B")]
        check_money(sim, jobs, outcomes, out, "concurrent generate() calls")


@pytest.mark.parametrize("seed", [71, 72])
async def test_waiting_on_flights_does_not_starve_adoption(tmp_path: Path, seed: int) -> None:
    """Liveness of the Flight wait: three lost answers whose tasks exist (their answers cut),
    amid a steady stream of POSTs of the same audio duration with slow, jittered answers
    (0.2-0.6 s: four to six POSTs out at any time, each a Flight that may have made any task
    created after it was sent). Only POSTs sent before a lost submit's task was created can
    hold its adoption, and each is answered within its latency: every lost submit is adopted,
    soon, and none is left unresolved."""
    jobs = make_sample_set(tmp_path / "in", 36, portraits=2, seconds=(1.0, 1.0), seed=seed)
    out = tmp_path / "out"
    faults = FaultConfig(seed=seed, latency=0.2, latency_jitter=0.4)
    config = sim_config(faults=faults, processing_base=2.0, processing_per_audio_second=1.0)
    lost_at: dict[str, float] = {}
    adopted_after: dict[str, float] = {}

    def on_event(event: emo_async.BatchEvent) -> None:
        now = anyio.current_time()
        if event.kind == "reconciling":
            lost_at[event.name] = now
        elif event.kind == "adopted":
            adopted_after[event.name] = now - lost_at[event.name]

    async with Simulator(config) as sim:
        # Twelve submits apart (over a second at 10/s): the lost submits' windows do not overlap
        # (lost submits whose windows overlap cannot tell their equal tasks apart: unresolved).
        actions: dict[int, tuple[Any, ...]] = {5: ("cut",), 17: ("cut",), 29: ("cut",)}
        async with AnswerEater(sim.base_url, actions) as relay:
            async with relay_client(sim, relay) as client:
                with anyio.fail_after(60):
                    outcomes = await client.run_batch_all(
                        jobs, out, max_tasks=36, submit_concurrency=8, on_event=on_event
                    )
        figures = check_money(sim, jobs, outcomes, out, f"flights seed {seed}")
    assert len(lost_at) == 3, lost_at
    why = {o.job.display_name: str(o.error) for o in outcomes if o.state != OutcomeState.DONE}
    assert figures["states"] == {"done": 36}, (figures, why, lost_at, adopted_after)
    # The wait is bounded by the answers still out (under a second here), not by the stream.
    assert sorted(adopted_after) == sorted(lost_at)
    assert max(adopted_after.values()) < 3.0, adopted_after
    print(f"\nseed {seed}: adopted after {sorted(round(v, 2) for v in adopted_after.values())} s")
