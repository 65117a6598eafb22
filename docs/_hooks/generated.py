"""mkdocs hook: fill the pages' generated parts from the code itself, at build time.

* ``<!-- emo-async-help -->`` / ``<!-- emo-async-help COMMAND -->``: what ``emo-async
  [COMMAND] --help`` prints;
* ``<!-- emo-async-error-tree -->``: the error tree drawn in ``emo_async._exceptions``'s
  module docstring.

Generated, so the reference cannot drift from what the program prints and raises.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import re
from typing import Any

_HELP = re.compile(r"^<!-- emo-async-help(?: (?P<command>[\w-]+))? -->$", re.MULTILINE)
_TREE = re.compile(r"^<!-- emo-async-error-tree -->$", re.MULTILINE)
_WIDTH = "100"


def help_text(command: str | None) -> str:
    """What ``emo-async [COMMAND] --help`` prints, at a fixed width."""
    from emo_async._cli import main

    argv = [command, "--help"] if command else ["--help"]
    out = io.StringIO()
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = _WIDTH
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main(argv)
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved
    return out.getvalue().rstrip()


def error_tree() -> str:
    """The indented tree (from ``EmoError`` on) of the exceptions module's docstring."""
    from emo_async import _exceptions

    doc = inspect.cleandoc(_exceptions.__doc__ or "")
    lines = doc.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "EmoError")
    tree = []
    for line in lines[start:]:
        if not line.strip():
            break
        tree.append(line)
    indent = min(len(line) - len(line.lstrip()) for line in tree)
    return "\n".join(line[indent:] for line in tree)


def on_page_markdown(markdown: str, **_kwargs: Any) -> str:
    markdown = _HELP.sub(lambda m: f"```text\n{help_text(m['command'])}\n```", markdown)
    return _TREE.sub(lambda _m: f"```text\n{error_tree()}\n```", markdown)
