"""Four web-app processes on one account, sharing its limits and one poller through PostgreSQL.

Run ``python -m benchmarks.webapp_processes``. A throwaway PostgreSQL server and one simulator
process (the account's limits: 20 task queries, 5 submits and 5 detections per second) start;
then 4 worker processes, each one ``Client(shared_account=DSN)`` with the account's limits,
run 50 concurrent ``generate()`` calls each, all at once. When they are done the simulator
dumps what it served; the figures come from that dump:

* task queries (``GET /tasks/{id}`` and ``GET /tasks``) in any 1 s window, account-wide, at
  the simulator (at most the rate required);
* 429s the simulator sent (0 required);
* makespan, from the workers' start to the last one's end.

Writes ``benchmarks/results/webapp_processes.md`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from benchmarks.batch import ROOT, SimProcess, max_in_window
from emo_async import Client, Limits
from emo_async._pg.testing import TempPostgres
from emo_async._samples import make_sample_set

RESULTS = Path(__file__).resolve().parent / "results"
RATES = {"task_qps": 20.0, "list_qps": 10.0, "detect_qps": 5.0, "submit_qps": 5.0}


def account_limits() -> Limits:
    return Limits(
        task_qps=RATES["task_qps"],
        list_qps=5.0,
        detect_qps=RATES["detect_qps"],
        submit_qps=RATES["submit_qps"],
    )


# --- one worker process -----------------------------------------------------------------------


async def worker(spec: dict[str, Any]) -> dict[str, Any]:
    client = Client(
        spec["api_key"],
        base_url=spec["base_url"],
        limits=account_limits(),
        shared_account=spec["dsn"],
    )
    ok = failed = 0
    async with client:

        async def one(job: dict[str, str]) -> None:
            nonlocal ok, failed
            outcome = await client.generate(job["image"], job["audio"], job["dest"])
            ok, failed = (ok + 1, failed) if outcome.ok else (ok, failed + 1)

        async with anyio.create_task_group() as tg:
            for job in spec["jobs"]:
                tg.start_soon(one, job)
        stats = client.statistics()
        terms = client._account.terms if client._account is not None else 0
    return {
        "ok": ok,
        "failed": failed,
        "throttled": stats.throttled,
        "task_queries": stats.poller.task_queries,
        "list_queries": stats.poller.list_queries,
        "leader_terms": terms,
        "end": time.monotonic(),
    }


# --- the conductor ----------------------------------------------------------------------------


async def amain(args: argparse.Namespace, command: str) -> Path:
    work = Path(tempfile.mkdtemp(prefix="emo-webapp-"))
    jobs = make_sample_set(work / "media", args.processes * args.calls, seconds=(2.0, 6.0))
    sim_cfg = {
        "time_scale": args.time_scale,
        "max_running": args.max_running,
        "policy_ttl": 1e7,
        **RATES,
    }
    pg = TempPostgres.start()
    try:
        dsn = pg.create_database("webapp")
        async with SimProcess(sim_cfg, work / "ledger.json") as sim:
            specs = []
            for k in range(args.processes):
                mine = jobs[k * args.calls : (k + 1) * args.calls]
                spec = {
                    "dsn": dsn,
                    "base_url": sim.base_url,
                    "api_key": sim.api_key,
                    "jobs": [
                        {
                            "image": str(j.image),
                            "audio": str(j.audio),
                            "dest": str(work / f"out{k}" / f"{j.name}.mp4"),
                        }
                        for j in mine
                    ],
                }
                path = work / f"spec{k}.json"
                path.write_text(json.dumps(spec))
                specs.append(path)
            t0 = time.monotonic()
            procs = [
                await anyio.open_process(
                    [sys.executable, "-m", "benchmarks.webapp_processes", "--worker", str(p)],
                    stdout=subprocess.PIPE,
                    stderr=None,
                    cwd=ROOT,
                )
                for p in specs
            ]
            outs: list[dict[str, Any]] = [{} for _ in procs]

            async def collect(i: int, proc: anyio.abc.Process) -> None:
                assert proc.stdout is not None
                data = b"".join([chunk async for chunk in proc.stdout])
                await proc.wait()
                outs[i] = json.loads(data.decode().strip().splitlines()[-1])

            async with anyio.create_task_group() as tg:
                for i, proc in enumerate(procs):
                    tg.start_soon(collect, i, proc)
            ledger = await sim.stop()
    finally:
        pg.stop()
    req = ledger["requests"]
    queries = [
        t for t, e in zip(req["t"], req["endpoint"], strict=True) if e in ("task_get", "task_list")
    ]
    in_run = [t for t in req["t"] if t >= t0]
    throttled = Counter(e for e, s in zip(req["endpoint"], req["status"], strict=True) if s == 429)
    makespan = max(o["end"] for o in outs) - t0
    row = {
        "processes": args.processes,
        "calls": args.calls,
        "ok": sum(o["ok"] for o in outs),
        "failed": sum(o["failed"] for o in outs),
        "tasks": len(ledger["tasks"]),
        "task_queries": len(queries),
        "max_queries_1s": max_in_window(queries),
        "rate": RATES["task_qps"],
        "429s": sum(throttled.values()),
        "429_by_endpoint": dict(throttled),
        "requests": len(in_run),
        "makespan": makespan,
        "pollers": [o["leader_terms"] for o in outs],
        "queries_by_process": [o["task_queries"] + o["list_queries"] for o in outs],
    }
    out = anyio.Path(args.out)
    await out.parent.mkdir(parents=True, exist_ok=True)
    await out.write_text(report(row, command, args))
    print(json.dumps(row, indent=1))
    return Path(out)


def report(row: dict[str, Any], command: str, args: argparse.Namespace) -> str:
    held = row["max_queries_1s"] <= row["rate"] and row["429s"] == 0 and row["failed"] == 0
    return (
        "# Four web-app processes, one account\n\n"
        f"Command: `{command}`\n\n"
        f"Date: {_dt.datetime.now(_dt.UTC):%Y-%m-%d %H:%M} UTC. Python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs. A throwaway PostgreSQL "
        "server, one simulator process (time_scale "
        f"{args.time_scale}, max_running {args.max_running}, account limits "
        f"{RATES}), {row['processes']} worker processes, each one "
        "`Client(shared_account=DSN)` with the account's limits and "
        f"{row['calls']} concurrent `generate()` calls. Figures from the simulator's dump.\n\n"
        "| processes × calls | ok | failed | tasks | task queries | max task queries in 1 s "
        "| rate | 429s | requests | makespan s |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
        f"| {row['processes']} × {row['calls']} | {row['ok']} | {row['failed']} | "
        f"{row['tasks']} | {row['task_queries']} | {row['max_queries_1s']} | "
        f"{row['rate']:g} | {row['429s']} | {row['requests']} | {row['makespan']:.1f} |\n\n"
        f"- Poller terms held by each process: {row['pollers']}; task queries and list "
        f"pages sent by each: {row['queries_by_process']} (the poller moves when the "
        "process holding it has finished its calls and closes its client: it hands the "
        "lease over)\n"
        f"- 429s by endpoint: {row['429_by_endpoint'] or 'none'}\n"
        "- Promises (task queries within the rate in every 1 s window, 0 429s, every call "
        f"ok): {'all held' if held else 'NOT HELD'}\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.webapp_processes")
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--calls", type=int, default=50, help="concurrent generate() each")
    parser.add_argument("--time-scale", type=float, default=0.05)
    parser.add_argument("--max-running", type=int, default=50)
    parser.add_argument("--out", default=str(RESULTS / "webapp_processes.md"))
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        spec = json.loads(args.worker.read_text())
        print(json.dumps(anyio.run(worker, spec)), flush=True)
        return 0
    command = "python -m benchmarks.webapp_processes " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    anyio.run(amain, args, command.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
