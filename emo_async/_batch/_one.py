"""One job, start to finish, from the batch's own collaborators (:meth:`Client.generate`)."""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread

from .._exceptions import DetectionRejectedError, EmoError, InputError, Problem
from .._models import Job, Outcome, OutcomeState, Task, TaskStatus
from ._finisher import Finisher
from ._job import InFlight, Reporter
from ._policy import BatchPolicy
from ._run import make_reconciler
from ._slots import Slots
from ._stager import Stager
from ._submitter import Submitter

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .._client import Client

__all__ = ["run_one"]

logger = logging.getLogger("emo_async.batch")

#: Destinations of the generate() calls running on each client: a second call with the same
#: destination would pay for a video that overwrites the first one's.
_IN_USE: weakref.WeakKeyDictionary[Client, set[str]] = weakref.WeakKeyDictionary()


@contextmanager
def _hold_dest(client: Client, dest: Path, job_name: str) -> Iterator[None]:
    ident = os.path.normcase(os.path.realpath(dest))
    held = _IN_USE.setdefault(client, set())
    if ident in held:
        raise InputError(
            [
                Problem(
                    "dest",
                    f"{dest} is already the destination of another generate() call on this"
                    " client; nothing was sent",
                )
            ],
            job_name=job_name,
        )
    held.add(ident)
    try:
        yield
    finally:
        held.discard(ident)


def _dest_problem(dest: Path) -> str | None:
    """Why a video could not be saved at ``dest``, found out before anything is paid for.

    An existing regular file is fine: the caller named this very path. A folder, a link to one
    or a device is not, and neither is a folder that cannot be created or written to (else the
    task would be billed and its video lost at the final rename).
    """
    try:
        st = os.stat(dest)
    except FileNotFoundError:
        pass
    except NotADirectoryError:
        return f"{dest.parent} is not a folder"
    except OSError as exc:
        return f"{dest} cannot be used: {exc.strerror or exc}"
    else:
        if stat.S_ISDIR(st.st_mode):
            return f"{dest} is a folder"
        if not stat.S_ISREG(st.st_mode):
            return f"{dest} is not a regular file"
    parent = dest.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".{dest.name}.{secrets.token_hex(4)}.probe"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTDIR) and not parent.is_dir():
            return f"{parent} is not a folder"
        return f"cannot write in {parent}: {exc.strerror or exc}"
    return None


async def run_one(client: Client, job: Job, dest: Path) -> Outcome:
    """Validate, upload, detect, submit, wait and download one video to ``dest``.

    Raises InputError or DetectionRejectedError before anything is billed (InputError also
    when ``dest`` cannot take the video, or another call on this client is saving to it). If
    cancelled after
    its task was created, the task is cancelled on the server while it is still PENDING (that
    is free); otherwise the client keeps its id, so calling again with the same job follows the
    same task instead of paying twice, and the id is logged and noted on the exception.
    """
    with _hold_dest(client, dest, job.display_name):
        problem = await anyio.to_thread.run_sync(_dest_problem, dest)
        if problem is not None:
            raise InputError(
                [Problem("dest", problem + "; nothing was sent")], job_name=job.display_name
            )
        return await _run_one(client, job, dest)


async def _run_one(client: Client, job: Job, dest: Path) -> Outcome:
    send, recv = anyio.create_memory_object_stream[Outcome](4)
    report = Reporter(send, None, None)
    policy = BatchPolicy(max_tasks=1)
    stager = Stager(client, None, report)
    finisher = Finisher(client, None, report, dest.parent)
    reconciler = make_reconciler(client, policy)
    slots = Slots(1)
    item = InFlight(job, dest=dest)
    async with send, recv:
        # Before any money: refusals come out as they are (InputError, DetectionRejectedError).
        contents = await stager.validate(item)
        try:
            await stager.stage(item, contents)
        except (InputError, DetectionRejectedError):
            raise
        except EmoError as exc:
            await report.emit(item, OutcomeState.FAILED, exc=exc)
            return recv.receive_nowait()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(reconciler.run)

                def keep(tasks: Sequence[Task]) -> None:
                    for task in tasks:
                        tg.start_soon(finisher.keep, task)

                submitter = Submitter(client, None, report, reconciler, policy, slots, keep)
                await slots.acquire_on_behalf_of(item)
                submitter.reserve()
                if await submitter.submit(item):
                    await finisher.track(item, lambda: slots.release_on_behalf_of(item))
                tg.cancel_scope.cancel()
        except BaseException as exc:
            if item.task_id is not None and isinstance(
                exc, (anyio.get_cancelled_exc_class(), KeyboardInterrupt)
            ):
                await _abandon(client, item, exc)
            raise
        return recv.receive_nowait()


async def _abandon(client: Client, item: InFlight, exc: BaseException) -> None:
    """The caller gave up after the task was created: cancel it if that is still free."""
    task_id = item.task_id
    assert task_id is not None
    state = "keeps running (it may be billed)"
    with anyio.CancelScope(shield=True), anyio.move_on_after(10):
        try:
            # DashScope cancels only a PENDING task; anything else is refused, harmlessly.
            task = await client.cancel_task(task_id)
        except EmoError as err:
            logger.info("task %s was not cancelled: %s", task_id, err)
        else:
            if task.status == TaskStatus.CANCELED:
                client.owned.unbind(item.key)
                state = "was cancelled on the server (it was still PENDING: not billed)"
    note = (
        f"emo_async: task {task_id} of {item.name!r} was created before the cancellation and"
        f" {state}; calling generate() again with the same inputs on this client follows it"
    )
    logger.warning(note)
    exc.add_note(note)
