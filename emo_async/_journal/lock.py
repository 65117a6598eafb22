"""One process at a time: an exclusive ``flock`` on ``<journal>.lock``.

The kernel drops a flock when its process dies, so a killed batch never leaves a stale lock
behind. The lock file carries the holder's pid, a courtesy for the error message.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from .._exceptions import JournalError, JournalLockedError

__all__ = ["absolute", "acquire_lock", "lock_path"]


def absolute(path: str | os.PathLike[str]) -> Path:
    """``path`` made absolute without resolving symlinks (the lock sits next to the name given)."""
    return Path(os.path.abspath(os.fspath(path)))


def lock_path(path: Path) -> Path:
    """The lock file of the journal at ``path``."""
    return path.with_name(path.name + ".lock")


def acquire_lock(path: Path) -> int:
    """Take the journal's lock; return its descriptor (closing it releases the lock).

    Raises:
        JournalLockedError: Another open journal (in any process) holds it.
        JournalError: The lock file cannot be created, or is not a plain file of its own (a
            symlink, a directory, a device): nothing is ever written through such a name.
    """
    lock = lock_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: a symlink planted at the lock's name must not lead our write (and its
        # truncation) to a file elsewhere. os.open makes the descriptor non-inheritable, so a
        # child process never holds our lock; O_NONBLOCK keeps a planted FIFO from hanging us.
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise JournalError(
                f"journal lock {lock} is a symlink; refusing to follow it (remove it if it is"
                " not yours)"
            ) from None
        raise JournalError(f"cannot create journal lock {lock}: {exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise JournalError(f"journal lock {lock} is not a regular file; refusing to use it")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _read_pid(fd)
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise JournalError(f"cannot lock journal {path}: {exc}") from None
        if holder == os.getpid():
            who = "this process (another open_journal on it is still open)"
        elif holder is not None:
            who = f"another process (pid {holder})"
        else:
            who = "another process"
        raise JournalLockedError(
            f"journal {path} is in use by {who}; lock file {lock}. Two runs on one journal"
            " could submit the same job twice: wait for the other run to end, or stop it."
        ) from None
    except BaseException:
        os.close(fd)
        raise
    if info.st_nlink == 1:
        # A hard link shares its content with another name, maybe not ours: leave it as is.
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass  # The pid is a courtesy for the error message; the flock is what counts.
    return fd


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None
