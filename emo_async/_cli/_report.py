"""Outcomes to the screen, the report file and JSON, and the closing summary."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import anyio

from emo_async import (
    AuthenticationError,
    ErrorInfo,
    InputError,
    Job,
    Outcome,
    OutcomeState,
    Problem,
    UnresolvedSubmitError,
)
from emo_async._manifest import ManifestRow

from ._output import Output, UsageError, err_fields, fmt_seconds
from ._progress import Counts, Progress, fmt_duration, printable

__all__ = ["REPORT_FIELDS", "Report", "Sink", "advice", "summary"]

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
_LISTED_FAILURES: Final = 20


class Report:
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


class Sink:
    """Everything that happens to an outcome: counts, notes, JSON, the report."""

    def __init__(
        self,
        out: Output,
        progress: Progress,
        counts: Counts,
        report: Report | None,
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
        #: (row, name, candidate task ids) of every unresolved job, for the closing advice.
        self.unresolved: list[tuple[int | None, str, tuple[str, ...]]] = []
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
                **err_fields(error),
            }
        )

    async def outcome(self, outcome: Outcome) -> None:
        row = self._row_of(outcome.job)
        state = outcome.state.value
        self.states[state] += 1
        earlier = outcome.path is not None and str(outcome.path) in self.skipped_paths
        self.skipped_paths.discard(str(outcome.path))
        if outcome.billed_seconds and not earlier:
            self.billed += outcome.billed_seconds
        name = printable(outcome.job.display_name)
        where = f"row {row} ({name})" if row is not None else name
        error = outcome.error
        if outcome.state == OutcomeState.UNRESOLVED:
            error = _unresolved_error(outcome)
            self.unresolved.append((row, name, _candidates_of(outcome)))
        # Successes are counted, not listed: one line per video is noise in a 10,000-row batch.
        if not outcome.ok:
            problems = _problems_of(outcome)
            if problems:
                text = "; ".join(str(p) for p in problems)
            elif error is not None:
                code = f" [{error.code}]" if error.code else ""
                text = f"{error.kind}{code}: {error.message}"
            else:
                text = "no reason given"
            self._failure(row, name, f"{state}: {text}")
            if not self.out.quiet:
                style = {OutcomeState.REJECTED: "yellow", OutcomeState.UNRESOLVED: "magenta"}.get(
                    outcome.state, "red"
                )
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
                **err_fields(error),
            }
        )

    @property
    def unsuccessful(self) -> int:
        return sum(n for s, n in self.states.items() if s != OutcomeState.DONE.value)


def _manifest_error(row: ManifestRow) -> ErrorInfo:
    text = "; ".join(str(p) for p in row.problems)
    return ErrorInfo(kind="ManifestError", message=f"row {row.row}: {text}")


def _candidates_of(outcome: Outcome) -> tuple[str, ...]:
    exc = outcome.exception
    return exc.candidates if isinstance(exc, UnresolvedSubmitError) else ()


def _unresolved_error(outcome: Outcome) -> ErrorInfo:
    """The error of an unresolved outcome, naming its candidate tasks (or that there are none):
    a report's reader settles the job with them."""
    base = outcome.error
    if base is None:
        base = ErrorInfo(kind="UnresolvedSubmitError", message="the submit's answer was lost")
    candidates = _candidates_of(outcome)
    listed = ", ".join(candidates)
    if candidates and listed in base.message:
        return base
    tail = f"candidate tasks: {listed}" if candidates else "no candidate task seen"
    return ErrorInfo(
        kind=base.kind,
        message=f"{base.message}; {tail}",
        code=base.code,
        request_id=base.request_id,
    )


def _problems_of(outcome: Outcome) -> tuple[Problem, ...]:
    exc = outcome.exception
    return exc.problems if isinstance(exc, InputError) else ()


def summary(sink: Sink, out: Output, elapsed: float, extra: Sequence[tuple[str, str]]) -> None:
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
        ("unresolved", str(sink.states["unresolved"])),
        ("billed", fmt_seconds(sink.billed) + " of video (this run)"),
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


def advice(sink: Sink, settle: str | None) -> list[str]:
    """What to do next about the jobs without a video, the settling of unresolved jobs last.

    Args:
        sink: The outcomes of the run.
        settle: What to name to ``emo-async status``/``resolve`` (the output folder or the
            journal), or None when no journal was kept.
    """
    lines = []
    failed = sink.states[OutcomeState.FAILED.value]
    if failed and settle is not None:
        lines.append(
            f"failed ({failed}): the same command tries them again (done jobs are skipped)"
        )
    expired = sink.states[OutcomeState.EXPIRED.value]
    if expired:
        # Paid for once already: resuming must not read as "nothing more to pay".
        lines.append(
            f"expired ({expired}): paid for, but the video URL ran out before it was saved;"
            " they are not paid for again unless you run with --rebill-expired"
        )
    unresolved = len(sink.unresolved)
    if unresolved:
        head = f"unresolved ({unresolved}): may have been billed, not sent again;"
        if settle is None:
            lines.append(
                f"{head} no journal was kept: check the candidate tasks listed above (their"
                " videos are kept in .unattributed/ of the output folder)"
            )
        else:
            lines.append(
                f"{head} see `emo-async status {settle}`, then settle each with"
                f" `emo-async resolve {settle} JOB --task TASK_ID` (or `--release TASK_ID`)"
            )
    return lines
