"""The partial files next to a destination: their names, the sidecar, the lock that marks
one in use, and how OS errors are described."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import stat
import sys
import time
from pathlib import Path
from typing import Any

from .._exceptions import DownloadError

# Without flock (Windows) a live download is known only to its own Downloader.
_fcntl: Any = None
if sys.platform != "win32":
    import fcntl

    _fcntl = fcntl

__all__ = ["PartInUseError", "part_paths"]

SIDECAR_VERSION = 1
#: Recorded in every sidecar: cleanup only ever removes partial files a sidecar of ours claims.
OWNER = "emo_async"
_SIDECAR_LIMIT = 64 * 1024
_LOCK_PATIENCE = 1.0
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class PartInUseError(DownloadError):
    """Another download (in this process or another) is writing the same ``.part``."""


def part_paths(dest: Path) -> tuple[Path, Path]:
    """The ``.part`` file and its ``.part.json`` sidecar for a final path."""
    return dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".part.json")


def _describe_os_error(exc: OSError) -> str:
    code = exc.errno
    if code is not None and code in {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}:
        return "disk full"
    if code in {errno.EACCES, errno.EPERM}:
        return "permission denied"
    if code == errno.EROFS:
        return "permission denied (read-only file system)"
    if code == errno.EFBIG:
        return "disk full (file too large)"
    return exc.strerror or type(exc).__name__


def _os_download_error(action: str, path: Path, exc: OSError) -> DownloadError:
    return DownloadError(f"{_describe_os_error(exc)} while {action} {path}: {exc}")


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_sidecar(path: Path) -> dict[str, Any] | None:
    """The sidecar at ``path`` if it is a regular file in our format, else ``None``.

    A sidecar is ours when it is a JSON object of our version with both URL hashes; newer ones
    also name their owner and their ``.part``. A symlink is never followed.
    """
    raw = _read_small(path)
    return None if raw is None else _parse_sidecar(raw, path.name[:-5])


def _read_small(path: Path) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > _SIDECAR_LIMIT:
            return None
        return os.read(fd, _SIDECAR_LIMIT)
    except OSError:
        return None
    finally:
        os.close(fd)


def _parse_sidecar(raw: bytes, part_name: str) -> dict[str, Any] | None:
    try:
        meta = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(meta, dict) or meta.get("version") != SIDECAR_VERSION:
        return None
    if not all(isinstance(meta.get(k), str) for k in ("url_sha256", "resource_sha256")):
        return None
    if meta.get("owner", OWNER) != OWNER or meta.get("part", part_name) != part_name:
        return None
    return meta


#: ``<name>.part.json.<8 hex>.tmp``: a sidecar being written by :func:`write_sidecar`, left
#: behind when its process was killed before the rename.
_SIDECAR_TMP = re.compile(r"(?P<meta>.+\.part\.json)\.[0-9a-f]{8}\.tmp")


def sidecar_tmp_meta(name: str) -> str | None:
    """The sidecar name a temporary file called ``name`` was being written for, if any."""
    found = _SIDECAR_TMP.fullmatch(name)
    return found["meta"] if found else None


def remove_stale_sidecar_tmps(meta: Path) -> list[Path]:
    """Delete the temporary files a killed :func:`write_sidecar` left for ``meta``.

    Call it only while holding the lock of ``meta``'s ``.part`` (or when that ``.part`` does
    not exist): sidecars are written only under that lock, so none of these is being written.
    A file is removed only if it is a regular file that is empty (killed before its single
    write) or holds our sidecar for that ``.part``; anything else is not provably ours.
    """
    try:
        names = [e.name for e in os.scandir(meta.parent) if sidecar_tmp_meta(e.name) == meta.name]
    except OSError:
        return []
    removed: list[Path] = []
    for name in names:
        path = meta.with_name(name)
        raw = _read_small(path)
        if raw is None or (raw and _parse_sidecar(raw, meta.name[:-5]) is None):
            continue
        try:
            os.unlink(path)
        except OSError:
            continue
        removed.append(path)
    return removed


def write_sidecar(path: Path, meta: dict[str, Any]) -> None:
    """Write ``meta`` to ``path`` atomically, never through a symlink or over a non-file."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EEXIST, "not a regular file; left alone", str(path))
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(meta, f)
        # rename() replaces the name itself: a symlink planted meanwhile is replaced, its
        # target never written.
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def open_part(path: Path) -> int:
    """Open (creating, never truncating) the ``.part`` at ``path`` and lock it for this download.

    The lock (``flock``, held until the descriptor is closed) tells :func:`cleanup_orphans`, in
    this process or another, that the file is in use. Raises :class:`PartInUseError` if another
    download holds it.
    """
    for _ in range(5):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o666)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EEXIST, "not a regular file; left alone", str(path))
            if not _lock_waiting(fd, _LOCK_PATIENCE):
                raise PartInUseError(f"{path} is in use by another download")
            if _is_current(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        # A cleanup removed the file between our open and our lock: open the new one.
        os.close(fd)
    raise OSError(errno.EAGAIN, "the partial file keeps being replaced", str(path))


def try_lock(fd: int) -> bool:
    """Take the download lock on ``fd`` without waiting; ``True`` if taken (or no locking)."""
    if _fcntl is None:
        return True
    try:
        _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _lock_waiting(fd: int, patience: float) -> bool:
    # A cleanup holds the lock only for the moment it takes to unlink an orphan.
    give_up = time.monotonic() + patience
    while not try_lock(fd):
        if time.monotonic() >= give_up:
            return False
        time.sleep(0.01)
    return True


def _is_current(fd: int, path: Path) -> bool:
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)
