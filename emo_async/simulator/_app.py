"""The aiohttp application: API, upload and media roles, faults and the ledger."""

from __future__ import annotations

import asyncio
import base64
import datetime as _dt
import hashlib
import hmac
import json
import math
import random
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Final
from urllib.parse import quote

import attrs
from aiohttp import BodyPartReader, web

from ._clock import SERVER_TZ, SimClock, format_server_time
from ._config import FaultConfig, SimulatorConfig
from ._errors import CONTENT_ERRORS, ApiError, Msg
from ._inputs import OSS_HEADER, InputResolver
from ._ledger import Ledger, RequestRecord, TaskRecord
from ._media import AudioInfo, ImageInfo, expand_box, video_bytes
from ._state import SimTask, StoredObject, TaskStore, TokenBucket
from ._video import RealVideos

__all__ = ["SIM_KEY", "SimState", "create_app"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

API_PREFIX: Final = "/api/v1"
STYLE_LEVELS: Final = frozenset({"normal", "calm", "active"})
TERMINAL: Final = frozenset({"SUCCEEDED", "FAILED", "CANCELED"})
_BUCKET: Final = "dashscope-result-sim"
_UPLOAD_BUCKET: Final = "dashscope-file-sim"
_OSS_FIELDS: Final = (
    "ossaccesskeyid",
    "signature",
    "policy",
    "key",
    "x-oss-object-acl",
    "x-oss-forbid-overwrite",
)
_VIDEO_INPUT_LIMIT: Final = 64 * 1024 * 1024
_MEDIA_CHUNK = 1 << 20
_MEDIA_PATH = re.compile(r"^/results/(?P<task_id>[^/]+)\.mp4$")
_TASK_PATH = re.compile(r"^/api/v1/tasks/(?P<task_id>[^/]+)$")
_CANCEL_PATH = re.compile(r"^/api/v1/tasks/(?P<task_id>[^/]+)/cancel$")


def classify(method: str, path: str) -> tuple[str, str]:
    """(role, endpoint) a request path belongs to; endpoint ``"other"`` if none."""
    if path.startswith(API_PREFIX + "/") or path == API_PREFIX:
        sub = path[len(API_PREFIX) :]
        if method == "POST" and sub == "/services/aigc/image2video/face-detect":
            return "api", "detect"
        if method == "POST" and sub in (
            "/services/aigc/image2video/video-synthesis",
            "/services/aigc/image2video/video-synthesis/",
        ):
            return "api", "submit"
        if method == "GET" and sub in ("/tasks", "/tasks/"):
            return "api", "task_list"
        if method == "GET" and _TASK_PATH.match(path):
            return "api", "task_get"
        if method == "POST" and _CANCEL_PATH.match(path):
            return "api", "task_cancel"
        if method == "GET" and sub == "/uploads":
            return "api", "get_policy"
        return "api", "other"
    if path.startswith("/results/"):
        if method in ("GET", "HEAD") and _MEDIA_PATH.match(path):
            return "media", "media"
        return "media", "other"
    if path == "/" and method == "POST":
        return "upload", "upload"
    return "upload", "other"


@attrs.define(eq=False)
class _Ctx:
    """Per-request facts the middleware records in the ledger."""

    fault: str | None = None
    dropped: bool = False
    bytes_sent: int | None = None


_CTX_KEY: Final = web.RequestKey("emo_sim_ctx", _Ctx)


def _ctx(request: web.Request) -> _Ctx:
    ctx = request.get(_CTX_KEY)
    if ctx is None:
        ctx = _Ctx()
        request[_CTX_KEY] = ctx
    return ctx


def _rid() -> str:
    return str(uuid.uuid4())


def _json(
    body: Mapping[str, Any], status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode(),
        status=status,
        headers=headers,
        content_type="application/json",
        charset="utf-8",
    )


def _oss_error(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
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


def _drop(request: web.Request, fault: str) -> web.Response:
    """Close the connection without answering (the response object is never sent)."""
    ctx = _ctx(request)
    ctx.dropped = True
    ctx.fault = fault
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=499)


def _box(value: object) -> tuple[int, int, int, int] | None:
    if not isinstance(value, list) or len(value) != 4:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return None
    x1, y1, x2, y2 = value
    if x1 < 0 or y1 < 0 or x1 >= x2 or y1 >= y2:
        return None
    return (x1, y1, x2, y2)


def _aspect(box: tuple[int, int, int, int]) -> str | None:
    w, h = box[2] - box[0], box[3] - box[1]
    ratio = w / h
    if abs(ratio - 1.0) <= 0.01:
        return "1:1"
    if abs(ratio - 0.75) <= 0.01:
        return "3:4"
    return None


def _hmac_b64(secret: bytes, text: str) -> str:
    return base64.b64encode(hmac.new(secret, text.encode(), hashlib.sha1).digest()).decode()


class SimState:
    """Everything one simulator instance knows; handlers are its methods."""

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
        self._fault_rng = random.Random(config.faults.seed)
        self._id_rng = random.Random(config.seed)
        secret_rng = random.Random(f"secret:{config.seed}")
        self._media_secret = secret_rng.randbytes(20)
        self._media_key_id = "LTAI" + secret_rng.randbytes(8).hex()
        self._upload_secret = secret_rng.randbytes(20)
        self._upload_key_id = "LTAI" + secret_rng.randbytes(8).hex()
        self._account = secret_rng.randbytes(6).hex()
        self.resolver = InputResolver(
            timeout=config.fetch_timeout, lookup_upload=self._upload_bytes
        )
        #: Real MP4 results (PyAV), when configured; else seeded placeholder bytes.
        self.real_videos = (
            RealVideos(lambda url: self.resolver._fetch(url, _VIDEO_INPUT_LIMIT, "emo-v1"))
            if config.real_video
            else None
        )
        #: Local port → role, filled by ``Simulator``; empty means "route by path".
        self.port_roles: dict[int, str] = {}
        #: Role → origin (``http://127.0.0.1:PORT``); empty means "the request's own origin".
        self.hosts: dict[str, str] = {}
        self._videos: OrderedDict[tuple[str, int], bytes] = OrderedDict()

    # ----------------------------------------------------------------- plumbing

    def set_faults(self, faults: FaultConfig) -> None:
        """Swap the fault knobs (and reseed their dice)."""
        self.faults = faults
        self._fault_rng = random.Random(faults.seed)

    def _roll(self, probability: float) -> bool:
        return probability > 0.0 and self._fault_rng.random() < probability

    def _new_id(self) -> str:
        return str(uuid.UUID(int=self._id_rng.getrandbits(128), version=4))

    def role_of(self, request: web.Request) -> str | None:
        if not self.port_roles or request.transport is None:
            return None
        sockname = request.transport.get_extra_info("sockname")
        if isinstance(sockname, tuple) and len(sockname) >= 2:
            return self.port_roles.get(int(sockname[1]))
        return None

    def origin(self, role: str, request: web.Request) -> str:
        return self.hosts.get(role) or f"{request.scheme}://{request.host}"

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        arrival = time.monotonic()
        path_role, endpoint = classify(request.method, request.path)
        role = self.role_of(request) or path_role
        if role != path_role:
            endpoint = "other"
        ctx = _ctx(request)
        status: int | None = None
        try:
            response = await self._dispatch(request, handler, role, endpoint, ctx)
            if not ctx.dropped:
                status = response.status
                if ctx.bytes_sent is None:
                    body = response.body if isinstance(response, web.Response) else None
                    ctx.bytes_sent = len(body) if isinstance(body, bytes | bytearray) else 0
                    if request.method == "HEAD":
                        ctx.bytes_sent = 0
            return response
        finally:
            self.ledger.record(
                RequestRecord(
                    t=arrival,
                    role=role,
                    endpoint=endpoint,
                    method=request.method,
                    path=request.path,
                    status=status,
                    authorization="Authorization" in request.headers,
                    fault=ctx.fault,
                    bytes_sent=ctx.bytes_sent or 0,
                )
            )

    def _error(self, role: str, exc: ApiError) -> web.Response:
        if role == "api":
            body = {"request_id": _rid(), "code": exc.code, "message": exc.message}
            return _json(body, exc.status, exc.headers)
        return _oss_error(exc.status, exc.code, exc.message, exc.headers)

    def _throttle(self) -> ApiError:
        headers = {}
        if self.faults.retry_after is not None:
            headers["Retry-After"] = f"{self.faults.retry_after:g}"
        return ApiError(429, "Throttling.RateQuota", Msg.RATE_QUOTA, headers=headers)

    async def _dispatch(
        self, request: web.Request, handler: Handler, role: str, endpoint: str, ctx: _Ctx
    ) -> web.StreamResponse:
        faults = self.faults
        try:
            if faults.latency > 0 or faults.latency_jitter > 0:
                await asyncio.sleep(
                    faults.latency + self._fault_rng.uniform(0, faults.latency_jitter)
                )
            if self._roll(faults.slow_rate):
                ctx.fault = "slow"
                await asyncio.sleep(faults.slow_delay)
            if endpoint == "other":
                if role == "api":
                    raise ApiError(404, "NotFound", Msg.NOT_FOUND)
                raise ApiError(404, "NoSuchKey", "The specified key does not exist.")
            if role == "api":
                self._authenticate(request)
                bucket = self.buckets.get(endpoint)
                if bucket is not None and not bucket.take():
                    raise self._throttle()
            if self._roll(faults.throttle_rate.get(endpoint, 0.0)):
                ctx.fault = "throttle"
                raise self._throttle()
            if self._roll(faults.error_rate.get(endpoint, 0.0)):
                ctx.fault = "error"
                if self._fault_rng.random() < 0.5:
                    raise ApiError(500, "InternalError", Msg.INTERNAL)
                raise ApiError(503, "ModelUnavailable", Msg.UNAVAILABLE)
            if self._roll(faults.reset_rate.get(endpoint, 0.0)):
                return _drop(request, "reset")
            if role == "media":
                return await self.media(request)
            if role == "upload":
                return await self.upload(request)
            return await handler(request)
        except ApiError as exc:
            return self._error(role, exc)
        except web.HTTPException as exc:
            # aiohttp's own refusals (body too large, bad request line...) in our error format.
            if exc.status < 400:
                raise
            return self._error(
                role,
                ApiError(
                    exc.status,
                    "InvalidParameter" if exc.status < 500 else "InternalError",
                    exc.reason,
                ),
            )

    def _authenticate(self, request: web.Request) -> None:
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or key.strip() not in self.config.api_keys:
            raise ApiError(401, "InvalidApiKey", Msg.INVALID_KEY)

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError):
            raise ApiError.bad_parameter() from None
        if not isinstance(body, dict):
            raise ApiError.bad_parameter()
        return body

    def _api_key_id(self, request: web.Request) -> str:
        key = request.headers.get("Authorization", "").partition(" ")[2].strip()
        return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]

    # ------------------------------------------------------------------ inputs

    def _upload_bytes(self, key: str, model: str | None = None) -> bytes | bytearray | None:
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

    def _content_code(self, image: ImageInfo) -> str | None:
        trigger = image.trigger or self.config.content_rules.get(image.sha256)
        if trigger is None:
            return None
        if trigger not in CONTENT_ERRORS:
            # An unknown trigger is a test bug; answer the closest documented failure.
            return "InvalidFile.Content:none"
        return trigger

    async def _image(self, request: web.Request, url: object, model: str) -> ImageInfo:
        oss = request.headers.get(OSS_HEADER, "").lower() == "enable"
        if not self.config.validate_inputs:
            if not isinstance(url, str) or not url.strip():
                raise ApiError.invalid_url(Msg.MISSING_URL)
            digest = hashlib.sha256(url.encode()).hexdigest()
            return ImageInfo(
                format="PNG",
                width=1024,
                height=1024,
                sha256=digest,
                trigger=None,
                face=(358, 330, 666, 638),
            )
        image = await self.resolver.image(url, oss_enabled=oss, model=model)
        if not image.resolution_ok:
            raise ApiError(400, "InvalidFile.Resolution", Msg.RESOLUTION)
        return image

    async def _audio(self, request: web.Request, url: object, model: str) -> AudioInfo:
        oss = request.headers.get(OSS_HEADER, "").lower() == "enable"
        if not self.config.validate_inputs:
            if not isinstance(url, str) or not url.strip():
                raise ApiError.invalid_url(Msg.MISSING_URL)
            digest = hashlib.sha256(url.encode()).hexdigest()
            return AudioInfo(format="wav", duration=10.0, sha256=digest, size=0)
        return await self.resolver.audio(url, oss_enabled=oss, model=model)

    # -------------------------------------------------------------- API roles

    async def detect(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        if body.get("model") != "emo-detect-v1":
            raise ApiError.bad_parameter(Msg.MODEL_NOT_FOUND)
        inputs = body.get("input")
        params = body.get("parameters") or {}
        if not isinstance(inputs, dict) or not isinstance(params, dict):
            raise ApiError.bad_parameter()
        ratio = params.get("ratio", "1:1")
        if ratio not in ("1:1", "3:4"):
            raise ApiError.bad_parameter()
        image = await self._image(request, inputs.get("image_url"), "emo-detect-v1")
        output: dict[str, Any]
        code = self._content_code(image)
        ext = expand_box(image.face, image.width, image.height, ratio) if image.face else None
        if code is None and ext is None:
            code = "InvalidFile.BodyProportion"
        if code is not None:
            output = {"check_pass": False, "message": CONTENT_ERRORS[code][1]}
        else:
            assert image.face is not None
            assert ext is not None
            output = {"check_pass": True, "face_bbox": list(image.face), "ext_bbox": list(ext)}
        return _json({"output": output, "usage": {"image_count": 1}, "request_id": _rid()})

    async def submit(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("X-DashScope-Async", "").strip().lower() != "enable":
            raise ApiError(403, "AccessDenied", Msg.SYNC_UNSUPPORTED)
        body = await self._body(request)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError.bad_parameter()
        if model != "emo-v1":
            raise ApiError.bad_parameter(Msg.MODEL_NOT_FOUND)
        inputs = body.get("input")
        params = body.get("parameters")
        if params is None:
            params = {}
        if not isinstance(inputs, dict) or not isinstance(params, dict):
            raise ApiError.bad_parameter()
        for name in ("image_url", "audio_url"):
            value = inputs.get(name)
            if not isinstance(value, str) or not value.strip():
                raise ApiError.invalid_url(Msg.MISSING_URL)
        face = _box(inputs.get("face_bbox"))
        ext = _box(inputs.get("ext_bbox"))
        if face is None or ext is None:
            raise ApiError.bad_parameter()
        ratio = _aspect(ext)
        if ratio is None:
            raise ApiError.bad_parameter()
        style = params.get("style_level", "normal")
        if style not in STYLE_LEVELS:
            raise ApiError.bad_parameter(Msg.BAD_STYLE)
        image = await self._image(request, inputs["image_url"], "emo-v1")
        audio = await self._audio(request, inputs["audio_url"], "emo-v1")
        if self.config.validate_inputs and (
            ext[2] > image.width
            or ext[3] > image.height
            or face[2] > image.width
            or face[3] > image.height
        ):
            raise ApiError.bad_parameter()
        code = self._content_code(image)
        failure = CONTENT_ERRORS[code] if code is not None else None

        task_id = self._new_id()
        request_id = _rid()
        fingerprint = hashlib.sha256(
            json.dumps(
                {
                    "model": model,
                    "image": image.sha256,
                    "audio": audio.sha256,
                    "face_bbox": list(face),
                    "ext_bbox": list(ext),
                    "style_level": style,
                },
                sort_keys=True,
            ).encode()
        ).hexdigest()
        cfg = self.config
        noise = random.Random(f"{cfg.seed}:{task_id}").lognormvariate(0.0, cfg.processing_jitter)
        duration = (cfg.processing_base + cfg.processing_per_audio_second * audio.duration) * noise
        if failure is not None:
            duration *= 0.1  # content errors surface at the end of pre-processing
        task = SimTask(
            task_id=task_id,
            request_id=request_id,
            model=model,
            api_key_id=self._api_key_id(request),
            created=self.clock.now(),
            fingerprint=fingerprint,
            duration=duration,
            audio_duration=audio.duration,
            ratio=ratio,
            style_level=style,
            failure=failure,
        )
        self.store.add(task)
        if self.real_videos is not None:
            await self.real_videos.remember(
                task_id,
                image_url=inputs["image_url"],
                audio_url=inputs["audio_url"],
                face_bbox=face,
                ext_bbox=ext,
                ratio=ratio,
                audio_duration=audio.duration,
            )
        self.ledger.record_task(
            TaskRecord(
                task_id=task_id,
                fingerprint=fingerprint,
                created_at=time.monotonic(),
                request_id=request_id,
            )
        )
        if self._roll(self.faults.ambiguous_submit_rate):
            return _drop(request, "ambiguous")
        return _json(
            {"output": {"task_id": task_id, "task_status": "PENDING"}, "request_id": request_id}
        )

    def _video_url(self, task: SimTask, request: web.Request) -> str:
        ended = task.ended
        assert ended is not None
        if task.url_expires is None or task.url_clock_generation != self.clock.generation:
            task.url_expires = math.floor(self.clock.real_unix(ended + self.config.result_ttl))
            task.url_clock_generation = self.clock.generation
        expires = task.url_expires
        signature = self._media_signature(task.task_id, expires)
        return (
            f"{self.origin('media', request)}/results/{task.task_id}.mp4"
            f"?Expires={expires}&OSSAccessKeyId={self._media_key_id}"
            f"&Signature={quote(signature, safe='')}"
        )

    def _media_signature(self, task_id: str, expires: int) -> str:
        return _hmac_b64(
            self._media_secret, f"GET\n\n\n{expires}\n/{_BUCKET}/results/{task_id}.mp4"
        )

    def _task_body(self, task: SimTask, now: float, request: web.Request) -> dict[str, Any]:
        status = task.status(now)
        output: dict[str, Any] = {
            "task_id": task.task_id,
            "task_status": status,
            "submit_time": format_server_time(self.clock.wall(task.created)),
        }
        if task.scheduled is not None and task.canceled_at is None:
            output["scheduled_time"] = format_server_time(self.clock.wall(task.scheduled))
        body: dict[str, Any] = {"request_id": _rid(), "output": output}
        if status in TERMINAL:
            ended = task.ended
            assert ended is not None
            output["end_time"] = format_server_time(self.clock.wall(ended))
        if status == "SUCCEEDED":
            output["results"] = {"video_url": self._video_url(task, request)}
            body["usage"] = {
                "video_duration": round(task.audio_duration, 2),
                "video_ratio": task.ratio,
            }
        elif status == "FAILED" and task.failure is not None:
            output["code"], output["message"] = task.failure
        return body

    async def task_get(self, request: web.Request) -> web.StreamResponse:
        task_id = request.match_info["task_id"]
        now = self.store.catch_up()
        task = self.store.get(task_id, now)
        if task is None:
            return _json(
                {"request_id": _rid(), "output": {"task_id": task_id, "task_status": "UNKNOWN"}}
            )
        return _json(self._task_body(task, now, request))

    async def task_cancel(self, request: web.Request) -> web.StreamResponse:
        task_id = request.match_info["task_id"]
        now = self.store.catch_up()
        task = self.store.get(task_id, now)
        if task is None or task.status(now) != "PENDING":
            raise ApiError(400, "UnsupportedOperation", Msg.CANCEL_UNSUPPORTED)
        task.canceled_at = now
        return _json(self._task_body(task, now, request))

    async def task_list(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        try:
            page_no = int(query.get("page_no", "1"))
            page_size = int(query.get("page_size", "10"))
        except ValueError:
            raise ApiError.bad_parameter() from None
        if page_no < 1 or page_size < 1:
            raise ApiError.bad_parameter()
        page_size = min(page_size, 100)
        start = _parse_list_time(query.get("start_time"))
        end = _parse_list_time(query.get("end_time"))
        shift = self.faults.list_time_shift
        if shift:
            start = None if start is None else start + shift
            end = None if end is None else end + shift
        model_name = query.get("model_name")
        status = query.get("status")
        task_id = query.get("task_id")
        api_key_id = query.get("api_key_id")
        now = self.store.catch_up()
        matched: list[tuple[SimTask, str]] = []
        for task in self.store.newest_first(now):
            created = self.clock.wall(task.created)
            if start is not None and created < start:
                continue
            if end is not None and created > end:
                continue
            if model_name and task.model != model_name:
                continue
            if task_id and task.task_id != task_id:
                continue
            if api_key_id and task.api_key_id != api_key_id:
                continue
            task_status = task.status(now)
            if status and task_status != status:
                continue
            matched.append((task, task_status))
        total = len(matched)
        page = matched[(page_no - 1) * page_size : page_no * page_size]
        data = [self._list_item(task, task_status) for task, task_status in page]
        return _json(
            {
                "request_id": _rid(),
                "data": data,
                "total": total,
                "total_page": math.ceil(total / page_size),
                "page_no": page_no,
                "page_size": page_size,
            }
        )

    def _list_item(self, task: SimTask, status: str) -> dict[str, Any]:
        def ms(sim_t: float) -> int:
            return round(self.clock.wall(sim_t) * 1000)

        item: dict[str, Any] = {
            "task_id": task.task_id,
            "status": status,
            "gmt_create": ms(task.created),
            "request_id": task.request_id,
            "model_name": task.model,
            "api_key_id": task.api_key_id,
            "region": "cn-beijing",
            "caller_parent_id": self._account,
            "caller_uid": self._account,
            "user_api_unique_key": f"apikey:v1:aigc:image2video:video-synthesis:{task.model}",
        }
        if task.scheduled is not None and task.canceled_at is None:
            item["start_time"] = ms(task.scheduled)
        if status in TERMINAL and task.ended is not None:
            item["end_time"] = ms(task.ended)
        return item

    async def get_policy(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("action") != "getPolicy" or not request.query.get("model"):
            raise ApiError.bad_parameter()
        model = request.query["model"]
        now_wall = self.clock.wall()
        expiration = _dt.datetime.fromtimestamp(
            now_wall + self.clock.real_seconds(self.config.policy_ttl), _dt.UTC
        )
        day = _dt.datetime.fromtimestamp(now_wall, SERVER_TZ).strftime("%Y-%m-%d")
        upload_dir = f"dashscope-instant/{self._account}/{day}/{uuid.uuid4()}"
        max_bytes = self.config.max_file_size_mb * 1024 * 1024
        policy_doc = {
            "expiration": expiration.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
            "conditions": [
                {"bucket": _UPLOAD_BUCKET},
                ["content-length-range", 0, max_bytes],
                ["starts-with", "$key", upload_dir],
                {"x-oss-object-acl": "private"},
                {"x-oss-forbid-overwrite": "true"},
                {"x-dashscope-model": model},
            ],
        }
        policy = base64.b64encode(json.dumps(policy_doc).encode()).decode()
        data = {
            "policy": policy,
            "signature": _hmac_b64(self._upload_secret, policy),
            "upload_dir": upload_dir,
            "upload_host": self.origin("upload", request),
            "expire_in_seconds": max(1, round(self.clock.real_seconds(self.config.policy_ttl))),
            "max_file_size_mb": self.config.max_file_size_mb,
            "capacity_limit_mb": self.config.capacity_limit_mb,
            "oss_access_key_id": self._upload_key_id,
            "x_oss_object_acl": "private",
            "x_oss_forbid_overwrite": "true",
        }
        return _json({"request_id": _rid(), "data": data})

    # ---------------------------------------------------------------- upload

    async def upload(self, request: web.Request) -> web.StreamResponse:
        if not request.content_type.startswith("multipart/"):
            raise ApiError(400, "InvalidArgument", "The request must be a multipart form.")
        reader = await request.multipart()
        fields: dict[str, str] = {}
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                raise ApiError(400, "InvalidArgument", "Nested multipart bodies are not supported.")
            name = part.name or ""
            if name == "file":
                # OSS ignores everything after the file, so the fields are complete here.
                return await self._store_upload(fields, part)
            raw = await part.read()
            if len(raw) > 64 * 1024:
                raise ApiError(400, "InvalidArgument", f"The form field {name} is too large.")
            fields[name.lower()] = raw.decode("utf-8", errors="replace")
        raise ApiError(400, "InvalidArgument", "The body of your POST request is missing the file.")

    async def _store_upload(
        self, fields: dict[str, str], part: BodyPartReader
    ) -> web.StreamResponse:
        for name in _OSS_FIELDS:
            if name not in fields:
                raise ApiError(
                    403, "AccessDenied", f"Invalid according to Policy: missing form field {name}."
                )
        if fields["ossaccesskeyid"] != self._upload_key_id:
            raise ApiError(
                403,
                "InvalidAccessKeyId",
                "The OSS Access Key Id you provided does not exist in our records.",
            )
        policy = fields["policy"]
        if not hmac.compare_digest(fields["signature"], _hmac_b64(self._upload_secret, policy)):
            raise ApiError(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided.",
            )
        try:
            doc = json.loads(base64.b64decode(policy))
            expiration = _dt.datetime.strptime(doc["expiration"], "%Y-%m-%dT%H:%M:%S.000Z")
            conditions = doc["conditions"]
        except (ValueError, KeyError, TypeError):
            raise ApiError(403, "AccessDenied", "Invalid Policy.") from None
        if self.clock.wall() > expiration.replace(tzinfo=_dt.UTC).timestamp():
            raise ApiError(403, "AccessDenied", "Invalid according to Policy: Policy expired.")
        upload_dir = next(c[2] for c in conditions if isinstance(c, list) and c[0] == "starts-with")
        max_bytes = next(
            c[2] for c in conditions if isinstance(c, list) and c[0] == "content-length-range"
        )
        key = fields["key"]
        if not key.startswith(upload_dir):
            raise ApiError(
                403,
                "AccessDenied",
                _policy_failed(f'["starts-with", "$key", "{upload_dir}"]'),
            )
        if fields["x-oss-object-acl"] != "private":
            raise ApiError(
                403,
                "AccessDenied",
                _policy_failed('["eq", "$x-oss-object-acl", "private"]'),
            )
        if fields["x-oss-forbid-overwrite"].lower() != "true":
            raise ApiError(
                403,
                "AccessDenied",
                _policy_failed('["eq", "$x-oss-forbid-overwrite", "true"]'),
            )
        if self._upload_bytes(key) is not None:
            raise ApiError(
                409,
                "FileAlreadyExists",
                "The object you specified already exists and can not be overwritten.",
            )
        data = bytearray()
        while True:
            chunk = await part.read_chunk(256 * 1024)
            if not chunk:
                break
            data += chunk
            if len(data) > max_bytes:
                raise ApiError(
                    400, "EntityTooLarge", "Your proposed upload exceeds the maximum allowed size."
                )
        content_type = (
            fields.get("x-oss-content-type")
            or part.headers.get("Content-Type")
            or "application/octet-stream"
        )
        model = next(
            (
                c["x-dashscope-model"]
                for c in conditions
                if isinstance(c, dict) and "x-dashscope-model" in c
            ),
            None,
        )
        self.uploads[key] = StoredObject(
            key=key,
            data=data,
            created=self.clock.now(),
            content_type=content_type,
            model=model if isinstance(model, str) else None,
        )
        wanted = fields.get("success_action_status", "204")
        status = int(wanted) if wanted in ("200", "201", "204") else 204
        etag = '"' + hashlib.md5(data, usedforsecurity=False).hexdigest().upper() + '"'
        headers = {"ETag": etag, "x-oss-request-id": uuid.uuid4().hex[:24].upper()}
        if status == 201:
            xml = (
                '<?xml version="1.0" encoding="UTF-8"?>\n<PostResponse>'
                f"<Bucket>{_UPLOAD_BUCKET}</Bucket><Key>{key}</Key><ETag>{etag}</ETag>"
                "</PostResponse>"
            )
            return web.Response(
                text=xml, status=201, headers=headers, content_type="application/xml"
            )
        return web.Response(status=status, headers=headers)

    # ----------------------------------------------------------------- media

    def video(self, task: SimTask) -> bytes:
        """The current bytes of a task's video (cached for the few most recent)."""
        if self.real_videos is not None:
            return self.real_videos.get_sync(task)
        key = (task.task_id, task.media_generation)
        data = self._videos.get(key)
        if data is None:
            size = round(task.audio_duration * self.config.video_bytes_per_second)
            data = video_bytes(self.config.seed, task.task_id, task.media_generation, size)
            self._videos[key] = data
            while len(self._videos) > 32:
                self._videos.popitem(last=False)
        else:
            self._videos.move_to_end(key)
        return data

    def etag(self, task: SimTask) -> str:
        digest = hashlib.sha1(f"{task.task_id}:{task.media_generation}".encode()).hexdigest()
        return f'"{digest.upper()}"'

    async def media(self, request: web.Request) -> web.StreamResponse:
        match = _MEDIA_PATH.match(request.path)
        assert match is not None
        task_id = match["task_id"]
        query = request.query
        expires_raw, key_id, signature = (
            query.get("Expires"),
            query.get("OSSAccessKeyId"),
            query.get("Signature"),
        )
        if not expires_raw or not key_id or not signature:
            raise ApiError(403, "AccessDenied", "AccessDenied: the request is not signed.")
        try:
            expires = int(expires_raw)
        except ValueError:
            raise ApiError(403, "AccessDenied", "Invalid Expires.") from None
        if key_id != self._media_key_id or not hmac.compare_digest(
            signature, self._media_signature(task_id, expires)
        ):
            raise ApiError(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided.",
            )
        now = self.store.catch_up()
        task = self.store.raw(task_id)
        if time.time() > expires:
            raise ApiError(403, "AccessDenied", "Request has expired.")
        if task is None or task.status(now) != "SUCCEEDED":
            raise ApiError(404, "NoSuchKey", "The specified key does not exist.")
        ended = task.ended
        assert ended is not None
        if now >= ended + self.config.result_ttl:
            raise ApiError(403, "AccessDenied", "Request has expired.")
        ctx = _ctx(request)
        if self._roll(self.faults.etag_change_rate):
            task.media_generation += 1
            ctx.fault = "etag_change"
        if self.real_videos is not None:
            data = await self.real_videos.get(task)  # encoded in a worker thread
        else:
            data = self.video(task)
        etag = self.etag(task)
        last_modified = _dt.datetime.fromtimestamp(self.clock.wall(ended), _dt.UTC).strftime(
            "%a, %d %b %Y %H:%M:%S GMT"
        )
        headers = {
            "ETag": etag,
            "Last-Modified": last_modified,
            "Accept-Ranges": "bytes",
            "x-oss-request-id": uuid.uuid4().hex[:24].upper(),
        }
        total = len(data)
        status, start, stop = 200, 0, total
        range_header = request.headers.get("Range")
        if range_header is not None:
            if_range = request.headers.get("If-Range")
            honour = if_range is None or if_range.strip() in (etag, last_modified)
            if honour and self._roll(self.faults.ignore_range_rate):
                ctx.fault = "ignore_range"
                honour = False
            if honour:
                parsed = _parse_range(range_header, total)
                if isinstance(parsed, str):
                    headers["Content-Range"] = f"bytes */{total}"
                    ctx.bytes_sent = 0
                    return web.Response(status=416, headers=headers)
                if parsed is not None:
                    start, stop = parsed
                    status = 206
                    headers["Content-Range"] = f"bytes {start}-{stop - 1}/{total}"
        body = memoryview(data)[start:stop]
        if request.method != "HEAD" and body and self._roll(self.faults.truncate_rate):
            ctx.fault = "truncate"
            cut = self._fault_rng.randrange(0, len(body))
            response = web.StreamResponse(status=status, headers=headers)
            response.content_type = "video/mp4"
            response.content_length = len(body)
            await response.prepare(request)
            await _write_chunks(response, body[:cut], self.config.media_bandwidth)
            ctx.bytes_sent = cut
            if request.transport is not None:
                request.transport.close()
            return response
        ctx.bytes_sent = 0 if request.method == "HEAD" else len(body)
        if request.method == "HEAD" or (
            len(body) <= _MEDIA_CHUNK and self.config.media_bandwidth is None
        ):
            return web.Response(
                body=bytes(body), status=status, headers=headers, content_type="video/mp4"
            )
        # Big objects go out a chunk at a time, as an object store streams them: one giant
        # transport.write would copy the whole video into the transport's buffer first.
        response = web.StreamResponse(status=status, headers=headers)
        response.content_type = "video/mp4"
        response.content_length = len(body)
        await response.prepare(request)
        await _write_chunks(response, body, self.config.media_bandwidth)
        await response.write_eof()
        return response


async def _write_chunks(
    response: web.StreamResponse, body: memoryview, bandwidth: float | None
) -> None:
    chunk = _MEDIA_CHUNK if bandwidth is None else max(1, min(_MEDIA_CHUNK, int(bandwidth / 50)))
    start = time.monotonic()
    for offset in range(0, len(body), chunk):
        if bandwidth is not None:
            # Paced on the total so far, so sleep granularity does not add up.
            ahead = start + offset / bandwidth - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)
        await response.write(body[offset : offset + chunk])


def _policy_failed(condition: str) -> str:
    return f"Invalid according to Policy: Policy Condition failed: {condition}"


def _parse_range(header: str, total: int) -> tuple[int, int] | str | None:
    """(start, stop) of a single byte range, ``"unsatisfiable"``, or None (ignore the header)."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, sep, last = spec.strip().partition("-")
    if not sep:
        return None
    try:
        if first == "":
            suffix = int(last)
            if suffix <= 0:
                return "unsatisfiable"
            return (max(0, total - suffix), total)
        start = int(first)
        stop = total if last == "" else min(int(last) + 1, total)
    except ValueError:
        return None
    if start >= total or start < 0:
        return "unsatisfiable"
    if stop <= start:
        return None
    return (start, stop)


def _parse_list_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        moment = _dt.datetime.strptime(value, "%Y%m%d%H%M%S").replace(tzinfo=SERVER_TZ)
    except ValueError:
        raise ApiError.bad_parameter() from None
    return moment.timestamp()


SIM_KEY: Final = web.AppKey("emo_simulator", SimState)


def create_app(config: SimulatorConfig | None = None) -> web.Application:
    """The simulator as one aiohttp application serving the API, upload and media roles.

    Served on a single port, roles are told apart by path: ``/api/v1/...`` is the API,
    ``POST /`` the upload host and ``/results/...`` the media host. :class:`Simulator` serves
    the same application on three ports and tells the roles apart by the local port.

    Args:
        config: The simulated service (defaults to ``SimulatorConfig()``).

    Returns:
        The application; its state is ``app[SIM_KEY]``.
    """
    state = SimState(config or SimulatorConfig())
    app = web.Application(middlewares=[state.middleware], client_max_size=8 * 1024 * 1024)
    app[SIM_KEY] = state

    async def resolver_ctx(_app: web.Application) -> AsyncIterator[None]:
        await state.resolver.start()
        yield
        await state.resolver.aclose()

    app.cleanup_ctx.append(resolver_ctx)
    api = API_PREFIX
    router = app.router
    router.add_post(f"{api}/services/aigc/image2video/face-detect", state.detect)
    router.add_post(f"{api}/services/aigc/image2video/video-synthesis", state.submit)
    router.add_post(f"{api}/services/aigc/image2video/video-synthesis/", state.submit)
    router.add_get(f"{api}/tasks", state.task_list)
    router.add_get(f"{api}/tasks/", state.task_list)
    router.add_get(f"{api}/tasks/{{task_id}}", state.task_get)
    router.add_post(f"{api}/tasks/{{task_id}}/cancel", state.task_cancel)
    router.add_get(f"{api}/uploads", state.get_policy)
    return app
