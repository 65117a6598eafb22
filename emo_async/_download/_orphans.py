"""Removing partial downloads nobody will finish, and nothing else.

Only a ``.part`` that a sidecar of ours claims is a candidate, and only when no download holds
its lock: a user's ``ubuntu.iso.part`` and a ``.part`` another batch is writing right now are
both left alone.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Collection
from pathlib import Path

import anyio

from ._files import (
    _CLOEXEC,
    _NOFOLLOW,
    _NONBLOCK,
    _is_current,
    read_sidecar,
    remove_stale_sidecar_tmps,
    sidecar_tmp_meta,
    try_lock,
)

__all__ = ["cleanup_orphans"]

logger = logging.getLogger("emo_async.download")


async def cleanup_orphans(out_dir: Path | str, keep: Collection[Path | str]) -> list[Path]:
    """Delete our abandoned ``.part`` and ``.part.json`` files in ``out_dir``.

    A pair is deleted only if its ``.part.json`` is a sidecar written by this package for that
    ``.part``, no live download (in any process) holds the ``.part``'s lock, and ``keep`` does
    not name it. Anything else ending in ``.part`` or ``.part.json`` is not ours to delete.

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
        stem = _stem(path.name) or path.name
        try:
            same_dir = path.parent.resolve() == real_root
        except OSError:
            same_dir = False
        if same_dir:
            protected.add(stem)
    try:
        names = [entry.name for entry in os.scandir(root)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed: list[Path] = []
    seen: set[str] = set()
    for name in names:
        found = _stem(name)
        if found is None or found in protected or found in seen:
            continue
        seen.add(found)
        removed.extend(_remove_if_orphan(root / (found + ".part"), root / (found + ".part.json")))
    return removed


def _stem(name: str) -> str | None:
    name = sidecar_tmp_meta(name) or name
    for tail in (".part.json", ".part"):
        if name.endswith(tail) and len(name) > len(tail):
            return name[: -len(tail)]
    return None


def _remove_if_orphan(part: Path, meta: Path) -> list[Path]:
    if read_sidecar(meta) is None:
        if not os.path.lexists(part):
            # A sidecar write killed before its rename, with nothing else left.
            return remove_stale_sidecar_tmps(meta)
        return []  # not provably ours
    try:
        info = os.lstat(part)
    except FileNotFoundError:
        # A sidecar alone: its download finished or never created the .part (which a live
        # download creates, locked, before its sidecar).
        return _unlink(meta) + remove_stale_sidecar_tmps(meta)
    except OSError:
        return []
    if not stat.S_ISREG(info.st_mode):
        return []
    try:
        fd = os.open(part, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC)
    except OSError:
        return []
    try:
        if not try_lock(fd):
            logger.debug("%s is being downloaded; left alone", part)
            return []
        if not _is_current(fd, part):
            return []
        # Unlinked while we hold the lock, so a download starting now cannot have opened it
        # and still believe it is current.
        return _unlink(part) + _unlink(meta) + remove_stale_sidecar_tmps(meta)
    finally:
        os.close(fd)


def _unlink(path: Path) -> list[Path]:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return []
    except OSError as exc:
        logger.warning("could not remove %s: %s", path, exc)
        return []
    logger.info("removed orphaned partial download %s", path)
    return [path]
