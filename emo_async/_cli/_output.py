"""Exit codes, usage errors, where text goes, logging, and a closed stdout."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, TextIO

from emo_async import Client, ErrorInfo, Problem

from ._progress import ProgressMode

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "JOURNAL_NAME",
    "Output",
    "UsageError",
    "api_key",
    "err_fields",
    "fmt_seconds",
    "is_broken_pipe",
    "journal_path",
    "make_client",
    "only_error",
    "problem_text",
    "progress_mode",
    "setup_logging",
    "silence_stdout",
]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130
#: 128 + SIGPIPE, what a shell reports for a writer whose reader went away (``| head``).
EXIT_BROKEN_PIPE: Final = 141

JOURNAL_NAME: Final = ".emo-journal.sqlite3"


class UsageError(Exception):
    """Bad usage of the command line (exit 2)."""


class Output:
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


def progress_mode(out: Output, verbose: int) -> ProgressMode:
    if out.quiet:
        return "off"
    if out.json or verbose:
        return "plain"
    return "live" if sys.stdout.isatty() else "plain"


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


def setup_logging(verbose: int, secrets: Sequence[str] = ()) -> None:
    if not verbose:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RedactingFormatter(secrets))
    root = logging.getLogger("emo_async")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    root.propagate = False


# --------------------------------------------------------------------------------------------
# Shared helpers of the commands.


def api_key(args: argparse.Namespace) -> str:
    name = args.api_key_env
    key = os.environ.get(name)
    if not key:
        raise UsageError(
            f"no API key: set the environment variable {name}"
            + (" (or name another one with --api-key-env)" if name == "DASHSCOPE_API_KEY" else "")
        )
    return key


def make_client(args: argparse.Namespace, key: str, **kwargs: Any) -> Client:
    try:
        return Client(
            key, base_url=args.base_url, workspace=getattr(args, "workspace", None), **kwargs
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def journal_path(path: Path) -> Path:
    return path / JOURNAL_NAME if path.is_dir() else path


def err_fields(error: ErrorInfo | None) -> dict[str, Any]:
    return {
        "error_kind": error.kind if error else None,
        "error_code": error.code if error else None,
        "error_message": error.message if error else None,
        "request_id": error.request_id if error else None,
    }


def problem_text(problem: Problem) -> str:
    """A problem in words, its limit shown only where it applies: a file that does not exist
    breaks no format limit, so "(limit: jpg, jpeg, ...)" after it would only mislead."""
    if problem.limit and problem.message.endswith(" does not exist"):
        return f"{problem.field}: {problem.message}"
    return str(problem)


def fmt_seconds(seconds: float) -> str:
    return f"{seconds:,.1f} s"


# --------------------------------------------------------------------------------------------
# Errors out of task groups, and a stdout whose reader went away.


def _leaves(exc: BaseException) -> list[BaseException]:
    """The errors inside ``exc`` (itself, or a group's members, nested), cancellations left out."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    # asyncio's class, not anyio.get_cancelled_exc_class(): this also runs after the loop ended,
    # and the command line always runs on asyncio.
    return [] if isinstance(exc, asyncio.CancelledError) else [exc]


def only_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one real error inside a task group's exception group, if there is exactly one."""
    leaves = _leaves(group)
    return leaves[0] if len(leaves) == 1 else None


def is_broken_pipe(exc: BaseException) -> bool:
    """Whether ``exc`` is (or a group holds only) writes to a pipe nobody reads any more."""
    leaves = _leaves(exc)
    return bool(leaves) and all(isinstance(e, BrokenPipeError) for e in leaves)


def silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush cannot fail again."""
    # Without this, Python prints "Exception ignored ... BrokenPipeError" at exit.
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
