"""Several workers on one batch shared through PostgreSQL (a real server), against the
simulator over loopback: no task twice at the simulator's ledger, one verified file per job,
a dead worker's jobs taken over after its lease, lost answers settled without adopting another
worker's task.

Each worker stands for a process of its own: its own Client, journal and pool, and (see
``separate``) no registry of created tasks shared with the others in this test process.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest
from test_batch import check_done, client_for, sha, sim_config

import emo_async
from emo_async import OutcomeState
from emo_async._owned import account_registry
from emo_async._samples import make_sample_set
from emo_async.simulator import FaultConfig, Simulator

pytestmark = pytest.mark.anyio

BATCH = "lessons"


@pytest.fixture(autouse=True)
def separate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients of one process share what they created (so none adopts another's task);
    workers of a shared batch are separate processes, and must learn it from the journal."""
    monkeypatch.setattr(account_registry, "acquire", lambda base, key, mine: mine)
    monkeypatch.setattr(account_registry, "release", lambda base, key: None)


async def work(
    sim: Simulator,
    dsn: str,
    out: Path,
    jobs: list[emo_async.Job] | tuple[()] = (),
    **kw: Any,
) -> list[emo_async.Outcome]:
    kw.setdefault("max_tasks", 8)
    kw.setdefault("lease", 1.5)
    async with client_for(sim) as client:
        return await client.run_batch_all(jobs, out, journal=dsn, batch=BATCH, **kw)


def by_job(outcomes: list[emo_async.Outcome]) -> Counter[str]:
    return Counter(o.job.display_name for o in outcomes)


def videos(outs: list[Path]) -> Counter[str]:
    return Counter(p.stem for out in outs for p in out.glob("*.mp4"))


async def test_three_workers_share_a_batch_without_duplicates(tmp_path: Path, pg_dsn: str) -> None:
    jobs = make_sample_set(tmp_path / "in", 60, portraits=3, seconds=(0.5, 1.5))
    outs = [tmp_path / f"out{i}" for i in range(3)]
    results: list[list[emo_async.Outcome]] = [[], [], []]
    async with Simulator(sim_config()) as sim:

        async def one(i: int) -> None:
            # Every worker enqueues the same manifest: the batch holds each job once.
            results[i] = await work(sim, pg_dsn, outs[i], jobs)

        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(one, i)
        outcomes = [o for r in results for o in r]
        check_done(sim, outcomes)
        assert by_job(outcomes) == Counter(j.display_name for j in jobs)
        assert sim.ledger.duplicate_tasks() == {}
        assert len(sim.ledger.tasks_created) == 60
        assert sim.ledger.max_running_observed <= 8  # the quota holds across workers
        assert videos(outs) == Counter(j.display_name for j in jobs)
        # The work was shared, not done by whoever came first.
        assert sum(1 for r in results if r) >= 2


async def test_a_dead_workers_jobs_are_finished_by_the_others(tmp_path: Path, pg_dsn: str) -> None:
    jobs = make_sample_set(tmp_path / "in", 60, portraits=3, seconds=(0.5, 1.5))
    outs = [tmp_path / f"out{i}" for i in range(3)]
    dead: list[emo_async.Outcome] = []
    alive: list[list[emo_async.Outcome]] = [[], []]
    async with Simulator(sim_config()) as sim:
        async with client_for(sim) as client:
            run = client.run_batch(jobs, outs[0], journal=pg_dsn, batch=BATCH, lease=1.0)
            async with run as outcomes:
                async for o in outcomes:
                    dead.append(o)
                    if len(dead) == 5:
                        # Killed: its claims stay until the lease runs out.
                        assert run.shared is not None
                        run.shared.release_on_exit = False
                        break
        left = await run_shared_status(pg_dsn, client)
        assert left > 0  # it died holding work

        async def one(i: int) -> None:
            alive[i] = await work(sim, pg_dsn, outs[i + 1], lease=1.0)

        async with anyio.create_task_group() as tg:
            for i in range(2):
                tg.start_soon(one, i)
        outcomes_all = dead + alive[0] + alive[1]
        check_done(sim, outcomes_all)
        ended = by_job(outcomes_all)
        assert max(ended.values()) == 1
        # The "killed" worker may have finished a few more jobs (saved and journaled) after
        # the outcome it stopped reading at: nobody read their outcomes, and no survivor ran
        # them again. Each is a saved video in its folder.
        unread = {j.display_name for j in jobs} - set(ended)
        assert all((outs[0] / f"{name}.mp4").is_file() for name in unread), unread
        assert len(unread) <= 8, unread
        assert sim.ledger.duplicate_tasks() == {}
        assert len(sim.ledger.tasks_created) == 60
        # The survivors saved each job at most once; a worker killed between saving a video
        # and recording it leaves that file in its own folder, and a survivor saves the same
        # video again (the same task's bytes, never a second task).
        assert set(videos(outs)) == {j.display_name for j in jobs}
        assert max(videos(outs[1:]).values()) == 1
        for name, count in videos(outs).items():
            if count > 1:
                copies = {sha(p.read_bytes()) for out in outs for p in out.glob(f"{name}.mp4")}
                assert len(copies) == 1, name


async def run_shared_status(dsn: str, client: emo_async.Client) -> int:
    """Jobs of the batch held by a claim right now."""
    from emo_async._batch._shared import account_fingerprint
    from emo_async._journal.postgres import PostgresJournal

    account = account_fingerprint(client.base_url, client.workspace, client._Client__key)  # type: ignore[attr-defined]
    async with await PostgresJournal.open(dsn, batch=BATCH, account=account) as journal:
        s = await journal.summary()
        return sum(s.by_phase[p] for p in ("new", "intent", "submitted", "finished"))


async def test_lost_answers_with_several_workers(tmp_path: Path, pg_dsn: str) -> None:
    jobs = make_sample_set(tmp_path / "in", 45, portraits=2, seconds=(0.5, 2.5))
    outs = [tmp_path / f"out{i}" for i in range(3)]
    results: list[list[emo_async.Outcome]] = [[], [], []]
    faults = FaultConfig(seed=7, ambiguous_submit_rate=0.25, error_rate={"submit": 0.05})
    async with Simulator(sim_config(faults=faults)) as sim:

        async def one(i: int) -> None:
            results[i] = await work(sim, pg_dsn, outs[i], jobs, max_tasks=10)

        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(one, i)
        assert any(r.fault for r in sim.ledger.requests if r.endpoint == "submit")
        outcomes = [o for r in results for o in r]
        assert {o.state for o in outcomes} <= {OutcomeState.DONE, OutcomeState.UNRESOLVED}
        done = [o for o in outcomes if o.state == OutcomeState.DONE]
        check_done(sim, done)
        for o in done:
            # No worker took another's task: every video was made from its own job's audio.
            assert o.task_id is not None
            assert sim.ledger.task_inputs(o.task_id).audio_sha256 == audio_sha(o.job)
        # Every task created is a job's video or kept as a candidate of an unresolved one.
        kept = {p.stem for out in outs for p in (out / ".unattributed").glob("*.mp4")}
        assert {t.task_id for t in sim.ledger.tasks_created} <= {o.task_id for o in done} | kept
        # An unresolved job given back by a worker that ended may be settled again by one
        # still running; no job is done twice, and none is left without an outcome.
        counts = by_job(outcomes)
        assert set(counts) == {j.display_name for j in jobs}, (
            Counter(j.display_name for j in jobs) - counts
        )
        assert by_job(done) == Counter(set(by_job(done)))
        assert sim.ledger.duplicate_tasks() == {}
        tasks = [o.task_id for o in outcomes if o.state == OutcomeState.DONE]
        assert len(tasks) == len(set(tasks))
        assert sum(o.state == OutcomeState.DONE for o in outcomes) >= 30


def audio_sha(job: emo_async.Job) -> str:
    return sha(Path(job.audio).read_bytes())


async def test_cli_run_and_work_share_a_batch(tmp_path: Path, pg_dsn: str) -> None:
    from test_cli import KEY, cli, connection, text

    from emo_async.simulator import SimulatorConfig

    jobs = make_sample_set(tmp_path / "in", 12, portraits=2, seconds=(0.5, 1.0))
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "image,audio,name\n" + "".join(f"{j.image},{j.audio},{j.display_name}\n" for j in jobs)
    )
    # A DSN with a password (the test server trusts anyone), which must never be shown.
    secret_dsn = pg_dsn.replace("postgresql://postgres@", "postgresql://postgres:hunter2-secret@")
    assert "hunter2-secret" in secret_dsn
    config = SimulatorConfig(api_keys={KEY}, time_scale=0.002, policy_ttl=1e6)
    async with Simulator(config) as sim:
        shared = ["--journal", secret_dsn, "--batch", BATCH, "--lease", "2", "-v"]
        results: dict[str, Any] = {}

        async def run() -> None:
            results["run"] = await cli(
                "run", manifest, "--out", tmp_path / "a", *shared, *connection(sim)
            )

        async def join() -> None:
            await anyio.sleep(1.0)
            results["work"] = await cli("work", "--out", tmp_path / "b", *shared, *connection(sim))

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            tg.start_soon(join)
        for name, result in results.items():
            assert result.returncode == 0, (name, text(result))
            assert "hunter2-secret" not in text(result)
        assert sim.ledger.duplicate_tasks() == {}
        assert len(sim.ledger.tasks_created) == 12
        assert videos([tmp_path / "a", tmp_path / "b"]) == Counter(j.display_name for j in jobs)
        assert f"shared batch {BATCH}" in text(results["work"])
        status = await cli("status", secret_dsn, "--batch", BATCH, *connection(sim)[:4], "--json")
        assert status.returncode == 0, text(status)
        assert "hunter2-secret" not in text(status)
        assert json.loads(status.stdout)["by_phase"]["done"] == 12


async def test_late_news_of_a_job_another_worker_finished_does_not_end_the_run(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A worker that lost its claim (cut off from the database) learns late that its task
    # ended, after the worker that took the job over saved it: that write is refused, and the
    # refusal must cost this worker nothing but a warning. A refused task id is still loud.
    import datetime as _dt

    from emo_async._batch._shared import PatientJournal
    from emo_async._journal.postgres import PostgresJournal

    now = _dt.datetime.now(_dt.UTC)
    async with await PostgresJournal.open(pg_dsn, batch=BATCH, account="acct") as raw:
        await raw.register("k1", emo_async.Job("a.png", "a.wav"))
        await raw.record_intent("k1", at=now)
        await raw.record_submitted("k1", "task-1", at=now)
        await raw.record_finished("k1", video_url="http://v/1", url_deadline=None, billed_seconds=1)
        await raw.record_done("k1", path="/out/a.mp4", size=1, sha256="0" * 64)
        with pytest.raises(emo_async.JournalError):
            await raw.record_finished(
                "k1", video_url="http://v/1", url_deadline=None, billed_seconds=1
            )
        late = PatientJournal(raw, patience=1.0)
        await late.record_finished(
            "k1", video_url="http://v/1", url_deadline=None, billed_seconds=1
        )
        await late.record_status("k1", "RUNNING")
        assert "moved on elsewhere" in caplog.text
        assert (await raw.get("k1")).phase.value == "done"  # type: ignore[union-attr]
        with pytest.raises(emo_async.JournalError):
            await late.record_submitted("k1", "task-2", at=now)


async def test_cli_cancel_takes_a_dsn(tmp_path: Path, pg_dsn: str) -> None:
    # Tasks of a shared batch still waiting on the server (the account runs one at a time,
    # slowly): `emo-async cancel DSN --batch` cancels the PENDING ones, records them as
    # cancelled, and leaves the running one alone.
    import datetime as _dt

    from test_cli import KEY, cli, connection, text

    from emo_async._journal.postgres import PostgresJournal
    from emo_async.simulator import SimulatorConfig

    config = SimulatorConfig(api_keys={KEY}, time_scale=1.0, max_running=1, policy_ttl=1e6)
    async with Simulator(config) as sim:
        task_ids = [sim.create_foreign_task(3.0) for _ in range(3)]
        async with client_for(sim) as client:
            account = client.account_digest()
        now = _dt.datetime.now(_dt.UTC)
        async with await PostgresJournal.open(pg_dsn, batch=BATCH, account=account) as journal:
            for i, task_id in enumerate(task_ids):
                key = f"k{i}"
                await journal.register(key, emo_async.Job(f"p{i}.png", f"v{i}.wav"))
                await journal.record_intent(key, at=now)
                await journal.record_submitted(key, task_id, at=now)
        secret_dsn = pg_dsn.replace("postgresql://postgres@", "postgresql://postgres:pw-secret@")
        result = await cli("cancel", secret_dsn, "--batch", BATCH, *connection(sim)[:4])
        assert result.returncode == 0, text(result)
        assert "pw-secret" not in text(result)
        states = {t: sim.tasks[t].status for t in task_ids}
        assert list(states.values()).count("CANCELED") == 2, states
        async with await PostgresJournal.open(pg_dsn, batch=BATCH, account=account) as journal:
            phases = sorted([(await journal.get(f"k{i}")).phase.value for i in range(3)])  # type: ignore[union-attr]
        assert phases == ["cancelled", "cancelled", "submitted"], phases
