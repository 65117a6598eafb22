"""The real ``python -m emo_async`` entry point, in a subprocess, against a simulator served by
the test's event loop."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from emo_async._samples import make_sample_set
from emo_async.simulator import Simulator, SimulatorConfig

pytestmark = pytest.mark.anyio

KEY = "sk-test-cli-SECRET-4711"
KEY_ENV = "EMO_TEST_KEY"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DASHSCOPE_API_KEY",)}
    env.pop("DASHSCOPE_HTTP_BASE_URL", None)
    env[KEY_ENV] = KEY
    env["PYTHONIOENCODING"] = "utf-8"
    return env


async def cli(
    *args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    command = [sys.executable, "-m", "emo_async", *map(str, args)]
    with anyio.fail_after(100):
        return await anyio.run_process(
            command, check=False, cwd=cwd, env=env if env is not None else _env()
        )


def text(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stdout.decode() + result.stderr.decode()


def connection(sim: Simulator, *extra: str) -> list[str]:
    return ["--base-url", sim.base_url, "--api-key-env", KEY_ENV, "--poll-delay", "0.1", *extra]


def write_manifest(folder: Path, rows: Sequence[Sequence[str]], name: str = "m.csv") -> Path:
    path = folder / name
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image", "audio", "name", "ext_bbox"][: max(len(r) for r in rows)])
        writer.writerows(rows)
    return path


@pytest.fixture
def media(tmp_path: Path) -> Path:
    """Two portraits and four short voices in tmp_path/media."""
    folder = tmp_path / "media"
    make_sample_set(folder, 4, portraits=2, seconds=(1.0, 2.0), seed=5)
    return folder


@pytest.fixture
def good_manifest(media: Path) -> Path:
    rows = [
        ["portrait-01.png", "clip-0001.wav", "first"],
        ["portrait-02.png", "clip-0002.wav", "second"],
        ["portrait-01.png", "clip-0003.wav", "third"],
    ]
    return write_manifest(media, rows)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    # Upload policies are cached for their real-time lifetime: keep them valid at this pace.
    config = SimulatorConfig(api_keys={KEY}, time_scale=0.002, policy_ttl=1e6)
    async with Simulator(config) as simulator:
        yield simulator


def outputs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.mp4"))


class TestRun:
    """``emo-async run``: exit codes, bad rows, JSON, reports and resumption."""

    async def test_all_done_exits_0_with_a_csv_report(
        self, sim: Simulator, good_manifest: Path, tmp_path: Path
    ) -> None:
        out, report = tmp_path / "out", tmp_path / "report.csv"
        result = await cli("run", good_manifest, "--out", out, "--report", report, *connection(sim))
        assert result.returncode == 0, text(result)
        assert outputs(out) == ["first.mp4", "second.mp4", "third.mp4"]
        with report.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == [
            "row",
            "name",
            "state",
            "task_id",
            "path",
            "size",
            "sha256",
            "billed_seconds",
            "error_kind",
            "error_code",
            "error_message",
            "request_id",
        ]
        by_name = {r["name"]: r for r in rows}
        assert set(by_name) == {"first", "second", "third"}
        assert by_name["second"]["row"] == "3"
        for row in rows:
            assert row["state"] == "done"
            assert row["task_id"] in sim.tasks
            assert (await anyio.Path(row["path"]).stat()).st_size == int(row["size"])
            assert float(row["billed_seconds"]) > 0
            assert row["error_kind"] == ""
        assert "summary" in result.stdout.decode()

    async def test_bad_rows_are_reported_and_good_rows_done(
        self, sim: Simulator, media: Path, tmp_path: Path
    ) -> None:
        manifest = write_manifest(
            media,
            [
                ["portrait-01.png", "clip-0001.wav", "ok-1"],
                ["missing.png", "clip-0002.wav", "no-file"],  # row 3: validation
                ["portrait-02.png", "clip-0002.wav", "bad-box", "1,2,3"],  # row 4: manifest
                ["portrait-02.png", "clip-0004.wav", "ok-2"],
            ],
        )
        out, report = tmp_path / "out", tmp_path / "report.jsonl"
        result = await cli("run", manifest, "--out", out, "--report", report, *connection(sim))
        assert result.returncode == 1, text(result)
        assert outputs(out) == ["ok-1.mp4", "ok-2.mp4"]
        shown = result.stdout.decode()
        assert "row 3 (no-file)" in shown
        assert "row 4 (bad-box)" in shown
        assert "missing.png" in shown
        assert "ext_bbox" in shown
        records = {r["name"]: r for r in map(json.loads, report.read_text().splitlines())}
        assert records["no-file"]["state"] == "rejected"
        assert records["no-file"]["row"] == 3
        assert records["no-file"]["error_kind"] == "InputError"
        assert records["bad-box"]["state"] == "rejected"
        assert records["bad-box"]["row"] == 4
        assert records["bad-box"]["error_kind"] == "ManifestError"
        assert records["ok-2"]["state"] == "done"
        # Nothing was spent on the bad rows.
        assert len(sim.ledger.tasks_created) == 2

    async def test_json_output_parses(
        self, sim: Simulator, good_manifest: Path, tmp_path: Path
    ) -> None:
        result = await cli(
            "run", good_manifest, "--out", tmp_path / "o", "--json", *connection(sim)
        )
        assert result.returncode == 0, text(result)
        objects = [json.loads(line) for line in result.stdout.decode().splitlines()]
        assert [o["type"] for o in objects] == ["outcome"] * 3 + ["summary"]
        assert {o["name"] for o in objects[:3]} == {"first", "second", "third"}
        assert all(o["state"] == "done" and o["sha256"] for o in objects[:3])
        summary = objects[-1]
        assert summary["done"] == 3
        assert summary["exit_code"] == 0
        assert summary["total"] == 3

    async def test_resumed_run_submits_nothing_new(
        self, sim: Simulator, good_manifest: Path, tmp_path: Path
    ) -> None:
        args: list[str | Path] = ["run", good_manifest, "--out", tmp_path / "o", *connection(sim)]
        first = await cli(*args)
        assert first.returncode == 0, text(first)
        submits = sim.ledger.count("submit")
        uploads = sim.ledger.count("upload")
        assert submits == 3
        second = await cli(*args, "--json")
        assert second.returncode == 0, text(second)
        assert sim.ledger.count("submit") == submits
        assert sim.ledger.count("upload") == uploads
        summary = json.loads(second.stdout.decode().splitlines()[-1])
        assert summary["done"] == 3
        assert summary["skipped"] == 3
        assert summary["billed_seconds"] == 0

    async def test_dry_run_makes_no_request(
        self, sim: Simulator, good_manifest: Path, tmp_path: Path
    ) -> None:
        result = await cli(
            "run", good_manifest, "--out", tmp_path / "o", "--dry-run", *connection(sim)
        )
        assert result.returncode == 0, text(result)
        assert "estimate: 3 valid of 3 jobs" in result.stdout.decode()
        assert sim.ledger.requests == []
        assert not (tmp_path / "o").exists()

    async def test_unreadable_manifest_exits_2(self, sim: Simulator, tmp_path: Path) -> None:
        missing_column = write_manifest(tmp_path, [["a.png"]], name="cols.csv")
        utf16 = tmp_path / "u.csv"
        utf16.write_bytes("image,audio\na.png,a.wav\n".encode("utf-16"))
        for manifest, message in (
            (tmp_path / "nope.csv", "no such file"),
            (missing_column, "lacks the required column audio"),
            (utf16, "UTF-16"),
        ):
            result = await cli("run", manifest, "--out", tmp_path / "o", *connection(sim))
            assert result.returncode == 2, text(result)
            assert message in result.stderr.decode()
        assert sim.ledger.requests == []

    async def test_bad_usage_exits_2(self, good_manifest: Path, tmp_path: Path) -> None:
        env = _env()
        del env[KEY_ENV]
        no_key = await cli("run", good_manifest, "--out", tmp_path / "o", env=env)
        assert no_key.returncode == 2
        assert "DASHSCOPE_API_KEY" in no_key.stderr.decode()
        bad_option = await cli("run", good_manifest, "--out", tmp_path / "o", "--max-tasks", "0")
        assert bad_option.returncode == 2
        no_command = await cli()
        assert no_command.returncode == 2

    async def test_the_key_never_appears(
        self, sim: Simulator, good_manifest: Path, tmp_path: Path
    ) -> None:
        report = tmp_path / "r.jsonl"
        result = await cli(
            "run", good_manifest, "--out", tmp_path / "o", "-vv", "--report", report,
            *connection(sim),
        )  # fmt: skip
        assert result.returncode == 0, text(result)
        assert KEY not in text(result)
        assert KEY not in report.read_text()
        assert "emo_async" in result.stderr.decode()  # the log did go to stderr


async def _wait_for(predicate: Any, timeout: float = 30) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.05)


class TestInterruptAndCancel:
    """Ctrl-C stops a batch cleanly (exit 130); ``cancel`` cancels its PENDING tasks and the same
    command finishes the rest without paying twice."""

    @pytest.mark.slow
    async def test_interrupt_cancel_and_resume(self, media: Path, tmp_path: Path) -> None:
        rows = [[f"portrait-0{1 + i % 2}.png", f"clip-000{i + 1}.wav", f"v{i}"] for i in range(4)]
        manifest = write_manifest(media, rows)
        out = tmp_path / "out"
        # One task runs at a time and takes 3 s or more: the others wait PENDING.
        config = SimulatorConfig(
            api_keys={KEY}, time_scale=0.05, max_running=1, processing_base=60, policy_ttl=1e6
        )
        async with Simulator(config) as sim:
            args: list[str | Path] = ["run", manifest, "--out", out, *connection(sim)]
            command = [sys.executable, "-m", "emo_async", *map(str, args)]
            async with await anyio.open_process(command, env=_env()) as process:
                await _wait_for(lambda: len(sim.ledger.tasks_created) >= 3)
                process.send_signal(signal.SIGINT)
                with anyio.fail_after(30):
                    assert await process.wait() == 130
            status = await cli("status", out)
            assert status.returncode == 0, text(status)
            assert "submitted" in status.stdout.decode()

            cancel = await cli("cancel", out, *connection(sim)[:4])
            assert cancel.returncode == 0, text(cancel)
            shown = cancel.stdout.decode()
            assert "cancelled" in shown
            assert "not cancellable" in shown  # the running one
            cancelled = [t for t in sim.tasks.values() if t.status == "CANCELED"]
            assert cancelled, shown

            before = len(sim.ledger.tasks_created)

            async def fast_forward() -> None:
                while True:
                    await anyio.sleep(0.1)
                    sim.clock.advance(20)

            async with anyio.create_task_group() as tg:
                tg.start_soon(fast_forward)
                again = await cli(*args)
                tg.cancel_scope.cancel()
            assert again.returncode == 0, text(again)
            assert outputs(out) == ["v0.mp4", "v1.mp4", "v2.mp4", "v3.mp4"]
            # Only the cancelled jobs (and any never submitted) were submitted again.
            created = len(sim.ledger.tasks_created)
            assert created - before == len(cancelled) + (4 - before)
            assert sim.ledger.duplicate_tasks().keys() <= {t.fingerprint for t in cancelled}


class TestValidate:
    """``emo-async validate``: every problem with its row, the estimate, no network."""

    async def test_lists_every_problem_with_its_row(self, media: Path) -> None:
        manifest = write_manifest(
            media,
            [
                ["portrait-01.png", "clip-0001.wav", "fine"],
                ["nope.png", "nope.wav", "two-missing"],  # row 3: image and audio
                ["portrait-01.png", "clip-0002.wav", "box", "x,y"],  # row 4
                ["clip-0003.wav", "portrait-02.png", "swapped"],  # row 5
            ],
        )
        result = await cli("validate", manifest)
        assert result.returncode == 1, text(result)
        lines = result.stdout.decode().splitlines()
        problems = [line for line in lines if line.startswith("row ")]
        assert sum(line.startswith("row 3 (two-missing): image:") for line in problems) == 1
        assert sum(line.startswith("row 3 (two-missing): audio:") for line in problems) == 1
        assert any(line.startswith("row 4 (box): ext_bbox:") for line in problems)
        assert any(line.startswith("row 5 (swapped): image:") for line in problems)
        assert any(line.startswith("row 5 (swapped): audio:") for line in problems)
        assert not any(line.startswith("row 2") for line in problems)
        assert "estimate: 1 valid of 4 jobs" in result.stdout.decode()
        assert "3 rows with problems" in result.stdout.decode()

    async def test_valid_manifest_with_its_estimate(self, good_manifest: Path) -> None:
        result = await cli("validate", good_manifest, "--json")
        assert result.returncode == 0, text(result)
        (estimate,) = [json.loads(line) for line in result.stdout.decode().splitlines()]
        assert estimate["type"] == "estimate"
        assert estimate["jobs"] == estimate["valid"] == 3
        assert estimate["by_ratio"] == {"1:1": 3, "3:4": 0}
        assert 3.0 <= estimate["billed_seconds"] <= 6.0


class TestOtherCommands:
    """``detect``, ``status`` and ``simulator`` reach the public API."""

    async def test_detect_a_local_portrait(self, sim: Simulator, media: Path) -> None:
        result = await cli(
            "detect", media / "portrait-01.png", "--ratio", "3:4", "--json", *connection(sim)[:4]
        )
        assert result.returncode == 0, text(result)
        answer = json.loads(result.stdout.decode())
        assert answer["check_pass"] is True
        x1, y1, x2, y2 = answer["ext_bbox"]
        assert (x2 - x1) * 4 == (y2 - y1) * 3
        assert sim.ledger.count("upload") == 1

    async def test_status_of_a_missing_journal_exits_2(self, tmp_path: Path) -> None:
        result = await cli("status", tmp_path / "nothing.sqlite3")
        assert result.returncode == 2
        assert "no journal" in result.stderr.decode()

    async def test_simulator_help_is_the_simulators(self) -> None:
        result = await cli("simulator", "--help")
        assert result.returncode == 0
        assert "--time-scale" in result.stdout.decode()


class TestDemo:
    """The README's demo command makes playable videos on a fresh machine (no API key)."""

    @pytest.mark.slow
    async def test_demo_makes_playable_mp4s(self, tmp_path: Path) -> None:
        av: Any = pytest.importorskip("av")
        env = _env()
        del env[KEY_ENV]
        result = await cli("demo", "--jobs", "3", "--out", "tmp", cwd=tmp_path, env=env)
        assert result.returncode == 0, text(result)
        videos = sorted((tmp_path / "tmp" / "videos").glob("*.mp4"))
        assert len(videos) == 3
        assert "playable MP4s" in result.stdout.decode()
        sizes = set()
        for video in videos:
            with av.open(io.BytesIO(video.read_bytes()), "r") as container:
                stream = container.streams.video[0]
                sizes.add((stream.width, stream.height))
                assert container.streams.audio
                assert 1.5 <= container.duration / 1_000_000 <= 5.5
                assert sum(1 for _ in container.decode(video=0)) > 10
        assert sizes <= {(512, 512), (512, 704)}
