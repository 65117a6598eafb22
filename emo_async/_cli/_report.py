"""Outcomes to the screen, the report file and JSON, and the closing summary."""

from __future__ import annotations

import bisect
import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import anyio
import attrs

from emo_async import (
    AuthenticationError,
    BatchEvent,
    ErrorInfo,
    InputError,
    Job,
    Outcome,
    OutcomeState,
    Problem,
    UnresolvedSubmitError,
)
from emo_async._manifest import ManifestRow

from ._output import Output, UsageError, err_fields, fmt_seconds, problem_text
from ._progress import Counts, Progress, fmt_duration, printable

__all__ = ["PENDING", "REPORT_FIELDS", "Report", "Sink", "advice", "summary"]

#: The state of a row without an outcome: the run stopped before it finished (or began).
PENDING: Final = "pending"

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
        # The display counts what the summary and the report count: these very outcomes.
        counts.states = self.states
        self.skipped = 0
        #: Files of jobs done in an earlier run (their seconds were billed then).
        self.skipped_paths: set[str] = set()
        #: Seconds billed for the tasks this run created (see :meth:`event`).
        self.billed = 0.0
        #: The journal's billed seconds over every run, once read after the run.
        self.billed_total: float | None = None
        self.pending = 0
        self.failures: list[tuple[int, str, str]] = []
        self.failure_count = 0
        self.auth_error: str | None = None
        #: (row, name, candidate task ids) of every unresolved job, for the closing advice.
        self.unresolved: list[tuple[int | None, str, tuple[str, ...]]] = []
        # id(job) -> (job, row): the job is kept so its id cannot be reused meanwhile.
        self._rows: dict[int, tuple[Job, int]] = {}
        #: Manifest rows that have their line in the report (an outcome or a rejection).
        self.rows_reported: set[int] = set()
        self._created: set[str] = set()
        #: Jobs whose outcome came with no row known yet, by how many such outcomes.
        self._early: dict[Job, list[dict[str, Any]]] = {}
        self._resumed: set[str] = set()

    def event(self, event: BatchEvent) -> None:
        """Note which tasks this run created: only their seconds are billed to this run."""
        if event.kind == "skipped":
            self.skipped += 1
            self.counts.skipped = self.skipped
            if event.detail:
                self.skipped_paths.add(event.detail)
        elif event.kind in ("submitted", "adopted") and event.task_id:
            self._created.add(event.task_id)
        elif event.kind == "resumed" and event.task_id:
            # Submitted (and billed) by an earlier run; this one only waits for it.
            self._resumed.add(event.task_id)

    async def remember(self, row: ManifestRow) -> None:
        assert row.job is not None
        if await self.accounted(row):
            return
        self._rows[id(row.job)] = (row.job, row.row)

    async def accounted(self, row: ManifestRow) -> bool:
        """Whether the row has its line in the report, writing it if its outcome came first.

        A job the batch picked up from the journal at start reports the journal's copy of the
        job (equal, not the same object), often before its row is read: that outcome's line
        waits for its row number here.
        """
        if row.row in self.rows_reported:
            return True
        waiting = self._early.get(row.job) if row.job is not None else None
        if waiting:
            record = waiting.pop(0)
            record["row"] = row.row
            self.rows_reported.add(row.row)
            await self._record(record)
            return True
        return False

    async def flush(self) -> None:
        """Write the outcomes no row claimed (with no row number): none is ever dropped."""
        for records in self._early.values():
            for record in records:
                await self._record(record)
        self._early.clear()

    def _row_of(self, job: Job) -> int | None:
        found = self._rows.pop(id(job), None)
        return found[1] if found is not None and found[0] is job else None

    def _failure(self, row: int | None, name: str, text: str) -> None:
        # Listed in row order, whatever order they finished in: the first rows are kept.
        self.failure_count += 1
        bisect.insort(self.failures, (row if row is not None else 1 << 62, name, text))
        del self.failures[_LISTED_FAILURES:]

    async def _record(self, record: dict[str, Any]) -> None:
        if self.out.json:
            self.out.emit_json({"type": "outcome", **record})
        if self.report is not None:
            await self.report.add(record)

    async def bad_row(self, row: ManifestRow) -> None:
        self.states[OutcomeState.REJECTED.value] += 1
        self.rows_reported.add(row.row)
        error = _row_error(row)
        name = printable(row.label)
        text = "; ".join(problem_text(p) for p in row.problems)
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

    async def pending_row(self, row: ManifestRow) -> None:
        """A row the run did not finish: its line in the report says so."""
        self.pending += 1
        await self._record(
            {
                "row": row.row,
                "name": row.name,
                "state": PENDING,
                "task_id": None,
                "path": None,
                "size": None,
                "sha256": None,
                "billed_seconds": None,
                **err_fields(None),
            }
        )

    async def outcome(self, outcome: Outcome) -> None:
        row = self._row_of(outcome.job)
        if row is not None:
            self.rows_reported.add(row)
        state = outcome.state.value
        self.states[state] += 1
        self.skipped_paths.discard(str(outcome.path))
        task = outcome.task_id
        if outcome.billed_seconds and task in self._created and task not in self._resumed:
            self.billed += outcome.billed_seconds
            self.counts.billed = self.billed
        name = printable(outcome.job.display_name)
        where = f"row {row} ({name})" if row is not None else name
        error = outcome.error
        problems = _problems_of(outcome)
        if problems and error is not None:
            # The same words as on screen (a limit only where it applies).
            error = attrs.evolve(error, message="; ".join(problem_text(p) for p in problems))
        if outcome.state == OutcomeState.UNRESOLVED:
            error = _unresolved_error(outcome)
            self.unresolved.append((row, name, _candidates_of(outcome)))
        # Successes are counted, not listed: one line per video is noise in a 10,000-row batch.
        if not outcome.ok:
            if problems:
                text = "; ".join(problem_text(p) for p in problems)
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
        record = {
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
        if row is None:
            self._early.setdefault(outcome.job, []).append(record)
        else:
            await self._record(record)

    @property
    def unsuccessful(self) -> int:
        return sum(n for s, n in self.states.items() if s != OutcomeState.DONE.value)


def _row_error(row: ManifestRow) -> ErrorInfo:
    """A row rejected before anything was sent. One rule for every such row, whether its cells
    could not be read (a box of 3 numbers) or its files break the limits (a missing file):
    ``InputError``, the error of a job's input. ``ManifestError`` is the whole manifest's
    (unreadable, a required column missing), which stops the run before any row."""
    text = "; ".join(problem_text(p) for p in row.problems)
    return ErrorInfo(kind="InputError", message=f"row {row.row}: {text}")


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
        *([("pending", f"{sink.pending} (not finished)")] if sink.pending else []),
        ("billed", fmt_seconds(sink.billed) + " of video (this run)"),
        *(
            [
                (
                    "billed",
                    fmt_seconds(sink.billed_total) + " of video (total: every run of the journal)",
                )
            ]
            if sink.billed_total is not None
            else []
        ),
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
            where = f"row {row} ({name})" if row < 1 << 62 else name
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
