"""Download throughput and memory: emo_async's Downloader against ``curl -o``, same URL, same run.

Run ``python -m benchmarks.download --size-mb 200``. The simulator runs in its own process
(``benchmarks._sim_proc``) with a result video of ``--size-mb`` MiB; one task is submitted and
waited for through the client, and its ``video_url`` (signed, with ``Expires``) is what both
contenders fetch from the simulator's media host. Each round downloads it once with curl and
once with our :class:`~emo_async._download.Downloader` (the order alternates), into each
``--dir``; the medians are reported. Targets (issue #6): throughput ≥ 0.8 × ``curl -o``, peak
RSS growth < 30 MB.

What is compared, so that the figures mean something on a noisy VM:

* Ours includes everything ``download()`` does: SHA-256 of every byte, the ``.part`` file,
  ``fsync`` of the file and its directory, the atomic rename. ``curl -o`` does none of it and
  returns while its bytes are still dirty in the page cache.
* ``curl -o`` + fsync is curl's time plus the time to fsync its file afterwards: the same
  durability as ours.
* The disk floor is writing the same number of bytes from memory and fsyncing them, no network:
  no durable download into that directory can be faster.
* ``os.sync()`` runs (untimed) before every timed download, so no run pays for the write-back
  of the previous one.

On a disk whose durable write rate is below curl's page-cache rate, the ratio to ``curl -o``
is bounded by ``floor / curl``, whatever the downloader does; the report prints that bound. A
tmpfs directory (``/dev/shm``) takes the disk out and measures the downloader itself. Each run
is made on an unlimited loopback link and on a 1 Gbit/s one (``--mbps``; the simulator paces
its media host): OSS serves a single download well below that.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import anyio
import psutil

from emo_async import Client
from emo_async._download import Downloader

TARGET_RATIO = 0.8
TARGET_RSS_MB = 30.0
RESULTS = Path(__file__).parent / "results" / "download.md"
#: The simulator's audio duration when it does not validate inputs; the video is sized per second.
_SIM_AUDIO_SECONDS = 10


@dataclass
class Round:
    curl: float
    curl_fsync: float
    ours: float
    ours_fsync: float
    rss_mb: float


@dataclass
class DirResult:
    path: Path
    label: str
    floor: list[float] = field(default_factory=list)
    rounds: list[Round] = field(default_factory=list)


def _sync() -> None:
    os.sync()
    time.sleep(0.05)


def run_curl(curl: str, url: str, out: Path) -> tuple[float, float, str]:
    """Seconds for ``curl -o``, seconds to fsync its file afterwards, and the file's sha256."""
    _sync()
    start = time.perf_counter()
    subprocess.run([curl, "-s", "-f", "-o", str(out), url], check=True)
    elapsed = time.perf_counter() - start
    fd = os.open(out, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        os.fsync(fd)
        fsync = time.perf_counter() - t0
    finally:
        os.close(fd)
    digest = hashlib.sha256()
    with out.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    out.unlink()
    return elapsed, fsync, digest.hexdigest()


def disk_floor(directory: Path, size: int) -> float:
    """Seconds to write ``size`` bytes from memory into ``directory`` and fsync them."""
    block = os.urandom(1 << 20)
    path = directory / "floor.bin"
    _sync()
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        left = size
        while left > 0:
            left -= os.write(fd, block[: min(left, len(block))])
        os.fsync(fd)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


class _PeakRSS:
    """Samples this process's RSS every 2 ms on a thread (the loop is busy downloading)."""

    def __init__(self) -> None:
        self._proc = psutil.Process()
        self.baseline = self._proc.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self) -> _PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.baseline) / 1e6


async def _ours(url: str, dest: Path) -> tuple[float, float, str]:
    fsync_time = 0.0
    real_fsync = os.fsync

    def timed_fsync(fd: int) -> None:
        nonlocal fsync_time
        t0 = time.perf_counter()
        real_fsync(fd)
        fsync_time += time.perf_counter() - t0

    os.fsync = timed_fsync  # type: ignore[assignment]
    try:
        async with Downloader(max_concurrent=1) as dl:
            start = time.perf_counter()
            result = await dl.download(url, dest)
            elapsed = time.perf_counter() - start
    finally:
        os.fsync = real_fsync
    return elapsed, fsync_time, result.sha256


def run_ours(url: str, dest: Path) -> tuple[float, float, float, str]:
    _sync()
    with _PeakRSS() as rss:
        elapsed, fsync_time, sha256 = asyncio.run(_ours(url, dest))
    dest.unlink()
    return elapsed, fsync_time, rss.growth_mb, sha256


def start_simulator(
    size_mb: int, work: Path, mbps: float = 0.0
) -> tuple[subprocess.Popen[bytes], str, str]:
    """The simulator in its own process, its results ``size_mb`` MiB, served at ``mbps``
    Mbit/s (0 = unlimited); returns (process, base URL, API key)."""
    time_scale = 0.001
    config = {
        "time_scale": time_scale,
        # The URL stays valid for an hour of real time, however long the run takes.
        "result_ttl": 3600 / time_scale,
        "task_retention": 3600 / time_scale,
        "validate_inputs": False,
        "processing_base": 1.0,
        "processing_per_audio_second": 0.0,
        "processing_jitter": 0.0,
        "video_bytes_per_second": size_mb * (1 << 20) // _SIM_AUDIO_SECONDS,
        "media_bandwidth": mbps * 125_000 if mbps > 0 else None,
    }
    argv = [sys.executable, "-m", "benchmarks._sim_proc", "--config", json.dumps(config)]
    proc = subprocess.Popen(
        [*argv, "--dump", str(work / "ledger.json")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("EMO_SIMULATOR "):
        proc.kill()
        raise SystemExit("the simulator did not start")
    fields = dict(part.split("=", 1) for part in line.split()[1:])
    return proc, fields["base_url"], fields["api_key"]


def stop_simulator(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def make_video(base_url: str, api_key: str) -> str:
    """Submit one task through the client, wait for it, return its signed ``video_url``."""
    async with Client(api_key=api_key, base_url=base_url) as client:
        task = await client.submit(
            "https://example.com/portrait.png",
            "https://example.com/voice.wav",
            face_bbox=(10, 20, 300, 310),
            ext_bbox=(0, 0, 512, 512),
        )
        final = await client.wait_outcome(task)
    assert final.video_url is not None
    return final.video_url


def report(args: argparse.Namespace, command: str, baseline: str, results: list[DirResult]) -> str:
    mb = args.size_mb * (1 << 20) / 1e6
    lines = [
        f"# Download benchmark ({args.size_mb} MiB from the simulator's media host, loopback)",
        "",
        f"Command: `{command}`",
        "",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Baseline: {baseline}. "
        f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}, "
        f"{os.cpu_count()} CPUs, load average before the run {args.load_before:.2f}.",
        "",
        "Ours = `Downloader.download()`: SHA-256 of every byte, `.part` file, fsync of file and "
        "directory, atomic rename. `curl -o` does none of that and returns with its bytes still "
        "in the page cache; `curl -o + fsync` adds the fsync of its file afterwards (the same "
        "durability as ours). Disk floor = writing the same bytes from memory and fsyncing them: "
        "no durable download into that directory can be faster. `os.sync()` runs untimed before "
        "every timed download.",
        "",
    ]
    verdicts: list[str] = []
    for res in results:
        rounds = res.rounds
        floor = statistics.median(res.floor)
        lines += [
            f"## {res.label}",
            "",
            "| round | curl -o s | curl -o + fsync s | ours s | of which fsync s | "
            "ours / curl -o | ours / (curl -o + fsync) | RSS growth MB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for i, r in enumerate(rounds, 1):
            lines.append(
                f"| {i} | {r.curl:.3f} | {r.curl + r.curl_fsync:.3f} | {r.ours:.3f} "
                f"| {r.ours_fsync:.3f} | {r.curl / r.ours:.2f} "
                f"| {(r.curl + r.curl_fsync) / r.ours:.2f} | {r.rss_mb:.1f} |"
            )
        curl = statistics.median([r.curl for r in rounds])
        durable = statistics.median([r.curl + r.curl_fsync for r in rounds])
        ours = statistics.median([r.ours for r in rounds])
        ours_fsync = statistics.median([r.ours_fsync for r in rounds])
        ratio = statistics.median([r.curl / r.ours for r in rounds])
        ratio_durable = statistics.median([(r.curl + r.curl_fsync) / r.ours for r in rounds])
        max_rss = max(r.rss_mb for r in rounds)
        bound = min(1.0, curl / floor) if floor > 0 else float("inf")
        lines += [
            f"| **median** | **{curl:.3f}** | **{durable:.3f}** | **{ours:.3f}** "
            f"| **{ours_fsync:.3f}** | **{ratio:.2f}** | **{ratio_durable:.2f}** "
            f"| **{statistics.median([r.rss_mb for r in rounds]):.1f}** |",
            "",
            f"- Throughput: curl -o {mb / curl:.0f} MB/s, ours {mb / ours:.0f} MB/s; disk floor "
            f"{floor:.3f} s ({mb / floor:.0f} MB/s durable).",
            f"- **ours / curl -o = {ratio:.2f}** (target ≥ {TARGET_RATIO}: "
            f"{'met' if ratio >= TARGET_RATIO else 'NOT met'}); the disk floor caps any durable "
            f"download at {bound:.2f} × curl -o here.",
            f"- ours / (curl -o + fsync) = {ratio_durable:.2f}.",
            f"- Peak RSS growth: max {max_rss:.1f} MB (target < {TARGET_RSS_MB:.0f} MB: "
            f"{'met' if max_rss < TARGET_RSS_MB else 'NOT met'}).",
            "",
        ]
        verdicts.append(f"{res.label}: {ratio:.2f} × curl -o (cap {bound:.2f})")
    lines.append("Summary: " + "; ".join(verdicts) + ".")
    return "\n".join(lines) + "\n"


def default_dirs() -> list[Path]:
    dirs = [Path(tempfile.gettempdir())]
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        dirs.append(shm)
    return dirs


def _label(path: Path) -> str:
    try:
        fs = max(
            (p for p in psutil.disk_partitions(all=True) if str(path).startswith(p.mountpoint)),
            key=lambda p: len(p.mountpoint),
        ).fstype
    except ValueError:
        fs = "?"
    return f"{fs} ({'memory' if fs == 'tmpfs' else 'disk'})"


def measure(res: DirResult, curl: str, url: str, size: int, rounds: int) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="emo-dl-", dir=res.path))
    try:
        # Warm-up: connection setup, the simulator's video cache, one-time allocations.
        run_curl(curl, url, scratch / "curl.mp4")
        run_ours(url, scratch / "ours.mp4")
        for i in range(rounds):
            res.floor.append(disk_floor(scratch, size))
            if i % 2 == 0:
                c, cf, c_sha = run_curl(curl, url, scratch / "curl.mp4")
                o, of, rss, o_sha = run_ours(url, scratch / "ours.mp4")
            else:
                o, of, rss, o_sha = run_ours(url, scratch / "ours.mp4")
                c, cf, c_sha = run_curl(curl, url, scratch / "curl.mp4")
            if o_sha != c_sha:
                raise SystemExit(f"sha256 differs: ours {o_sha}, curl {c_sha}")
            res.rounds.append(Round(c, cf, o, of, rss))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--dir",
        type=Path,
        action="append",
        dest="dirs",
        help="where the files go (repeatable; default: the temp dir and /dev/shm if writable)",
    )
    parser.add_argument(
        "--mbps",
        type=float,
        action="append",
        help="bandwidth of the simulator's media host in Mbit/s, 0 = unlimited (repeatable; "
        "default: 0 and 1000)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the report goes")
    parser.add_argument("--no-write", action="store_true", help="print the report only")
    args = parser.parse_args()
    explicit_mbps = args.mbps is not None
    args.mbps = args.mbps or [0.0, 1000.0]
    command = f"python -m benchmarks.download --size-mb {args.size_mb}"
    if args.rounds != 5:
        command += f" --rounds {args.rounds}"
    for d in args.dirs or ():
        command += f" --dir {d}"
    if explicit_mbps:
        command += "".join(f" --mbps {m:g}" for m in args.mbps)
    curl = shutil.which("curl")
    if curl is None:
        raise SystemExit("curl is not installed: the baseline of this benchmark is `curl -o`")
    size = args.size_mb * (1 << 20)
    args.load_before = os.getloadavg()[0]

    work = Path(tempfile.mkdtemp(prefix="emo-dl-bench-"))
    results: list[DirResult] = []
    try:
        for mbps in args.mbps:
            link = f"{mbps:g} Mbit/s link" if mbps > 0 else "unlimited loopback"
            sim, base_url, api_key = start_simulator(args.size_mb, work, mbps)
            try:
                url = anyio.run(make_video, base_url, api_key)
                for directory in args.dirs or default_dirs():
                    res = DirResult(directory, f"{link}, {_label(directory)} `{directory}`")
                    results.append(res)
                    measure(res, curl, url, size, args.rounds)
            finally:
                stop_simulator(sim)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    text = report(args, command, "curl -o (`curl -s -f -o FILE URL`)", results)
    print(text)
    if not args.no_write:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
