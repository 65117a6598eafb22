"""``emo-async``: the command line (run, validate, detect, status, cancel, simulator, demo).

An argparse front end over the public API; the only caller of ``anyio.run``. Exit codes: 0 all
done, 1 some job failed (or a row is bad), 2 bad usage or an unreadable manifest, 130 on
Ctrl-C (the batch stops cleanly; the same command resumes it from the journal).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import itertools
import json
import logging
import math
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO

import anyio
import anyio.to_thread
import attrs

from ._config import DEFAULT_LIMITS, DEFAULT_POLL_POLICY, DETECT_MODEL, PollPolicy
from ._exceptions import (
    APIError,
    AuthenticationError,
    EmoError,
    InputError,
    JournalError,
    JournalLockedError,
    Problem,
)
from ._manifest import Manifest, ManifestError, ManifestRow, open_manifest
from ._models import ErrorInfo, Job, Outcome, OutcomeState
from ._util import single_error

if TYPE_CHECKING:
    from ._batch import BatchEvent
    from ._client import Client
    from ._media import Estimate
    from ._progress import Counts, Progress

__all__ = ["main"]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130

REPORT_FIELDS: Final = (
    "row",
    "name",
    "state",
    "task_id",
    "path",
    "size",
    "sha256",
    "billed_seconds",
    "error_kind",
    "error_code",
    "error_message",
    "request_id",
)
_JOURNAL_NAME: Final = ".emo-journal.sqlite3"
_ROW_CHUNK: Final = 256
_VALIDATE_CONCURRENCY: Final = 16
_LISTED_FAILURES: Final = 20

logger = logging.getLogger("emo_async.cli")


class UsageError(Exception):
    """Bad usage of the command line (exit 2)."""


# --------------------------------------------------------------------------------------------
# Argument parsing.


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
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
        help="API base URL (default: $DASHSCOPE_HTTP_BASE_URL, else Beijing's endpoint)",
    )


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log to stderr (-vv: debug)")


def _parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = argparse.ArgumentParser(
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
    run.add_argument("--max-tasks", type=_positive_int, default=10, help="tasks open at once")
    run.add_argument("--submit-rate", type=_positive_float, help="submits per second")
    run.add_argument(
        "--task-qps",
        type=_positive_float,
        default=DEFAULT_LIMITS.task_qps,
        help="task status queries per second (default: %(default)s)",
    )
    run.add_argument(
        "--download-concurrency", type=_positive_int, help="downloads at once (default: 4)"
    )
    run.add_argument(
        "--poll-delay",
        type=_positive_float,
        default=DEFAULT_POLL_POLICY.target_delay,
        help="longest delay, in seconds, before a finished task is noticed (default: %(default)s)",
    )
    journal = run.add_mutually_exclusive_group()
    journal.add_argument(
        "--journal", type=Path, help=f"journal file (default: OUT/{_JOURNAL_NAME})"
    )
    journal.add_argument(
        "--no-journal", action="store_true", help="keep no journal (an interrupted run starts over)"
    )
    run.add_argument(
        "--reconcile",
        choices=("reconcile", "resubmit", "fail"),
        default="reconcile",
        help="a submit whose answer was lost: find its task in the task list (default),"
        " send it again (may bill twice), or fail the job",
    )
    run.add_argument(
        "--dry-run", action="store_true", help="validate and estimate only; no API request"
    )
    run.add_argument("--report", type=Path, help="write every outcome to FILE (.csv or .jsonl)")
    _add_output(run)

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
    status.add_argument("journal", type=Path, help="the journal, or the folder holding it")
    _add_output(status)

    cancel = sub.add_parser(
        "cancel",
        help="cancel a journal's tasks that are still PENDING",
        description="Cancel every task of the journal that is still open. DashScope cancels"
        " only PENDING tasks; the others are listed as not cancellable. Stop the batch first.",
    )
    cancel.add_argument("journal", type=Path, help="the journal, or the folder holding it")
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


# --------------------------------------------------------------------------------------------
# Logging: to stderr, never showing the key.


class _RedactingFormatter(logging.Formatter):
    def __init__(self, secrets: Sequence[str]) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        self._secrets = [s for s in secrets if s]

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def _setup_logging(verbose: int, secrets: Sequence[str] = ()) -> None:
    if not verbose:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RedactingFormatter(secrets))
    root = logging.getLogger("emo_async")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    root.propagate = False


# --------------------------------------------------------------------------------------------
# Shared helpers.


class _Output:
    """Where human text goes (stdout, or stderr when stdout carries JSON)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.json: bool = bool(getattr(args, "json", False))
        self.quiet: bool = bool(getattr(args, "quiet", False))
        self.human: TextIO = sys.stderr if self.json else sys.stdout

    def say(self, text: str = "") -> None:
        print(text, file=self.human, flush=True)

    def error(self, text: str) -> None:
        print(f"emo-async: {text}", file=sys.stderr, flush=True)

    def emit_json(self, obj: dict[str, Any]) -> None:
        print(json.dumps(obj, ensure_ascii=False), file=sys.stdout, flush=True)


def _api_key(args: argparse.Namespace) -> str:
    name = args.api_key_env
    key = os.environ.get(name)
    if not key:
        raise UsageError(
            f"no API key: set the environment variable {name}"
            + (" (or name another one with --api-key-env)" if name == "DASHSCOPE_API_KEY" else "")
        )
    return key


def _client(args: argparse.Namespace, key: str, **kwargs: Any) -> Client:
    from ._client import Client

    try:
        return Client(key, base_url=args.base_url, **kwargs)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _journal_path(path: Path) -> Path:
    return path / _JOURNAL_NAME if path.is_dir() else path


def _err_fields(error: ErrorInfo | None) -> dict[str, Any]:
    return {
        "error_kind": error.kind if error else None,
        "error_code": error.code if error else None,
        "error_message": error.message if error else None,
        "request_id": error.request_id if error else None,
    }


def _manifest_error(row: ManifestRow) -> ErrorInfo:
    text = "; ".join(str(p) for p in row.problems)
    return ErrorInfo(kind="ManifestError", message=f"row {row.row}: {text}")


def _problems_of(outcome: Outcome) -> tuple[Problem, ...]:
    exc = outcome.exception
    return exc.problems if isinstance(exc, InputError) else ()


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds:,.1f} s"


# --------------------------------------------------------------------------------------------
# Reading a manifest without blocking the loop.


async def _rows(manifest: Manifest) -> AsyncIterator[ManifestRow]:
    """The manifest's rows, read a chunk at a time in a worker thread."""
    it: Iterator[ManifestRow] = iter(manifest)
    try:
        while True:
            chunk = await anyio.to_thread.run_sync(lambda: list(itertools.islice(it, _ROW_CHUNK)))
            if not chunk:
                return
            for row in chunk:
                yield row
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


async def _open_manifest(path: Path, out: _Output) -> tuple[Manifest, int]:
    """Open and count a manifest (a streaming pass; nothing is kept)."""
    manifest = await anyio.to_thread.run_sync(open_manifest, path)
    if manifest.unknown_columns:
        out.error(
            "ignoring unknown column(s): "
            + ", ".join(repr(c) for c in manifest.unknown_columns)
            + " (known: image, audio, name, style_level, ratio, face_bbox, ext_bbox)"
        )
    total = await anyio.to_thread.run_sync(manifest.count)
    return manifest, total


# --------------------------------------------------------------------------------------------
# validate (and run --dry-run).


@attrs.define
class _Tally:
    jobs: int = 0
    valid: int = 0
    bad_rows: int = 0
    billed: dict[str, float] = attrs.field(factory=lambda: {"1:1": 0.0, "3:4": 0.0})
    by_ratio: dict[str, int] = attrs.field(factory=lambda: {"1:1": 0, "3:4": 0})
    unknown_duration: int = 0

    def estimate(self) -> Estimate:
        from ._media import Estimate

        return Estimate(
            jobs=self.jobs,
            valid=self.valid,
            billed_seconds=sum(self.billed.values()),
            by_ratio=dict(self.by_ratio),
            billed_seconds_by_ratio=dict(self.billed),
            unknown_duration=self.unknown_duration,
            errors=(),
        )


def _render_estimate(est: Estimate) -> str:
    parts = []
    for ratio in ("1:1", "3:4"):
        n = est.by_ratio.get(ratio, 0)
        parts.append(
            f"{ratio}: {n} job{'s' if n != 1 else ''},"
            f" {_fmt_seconds(est.billed_seconds_by_ratio.get(ratio, 0.0))}"
        )
    text = (
        f"estimate: {est.valid} valid of {est.jobs} job{'s' if est.jobs != 1 else ''},"
        f" {_fmt_seconds(est.billed_seconds)} of video billed ({'; '.join(parts)})"
    )
    if est.unknown_duration:
        text += f"; {est.unknown_duration} with URL audio not counted (duration unknown)"
    return text


async def _validate_rows(
    manifest: Manifest, out: _Output, on_problem: Callable[[int, str, Problem], None]
) -> _Tally:
    """Validate every row locally, a chunk at a time; problems come out in row order."""
    from ._media import validate_job

    tally = _Tally()
    chunk: list[ManifestRow] = []

    async def flush() -> None:
        results: dict[int, Any] = {}

        async def one(i: int, row: ManifestRow) -> None:
            assert row.job is not None
            try:
                results[i] = await validate_job(row.job)
            except InputError as exc:
                results[i] = exc

        async with anyio.create_task_group() as tg:
            for i, row in enumerate(chunk):
                if row.job is not None:
                    tg.start_soon(one, i, row)
        for i, row in enumerate(chunk):
            tally.jobs += 1
            label = printable_label(row)
            if row.job is None:
                tally.bad_rows += 1
                for problem in row.problems:
                    on_problem(row.row, label, problem)
                continue
            result = results[i]
            if isinstance(result, InputError):
                tally.bad_rows += 1
                for problem in result.problems:
                    on_problem(row.row, label, problem)
                continue
            tally.valid += 1
            tally.by_ratio[result.ratio] = tally.by_ratio.get(result.ratio, 0) + 1
            seconds = result.billed_seconds_estimate
            if seconds is None:
                tally.unknown_duration += 1
            else:
                tally.billed[result.ratio] = tally.billed.get(result.ratio, 0.0) + seconds
        chunk.clear()

    async for row in _rows(manifest):
        chunk.append(row)
        if len(chunk) >= _VALIDATE_CONCURRENCY:
            await flush()
    await flush()
    return tally


def printable_label(row: ManifestRow) -> str:
    from ._progress import printable

    return printable(row.label)


async def _cmd_validate(args: argparse.Namespace, *, dry_run: bool = False) -> int:
    out = _Output(args)
    manifest, total = await _open_manifest(args.manifest, out)
    if not out.quiet:
        out.say(
            f"{args.manifest}: {manifest.format.upper()}, {total} row{'s' if total != 1 else ''}"
            + (" (dry run: nothing is sent)" if dry_run else "")
        )

    def on_problem(row: int, label: str, problem: Problem) -> None:
        if out.json:
            out.emit_json(
                {
                    "type": "problem",
                    "row": row,
                    "name": label,
                    "field": problem.field,
                    "message": problem.message,
                    "limit": problem.limit,
                }
            )
        if not out.quiet or out.json:
            limit = f" (limit: {problem.limit})" if problem.limit else ""
            out.say(f"row {row} ({label}): {problem.field}: {problem.message}{limit}")

    tally = await _validate_rows(manifest, out, on_problem)
    est = tally.estimate()
    if out.json:
        out.emit_json(
            {
                "type": "estimate",
                "jobs": est.jobs,
                "valid": est.valid,
                "bad_rows": tally.bad_rows,
                "billed_seconds": round(est.billed_seconds, 3),
                "by_ratio": dict(est.by_ratio),
                "billed_seconds_by_ratio": {
                    k: round(v, 3) for k, v in est.billed_seconds_by_ratio.items()
                },
                "unknown_duration": est.unknown_duration,
            }
        )
    out.say(_render_estimate(est))
    if tally.bad_rows:
        out.say(f"{tally.bad_rows} row{'s' if tally.bad_rows != 1 else ''} with problems")
        return EXIT_FAILED
    out.say("every row is valid")
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# run: outcomes to the screen, the report and JSON.


class _Report:
    """A CSV or JSONL file of every outcome, written as outcomes arrive."""

    def __init__(self, path: Path) -> None:
        suffix = path.suffix.lower()
        if suffix not in (".csv", ".jsonl", ".ndjson", ".json"):
            raise UsageError(f"--report {path}: the file name must end in .csv or .jsonl")
        self.path = path
        self.kind = "csv" if suffix == ".csv" else "jsonl"
        self._file: Any = None
        self._lock = anyio.Lock()

    async def open(self) -> None:
        import aiofiles

        try:
            await anyio.Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._file = await aiofiles.open(self.path, "w", encoding="utf-8", newline="")
        except OSError as exc:
            raise UsageError(f"--report {self.path}: {exc.strerror or exc}") from None
        if self.kind == "csv":
            await self._write(_csv_line(REPORT_FIELDS))

    async def _write(self, text: str) -> None:
        async with self._lock:
            await self._file.write(text)

    async def add(self, record: dict[str, Any]) -> None:
        if self.kind == "csv":
            await self._write(
                _csv_line(["" if record[k] is None else record[k] for k in REPORT_FIELDS])
            )
        else:
            await self._write(json.dumps(record, ensure_ascii=False) + "\n")

    async def aclose(self) -> None:
        if self._file is not None:
            with anyio.CancelScope(shield=True):
                await self._file.close()
            self._file = None


def _csv_line(values: Sequence[Any]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(values)
    return buf.getvalue()


class _Sink:
    """Everything that happens to an outcome: counts, notes, JSON, the report."""

    def __init__(
        self,
        out: _Output,
        progress: Progress,
        counts: Counts,
        report: _Report | None,
    ) -> None:
        self.out = out
        self.progress = progress
        self.counts = counts
        self.report = report
        self.states: dict[str, int] = {s.value: 0 for s in OutcomeState}
        self.skipped = 0
        #: Files of jobs done in an earlier run (their seconds were billed then).
        self.skipped_paths: set[str] = set()
        self.billed = 0.0
        self.failures: list[tuple[int | None, str, str]] = []
        self.failure_count = 0
        self.auth_error: str | None = None
        # id(job) -> (job, row): the job is kept so its id cannot be reused meanwhile.
        self._rows: dict[int, tuple[Job, int]] = {}

    def remember(self, row: ManifestRow) -> None:
        assert row.job is not None
        self._rows[id(row.job)] = (row.job, row.row)

    def _row_of(self, job: Job) -> int | None:
        found = self._rows.pop(id(job), None)
        return found[1] if found is not None and found[0] is job else None

    def _failure(self, row: int | None, name: str, text: str) -> None:
        self.failure_count += 1
        if len(self.failures) < _LISTED_FAILURES:
            self.failures.append((row, name, text))

    async def _record(self, record: dict[str, Any]) -> None:
        if self.out.json:
            self.out.emit_json({"type": "outcome", **record})
        if self.report is not None:
            await self.report.add(record)

    async def bad_row(self, row: ManifestRow) -> None:
        from ._progress import printable

        self.counts.bad_rows += 1
        self.states[OutcomeState.REJECTED.value] += 1
        error = _manifest_error(row)
        name = printable(row.label)
        text = "; ".join(str(p) for p in row.problems)
        self._failure(row.row, name, f"rejected: {text}")
        if not self.out.quiet:
            self.progress.note(f"✗ row {row.row} ({name}): rejected: {text}", style="yellow")
        await self._record(
            {
                "row": row.row,
                "name": row.name,
                "state": OutcomeState.REJECTED.value,
                "task_id": None,
                "path": None,
                "size": None,
                "sha256": None,
                "billed_seconds": None,
                **_err_fields(error),
            }
        )

    async def outcome(self, outcome: Outcome) -> None:
        from ._progress import printable

        row = self._row_of(outcome.job)
        state = outcome.state.value
        self.states[state] += 1
        earlier = outcome.path is not None and str(outcome.path) in self.skipped_paths
        self.skipped_paths.discard(str(outcome.path))
        if outcome.billed_seconds and not earlier:
            self.billed += outcome.billed_seconds
        name = printable(outcome.job.display_name)
        where = f"row {row} ({name})" if row is not None else name
        # Successes are counted, not listed: one line per video is noise in a 10,000-row batch.
        if not outcome.ok:
            problems = _problems_of(outcome)
            if problems:
                text = "; ".join(str(p) for p in problems)
            elif outcome.error is not None:
                code = f" [{outcome.error.code}]" if outcome.error.code else ""
                text = f"{outcome.error.kind}{code}: {outcome.error.message}"
            else:
                text = "no reason given"
            self._failure(row, name, f"{state}: {text}")
            if not self.out.quiet:
                style = "yellow" if outcome.state == OutcomeState.REJECTED else "red"
                self.progress.note(f"✗ {where}: {state}: {text}", style=style)
            if isinstance(outcome.exception, AuthenticationError) and self.auth_error is None:
                self.auth_error = str(outcome.exception)
        await self._record(
            {
                "row": row,
                "name": outcome.job.display_name,
                "state": state,
                "task_id": outcome.task_id,
                "path": str(outcome.path) if outcome.path else None,
                "size": outcome.size,
                "sha256": outcome.sha256,
                "billed_seconds": outcome.billed_seconds,
                **_err_fields(outcome.error),
            }
        )

    @property
    def unsuccessful(self) -> int:
        return sum(n for s, n in self.states.items() if s != OutcomeState.DONE.value)


def _progress_mode(out: _Output, verbose: int) -> str:
    if out.quiet:
        return "off"
    if out.json or verbose:
        return "plain"
    return "live" if sys.stdout.isatty() else "plain"


async def _watch_signals(scope: anyio.CancelScope, flag: list[bool]) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            if not flag[0]:
                flag[0] = True
                scope.cancel()


async def _execute(
    client: Client,
    jobs: AsyncIterator[Job] | list[Job],
    out_dir: Path,
    *,
    sink: _Sink,
    progress: Progress,
    batch_kwargs: dict[str, Any],
) -> bool:
    """Run a batch with the progress display; True if it was interrupted."""
    interrupted = [False]

    def on_event(event: BatchEvent) -> None:
        if event.kind == "skipped":
            sink.skipped += 1
            if event.detail:
                sink.skipped_paths.add(event.detail)

    try:
        async with anyio.create_task_group() as outer:
            outer.start_soon(_watch_signals, outer.cancel_scope, interrupted)
            run = client.run_batch(jobs, out_dir, on_event=on_event, **batch_kwargs)
            try:
                async with run as outcomes:
                    progress.attach(run.stats)
                    async with anyio.create_task_group() as tg:
                        await tg.start(progress.run)
                        async for outcome in outcomes:
                            await sink.outcome(outcome)
                            if sink.auth_error is not None:
                                break
                        tg.cancel_scope.cancel()
            finally:
                progress.close()
            outer.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # A journal that is locked, a manifest that vanished...: the error, not a group of one.
        single = single_error(group)
        if single is None:
            raise
        raise single from None
    return interrupted[0]


def _summary(sink: _Sink, out: _Output, elapsed: float, extra: Sequence[tuple[str, str]]) -> None:
    from ._progress import fmt_duration

    rows = [
        (
            "done",
            str(sink.states["done"])
            + (f" ({sink.skipped} from an earlier run)" if sink.skipped else ""),
        ),
        ("failed", str(sink.states["failed"])),
        ("rejected", str(sink.states["rejected"])),
        ("expired", str(sink.states["expired"])),
        ("cancelled", str(sink.states["cancelled"])),
        ("billed", _fmt_seconds(sink.billed) + " of video (this run)"),
        ("elapsed", fmt_duration(elapsed)),
        *extra,
    ]
    if out.human.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title="summary", show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column()
        for key, value in rows:
            table.add_row(key, value)
        Console(file=out.human, highlight=False).print(table)
    else:
        out.say("summary:")
        for key, value in rows:
            out.say(f"  {key:<10} {value}")
    if sink.failure_count:
        out.say(f"jobs without a video ({sink.failure_count}):")
        for row, name, text in sink.failures:
            where = f"row {row} ({name})" if row is not None else name
            out.say(f"  {where}: {text}")
        if sink.failure_count > len(sink.failures):
            out.say(
                f"  ... and {sink.failure_count - len(sink.failures)} more"
                " (see --report FILE, or emo-async status)"
            )


async def _cmd_run(args: argparse.Namespace) -> int:
    if args.dry_run:
        return await _cmd_validate(args, dry_run=True)
    from ._progress import Counts, Progress

    out = _Output(args)
    key = _api_key(args)
    _setup_logging(args.verbose, [key])
    manifest, total = await _open_manifest(args.manifest, out)
    limits = attrs.evolve(
        DEFAULT_LIMITS,
        task_qps=args.task_qps,
        # The client's own limits must not cap what the user asked of the batch.
        submit_qps=args.submit_rate or DEFAULT_LIMITS.submit_qps,
        max_downloads=max(DEFAULT_LIMITS.max_downloads, args.download_concurrency or 0),
    )
    poll = attrs.evolve(DEFAULT_POLL_POLICY, target_delay=args.poll_delay)
    client = _client(args, key, limits=limits, poll=poll)
    if args.no_journal:
        journal: Path | bool = False
    else:
        journal = args.journal if args.journal is not None else True
    journal_path = (
        None
        if journal is False
        else (args.journal if args.journal is not None else args.out / _JOURNAL_NAME)
    )
    report = _Report(args.report) if args.report is not None else None
    counts = Counts(total)
    progress = Progress(
        _progress_mode(out, args.verbose),  # type: ignore[arg-type]
        counts,
        stream=out.human,
    )
    sink = _Sink(out, progress, counts, report)

    async def jobs() -> AsyncIterator[Job]:
        async for row in _rows(manifest):
            if row.job is None:
                await sink.bad_row(row)
                continue
            sink.remember(row)
            yield row.job

    if not out.quiet:
        out.say(f"{args.manifest}: {total} row{'s' if total != 1 else ''} → {args.out}")
    started = anyio.current_time()
    try:
        if report is not None:
            await report.open()
        async with client:
            interrupted = await _execute(
                client,
                jobs(),
                args.out,
                sink=sink,
                progress=progress,
                batch_kwargs={
                    "journal": journal,
                    "max_tasks": args.max_tasks,
                    "submit_rate": args.submit_rate,
                    "download_concurrency": args.download_concurrency,
                    "reconcile": args.reconcile,
                },
            )
    finally:
        if report is not None:
            await report.aclose()
    elapsed = anyio.current_time() - started
    extra = [("output", str(args.out))]
    if journal_path is not None:
        extra.append(("journal", str(journal_path)))
    if report is not None:
        extra.append(("report", str(report.path)))
    code = EXIT_OK
    if sink.auth_error is not None:
        out.error(f"the API key was refused: {sink.auth_error}")
        code = EXIT_USAGE
    elif interrupted:
        code = EXIT_INTERRUPTED
    elif sink.unsuccessful:
        code = EXIT_FAILED
    if not (out.json and out.quiet):
        _summary(sink, out, elapsed, extra)
    if interrupted:
        hint = (
            "run the same command again to resume"
            if journal_path is not None
            else "no journal was kept: a new run starts over"
        )
        out.say(f"interrupted: {hint}")
    if out.json:
        out.emit_json(
            {
                "type": "summary",
                "total": total,
                **sink.states,
                "skipped": sink.skipped,
                "billed_seconds": round(sink.billed, 3),
                "elapsed": round(elapsed, 3),
                "interrupted": interrupted,
                "exit_code": code,
                "out": str(args.out),
                "journal": str(journal_path) if journal_path else None,
            }
        )
    return code


# --------------------------------------------------------------------------------------------
# detect, status, cancel.


def _is_url(text: str) -> bool:
    return text.lower().startswith(("http://", "https://", "oss://"))


async def _cmd_detect(args: argparse.Namespace) -> int:
    out = _Output(args)
    key = _api_key(args)
    _setup_logging(args.verbose, [key])
    image: str = args.image
    local: Path | None = None
    if not _is_url(image):
        from ._media import MediaProbeError, check_image, probe_image

        local = Path(image)
        try:
            info = await anyio.to_thread.run_sync(probe_image, local)
        except MediaProbeError as exc:
            out.error(str(exc))
            return EXIT_FAILED
        problems = check_image(info)
        if problems:
            for problem in problems:
                out.error(str(problem))
            return EXIT_FAILED
    async with _client(args, key) as client:
        url = image if local is None else await client.upload(local, model=DETECT_MODEL)
        detection = await client.detect(url, ratio=args.ratio)
    if out.json:
        out.emit_json({"image": image, **detection.to_json()})
    else:
        if detection.check_pass:
            out.say(f"pass ({args.ratio})")
            out.say(f"  face_bbox {list(detection.face_bbox or ())}")
            out.say(f"  ext_bbox  {list(detection.ext_bbox or ())}")
        else:
            out.say(f"rejected: {detection.message or 'no reason given'}")
    return EXIT_OK if detection.check_pass else EXIT_FAILED


async def _cmd_status(args: argparse.Namespace) -> int:
    from ._journal import read_summary

    out = _Output(args)
    path = _journal_path(args.journal)
    summary = await read_summary(path)
    if out.json:
        out.emit_json(
            {
                "journal": str(summary.path),
                "total": summary.total,
                "by_phase": dict(summary.by_phase),
                "billed_seconds": summary.billed_seconds,
                "failures": [
                    {"name": name, **_err_fields(error)} for name, error in summary.failures
                ],
                "at_risk": [
                    {"name": name, "url_deadline": deadline.isoformat()}
                    for name, deadline in summary.at_risk
                ],
            }
        )
    else:
        out.say(summary.render())
    return EXIT_OK


async def _cmd_cancel(args: argparse.Namespace) -> int:
    from ._journal import JobPhase, open_journal
    from ._progress import printable

    out = _Output(args)
    key = _api_key(args)
    _setup_logging(args.verbose, [key])
    path = _journal_path(args.journal)
    if not await anyio.Path(path).is_file():
        raise UsageError(f"no journal at {path}")
    cancelled = not_cancellable = unknown = errors = 0
    try:
        journal_cm = open_journal(path)
        async with journal_cm as journal, _client(args, key) as client:
            records = await journal.unfinished()
            for rec in records:
                name = printable(rec.name)
                if rec.phase == JobPhase.SUBMITTED and rec.task_id:
                    try:
                        task = await client.cancel_task(rec.task_id)
                    except APIError as exc:
                        try:
                            now = await client.get_task(rec.task_id)
                            state = now.status.value
                        except EmoError:
                            state = "unknown"
                        not_cancellable += 1
                        reason = exc.code or exc.message or str(exc)
                        line = f"{name}: task {rec.task_id} is {state}: not cancellable ({reason})"
                        record: dict[str, Any] = {"state": state, "cancelled": False}
                    except EmoError as exc:
                        errors += 1
                        line = f"{name}: task {rec.task_id}: {exc}"
                        record = {"state": None, "cancelled": False, "error": str(exc)}
                    else:
                        cancelled += 1
                        await journal.record_terminal(
                            rec.key,
                            JobPhase.CANCELLED,
                            error=ErrorInfo("JobCancelledError", "cancelled with emo-async cancel"),
                        )
                        line = f"{name}: task {rec.task_id} cancelled"
                        record = {"state": task.status.value, "cancelled": True}
                elif rec.phase == JobPhase.INTENT:
                    unknown += 1
                    line = (
                        f"{name}: a submit whose answer was lost (no task id): not cancellable"
                        " from here; run the batch again to reconcile it"
                    )
                    record = {"state": None, "cancelled": False}
                else:
                    continue  # new: nothing on the server; finished: only the download is left
                if out.json:
                    out.emit_json({"name": rec.name, "task_id": rec.task_id, **record})
                elif not out.quiet:
                    out.say(line)
    except JournalLockedError as exc:
        raise UsageError(f"{exc}; stop the batch (Ctrl-C) first") from None
    out.say(
        f"cancelled {cancelled}, not cancellable {not_cancellable}"
        + (f", unknown {unknown}" if unknown else "")
        + (f", errors {errors}" if errors else "")
    )
    return EXIT_FAILED if errors else EXIT_OK


# --------------------------------------------------------------------------------------------
# demo.

_DEMO_PEOPLE: Final = ("ada", "bo", "cy")
#: Simulated seconds a demo task takes (processing_base + per-second x the average clip).
_DEMO_TASK_SECONDS: Final = 15.0 + 2.0 * 3.5
_DEMO_MAX_RUNNING: Final = 10


def _demo_inputs(folder: Path, n_jobs: int) -> list[Job]:
    from ._samples import make_sample_set

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


async def _cmd_demo(args: argparse.Namespace) -> int:
    from ._client import Client
    from ._progress import Counts, Progress
    from .simulator import Simulator, SimulatorConfig
    from .simulator._video import av_available

    out = _Output(args)
    _setup_logging(args.verbose)
    folder: Path = args.out
    inputs, videos = folder / "inputs", folder / "videos"
    real = av_available()
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
        _progress_mode(out, args.verbose),  # type: ignore[arg-type]
        counts,
        stream=out.human,
        interval=2.0,
    )
    sink = _Sink(out, progress, counts, None)
    started = anyio.current_time()
    poll = PollPolicy(target_delay=0.5)
    async with Simulator(config) as sim:
        say(f"  simulator at {sim.base_url} (no API key needed: it uses its own)")
        async with Client(sim.api_key, base_url=sim.base_url, poll=poll) as client:
            interrupted = await _execute(
                client,
                jobs,
                videos,
                sink=sink,
                progress=progress,
                # No journal: an earlier demo's tasks lived in another, long gone simulator.
                batch_kwargs={"journal": False, "max_tasks": _DEMO_MAX_RUNNING},
            )
    elapsed = anyio.current_time() - started
    _summary(sink, out, elapsed, [("output", str(videos))])
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


# --------------------------------------------------------------------------------------------
# Entry point.

_COMMANDS: Final[dict[str, Callable[[argparse.Namespace], Any]]] = {
    "run": _cmd_run,
    "validate": _cmd_validate,
    "detect": _cmd_detect,
    "status": _cmd_status,
    "cancel": _cmd_cancel,
    "demo": _cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["simulator"]:
        from .simulator.__main__ import main as simulator_main

        return simulator_main(args_list[1:])
    args = _parser().parse_args(args_list)
    command = _COMMANDS[args.command]
    try:
        return int(anyio.run(command, args, backend="asyncio"))
    except UsageError as exc:
        print(f"emo-async: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ManifestError as exc:
        print(f"emo-async: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except JournalError as exc:
        print(f"emo-async: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except EmoError as exc:
        print(f"emo-async: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("emo-async: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
