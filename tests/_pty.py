"""Run the command line in a real terminal (a pseudo-terminal), as a person would.

The child gets the pty as its controlling terminal, so Ctrl-C typed on the master reaches it the
way a keyboard's does (the terminal driver sends SIGINT to the foreground process group).
"""

from __future__ import annotations

import fcntl
import os
import re
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Sequence
from pathlib import Path

import anyio
import anyio.to_thread

_ANSI = re.compile(
    r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[=>()][0-9A-Za-z]?"
)


def plain(text: str) -> str:
    """The screen's text without escape sequences or carriage returns."""
    return _ANSI.sub("", text).replace("\r", "")


class Terminal:
    """``python -m emo_async ARGS`` on a 200-column pty; ``output`` is all it wrote."""

    def __init__(self, args: Sequence[str | Path], env: dict[str, str]) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))

        def own_terminal() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self._master = master
        self.process = subprocess.Popen(
            [sys.executable, "-m", "emo_async", *map(str, args)],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env={**env, "TERM": "xterm-256color", "COLUMNS": "200"},
            start_new_session=True,
            preexec_fn=own_terminal,
        )
        os.close(slave)
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._master, 65536)
            except OSError:  # EIO: the child side closed
                return
            if not data:
                return
            self._chunks.append(data)

    @property
    def output(self) -> str:
        return plain(b"".join(self._chunks).decode("utf-8", errors="replace"))

    def ctrl_c(self) -> None:
        os.write(self._master, b"\x03")

    async def wait(self, timeout: float = 100) -> int:
        with anyio.fail_after(timeout):
            code = await anyio.to_thread.run_sync(self.process.wait)
        await anyio.to_thread.run_sync(self._reader.join, 10)
        os.close(self._master)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
