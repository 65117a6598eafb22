"""Downloads that never lose a video: streamed, resumable, verified, atomic, deadline-aware.

A result URL is a presigned OSS URL that stops working 24 hours after the task ended, so the
downloader has its own session (which never carries the API key), starts the downloads whose
URLs expire first, and resumes a broken stream instead of starting over. Bytes go to
``<dest>.part``; only a complete, verified file is renamed to ``dest``. A small
``<dest>.part.json`` sidecar lets another process resume the ``.part`` later, and marks it as
ours: cleanup removes only a ``.part`` a sidecar of ours claims and no live download has locked.

Modules: ``_urls`` (redaction, deadlines), ``_gate`` (earliest-deadline-first slots),
``_files`` (partial-file names, sidecars, the lock, OS errors), ``_orphans`` (cleanup),
``_wire`` (HTTP details),
``_partfile`` (the ``.part`` on disk), ``_transfer`` (the attempts and the pipelined writer),
``_downloader`` (the public :class:`Downloader`).
"""

from __future__ import annotations

from ._downloader import Downloader
from ._files import PartInUseError, part_paths
from ._orphans import cleanup_orphans
from ._partfile import NotMP4Error
from ._types import DownloadResult, DownloadStatistics
from ._urls import redact_url, url_deadline

__all__ = [
    "DownloadResult",
    "DownloadStatistics",
    "Downloader",
    "NotMP4Error",
    "PartInUseError",
    "cleanup_orphans",
    "part_paths",
    "redact_url",
    "url_deadline",
]
