"""``emo-async``: the command line (run, validate, detect, status, resolve, cancel, simulator,
demo).

An argparse front end over the public API of ``emo_async`` (and ``emo_async.simulator``); the
only caller of ``anyio.run``. It also owns the manifest reader (``emo_async._manifest``), as
the command line owns manifests. Exit codes: 0 all done, 1 some job failed or is unresolved
(or a row is bad), 2 bad usage or an unreadable manifest, 130 on Ctrl-C (the batch stops
cleanly; the same command resumes it from the journal), 141 when stdout's reader went away
(``| head``).

Modules: ``_parser`` (options), ``_output`` (exit codes, where text goes), ``_validate``
(manifests, ``validate``), ``_report`` (outcomes, report file, summary), ``_run``, ``_tasks``
(``detect``, ``status``, ``cancel``), ``_resolve``, ``_demo``, ``_progress`` (the live display).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import anyio

from emo_async import AuthenticationError, EmoError, JournalError
from emo_async._manifest import ManifestError

from ._demo import cmd_demo
from ._output import (
    EXIT_BROKEN_PIPE,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    UsageError,
    is_broken_pipe,
    silence_stdout,
)
from ._parser import build_parser
from ._resolve import cmd_resolve
from ._run import cmd_run, cmd_work
from ._tasks import cmd_cancel, cmd_detect, cmd_status
from ._validate import cmd_validate

__all__ = ["main"]

_COMMANDS: Final[dict[str, Callable[[argparse.Namespace], Awaitable[int]]]] = {
    "run": cmd_run,
    "work": cmd_work,
    "validate": cmd_validate,
    "detect": cmd_detect,
    "status": cmd_status,
    "resolve": cmd_resolve,
    "cancel": cmd_cancel,
    "demo": cmd_demo,
}


def _usage(exc: BaseException | str) -> int:
    # One line whatever the message holds (a path with a newline in it...).
    print("emo-async: " + " ".join(str(exc).splitlines()), file=sys.stderr)
    return EXIT_USAGE


def _main(argv: list[str]) -> int:
    if argv[:1] == ["simulator"]:
        from emo_async.simulator.__main__ import main as simulator_main

        return simulator_main(argv[1:])
    args = build_parser().parse_args(argv)
    command = _COMMANDS[args.command]
    try:
        return int(anyio.run(command, args, backend="asyncio"))
    except (UsageError, ManifestError, JournalError) as exc:
        return _usage(exc)
    except AuthenticationError as exc:
        # A wrong or unauthorised key is a configuration mistake, like a missing one: exit 2.
        return _usage(f"the API key was refused: {exc}")
    except EmoError as exc:
        print(f"emo-async: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("emo-async: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except BaseException as exc:
        # `emo-async validate --json | head`: the reader has all it wanted; end quietly.
        if not is_broken_pipe(exc):
            raise
        silence_stdout()
        return EXIT_BROKEN_PIPE
