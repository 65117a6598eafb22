"""Reading a manifest without blocking the loop, and ``validate`` (also ``run --dry-run``)."""

from __future__ import annotations

import argparse
import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.to_thread
import attrs

from emo_async import Estimate, InputError, Problem, validate_job
from emo_async._manifest import COLUMNS, Manifest, ManifestRow, open_manifest
from emo_async._names import NamePlan

from ._output import EXIT_FAILED, EXIT_OK, JOURNAL_NAME, Output, fmt_seconds, problem_text
from ._progress import printable

__all__ = [
    "cmd_validate",
    "load_manifest",
    "printable_label",
    "rows_of",
    "unknown_columns_warning",
]

_ROW_CHUNK: Final = 256
_VALIDATE_CONCURRENCY: Final = 16
#: Unknown columns named in the warning; the rest are counted.
_SHOWN_COLUMNS: Final = 5
_COLUMN_NAME_LIMIT: Final = 40


async def rows_of(manifest: Manifest) -> AsyncIterator[ManifestRow]:
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


def unknown_columns_warning(names: tuple[str, ...]) -> str:
    """One short line, however many (or however long) the unknown names are."""
    shown = ", ".join(repr(printable(c, _COLUMN_NAME_LIMIT)) for c in names[:_SHOWN_COLUMNS])
    more = len(names) - _SHOWN_COLUMNS
    if more > 0:
        shown += f" and {more} more"
    return f"ignoring unknown column(s): {shown} (known: {', '.join(COLUMNS)})"


async def load_manifest(path: Path, out: Output) -> tuple[Manifest, int]:
    """Open and count a manifest (a streaming pass; nothing is kept)."""
    manifest = await anyio.to_thread.run_sync(open_manifest, path)
    if manifest.unknown_columns:
        out.error(unknown_columns_warning(manifest.unknown_columns))
    total = await anyio.to_thread.run_sync(manifest.count)
    return manifest, total


@attrs.define
class _Tally:
    jobs: int = 0
    valid: int = 0
    bad_rows: int = 0
    billed: dict[str, float] = attrs.field(factory=lambda: {"1:1": 0.0, "3:4": 0.0})
    by_ratio: dict[str, int] = attrs.field(factory=lambda: {"1:1": 0, "3:4": 0})
    unknown_duration: int = 0

    def estimate(self) -> Estimate:
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
            f" {fmt_seconds(est.billed_seconds_by_ratio.get(ratio, 0.0))}"
        )
    text = (
        f"estimate: {est.valid} valid of {est.jobs} job{'s' if est.jobs != 1 else ''},"
        f" {fmt_seconds(est.billed_seconds)} of video billed ({'; '.join(parts)})"
    )
    if est.unknown_duration:
        text += f"; {est.unknown_duration} with URL audio not counted (duration unknown)"
    return text


async def _validate_rows(
    manifest: Manifest,
    out: Output,
    on_problem: Callable[[int, str, Problem], None],
    naming: NamePlan | None = None,
    on_note: Callable[[int, str, str], None] | None = None,
) -> _Tally:
    """Validate every row locally, a chunk at a time; problems come out in row order."""
    tally = _Tally()
    chunk: list[ManifestRow] = []
    naming = naming or NamePlan(None)

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
            # Every row ``run`` reads books its name, even one it then refuses.
            naming.book(row.job, row.row)
            result = results[i]
            if isinstance(result, InputError):
                tally.bad_rows += 1
                for problem in result.problems:
                    on_problem(row.row, label, problem)
                continue
            refused, note = naming.check(result, row.row)
            if note is not None and on_note is not None:
                on_note(row.row, label, note)
            if refused is not None:
                tally.bad_rows += 1
                on_problem(row.row, label, refused)
                continue
            tally.valid += 1
            tally.by_ratio[result.ratio] = tally.by_ratio.get(result.ratio, 0) + 1
            seconds = result.billed_seconds_estimate
            if seconds is None:
                tally.unknown_duration += 1
            else:
                tally.billed[result.ratio] = tally.billed.get(result.ratio, 0.0) + seconds
        chunk.clear()

    async for row in rows_of(manifest):
        chunk.append(row)
        if len(chunk) >= _VALIDATE_CONCURRENCY:
            await flush()
    await flush()
    return tally


def printable_label(row: ManifestRow) -> str:
    return printable(row.label)


async def cmd_validate(args: argparse.Namespace, *, dry_run: bool = False) -> int:
    out = Output(args)
    manifest, total = await load_manifest(args.manifest, out)
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
                    "limit": problem.limit if problem_text(problem) == str(problem) else None,
                }
            )
        if not out.quiet or out.json:
            out.say(f"row {row} ({label}): {problem_text(problem)}")

    def on_note(row: int, label: str, note: str) -> None:
        if out.json:
            out.emit_json({"type": "note", "row": row, "name": label, "message": note})
        if not out.quiet or out.json:
            out.say(f"row {row} ({label}): {note}")

    out_dir: Path | None = getattr(args, "out", None)
    journal: Path | None = None
    if out_dir is not None and not getattr(args, "no_journal", False):
        journal = getattr(args, "journal", None) or out_dir / JOURNAL_NAME
    naming = NamePlan(out_dir)
    if journal is not None:
        await anyio.to_thread.run_sync(naming.load_journal, journal)
    tally = await _validate_rows(manifest, out, on_problem, naming, on_note)
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
