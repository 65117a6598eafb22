"""Unresolved jobs through the command line (``run``, ``status``, ``resolve``) and
``--rebill-expired``: the real ``python -m emo_async`` in a subprocess, against a simulator on
loopback and a real journal file."""

from __future__ import annotations

import csv
import json
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from test_cli import KEY, cli, connection, outputs, text, write_manifest

from emo_async import make_sample_set
from emo_async.simulator import FaultConfig, Simulator, SimulatorConfig

pytestmark = pytest.mark.anyio

CLIP_SECONDS = 2.0


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    config = SimulatorConfig(api_keys={KEY}, time_scale=0.002, policy_ttl=1e6)
    async with Simulator(config) as simulator:
        yield simulator


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    """One job, "first", whose voice lasts exactly CLIP_SECONDS."""
    folder = tmp_path / "media"
    make_sample_set(folder, 1, portraits=1, seconds=(CLIP_SECONDS, CLIP_SECONDS), seed=5)
    return write_manifest(folder, [["portrait-01.png", "clip-0001.wav", "first"]])


def submits(sim: Simulator) -> int:
    return sum(1 for r in sim.ledger.requests if r.endpoint == "submit")


def report_rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


async def unresolved_run(sim: Simulator, manifest: Path, out: Path, *extra: str | Path) -> str:
    """A run whose only submit is lost before any task exists: the job ends unresolved."""
    sim.set_faults(FaultConfig(seed=1, lost_before_submit_rate=1.0))
    result = await cli("run", manifest, "--out", out, *connection(sim), *extra)
    sim.set_faults(FaultConfig())
    assert result.returncode == 1, text(result)
    assert submits(sim) == 1
    assert sim.ledger.tasks_created == []
    return result.stdout.decode()


async def two_candidates(
    sim: Simulator, manifest: Path, out: Path, *extra: str | Path
) -> list[str]:
    """An unresolved job with two candidate tasks (their videos kept); their ids."""
    await unresolved_run(sim, manifest, out)
    # Two clips of another program, of this job's length, made after the lost submit and
    # before the next run: either may be this job's (one alone would be adopted as its own).
    foreign = sorted(sim.create_foreign_task(audio_seconds=CLIP_SECONDS) for _ in range(2))
    await anyio.sleep(0.3)  # they finish
    again = await cli("run", manifest, "--out", out, *connection(sim), *extra)
    assert again.returncode == 1, text(again)
    assert submits(sim) == 1  # never sent again
    return foreign


class TestUnresolvedRun:
    async def test_summary_report_and_exit_status(
        self, sim: Simulator, manifest: Path, tmp_path: Path
    ) -> None:
        out, report = tmp_path / "out", tmp_path / "r.csv"
        stdout = await unresolved_run(sim, manifest, out, "--report", report)
        [row] = report_rows(report)
        assert row["state"] == "unresolved"
        assert row["error_kind"] == "UnresolvedSubmitError"
        assert "no candidate task seen" in row["error_message"]
        assert "  unresolved 1" in stdout
        [progress] = [line for line in stdout.splitlines() if "1/1 finished" in line][-1:]
        assert " · unresolved 1 · " in progress
        last = stdout.strip().splitlines()[-1]
        assert last.startswith("unresolved (1): may have been billed, not sent again")
        assert f"emo-async status {out}" in last
        assert f"emo-async resolve {out} JOB --task TASK_ID" in last

    async def test_jsonl_report_names_the_candidates(
        self, sim: Simulator, manifest: Path, tmp_path: Path
    ) -> None:
        out, report = tmp_path / "out", tmp_path / "r.jsonl"
        foreign = await two_candidates(sim, manifest, out, "--report", report)
        [record] = [json.loads(line) for line in report.read_text().splitlines()]
        assert record["state"] == "unresolved"
        assert "candidate tasks: " in record["error_message"]
        for task in foreign:
            assert task in record["error_message"]
            assert (out / ".unattributed" / f"{task}.mp4").is_file()


class TestStatusAndResolve:
    async def test_status_lists_it_and_resolve_assigns_a_task_the_next_run_downloads(
        self, sim: Simulator, manifest: Path, tmp_path: Path
    ) -> None:
        out = tmp_path / "out"
        await unresolved_run(sim, manifest, out)
        status = await cli("status", out)
        assert status.returncode == 0, text(status)
        shown = status.stdout.decode()
        assert "unresolved, may have been billed, not sent again (1):" in shown
        assert "first: unresolved" in shown
        assert "emo-async resolve" in shown
        as_json = await cli("status", out, "--json")
        [job] = json.loads(as_json.stdout)["unresolved"]
        assert job["name"] == "first"
        assert job["candidates"] == []

        # Settled by hand: the person knows this task is the job's (here, one made for it).
        task = sim.create_foreign_task(audio_seconds=CLIP_SECONDS)
        api = ["--base-url", sim.base_url, "--api-key-env", "EMO_TEST_KEY"]
        done = await cli("resolve", out, "first", "--task", task, *api)
        assert done.returncode == 0, text(done)
        [line] = done.stdout.decode().splitlines()
        assert f"first: task {task} assigned (was unresolved)" in line
        assert "submitted 1" in (await cli("status", out)).stdout.decode()

        # The next run follows the task and saves its video; nothing is submitted.
        final = await cli("run", manifest, "--out", out, *connection(sim))
        assert final.returncode == 0, text(final)
        assert outputs(out) == ["first.mp4"]
        assert (out / "first.mp4").read_bytes() == sim.result_bytes(task)
        assert submits(sim) == 1

    async def test_release_and_refusals(
        self, sim: Simulator, manifest: Path, tmp_path: Path
    ) -> None:
        out = tmp_path / "out"
        foreign, other = await two_candidates(sim, manifest, out)
        shown = (await cli("status", out)).stdout.decode()
        for task in (foreign, other):
            assert f"saved .unattributed/{task}.mp4" in shown

        async def refused(*args: str | Path) -> str:
            result = await cli("resolve", out, *args)
            assert result.returncode == 2, text(result)
            assert result.stdout == b""
            [line] = result.stderr.decode().splitlines()
            return line

        assert "no job named 'nobody'" in await refused("nobody", "--task", foreign)
        assert "is no job's candidate" in await refused("--release", "t-never-issued")
        assert "unknown to the API" in await refused(
            "first",
            "--task",
            "3f0b2c1e-0000-4000-8000-000000000000",
            "--base-url",
            sim.base_url,
            "--api-key-env",
            "EMO_TEST_KEY",
        )

        released = await cli("resolve", out, "first", "--release", foreign)
        assert released.returncode == 0, text(released)
        [line] = released.stdout.decode().splitlines()
        assert f"task {foreign} released: no longer a candidate of first" in line
        assert f".unattributed/{foreign}.mp4" in line  # the paid video is not deleted
        assert (out / ".unattributed" / f"{foreign}.mp4").is_file()
        shown = (await cli("status", out)).stdout.decode()
        assert "first: unresolved" in shown
        assert foreign not in shown
        assert f"candidates: {other}" in shown

        # The other candidate is the job's: assigned offline (no API call for a candidate).
        taken = await cli("resolve", out, "first", "--task", other)
        assert taken.returncode == 0, text(taken)
        [line] = taken.stdout.decode().splitlines()
        assert f"first: task {other} assigned (was unresolved)" in line
        assert f"the copy kept earlier stays at .unattributed/{other}.mp4" in line
        final = await cli("run", manifest, "--out", out, *connection(sim))
        assert final.returncode == 0, text(final)
        assert (out / "first.mp4").read_bytes() == sim.result_bytes(other)
        assert submits(sim) == 1
        assert "is no job's candidate" in await refused("--release", foreign)


class TestRebillExpired:
    async def test_expired_is_not_paid_again_unless_asked(
        self, manifest: Path, tmp_path: Path
    ) -> None:
        out = tmp_path / "out"
        # The URL lives 1,500 simulated seconds: 3 s at this time scale.
        config = SimulatorConfig(
            api_keys={KEY}, time_scale=0.002, policy_ttl=1e6, result_ttl=1500.0
        )
        async with Simulator(config) as sim:
            first = await cli("run", manifest, "--out", out, *connection(sim))
            assert first.returncode == 0, text(first)
            (out / "first.mp4").unlink()
            await anyio.sleep(3.5)
            again = await cli("run", manifest, "--out", out, *connection(sim))
            assert again.returncode == 1, text(again)
            said = again.stdout.decode()
            assert "  expired    1" in said
            assert "not paid for again unless you run with --rebill-expired" in said
            assert "the same command" not in said
            assert submits(sim) == 1
            paid = await cli("run", manifest, "--out", out, "--rebill-expired", *connection(sim))
            assert paid.returncode == 0, text(paid)
            assert submits(sim) == 2
            assert outputs(out) == ["first.mp4"]


class TestSubmitConcurrency:
    async def test_zero_is_refused_and_more_runs(
        self, sim: Simulator, manifest: Path, tmp_path: Path
    ) -> None:
        out = tmp_path / "out"
        bad = await cli("run", manifest, "--out", out, "--submit-concurrency", "0")
        assert bad.returncode == 2, text(bad)
        assert "--submit-concurrency: must be >= 1" in bad.stderr.decode()
        ok = await cli("run", manifest, "--out", out, "--submit-concurrency", "3", *connection(sim))
        assert ok.returncode == 0, text(ok)
        assert outputs(out) == ["first.mp4"]
