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

from emo_async import make_sample_set
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
        # One rule for every row rejected before any spend: the error of a job's input.
        assert records["bad-box"]["error_kind"] == "InputError"
        assert records["ok-2"]["state"] == "done"
        # A missing file breaks no format limit: the message says it does not exist, no more.
        assert "does not exist" in records["no-file"]["error_message"]
        assert "limit" not in records["no-file"]["error_message"]
        listed = shown[shown.index("jobs without a video") :]
        assert listed.index("row 3 (no-file)") < listed.index("row 4 (bad-box)")  # row order
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
        missing = [line for line in problems if line.startswith("row 3")]
        # A missing file is just that: no format limit after it.
        assert all(line.endswith("does not exist") for line in missing), missing
        assert "(limit:" in next(line for line in problems if line.startswith("row 5"))
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


def one_line_error(result: subprocess.CompletedProcess[bytes]) -> str:
    """The single stderr line of a usage error (exit 2), checked to be just that."""
    err = result.stderr.decode()
    assert result.returncode == 2, text(result)
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    return err


class TestUsageMistakes:
    """Usage mistakes end with exit 2 and one line on stderr, before anything is written."""

    @pytest.mark.parametrize("spelling", ["same", "dotted"])
    async def test_report_naming_the_manifest_is_refused(
        self, sim: Simulator, good_manifest: Path, tmp_path: Path, spelling: str
    ) -> None:
        before = await anyio.Path(good_manifest).read_bytes()
        report = good_manifest if spelling == "same" else Path(".") / good_manifest.name
        out = tmp_path / "out"
        result = await cli(
            "run", good_manifest, "--out", out, "--report", report, *connection(sim),
            cwd=good_manifest.parent,
        )  # fmt: skip
        assert "--report" in one_line_error(result)
        assert await anyio.Path(good_manifest).read_bytes() == before
        assert not out.exists()
        assert sim.ledger.requests == []

    @pytest.mark.parametrize("command", ["run", "demo"])
    async def test_out_naming_a_file_is_refused(
        self, sim: Simulator, good_manifest: Path, tmp_path: Path, command: str
    ) -> None:
        a_file = tmp_path / "taken"
        a_file.write_bytes(b"mine")
        if command == "run":
            result = await cli("run", good_manifest, "--out", a_file, *connection(sim))
        else:
            result = await cli("demo", "--jobs", "1", "--out", a_file)
        assert f"--out {a_file}" in one_line_error(result)
        assert a_file.read_bytes() == b"mine"
        assert sim.ledger.requests == []

    @pytest.mark.parametrize(
        "argv",
        [
            [],
            ["run"],
            ["run", "{m}", "--out", "{o}", "--max-tasks", "0"],
            ["run", "{m}", "--out", "{o}", "--max-tasks", "many"],
            ["run", "{m}", "--out", "{o}", "--submit-rate", "inf"],
            ["run", "{m}", "--out", "{o}", "--report", "{o}.txt"],
            ["validate", "{m}", "--no-such-option"],
            ["detect", "x.png", "--ratio", "16:9"],
        ],
    )
    async def test_usage_errors_are_one_line(
        self, good_manifest: Path, tmp_path: Path, argv: list[str]
    ) -> None:
        args = [a.format(m=good_manifest, o=tmp_path / "o") for a in argv]
        result = await cli(*args)
        one_line_error(result)
        assert not (tmp_path / "o").exists()

    async def test_help_shows_the_defaults(self) -> None:
        result = await cli("run", "--help")
        assert result.returncode == 0, text(result)
        shown = " ".join(result.stdout.decode().split())
        assert "tasks open at once (default: 10)" in shown
        assert "submits per second (default: the client's limit, 2 per second)" in shown


class TestUnknownColumns:
    """A manifest with many unknown columns gets a short warning, not every name."""

    async def test_warning_names_a_few_and_counts_the_rest(self, media: Path) -> None:
        extra = [f"column-{i}-" + "x" * 60 for i in range(3000)]
        manifest = media / "wide.csv"
        with manifest.open("w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["image", "audio", *extra])
            writer.writerow(["portrait-01.png", "clip-0001.wav", *[""] * len(extra)])
        result = await cli("validate", manifest)
        assert result.returncode == 0, text(result)
        (warning,) = [
            line for line in result.stderr.decode().splitlines() if "unknown column" in line
        ]
        assert len(warning) < 600, warning
        assert "'column_0_" in warning
        assert "and 2995 more" in warning
        assert "column_2999" not in warning


def closed_pipe() -> int:
    """The write end of a pipe whose reader is already gone."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    return write_end


class TestClosedStdout:
    """A command whose stdout reader went away (``| head``) ends quietly, with no traceback."""

    @pytest.mark.parametrize(
        ("argv", "code"),
        [
            (["validate", "{m}", "--json"], 141),
            (["validate", "{m}"], 141),
            # argparse drops what it cannot print and exits as it would have.
            (["--help"], 0),
            (["run", "--help"], 0),
        ],
    )
    async def test_local_commands(self, good_manifest: Path, argv: list[str], code: int) -> None:
        args = [a.format(m=good_manifest) for a in argv]
        command = [sys.executable, "-m", "emo_async", *args]
        write_end = closed_pipe()
        try:
            with anyio.fail_after(100):
                result = await anyio.run_process(command, check=False, stdout=write_end, env=_env())
        finally:
            os.close(write_end)
        err = result.stderr.decode()
        assert "Traceback" not in err, err
        assert "BrokenPipe" not in err, err
        assert result.returncode == code, err

    async def test_a_running_batch(
        self, sim: Simulator, good_manifest: Path, tmp_path: Path
    ) -> None:
        out = tmp_path / "o"
        command = [
            sys.executable, "-m", "emo_async", "run", str(good_manifest), "--out", str(out),
            "--json", *connection(sim),
        ]  # fmt: skip
        write_end = closed_pipe()
        try:
            with anyio.fail_after(100):
                result = await anyio.run_process(command, check=False, stdout=write_end, env=_env())
        finally:
            os.close(write_end)
        err = result.stderr.decode()
        assert "Traceback" not in err, err
        assert "BrokenPipe" not in err, err
        assert result.returncode == 141, err
        # The batch stopped at its first outcome; the journal lets the same command resume.
        again = await cli("run", good_manifest, "--out", out, *connection(sim))
        assert again.returncode == 0, text(again)
        assert outputs(out) == ["first.mp4", "second.mp4", "third.mp4"]

    async def test_head_reads_a_little_of_a_long_listing(self, media: Path, tmp_path: Path) -> None:
        rows = [[f"missing-{i}.png", f"missing-{i}.wav", f"row-{i}"] for i in range(2000)]
        manifest = write_manifest(media, rows, name="long.csv")
        command = [sys.executable, "-m", "emo_async", "validate", str(manifest), "--json"]

        def head_c_600() -> tuple[bytes, int, str]:
            # What `emo-async validate --json | head -c 600` does: read 600 bytes, close the pipe.
            with (tmp_path / "stderr").open("w+b") as err:
                process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, env=_env())
                assert process.stdout is not None
                got = b""
                while len(got) < 600:
                    got += os.read(process.stdout.fileno(), 600 - len(got))
                process.stdout.close()
                code = process.wait(timeout=100)
                err.seek(0)
                return got, code, err.read().decode()

        got, code, err = await anyio.to_thread.run_sync(head_c_600)
        assert got.startswith(b'{"type": "problem"')
        assert "Traceback" not in err, err
        assert "BrokenPipe" not in err, err
        assert code == 141, err


class TestPublicAPIOnly:
    """The command line is built on the public API (plus the manifest reader it owns)."""

    def test_heavy_imports_wait_for_their_command(self) -> None:
        code = (
            "import sys, emo_async._cli; "
            "print(','.join(m for m in ('rich', 'PIL', 'av', 'emo_async.simulator') "
            "if m in sys.modules))"
        )
        found = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        assert found == ""

    def test_cli_imports_only_public_names(self) -> None:
        import ast

        import emo_async

        allowed_modules = {"emo_async.simulator", "emo_async.simulator.__main__"}
        # The CLI's own manifest reader, and the batch's naming rules (validate must name rows
        # exactly as run does).
        owned = {"emo_async._manifest", "emo_async._names"}
        package = Path(emo_async.__file__).parent / "_cli"
        files = sorted(package.glob("*.py"))
        assert len(files) > 3
        for file in files:
            for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
                where = f"{file.name}:{getattr(node, 'lineno', '?')}"
                if isinstance(node, ast.Import):
                    for alias in node.names:
                        assert not alias.name.startswith("emo_async"), where
                elif isinstance(node, ast.ImportFrom):
                    if node.level:
                        assert node.level == 1, where  # only the CLI's own modules
                        continue
                    module = node.module or ""
                    if module == "emo_async":
                        for alias in node.names:
                            assert alias.name in emo_async.__all__, (where, alias.name)
                    elif module.startswith("emo_async"):
                        assert module in allowed_modules | owned, (where, module)


class TestWorkspace:
    """`--workspace` reaches every API request; a missing one is a one-line usage error."""

    async def test_detect_with_and_without_the_workspace(self, media: Path) -> None:
        config = SimulatorConfig(api_keys={KEY}, workspace="ws-cli-test", time_scale=0.01)
        async with Simulator(config) as sim:
            args = ("detect", media / "portrait-01.png", "--json", *connection(sim)[:4])
            missing = await cli(*args)
            assert missing.returncode == 2, text(missing)
            assert len(missing.stderr.decode().strip().splitlines()) == 1
            given = await cli(*args, "--workspace", "ws-cli-test")
            assert given.returncode == 0, text(given)
            assert json.loads(given.stdout.decode())["check_pass"] is True
            env = _env()
            env["DASHSCOPE_WORKSPACE"] = "ws-cli-test"
            from_env = await cli(*args, env=env)
            assert from_env.returncode == 0, text(from_env)
