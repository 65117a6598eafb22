"""Regimes benchmark: each contender in the three regimes of an account, at two latencies.

Run ``python -m benchmarks.regimes`` (see ``benchmarks/README.md``). For every regime
(concurrency-, submit- or query-bound: which account limit binds) and every per-request latency
(the simulator's ``FaultConfig.latency``, on every request, submit answers included), each
contender runs in its own process against a fresh simulator process with the same seed
(``benchmarks._sim_proc``); what reached the server is counted from the simulator's ledger.
Each run is compared with the ideal client on that run's own task durations and with the
mean-T bound. Writes ``benchmarks/results/regimes.md`` and ``regimes.json`` (or into ``--out``).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio

from benchmarks._regimes_report import report
from benchmarks.batch import (
    ROOT,
    SimProcess,
    bound,
    make_workload,
    percentile,
    static_server,
)

RESULTS = Path(__file__).resolve().parent / "results"

#: Contender name → the kind ``benchmarks._contenders`` runs.
CONTENDERS = {
    "emo_async": "emo_async",
    "dashscope1": "dashscope",
    "dashscope2": "dashscope2",
    "naive": "naive",
}

#: The account of each regime: concurrent tasks C, submits/s R, task GETs/s Q, list pages/s.
#: With the default workload (150 jobs, T ≈ 5 s real) exactly one term of the mean-T bound
#: ``max(⌈N/C⌉·T, (N−1)/R + T, N/Q)`` dominates each (see the README for the figures).
REGIMES: dict[str, dict[str, float]] = {
    "concurrency": {"concurrency": 25, "submit_qps": 10.0, "task_qps": 20.0, "list_qps": 10.0},
    "submit": {"concurrency": 100, "submit_qps": 5.0, "task_qps": 20.0, "list_qps": 10.0},
    "query": {"concurrency": 100, "submit_qps": 20.0, "task_qps": 5.0, "list_qps": 2.0},
}

_T0 = time.monotonic()


def say(message: str) -> None:
    print(f"[regimes {time.monotonic() - _T0:5.0f} s] {message}", flush=True)


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.regimes",
        description="Each contender in the concurrency-, submit- and query-bound regimes, "
        "at several per-request latencies, against the ideal client on the run's durations.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--jobs", type=int, default=150, help="N: jobs in every batch")
    p.add_argument("--regimes", default=",".join(REGIMES), help="comma-separated subset")
    p.add_argument("--latencies", default="0,150", help="per-request latencies, ms")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset")
    p.add_argument("--time-scale", type=float, default=0.08, help="real s per simulated s")
    p.add_argument("--portraits", type=int, default=4, help="distinct portraits")
    p.add_argument("--detect-qps", type=float, default=5.0, help="emo-detect-v1 per second")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--our-overfill", type=int, default=8, help="emo_async: max_tasks = C + this")
    p.add_argument("--naive-interval", type=float, default=1.0, help="naive poll interval, s")
    p.add_argument(
        "--timeout", type=float, default=240.0, help="a contender still running is stopped"
    )
    p.add_argument(
        "--chaos",
        type=int,
        default=0,
        metavar="N",
        help="also run `python -m benchmarks.chaos --jobs N` and report it (0: skip)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke-test size: 16 jobs, time_scale 0.02, 2 portraits (the regimes' limits "
        "need not bind at this size)",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="where regimes.md/json go")
    p.add_argument("--work-dir", type=Path, default=None, help="scratch (default: a temp dir)")
    args = p.parse_args(argv)
    if args.quick:
        args.jobs, args.time_scale, args.portraits = min(args.jobs, 16), 0.02, 2
    args.regimes = _csv(args.regimes)
    args.contenders = _csv(args.contenders)
    args.latencies = [float(v) for v in _csv(args.latencies)]
    for name, known in (("regimes", REGIMES), ("contenders", CONTENDERS)):
        unknown = set(getattr(args, name)) - set(known)
        if unknown:
            p.error(f"unknown {name}: {', '.join(sorted(unknown))}")
    if args.jobs < 1 or any(v < 0 for v in args.latencies):
        p.error("--jobs must be >= 1 and latencies >= 0")
    # The workload model of benchmarks.batch: processing (30 s + 8 s × audio) × lognormal(0,
    # 0.1) simulated seconds, clips U(2, 6) s: 46–78 s, T ≈ 5 s real at time_scale 0.08.
    args.processing_base, args.processing_per_audio_second = 30.0, 8.0
    args.processing_jitter, args.audio_seconds = 0.1, (2.0, 6.0)
    return args


# ------------------------------------------------------------------------------------------
# The ideal client


def ideal_floor(durations: Sequence[float], c: int, r: float, q: float | None = None) -> float:
    """Makespan of an ideal client on these task durations (in submit order).

    Submits are paced at ``r`` from t = 0 with at most ``c`` tasks open; a slot is free again
    the moment its task is noticed. With ``q`` set, noticing a task takes one task query at or
    after its end, queries paced at ``q`` and spent greedily on the earliest-ended task (a
    client reading ``GET /tasks`` pages can beat this); without it, every end is noticed
    instantly.
    """
    ends: list[float] = []  # heap of the open tasks' end times
    last_submit = -math.inf
    next_query = 0.0
    makespan = 0.0

    def notice() -> float:
        nonlocal next_query, makespan
        end = heapq.heappop(ends)
        at = end
        if q is not None:
            at = max(end, next_query)
            next_query = at + 1 / q
        makespan = max(makespan, at)
        return at

    for d in durations:
        free = notice() if len(ends) >= c else 0.0
        start = max(free, last_submit + 1 / r, 0.0)
        last_submit = start
        heapq.heappush(ends, start + d)
    while ends:
        notice()
    return makespan


def _gets_after(req: Mapping[str, Any], t: float) -> int:
    return sum(
        1 for at, e in zip(req["t"], req["endpoint"], strict=True) if e == "task_get" and at > t
    )


# ------------------------------------------------------------------------------------------
# One run


async def run_contender(
    kind: str, spec: Mapping[str, Any], work: Path, timeout: float
) -> dict[str, Any] | None:
    """The contender's result, or None if it did not finish within ``timeout`` seconds."""
    spec_path, out_path = work / f"{kind}-spec.json", work / f"{kind}-result.json"
    out_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "benchmarks._contenders", kind]
    cmd += ["--spec", str(spec_path), "--out", str(out_path)]
    async with await anyio.open_process(cmd, stdout=None, stderr=None, cwd=ROOT) as proc:
        with anyio.move_on_after(timeout):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
            return None
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} exited with {proc.returncode}")
    found: dict[str, Any] = json.loads(out_path.read_text())
    return found


def sim_config(args: argparse.Namespace, regime: Mapping[str, float], ms: float) -> dict[str, Any]:
    return {
        "time_scale": args.time_scale,
        "max_running": int(regime["concurrency"]),
        "submit_qps": regime["submit_qps"],
        "task_qps": regime["task_qps"],
        "list_qps": regime["list_qps"],
        "detect_qps": args.detect_qps,
        "processing_base": args.processing_base,
        "processing_per_audio_second": args.processing_per_audio_second,
        "processing_jitter": args.processing_jitter,
        "seed": args.seed,
        # Keep DashScope's 300 real seconds instead of a validity scaled by time_scale.
        "policy_ttl": 300.0 / args.time_scale,
        "faults": {"seed": args.seed, "latency": ms / 1000.0},
    }


def measure(
    name: str,
    res: Mapping[str, Any] | None,
    ledger: Mapping[str, Any],
    n: int,
    regime: Mapping[str, float],
    t_start: float,
) -> dict[str, Any]:
    req = ledger["requests"]
    endpoints: list[str] = req["endpoint"]
    counts = Counter(endpoints)
    throttled = Counter(e for e, s in zip(endpoints, req["status"], strict=True) if s == 429)
    tasks = sorted(ledger["tasks"], key=lambda t: t["created"])
    durations = [t["duration"] for t in tasks]
    c, r, q = int(regime["concurrency"]), regime["submit_qps"], regime["task_qps"]
    floor = ideal_floor(durations, c, r, q)
    ends = [t["ended"] for t in tasks if t["ended"] is not None]
    duplicates = sum(len(ids) - 1 for ids in ledger.get("duplicate_tasks", {}).values())
    out: dict[str, Any] = {
        "contender": name,
        "floor": floor,
        "floor_no_queries": ideal_floor(durations, c, r),
        "mean_T": statistics.fmean(durations) if durations else None,
        "tasks_created": len(tasks),
        "task_get": counts["task_get"],
        "task_list": counts["task_list"],
        "queries_per_job": (counts["task_get"] + counts["task_list"]) / n,
        "throttled": dict(throttled),
        "throttled_total": sum(throttled.values()),
        "duplicates": duplicates,
        "max_running_observed": ledger["max_running_observed"],
        "timed_out": res is None,
    }
    if res is None:
        out.update(makespan=None, ratio=None, tail=None, done=None, failed=None)
        out["failed"] = n - sum(1 for t in tasks if t["status"] == "SUCCEEDED")
        return out
    makespan = res["t_end"] - res["t_start"]
    ended = {t["id"]: t["ended"] for t in tasks if t["ended"] is not None}
    delays = [t - ended[tid] for tid, t in res["notices"].items() if tid in ended]
    out.update(
        makespan=makespan,
        ratio=makespan / floor if floor > 0 else None,
        # Measured from the contender's own start, as its makespan is.
        tail=res["t_end"] - max(ends) if ends else None,
        # ...and what of it the query budget alone takes: the task GETs still to send when
        # the last task ended, at Q/s. Where queries bind, that is most of the tail for any
        # client (the ideal one included); the rest is the client's own.
        drain=_gets_after(req, max(ends)) / q if ends else None,
        done=res["done"],
        failed=res["failed"],
        failures=res["failures"],
        delay_p50=percentile(delays, 0.5),
        delay_p95=percentile(delays, 0.95),
        counters=res.get("counters", {}),
        extra=res.get("extra", {}),
        start_gap=res["t_start"] - t_start,
    )
    return out


async def one_run(
    args: argparse.Namespace,
    work: Path,
    workload: Sequence[Mapping[str, Any]],
    regime_name: str,
    ms: float,
    name: str,
) -> dict[str, Any]:
    regime = REGIMES[regime_name]
    kind = CONTENDERS[name]
    tag = f"{regime_name}-{ms:g}ms-{name}"
    run_dir = work / tag
    run_dir.mkdir(exist_ok=True)
    config = sim_config(args, regime, ms)
    async with SimProcess(config, work / f"{tag}-ledger.json") as sim:
        spec = {
            "base_url": sim.base_url,
            "api_key": sim.api_key,
            "jobs": list(workload),
            "inputs": "url",
            "concurrency": int(regime["concurrency"]),
            "submit_qps": regime["submit_qps"],
            "detect_qps": args.detect_qps,
            # emo_async is told the account's real limits.
            "our_task_qps": regime["task_qps"],
            "our_list_qps": regime["list_qps"],
            "our_overfill": args.our_overfill,
            "time_scale": args.time_scale,
            "naive_interval": args.naive_interval,
            "out_dir": str(run_dir / "out"),
        }
        t_start = time.monotonic()
        res = await run_contender(kind, spec, run_dir, args.timeout)
        ledger = await sim.stop()
    found = measure(name, res, ledger, len(workload), regime, t_start)
    if res is None:
        say(f"{tag}: TIMED OUT after {args.timeout:g} s")
    else:
        say(
            f"{tag}: makespan {found['makespan']:.1f} s = {found['ratio']:.2f} × floor "
            f"{found['floor']:.1f} s, {found['queries_per_job']:.2f} queries/job, "
            f"{found['throttled_total']} 429s, {found['duplicates']} duplicates, tail "
            f"{found['tail']:.2f} s, {found['failed']} failed"
        )
    return found


def mean_t_bound(
    args: argparse.Namespace, regime: Mapping[str, float], workload: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    ns = SimpleNamespace(
        concurrency=int(regime["concurrency"]),
        submit_qps=regime["submit_qps"],
        task_qps=regime["task_qps"],
        processing_base=args.processing_base,
        processing_per_audio_second=args.processing_per_audio_second,
        processing_jitter=args.processing_jitter,
        time_scale=args.time_scale,
    )
    b: dict[str, Any] = bound(ns, workload)  # type: ignore[arg-type]
    terms = {"concurrency": b["waves"], "submit": b["submit"], "query": b["query"]}
    b["binding"] = max(terms, key=lambda k: terms[k])
    return b


# ------------------------------------------------------------------------------------------
# Chaos


async def chaos_run(jobs: int, work: Path) -> dict[str, Any]:
    """``python -m benchmarks.chaos --jobs N`` in a subprocess; its table rows and report."""
    out = work / "chaos"
    cmd = [sys.executable, "-m", "benchmarks.chaos", "--jobs", str(jobs), "--out", str(out)]
    t0 = time.monotonic()
    done = await anyio.run_process(cmd, check=False, cwd=ROOT, stdout=subprocess.DEVNULL)
    text = (out / "chaos.md").read_text() if (out / "chaos.md").exists() else ""
    rows: dict[str, dict[str, str]] = {}
    header: list[str] = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == "run":
            header = cells
        elif header and cells and cells[0] in ("fault-free", "chaos") and len(cells) == len(header):
            rows[cells[0]] = dict(zip(header, cells, strict=True))
    return {
        "command": f"python -m benchmarks.chaos --jobs {jobs}",
        "returncode": done.returncode,
        "wall": time.monotonic() - t0,
        "rows": rows,
        "report": text,
    }


# ------------------------------------------------------------------------------------------


async def amain(args: argparse.Namespace, command: str) -> tuple[str, dict[str, Any]]:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="emo-regimes-") as tmp:
        work = args.work_dir or Path(tmp)
        media = work / "media"
        media.mkdir(parents=True, exist_ok=True)
        runner, url_base = await static_server(media)
        try:
            say(f"writing {args.jobs} sample jobs to {media}")
            workload = await anyio.to_thread.run_sync(make_workload, args, media, url_base)
            bounds = {name: mean_t_bound(args, REGIMES[name], workload) for name in args.regimes}
            found: dict[str, dict[str, dict[str, Any]]] = {}
            for regime_name in args.regimes:
                b = bounds[regime_name]
                say(
                    f"{regime_name}: bound max({b['waves']:.1f}, {b['submit']:.1f}, "
                    f"{b['query']:.1f}) = {b['bound']:.1f} s ({b['binding']} binds)"
                )
                for ms in args.latencies:
                    rows = found.setdefault(regime_name, {}).setdefault(f"{ms:g}", {})
                    for name in args.contenders:
                        rows[name] = await one_run(args, work, workload, regime_name, ms, name)
        finally:
            await runner.cleanup()
        chaos = None
        if args.chaos > 0:
            say(f"chaos: python -m benchmarks.chaos --jobs {args.chaos}")
            chaos = await chaos_run(args.chaos, work)
    text = report(args, command, REGIMES, bounds, found, chaos, time.monotonic() - started)
    raw = {
        "command": command,
        "jobs": args.jobs,
        "time_scale": args.time_scale,
        "regimes": {name: REGIMES[name] for name in args.regimes},
        "bounds": bounds,
        "results": found,
        "chaos": None if chaos is None else {k: v for k, v in chaos.items() if k != "report"},
    }
    return text, raw


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    given = list(argv) if argv is not None else sys.argv[1:]
    command = ("python -m benchmarks.regimes " + shlex.join(given)).strip()
    text, raw = anyio.run(amain, args, command)
    print(text, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "regimes.md").write_text(text)
    (args.out / "regimes.json").write_text(json.dumps(raw, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
