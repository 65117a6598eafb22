"""The argument parser: every command, option and default of ``emo-async``."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import NoReturn

from emo_async import DEFAULT_LIMITS, DEFAULT_POLL_POLICY, __version__

from ._output import EXIT_USAGE, JOURNAL_NAME

__all__ = ["build_parser"]


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (argparse's usage block buries the reason in a long run)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            print(message, end="", file=sys.stderr, flush=True)
        raise SystemExit(status)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _add_connection(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--api-key-env",
        default="DASHSCOPE_API_KEY",
        metavar="NAME",
        help="environment variable holding the API key (default: %(default)s); the key itself"
        " is never accepted as an argument",
    )
    p.add_argument(
        "--base-url",
        help="API base URL (default: $DASHSCOPE_BASE_URL, else $DASHSCOPE_HTTP_BASE_URL, else"
        " Beijing's endpoint)",
    )
    p.add_argument(
        "--workspace",
        metavar="ID",
        help="Model Studio workspace, sent on every API request (default: $DASHSCOPE_WORKSPACE)",
    )


def _add_batch_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-tasks",
        type=_positive_int,
        default=10,
        help="tasks open at once (default: %(default)s)",
    )
    p.add_argument(
        "--submit-rate",
        type=_positive_float,
        help="submits per second (default: the client's limit,"
        f" {DEFAULT_LIMITS.submit_qps:g} per second)",
    )
    p.add_argument(
        "--task-qps",
        type=_positive_float,
        default=DEFAULT_LIMITS.task_qps,
        help="task status queries per second (default: %(default)s)",
    )
    p.add_argument(
        "--submit-concurrency",
        type=_positive_int,
        default=None,
        metavar="N",
        help="billed submits (POSTs) in flight at once (default: adapted to the network's"
        " latency, so it does not set the pace)",
    )
    p.add_argument(
        "--download-concurrency", type=_positive_int, help="downloads at once (default: 4)"
    )
    p.add_argument(
        "--poll-delay",
        type=_positive_float,
        default=DEFAULT_POLL_POLICY.target_delay,
        help="longest delay, in seconds, before a finished task is noticed (default: %(default)s)",
    )


def _add_shared_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lease",
        type=_positive_float,
        default=30.0,
        metavar="SECONDS",
        help="a shared batch: how long this worker's claims last unrenewed; a dead worker's"
        " jobs go to the others after it (default: %(default)s)",
    )


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log to stderr (-vv: debug)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="emo-async",
        description="Batch talking-portrait videos with DashScope's EMO models.",
    )
    parser.add_argument("--version", action="version", version=f"emo-async {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run",
        help="make the videos of a manifest (CSV or JSONL)",
        description="Validate, upload, detect, submit, wait and download every row of a"
        " manifest. Interrupt with Ctrl-C; the same command resumes from the journal.",
    )
    run.add_argument("manifest", type=Path, help="CSV or JSONL: image, audio[, name, ...]")
    run.add_argument("--out", type=Path, required=True, help="folder for the videos")
    _add_connection(run)
    _add_batch_options(run)
    journal = run.add_mutually_exclusive_group()
    journal.add_argument(
        "--journal",
        metavar="PATH_OR_DSN",
        help=f"journal file (default: OUT/{JOURNAL_NAME}), or a postgresql:// DSN: a batch"
        " shared with other workers (`emo-async work`), named with --batch",
    )
    journal.add_argument(
        "--no-journal", action="store_true", help="keep no journal (an interrupted run starts over)"
    )
    run.add_argument(
        "--batch", metavar="NAME", help="the shared batch (with a postgresql:// journal)"
    )
    _add_shared_options(run)
    run.add_argument(
        "--reconcile",
        choices=("reconcile", "resubmit", "fail"),
        default="reconcile",
        help="a submit whose answer was lost: settle it by the task list (default: adopt its"
        " task, or send it again only when none was created), send it again at once (may"
        " bill twice), or leave it unresolved",
    )
    run.add_argument(
        "--rebill-expired",
        action="store_true",
        help="pay again for videos that expired before they were saved (by default such a"
        " job is reported expired, not submitted again)",
    )
    run.add_argument(
        "--dry-run", action="store_true", help="validate and estimate only; no API request"
    )
    run.add_argument("--report", type=Path, help="write every outcome to FILE (.csv or .jsonl)")
    _add_output(run)

    work = sub.add_parser(
        "work",
        help="join a batch shared through PostgreSQL and work on it with the other workers",
        description="Claim jobs of a shared batch (added by `emo-async run MANIFEST --journal"
        " postgresql://... --batch NAME`) and make their videos into --out, until every job of"
        " the batch has ended. Several workers may run at once, on any machines; a dead"
        " worker's jobs go to the others once its lease runs out.",
    )
    work.add_argument("--journal", required=True, metavar="DSN", help="postgresql:// DSN")
    work.add_argument("--batch", required=True, metavar="NAME", help="the shared batch")
    work.add_argument("--out", type=Path, required=True, help="folder for this worker's videos")
    _add_connection(work)
    _add_batch_options(work)
    _add_shared_options(work)
    work.add_argument(
        "--reconcile",
        choices=("reconcile", "fail"),
        default="reconcile",
        help="a submit whose answer was lost: settle it by the task list, or leave it unresolved",
    )
    work.add_argument("--report", type=Path, help="write every outcome to FILE (.csv or .jsonl)")
    _add_output(work)

    validate = sub.add_parser(
        "validate",
        help="check every row locally and estimate the bill (no API call)",
        description="Check every row of a manifest against the documented limits, list every"
        " problem with its row, and estimate the billed seconds. Nothing is sent anywhere.",
    )
    validate.add_argument("manifest", type=Path)
    _add_output(validate)

    detect = sub.add_parser(
        "detect",
        help="run emo-detect-v1 on one portrait",
        description="Upload a local portrait (or use a URL) and run emo-detect-v1 on it.",
    )
    detect.add_argument("image", help="a local file or an http(s)/oss URL")
    detect.add_argument("--ratio", choices=("1:1", "3:4"), default="1:1")
    _add_connection(detect)
    _add_output(detect)

    status = sub.add_parser(
        "status",
        help="summarise a batch journal (safe while the batch runs)",
        description="Counts, billed seconds, failures and downloads at risk of expiry.",
    )
    status.add_argument(
        "journal", help="the journal, the folder holding it, or a postgresql:// DSN (--batch)"
    )
    status.add_argument("--batch", metavar="NAME", help="the shared batch (with a DSN)")
    _add_connection(status)
    _add_output(status)

    resolve = sub.add_parser(
        "resolve",
        help="settle an unresolved job by hand: its task is TASK_ID, or TASK_ID is nobody's",
        description="An unresolved job's submit answer was lost and nothing proved which task,"
        " if any, it created; it is never sent again on its own. `emo-async status` lists"
        " such jobs with their candidate tasks. --task TASK_ID makes TASK_ID the job's task"
        " (the next `emo-async run` follows it and downloads its video); --release TASK_ID"
        " drops TASK_ID from every job's candidates. Stop the batch first. A task that is no"
        " job's candidate is checked with the API before it is assigned.",
    )
    resolve.add_argument("journal", type=Path, help="the journal, or the folder holding it")
    resolve.add_argument(
        "job",
        nargs="?",
        help="the job's name or key (a key prefix of 8+ characters will do); with --release,"
        " optional",
    )
    action = resolve.add_mutually_exclusive_group(required=True)
    action.add_argument("--task", metavar="TASK_ID", help="the task that is the job's")
    action.add_argument(
        "--release", metavar="TASK_ID", help="the task that is none of the jobs' (a candidate)"
    )
    _add_connection(resolve)
    _add_output(resolve)

    cancel = sub.add_parser(
        "cancel",
        help="cancel a journal's tasks that are still PENDING",
        description="Cancel every task of the journal that is still open. DashScope cancels"
        " only PENDING tasks; the others are listed as not cancellable. Stop the batch first.",
    )
    cancel.add_argument(
        "journal", help="the journal, the folder holding it, or a postgresql:// DSN (--batch)"
    )
    cancel.add_argument("--batch", metavar="NAME", help="the shared batch (with a DSN)")
    _add_connection(cancel)
    _add_output(cancel)

    sub.add_parser(
        "simulator",
        help="run the offline DashScope simulator (see `emo-async simulator --help`)",
        add_help=False,
    )

    demo = sub.add_parser(
        "demo",
        help="make a few videos end to end on the built-in simulator (no API key needed)",
        description="Start the simulator in this process, draw a few portraits and voices, and"
        " run a real batch through the public API.",
    )
    demo.add_argument("--jobs", type=_positive_int, default=12, help="videos to make")
    demo.add_argument("--out", type=Path, default=Path("emo-demo"), help="output folder")
    demo.add_argument(
        "--time-scale",
        type=_positive_float,
        help="real seconds per simulated second (default: about 15-20 s in all)",
    )
    _add_output(demo)
    return parser
