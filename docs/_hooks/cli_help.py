"""mkdocs hook: fill ``<!-- emo-async-help COMMAND -->`` markers with that command's ``--help``.

The command line reference is generated from the parser itself at build time, so it cannot
drift from what ``emo-async`` prints.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from typing import Any

_MARKER = re.compile(r"^<!-- emo-async-help(?: (?P<command>[\w-]+))? -->$", re.MULTILINE)
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


def on_page_markdown(markdown: str, **_kwargs: Any) -> str:
    def block(match: re.Match[str]) -> str:
        return "```text\n" + help_text(match.group("command")) + "\n```"

    return _MARKER.sub(block, markdown)
