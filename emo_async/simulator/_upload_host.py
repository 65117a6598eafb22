"""The OSS-like upload host: the form POST that getPolicy's signed policy allows."""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import hmac
import json
import uuid
from typing import Final

from aiohttp import BodyPartReader, web

from ._core import SimState, hmac_b64
from ._errors import ApiError
from ._state import StoredObject

__all__ = ["UPLOAD_BUCKET", "UploadHost"]

UPLOAD_BUCKET: Final = "dashscope-file-sim"
_OSS_FIELDS: Final = (
    "ossaccesskeyid",
    "signature",
    "policy",
    "key",
    "x-oss-object-acl",
    "x-oss-forbid-overwrite",
)


class UploadHost:
    """Answers every request of the upload listener (``POST /`` with a multipart form)."""

    def __init__(self, state: SimState) -> None:
        self._state = state

    async def upload(self, request: web.Request) -> web.StreamResponse:
        """Store the form's file as a temporary upload (``oss://<key>``)."""
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
        if fields["ossaccesskeyid"] != self._state.upload_key_id:
            raise ApiError(
                403,
                "InvalidAccessKeyId",
                "The OSS Access Key Id you provided does not exist in our records.",
            )
        policy = fields["policy"]
        if not hmac.compare_digest(
            fields["signature"], hmac_b64(self._state.upload_secret, policy)
        ):
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
        if self._state.clock.wall() > expiration.replace(tzinfo=_dt.UTC).timestamp():
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
        if self._state.upload_bytes(key) is not None:
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
        self._state.uploads[key] = StoredObject(
            key=key,
            data=data,
            created=self._state.clock.now(),
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
                f"<Bucket>{UPLOAD_BUCKET}</Bucket><Key>{key}</Key><ETag>{etag}</ETag>"
                "</PostResponse>"
            )
            return web.Response(
                text=xml, status=201, headers=headers, content_type="application/xml"
            )
        return web.Response(status=status, headers=headers)


def _policy_failed(condition: str) -> str:
    return f"Invalid according to Policy: Policy Condition failed: {condition}"
