"""The benchmarks still run end to end (tiny sizes, fast simulated time), so they cannot rot."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
class TestBatchBenchmark:
    """``python -m benchmarks.batch`` at N = 20 with every contender and side run."""

    def test_runs_all_contenders_and_writes_its_table(self, tmp_path: Path) -> None:
        pytest.importorskip("dashscope")
        pytest.importorskip("matplotlib")
        out = tmp_path / "results"
        command = [
            sys.executable,
            "-m",
            "benchmarks.batch",
            "--jobs",
            "20",
            "--concurrency",
            "5",
            "--submit-qps",
            "20",
            "--time-scale",
            "0.01",
            "--portraits",
            "2",
            "--memory-tasks",
            "200",
            "--memory-hold",
            "2",
            "--cpu-requests",
            "200",
            "--work-dir",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ]
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=100, check=False
        )
        assert done.returncode == 0, done.stderr[-4000:]
        latest = (out / "latest.md").read_text()
        assert list(out.glob("batch-*.md")), "the dated table is missing"
        assert (out / "timeline.png").stat().st_size > 0
        for name in ("emo_async", "dashscope", "naive"):
            assert f"| {name} |" in latest
        assert "## Targets (issue #9)" in latest
        assert "## Memory" in latest
        assert "## Client CPU per request" in latest
        raw = json.loads((out / "latest.json").read_text())
        for name in ("emo_async", "dashscope", "naive"):
            assert raw["results"][name]["done"] == 20, raw["results"][name]["failures"]
            assert raw["results"][name]["tasks_created"] == 20
        assert raw["memory"]["open_tasks_seen"] == 200


@pytest.mark.slow
class TestDownloadBenchmark:
    """``python -m benchmarks.download`` on a small video, one round, into a temp directory."""

    def test_compares_with_curl_and_writes_its_table(self, tmp_path: Path) -> None:
        if shutil.which("curl") is None:
            pytest.skip("curl is the benchmark's baseline and is not installed")
        out = tmp_path / "download.md"
        scratch = tmp_path / "scratch"
        scratch.mkdir()
        command = [sys.executable, "-m", "benchmarks.download", "--size-mb", "8"]
        command += ["--rounds", "1", "--dir", str(scratch), "--out", str(out)]
        command += ["--mbps", "0", "--mbps", "400"]
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=100, check=False
        )
        assert done.returncode == 0, done.stderr[-4000:]
        table = out.read_text()
        assert table.count("| **median** |") == 2
        assert "400 Mbit/s link" in table
        assert "ours / curl -o = " in table
        assert "Peak RSS growth" in table
        assert list(scratch.iterdir()) == [], "the benchmark left files behind"


@pytest.mark.slow
class TestRegimesBenchmark:
    """``python -m benchmarks.regimes --quick``: one regime, one latency, two contenders."""

    def test_writes_a_sane_table_for_the_query_bound_regime(self, tmp_path: Path) -> None:
        pytest.importorskip("dashscope.v2")
        out = tmp_path / "results"
        command = [sys.executable, "-m", "benchmarks.regimes", "--quick", "--regimes", "query"]
        command += ["--latencies", "150", "--contenders", "emo_async,dashscope2"]
        command += ["--timeout", "60", "--out", str(out)]
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=100, check=False
        )
        assert done.returncode == 0, done.stderr[-4000:]
        table = (out / "regimes.md").read_text()
        assert "### query-bound, 150 ms per request" in table
        assert "| emo_async |" in table
        assert "| dashscope2 |" in table
        raw = json.loads((out / "regimes.json").read_text())
        assert raw["bounds"]["query"]["binding"] == "query"
        rows = raw["results"]["query"]["150"]
        for name in ("emo_async", "dashscope2"):
            r = rows[name]
            assert not r["timed_out"]
            assert (r["done"], r["failed"], r["tasks_created"]) == (16, 0, 16), r["failures"]
            assert r["duplicates"] == 0
            # Nobody beats the ideal client by much (lists aside), and the run ended after
            # its last task did.
            assert 0 < r["floor"] < r["makespan"] * 1.2
            assert r["tail"] > 0
            assert r["queries_per_job"] > 0
