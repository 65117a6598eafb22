"""Three programs on one account: lost answers must not make them bill twice or swap videos.

Run ``python -m benchmarks.shared_account --jobs 120``. One simulator runs in its own process
(10 % of submit answers lost after the task exists); three worker processes, each with its own
client, journal and output folder, run a third of the jobs each against the same account and
key, all at once. Each sees the others' tasks in the task list as strangers, so a lost answer
can be adopted only on proof that the task is its own. When all are done the simulator dumps
what it billed and served; the check uses that dump and the disks only:

* duplicates: a job's audio turned into more than one task (0 required);
* misattributed: a done file whose task was made from other audio, or whose bytes are not that
  task's video (0 required);
* paid videos lost: tasks that succeeded and are neither some worker's done file nor kept in
  some worker's ``.unattributed/`` (0 required).

Writes ``benchmarks/results/shared_account.md`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel

from benchmarks.chaos import CHAOS_RETRY, sim_config
from emo_async import Client, Job, Limits, OutcomeState, PollPolicy
from emo_async._batch._finisher import UNATTRIBUTED_DIR
from emo_async._samples import make_sample_set
from emo_async.simulator import FaultConfig, Simulator

RESULTS = Path(__file__).resolve().parent / "results"
LOST_RATE = 0.10


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- the simulator process -------------------------------------------------------------------


async def _serve(seed: int) -> dict[str, Any]:
    faults = FaultConfig(seed=seed, ambiguous_submit_rate=LOST_RATE)
    async with Simulator(sim_config(faults)) as sim:
        print(f"EMO_SIMULATOR base_url={sim.base_url} api_key={sim.api_key}", flush=True)
        async with anyio.create_task_group() as tg:
            token = anyio.lowlevel.current_token()

            def on_eof() -> None:
                # The parent closes our stdin when every worker is done.
                sys.stdin.read()
                with contextlib.suppress(RuntimeError):
                    anyio.from_thread.run_sync(tg.cancel_scope.cancel, token=token)

            threading.Thread(target=on_eof, daemon=True).start()
            await anyio.sleep_forever()
        ledger = sim.ledger
        snapshots = sim.tasks
        tasks = []
        for rec in ledger.tasks_created:
            status = snapshots[rec.task_id].status
            inputs = ledger.task_inputs(rec.task_id)
            tasks.append(
                {
                    "id": rec.task_id,
                    "foreign": rec.foreign,
                    "status": status,
                    "audio_sha256": inputs.audio_sha256,
                    "result_sha256": (
                        _sha(sim.result_bytes(rec.task_id)) if status == "SUCCEEDED" else None
                    ),
                }
            )
        body: dict[str, Any] = {
            "tasks": tasks,
            "requests": ledger.count(),
            "faults": dict(Counter(r.fault for r in ledger.requests if r.fault)),
        }
        return body


# --- a worker process ------------------------------------------------------------------------


async def _work(
    base_url: str, api_key: str, jobs: list[Job], out_dir: Path
) -> list[dict[str, Any]]:
    client = Client(
        api_key,
        base_url=base_url,
        limits=Limits(task_qps=40, submit_qps=200, detect_qps=40, policy_qps=100),
        poll=PollPolicy(target_delay=0.05),
        retry=CHAOS_RETRY,
    )
    async with client:
        outcomes = await client.run_batch_all(
            jobs, out_dir, journal=out_dir / ".journal.sqlite3", max_tasks=10
        )
    return [
        {
            "name": o.job.display_name,
            "state": o.state.value,
            "task_id": o.task_id,
            "path": str(o.path) if o.path else None,
            "error": o.error.message if o.error else None,
        }
        for o in outcomes
    ]


# --- the parent: start everything, then audit ------------------------------------------------


async def _run(work: Path, n_jobs: int, workers: int, seed: int) -> dict[str, Any]:
    jobs = make_sample_set(work / "in", n_jobs, portraits=3, seconds=(0.5, 2.0), seed=seed)
    me = [sys.executable, "-m", "benchmarks.shared_account"]
    dump = work / "ledger.json"
    sim = await asyncio.create_subprocess_exec(
        *me,
        "serve",
        "--seed",
        str(seed),
        "--dump",
        str(dump),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert sim.stdout is not None
    assert sim.stdin is not None
    line = (await sim.stdout.readline()).decode()
    fields = dict(kv.split("=", 1) for kv in line.split()[1:])
    started = time.monotonic()
    procs = []
    for w in range(workers):
        share = jobs[w::workers]
        out = work / f"worker-{w + 1}"
        out.mkdir(parents=True)
        jobs_file = work / f"jobs-{w + 1}.json"
        jobs_file.write_text(
            json.dumps(
                [{"image": str(j.image), "audio": str(j.audio), "name": j.name} for j in share]
            )
        )
        procs.append(
            await asyncio.create_subprocess_exec(
                *me,
                "work",
                "--base-url",
                fields["base_url"],
                "--api-key",
                fields["api_key"],
                "--jobs-file",
                str(jobs_file),
                "--out-dir",
                str(out),
            )
        )
    codes = [await p.wait() for p in procs]
    seconds = time.monotonic() - started
    sim.stdin.close()
    await sim.wait()
    ledger = json.loads(dump.read_text())
    outcomes = []
    for w in range(workers):
        outcomes += json.loads((work / f"worker-{w + 1}" / "outcomes.json").read_text())
    return audit(jobs, outcomes, ledger, [work / f"worker-{w + 1}" for w in range(workers)]) | {
        "worker_exit_codes": codes,
        "seconds": seconds,
    }


def audit(
    jobs: Sequence[Job], outcomes: list[dict[str, Any]], ledger: dict[str, Any], outs: list[Path]
) -> dict[str, Any]:
    """The promises, from the simulator's dump and the disks only."""
    job_of_audio = {_sha(Path(j.audio).read_bytes()): j.display_name for j in jobs}
    tasks = {t["id"]: t for t in ledger["tasks"] if not t["foreign"]}
    per_job = Counter(job_of_audio.get(t["audio_sha256"], "?") for t in tasks.values())
    duplicates = {name: n for name, n in per_job.items() if n > 1}
    misattributed = []
    done_ids = set()
    for o in outcomes:
        if o["state"] != OutcomeState.DONE.value:
            continue
        done_ids.add(o["task_id"])
        task = tasks.get(o["task_id"])
        data = Path(o["path"]).read_bytes()
        if task is None or job_of_audio.get(task["audio_sha256"]) != o["name"]:
            misattributed.append(f"{o['name']}: task {o['task_id']} made from other audio")
        elif _sha(data) != task["result_sha256"]:
            misattributed.append(f"{o['name']}: the file is not task {o['task_id']}'s video")
    kept = {p.stem for out in outs for p in (out / UNATTRIBUTED_DIR).glob("*.mp4")}
    lost = [
        t["id"]
        for t in tasks.values()
        if t["status"] == "SUCCEEDED" and t["id"] not in done_ids | kept
    ]
    return {
        "jobs": len(jobs),
        "outcomes": len(outcomes),
        "states": dict(Counter(o["state"] for o in outcomes)),
        "tasks": len(tasks),
        "billed_jobs": sum(1 for name in per_job if name != "?"),
        "orphans": per_job.get("?", 0),
        "duplicates": duplicates,
        "misattributed": misattributed,
        "paid_lost": lost,
        "kept": len(kept),
        "requests": ledger["requests"],
        "faults": ledger["faults"],
        "unresolved": Counter(o["error"] for o in outcomes if o["state"] == "unresolved"),
    }


def report(r: dict[str, Any], *, command: str, workers: int) -> str:
    ok = (
        not r["duplicates"]
        and not r["misattributed"]
        and not r["paid_lost"]
        and not r["orphans"]
        and r["outcomes"] == r["jobs"]
        and set(r["worker_exit_codes"]) == {0}
    )
    lines = [
        "# Three programs, one account",
        "",
        f"Command: `{command}`",
        "",
        f"Date: {_dt.datetime.now(_dt.UTC):%Y-%m-%d %H:%M} UTC. Python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs. One simulator process "
        f"(time_scale 0.002, {LOST_RATE:.0%} of submit answers lost after the task exists), "
        f"{workers} worker processes on the same key, each with its own client, journal and "
        "output folder, all at once. Figures from the simulator's dump and the disks only.",
        "",
        "| jobs | outcomes | states | tasks billed | jobs billed | duplicates | "
        "misattributed files | paid videos lost | kept unattributed | lost answers | requests "
        "| makespan s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {r['jobs']} | {r['outcomes']} | {r['states']} | {r['tasks']} | {r['billed_jobs']} "
        f"| {len(r['duplicates'])} | {len(r['misattributed'])} | {len(r['paid_lost'])} | "
        f"{r['kept']} | {r['faults'].get('ambiguous', 0)} | {r['requests']} | "
        f"{r['seconds']:.1f} |",
        "",
        f"- Worker exit codes: {r['worker_exit_codes']}; tasks made from no job's audio: "
        f"{r['orphans']}",
        "- Promises (0 duplicates, 0 misattributed, 0 paid videos lost): "
        + ("all held" if ok else "BROKEN: " + json.dumps(
            {k: r[k] for k in ("duplicates", "misattributed", "paid_lost")})),
    ]  # fmt: skip
    if r["unresolved"]:
        lines += ["", "Unresolved:", ""] + [f"- {n} x {m}" for m, n in r["unresolved"].items()]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.shared_account")
    sub = p.add_subparsers(dest="cmd")
    serve = sub.add_parser("serve")
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument("--dump", type=Path, required=True)
    work = sub.add_parser("work")
    for name in ("--base-url", "--api-key", "--jobs-file", "--out-dir"):
        work.add_argument(name, required=True)
    p.add_argument("--jobs", type=int, default=120, help="jobs in all")
    p.add_argument("--workers", type=int, default=3, help="worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS, help="where shared_account.md goes")
    args = p.parse_args(argv)
    if args.cmd == "serve":
        args.dump.write_text(json.dumps(anyio.run(_serve, args.seed)))
        return 0
    if args.cmd == "work":
        raw = json.loads(Path(args.jobs_file).read_text())
        jobs = [Job(j["image"], j["audio"], name=j["name"]) for j in raw]
        out_dir = Path(args.out_dir)
        rows = anyio.run(_work, args.base_url, args.api_key, jobs, out_dir)
        (out_dir / "outcomes.json").write_text(json.dumps(rows))
        return 0
    command = "python -m benchmarks.shared_account " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="emo-shared-") as tmp:
        result = asyncio.run(_run(Path(tmp), args.jobs, args.workers, args.seed))
    text = report(result, command=command.strip(), workers=args.workers)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shared_account.md").write_text(text)
    print(text)
    broken = result["duplicates"] or result["misattributed"] or result["paid_lost"]
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
