"""Several worker processes on one batch shared through PostgreSQL (issue 18).

Run ``python -m benchmarks.workers --jobs 300``. A simulator process with the account's limits
(``benchmarks._sim_proc``) and a throwaway PostgreSQL server (``TempPostgres``); the cases:

a. one ``emo-async run MANIFEST --journal DSN --batch B`` process does the batch alone;
b. three such processes at once on the same batch (each enqueues the manifest: by key, so the
   batch holds each job once) and share it through claims;
c. like b, and one of them is killed with SIGKILL mid-run: the others take its jobs after its
   lease;
d. like b, and PostgreSQL is restarted (down a few seconds) mid-run.

Measured at the simulator's ledger and on disk only: makespan, duplicate tasks (two tasks of
one job's audio), video files per job, 429s, and the most task queries (``GET /tasks`` and
``GET /tasks/{id}``) the account received in any 1 s window.

Every worker is told the account's full limits (``--task-qps``, ``--submit-rate``): a worker
of a shared batch shares the account through the same DSN (its limiters and one poller), so
the limits hold for the account, not per process.

Writes ``benchmarks/results/workers.md`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import wave
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from benchmarks.batch import ROOT, SimProcess, max_in_window
from emo_async._pg.testing import TempPostgres
from emo_async._samples import make_sample_set

RESULTS = Path(__file__).resolve().parent / "results"
KEY_ENV = "EMO_BENCH_KEY"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.workers", description=__doc__)
    p.add_argument("--jobs", type=int, default=300)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--time-scale", type=float, default=0.02)
    p.add_argument("--task-qps", type=float, default=20.0, help="the account's query rate")
    p.add_argument("--max-tasks", type=int, default=20, help="the account's open tasks")
    p.add_argument("--lease", type=float, default=10.0)
    p.add_argument("--cases", default="abcd")
    p.add_argument("--submit-qps", type=float, default=10.0, help="the account's submit rate")
    p.add_argument("--out", type=Path, default=RESULTS / "workers.md")
    return p.parse_args(argv)


def sim_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "time_scale": args.time_scale,
        "task_qps": args.task_qps,
        "list_qps": args.task_qps,
        "detect_qps": 5.0,
        "submit_qps": args.submit_qps,
        "max_running": args.max_tasks,
        "policy_ttl": 300.0 / args.time_scale,
        "seed": 1,
    }


def worker_cmd(
    args: argparse.Namespace, sim: SimProcess, dsn: str, manifest: Path, out: Path, share: int
) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "emo_async",
        "run",
        str(manifest),
        "--out",
        str(out),
        "--journal",
        dsn,
        "--batch",
        "bench",
        "--lease",
        str(args.lease),
        "--max-tasks",
        str(args.max_tasks),
        "--task-qps",
        f"{args.task_qps:.3f}",
        "--submit-rate",
        f"{args.submit_qps:.3f}",
        "--poll-delay",
        f"{max(0.05, 5 * args.time_scale):.3f}",
        "--base-url",
        sim.base_url,
        "--api-key-env",
        KEY_ENV,
        "--quiet",
    ]
    return cmd


def verify(tasks: list[dict[str, Any]], outs: list[Path], media: Path) -> tuple[int, int]:
    """(files byte-identical to the video of a task made from their own job's audio, paid
    videos in no file). The sample clips all differ in duration, so a task's billed audio
    names its job."""
    by_digest = {t["sha256"]: t for t in tasks if t.get("sha256")}
    verified = 0
    saved: set[str] = set()
    for out in outs:
        for path in out.glob("*.mp4"):
            task = by_digest.get(hashlib.sha256(path.read_bytes()).hexdigest())
            wav = next(media.rglob(f"{path.stem}.wav"), None)
            if task is None or wav is None:
                continue
            with wave.open(str(wav)) as w:
                seconds = w.getnframes() / w.getframerate()
            if abs(seconds - task["audio"]) < 0.01:
                verified += 1
                saved.add(task["id"])
    lost = sum(1 for t in tasks if t["status"] == "SUCCEEDED" and t["id"] not in saved)
    return verified, lost


def spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("w") as err:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)


async def run_case(
    case: str, args: argparse.Namespace, pg: TempPostgres, media: Path, manifest: Path, work: Path
) -> dict[str, Any]:
    dsn = pg.create_database(f"bench_{case}_{os.getpid()}")
    n = 1 if case == "a" else args.workers
    async with SimProcess(sim_config(args), work / f"ledger-{case}.json") as sim:
        env = {**os.environ, KEY_ENV: sim.api_key}
        outs = [work / f"out-{case}{i}" for i in range(n)]
        procs = [
            spawn(worker_cmd(args, sim, dsn, manifest, outs[i], n), env, work / f"w-{case}{i}.log")
            for i in range(n)
        ]
        started = time.monotonic()
        event = ""
        if case in "cd":
            # Mid-run: once a third of the videos are saved.
            while sum(len(list(o.glob("*.mp4"))) for o in outs) < args.jobs // 3:
                await anyio.sleep(0.2)
            if case == "c":
                procs[0].send_signal(signal.SIGKILL)
                event = f"worker 0 killed at {time.monotonic() - started:.1f} s"
            else:
                t = time.monotonic() - started
                await anyio.to_thread.run_sync(lambda: pg.restart(down_for=3.0))
                event = f"PostgreSQL down from {t:.1f} s to {time.monotonic() - started:.1f} s"
        codes = [await anyio.to_thread.run_sync(p.wait) for p in procs]
        makespan = time.monotonic() - started
        ledger = await sim.stop()
    req = ledger["requests"]
    task_times = [
        t for t, e in zip(req["t"], req["endpoint"], strict=True) if e in ("task_get", "task_list")
    ]
    audio = Counter(round(t["audio"], 4) for t in ledger["tasks"])
    files = Counter(p.stem for o in outs for p in o.glob("*.mp4"))
    verified, lost = verify(ledger["tasks"], outs, media)
    return {
        "case": case,
        "workers": n,
        "makespan": makespan,
        "exit_codes": codes,
        "tasks": len(ledger["tasks"]),
        "duplicates": sum(c - 1 for c in audio.values() if c > 1),
        "files_per_job": sorted(set(files.values())) if files else [0],
        "jobs_with_file": len(files),
        "verified": verified,
        "paid_lost": lost,
        "throttled": sum(1 for s in req["status"] if s == 429),
        "max_task_queries_1s": max_in_window(sorted(task_times)) if task_times else 0,
        "event": event,
    }


NAMES = {
    "a": "one process alone",
    "b": "workers on one batch",
    "c": "one worker killed (SIGKILL) mid-run",
    "d": "PostgreSQL restarted mid-run",
}


def report(rows: list[dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    by = {r["case"]: r for r in rows}
    lines = [
        "# Several workers on one shared batch (PostgreSQL)",
        "",
        f"Command: `{command}`",
        "",
        f"{args.jobs} jobs; the simulated account allows {args.task_qps:g} task queries/s,"
        f" {args.submit_qps:g} submits/s and {args.max_tasks} open tasks (time scale"
        f" {args.time_scale}); lease {args.lease:g} s. Every worker is given the account's full"
        " limits and shares them (and one poller) with the others through the DSN.",
        "",
        "| case | workers | makespan | tasks | duplicate tasks | jobs with a file | files per job"
        " | verified files | paid videos lost | 429s | max task queries in 1 s | exit codes"
        " | event |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']}: {NAMES[r['case']]} | {r['workers']} | {r['makespan']:.1f} s"
            f" | {r['tasks']} | {r['duplicates']} | {r['jobs_with_file']}/{args.jobs}"
            f" | {r['files_per_job']} | {r['verified']}/{args.jobs} | {r['paid_lost']}"
            f" | {r['throttled']} | {r['max_task_queries_1s']}"
            f" | {r['exit_codes']} | {r['event']} |"
        )
    if "a" in by and "b" in by:
        ratio = by["b"]["makespan"] / by["a"]["makespan"]
        lines += ["", f"Makespan ratio (b)/(a): **{ratio:.2f}** (target ≤ 1.1)."]
    return "\n".join(lines) + "\n"


async def amain(args: argparse.Namespace, command: str) -> None:
    work = Path(tempfile.mkdtemp(prefix="emo-workers-"))
    jobs = make_sample_set(work / "media", args.jobs, portraits=4, seconds=(2.0, 8.0), seed=3)
    manifest = work / "m.csv"
    manifest.write_text(
        "image,audio,name\n" + "".join(f"{j.image},{j.audio},{j.display_name}\n" for j in jobs)
    )
    pg = await anyio.to_thread.run_sync(TempPostgres.start)
    rows = []
    try:
        for case in args.cases:
            print(f"case {case}: {NAMES[case]} ...", flush=True)
            row = await run_case(case, args, pg, work / "media", manifest, work)
            print(row, flush=True)
            rows.append(row)
    finally:
        await anyio.to_thread.run_sync(pg.stop)
    text = report(rows, args, command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    print(f"(work folder: {work})")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m benchmarks.workers " + " ".join(sys.argv[1:] if argv is None else argv)
    anyio.run(amain, args, command.strip())
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "main"
    raise SystemExit(main())
