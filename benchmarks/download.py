"""Download throughput and memory: emo_async's Downloader against ``curl -o``.

Run ``python -m benchmarks.download --size-mb 200``. A media host runs in a separate process
(``benchmarks.media_server``); each round downloads the same URL once with curl and once with
our Downloader (the order alternates), and the medians are reported. Targets (issue #6):
throughput ≥ 0.8 x curl, peak RSS growth < 30 MB. Our time includes the fsync and atomic
rename that curl does not do; the ``fsync`` column shows how much of it that was.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import anyio
import psutil

from emo_async._download import Downloader

TARGET_RATIO = 0.8
TARGET_RSS_MB = 30.0
RESULTS = Path(__file__).parent / "results" / "download.md"


def start_server(size_mb: int, workdir: Path) -> tuple[subprocess.Popen[str], int, str]:
    argv = [sys.executable, "-m", "benchmarks.media_server", "--size-mb", str(size_mb)]
    proc = subprocess.Popen(
        [*argv, "--dir", str(workdir)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if not line or line[0] != "READY":
        proc.kill()
        raise SystemExit("media server did not start")
    return proc, int(line[1]), line[2]


def run_curl(curl: str, url: str, out: Path) -> float:
    start = time.perf_counter()
    subprocess.run([curl, "-s", "-o", str(out), url], check=True)
    elapsed = time.perf_counter() - start
    out.unlink()
    return elapsed


async def _raw_read(url: str) -> None:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        async for _ in resp.content.iter_chunked(1 << 20):
            pass


def run_raw(url: str) -> float:
    start = time.perf_counter()
    asyncio.run(_raw_read(url))
    return time.perf_counter() - start


async def _ours(url: str, dest: Path, sha256: str) -> tuple[float, float, float]:
    proc = psutil.Process()
    baseline = proc.memory_info().rss
    peak = baseline
    done = anyio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            await anyio.sleep(0.002)

    fsync_time = 0.0
    real_fsync = os.fsync

    def timed_fsync(fd: int) -> None:
        nonlocal fsync_time
        t0 = time.perf_counter()
        real_fsync(fd)
        fsync_time += time.perf_counter() - t0

    os.fsync = timed_fsync
    try:
        async with Downloader(max_concurrent=1) as dl, anyio.create_task_group() as tg:
            tg.start_soon(sample)
            start = time.perf_counter()
            result = await dl.download(url, dest)
            elapsed = time.perf_counter() - start
            done.set()
    finally:
        os.fsync = real_fsync
    if result.sha256 != sha256:
        raise SystemExit(f"sha256 mismatch: {result.sha256} != {sha256}")
    return elapsed, (peak - baseline) / 1e6, fsync_time


def run_ours(url: str, dest: Path, sha256: str) -> tuple[float, float, float]:
    measured = asyncio.run(_ours(url, dest, sha256))
    dest.unlink()
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="do not write results/download.md")
    args = parser.parse_args()
    command = f"python -m benchmarks.download --size-mb {args.size_mb}"
    if args.rounds != 3:
        command += f" --rounds {args.rounds}"
    curl = shutil.which("curl")
    baseline_name = "curl -o" if curl else "raw aiohttp read (curl missing)"
    size = args.size_mb * (1 << 20)

    load_before = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="emo-bench-"))
    server, port, sha256 = start_server(args.size_mb, workdir)
    url = f"http://127.0.0.1:{port}/video.mp4?Expires={int(time.time()) + 3600}&Signature=bench"
    rows: list[tuple[float, float, float, float]] = []
    try:

        def baseline() -> float:
            return run_curl(curl, url, workdir / "curl.mp4") if curl else run_raw(url)

        # Warm-up: page cache, connection setup and one-time allocations are not the subject.
        baseline()
        run_ours(url, workdir / "ours.mp4", sha256)
        for i in range(args.rounds):
            if i % 2 == 0:
                base_t = baseline()
                ours_t, rss, fsync_t = run_ours(url, workdir / "ours.mp4", sha256)
            else:
                ours_t, rss, fsync_t = run_ours(url, workdir / "ours.mp4", sha256)
                base_t = baseline()
            rows.append((base_t, ours_t, rss, fsync_t))
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(workdir, ignore_errors=True)

    mb = size / 1e6
    lines = [
        f"# Download benchmark ({args.size_mb} MiB, loopback)",
        "",
        f"Command: `{command}`",
        "",
        f"Baseline: {baseline_name}. Python {sys.version.split()[0]}, aiohttp "
        f"{aiohttp.__version__}, {os.cpu_count()} CPUs, load average before the run "
        f"{load_before:.2f} (other work on the machine skews both columns).",
        "",
        "| round | baseline s | ours s | baseline MB/s | ours MB/s | ratio | of which fsync s "
        "| ratio without fsync | RSS growth MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, (b, o, rss, f) in enumerate(rows, 1):
        lines.append(
            f"| {i} | {b:.3f} | {o:.3f} | {mb / b:.0f} | {mb / o:.0f} | {b / o:.2f} | {f:.3f} "
            f"| {b / (o - f):.2f} | {rss:.1f} |"
        )
    med_b = statistics.median(r[0] for r in rows)
    med_o = statistics.median(r[1] for r in rows)
    med_rss = statistics.median(r[2] for r in rows)
    med_f = statistics.median(r[3] for r in rows)
    max_rss = max(r[2] for r in rows)
    ratio = med_b / med_o
    ratio_nofsync = statistics.median(r[0] / (r[1] - r[3]) for r in rows)
    lines += [
        f"| **median** | **{med_b:.3f}** | **{med_o:.3f}** | **{mb / med_b:.0f}** "
        f"| **{mb / med_o:.0f}** | **{ratio:.2f}** | **{med_f:.3f}** "
        f"| **{ratio_nofsync:.2f}** | **{med_rss:.1f}** |",
        "",
        f"- Throughput ratio (ours / baseline, medians): {ratio:.2f} "
        f"(target ≥ {TARGET_RATIO}: {'met' if ratio >= TARGET_RATIO else 'NOT met'})",
        f"- Peak RSS growth: median {med_rss:.1f} MB, max {max_rss:.1f} MB "
        f"(target < {TARGET_RSS_MB:.0f} MB: {'met' if max_rss < TARGET_RSS_MB else 'NOT met'})",
        "- Ours includes the fsync of the file and its directory, the atomic rename and a "
        "SHA-256 of every byte; curl does none of these. 'ratio without fsync' takes the "
        "fsync time out of ours.",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(report, encoding="utf-8")


if __name__ == "__main__":
    main()
