"""The records a download hands back."""

from __future__ import annotations

from pathlib import Path

import attrs

__all__ = ["DownloadResult", "DownloadStatistics"]


@attrs.frozen
class DownloadResult:
    """A finished download.

    Attributes:
        path: The final file (complete and verified).
        size: Its size in bytes.
        sha256: Its SHA-256 (hex), computed while it was written.
        bytes_transferred: Body bytes received and written by this call, across resumes and
            restarts (bytes already in a ``.part`` from an earlier run are not counted).
        resumes: Requests that asked for the rest of a partial file (``Range``).
        restarts: Times a partial file was thrown away and the download began again at 0.
    """

    path: Path
    size: int
    sha256: str
    bytes_transferred: int
    resumes: int
    restarts: int


@attrs.frozen
class DownloadStatistics:
    """A snapshot of a :class:`Downloader`.

    Attributes:
        active: Downloads holding a slot.
        waiting: Downloads queued for a slot.
        max_concurrent: The number of slots.
    """

    active: int
    waiting: int
    max_concurrent: int
