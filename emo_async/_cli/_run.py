"""``run``: a manifest's batch with its progress display, report and summary."""

from __future__ import annotations

import argparse
import shlex
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import attrs

from emo_async import (
    DEFAULT_LIMITS,
    DEFAULT_POLL_POLICY,
    Client,
    EmoError,
    Job,
    is_dsn,
    read_summary,
    redact_dsn,
)

from ._output import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    JOURNAL_NAME,
    Output,
    UsageError,
    api_key,
    make_client,
    only_error,
    progress_mode,
    setup_logging,
)
from ._preflight import preflight
from ._progress import Counts, Progress
from ._report import Report, Sink, advice, summary
from ._validate import cmd_validate, load_manifest, rows_of

__all__ = ["cmd_run", "cmd_work", "execute", "make_out_dir"]


def _password(dsn: str | None) -> list[str]:
    """The DSN's password, for the log filter that hides secrets."""
    if dsn is None:
        return []
    from urllib.parse import urlsplit

    try:
        secret = urlsplit(dsn).password
    except ValueError:
        return []
    return [secret] if secret else []


async def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (however spelled: ``./m.csv``, a link...)."""
    try:
        return await anyio.Path(a).samefile(b)
    except OSError:  # either is missing: a file that does not exist is no other file
        return await anyio.Path(a).resolve() == await anyio.Path(b).resolve()


async def _check_report(args: argparse.Namespace) -> None:
    """Refuse a report that would overwrite the manifest or the journal, before anything is
    opened for writing (the report file is truncated when it opens)."""
    if args.report is None:
        return
    manifest = getattr(args, "manifest", None)
    if manifest is not None and await _same_file(args.report, manifest):
        raise UsageError(f"--report {args.report} is the manifest itself; name another file")
    if (
        args.journal is not None
        and not is_dsn(args.journal)
        and await _same_file(args.report, Path(args.journal))
    ):
        raise UsageError(f"--report {args.report} is the journal itself; name another file")


async def make_out_dir(option: str, folder: Path) -> None:
    """Create the output folder, or say in one line why it cannot be one."""
    try:
        await anyio.Path(folder).mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UsageError(f"{option} {folder}: a file of that name exists; name a folder") from None
    except OSError as exc:
        raise UsageError(f"{option} {folder}: {exc.strerror or exc}") from None


async def _watch_signals(scope: anyio.CancelScope, flag: list[bool]) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            if not flag[0]:
                flag[0] = True
                scope.cancel()


async def execute(
    client: Client,
    jobs: AsyncIterator[Job] | list[Job],
    out_dir: Path,
    *,
    sink: Sink,
    progress: Progress,
    batch_kwargs: dict[str, Any],
) -> bool:
    """Run a batch with the progress display; True if it was interrupted."""
    interrupted = [False]
    try:
        async with anyio.create_task_group() as outer:
            outer.start_soon(_watch_signals, outer.cancel_scope, interrupted)
            run = client.run_batch(jobs, out_dir, on_event=sink.event, **batch_kwargs)
            try:
                async with run as outcomes:
                    progress.attach(run.stats)
                    async with anyio.create_task_group() as tg:
                        await tg.start(progress.run)
                        async for outcome in outcomes:
                            await sink.outcome(outcome)
                            if sink.auth_error is not None:
                                # Every other job would be refused too: stop; the rows not
                                # finished are reported pending, for a run with the right key.
                                break
                        tg.cancel_scope.cancel()
            finally:
                progress.close()
            outer.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # A journal that is locked, a manifest that vanished...: the error, not a group of one.
        single = only_error(group)
        if single is None:
            raise
        raise single from None
    return interrupted[0]


def _settle_target(args: argparse.Namespace, journal: Path | None) -> str | None:
    """What to name to ``emo-async status``/``resolve``: the output folder when the journal
    is its default one, else the journal (shell-quoted: the line is meant to be pasted)."""
    if journal is None:
        return None
    return shlex.quote(str(args.out if args.journal is None else journal))


def _shared_journal(args: argparse.Namespace) -> str | None:
    """The DSN of a shared batch (checked with its --batch), or None for a journal file."""
    dsn = args.journal if args.journal is not None and is_dsn(args.journal) else None
    if dsn is not None and not args.batch:
        raise UsageError("--journal postgresql://... is a shared batch: name it with --batch")
    if dsn is None and getattr(args, "batch", None):
        raise UsageError("--batch names a shared batch: give --journal postgresql://...")
    return dsn


async def cmd_work(args: argparse.Namespace) -> int:
    """``work``: join a shared batch (``run`` without a manifest)."""
    if not is_dsn(args.journal):
        raise UsageError("work --journal takes a postgresql:// DSN (a batch shared by workers)")
    args.manifest = None
    args.dry_run = args.no_journal = args.rebill_expired = False
    return await cmd_run(args)


async def cmd_run(args: argparse.Namespace) -> int:
    await _check_report(args)
    if args.dry_run:
        return await cmd_validate(args, dry_run=True)
    dsn = _shared_journal(args)
    out = Output(args)
    key = api_key(args)
    setup_logging(args.verbose, [key, *_password(dsn)])
    if args.manifest is not None:
        manifest, total = await load_manifest(args.manifest, out)
    else:
        manifest, total = None, None
    limits = attrs.evolve(
        DEFAULT_LIMITS,
        task_qps=args.task_qps,
        # The client's own limits must not cap what the user asked of the batch.
        submit_qps=args.submit_rate or DEFAULT_LIMITS.submit_qps,
        max_downloads=max(DEFAULT_LIMITS.max_downloads, args.download_concurrency or 0),
    )
    poll = attrs.evolve(DEFAULT_POLL_POLICY, target_delay=args.poll_delay)
    # Workers of a shared batch share the account too: one query budget, one poller.
    shared = {"shared_account": dsn} if dsn is not None else {}
    client = make_client(args, key, limits=limits, poll=poll, **shared)
    await make_out_dir("--out", args.out)
    # Local mistakes first, then the network: a wrong key or no network is one line, not a
    # batch of failed jobs.
    await preflight(args, key)
    journal: str | bool
    if args.no_journal:
        journal = False
    else:
        journal = args.journal if args.journal is not None else True
    journal_path = (
        None
        if journal is False or dsn is not None
        else (Path(args.journal) if args.journal is not None else args.out / JOURNAL_NAME)
    )
    report = Report(args.report) if args.report is not None else None
    counts = Counts(total)
    progress = Progress(
        progress_mode(out, args.verbose),
        counts,
        stream=out.human,
    )
    sink = Sink(out, progress, counts, report)

    async def jobs() -> AsyncIterator[Job]:
        if manifest is None:
            return
        async for row in rows_of(manifest):
            if row.job is None:
                await sink.bad_row(row)
                continue
            await sink.remember(row)
            yield row.job

    if not out.quiet and manifest is not None:
        out.say(f"{args.manifest}: {total} row{'s' if total != 1 else ''} → {args.out}")
    if not out.quiet and dsn is not None:
        out.say(f"shared batch {args.batch} at {redact_dsn(dsn)} → {args.out}")
    started = anyio.current_time()
    try:
        if report is not None:
            await report.open()
        async with client:
            interrupted = await execute(
                client,
                jobs(),
                args.out,
                sink=sink,
                progress=progress,
                batch_kwargs={
                    "journal": journal,
                    "max_tasks": args.max_tasks,
                    "submit_rate": args.submit_rate,
                    "submit_concurrency": args.submit_concurrency,
                    "rebill_expired": args.rebill_expired,
                    "download_concurrency": args.download_concurrency,
                    "reconcile": args.reconcile,
                    **({"batch": args.batch, "lease": args.lease} if dsn is not None else {}),
                },
            )
        # Every row of the manifest has its line: those without an outcome are pending (in a
        # shared batch, pending here: another worker may have made them).
        if manifest is not None and dsn is None:
            async for row in rows_of(manifest):
                if not await sink.accounted(row):
                    await sink.pending_row(row)
        await sink.flush()
    finally:
        if report is not None:
            await report.aclose()
    if journal_path is not None:
        try:
            sink.billed_total = (await read_summary(journal_path)).billed_seconds
        except EmoError:
            sink.billed_total = None  # the summary says what this run billed all the same
    elapsed = anyio.current_time() - started
    extra = [("output", str(args.out))]
    if journal_path is not None:
        extra.append(("journal", str(journal_path)))
    if dsn is not None:
        extra.append(("journal", f"{redact_dsn(dsn)} batch {args.batch}"))
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
        summary(sink, out, elapsed, extra)
    if interrupted:
        hint = (
            "run the same command again to resume"
            if journal_path is not None
            else "no journal was kept: a new run starts over"
        )
        out.say(f"interrupted: {hint}")
    if not (out.json and out.quiet):
        for line in advice(sink, _settle_target(args, journal_path)):
            out.say(line)
    if out.json:
        out.emit_json(
            {
                "type": "summary",
                "total": total,
                **sink.states,
                "skipped": sink.skipped,
                "pending": sink.pending,
                "billed_seconds": round(sink.billed, 3),
                "billed_seconds_total": None
                if sink.billed_total is None
                else round(sink.billed_total, 3),
                "elapsed": round(elapsed, 3),
                "interrupted": interrupted,
                "exit_code": code,
                "out": str(args.out),
                "journal": str(journal_path)
                if journal_path
                else (redact_dsn(dsn) if dsn is not None else None),
            }
        )
    return code
