"""Chaos benchmark: a batch under every fault at once, against the same batch fault-free.

Run ``python -m benchmarks.chaos --jobs 1000``. Both runs use the same jobs, seed and client
settings, each against a fresh in-process simulator. The chaos run injects, at once (issue 14):
submit answers lost after the task exists (10 %) and before any task exists (5 %), a task list
whose time filter reads another zone (8 h off), another program billing a task on the same key
every 0.3 s, 5xx on submit/queries/detection/uploads, 429 bursts with and without
``Retry-After``, connection resets on queries, downloads cut at random offsets, objects
rewritten under the downloader (new ETag), ignored ``Range`` headers and slow answers.
Everything is checked from the simulator's ledger and the disk, not from what the client says:
a job may end done or unresolved (its answer was lost and nothing proved whose task was whose),
never billed twice, never given another job's video, and no video we paid for may be lost.
Writes ``benchmarks/results/chaos.md`` (or ``--out``).

``tests/test_chaos.py`` runs the same engine at a size that keeps CI fast.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import os
import platform
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import anyio
import attrs

from emo_async import Client, Job, Limits, Outcome, OutcomeState, PollPolicy, RetryPolicy
from emo_async._batch._finisher import UNATTRIBUTED_DIR
from emo_async._samples import make_sample_set
from emo_async.simulator import FaultConfig, RequestRecord, Simulator, SimulatorConfig

RESULTS = Path(__file__).resolve().parent / "results"

#: The default retry policy (attempts, budget, Retry-After ceiling), with waits shortened to
#: match the simulator's compressed time.
CHAOS_RETRY = RetryPolicy(wait_initial=0.02, wait_max=0.2)
#: Every fault kind the chaos run must actually have injected (checked from the ledger).
FAULT_KINDS = (
    "ambiguous",
    "lost",
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
#: Real seconds between the other program's tasks on the same key.
OTHER_PROGRAM_INTERVAL = 0.3
#: The task list's time filter reads UTC+8 (issue 14's zone mix-up).
LIST_TIME_SHIFT = 8 * 3600.0
#: Share of the jobs that must end done under chaos (the rest may be unresolved).
MIN_DONE_SHARE = 0.90


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
        lost_before_submit_rate=0.05,
        list_time_shift=LIST_TIME_SHIFT,
        other_program_interval=OTHER_PROGRAM_INTERVAL,
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
        tasks_created: Tasks the simulator billed to the account (the other program's too).
        task_ids: Their ids.
        foreign: The other program's tasks among them.
        duplicates: Inputs turned into more than one task of ours (fingerprint → task ids).
        tasks_per_job: Job name → tasks of ours made from its audio (jobs with none absent).
        orphans: Tasks of ours made from no job's audio.
        misattributed: Done files holding a video made from other inputs than the job's.
        paid_lost: Tasks of ours that succeeded (paid) whose video is neither a job's done
            file nor kept in ``.unattributed/``.
        kept: Task ids whose video is in ``<out>/.unattributed/``.
        lost_answers: Submits whose answer told nothing (the connection dropped, with or
            without a task behind it, or a 500): the only ways a job may end unresolved.
        auth_leaks: Requests that carried Authorization to a non-API host.
        throttled_with_retry_after: 429s sent during bursts that carried ``Retry-After``.
        throttled_without_retry_after: 429s sent without it.
        bad_files: Done or kept files that are missing or not byte-exact (name: reason).
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
    foreign: frozenset[str]
    duplicates: dict[str, list[str]]
    tasks_per_job: dict[str, int]
    orphans: tuple[str, ...]
    misattributed: tuple[str, ...]
    paid_lost: tuple[str, ...]
    kept: frozenset[str]
    lost_answers: int
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

    @property
    def ours(self) -> frozenset[str]:
        """Tasks billed for our jobs: everything created but the other program's."""
        return self.task_ids - self.foreign

    @property
    def billed_jobs(self) -> int:
        """Jobs the ledger shows at least one task of ours for."""
        return len(self.tasks_per_job)

    @property
    def done_share(self) -> float:
        return self.count(OutcomeState.DONE) / max(1, self.jobs)

    def unresolved_reasons(self) -> Counter[str]:
        """The unresolved outcomes' messages, with ids and figures masked so alike ones group."""
        return Counter(
            _mask(o.error.message if o.error else "?")
            for o in self.outcomes
            if o.state == OutcomeState.UNRESOLVED
        )


def _mask(message: str) -> str:
    message = re.sub(r"\btask [\w-]+", "task <id>", message)
    message = re.sub(r"candidate(s| tasks:) [\w, -]+", "candidates <ids>", message)
    return re.sub(r"\d+(\.\d+)?", "N", message)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_file(sim: Simulator, path: Path | None, task_id: str | None) -> str | None:
    """Why a file is not the server's video of ``task_id``, or None when it is."""
    if path is None or task_id is None:
        return "no path or task id"
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"cannot read {path.name}: {exc}"
    try:
        expected = sim.result_bytes(task_id)
    except KeyError:
        return f"task {task_id} has no result on the server"
    if _sha(data) != _sha(expected):
        return f"{path.name}: {len(data)} bytes, sha256 differs from the server's video"
    return None


@attrs.frozen
class _Audit:
    """The ledger and the disk compared with the outcomes (see :class:`RunResult`)."""

    tasks_per_job: dict[str, int]
    orphans: tuple[str, ...]
    misattributed: tuple[str, ...]
    paid_lost: tuple[str, ...]
    kept: frozenset[str]
    bad_files: tuple[str, ...]
    parts_left: tuple[str, ...]


def audit(
    sim: Simulator, jobs: Sequence[Job], outcomes: Sequence[Outcome], out_dir: Path
) -> _Audit:
    """Check every outcome and every task of ours against the ledger and the disk.

    A task is tied to a job by what it was made from (the sha256 of the audio the simulator
    received, equal to the job's audio file), never by what the client reports.
    """
    ledger = sim.ledger
    job_of_audio = {_sha(Path(job.audio).read_bytes()): job.display_name for job in jobs}
    ours = [t.task_id for t in ledger.tasks_created if t.task_id not in ledger.foreign_tasks]
    per_job: Counter[str] = Counter()
    orphans = []
    for task_id in ours:
        name = job_of_audio.get(ledger.task_inputs(task_id).audio_sha256)
        if name is None:
            orphans.append(task_id)
        else:
            per_job[name] += 1
    bad, wrong = [], []
    done_ids = set()
    for o in outcomes:
        if o.state != OutcomeState.DONE:
            continue
        done_ids.add(o.task_id)
        reason = _check_file(sim, o.path, o.task_id)
        if reason is None and o.path is not None and o.sha256 != _sha(o.path.read_bytes()):
            reason = "the outcome's sha256 does not match the file"
        if reason is not None:
            bad.append(f"{o.job.display_name}: {reason}")
        if o.task_id is not None:
            try:
                made_from = ledger.task_inputs(o.task_id).audio_sha256
            except KeyError:
                made_from = None
            if job_of_audio.get(made_from or "") != o.job.display_name:
                wrong.append(f"{o.job.display_name}: holds task {o.task_id}, made from other audio")
    kept_dir = out_dir / UNATTRIBUTED_DIR
    kept = frozenset(p.stem for p in kept_dir.glob("*.mp4")) if kept_dir.is_dir() else frozenset()
    for task_id in sorted(kept):
        reason = _check_file(sim, kept_dir / f"{task_id}.mp4", task_id)
        if reason is not None:
            bad.append(f"{UNATTRIBUTED_DIR}/{task_id}.mp4: {reason}")
    snapshots = sim.tasks
    lost = tuple(
        t
        for t in ours
        if snapshots[t].status == "SUCCEEDED" and t not in done_ids and t not in kept
    )
    return _Audit(
        tasks_per_job=dict(per_job),
        orphans=tuple(orphans),
        misattributed=tuple(wrong),
        paid_lost=lost,
        kept=kept,
        bad_files=tuple(bad),
        parts_left=tuple(sorted(p.name for p in out_dir.rglob("*.part*"))),
    )


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
        found = audit(sim, jobs, outcomes, out_dir)
        ours = [t for t in ledger.tasks_created if t.task_id not in ledger.foreign_tasks]
        fingerprints = Counter(t.fingerprint for t in ours)
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
            foreign=frozenset(ledger.foreign_tasks),
            duplicates={
                fp: ids for fp, ids in ledger.duplicate_tasks().items() if fingerprints[fp] > 1
            },
            tasks_per_job=found.tasks_per_job,
            orphans=found.orphans,
            misattributed=found.misattributed,
            paid_lost=found.paid_lost,
            kept=found.kept,
            lost_answers=sum(1 for r in ledger.requests if _answer_lost(r)),
            auth_leaks=len(ledger.auth_leaks()),
            throttled_with_retry_after=with_ra,
            throttled_without_retry_after=len(throttles) - with_ra,
            bad_files=found.bad_files,
            parts_left=found.parts_left,
            seconds=seconds,
        )


def _answer_lost(r: RequestRecord) -> bool:
    if r.endpoint != "submit":
        return False
    return r.fault in ("ambiguous", "lost") or (r.fault == "error" and r.status == 500)


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


#: The states a job may end in under these faults: nothing here is the job's own fault, so
#: nothing may fail; a lost answer that nothing settles ends unresolved, never resent.
ALLOWED_STATES = frozenset({OutcomeState.DONE, OutcomeState.UNRESOLVED})


def problems(result: RunResult, *, min_done: float = 0.0) -> list[str]:
    """Every broken promise of one run (empty when all hold)."""
    found = []
    if len(result.outcomes) != result.jobs:
        found.append(f"{len(result.outcomes)} outcomes for {result.jobs} jobs")
    twice = [name for name, n in result.names_seen.items() if n > 1]
    if twice:
        found.append(f"jobs with more than one outcome: {twice[:5]}")
    odd = Counter(o.state.value for o in result.outcomes if o.state not in ALLOWED_STATES)
    if odd:
        found.append(f"jobs ended neither done nor unresolved: {dict(odd)}")
    if result.duplicates:
        found.append(f"duplicate tasks: {result.duplicates}")
    billed_twice = {name: n for name, n in result.tasks_per_job.items() if n > 1}
    if billed_twice:
        found.append(f"jobs with more than one task: {billed_twice}")
    if result.orphans:
        found.append(f"tasks of ours made from no job's audio: {list(result.orphans[:5])}")
    done_ids = [o.task_id for o in result.outcomes if o.state == OutcomeState.DONE]
    if len(set(done_ids)) != len(done_ids) or not set(done_ids) <= result.ours:
        found.append("done jobs share a task, or hold one the ledger does not bill to us")
    found += list(result.misattributed)
    if result.paid_lost:
        found.append(f"paid videos lost: {list(result.paid_lost[:5])}")
    found += list(result.bad_files)
    if result.parts_left:
        found.append(f".part files left: {list(result.parts_left[:5])}")
    if result.auth_leaks:
        found.append(f"{result.auth_leaks} requests carried Authorization off the API host")
    for o in result.outcomes:
        if o.state != OutcomeState.DONE and o.error is None:
            found.append(f"{o.job.display_name}: {o.state.value} without an error")
    if result.count(OutcomeState.UNRESOLVED) > result.lost_answers:
        found.append(
            f"{result.count(OutcomeState.UNRESOLVED)} jobs unresolved but only "
            f"{result.lost_answers} submit answers were lost"
        )
    if result.done_share < min_done:
        found.append(f"only {result.done_share:.1%} of the jobs done (< {min_done:.0%})")
    return found


def report(cmp: Comparison, *, command: str) -> str:
    """The Markdown report of a comparison."""
    c, x = cmp.clean, cmp.chaos
    lines = [
        "# Chaos benchmark",
        "",
        f"Command: `{command}`",
        "",
        f"Date: {_dt.datetime.now(_dt.UTC):%Y-%m-%d %H:%M} UTC. Python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs. Simulator in-process, "
        "time_scale 0.002 (a 15 s task takes 30 ms), retry policy = the default attempts and "
        "budget with waits of 0.02-0.2 s. Every figure below comes from the simulator's ledger "
        "and the disk, not from what the client reports.",
        "",
        "| run | jobs | done | unresolved | other | tasks of ours | foreign tasks | "
        "duplicates | misattributed files | paid videos lost | kept unattributed | requests | "
        "makespan s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in (("fault-free", c), ("chaos", x)):
        done, unresolved = r.count(OutcomeState.DONE), r.count(OutcomeState.UNRESOLVED)
        lines.append(
            f"| {name} | {r.jobs} | {done} ({r.done_share:.1%}) | {unresolved} | "
            f"{len(r.outcomes) - done - unresolved} | {len(r.ours)} | {len(r.foreign)} | "
            f"{len(r.duplicates)} | {len(r.misattributed)} | {len(r.paid_lost)} | "
            f"{len(r.kept)} | {r.requests} | {r.seconds:.1f} |"
        )
    lines += [
        "",
        f"- Requests under chaos / fault-free: **{cmp.request_factor:.2f}x**; makespan "
        f"{x.seconds:.1f} s vs {c.seconds:.1f} s fault-free",
        f"- Jobs billed (a task of ours made from their audio): {x.billed_jobs}; tasks of "
        f"ours: {len(x.ours)}; submit answers that told nothing: {x.lost_answers} (dropped "
        f"after the task existed: {x.faults.get('ambiguous', 0)}; dropped with no task: "
        f"{x.faults.get('lost', 0)}; the rest 500s, with no task either)",
        f"- Byte-exact files: {x.count(OutcomeState.DONE) - len(x.bad_files)} of "
        f"{x.count(OutcomeState.DONE)} done (+ {len(x.kept)} kept in `.unattributed/`); "
        f"`.part` files left: {len(x.parts_left)}; Authorization off the API host: "
        f"{x.auth_leaks}",
        "- Faults injected (requests): "
        + ", ".join(f"{k} {x.faults.get(k, 0)}" for k in FAULT_KINDS),
        "- Requests per endpoint (fault-free → chaos): "
        + ", ".join(
            f"{e} {c.by_endpoint.get(e, 0)}→{x.by_endpoint.get(e, 0)}"
            for e in sorted(set(c.by_endpoint) | set(x.by_endpoint))
        ),
    ]
    broken = problems(c, min_done=1.0) + problems(x, min_done=MIN_DONE_SHARE)
    lines.append(
        "- Promises: " + ("all held" if not broken else "BROKEN: " + "; ".join(broken[:10]))
    )
    reasons = x.unresolved_reasons()
    if reasons:
        lines += ["", "Why jobs ended unresolved under chaos (messages, figures masked):", ""]
        lines += [f"- {n} x {msg}" for msg, n in reasons.most_common()]
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
    broken = problems(cmp.clean, min_done=1.0) + problems(cmp.chaos, min_done=MIN_DONE_SHARE)
    return 0 if not broken else 1


def main(argv: Sequence[str] | None = None) -> int:
    return anyio.run(_main, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
