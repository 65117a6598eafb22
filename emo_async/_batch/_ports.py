"""What the batch needs from a client: a narrow protocol, so the batch's collaborators depend
on these calls and not on the ``Client`` that happens to provide them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Iterable

    from .._client import ClientStatistics
    from .._config import PollPolicy, RetryPolicy
    from .._download import Downloader
    from .._models import BBox, Detection, Task, TaskPage
    from .._owned import OwnedTasks

__all__ = ["Service"]


class Service(Protocol):
    """Upload, detect, submit, find tasks, wait, get, cancel, download."""

    owned: OwnedTasks
    retry: RetryPolicy
    poll_policy: PollPolicy

    @property
    def downloader(self) -> Downloader: ...

    def statistics(self) -> ClientStatistics: ...

    async def upload_digest(
        self, path: Path, digest: str, *, model: str = ..., content: bytes | None = None
    ) -> str: ...

    async def detect_cached(self, image_url: str, digest: str, ratio: str) -> Detection: ...

    def remember_detection(self, digest: str, ratio: str, detection: Detection) -> None: ...

    async def submit(
        self,
        image_url: str,
        audio_url: str,
        *,
        face_bbox: BBox | Iterable[int],
        ext_bbox: BBox | Iterable[int],
        style_level: str = ...,
    ) -> Task: ...

    async def list_page(self, page_no: int = 1, *, page_size: int = 100) -> TaskPage: ...

    async def get_task(self, task_id: str) -> Task: ...

    async def wait(self, task_id: str, *, audio_seconds: float | None = None) -> Task: ...

    async def cancel_task(self, task_id: str) -> Task: ...
