"""``demo``: a few videos end to end on the built-in simulator (no API key needed)."""

from __future__ import annotations

import argparse
import csv
import importlib
import math
from pathlib import Path
from typing import Final

import anyio
import anyio.to_thread
import attrs

from emo_async import Client, Job, PollPolicy, make_sample_set

from ._output import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, Output, progress_mode, setup_logging
from ._progress import Counts, Progress
from ._report import Sink, summary
from ._run import execute, make_out_dir

__all__ = ["cmd_demo"]

_DEMO_PEOPLE: Final = ("ada", "bo", "cy")
#: Simulated seconds a demo task takes (processing_base + per-second x the average clip).
_DEMO_TASK_SECONDS: Final = 15.0 + 2.0 * 3.5
_DEMO_MAX_RUNNING: Final = 10


def _video_available() -> bool:
    """Whether PyAV imports (``pip install 'emo-async[video]'``), so the videos can be real."""
    try:
        importlib.import_module("av")
    except ImportError:
        return False
    return True


def _demo_inputs(folder: Path, n_jobs: int) -> list[Job]:
    samples = make_sample_set(folder, n_jobs, portraits=len(_DEMO_PEOPLE), seconds=(2.0, 5.0))
    jobs = []
    for i, job in enumerate(samples):
        person = _DEMO_PEOPLE[i % len(_DEMO_PEOPLE)]
        # Every fourth video is half-body (3:4), the rest head-and-shoulders (1:1).
        ratio = "3:4" if i % 4 == 3 else "1:1"
        jobs.append(attrs.evolve(job, name=f"{person}-{i + 1:02d}", ratio=ratio))
    with (folder / "manifest.csv").open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image", "audio", "name", "ratio"])
        for job in jobs:
            writer.writerow([Path(job.image).name, Path(job.audio).name, job.name, job.ratio])
    return jobs


async def cmd_demo(args: argparse.Namespace) -> int:
    # The simulator (aiohttp.web and friends) is imported only when a demo runs.
    from emo_async.simulator import Simulator, SimulatorConfig

    out = Output(args)
    setup_logging(args.verbose)
    folder: Path = args.out
    inputs, videos = folder / "inputs", folder / "videos"
    await make_out_dir("--out", folder)
    real = await anyio.to_thread.run_sync(_video_available)
    waves = math.ceil(args.jobs / _DEMO_MAX_RUNNING)
    # About six seconds per wave of tasks: quick, yet slow enough to watch.
    time_scale = args.time_scale or 6.0 / _DEMO_TASK_SECONDS / waves
    say = (lambda _text: None) if out.quiet else out.say
    say(
        f"emo-async demo: {args.jobs} video{'s' if args.jobs != 1 else ''}"
        " on the built-in simulator"
    )
    say(f"  drawing {len(_DEMO_PEOPLE)} portraits and {args.jobs} voice clips in {inputs}")
    jobs = await anyio.to_thread.run_sync(_demo_inputs, inputs, args.jobs)
    if not real:
        out.say(
            "  note: PyAV is not installed, so the videos will be placeholder bytes, not"
            " playable; for real MP4s: pip install 'emo-async[video]'"
        )
    config = SimulatorConfig(time_scale=time_scale, real_video=real, max_running=_DEMO_MAX_RUNNING)
    counts = Counts(len(jobs))
    progress = Progress(
        progress_mode(out, args.verbose),
        counts,
        stream=out.human,
        interval=2.0,
    )
    sink = Sink(out, progress, counts, None)
    started = anyio.current_time()
    poll = PollPolicy(target_delay=0.5)
    async with Simulator(config) as sim:
        say(f"  simulator at {sim.base_url} (no API key needed: it uses its own)")
        async with Client(sim.api_key, base_url=sim.base_url, poll=poll) as client:
            interrupted = await execute(
                client,
                jobs,
                videos,
                sink=sink,
                progress=progress,
                # No journal: an earlier demo's tasks lived in another, long gone simulator.
                batch_kwargs={"journal": False, "max_tasks": _DEMO_MAX_RUNNING},
            )
    elapsed = anyio.current_time() - started
    summary(sink, out, elapsed, [("output", str(videos))])
    if interrupted:
        out.say("interrupted")
        return EXIT_INTERRUPTED
    made = [
        f"{job.name}.mp4" for job in jobs if await anyio.Path(videos / f"{job.name}.mp4").is_file()
    ]
    if made:
        kind = "playable MP4s with sound" if real else "placeholder files (not playable)"
        out.say(f"your videos ({kind}) are in {videos}/:")
        shown = made[:6]
        out.say("  " + "  ".join(shown) + ("  ..." if len(made) > len(shown) else ""))
        out.say(f"next: emo-async validate {inputs / 'manifest.csv'}")
    if out.json:
        out.emit_json({"type": "summary", **sink.states, "out": str(videos), "real_video": real})
    return EXIT_FAILED if sink.unsuccessful else EXIT_OK
