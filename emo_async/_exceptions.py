"""The error tree of emo_async.

"No answer", "an error answer" and "the job did not work out" are different things::

    EmoError
    ├── APIError (.status .code .message .request_id): the server answered with an error
    │   ├── AuthenticationError (401/403)
    │   │   ├── InvalidApiKeyError                  InvalidApiKey
    │   │   └── AccessDeniedError                   AccessDenied*
    │   │       └── WorkspaceAccessDeniedError *    Workspace.AccessDenied
    │   ├── InvalidRequestError (400, 413, 415)
    │   │   ├── InvalidParameterError               InvalidParameter, BadRequest.*
    │   │   ├── InvalidURLError                     InvalidURL
    │   │   ├── InvalidFileError                    InvalidFile.*
    │   │   │   ├── InvalidFileContentError         InvalidFile.Content
    │   │   │   ├── InvalidFileResolutionError      InvalidFile.Resolution
    │   │   │   ├── InvalidFileBodyProportionError  InvalidFile.BodyProportion
    │   │   │   ├── InvalidFileValueError           InvalidFile.Value
    │   │   │   └── InvalidFilePoseError            InvalidFile.FrontBody/FullFace/FacePose
    │   │   ├── DataInspectionFailedError           DataInspectionFailed
    │   │   └── UnsupportedOperationError           UnsupportedOperation
    │   ├── NotFoundError (404)                     ModelNotFound
    │   │   └── WorkspaceNotFoundError *            WorkSpaceNotFound
    │   ├── RateLimitError (.retry_after)           Throttling, Throttling.RateQuota
    │   ├── QuotaExhaustedError (never retried)     Throttling.AllocationQuota, *BillOverdue
    │   └── ServerError (5xx, 408)
    │       ├── InternalServerError                 InternalError*, SystemError
    │       └── ModelUnavailableError               ModelUnavailable
    ├── TransportError: no (complete) answer
    │   ├── RequestTimeoutError (also TimeoutError)
    │   └── AmbiguousSubmitError: a billed POST may have created a task
    ├── InputError (also ValueError; .problems): local validation, before any spend
    ├── DetectionRejectedError (.detection): emo-detect-v1 said check_pass=false
    ├── JobError (.job)
    │   ├── JobFailedError (.task): the task ended FAILED or UNKNOWN
    │   │   └── UnknownTaskStatusError: it kept answering a status nobody documented
    │   ├── JobCancelledError
    │   ├── ResultExpiredError: the video URL ran out before the download
    │   └── UnresolvedSubmitError (.candidates): an answer was lost and nothing proves
    │       whether a task exists; never resent, candidates' videos kept
    ├── DownloadError: short read, size or checksum mismatch
    ├── JournalError
    │   ├── JournalLockedError: another process runs this journal
    │   └── JournalCorruptError: not a journal, or damaged
    └── ClientClosedError (also RuntimeError): a closed client was used

    * also a WorkspaceError (an APIError): ``except WorkspaceError`` catches both.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable, Mapping
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from ._models import Detection, Job, Task

__all__ = [
    "APIError",
    "AccessDeniedError",
    "AmbiguousSubmitError",
    "AuthenticationError",
    "ClientClosedError",
    "DataInspectionFailedError",
    "DetectionRejectedError",
    "DownloadError",
    "EmoError",
    "InputError",
    "InternalServerError",
    "InvalidApiKeyError",
    "InvalidFileBodyProportionError",
    "InvalidFileContentError",
    "InvalidFileError",
    "InvalidFilePoseError",
    "InvalidFileResolutionError",
    "InvalidFileValueError",
    "InvalidParameterError",
    "InvalidRequestError",
    "InvalidURLError",
    "JobCancelledError",
    "JobError",
    "JobFailedError",
    "JournalCorruptError",
    "JournalError",
    "JournalLockedError",
    "ModelUnavailableError",
    "NotFoundError",
    "Problem",
    "QuotaExhaustedError",
    "RateLimitError",
    "RequestTimeoutError",
    "ResultExpiredError",
    "ServerError",
    "TransportError",
    "UnknownTaskStatusError",
    "UnresolvedSubmitError",
    "UnsupportedOperationError",
    "WorkspaceAccessDeniedError",
    "WorkspaceError",
    "WorkspaceNotFoundError",
    "error_from_response",
    "parse_retry_after",
]


class EmoError(Exception):
    """Root of every error raised by emo_async."""


# --------------------------------------------------------------------------------------------
# The server answered with an error.


class APIError(EmoError):
    """The API answered with an error.

    Attributes:
        status: HTTP status (200 when a 200 body carried an error ``code``).
        code: DashScope's error code, e.g. ``"InvalidParameter"``.
        message: DashScope's message.
        request_id: The request id DashScope assigned; quote it to support.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id

    def __str__(self) -> str:
        parts = [f"{self.status}"]
        if self.code:
            parts.append(self.code)
        text = " ".join(parts) + f": {self.message}"
        if self.request_id:
            text += f" (request_id={self.request_id})"
        return text

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, "
            f"message={self.message!r}, request_id={self.request_id!r})"
        )

    @property
    def retryable(self) -> bool:
        """Whether the same request may succeed if sent again later."""
        return False


class AuthenticationError(APIError):
    """The API key was refused (401) or lacks access (403)."""


class InvalidApiKeyError(AuthenticationError):
    """``InvalidApiKey``: the key is wrong, revoked, or for another region."""


class AccessDeniedError(AuthenticationError):
    """``AccessDenied*``: the key may not use this model or workspace."""


class WorkspaceError(APIError):
    """The workspace the request names (``X-DashScope-WorkSpace``), or fails to name, is
    wrong for this key: check ``Client(workspace=...)`` / ``DASHSCOPE_WORKSPACE``."""


class WorkspaceAccessDeniedError(AccessDeniedError, WorkspaceError):
    """403 ``Workspace.AccessDenied``: the key may not use the workspace the request falls in
    (a workspace key sent without its workspace gets this)."""


class InvalidRequestError(APIError):
    """The request itself is wrong (400-class); sending it again will not help."""


class InvalidParameterError(InvalidRequestError):
    """``InvalidParameter`` (or ``BadRequest.*``): a missing or malformed field."""


class InvalidURLError(InvalidRequestError):
    """``InvalidURL``: an input URL could not be fetched or holds an unsupported file."""


class InvalidFileError(InvalidRequestError):
    """``InvalidFile.*``: the input file was fetched but is not acceptable."""


class InvalidFileContentError(InvalidFileError):
    """``InvalidFile.Content``: no person, or several people, in the image."""


class InvalidFileResolutionError(InvalidFileError):
    """``InvalidFile.Resolution``: image sides outside 400..7000 px."""


class InvalidFileBodyProportionError(InvalidFileError):
    """``InvalidFile.BodyProportion``: the person is too large or too small in the frame."""


class InvalidFileValueError(InvalidFileError):
    """``InvalidFile.Value``: the image is too dark or unclear."""


class InvalidFilePoseError(InvalidFileError):
    """``InvalidFile.FrontBody`` / ``FullFace`` / ``FacePose``: pose not usable."""


class DataInspectionFailedError(InvalidRequestError):
    """``DataInspectionFailed``: content moderation refused an input."""


class UnsupportedOperationError(InvalidRequestError):
    """``UnsupportedOperation``: e.g. cancelling a task that is no longer PENDING."""


class NotFoundError(APIError):
    """404: the model, workspace or resource does not exist."""


class WorkspaceNotFoundError(NotFoundError, WorkspaceError):
    """404 ``WorkSpaceNotFound``: no workspace of this account has that id."""


class RateLimitError(APIError):
    """429 rate limiting (``Throttling``, ``Throttling.RateQuota``): retry later.

    Attributes:
        retry_after: Seconds the server asked to wait, when it said.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status=status, code=code, request_id=request_id)
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return True


class QuotaExhaustedError(APIError):
    """Quota used up or account in arrears: waiting a few seconds will not help."""


class ServerError(APIError):
    """5xx (or 408): the server failed; the same request may work later."""

    @property
    def retryable(self) -> bool:
        return True


class InternalServerError(ServerError):
    """``InternalError*`` / ``SystemError`` / ``ModelServiceFailed``."""


class ModelUnavailableError(ServerError):
    """503 ``ModelUnavailable``."""


_CODE_CLASSES: dict[str, type[APIError]] = {
    "InvalidApiKey": InvalidApiKeyError,
    "AccessDenied": AccessDeniedError,
    "AccessDenied.Unpurchased": AccessDeniedError,
    "Workspace.AccessDenied": WorkspaceAccessDeniedError,
    "Model.AccessDenied": AccessDeniedError,
    "InvalidParameter": InvalidParameterError,
    "BadRequest.EmptyInput": InvalidParameterError,
    "BadRequest.EmptyParameters": InvalidParameterError,
    "BadRequest.EmptyModel": InvalidParameterError,
    "BadRequest.TooLarge": InvalidParameterError,
    "BadRequest.InputDownloadFailed": InvalidURLError,
    "BadRequest.UnsupportedFileFormat": InvalidURLError,
    "InvalidURL": InvalidURLError,
    "InvalidFile.Content": InvalidFileContentError,
    "InvalidFile.Resolution": InvalidFileResolutionError,
    "InvalidFile.BodyProportion": InvalidFileBodyProportionError,
    "InvalidFile.Value": InvalidFileValueError,
    "InvalidFile.FrontBody": InvalidFilePoseError,
    "InvalidFile.FullFace": InvalidFilePoseError,
    "InvalidFile.FacePose": InvalidFilePoseError,
    "DataInspectionFailed": DataInspectionFailedError,
    "UnsupportedOperation": UnsupportedOperationError,
    "ModelNotFound": NotFoundError,
    "WorkSpaceNotFound": WorkspaceNotFoundError,
    # The table's spelling is "WorkSpace"; take the other one too rather than fall back to a
    # bare 404 (inferred: the gateway's spelling was not observed).
    "WorkspaceNotFound": WorkspaceNotFoundError,
    "Throttling": RateLimitError,
    "Throttling.RateQuota": RateLimitError,
    "LimitRequests": RateLimitError,
    "Throttling.AllocationQuota": QuotaExhaustedError,
    "AllocationQuota.FreeTierOnly": QuotaExhaustedError,
    "Arrearage": QuotaExhaustedError,
    "PrepaidBillOverdue": QuotaExhaustedError,
    "PostpaidBillOverdue": QuotaExhaustedError,
    "CommodityNotPurchased": QuotaExhaustedError,
    "InternalError": InternalServerError,
    "InternalError.Algo": InternalServerError,
    "InternalError.Timeout": InternalServerError,
    "SystemError": InternalServerError,
    "ModelServiceFailed": InternalServerError,
    "ModelUnavailable": ModelUnavailableError,
    "RequestTimeOut": ServerError,
}


def _class_for(status: int, code: str | None) -> type[APIError]:
    if code:
        if code in _CODE_CLASSES:
            return _CODE_CLASSES[code]
        prefix = code.split(".", 1)[0]
        if prefix == "InvalidFile":
            return InvalidFileError
        if prefix == "InternalError":
            return InternalServerError
        if prefix == "Throttling":
            return RateLimitError
        if code.endswith("BillOverdue"):
            return QuotaExhaustedError
    if status == 401 or status == 403:
        return AuthenticationError
    if status == 404:
        return NotFoundError
    if status == 429:
        return RateLimitError
    if status == 408 or status >= 500:
        return ServerError
    if 400 <= status < 500:
        return InvalidRequestError
    return APIError


def parse_retry_after(
    headers: Mapping[str, str], *, now: _dt.datetime | None = None
) -> float | None:
    """Read ``retry-after-ms``, then ``Retry-After`` (seconds or an HTTP date), in seconds."""
    lowered = {k.lower(): val for k, val in headers.items()}
    raw_ms = lowered.get("retry-after-ms")
    if raw_ms is not None:
        try:
            return max(0.0, float(raw_ms) / 1000.0)
        except ValueError:
            pass
    raw = lowered.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.UTC)
    now = now or _dt.datetime.now(_dt.UTC)
    return max(0.0, (when - now).total_seconds())


def error_from_response(
    status: int,
    body: Mapping[str, Any] | None,
    headers: Mapping[str, str] | None = None,
    *,
    request_id: str | None = None,
) -> APIError:
    """Build the most specific :class:`APIError` for an error answer."""
    body = body or {}
    code = body.get("code")
    message = body.get("message") or body.get("msg") or ""
    rid = body.get("request_id") or request_id
    code_s = str(code) if code not in (None, "") else None
    cls = _class_for(status, code_s)
    if not message:
        message = f"HTTP {status}"
    if issubclass(cls, RateLimitError):
        return cls(
            str(message),
            status=status,
            code=code_s,
            request_id=rid,
            retry_after=parse_retry_after(headers or {}),
        )
    return cls(str(message), status=status, code=code_s, request_id=rid)


# --------------------------------------------------------------------------------------------
# No (complete) answer.


class TransportError(EmoError):
    """The request got no complete answer: connection refused or reset, DNS, TLS, timeout."""


class RequestTimeoutError(TransportError, TimeoutError):
    """A connect, read or total timeout expired."""


class AmbiguousSubmitError(TransportError):
    """A billed submit was sent but no answer came back: a task may or may not exist.

    emo_async never resends such a request blindly. The batch runner reconciles it through the
    task list (the submit's time window is on this error); direct callers can do the same with
    :meth:`Client.find_submitted_tasks` or decide for themselves.

    Attributes:
        sent_at: Wall-clock time (UTC) just before the request was sent.
        failed_at: Wall-clock time (UTC) when the failure was seen.
    """

    def __init__(self, message: str, *, sent_at: _dt.datetime, failed_at: _dt.datetime) -> None:
        super().__init__(message)
        self.sent_at = sent_at
        self.failed_at = failed_at


# --------------------------------------------------------------------------------------------
# Local problems, found before anything is spent.


@attrs.frozen
class Problem:
    """One thing wrong with a job's input.

    Attributes:
        field: ``"image"``, ``"audio"``, ``"face_bbox"``, ``"ext_bbox"``, ``"style_level"``, ...
        message: What is wrong, in words.
        limit: The documented limit it breaks, when there is one (e.g. ``"< 60 s"``).
    """

    field: str
    message: str
    limit: str | None = None

    def __str__(self) -> str:
        text = f"{self.field}: {self.message}"
        if self.limit:
            text += f" (limit: {self.limit})"
        return text


class InputError(EmoError, ValueError):
    """A job's input breaks the documented limits; nothing was sent or billed.

    Attributes:
        problems: Every problem found, not just the first.
        job_name: The job's name, when known.
    """

    def __init__(self, problems: Iterable[Problem], *, job_name: str | None = None) -> None:
        self.problems = tuple(problems)
        self.job_name = job_name
        head = f"job {job_name!r}: " if job_name else ""
        super().__init__(head + "; ".join(str(p) for p in self.problems))


class DetectionRejectedError(EmoError):
    """emo-detect-v1 answered ``check_pass: false``: the portrait cannot be animated.

    Attributes:
        detection: The detection answer, with the server's ``message``.
    """

    def __init__(self, detection: Detection) -> None:
        self.detection = detection
        super().__init__(f"portrait rejected by emo-detect-v1: {detection.message or 'no reason'}")


# --------------------------------------------------------------------------------------------
# A job that did not end with a video.


class JobError(EmoError):
    """A job did not produce a video.

    Attributes:
        job: The job, when known.
    """

    def __init__(self, message: str, *, job: Job | None = None) -> None:
        super().__init__(message)
        self.job = job


class JobFailedError(JobError):
    """The task ended FAILED (or UNKNOWN); ``code`` and ``message`` are the server's."""

    def __init__(self, task: Task, *, job: Job | None = None) -> None:
        self.task = task
        self.code = task.code
        self.message = task.message
        what = f"{task.code}: {task.message}" if task.code else (task.message or "no reason")
        super().__init__(f"task {task.task_id} ended {task.status.value}: {what}", job=job)


class UnknownTaskStatusError(JobFailedError):
    """The task kept answering a status the documents do not list (``task.status``, e.g.
    ``succeeded`` or ``WARMING``) for longer than ``PollPolicy.unknown_status_timeout``.

    Nothing says the task failed: it was given up on. It may still finish (and bill); a batch
    keeps it in its journal, so a later run looks at it again.

    Attributes:
        waited: Seconds since it first answered that status.
    """

    def __init__(self, task: Task, *, waited: float, job: Job | None = None) -> None:
        super().__init__(task, job=job)
        self.waited = waited
        self.args = (
            f"task {task.task_id} answered the undocumented status {task.status.value!r} for"
            f" {waited:.0f} s; no longer waiting for it (it may still finish)",
        )


class JobCancelledError(JobError):
    """The task was cancelled before it ran."""


class ResultExpiredError(JobError):
    """The task's video URL expired before the video was saved (the money is spent)."""


class UnresolvedSubmitError(JobError):
    """A submit's answer was lost, and the task list proves neither that a task of this job
    exists nor that none does. The job is not resent (that could bill twice); a later run tries
    again to settle it, and ``emo-async resolve`` settles it by hand.

    Attributes:
        reason: Why it could not be settled.
        candidates: Task ids that may be this job's (their videos are kept in
            ``<out>/.unattributed/``).
    """

    def __init__(
        self, reason: str, *, candidates: Iterable[str] = (), job: Job | None = None
    ) -> None:
        self.reason = reason
        self.candidates = tuple(candidates)
        text = f"the submit's answer was lost and could not be settled: {reason}"
        if self.candidates:
            text += f"; candidate tasks: {', '.join(self.candidates)}"
        super().__init__(text, job=job)


class DownloadError(EmoError):
    """A download did not produce a complete, verified file."""


# --------------------------------------------------------------------------------------------
# The journal.


class JournalError(EmoError):
    """The batch journal cannot be used."""


class JournalLockedError(JournalError):
    """Another process is running a batch on this journal."""


class JournalCorruptError(JournalError):
    """The file is not an emo_async journal, or it is damaged."""


class ClientClosedError(EmoError, RuntimeError):
    """The client was used outside its ``async with`` block, or after ``aclose()``."""
