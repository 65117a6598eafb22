"""Output names in a real batch and in generate(), against the simulator (issue 16).

A file in the output folder is never replaced unless the folder's journal says a job of this
batch saved it; an unusable destination is found before the billed POST; names do not depend on
which row happens to finish validating first.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import anyio
import pytest
from test_batch import sim_config as batch_sim_config
from test_cli import KEY, cli, connection, text, write_manifest

from emo_async import Client, InputError, Job, Limits, OutcomeState, PollPolicy, RetryPolicy
from emo_async._samples import make_portrait, make_voice_wav
from emo_async.simulator import Simulator, SimulatorConfig

pytestmark = pytest.mark.anyio


def sim_config(**kw: Any) -> SimulatorConfig:
    """test_batch's simulated account, accepting the CLI tests' key."""
    return batch_sim_config(api_keys={KEY}, **kw)


def client_for(sim: Simulator) -> Client:
    return Client(
        KEY,
        base_url=sim.base_url,
        limits=Limits(task_qps=40, submit_qps=200, detect_qps=40, policy_qps=100),
        poll=PollPolicy(target_delay=0.05),
        retry=RetryPolicy(attempts=8, wait_initial=0.02, wait_max=0.2),
    )


@pytest.fixture
def portrait(tmp_path: Path) -> Path:
    return make_portrait(tmp_path / "in" / "face.png", size=(600, 800))


def voice(tmp_path: Path, name: str, seconds: float) -> Path:
    return make_voice_wav(tmp_path / "in" / name, seconds)


class TestForeignFiles:
    """A file no journal records is never replaced, and nothing is paid for on its account."""

    async def test_a_users_file_is_kept_and_the_job_refused_before_any_spend(
        self, tmp_path: Path, portrait: Path
    ) -> None:
        out = tmp_path / "out"
        out.mkdir()
        (out / "intro.mp4").write_bytes(b"the user's own video")
        jobs = [
            Job(portrait, voice(tmp_path, "a.wav", 1.0), name="intro"),
            Job(portrait, voice(tmp_path, "b.wav", 1.0), name="outro"),
        ]
        async with Simulator(sim_config()) as sim:
            async with client_for(sim) as client:
                outcomes = await client.run_batch_all(jobs, out)
            by_name = {o.job.display_name: o for o in outcomes}
            assert by_name["outro"].state == OutcomeState.DONE
            refused = by_name["intro"]
            assert refused.state == OutcomeState.REJECTED
            assert refused.error is not None
            assert "intro.mp4" in refused.error.message
            assert "never replaced" in refused.error.message
            assert (out / "intro.mp4").read_bytes() == b"the user's own video"
            assert len(sim.ledger.tasks_created) == 1  # outro's only

    async def test_a_folder_at_the_name_is_found_before_the_post(
        self, tmp_path: Path, portrait: Path
    ) -> None:
        out = tmp_path / "out"
        (out / "intro.mp4").mkdir(parents=True)
        jobs = [Job(portrait, voice(tmp_path, "a.wav", 1.0), name="intro")]
        async with Simulator(sim_config()) as sim:
            async with client_for(sim) as client:
                [outcome] = await client.run_batch_all(jobs, out)
            assert outcome.state == OutcomeState.REJECTED
            assert outcome.error is not None
            assert "folder" in outcome.error.message
            assert sim.ledger.tasks_created == []

    async def test_its_own_file_from_an_earlier_run_is_skipped_not_refused(
        self, tmp_path: Path, portrait: Path
    ) -> None:
        out = tmp_path / "out"
        jobs = [Job(portrait, voice(tmp_path, "a.wav", 1.0), name="intro")]
        async with Simulator(sim_config()) as sim:
            async with client_for(sim) as client:
                [first] = await client.run_batch_all(jobs, out)
                [again] = await client.run_batch_all(jobs, out)
            assert first.state == again.state == OutcomeState.DONE
            assert again.path == first.path == out / "intro.mp4"
            assert len(sim.ledger.tasks_created) == 1


class TestGenerateDestination:
    """generate() refuses a destination it could not save to before anything is billed."""

    async def test_a_folder_as_dest_raises_before_the_post(
        self, tmp_path: Path, portrait: Path
    ) -> None:
        dest = tmp_path / "out" / "hi.mp4"
        dest.mkdir(parents=True)
        async with Simulator(sim_config()) as sim:
            async with client_for(sim) as client:
                with pytest.raises(InputError, match="is a folder") as info:
                    await client.generate(portrait, voice(tmp_path, "a.wav", 1.0), dest)
            assert [p.field for p in info.value.problems] == ["dest"]
            assert sim.ledger.tasks_created == []

    async def test_a_file_as_the_folder_raises_before_the_post(
        self, tmp_path: Path, portrait: Path
    ) -> None:
        (tmp_path / "blocker").write_bytes(b"")
        async with Simulator(sim_config()) as sim:
            async with client_for(sim) as client:
                with pytest.raises(InputError, match="not a folder"):
                    await client.generate(
                        portrait, voice(tmp_path, "a.wav", 1.0), tmp_path / "blocker" / "hi.mp4"
                    )
            assert sim.ledger.tasks_created == []

    async def test_two_calls_with_one_dest_pay_once(self, tmp_path: Path, portrait: Path) -> None:
        dest = tmp_path / "out" / "hi.mp4"
        audios = [voice(tmp_path, "a.wav", 1.0), voice(tmp_path, "b.wav", 1.5)]
        results: list[Any] = []
        async with Simulator(sim_config()) as sim:
            async with client_for(sim) as client:

                async def call(audio: Path) -> None:
                    try:
                        results.append(await client.generate(portrait, audio, dest))
                    except InputError as exc:
                        results.append(exc)

                async with anyio.create_task_group() as tg:
                    for audio in audios:
                        tg.start_soon(call, audio)
                # Once the first is over the destination is free again.
                again = await client.generate(portrait, audios[0], dest)
            refused = [r for r in results if isinstance(r, InputError)]
            done = [r for r in results if not isinstance(r, InputError)]
            assert len(refused) == 1
            assert len(done) == 1
            assert "already the destination of another generate()" in str(refused[0])
            assert done[0].ok
            assert again.ok
            # The repeat with the same inputs follows or re-creates one task: two in all at most,
            # never one for the refused call.
            assert len(sim.ledger.tasks_created) <= 2
            assert done[0].task_id in {t.task_id for t in sim.ledger.tasks_created}


class TestStableNames:
    """The first row with a name keeps it; a job whose inputs changed says when it cannot."""

    async def test_the_first_row_keeps_the_plain_name(self, tmp_path: Path, portrait: Path) -> None:
        # Each first row validates longer audio than its twin, so with names handed out as
        # validation ends, the later rows would win the plain names.
        jobs = []
        for i in range(3):
            jobs.append(Job(portrait, voice(tmp_path, f"long-{i}.wav", 40.0), name=f"clip{i}"))
            jobs.append(Job(portrait, voice(tmp_path, f"short-{i}.wav", 0.5), name=f"clip{i}"))
        async with Simulator(sim_config()) as sim:
            async with client_for(sim) as client:
                outcomes = await client.run_batch_all(jobs, tmp_path / "out", max_tasks=12)
        assert all(o.state == OutcomeState.DONE for o in outcomes)
        for o in outcomes:
            assert o.path is not None
            if Path(o.job.audio).name.startswith("long-"):
                assert o.path.name == f"{o.job.name}.mp4"
            else:
                assert o.path.name.startswith(f"{o.job.name}-")

    async def test_changed_inputs_with_the_old_file_kept_get_a_new_name_and_say_so(
        self, tmp_path: Path, portrait: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        out = tmp_path / "out"
        audio = voice(tmp_path, "a.wav", 1.0)
        job = Job(portrait, audio, name="intro")
        async with Simulator(sim_config()) as sim:
            async with client_for(sim) as client:
                [first] = await client.run_batch_all([job], out)
                old = (out / "intro.mp4").read_bytes()
                make_voice_wav(audio, 2.0)  # the row's audio is edited: a new job key
                with caplog.at_level(logging.WARNING, logger="emo_async.batch"):
                    [second] = await client.run_batch_all([job], out)
        assert first.path == out / "intro.mp4"
        assert second.state == OutcomeState.DONE
        assert second.path is not None
        assert second.path.name.startswith("intro-")
        assert (out / "intro.mp4").read_bytes() == old
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(second.path.name in m and "were its inputs changed" in m for m in warned)

    async def test_changed_inputs_with_the_old_file_deleted_keep_the_name(
        self, tmp_path: Path, portrait: Path
    ) -> None:
        out = tmp_path / "out"
        audio = voice(tmp_path, "a.wav", 1.0)
        job = Job(portrait, audio, name="intro")
        async with Simulator(sim_config()) as sim:
            async with client_for(sim) as client:
                await client.run_batch_all([job], out)
                (out / "intro.mp4").unlink()
                make_voice_wav(audio, 2.0)
                [second] = await client.run_batch_all([job], out)
            assert second.state == OutcomeState.DONE
            assert second.path == out / "intro.mp4"
            assert second.task_id is not None
            assert second.path.read_bytes() == sim.result_bytes(second.task_id)


class TestValidateAsRun:
    """validate reports duplicates and collisions the way run treats them."""

    @pytest.fixture
    def media(self, tmp_path: Path) -> Path:
        folder = tmp_path / "media"
        make_portrait(folder / "p.png", size=(600, 800))
        for i in range(3):
            make_voice_wav(folder / f"v{i}.wav", 1.0 + i / 2)
        return folder

    async def test_the_same_job_twice_is_a_problem(self, media: Path) -> None:
        manifest = write_manifest(
            media, [["p.png", "v0.wav", "a"], ["p.png", "v1.wav", "b"], ["p.png", "v0.wav", "a"]]
        )
        result = await cli("validate", manifest)
        assert result.returncode == 1, text(result)
        shown = result.stdout.decode()
        assert "row 4 (a): job: the same job appears twice in this batch (row 2)" in shown
        assert "estimate: 2 valid of 3 jobs" in shown

    async def test_a_shared_name_is_noted_where_run_puts_it(
        self, media: Path, tmp_path: Path
    ) -> None:
        manifest = write_manifest(media, [["p.png", "v0.wav", "x"], ["p.png", "v1.wav", "x"]])
        result = await cli("validate", manifest, "--json")
        assert result.returncode == 0, text(result)
        lines = [json.loads(line) for line in result.stdout.decode().splitlines()]
        [note] = [line for line in lines if line["type"] == "note"]
        assert note["row"] == 3
        saved_as = note["message"].split()[2].rstrip(":")
        async with Simulator(sim_config()) as sim:
            out = tmp_path / "out"
            run = await cli("run", manifest, "--out", out, *connection(sim))
            assert run.returncode == 0, text(run)
        assert sorted(p.name for p in out.glob("*.mp4")) == sorted(["x.mp4", saved_as])

    async def test_dry_run_refuses_a_foreign_file_like_run(
        self, media: Path, tmp_path: Path
    ) -> None:
        manifest = write_manifest(media, [["p.png", "v0.wav", "x"], ["p.png", "v1.wav", "y"]])
        out = tmp_path / "out"
        out.mkdir()
        (out / "y.mp4").write_bytes(b"mine")
        dry = await cli("run", manifest, "--out", out, "--dry-run")
        assert dry.returncode == 1, text(dry)
        assert "row 3 (y): name:" in dry.stdout.decode()
        assert "y.mp4 is already a file" in dry.stdout.decode()
        async with Simulator(sim_config()) as sim:
            run = await cli("run", manifest, "--out", out, *connection(sim))
            assert run.returncode == 1, text(run)
            assert len(sim.ledger.tasks_created) == 1
        assert (out / "y.mp4").read_bytes() == b"mine"
