"""``detect``, ``status`` and ``cancel``: one portrait, or the tasks of a journal."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any, Final

import anyio

from emo_async import (
    APIError,
    EmoError,
    ErrorInfo,
    InputError,
    Job,
    JobPhase,
    JournalLockedError,
    is_dsn,
    open_journal,
    open_shared_batch,
    read_summary,
    validate_job,
)

from ._output import (
    EXIT_FAILED,
    EXIT_OK,
    Output,
    UsageError,
    api_key,
    err_fields,
    journal_path,
    make_client,
    problem_text,
    setup_logging,
)
from ._progress import printable

__all__ = ["cmd_cancel", "cmd_detect", "cmd_status"]

#: An upload is scoped to the model that reads it.
_DETECT_MODEL: Final = "emo-detect-v1"
#: validate_job checks a whole job; this voice is checked for its form only (never fetched),
#: so only the portrait's problems can come out.
_NO_AUDIO: Final = "https://emo-async.invalid/voice.wav"


def _is_url(text: str) -> bool:
    return text.lower().startswith(("http://", "https://", "oss://"))


async def cmd_detect(args: argparse.Namespace) -> int:
    out = Output(args)
    key = api_key(args)
    setup_logging(args.verbose, [key])
    image: str = args.image
    local: Path | None = None
    if not _is_url(image):
        local = Path(image)
        try:
            await validate_job(Job(local, _NO_AUDIO, ratio=args.ratio))
        except InputError as exc:
            for problem in exc.problems:
                if problem.field != "audio":
                    out.error(problem_text(problem))
            return EXIT_FAILED
    async with make_client(args, key) as client:
        url = image if local is None else await client.upload(local, model=_DETECT_MODEL)
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


def _shared_batch(args: argparse.Namespace, key: str) -> Any:
    """The shared batch a ``postgresql://`` journal argument names (``async with`` it), for
    the account of the connection options."""
    if not args.batch:
        raise UsageError("a postgresql:// journal holds shared batches: name one with --batch")
    return open_shared_batch(args.journal, batch=args.batch, client=make_client(args, key))


async def cmd_status(args: argparse.Namespace) -> int:
    out = Output(args)
    if is_dsn(args.journal):
        key = api_key(args)
        setup_logging(args.verbose, [key])
        async with _shared_batch(args, key) as shared:
            summary = await shared.summary()
    else:
        summary = await read_summary(journal_path(Path(args.journal)))
    if out.json:
        out.emit_json(
            {
                "journal": str(summary.path),
                "total": summary.total,
                "by_phase": dict(summary.by_phase),
                "billed_seconds": summary.billed_seconds,
                "failures": [
                    {"name": name, **err_fields(error)} for name, error in summary.failures
                ],
                "at_risk": [
                    {"name": name, "url_deadline": deadline.isoformat()}
                    for name, deadline in summary.at_risk
                ],
                "unresolved": [
                    {
                        "name": job.name,
                        "key": job.key,
                        "intent_at": job.intent_at.isoformat() if job.intent_at else None,
                        "reason": job.reason,
                        "candidates": [_candidate_json(c) for c in job.candidates],
                    }
                    for job in summary.unresolved
                ],
            }
        )
    else:
        out.say(summary.render())
        if summary.unresolved:
            target = shlex.quote(str(args.journal))
            out.say(
                f"settle each with `emo-async resolve {target} JOB --task TASK_ID` (its task)"
                " or `--release TASK_ID` (a task that is none of theirs)"
            )
    # Reading the journal worked: 0, whatever it holds (`run` is the one that fails on jobs).
    return EXIT_OK


def _candidate_json(c: Any) -> dict[str, Any]:
    return {
        "task_id": c.task_id,
        "created_at": c.created_at.isoformat() if c.created_at else None,
        "status": c.status,
        "video_duration": c.video_duration,
        "path": c.path,
    }


async def cmd_cancel(args: argparse.Namespace) -> int:
    out = Output(args)
    key = api_key(args)
    setup_logging(args.verbose, [key])
    cancelled = not_cancellable = unknown = errors = 0
    journal_cm: Any
    if is_dsn(args.journal):
        journal_cm = _shared_batch(args, key)
    else:
        path = journal_path(Path(args.journal))
        if not await anyio.Path(path).is_file():
            raise UsageError(f"no journal at {path}")
        journal_cm = open_journal(path)
    try:
        async with journal_cm as journal, make_client(args, key) as client:
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
