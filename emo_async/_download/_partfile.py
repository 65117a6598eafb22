"""The ``.part`` on disk: opening or resuming it, writing, restarting, the sidecar, and the
final verified rename."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import sys
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os
import anyio
from aiofiles.threadpool.binary import AsyncBufferedReader

from .._exceptions import DownloadError
from ._files import (
    OWNER,
    SIDECAR_VERSION,
    _fsync_dir,
    _os_download_error,
    open_part,
    part_paths,
    read_sidecar,
    remove_stale_sidecar_tmps,
    write_sidecar,
)
from ._types import DownloadResult
from ._urls import _url_hashes, redact_url
from ._wire import _strong

logger = logging.getLogger("emo_async.download")

_REHASH_BLOCK = 1 << 20
_WRITEBACK_EVERY = 8 << 20
_FADVISE = getattr(os, "posix_fadvise", None) if sys.platform.startswith("linux") else None
_DONTNEED: int = getattr(os, "POSIX_FADV_DONTNEED", 4)
_RENAME_OPEN = os.name == "posix"


class NotMP4Error(DownloadError):
    """The downloaded bytes are not an MP4 video (no ``ftyp`` box where one must be)."""


def looks_like_mp4(head: bytes) -> bool:
    """Whether a file's first bytes open with an ISO-BMFF ``ftyp`` box, as every MP4 does."""
    if len(head) < 8 or head[4:8] != b"ftyp":
        return False
    size = int.from_bytes(head[:4], "big")
    return size == 1 or size >= 8


class _PartFile:
    """One download's file side: the open ``.part``, the hash so far, the validators that the
    sidecar records."""

    def __init__(
        self,
        url: str,
        dest: Path,
        *,
        expected_size: int | None,
        expected_sha256: str | None,
    ) -> None:
        self.url = url
        self.shown = redact_url(url)
        self.dest = dest
        self.part, self.meta = part_paths(dest)
        self.expected_size = expected_size
        self.expected_sha256 = expected_sha256
        self.file: AsyncBufferedReader | None = None
        self.hasher = hashlib.sha256()
        self.have = 0
        self.etag: str | None = None
        self.last_modified: str | None = None
        self.total: int | None = None
        self.saved_meta: dict[str, Any] | None = None
        self.transferred = 0
        self.unflushed = 0
        self.resumes = 0
        self.restarts = 0

    async def _prepare(self) -> None:
        meta = await anyio.to_thread.run_sync(self._prepare_sync)
        resume = meta is not None
        if resume:
            assert meta is not None
            self.etag = meta.get("etag")
            self.last_modified = meta.get("last_modified")
            total = meta.get("total")
            self.total = total if isinstance(total, int) else None
            self.saved_meta = meta
        try:
            with anyio.CancelScope(shield=True):
                # Opened without truncating and locked first: a .part another download is
                # writing must not lose a byte to us finding out.
                fd = await anyio.to_thread.run_sync(open_part, self.part)
                try:
                    self.file = await aiofiles.open(fd, "r+b")
                except BaseException:
                    os.close(fd)
                    raise
        except OSError as exc:
            raise _os_download_error("creating", self.part, exc) from exc
        # Ours under the lock now: a sidecar write a kill cut short is nobody's any more.
        await anyio.to_thread.run_sync(remove_stale_sidecar_tmps, self.meta)
        if not resume:
            try:
                await self.file.truncate(0)  # type: ignore[union-attr]
            except OSError as exc:
                raise _os_download_error("truncating", self.part, exc) from exc
            # The sidecar is what marks the .part as ours (for cleanup_orphans): write it now.
            await self._save_meta()
        else:
            try:
                await self._rehash()
            except OSError as exc:
                raise _os_download_error("reading", self.part, exc) from exc
            if self.have == 0 or (self.total is not None and self.have > self.total):
                await self._restart("the partial file does not fit its sidecar", count=False)
            else:
                logger.info("resuming %s from byte %d (found %s)", self.shown, self.have, self.part)

    def _prepare_sync(self) -> dict[str, Any] | None:
        if self.dest.is_dir():
            raise DownloadError(f"destination {self.dest} is a directory")
        try:
            self.dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _os_download_error("creating the directory", self.dest.parent, exc) from exc
        for path in (self.part, self.meta):
            try:
                mode: int | None = os.lstat(path).st_mode
            except OSError:
                mode = None
            if mode is not None and not stat.S_ISREG(mode):
                raise DownloadError(f"{path} is in the way and is not a file of ours; left alone")
        meta = read_sidecar(self.meta)
        if meta is None:
            return None
        url_hash, resource_hash = _url_hashes(self.url)
        # The same object under a re-signed URL may resume: If-Range guards against a change.
        if meta.get("url_sha256") != url_hash and meta.get("resource_sha256") != resource_hash:
            return None
        etag, last_modified = meta.get("etag"), meta.get("last_modified")
        if not (isinstance(etag, str) and _strong(etag)) and not isinstance(last_modified, str):
            return None
        return meta

    async def _rehash(self) -> None:
        assert self.file is not None
        await self.file.seek(0)
        while True:
            block = await self.file.read(_REHASH_BLOCK)
            if not block:
                break
            self.hasher.update(block)
            self.have += len(block)

    async def _close_file(self) -> None:
        file, self.file = self.file, None
        if file is None:
            return
        with anyio.CancelScope(shield=True):
            try:
                await file.close()
            except OSError as exc:
                logger.warning("closing %s failed: %s", self.part, exc)

    async def _write(self, pieces: list[bytes]) -> None:
        assert self.file is not None
        try:
            # Shielded: a cancelled await would leave the write running in its thread while
            # the file gets closed or truncated under it.
            with anyio.CancelScope(shield=True):
                await self.file.writelines(pieces)
        except OSError as exc:
            raise _os_download_error("writing", self.part, exc) from exc
        size = sum(map(len, pieces))
        self.have += size
        self.transferred += size
        self.unflushed += size
        if self.unflushed >= _WRITEBACK_EVERY:
            self.unflushed = 0
            await self._start_writeback()

    async def _start_writeback(self) -> None:
        # Start writing dirty pages to disk now (asynchronously, WB_SYNC_NONE) and drop the
        # ones already written, so the final fsync waits for a tail instead of the whole file,
        # and a long batch does not fill the page cache with videos. Linux only; best effort.
        if _FADVISE is None:
            return
        assert self.file is not None
        try:
            await self.file.flush()
            await anyio.to_thread.run_sync(_FADVISE, self.file.fileno(), 0, 0, _DONTNEED)
        except OSError as exc:
            raise _os_download_error("writing", self.part, exc) from exc

    # -- state changes -----------------------------------------------------------------------

    def _validator(self) -> str | None:
        if self.etag is not None and _strong(self.etag):
            return self.etag
        return self.last_modified

    async def _restart(self, reason: str, *, count: bool = True) -> None:
        assert self.file is not None
        if self.have > 0:
            logger.info("restarting %s from byte 0: %s", self.shown, reason)
            if count:
                self.restarts += 1
        try:
            await self.file.seek(0)
            await self.file.truncate(0)
        except OSError as exc:
            raise _os_download_error("truncating", self.part, exc) from exc
        self.hasher = hashlib.sha256()
        self.have = 0
        self.etag = self.last_modified = None
        self.total = None

    async def _save_meta(self) -> None:
        url_hash, resource_hash = _url_hashes(self.url)
        meta: dict[str, Any] = {
            "version": SIDECAR_VERSION,
            "owner": OWNER,
            "part": self.part.name,
            "url_sha256": url_hash,
            "resource_sha256": resource_hash,
            "etag": self.etag,
            "last_modified": self.last_modified,
            "total": self.total,
        }
        if meta == self.saved_meta:
            return
        try:
            # One thread hop that opens, writes and closes: cancelled in the middle of an
            # aiofiles open, the file object would be left open (a leaked handle).
            await anyio.to_thread.run_sync(write_sidecar, self.meta, meta)
        except OSError as exc:
            raise _os_download_error("writing", self.meta, exc) from exc
        self.saved_meta = meta

    async def _discard(self) -> None:
        if not _RENAME_OPEN:
            await self._close_file()
        # Removed while the lock is still held: once it is released, the .part at this name
        # may be another download's.
        for path in (self.part, self.meta):
            try:
                await aiofiles.os.remove(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.warning("could not remove %s: %s", path, exc)
        await self._close_file()

    async def _finish(self) -> DownloadResult:
        digest = self.hasher.hexdigest()
        if self.expected_size is not None and self.have != self.expected_size:
            await self._discard()
            raise DownloadError(
                f"{self.shown} gave {self.have} bytes, expected {self.expected_size}"
            )
        if self.expected_sha256 is not None and digest != self.expected_sha256:
            await self._discard()
            raise DownloadError(
                f"{self.shown} has sha256 {digest}, expected {self.expected_sha256}"
            )
        file = self.file
        assert file is not None
        try:
            await file.flush()
            head = await anyio.to_thread.run_sync(os.pread, file.fileno(), 16, 0)
        except OSError as exc:
            raise _os_download_error("reading", self.part, exc) from exc
        if not looks_like_mp4(head):
            await self._discard()
            raise NotMP4Error(
                f"{self.shown} is not an MP4 video (no ftyp box at its start; it begins "
                f"{head[:12]!r}); nothing was saved"
            )
        try:
            await anyio.to_thread.run_sync(os.fsync, file.fileno())
        except OSError as exc:
            raise _os_download_error("saving", self.part, exc) from exc
        if not _RENAME_OPEN:
            await self._close_file()
        try:
            # Renamed while still open (and locked) where the OS allows it, so no cleanup can
            # take the .part between the last write and the rename.
            await aiofiles.os.replace(self.part, self.dest)
        except OSError as exc:
            raise _os_download_error("moving into place", self.dest, exc) from exc
        await self._close_file()
        try:
            await anyio.to_thread.run_sync(_fsync_dir, self.dest.parent)
            await aiofiles.os.remove(self.meta)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("after saving %s: %s", self.dest, exc)
        logger.debug(
            "saved %s (%d bytes, %d transferred, %d resumes, %d restarts) from %s",
            self.dest,
            self.have,
            self.transferred,
            self.resumes,
            self.restarts,
            self.shown,
        )
        return DownloadResult(
            path=self.dest,
            size=self.have,
            sha256=digest,
            bytes_transferred=self.transferred,
            resumes=self.resumes,
            restarts=self.restarts,
        )
