"""What every host of one simulator shares: the state object, task creation, response helpers."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Final

import attrs
from aiohttp import web

from ._clock import SimClock
from ._config import FaultConfig, SimulatorConfig
from ._foreign import OtherProgram
from ._inputs import InputResolver
from ._ledger import Ledger, TaskInputs, TaskRecord
from ._state import SimTask, StoredObject, TaskStore, TokenBucket
from ._video import RealVideos

__all__ = [
    "API_PREFIX",
    "TERMINAL",
    "Box",
    "SimState",
    "api_key_id",
    "drop",
    "hmac_b64",
    "json_response",
    "oss_error",
    "request_ctx",
    "rid",
]

API_PREFIX: Final = "/api/v1"
TERMINAL: Final = frozenset({"SUCCEEDED", "FAILED", "CANCELED"})
_VIDEO_INPUT_LIMIT: Final = 64 * 1024 * 1024

Box = tuple[int, int, int, int]


@attrs.define(eq=False)
class RequestCtx:
    """Per-request facts the middleware records in the ledger."""

    fault: str | None = None
    dropped: bool = False
    bytes_sent: int | None = None


_CTX_KEY: Final = web.RequestKey("emo_sim_ctx", RequestCtx)


def request_ctx(request: web.Request) -> RequestCtx:
    """The request's ledger facts (created on first use)."""
    ctx = request.get(_CTX_KEY)
    if ctx is None:
        ctx = RequestCtx()
        request[_CTX_KEY] = ctx
    return ctx


def rid() -> str:
    """A fresh request id."""
    return str(uuid.uuid4())


def json_response(
    body: Mapping[str, Any], status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A compact UTF-8 JSON answer, as the API host writes them."""
    return web.Response(
        body=json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode(),
        status=status,
        headers=headers,
        content_type="application/json",
        charset="utf-8",
    )


def oss_error(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """An OSS-style XML error (the upload and media hosts)."""
    request_id = uuid.uuid4().hex[:24].upper()
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error>\n'
        f"  <Code>{code}</Code>\n  <Message>{message}</Message>\n"
        f"  <RequestId>{request_id}</RequestId>\n  <HostId>simulator</HostId>\n</Error>\n"
    )
    return web.Response(
        text=body,
        status=status,
        headers={"x-oss-request-id": request_id, **(headers or {})},
        content_type="application/xml",
    )


def drop(request: web.Request, fault: str) -> web.Response:
    """Close the connection without answering (the response object is never sent)."""
    ctx = request_ctx(request)
    ctx.dropped = True
    ctx.fault = fault
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=499)


def hmac_b64(secret: bytes, text: str) -> str:
    """OSS's signature: base64 of HMAC-SHA1."""
    return base64.b64encode(hmac.new(secret, text.encode(), hashlib.sha1).digest()).decode()


def api_key_id(key: str) -> str:
    """The ``api_key_id`` the task list shows for a Bearer key."""
    return "key-" + hashlib.sha256(key.strip().encode()).hexdigest()[:12]


class SimState:
    """Everything one simulator instance knows, shared by its API, upload and media hosts."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.clock = SimClock(config.time_scale)
        self.ledger = Ledger()
        self.store = TaskStore(config, self.clock, self.ledger)
        self.uploads: dict[str, StoredObject] = {}
        self.buckets: dict[str, TokenBucket] = {}
        for endpoint in ("task_get", "task_list", "detect", "get_policy", "submit", "task_cancel"):
            rate = config.qps(endpoint)
            if rate is not None:
                self.buckets[endpoint] = TokenBucket(rate)
        self.faults = config.faults
        self.fault_rng = random.Random(config.faults.seed)
        self._id_rng = random.Random(config.seed)
        secret_rng = random.Random(f"secret:{config.seed}")
        self.media_secret = secret_rng.randbytes(20)
        self.media_key_id = "LTAI" + secret_rng.randbytes(8).hex()
        self.upload_secret = secret_rng.randbytes(20)
        self.upload_key_id = "LTAI" + secret_rng.randbytes(8).hex()
        self.account = secret_rng.randbytes(6).hex()
        self.resolver = InputResolver(timeout=config.fetch_timeout, lookup_upload=self.upload_bytes)
        #: Real MP4 results (PyAV), when configured; else seeded placeholder bytes.
        self.real_videos = (
            RealVideos(lambda url: self.resolver._fetch(url, _VIDEO_INPUT_LIMIT, "emo-v1"))
            if config.real_video
            else None
        )
        #: Placeholder videos by (task id, media generation), the few most recent.
        self.videos: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        #: Local port → role, filled by ``Simulator``; empty means "route by path".
        self.port_roles: dict[int, str] = {}
        #: Role → origin (``http://127.0.0.1:PORT``); empty means "the request's own origin".
        self.hosts: dict[str, str] = {}
        self._last_created = 0.0
        self._foreign_count = 0
        self.other_program = OtherProgram(self._create_foreign)
        self.other_program.configure(config.faults.other_program_interval, config.faults.seed)

    # ----------------------------------------------------------------- plumbing

    def set_faults(self, faults: FaultConfig) -> None:
        """Swap the fault knobs (and reseed their dice)."""
        self.faults = faults
        self.fault_rng = random.Random(faults.seed)
        self.other_program.configure(faults.other_program_interval, faults.seed)

    def roll(self, probability: float) -> bool:
        """Throw the fault dice (never thrown for a knob that is off, so adding a knob leaves
        the faults of existing seeds alone)."""
        return probability > 0.0 and self.fault_rng.random() < probability

    def new_id(self) -> str:
        """A seeded task id."""
        return str(uuid.UUID(int=self._id_rng.getrandbits(128), version=4))

    @property
    def default_api_key(self) -> str:
        """The key a client is told to use (``sk-simulator`` unless configured otherwise)."""
        keys = self.config.api_keys
        return "sk-simulator" if "sk-simulator" in keys else sorted(keys)[0]

    def origin(self, role: str, request: web.Request) -> str:
        """Origin of a role's host, as seen by this request's client."""
        return self.hosts.get(role) or f"{request.scheme}://{request.host}"

    def upload_bytes(self, key: str, model: str | None = None) -> bytes | bytearray | None:
        """A live temporary upload's bytes, as ``model`` may read them (None if it cannot)."""
        obj = self.uploads.get(key)
        if obj is None:
            return None
        if model is not None and obj.model is not None and obj.model != model:
            # DashScope binds a temporary file to the model its policy was issued for: another
            # model cannot read it, as if it did not exist.
            return None
        if self.clock.now() >= obj.created + self.config.upload_ttl:
            del self.uploads[key]
            return None
        return obj.data

    # ------------------------------------------------------------------ tasks

    def create_task(
        self,
        *,
        inputs: TaskInputs,
        model: str,
        ratio: str,
        failure: tuple[str, str] | None,
        request_id: str,
        created: float | None = None,
        created_mono: float | None = None,
        foreign: bool = False,
    ) -> SimTask:
        """Queue a new task and write it in the billing ledger."""
        task_id = self.new_id()
        fingerprint = hashlib.sha256(
            json.dumps(
                {
                    "model": model,
                    "image": inputs.image_sha256,
                    "audio": inputs.audio_sha256,
                    "face_bbox": list(inputs.face_bbox),
                    "ext_bbox": list(inputs.ext_bbox),
                    "style_level": inputs.style_level,
                },
                sort_keys=True,
            ).encode()
        ).hexdigest()
        cfg = self.config
        noise = random.Random(f"{cfg.seed}:{task_id}").lognormvariate(0.0, cfg.processing_jitter)
        base = cfg.processing_base + cfg.processing_per_audio_second * inputs.audio_duration
        duration = base * noise
        if failure is not None:
            duration *= 0.1  # content errors surface at the end of pre-processing
        # Never before an earlier task: the FIFO queue is in creation order.
        created = max(self._last_created, self.clock.now() if created is None else created)
        self._last_created = created
        task = SimTask(
            task_id=task_id,
            request_id=request_id,
            model=model,
            api_key_id=inputs.api_key_id,
            created=created,
            fingerprint=fingerprint,
            duration=duration,
            audio_duration=inputs.audio_duration,
            ratio=ratio,
            style_level=inputs.style_level,
            failure=failure,
        )
        self.store.add(task)
        self.ledger.record_task(
            TaskRecord(
                task_id=task_id,
                fingerprint=fingerprint,
                created_at=time.monotonic() if created_mono is None else created_mono,
                request_id=request_id,
                inputs=inputs,
                foreign=foreign,
            )
        )
        return task

    def _create_foreign(self, audio_seconds: float, due: float | None) -> str:
        """Another program on the account, with the same key, submits a job (see
        ``FaultConfig.other_program_interval``)."""
        self._foreign_count += 1
        n = self._foreign_count
        created = None
        if due is not None:
            # Made lazily: place it at the simulated instant it was due.
            late = max(0.0, time.monotonic() - due)
            created = self.clock.now() - late / self.clock.time_scale
        image_url = f"https://other-program.invalid/portrait-{n}.png"
        audio_url = f"https://other-program.invalid/voice-{n}.wav"
        inputs = TaskInputs(
            image_url=image_url,
            audio_url=audio_url,
            audio_duration=audio_seconds,
            api_key_id=api_key_id(self.default_api_key),
            image_sha256=hashlib.sha256(image_url.encode()).hexdigest(),
            audio_sha256=hashlib.sha256(audio_url.encode()).hexdigest(),
            face_bbox=(128, 128, 384, 384),
            ext_bbox=(0, 0, 512, 512),
            style_level="normal",
        )
        task = self.create_task(
            inputs=inputs,
            model="emo-v1",
            ratio="1:1",
            failure=None,
            request_id=rid(),
            created=created,
            created_mono=due,
            foreign=True,
        )
        return task.task_id

    def create_foreign_task(self, audio_seconds: float | None = None) -> str:
        """Create, now, a task as another program on the same account and key would.

        Args:
            audio_seconds: Its audio's duration (its billed ``video_duration``); None draws
                one from the seeded 2-8 s range.

        Returns:
            The new task's id (also in ``ledger.foreign_tasks``).
        """
        self.other_program.catch_up()
        return self.other_program.create_now(audio_seconds)
