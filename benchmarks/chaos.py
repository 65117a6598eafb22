"""Chaos benchmark: a batch under every fault at once, against the same batch fault-free.

Run ``python -m benchmarks.chaos --jobs 1000``. Both runs use the same jobs, seed and client
settings, each against a fresh in-process simulator. The chaos run injects, at once: ambiguous
submits (the task is created, the answer is lost), 5xx on submit/queries/detection/uploads,
429 bursts with and without ``Retry-After``, connection resets on queries, downloads cut at
random offsets, objects rewritten under the downloader (new ETag), ignored ``Range`` headers
and slow answers. Everything is checked from the simulator's ledger and the disk, not from
what the client says. Writes ``benchmarks/results/chaos.md`` (or ``--out``).

``tests/test_chaos.py`` runs the same engine at a size that keeps CI fast.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import anyio
import attrs

from emo_async import Client, Job, Limits, Outcome, OutcomeState, PollPolicy, RetryPolicy
from emo_async._samples import make_sample_set
from emo_async.simulator import FaultConfig, Simulator, SimulatorConfig

RESULTS = Path(__file__).resolve().parent / "results"

#: The default retry policy (attempts, budget, Retry-After ceiling), with waits shortened to
#: match the simulator's compressed time.
CHAOS_RETRY = RetryPolicy(wait_initial=0.02, wait_max=0.2)
#: Every fault kind the chaos run must actually have injected (checked from the ledger).
FAULT_KINDS = (
    "ambiguous",
    "error",
    "throttle",
    "reset",
    "truncate",
    "etag_change",
    "ignore_range",
    "slow",
)
#: The fault schedule, in real seconds: BASE_SECONDS of the base faults, then a 429 burst of
#: BURST_SECONDS during which BURST_RATE of the requests are throttled (every other burst with
#: ``Retry-After``), and round again. A burst that met little traffic (the batch was waiting)
#: goes on until it has sent BURST_MIN_429 429s, for at most BURST_MAX_SECONDS.
BASE_SECONDS = 3.0
BURST_SECONDS = 0.3
BURST_MIN_429 = 3
BURST_MAX_SECONDS = 3.0
BURST_RATE = 0.3
BURST_RETRY_AFTER = 0.05


def sim_config(faults: FaultConfig | None = None, *, time_scale: float = 0.002) -> SimulatorConfig:
    """The simulated account of both runs (limits high enough that only faults throttle)."""
    return SimulatorConfig(
        time_scale=time_scale,
        submit_qps=None,
        task_qps=50.0,
        list_qps=50.0,
        detect_qps=50.0,
        policy_qps=None,
        max_running=1000,
        # The upload policy would otherwise last 0.6 s at this time scale.
        policy_ttl=1e7,
        faults=faults or FaultConfig(),
    )


def base_faults(seed: int) -> FaultConfig:
    """The faults present all the time (the 429 bursts come and go on top of these)."""
    five_xx = ("submit", "task_get", "task_list", "detect", "upload")
    return FaultConfig(
        seed=seed,
        ambiguous_submit_rate=0.10,
        error_rate=dict.fromkeys(five_xx, 0.10),
        reset_rate={"task_get": 0.08, "task_list": 0.08},
        throttle_rate={"task_get": 0.005, "submit": 0.005},
        truncate_rate=0.30,
        etag_change_rate=0.12,
        ignore_range_rate=0.35,
        slow_rate=0.04,
        slow_delay=0.2,
    )


def burst_faults(seed: int, *, retry_after: float | None) -> FaultConfig:
    """A 429 burst: a third of the API requests throttled, with or without Retry-After."""
    base = base_faults(seed)
    throttled = ("submit", "task_get", "task_list", "detect", "get_policy", "upload", "media")
    return attrs.evolve(base, throttle_rate=dict.fromkeys(throttled, 0.33), retry_after=retry_after)


def schedule(seed: int, phase: int) -> FaultConfig:
    """Phase ``phase`` of the fault schedule: base, burst with Retry-After, base, burst
    without, and round again. Each phase reseeds the dice from ``seed + phase``."""
    step = phase % 4
    if step == 1:
        return burst_faults(seed + phase, retry_after=0.05)
    if step == 3:
        return burst_faults(seed + phase, retry_after=None)
    return base_faults(seed + phase)


@attrs.frozen
class RunResult:
    """What one run did, as the simulator and the disk saw it.

    Attributes:
        outcomes: The outcomes the batch yielded.
        jobs: Jobs given.
        requests: Every request the simulator received (API, upload and media hosts).
        by_endpoint: Requests per endpoint.
        faults: Requests per injected fault kind.
        tasks_created: Tasks the simulator created (the billing ledger).
        task_ids: Their ids.
        duplicates: Inputs turned into more than one task (fingerprint → task ids).
        auth_leaks: Requests that carried Authorization to a non-API host.
        throttled_with_retry_after: 429s sent during bursts that carried ``Retry-After``.
        throttled_without_retry_after: 429s sent without it.
        bad_files: Outcomes whose file is missing or not byte-exact (name: reason).
        parts_left: ``.part`` / ``.part.json`` files left in the output folder.
        seconds: Wall-clock time of the batch.
    """

    outcomes: tuple[Outcome, ...]
    jobs: int
    requests: int
    by_endpoint: dict[str, int]
    faults: dict[str, int]
    tasks_created: int
    task_ids: frozenset[str]
    duplicates: dict[str, list[str]]
    auth_leaks: int
    throttled_with_retry_after: int
    throttled_without_retry_after: int
    bad_files: tuple[str, ...]
    parts_left: tuple[str, ...]
    seconds: float

    def count(self, state: OutcomeState) -> int:
        return sum(1 for o in self.outcomes if o.state == state)

    @property
    def names_seen(self) -> Counter[str]:
        return Counter(o.job.display_name for o in self.outcomes)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_file(sim: Simulator, o: Outcome) -> str | None:
    """Why a done outcome's file is not the server's video, or None when it is."""
    if o.path is None or o.task_id is None:
        return "done without a path or task id"
    try:
        data = o.path.read_bytes()
    except OSError as exc:
        return f"cannot read {o.path.name}: {exc}"
    try:
        expected = sim.result_bytes(o.task_id)
    except KeyError:
        return f"task {o.task_id} has no result on the server"
    if _sha(data) != _sha(expected):
        return f"{o.path.name}: {len(data)} bytes, sha256 differs from the server's video"
    if o.sha256 != _sha(data) or o.size != len(data):
        return f"{o.path.name}: the outcome's sha256/size do not match the file"
    return None


def _check_disk(
    sim: Simulator, outcomes: Sequence[Outcome], out_dir: Path
) -> tuple[list[str], list[str]]:
    """Done outcomes whose file is not the server's video, and leftover partial files."""
    bad = []
    for o in outcomes:
        if o.state == OutcomeState.DONE:
            reason = _check_file(sim, o)
            if reason is not None:
                bad.append(f"{o.job.display_name}: {reason}")
    parts = sorted(p.name for p in out_dir.rglob("*.part*"))
    return bad, parts


async def run_workload(
    jobs: Sequence[Job],
    out_dir: Path,
    *,
    chaos: bool,
    seed: int = 0,
    max_tasks: int = 20,
    prepare_concurrency: int = 8,
    time_scale: float = 0.002,
) -> RunResult:
    """Run ``jobs`` as one batch against a fresh simulator, with or without the chaos
    schedule, and check every outcome against the ledger and the disk."""
    faults = schedule(seed, 0) if chaos else FaultConfig(seed=seed)
    async with Simulator(sim_config(faults, time_scale=time_scale)) as sim:
        client = Client(
            sim.api_key,
            base_url=sim.base_url,
            limits=Limits(task_qps=40, submit_qps=200, detect_qps=40, policy_qps=100),
            poll=PollPolicy(target_delay=0.05),
            retry=CHAOS_RETRY,
        )
        started = time.monotonic()
        windows: list[tuple[float, float]] = []
        async with client, anyio.create_task_group() as tg:
            if chaos:
                tg.start_soon(_drive_schedule, sim, seed, windows)
            outcomes = await client.run_batch_all(
                list(jobs),
                out_dir,
                max_tasks=max_tasks,
                prepare_concurrency=prepare_concurrency,
            )
            tg.cancel_scope.cancel()
        seconds = time.monotonic() - started
        ledger = sim.ledger
        # The run is over: checking the disk synchronously blocks nothing that matters.
        bad, parts = _check_disk(sim, outcomes, out_dir)
        throttles = [r.t for r in ledger.requests if r.status == 429]
        with_ra = sum(1 for t in throttles if any(a <= t < b for a, b in windows))
        return RunResult(
            outcomes=tuple(outcomes),
            jobs=len(jobs),
            requests=ledger.count(),
            by_endpoint=dict(Counter(r.endpoint for r in ledger.requests)),
            faults=dict(Counter(r.fault for r in ledger.requests if r.fault)),
            tasks_created=len(ledger.tasks_created),
            task_ids=frozenset(t.task_id for t in ledger.tasks_created),
            duplicates=ledger.duplicate_tasks(),
            auth_leaks=len(ledger.auth_leaks()),
            throttled_with_retry_after=with_ra,
            throttled_without_retry_after=len(throttles) - with_ra,
            bad_files=tuple(bad),
            parts_left=tuple(parts),
            seconds=seconds,
        )


async def _drive_schedule(
    sim: Simulator, seed: int, retry_after_windows: list[tuple[float, float]]
) -> None:
    """Step through the schedule; note when 429s carry Retry-After (monotonic windows)."""
    phase = 0
    while True:
        if phase % 2:
            throttled, started = sim.ledger.throttled(), time.monotonic()
            await anyio.sleep(BURST_SECONDS)
            while (
                sim.ledger.throttled() - throttled < BURST_MIN_429
                and time.monotonic() - started < BURST_MAX_SECONDS
            ):
                await anyio.sleep(0.05)
        else:
            await anyio.sleep(BASE_SECONDS)
        phase += 1
        faults = schedule(seed, phase)
        sim.set_faults(faults)
        now = time.monotonic()
        if retry_after_windows and retry_after_windows[-1][1] == float("inf"):
            retry_after_windows[-1] = (retry_after_windows[-1][0], now)
        if faults.retry_after is not None:
            retry_after_windows.append((now, float("inf")))


@attrs.frozen
class Comparison:
    """The fault-free and the chaos run of one workload."""

    clean: RunResult
    chaos: RunResult

    @property
    def request_factor(self) -> float:
        return self.chaos.requests / max(1, self.clean.requests)


async def compare(
    work_dir: Path, n_jobs: int, *, seed: int = 0, portraits: int = 4, max_tasks: int = 20
) -> Comparison:
    """The same jobs fault-free, then under chaos, in fresh output folders."""
    jobs = make_sample_set(
        work_dir / "in", n_jobs, portraits=portraits, seconds=(0.5, 2.0), seed=seed
    )
    clean = await run_workload(
        jobs, work_dir / "out-clean", chaos=False, seed=seed, max_tasks=max_tasks
    )
    chaos = await run_workload(
        jobs, work_dir / "out-chaos", chaos=True, seed=seed, max_tasks=max_tasks
    )
    return Comparison(clean, chaos)


def problems(result: RunResult) -> list[str]:
    """Every broken promise of one run (empty when all hold)."""
    found = []
    if len(result.outcomes) != result.jobs:
        found.append(f"{len(result.outcomes)} outcomes for {result.jobs} jobs")
    twice = [name for name, n in result.names_seen.items() if n > 1]
    if twice:
        found.append(f"jobs with more than one outcome: {twice[:5]}")
    if result.duplicates:
        found.append(f"duplicate tasks: {result.duplicates}")
    outcome_ids = {o.task_id for o in result.outcomes if o.task_id}
    if outcome_ids != result.task_ids:
        orphans = sorted(result.task_ids - outcome_ids)
        found.append(f"tasks created that no outcome owns: {orphans[:5]}")
    found += list(result.bad_files)
    if result.parts_left:
        found.append(f".part files left: {list(result.parts_left[:5])}")
    if result.auth_leaks:
        found.append(f"{result.auth_leaks} requests carried Authorization off the API host")
    for o in result.outcomes:
        if o.state != OutcomeState.DONE and o.error is None:
            found.append(f"{o.job.display_name}: {o.state.value} without an error")
    return found


def report(cmp: Comparison, *, command: str) -> str:
    """The Markdown table of a comparison."""
    c, x = cmp.clean, cmp.chaos
    lines = [
        "# Chaos benchmark",
        "",
        f"Command: `{command}`",
        "",
        f"Date: {_dt.datetime.now(_dt.UTC):%Y-%m-%d %H:%M} UTC. Python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs. Simulator in-process, "
        "time_scale 0.002 (a 15 s task takes 30 ms), retry policy = the default attempts and "
        "budget with waits of 0.02-0.2 s.",
        "",
        "| run | jobs | done | failed | other | tasks created | duplicates | requests | "
        "runtime s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in (("fault-free", c), ("chaos", x)):
        other = len(r.outcomes) - r.count(OutcomeState.DONE) - r.count(OutcomeState.FAILED)
        lines.append(
            f"| {name} | {r.jobs} | {r.count(OutcomeState.DONE)} | "
            f"{r.count(OutcomeState.FAILED)} | {other} | {r.tasks_created} | "
            f"{len(r.duplicates)} | {r.requests} | {r.seconds:.1f} |"
        )
    lines += [
        "",
        f"- Requests under chaos / fault-free: **{cmp.request_factor:.2f}x**",
        f"- Byte-exact files: {x.count(OutcomeState.DONE) - len(x.bad_files)} of "
        f"{x.count(OutcomeState.DONE)} done; `.part` files left: {len(x.parts_left)}; "
        f"Authorization off the API host: {x.auth_leaks}",
        "- Faults injected (requests): "
        + ", ".join(f"{k} {x.faults.get(k, 0)}" for k in FAULT_KINDS),
        "- Requests per endpoint (fault-free → chaos): "
        + ", ".join(
            f"{e} {c.by_endpoint.get(e, 0)}→{x.by_endpoint.get(e, 0)}"
            for e in sorted(set(c.by_endpoint) | set(x.by_endpoint))
        ),
    ]
    broken = problems(c) + problems(x)
    lines.append(
        "- Promises: " + ("all held" if not broken else "BROKEN: " + "; ".join(broken[:10]))
    )
    failed = [o for o in x.outcomes if o.state != OutcomeState.DONE]
    if failed:
        lines += ["", "Jobs that did not end done under chaos:", ""]
        lines += [
            f"- {o.job.display_name}: {o.state.value}: "
            f"{o.error.kind + ': ' + o.error.message if o.error else '?'}"
            for o in failed[:20]
        ]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.chaos",
        description="A batch under every fault at once, against the same batch fault-free.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--jobs", type=int, default=1000, help="jobs in the batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the jobs and the fault dice")
    p.add_argument("--max-tasks", type=int, default=20, help="tasks open at once")
    p.add_argument("--out", type=Path, default=RESULTS, help="where chaos.md goes")
    p.add_argument("--work-dir", type=Path, default=None, help="inputs and outputs (temp)")
    return p.parse_args(argv)


async def _main(args: argparse.Namespace) -> int:
    command = "python -m benchmarks.chaos " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="emo-chaos-") as tmp:
        work = args.work_dir or Path(tmp)
        cmp = await compare(work, args.jobs, seed=args.seed, max_tasks=args.max_tasks)
    text = report(cmp, command=command.strip())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "chaos.md").write_text(text)
    print(text)
    return 0 if not (problems(cmp.clean) + problems(cmp.chaos)) else 1


def main(argv: Sequence[str] | None = None) -> int:
    return anyio.run(_main, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
