"""The partial files next to a destination: their names, the sidecar, orphan cleanup, and how
OS errors are described."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Collection
from pathlib import Path

import anyio

from .._exceptions import DownloadError

__all__ = ["cleanup_orphans", "part_paths"]

logger = logging.getLogger("emo_async.download")

SIDECAR_VERSION = 1


def part_paths(dest: Path) -> tuple[Path, Path]:
    """The ``.part`` file and its ``.part.json`` sidecar for a final path."""
    return dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".part.json")


async def cleanup_orphans(out_dir: Path | str, keep: Collection[Path | str]) -> list[Path]:
    """Delete ``.part`` and ``.part.json`` files in ``out_dir`` that no pending download owns.

    Args:
        out_dir: The directory to sweep (not recursive; a missing directory is fine).
        keep: Downloads that will resume: their final paths, or their ``.part`` paths.

    Returns:
        The files deleted.
    """
    root = Path(out_dir)
    return await anyio.to_thread.run_sync(_cleanup_orphans_sync, root, [Path(p) for p in keep])


def _cleanup_orphans_sync(root: Path, keep: list[Path]) -> list[Path]:
    try:
        real_root = root.resolve()
    except OSError:
        return []
    protected: set[str] = set()
    for path in keep:
        name = path.name
        for tail in (".part.json", ".part"):
            if name.endswith(tail):
                name = name[: -len(tail)]
                break
        try:
            same_dir = path.parent.resolve() == real_root
        except OSError:
            same_dir = False
        if same_dir:
            protected.update({name + ".part", name + ".part.json"})
    removed: list[Path] = []
    try:
        entries = list(os.scandir(root))
    except (FileNotFoundError, NotADirectoryError):
        return []
    for entry in entries:
        if not entry.name.endswith((".part", ".part.json")) or entry.name in protected:
            continue
        if entry.is_dir(follow_symlinks=False):
            continue
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            continue
        removed.append(Path(entry.path))
        logger.info("removed orphaned partial download %s", entry.path)
    return removed


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


def _nofollow_opener(path: str, flags: int) -> int:
    # A planted symlink named like our .part must not make us overwrite its target.
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o666)


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.write(text)
