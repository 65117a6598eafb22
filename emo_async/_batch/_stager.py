"""Validate → upload → detect: everything before money, each fact fetched once.

The journal, when there is one, is where uploads and detections are remembered across runs;
the client remembers them for its own lifetime.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._config import DETECT_MODEL, EMO_MODEL, UPLOAD_VALIDITY
from .._exceptions import DetectionRejectedError, EmoError, InputError
from ._job import (
    TRANSIENT_TRIES,
    EventKind,
    InFlight,
    Reporter,
    is_transient,
    pause_after,
    tries_for,
)

if TYPE_CHECKING:
    from .._journal import Journal
    from ._ports import Service

__all__ = ["KEEP_BYTES", "Stager"]

logger = logging.getLogger("emo_async.batch")

#: Local inputs up to this size are kept in memory from validation to upload (one read, not two).
KEEP_BYTES = 1 << 20


class Stager:
    """Turns a job's inputs into what the billed POST needs."""

    def __init__(self, service: Service, journal: Journal | None, reporter: Reporter) -> None:
        self._service = service
        self._journal = journal
        self._report = reporter

    async def validate(self, item: InFlight) -> Mapping[str, bytes]:
        """Check the job locally (free); returns the bytes of its small local inputs.

        Raises:
            InputError: the job cannot be submitted as it is.
        """
        from .._journal import job_key
        from .._media import validate_keeping

        # Small local files come back with their bytes: the upload sends the very bytes that
        # were hashed, without a second read.
        v, contents = await validate_keeping(item.job, KEEP_BYTES)
        item.validated = v
        item.audio_seconds = v.billed_seconds_estimate
        item.ratio = v.ratio
        item.key = job_key(
            item.job, image_digest=v.image.digest, audio_digest=v.audio.digest, ratio=v.ratio
        )
        self._report.event(EventKind.VALIDATED, item)
        return contents

    async def stage(self, item: InFlight, contents: Mapping[str, bytes] | None = None) -> None:
        """Upload and detect, trying again after transient failures.

        Raises:
            InputError, DetectionRejectedError: refused (nothing was spent).
            EmoError: failed for good.
        """
        attempt = 0
        while True:
            try:
                await self._stage_once(item, contents or {})
                return
            except (InputError, DetectionRejectedError):
                raise
            except EmoError as exc:
                retry = self._service.retry
                if is_transient(exc, retry.retry_after_max) and attempt + 1 < tries_for(
                    exc, TRANSIENT_TRIES
                ):
                    await pause_after(item, exc, attempt, retry)
                    attempt += 1
                    continue
                raise

    async def _stage_once(self, item: InFlight, contents: Mapping[str, bytes]) -> None:
        v = item.validated
        assert v is not None
        item.image_url = await self._staged_url(v.image, contents.get("image"))
        item.audio_url = await self._staged_url(v.audio, contents.get("audio"))
        if item.job.face_bbox is not None and item.job.ext_bbox is not None:
            item.face_bbox, item.ext_bbox = item.job.face_bbox, item.job.ext_bbox
            return
        detection = None
        if self._journal is not None:
            detection = await self._journal.get_detection(v.image.digest, v.ratio)
            if detection is not None:
                self._service.remember_detection(v.image.digest, v.ratio, detection)
        if detection is None:
            # A temporary upload is readable only by the model its policy named: emo-detect-v1
            # gets its own copy of a local portrait.
            detect_url = await self._staged_url(v.image, contents.get("image"), model=DETECT_MODEL)
            detection = await self._service.detect_cached(detect_url, v.image.digest, v.ratio)
            if self._journal is not None:
                await self._journal.put_detection(v.image.digest, v.ratio, detection)
        self._report.event(
            EventKind.DETECTED, item, "pass" if detection.check_pass else detection.message
        )
        if not detection.check_pass or not detection.face_bbox or not detection.ext_bbox:
            raise DetectionRejectedError(detection)
        item.face_bbox, item.ext_bbox = detection.face_bbox, detection.ext_bbox

    async def _staged_url(
        self, prepared: Any, content: bytes | None = None, *, model: str = EMO_MODEL
    ) -> str:
        if prepared.kind != "local":
            return str(prepared.url)
        if self._journal is not None:
            cached = await self._journal.get_upload(prepared.digest, model)
            if cached is not None:
                return cached
        url = await self._service.upload_digest(
            prepared.path, prepared.digest, content=content, model=model
        )
        if self._journal is not None:
            await self._journal.put_upload(
                prepared.digest,
                model,
                url,
                expires_at=_dt.datetime.now(_dt.UTC) + UPLOAD_VALIDITY,
            )
        return url
