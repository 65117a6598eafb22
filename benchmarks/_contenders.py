"""The contenders of ``benchmarks.batch``, each run in its own process.

``python -m benchmarks._contenders KIND --spec spec.json --out result.json``, KIND one of:

* ``emo_async``: ``Client.run_batch`` with its journal, as a user would run it;
* ``dashscope``: the official SDK (``BaseApi`` / ``BaseAsyncApi``) driven from a thread pool;
* ``dashscope2``: the official SDK's 2.x ``AsyncJobs`` (``benchmarks._dashscope2``);
* ``naive``: aiohttp, ``asyncio.gather`` under a semaphore, one fixed-interval sleep loop per
  task;
* ``memory``: emo_async's poller watching many open tasks (RSS over time);
* ``cpu``: client CPU per request (this process pinned to one core).

A batch contender writes its makespan window, per-task "noticed" times (when the client learnt
that the task had ended), outcome counts and its own CPU time and peak RSS. After the batch it
downloads every video a second time through the same code path, so that the CPU the downloads
cost can be subtracted ("CPU per job, downloads excluded").
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELED", "UNKNOWN"})
SUBMIT_PATH = "/services/aigc/image2video/video-synthesis"
DETECT_PATH = "/services/aigc/image2video/face-detect"


def cpu_seconds() -> float:
    """User + system CPU of this process so far (all threads)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def peak_rss_mb() -> float:
    """Peak resident set size of this process, MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """Current resident set size, MB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


class Recorder:
    """Outcome counts and noticed times, safe to use from threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.notices: dict[str, float] = {}
        self.done = 0
        self.failures: collections.Counter[str] = collections.Counter()
        self.urls: list[tuple[str, str]] = []
        self.counters: collections.Counter[str] = collections.Counter()

    def noticed(self, task_id: str) -> None:
        t = time.monotonic()
        with self._lock:
            self.notices.setdefault(task_id, t)

    def ok(self, name: str, url: str) -> None:
        with self._lock:
            self.done += 1
            self.urls.append((name, url))

    def fail(self, reason: str) -> None:
        with self._lock:
            self.failures[reason] += 1

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counters[key] += n


def result(
    name: str,
    rec: Recorder,
    t_start: float,
    t_end: float,
    cpu_batch: float,
    cpu_redownload: float,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "contender": name,
        "t_start": t_start,
        "t_end": t_end,
        "done": rec.done,
        "failed": sum(rec.failures.values()),
        "failures": dict(rec.failures),
        "notices": rec.notices,
        "cpu_batch": cpu_batch,
        "cpu_redownload": cpu_redownload,
        "redownloads": len(rec.urls),
        "sample_urls": rec.urls[:5],
        "peak_rss_mb": peak_rss_mb(),
        "counters": dict(rec.counters),
        "extra": dict(extra or {}),
    }


# ------------------------------------------------------------------------------------------
# 1. emo_async


async def run_emo_async(spec: Mapping[str, Any]) -> dict[str, Any]:
    import anyio
    import attrs

    from emo_async import Client, Job
    from emo_async._batch import BatchEvent
    from emo_async._config import DEFAULT_POLL_POLICY, Limits

    scale = float(spec["time_scale"])
    base = DEFAULT_POLL_POLICY
    # The library's defaults at real speed, every duration scaled like the simulated service.
    policy = attrs.evolve(
        base,
        target_delay=base.target_delay * scale,
        fallback_interval=base.fallback_interval * scale,
        prior_base=base.prior_base * scale,
        prior_per_audio_second=base.prior_per_audio_second * scale,
    )
    limits = Limits(
        task_qps=float(spec["our_task_qps"]),
        detect_qps=float(spec["detect_qps"]),
        submit_qps=float(spec["submit_qps"]),
    )
    if "our_list_qps" in spec:
        # The list's own limit, when the harness knows the account's: a budget of its own,
        # apart from the task queries' (the simulator's buckets are separate).
        limits = attrs.evolve(
            limits, list_qps=float(spec["our_list_qps"]), list_shares_task_qps=False
        )
    rec = Recorder()
    if spec.get("inputs", "local") == "url":
        jobs = [Job(j["image_url"], j["audio_url"], name=j["name"]) for j in spec["jobs"]]
    else:
        jobs = [Job(Path(j["image"]), Path(j["audio"]), name=j["name"]) for j in spec["jobs"]]
    out_dir = Path(spec["out_dir"])

    def on_event(event: BatchEvent) -> None:
        if event.kind == "finished" and event.task_id:
            rec.noticed(event.task_id)

    cpu0, main0 = cpu_seconds(), time.thread_time()
    t0 = time.monotonic()
    async with Client(spec["api_key"], base_url=spec["base_url"], limits=limits, poll=policy) as c:
        outcomes = await c.run_batch_all(
            jobs,
            out_dir,
            journal=bool(spec.get("journal", True)),
            max_tasks=int(spec["concurrency"]) + int(spec.get("our_overfill", 0)),
            submit_rate=float(spec["submit_qps"]),
            on_event=on_event,
        )
        t1 = time.monotonic()
        cpu1, main1 = cpu_seconds(), time.thread_time()
        for o in outcomes:
            if o.ok and o.video_url:
                rec.ok(o.job.display_name, o.video_url)
            else:
                rec.fail(f"{o.state.value}: {o.error.kind if o.error else '?'}")
        stats = c.statistics()
        # The same downloads again, through the same downloader, to price them.
        again = out_dir / "_again"
        cpu2 = cpu_seconds()
        async with anyio.create_task_group() as tg:
            for name, url in rec.urls:
                tg.start_soon(c.download, url, again / f"{name}.mp4")
        cpu3 = cpu_seconds()
    extra = {
        "client_requests": stats.requests,
        "client_retries": stats.retries,
        "client_throttled": stats.throttled,
        "poller_task_queries": stats.poller.task_queries,
        "poller_list_queries": stats.poller.list_queries,
        "poller_list_enabled": stats.poller.list_enabled,
        "limiters": {k: attrs.asdict(v) for k, v in stats.limiters.items()},
        "poll_policy": attrs.asdict(policy),
        "cpu_main_thread": main1 - main0,
    }
    return result("emo_async", rec, t0, t1, cpu1 - cpu0, cpu3 - cpu2, extra)


# ------------------------------------------------------------------------------------------
# Shared by the two baselines: what a user does before the batch.


def unique_images(spec: Mapping[str, Any]) -> list[str]:
    return list(dict.fromkeys(j["image_url"] for j in spec["jobs"]))


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# ------------------------------------------------------------------------------------------
# 2. The official dashscope SDK


def run_dashscope(spec: Mapping[str, Any]) -> dict[str, Any]:
    import dashscope
    import requests
    from dashscope.client.base_api import BaseApi, BaseAsyncApi

    dashscope.base_http_api_url = spec["base_url"]
    key = spec["api_key"]
    rec = Recorder()
    out_dir = Path(spec["out_dir"])
    boxes: dict[str, tuple[list[int], list[int]] | None] = {}

    cpu0 = cpu_seconds()
    t0 = time.monotonic()
    # Detect each distinct portrait once, one after the other; a 429 is retried after 1 s.
    for url in unique_images(spec):
        while True:
            rsp = BaseApi.call(
                model="emo-detect-v1",
                input={"image_url": url},
                task_group="aigc",
                task="image2video",
                function="face-detect",
                api_key=key,
                ratio="1:1",
            )
            if rsp.status_code == 429:
                rec.count("detect_429")
                time.sleep(1.0)
                continue
            break
        ok = rsp.status_code == 200 and rsp.output and rsp.output.get("check_pass")
        boxes[url] = (rsp.output["face_bbox"], rsp.output["ext_bbox"]) if ok else None

    def one(job: Mapping[str, Any]) -> None:
        box = boxes.get(job["image_url"])
        if box is None:
            rec.fail("detect")
            return
        while True:
            sub = BaseAsyncApi.async_call(
                model="emo-v1",
                input={
                    "image_url": job["image_url"],
                    "audio_url": job["audio_url"],
                    "face_bbox": box[0],
                    "ext_bbox": box[1],
                },
                task_group="aigc",
                task="image2video",
                function="video-synthesis",
                api_key=key,
                style_level="normal",
            )
            if sub.status_code == 429:
                rec.count("submit_429")
                time.sleep(1.0)
                continue
            break
        if sub.status_code != 200:
            rec.fail(f"submit {sub.status_code} {sub.code}")
            return
        task_id = sub.output["task_id"]
        while True:
            # The SDK's wait() returns a 429 as its final answer; a user who saw that waits a
            # second and calls wait() again (which restarts its 1,1,2,2,2,4,4,4,5 s schedule).
            rsp = BaseAsyncApi.wait(task_id, api_key=key)
            if rsp.status_code == 429:
                rec.count("wait_429")
                rec.count(f"wait_429_task:{task_id}")
                time.sleep(1.0)
                continue
            break
        if rsp.status_code != 200 or rsp.output is None:
            rec.fail(f"wait {rsp.status_code} {rsp.code}")
            return
        rec.noticed(task_id)
        if rsp.output.get("task_status") != "SUCCEEDED":
            rec.fail(f"task {rsp.output.get('task_status')}")
            return
        video_url = rsp.output["results"]["video_url"]
        got = requests.get(video_url, timeout=60)
        if got.status_code != 200:
            rec.fail(f"download {got.status_code}")
            return
        _write(out_dir / f"{job['name']}.mp4", got.content)
        rec.ok(job["name"], video_url)

    with ThreadPoolExecutor(max_workers=int(spec["concurrency"])) as pool:
        list(pool.map(one, spec["jobs"]))
    t1 = time.monotonic()
    cpu1 = cpu_seconds()

    def again(item: tuple[str, str]) -> None:
        got = requests.get(item[1], timeout=60)
        _write(out_dir / "_again" / f"{item[0]}.mp4", got.content)

    cpu2 = cpu_seconds()
    with ThreadPoolExecutor(max_workers=int(spec["concurrency"])) as pool:
        list(pool.map(again, rec.urls))
    cpu3 = cpu_seconds()
    # Keep the per-task 429 marks out of the counters (summarised as a count of jobs).
    hit = [k for k in rec.counters if k.startswith("wait_429_task:")]
    for k in hit:
        del rec.counters[k]
    extra = {"jobs_whose_wait_got_429": len(hit), "dashscope_version": dashscope.__version__}
    return result("dashscope", rec, t0, t1, cpu1 - cpu0, cpu3 - cpu2, extra)


# ------------------------------------------------------------------------------------------
# 3. A naive asyncio script


async def run_naive(spec: Mapping[str, Any]) -> dict[str, Any]:
    import aiohttp

    base = spec["base_url"]
    headers = {"Authorization": f"Bearer {spec['api_key']}"}
    interval = float(spec["naive_interval"])
    rec = Recorder()
    out_dir = Path(spec["out_dir"])
    boxes: dict[str, tuple[list[int], list[int]] | None] = {}

    cpu0 = cpu_seconds()
    t0 = time.monotonic()
    async with aiohttp.ClientSession(headers=headers) as session:
        for url in unique_images(spec):
            while True:
                body = {
                    "model": "emo-detect-v1",
                    "input": {"image_url": url},
                    "parameters": {"ratio": "1:1"},
                }
                async with session.post(base + DETECT_PATH, json=body) as r:
                    data = await r.json()
                    status = r.status
                if status == 429:
                    rec.count("detect_429")
                    await asyncio.sleep(1.0)
                    continue
                break
            out = data.get("output") or {}
            ok = status == 200 and out.get("check_pass")
            boxes[url] = (out["face_bbox"], out["ext_bbox"]) if ok else None

        sem = asyncio.Semaphore(int(spec["concurrency"]))

        async def one(job: Mapping[str, Any]) -> None:
            box = boxes.get(job["image_url"])
            if box is None:
                rec.fail("detect")
                return
            async with sem:
                body = {
                    "model": "emo-v1",
                    "input": {
                        "image_url": job["image_url"],
                        "audio_url": job["audio_url"],
                        "face_bbox": box[0],
                        "ext_bbox": box[1],
                    },
                    "parameters": {"style_level": "normal"},
                }
                while True:
                    async with session.post(
                        base + SUBMIT_PATH, json=body, headers={"X-DashScope-Async": "enable"}
                    ) as r:
                        data = await r.json()
                        status = r.status
                    if status == 429:
                        rec.count("submit_429")
                        await asyncio.sleep(1.0)
                        continue
                    break
                if status != 200:
                    rec.fail(f"submit {status} {data.get('code')}")
                    return
                task_id = data["output"]["task_id"]
                while True:
                    await asyncio.sleep(interval)
                    async with session.get(f"{base}/tasks/{task_id}") as r:
                        if r.status != 200:
                            continue  # throttled or a hiccup: ask again next tick
                        data = await r.json()
                    if data["output"]["task_status"] in TERMINAL:
                        break
                rec.noticed(task_id)
                if data["output"]["task_status"] != "SUCCEEDED":
                    rec.fail(f"task {data['output']['task_status']}")
                    return
                video_url = data["output"]["results"]["video_url"]
                async with aiohttp.ClientSession() as plain, plain.get(video_url) as r:
                    if r.status != 200:
                        rec.fail(f"download {r.status}")
                        return
                    content = await r.read()
                _write(out_dir / f"{job['name']}.mp4", content)
                rec.ok(job["name"], video_url)

        await asyncio.gather(*(one(j) for j in spec["jobs"]))
        t1 = time.monotonic()
        cpu1 = cpu_seconds()

        async def again(name: str, url: str) -> None:
            async with sem, aiohttp.ClientSession() as plain, plain.get(url) as r:
                content = await r.read()
            _write(out_dir / "_again" / f"{name}.mp4", content)

        cpu2 = cpu_seconds()
        await asyncio.gather(*(again(n, u) for n, u in rec.urls))
        cpu3 = cpu_seconds()
    return result("naive", rec, t0, t1, cpu1 - cpu0, cpu3 - cpu2)


# ------------------------------------------------------------------------------------------
# Memory: the poller watching many open tasks


async def run_memory(spec: Mapping[str, Any]) -> dict[str, Any]:
    """One ``client.wait()`` per task id of ``spec["task_ids"]`` (submitted by the harness, so
    that what is measured is the poller and its waiters, not the submit path)."""
    import anyio

    from emo_async import Client
    from emo_async._config import Limits

    ids: list[str] = list(spec["task_ids"])
    hold = float(spec["hold_seconds"])
    limits = Limits(task_qps=float(spec["our_task_qps"]))
    samples: list[tuple[float, float, int]] = []
    t0 = time.monotonic()
    rss_start = rss_mb()
    async with Client(spec["api_key"], base_url=spec["base_url"], limits=limits) as client:
        rss_open = rss_mb()
        t_watch = time.monotonic()
        async with anyio.create_task_group() as tg:
            for task_id in ids:
                tg.start_soon(client.wait, task_id)
            deadline = time.monotonic() + hold
            while time.monotonic() < deadline:
                open_tasks = client.statistics().poller.open_tasks
                samples.append((time.monotonic() - t0, rss_mb(), open_tasks))
                await anyio.sleep(0.5)
            stats = client.statistics()
            tg.cancel_scope.cancel()
    return {
        "contender": "memory",
        "tasks": len(ids),
        "open_tasks_seen": max((s[2] for s in samples), default=0),
        "rss_start_mb": rss_start,
        "rss_client_open_mb": rss_open,
        "rss_watch_max_mb": max((s[1] for s in samples), default=0.0),
        "peak_rss_mb": peak_rss_mb(),
        "hold_seconds": hold,
        "samples": samples,
        "poller_task_queries": stats.poller.task_queries,
        "poller_list_queries": stats.poller.list_queries,
        "poller_list_enabled": stats.poller.list_enabled,
        "client_throttled": stats.throttled,
        "t_watch_start": t_watch,
        "t_end": time.monotonic(),
    }


# ------------------------------------------------------------------------------------------
# CPU per request, this process pinned to one core


async def _cpu_emo_async(spec: Mapping[str, Any], task_id: str, n: int) -> dict[str, float]:
    import anyio

    from emo_async import Client
    from emo_async._config import Limits

    limits = Limits(task_qps=1e6)
    async with Client(spec["api_key"], base_url=spec["base_url"], limits=limits) as client:
        await client.get_task(task_id)  # warm the pool

        async def worker(k: int) -> None:
            for _ in range(k):
                await client.get_task(task_id)

        width = 64
        c0, t0 = cpu_seconds(), time.monotonic()
        async with anyio.create_task_group() as tg:
            for i in range(width):
                tg.start_soon(worker, n // width + (1 if i < n % width else 0))
        c1, t1 = cpu_seconds(), time.monotonic()
    return {"requests": n, "cpu_s": c1 - c0, "wall_s": t1 - t0}


async def _cpu_aiohttp(spec: Mapping[str, Any], task_id: str, n: int) -> dict[str, float]:
    import aiohttp

    url = f"{spec['base_url']}/tasks/{task_id}"
    headers = {"Authorization": f"Bearer {spec['api_key']}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.get(url) as r:
            await r.json()

        async def worker(k: int) -> None:
            for _ in range(k):
                async with session.get(url) as r:
                    await r.json()

        width = 64
        c0, t0 = cpu_seconds(), time.monotonic()
        await asyncio.gather(
            *(worker(n // width + (1 if i < n % width else 0)) for i in range(width))
        )
        c1, t1 = cpu_seconds(), time.monotonic()
    return {"requests": n, "cpu_s": c1 - c0, "wall_s": t1 - t0}


def _cpu_dashscope(spec: Mapping[str, Any], task_id: str, n: int) -> dict[str, float]:
    import dashscope
    from dashscope.client.base_api import BaseAsyncApi

    dashscope.base_http_api_url = spec["base_url"]
    BaseAsyncApi.fetch(task_id, api_key=spec["api_key"])
    c0, t0 = cpu_seconds(), time.monotonic()
    for _ in range(n):
        BaseAsyncApi.fetch(task_id, api_key=spec["api_key"])
    c1, t1 = cpu_seconds(), time.monotonic()
    return {"requests": n, "cpu_s": c1 - c0, "wall_s": t1 - t0}


def run_cpu(spec: Mapping[str, Any]) -> dict[str, Any]:
    import urllib.request

    cores = sorted(os.sched_getaffinity(0))
    pinned = None
    if spec.get("pin_core") is not None and int(spec["pin_core"]) in cores:
        pinned = int(spec["pin_core"])
        os.sched_setaffinity(0, {pinned})
    # One finished task to query (the simulator runs without input validation here).
    body = json.dumps(
        {
            "model": "emo-v1",
            "input": {
                "image_url": "http://127.0.0.1:9/p.png",
                "audio_url": "http://127.0.0.1:9/v.wav",
                "face_bbox": [358, 330, 666, 638],
                "ext_bbox": [212, 184, 812, 784],
            },
        }
    ).encode()
    req = urllib.request.Request(
        spec["base_url"] + SUBMIT_PATH,
        data=body,
        headers={
            "Authorization": f"Bearer {spec['api_key']}",
            "Content-Type": "application/json",
            "X-DashScope-Async": "enable",
        },
    )
    with urllib.request.urlopen(req) as resp:
        task_id = json.loads(resp.read())["output"]["task_id"]
    n = int(spec["requests"])
    runs = {
        "emo_async": asyncio.run(_cpu_emo_async(spec, task_id, n)),
        "aiohttp": asyncio.run(_cpu_aiohttp(spec, task_id, n)),
        "dashscope": _cpu_dashscope(spec, task_id, max(1, n // 5)),
    }
    return {"contender": "cpu", "pinned_core": pinned, "runs": runs}


# ------------------------------------------------------------------------------------------


async def _run_dashscope2(spec: Mapping[str, Any]) -> dict[str, Any]:
    from benchmarks._dashscope2 import run_dashscope2

    return await run_dashscope2(spec)


KINDS: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "emo_async": lambda s: asyncio.run(run_emo_async(s)),
    "dashscope": run_dashscope,
    "dashscope2": lambda s: asyncio.run(_run_dashscope2(s)),
    "naive": lambda s: asyncio.run(run_naive(s)),
    "memory": lambda s: asyncio.run(run_memory(s)),
    "cpu": run_cpu,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks._contenders")
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    spec = json.loads(args.spec.read_text())
    found = KINDS[args.kind](spec)
    args.out.write_text(json.dumps(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
