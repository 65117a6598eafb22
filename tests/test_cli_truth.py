"""The command line tells the truth (issue 16): it stops at once when the API cannot be used,
and the progress display, the summary and the report agree and account for every row.

Whole sessions run through a real terminal (a pty, see ``_pty``) against the simulator, so the
live rich display and the summary table are what a person sees.
"""

from __future__ import annotations

import csv
import re
import socket
import time
from collections import Counter
from pathlib import Path

import anyio
import attrs
import pytest
from _pty import Terminal
from test_cli import KEY, _env, cli, connection, text, write_manifest

from emo_async import make_sample_set
from emo_async.simulator import Simulator, SimulatorConfig
from emo_async.simulator._app import SIM_KEY

pytestmark = pytest.mark.anyio

STATES = ("done", "failed", "rejected", "expired", "cancelled", "unresolved", "pending")


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    """Eight jobs over two portraits and eight short voices."""
    folder = tmp_path / "media"
    make_sample_set(folder, 8, portraits=2, seconds=(1.0, 2.0), seed=7)
    rows = [[f"portrait-0{1 + i % 2}.png", f"clip-{i + 1:04d}.wav", f"v{i}"] for i in range(8)]
    return write_manifest(folder, rows)


def read_report(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def progress_counts(screen: str) -> dict[str, int]:
    """The live display's last drawing: finished, and each outcome count."""
    bars = re.findall(r"(\d+)/(\d+)\s+elapsed", screen)
    assert bars, screen
    lines = re.findall(
        r"(?:pending (\d+)\s+)?done (\d+)(?: \(\d+ earlier\))?\s+failed (\d+)\s+rejected (\d+)",
        screen,
    )
    assert lines, screen
    pending, done, failed, rejected = lines[-1]
    return {
        "finished": int(bars[-1][0]),
        "total": int(bars[-1][1]),
        "pending": int(pending or 0),
        "done": int(done),
        "failed": int(failed),
        "rejected": int(rejected),
    }


def summary_counts(screen: str) -> dict[str, int]:
    """The summary table's counts (failed = failed + expired + cancelled, as displayed)."""
    found = dict(re.findall(r"│\s*(" + "|".join(STATES) + r")\s*│\s*(\d+)", screen))
    assert "done" in found, screen
    n = {s: int(found.get(s, 0)) for s in STATES}
    return {
        "done": n["done"],
        "failed": n["failed"] + n["expired"] + n["cancelled"],
        "rejected": n["rejected"],
        "pending": n["pending"],
    }


def report_counts(rows: list[dict[str, str]]) -> dict[str, int]:
    c = Counter(r["state"] for r in rows)
    return {
        "done": c["done"],
        "failed": c["failed"] + c["expired"] + c["cancelled"],
        "rejected": c["rejected"],
        "pending": c["pending"],
    }


def billed(screen: str) -> dict[str, float]:
    found = re.findall(r"│\s*billed\s*│\s*([\d,.]+) s of video \((this run|total)", screen)
    return {what: float(value.replace(",", "")) for value, what in found}


def assert_agree(screen: str, report: list[dict[str, str]], total: int) -> dict[str, int]:
    """Progress line, summary and report: the same counts, and every row accounted for."""
    shown = progress_counts(screen)
    summary = summary_counts(screen)
    listed = report_counts(report)
    assert shown["total"] == total
    assert {k: shown[k] for k in summary} == summary == listed, (shown, summary, listed)
    assert sorted(int(r["row"]) for r in report) == list(range(2, total + 2))
    assert shown["finished"] + shown["pending"] == total
    return summary


def revoke_every_key(sim: Simulator) -> None:
    """The account's key is revoked while a batch runs (the simulator checks every request
    against its configuration's keys)."""
    state = sim.app[SIM_KEY]
    state.config = attrs.evolve(state.config, api_keys=frozenset({"sk-someone-elses"}))


class TestInterruptedSessionInATerminal:
    """Ctrl-C mid-run, then the same command again: each time the three counts agree, the
    report lists all eight rows, and the rerun bills to itself only the tasks it created."""

    @pytest.mark.slow
    async def test_ctrl_c_then_rerun(self, manifest: Path, tmp_path: Path) -> None:
        out, report = tmp_path / "out", tmp_path / "report.csv"
        # Two tasks run at a time, 3 s or more each: Ctrl-C lands with tasks open.
        config = SimulatorConfig(
            api_keys={KEY}, time_scale=0.05, max_running=2, processing_base=60, policy_ttl=1e6
        )
        async with Simulator(config) as sim:
            args = ["run", manifest, "--out", out, "--report", report, *connection(sim)]
            term = Terminal(args, _env())
            try:
                with anyio.fail_after(60):
                    while len(sim.ledger.tasks_created) < 4:
                        await anyio.sleep(0.05)
                term.ctrl_c()
                assert await term.wait() == 130, term.output
            finally:
                term.kill()
            first_tasks = {t.task_id for t in sim.ledger.tasks_created}
            first = assert_agree(term.output, read_report(report), 8)
            assert first["pending"] > 0, term.output  # the interrupt left rows unfinished
            assert "interrupted: run the same command again to resume" in term.output

            async def fast_forward() -> None:
                while True:
                    await anyio.sleep(0.1)
                    sim.clock.advance(20)

            async with anyio.create_task_group() as tg:
                tg.start_soon(fast_forward)
                again = Terminal(args, _env())
                try:
                    assert await again.wait() == 0, again.output
                finally:
                    again.kill()
                tg.cancel_scope.cancel()
        rows = read_report(report)
        second = assert_agree(again.output, rows, 8)
        assert second == {"done": 8, "failed": 0, "rejected": 0, "pending": 0}
        by_task = {r["task_id"]: float(r["billed_seconds"]) for r in rows}
        this_run = sum(s for t, s in by_task.items() if t not in first_tasks)
        shown = billed(again.output)
        # The tasks the first run created were billed to the first run, not to this one.
        assert shown["this run"] == pytest.approx(this_run, abs=0.06)
        assert shown["total"] == pytest.approx(sum(by_task.values()), abs=0.06)
        assert shown["this run"] < shown["total"]


class TestRevokedKeyInATerminal:
    """A key refused mid-run (revoked): the run stops with exit 2, and the display, the summary
    and the report agree; the rows it did not finish are pending, none is lost."""

    async def test_counts_agree(self, manifest: Path, tmp_path: Path) -> None:
        out, report = tmp_path / "out", tmp_path / "report.csv"
        config = SimulatorConfig(
            api_keys={KEY}, time_scale=0.05, max_running=1, processing_base=60, policy_ttl=1e6
        )
        async with Simulator(config) as sim:
            args = ["run", manifest, "--out", out, "--report", report, *connection(sim)]
            term = Terminal(args, _env())
            try:
                with anyio.fail_after(60):
                    while len(sim.ledger.tasks_created) < 1:
                        await anyio.sleep(0.05)
                revoke_every_key(sim)
                assert await term.wait() == 2, term.output
            finally:
                term.kill()
        counts = assert_agree(term.output, read_report(report), 8)
        assert counts["failed"] >= 1
        assert counts["pending"] + counts["failed"] == 8
        assert "the API key was refused" in term.output


class TestPreflight:
    """With a key and no usable API, ``run`` stops after one short check: exit 2, one line."""

    async def test_wrong_key_is_one_line_and_one_request(
        self, manifest: Path, tmp_path: Path
    ) -> None:
        config = SimulatorConfig(api_keys={"sk-the-right-one"}, time_scale=0.002, policy_ttl=1e6)
        async with Simulator(config) as sim:
            report = tmp_path / "r.csv"
            run = await cli(
                "run", manifest, "--out", tmp_path / "o", "--report", report, *connection(sim)
            )
            assert run.returncode == 2, text(run)
            assert run.stdout == b""
            [line] = run.stderr.decode().splitlines()
            assert "refused" in line
            assert "EMO_TEST_KEY" in line
            assert KEY not in line
            # One cheap request, the check; no upload, no submit.
            assert [r.endpoint for r in sim.ledger.requests] == ["task_list"]
            assert not report.exists()
            detect = await cli("detect", manifest.parent / "portrait-01.png", *connection(sim)[:4])
            assert detect.returncode == 2, text(detect)
            [line] = detect.stderr.decode().splitlines()
            assert "the API key was refused" in line

    @pytest.mark.parametrize("where", ["closed-port", "unresolvable"])
    async def test_no_network(self, where: str, manifest: Path, tmp_path: Path) -> None:
        if where == "closed-port":
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            base = f"http://127.0.0.1:{port}/api/v1"
        else:
            base = "https://no-such-host.invalid/api/v1"
        started = time.monotonic()
        result = await cli(
            "run", manifest, "--out", tmp_path / "o", "--base-url", base,
            "--api-key-env", "EMO_TEST_KEY",
        )  # fmt: skip
        took = time.monotonic() - started
        assert result.returncode == 2, text(result)
        assert result.stdout == b""
        [line] = result.stderr.decode().splitlines()
        assert "cannot reach" in line
        assert "nothing was sent" in line
        assert took < 20  # the check's bound (15 s) and the interpreter's start
