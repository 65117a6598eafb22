"""The official SDK's 2.x async jobs client as a batch contender (``dashscope2``).

2.x has no EMO resource; its generic ``AsyncJobs`` pointed at the EMO service is what a 2.x
user writes (as ``tests/test_simulator_dashscope_v2.py`` drives it). Per job, under a semaphore
of C: ``jobs.create`` (the transport retries 429/5xx twice, and retries the billed POST on
transport errors, so a lost answer can bill a job twice: the harness counts duplicates from the
simulator's ledger), ``jobs.wait`` with the SDK's default 1, 2, 4, 8, 8... s schedule, then the
video through httpx. A 429 that survives the SDK's own retries is raised; like the other
baselines, the user waits 1 s and tries again (a refused submit created nothing).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from benchmarks._contenders import Recorder, _write, cpu_seconds, result, unique_images

EMO_SERVICE = "aigc/image2video/video-synthesis"
DETECT_PATH = "/services/aigc/image2video/face-detect"


def _quiet_environment() -> None:
    # What the harness does not set must not come from a developer's environment or config.
    for name in list(os.environ):
        if name.startswith("DASHSCOPE_"):
            del os.environ[name]
    os.environ["DASHSCOPE_CONFIG"] = "/nonexistent/dashscope-config.toml"


async def run_dashscope2(spec: Mapping[str, Any]) -> dict[str, Any]:
    _quiet_environment()
    import dashscope
    import httpx
    from dashscope.v2 import AsyncClient
    from dashscope.v2.errors import DashScopeError
    from dashscope.v2.resources._jobs import AsyncJobs

    rec = Recorder()
    out_dir = Path(spec["out_dir"])
    boxes: dict[str, tuple[list[int], list[int]] | None] = {}
    cpu0 = cpu_seconds()
    t0 = time.monotonic()
    async with (
        AsyncClient(api_key=spec["api_key"], base_url=spec["base_url"]) as client,
        httpx.AsyncClient(timeout=60) as plain,
    ):
        for url in unique_images(spec):
            while True:
                rsp = await client.transport.request(
                    "POST",
                    DETECT_PATH,
                    json={
                        "model": "emo-detect-v1",
                        "input": {"image_url": url},
                        "parameters": {"ratio": "1:1"},
                    },
                )
                if rsp.status_code == 429:
                    rec.count("detect_429")
                    await asyncio.sleep(1.0)
                    continue
                break
            out = rsp.json().get("output") or {}
            ok = rsp.status_code == 200 and out.get("check_pass")
            boxes[url] = (out["face_bbox"], out["ext_bbox"]) if ok else None

        jobs = AsyncJobs(client, EMO_SERVICE, "aigc")
        sem = asyncio.Semaphore(int(spec["concurrency"]))

        async def one(job: Mapping[str, Any]) -> None:
            box = boxes.get(job["image_url"])
            if box is None:
                rec.fail("detect")
                return
            async with sem:
                emo_input = {
                    "image_url": job["image_url"],
                    "audio_url": job["audio_url"],
                    "face_bbox": box[0],
                    "ext_bbox": box[1],
                }
                while True:
                    try:
                        created = await jobs.create(
                            model="emo-v1", input=emo_input, parameters={"style_level": "normal"}
                        )
                    except DashScopeError as exc:
                        if exc.status_code == 429:
                            rec.count("submit_429")
                            await asyncio.sleep(1.0)
                            continue
                        rec.fail(f"submit {exc.status_code} {exc.code}")
                        return
                    break
                target: Any = created
                while True:
                    try:
                        done = await jobs.wait(target)
                    except DashScopeError as exc:
                        if exc.status_code == 429:
                            # wait() raises the 429 its transport could not retry away; asking
                            # again by id restarts its schedule, as a user's loop would.
                            rec.count("wait_429")
                            target = created.task_id
                            await asyncio.sleep(1.0)
                            continue
                        rec.noticed(created.task_id)
                        rec.fail(f"wait {exc.status_code} {exc.code}")
                        return
                    break
                rec.noticed(created.task_id)
                if not done.succeeded or done.output is None:
                    rec.fail(f"task {done.status}")
                    return
                video_url = done.output["results"]["video_url"]
                got = await plain.get(video_url)
                if got.status_code != 200:
                    rec.fail(f"download {got.status_code}")
                    return
                _write(out_dir / f"{job['name']}.mp4", got.content)
                rec.ok(job["name"], video_url)

        await asyncio.gather(*(one(j) for j in spec["jobs"]))
        t1 = time.monotonic()
        cpu1 = cpu_seconds()

        async def again(name: str, url: str) -> None:
            async with sem:
                got = await plain.get(url)
            _write(out_dir / "_again" / f"{name}.mp4", got.content)

        cpu2 = cpu_seconds()
        await asyncio.gather(*(again(n, u) for n, u in rec.urls))
        cpu3 = cpu_seconds()
    extra = {"dashscope_version": getattr(dashscope, "__version__", "?")}
    return result("dashscope2", rec, t0, t1, cpu1 - cpu0, cpu3 - cpu2, extra)
