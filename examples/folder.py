"""Make one talking-portrait video per voice clip of a folder, with one portrait.

    python examples/folder.py voices/ presenter.png videos/

Every ``*.wav`` / ``*.mp3`` of ``voices/`` becomes ``videos/<clip name>.mp4``. The batch keeps a
journal in ``videos/``: stop it with Ctrl-C and run the same command again to resume without
paying twice. Prints one line per clip as it finishes, then a summary; exits 0 when every clip
is done, 1 otherwise. The key comes from ``DASHSCOPE_API_KEY`` (``DASHSCOPE_HTTP_BASE_URL``
picks another endpoint, e.g. the simulator's).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import anyio

from emo_async import DEFAULT_POLL_POLICY, Client, Job, OutcomeState, PollPolicy

AUDIO_SUFFIXES = {".wav", ".mp3"}


def clips_of(folder: Path) -> list[Path]:
    """The folder's voice clips, in name order (not recursive)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)


async def make_videos(args: argparse.Namespace) -> int:
    clips = clips_of(args.voices)
    if not clips:
        print(f"no .wav or .mp3 files in {args.voices}", file=sys.stderr)
        return 2
    jobs = [Job(args.portrait, clip, style_level=args.style_level) for clip in clips]
    states: Counter[OutcomeState] = Counter()
    billed = 0.0
    poll = PollPolicy(target_delay=args.poll_delay)
    async with Client(poll=poll) as client:
        batch = client.run_batch(jobs, args.out, max_tasks=args.max_tasks)
        async with batch as outcomes:
            async for outcome in outcomes:
                states[outcome.state] += 1
                billed += outcome.billed_seconds or 0.0
                detail = outcome.path if outcome.ok else outcome.error and outcome.error.message
                print(f"{outcome.job.display_name}: {outcome.state} {detail or ''}".rstrip())
        skipped = batch.stats().skipped
    counts = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
    print(f"{len(jobs)} clips: {counts}; {skipped} from an earlier run; {billed:.1f} s billed")
    return 0 if states[OutcomeState.DONE] == len(jobs) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("voices", type=Path, help="folder of .wav / .mp3 clips")
    parser.add_argument("portrait", type=Path, help="the portrait every video animates")
    parser.add_argument("out", type=Path, help="folder for the videos (and the journal)")
    parser.add_argument("--style-level", choices=("normal", "calm", "active"), default="normal")
    parser.add_argument("--max-tasks", type=int, default=10, help="tasks open at once")
    parser.add_argument(
        "--poll-delay",
        type=float,
        default=DEFAULT_POLL_POLICY.target_delay,
        help="longest delay before a finished task is noticed, seconds (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if not args.voices.is_dir():
        parser.error(f"{args.voices} is not a folder")
    return anyio.run(make_videos, args)


if __name__ == "__main__":
    sys.exit(main())
