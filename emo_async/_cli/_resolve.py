"""``resolve``: settle an unresolved job by hand (its task is this one, or this task is nobody's).

An unresolved job may have been billed, so nothing here sends a submit: assigning a task only
writes the journal (the next ``run`` follows the task and downloads its video), and releasing
one only drops it from the candidate lists.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Final

import anyio

from emo_async import (
    EmoError,
    JobPhase,
    Journal,
    JournalLockedError,
    TaskStatus,
    open_journal,
)

from ._output import EXIT_OK, Output, UsageError, journal_path, make_client, setup_logging
from ._progress import printable

__all__ = ["cmd_resolve"]

#: Shorter key prefixes would match by accident in a large journal.
_MIN_KEY_PREFIX: Final = 8
#: The phases a task can be assigned in (Journal.assign refuses the others).
_ASSIGNABLE: Final = (JobPhase.UNRESOLVED, JobPhase.INTENT)


async def _find_job(journal: Journal, ident: str, where: Path) -> Any:
    """The one job named ``ident`` (its key, a key prefix, or its display name)."""
    folded = ident.lower()
    matches = []
    async for rec in journal.records():
        if rec.key == folded or rec.name == ident:
            matches.append(rec)
        elif len(folded) >= _MIN_KEY_PREFIX and rec.key.startswith(folded):
            matches.append(rec)
    if len(matches) > 1:
        # Two jobs of one name (other inputs): the one that can be settled is the one meant.
        open_ones = [r for r in matches if r.phase in _ASSIGNABLE]
        if len(open_ones) == 1:
            return open_ones[0]
        raise UsageError(
            f"{len(matches)} jobs of {where} match {printable(ident)!r}: name one by its key"
            " (emo-async status --json lists the keys of unresolved jobs)"
        )
    if not matches:
        raise UsageError(f"no job named {printable(ident)!r} in {where}")
    return matches[0]


def _shown(path: str, base: Path) -> str:
    try:
        return os.fspath(Path(path).relative_to(base))
    except ValueError:
        return path


async def _check_task_exists(args: argparse.Namespace, task_id: str) -> str:
    """Ask the API about a task no job lists as a candidate; its status, or a usage error."""
    key = os.environ.get(args.api_key_env)
    if not key:
        raise UsageError(
            f"task {task_id} is no job's candidate: set {args.api_key_env} so it can be"
            " checked with the API (emo-async status lists the candidates)"
        )
    setup_logging(args.verbose, [key])
    try:
        async with make_client(args, key) as client:
            task = await client.get_task(task_id)
    except ValueError as exc:  # not a task id at all
        raise UsageError(f"--task {printable(task_id)}: {exc}") from None
    except EmoError as exc:
        raise UsageError(f"task {task_id} could not be checked with the API: {exc}") from None
    # DashScope answers UNKNOWN for an id it never issued (or one past its retention).
    if task.status == TaskStatus.UNKNOWN:
        raise UsageError(f"task {task_id} is unknown to the API (a typo, or older than 24 h?)")
    return str(task.status)


async def _assign(out: Output, journal: Journal, args: argparse.Namespace, path: Path) -> int:
    if args.job is None:
        raise UsageError("name the job whose task it is: emo-async resolve OUT JOB --task TASK_ID")
    task_id: str = args.task
    rec = await _find_job(journal, args.job, path)
    name = printable(rec.name)
    if rec.task_id == task_id and rec.phase not in _ASSIGNABLE:
        out.say(f"{name}: task {task_id} is already its task ({rec.phase}); nothing to do")
        return EXIT_OK
    known = {c.task_id for c in await journal.candidates()}
    status = None
    if task_id not in known and task_id not in await journal.known_task_ids():
        status = await _check_task_exists(args, task_id)
    # Refusals (another job's task, a job in another phase) come back as JournalError: exit 2.
    candidate = await journal.assign(task_id, rec.key)
    kept = candidate.path if candidate is not None else None
    line = (
        f"{name}: task {task_id} assigned (was {rec.phase}); the next `emo-async run` follows it"
        " and saves its video"
    )
    if kept:
        line += f"; the copy kept earlier stays at {_shown(kept, path.parent)}"
    if out.json:
        out.emit_json(
            {
                "action": "assigned",
                "name": rec.name,
                "key": rec.key,
                "task_id": task_id,
                "was": str(rec.phase),
                "task_status": status
                if status is not None
                else (candidate.status if candidate is not None else None),
                "kept": kept,
            }
        )
    else:
        out.say(line)
    return EXIT_OK


async def _release(out: Output, journal: Journal, args: argparse.Namespace, path: Path) -> int:
    task_id: str = args.release
    found = [c for c in await journal.candidates() if c.task_id == task_id]
    if not found:
        raise UsageError(f"task {task_id} is no job's candidate in {path}")
    if args.job is not None:
        rec = await _find_job(journal, args.job, path)
        if task_id not in {c.task_id for c in await journal.candidates(rec.key)}:
            raise UsageError(f"task {task_id} is not a candidate of {printable(rec.name)}")
    keys = await journal.release(task_id)
    names = []
    for key in keys:
        job = await journal.get(key)
        names.append(printable(job.name) if job is not None else key[:12])
    kept = found[0].path
    line = (
        f"task {task_id} released: no longer a candidate of {', '.join(names)}"
        " (still unresolved unless another task is assigned)"
    )
    if kept:
        line += f"; its kept video stays at {_shown(kept, path.parent)}"
    if out.json:
        out.emit_json({"action": "released", "task_id": task_id, "keys": keys, "kept": kept})
    else:
        out.say(line)
    return EXIT_OK


async def cmd_resolve(args: argparse.Namespace) -> int:
    out = Output(args)
    path = journal_path(args.journal)
    if not await anyio.Path(path).is_file():
        raise UsageError(f"no journal at {path}")
    try:
        async with open_journal(path) as journal:
            if args.release is not None:
                return await _release(out, journal, args, path)
            return await _assign(out, journal, args, path)
    except JournalLockedError as exc:
        raise UsageError(f"{exc}; stop the batch (Ctrl-C) first") from None
