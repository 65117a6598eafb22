"""Content digests of local files, read in chunks so memory stays flat."""

from __future__ import annotations

import hashlib
import os

_CHUNK = 1024 * 1024


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of a file, read in 1 MiB chunks so memory stays flat."""
    return _hash_file(path, 0)[0]


def _hash_file(path: str | os.PathLike[str], keep: int) -> tuple[str, bytes | None]:
    """SHA-256 (hex) of a file, and its bytes when it holds at most ``keep`` (else None)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if keep > 0:
            # One byte more than the file holds (at most the limit): a short read is the whole
            # file; a full one means it is over the limit, or grew, and the rest is hashed.
            want = min(keep, os.fstat(f.fileno()).st_size) + 1
            data = f.read(want)
            h.update(data)
            if len(data) < want:
                return h.hexdigest(), data
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest(), None
