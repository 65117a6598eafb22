"""The Markdown report of ``benchmarks.regimes`` (tables per regime and latency, targets)."""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
from collections.abc import Mapping
from typing import Any

# Issue 17's targets for emo_async, per regime and latency.
TARGET_RATIO = 1.10
TARGET_QUERIES_PER_JOB = 1.3
TARGET_TAIL = 1.0


def _f(value: float | None, fmt: str = ".2f") -> str:
    return "—" if value is None else format(value, fmt)


def _ok(flag: bool) -> str:
    return "yes" if flag else "**no**"


def report(
    args: argparse.Namespace,
    command: str,
    regimes: Mapping[str, Mapping[str, float]],
    bounds: Mapping[str, Mapping[str, Any]],
    found: Mapping[str, Mapping[str, Mapping[str, Any]]],
    chaos: Mapping[str, Any] | None,
    wall: float,
) -> str:
    import dashscope

    import emo_async

    lines = [
        "# Regimes benchmark",
        "",
        f"Command: `{command}`",
        "",
        f"Date: {_dt.datetime.now(_dt.UTC):%Y-%m-%d %H:%M} UTC; {wall / 60:.1f} min. Python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs, emo_async {emo_async.__version__}, "
        f"dashscope {getattr(dashscope, '__version__', '?')}.",
        "",
        f"Workload: {args.jobs} jobs, {args.portraits} portraits, clips U(2, 6) s; processing "
        f"(30 s + 8 s × audio) × lognormal(0, 0.1) simulated s at time_scale {args.time_scale:g} "
        "(tasks of a few real seconds). Inputs are http://127.0.0.1 URLs for every contender. "
        "Each contender runs in its own process against a fresh simulator process (same seed); "
        "the latency is the simulator's `FaultConfig.latency`, slept before every request it "
        "answers (API, upload and media hosts; the submit's answer included). No other fault.",
        "",
        "Contenders: **emo_async** (`run_batch_all`, URL inputs, `max_tasks = C + "
        f"{args.our_overfill}`, `submit_rate = R`, `Limits(task_qps = Q, list_qps = list, "
        "submit_qps = R)`: told the account's real limits, its poll policy's durations scaled "
        "by time_scale); **dashscope1** (the official SDK's 1.x loop: `BaseAsyncApi.async_call` "
        "+ `wait` in a thread pool of C); **dashscope2** (the SDK's 2.x `AsyncClient` + "
        "`AsyncJobs` on `aigc/image2video/video-synthesis`, `create` + `wait` under a "
        "semaphore of C; its transport retries the billed POST on transport errors); "
        f"**naive** (aiohttp, semaphore of C, `sleep({args.naive_interval:g} s)` + GET per "
        "task). Every baseline retries a 429 after 1 s.",
        "",
        "Columns: **floor** = the ideal client on the run's own task durations (submits at R "
        "from t = 0, at most C open, a slot reused the moment its task is noticed, noticing "
        "costing one task GET at or after the end, GETs at most Q/s; a client reading "
        "`GET /tasks` pages can beat it); **×floor** = makespan / floor; **queries/job** = "
        "(`GET /tasks/{id}` + `GET /tasks` pages) / N at the simulator, 429s included; "
        "**429s** = throttled requests at the simulator (all self-inflicted: no fault "
        "throttles); **dup** = tasks created beyond one per distinct input (lost answers "
        "resent); **tail** = the contender's return − the last task's end; **drain** = the "
        "task GETs the contender still sent after the last task's end, at Q/s: the part of the "
        "tail the query budget alone takes (where queries bind, every client's tail, the ideal "
        "one's included, is mostly this queue; the makespan ratio says how well the run before "
        "it used the budget); **p95 delay** = "
        "notice − task end; **failed** = jobs not done.",
        "",
    ]
    for regime_name, per_latency in found.items():
        regime = regimes[regime_name]
        b = bounds[regime_name]
        lines += [
            f"## {regime_name}-bound",
            "",
            f"Account: C = {regime['concurrency']:g} concurrent tasks, R = "
            f"{regime['submit_qps']:g} submits/s, Q = {regime['task_qps']:g} task GETs/s, "
            f"{regime['list_qps']:g} list pages/s, detect {args.detect_qps:g}/s. Mean-T bound "
            f"max(⌈N/C⌉·T = {b['waves']:.1f}, (N−1)/R + T = {b['submit']:.1f}, N/Q = "
            f"{b['query']:.1f}) = **{b['bound']:.1f} s** (T = {b['T']:.2f} s real): "
            f"{b['binding']} binds.",
            "",
        ]
        for ms, rows in per_latency.items():
            lines += [
                f"### {regime_name}-bound, {ms} ms per request",
                "",
                "| contender | makespan s | floor s | ×floor | ×mean-T bound | queries/job | "
                "429s | dup | tail s | drain s | p95 delay s | failed |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for name, r in rows.items():
                if r["timed_out"]:
                    makespan = f"> {args.timeout:g} (stopped)"
                else:
                    makespan = f"{r['makespan']:.1f}"
                vs_bound = None if r["makespan"] is None else r["makespan"] / b["bound"]
                lines.append(
                    f"| {name} | {makespan} | {r['floor']:.1f} | {_f(r['ratio'])} | "
                    f"{_f(vs_bound)} | {r['queries_per_job']:.2f} | {r['throttled_total']} | "
                    f"{r['duplicates']} | {_f(r['tail'])} | {_f(r.get('drain'))} | "
                    f"{_f(r.get('delay_p95'))} | "
                    f"{r['failed']} |"
                )
            lines.append("")
            throttled = {n: r["throttled"] for n, r in rows.items() if r["throttled"]}
            if throttled:
                lines.append(
                    "429s by endpoint: " + "; ".join(f"{n} {t}" for n, t in throttled.items()) + "."
                )
                lines.append("")
    targets = _targets(found)
    if targets:
        lines += [
            "## emo_async against issue 17's targets",
            "",
            f"| regime | latency ms | ≤ {TARGET_RATIO} × floor | ≤ {TARGET_QUERIES_PER_JOB} "
            f"queries/job | 0 429s | tail ≤ {TARGET_TAIL:g} s | tail − drain ≤ "
            f"{TARGET_TAIL:g} s | 0 duplicates |",
            "|---|---|---|---|---|---|---|---|",
            *targets,
            "",
        ]
    if chaos is not None:
        rows = chaos["rows"]
        lines += ["## Chaos: every fault at once (10 % lost submit answers) vs fault-free", ""]
        clean, bad = rows.get("fault-free"), rows.get("chaos")
        if clean and bad:
            ratio = float(bad["makespan s"]) / float(clean["makespan s"])
            lines += [
                f"`{chaos['command']}` ({chaos['wall']:.0f} s, exit {chaos['returncode']}): "
                f"makespan **{bad['makespan s']} s** under chaos against {clean['makespan s']} s "
                f"fault-free (**{ratio:.2f} ×**; target ≤ 2 ×), duplicates "
                f"{bad['duplicates']}, done {bad['done']}, unresolved {bad['unresolved']}.",
                "",
                "Its full report:",
                "",
                *("> " + line if line else ">" for line in chaos["report"].splitlines()),
                "",
            ]
        else:
            lines += [f"`{chaos['command']}` produced no table (exit {chaos['returncode']}).", ""]
    return "\n".join(lines)


def _targets(found: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[str]:
    out = []
    for regime_name, per_latency in found.items():
        for ms, rows in per_latency.items():
            r = rows.get("emo_async")
            if r is None or r["timed_out"]:
                continue
            excess = r["tail"] - (r.get("drain") or 0.0)
            out.append(
                f"| {regime_name} | {ms} | {r['ratio']:.3f} {_ok(r['ratio'] <= TARGET_RATIO)} | "
                f"{r['queries_per_job']:.2f} "
                f"{_ok(r['queries_per_job'] <= TARGET_QUERIES_PER_JOB)} | "
                f"{r['throttled_total']} {_ok(r['throttled_total'] == 0)} | "
                f"{r['tail']:.2f} {_ok(r['tail'] <= TARGET_TAIL)} | "
                f"{excess:.2f} {_ok(excess <= TARGET_TAIL)} | "
                f"{r['duplicates']} {_ok(r['duplicates'] == 0)} |"
            )
    return out
