"""The API host: face-detect, the async submit, task get/list/cancel and getPolicy."""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import math
import uuid
from typing import Any, Final
from urllib.parse import quote

from aiohttp import web

from ._clock import SERVER_TZ, format_server_time
from ._core import (
    TERMINAL,
    SimState,
    api_key_id,
    drop,
    hmac_b64,
    json_response,
    request_ctx,
    rid,
)
from ._errors import CONTENT_ERRORS, ApiError, Msg
from ._inputs import OSS_HEADER
from ._ledger import TaskInputs
from ._media import AudioInfo, ImageInfo, expand_box
from ._media_host import media_signature
from ._state import SimTask
from ._upload_host import UPLOAD_BUCKET

__all__ = ["ApiHost"]

STYLE_LEVELS: Final = frozenset({"normal", "calm", "active"})


class ApiHost:
    """The handlers of ``/api/v1``, routed by aiohttp."""

    def __init__(self, state: SimState) -> None:
        self._state = state

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError):
            raise ApiError.bad_parameter() from None
        if not isinstance(body, dict):
            raise ApiError.bad_parameter()
        return body

    def _api_key_id(self, request: web.Request) -> str:
        return api_key_id(request.headers.get("Authorization", "").partition(" ")[2])

    # ------------------------------------------------------------------ inputs

    def _content_code(self, image: ImageInfo) -> str | None:
        trigger = image.trigger or self._state.config.content_rules.get(image.sha256)
        if trigger is None:
            return None
        if trigger not in CONTENT_ERRORS:
            # An unknown trigger is a test bug; answer the closest documented failure.
            return "InvalidFile.Content:none"
        return trigger

    async def _image(self, request: web.Request, url: object, model: str) -> ImageInfo:
        oss = request.headers.get(OSS_HEADER, "").lower() == "enable"
        if not self._state.config.validate_inputs:
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
        image = await self._state.resolver.image(url, oss_enabled=oss, model=model)
        if not image.resolution_ok:
            raise ApiError(400, "InvalidFile.Resolution", Msg.RESOLUTION)
        return image

    async def _audio(self, request: web.Request, url: object, model: str) -> AudioInfo:
        oss = request.headers.get(OSS_HEADER, "").lower() == "enable"
        if not self._state.config.validate_inputs:
            if not isinstance(url, str) or not url.strip():
                raise ApiError.invalid_url(Msg.MISSING_URL)
            digest = hashlib.sha256(url.encode()).hexdigest()
            return AudioInfo(format="wav", duration=10.0, sha256=digest, size=0)
        return await self._state.resolver.audio(url, oss_enabled=oss, model=model)

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
        return json_response({"output": output, "usage": {"image_count": 1}, "request_id": rid()})

    async def submit(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("X-DashScope-Async", "").strip().lower() != "enable":
            raise ApiError(403, "AccessDenied", Msg.SYNC_UNSUPPORTED)
        body = await self._body(request)
        if self._state.roll(self._state.faults.lost_before_submit_rate):
            # The request arrived whole, but no task is created and no answer comes back.
            return drop(request, "lost")
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
        if self._state.config.validate_inputs and (
            ext[2] > image.width
            or ext[3] > image.height
            or face[2] > image.width
            or face[3] > image.height
        ):
            raise ApiError.bad_parameter()
        code = self._content_code(image)
        failure = CONTENT_ERRORS[code] if code is not None else None

        state = self._state
        task = state.create_task(
            inputs=TaskInputs(
                image_url=inputs["image_url"],
                audio_url=inputs["audio_url"],
                audio_duration=audio.duration,
                api_key_id=self._api_key_id(request),
                image_sha256=image.sha256,
                audio_sha256=audio.sha256,
                face_bbox=face,
                ext_bbox=ext,
                style_level=style,
            ),
            model=model,
            ratio=ratio,
            failure=failure,
            request_id=rid(),
        )
        if state.real_videos is not None:
            await state.real_videos.remember(
                task.task_id,
                image_url=inputs["image_url"],
                audio_url=inputs["audio_url"],
                face_bbox=face,
                ext_bbox=ext,
                ratio=ratio,
                audio_duration=audio.duration,
            )
        if state.roll(state.faults.ambiguous_submit_rate):
            return drop(request, "ambiguous")
        answer: dict[str, Any] = {
            "output": {"task_id": task.task_id, "task_status": "PENDING"},
            "request_id": task.request_id,
        }
        if state.roll(state.faults.submit_code_rate):
            # Some gateways add a business code to a successful answer; it is not an error.
            request_ctx(request).fault = "submit_code"
            answer["code"] = state.faults.submit_code
            answer["message"] = "Success"
        return json_response(answer)

    def _video_url(self, task: SimTask, request: web.Request) -> str:
        ended = task.ended
        assert ended is not None
        if task.url_expires is None or task.url_clock_generation != self._state.clock.generation:
            task.url_expires = math.floor(
                self._state.clock.real_unix(ended + self._state.config.result_ttl)
            )
            task.url_clock_generation = self._state.clock.generation
        expires = task.url_expires
        signature = media_signature(self._state, task.task_id, expires)
        return (
            f"{self._state.origin('media', request)}/results/{task.task_id}.mp4"
            f"?Expires={expires}&OSSAccessKeyId={self._state.media_key_id}"
            f"&Signature={quote(signature, safe='')}"
        )

    def _task_body(self, task: SimTask, now: float, request: web.Request) -> dict[str, Any]:
        status = task.status(now)
        output: dict[str, Any] = {
            "task_id": task.task_id,
            "task_status": status,
            "submit_time": format_server_time(self._state.clock.wall(task.created)),
        }
        if task.scheduled is not None and task.canceled_at is None:
            output["scheduled_time"] = format_server_time(self._state.clock.wall(task.scheduled))
        body: dict[str, Any] = {"request_id": rid(), "output": output}
        if status in TERMINAL:
            ended = task.ended
            assert ended is not None
            output["end_time"] = format_server_time(self._state.clock.wall(ended))
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
        now = self._state.store.catch_up()
        task = self._state.store.get(task_id, now)
        if task is None:
            return json_response(
                {"request_id": rid(), "output": {"task_id": task_id, "task_status": "UNKNOWN"}}
            )
        return json_response(self._task_body(task, now, request))

    async def task_cancel(self, request: web.Request) -> web.StreamResponse:
        task_id = request.match_info["task_id"]
        now = self._state.store.catch_up()
        task = self._state.store.get(task_id, now)
        if task is None or task.status(now) != "PENDING":
            raise ApiError(400, "UnsupportedOperation", Msg.CANCEL_UNSUPPORTED)
        task.canceled_at = now
        return json_response(self._task_body(task, now, request))

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
        shift = self._state.faults.list_time_shift
        if shift:
            start = None if start is None else start + shift
            end = None if end is None else end + shift
        model_name = query.get("model_name")
        status = query.get("status")
        task_id = query.get("task_id")
        key_id = query.get("api_key_id")
        now = self._state.store.catch_up()
        matched: list[tuple[SimTask, str]] = []
        for task in self._state.store.newest_first(now):
            created = self._state.clock.wall(task.created)
            if start is not None and created < start:
                continue
            if end is not None and created > end:
                continue
            if model_name and task.model != model_name:
                continue
            if task_id and task.task_id != task_id:
                continue
            if key_id and task.api_key_id != key_id:
                continue
            task_status = task.status(now)
            if status and task_status != status:
                continue
            matched.append((task, task_status))
        total = len(matched)
        broken = self._state.faults.list_ignores_page_no
        # The broken list serves page 1 whatever was asked, yet echoes page_no.
        first = 0 if broken else (page_no - 1) * page_size
        page = matched[first : first + page_size]
        answer: dict[str, Any] = {
            "request_id": rid(),
            "data": [self._list_item(task, task_status) for task, task_status in page],
            "total": total,
            "total_page": math.ceil(total / page_size),
            "page_no": page_no,
            "page_size": page_size,
        }
        if broken:
            del answer["total_page"]
        return json_response(answer)

    def _list_item(self, task: SimTask, status: str) -> dict[str, Any]:
        def ms(sim_t: float) -> int:
            return round(self._state.clock.wall(sim_t) * 1000)

        item: dict[str, Any] = {
            "task_id": task.task_id,
            "status": status,
            "gmt_create": ms(task.created),
            "request_id": task.request_id,
            "model_name": task.model,
            "api_key_id": task.api_key_id,
            "region": "cn-beijing",
            "caller_parent_id": self._state.account,
            "caller_uid": self._state.account,
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
        now_wall = self._state.clock.wall()
        expiration = _dt.datetime.fromtimestamp(
            now_wall + self._state.clock.real_seconds(self._state.config.policy_ttl), _dt.UTC
        )
        day = _dt.datetime.fromtimestamp(now_wall, SERVER_TZ).strftime("%Y-%m-%d")
        upload_dir = f"dashscope-instant/{self._state.account}/{day}/{uuid.uuid4()}"
        max_bytes = self._state.config.max_file_size_mb * 1024 * 1024
        policy_doc = {
            "expiration": expiration.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
            "conditions": [
                {"bucket": UPLOAD_BUCKET},
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
            "signature": hmac_b64(self._state.upload_secret, policy),
            "upload_dir": upload_dir,
            "upload_host": self._state.origin("upload", request),
            "expire_in_seconds": max(
                1, round(self._state.clock.real_seconds(self._state.config.policy_ttl))
            ),
            "max_file_size_mb": self._state.config.max_file_size_mb,
            "capacity_limit_mb": self._state.config.capacity_limit_mb,
            "oss_access_key_id": self._state.upload_key_id,
            "x_oss_object_acl": "private",
            "x_oss_forbid_overwrite": "true",
        }
        return json_response({"request_id": rid(), "data": data})


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


def _parse_list_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        moment = _dt.datetime.strptime(value, "%Y%m%d%H%M%S").replace(tzinfo=SERVER_TZ)
    except ValueError:
        raise ApiError.bad_parameter() from None
    return moment.timestamp()
