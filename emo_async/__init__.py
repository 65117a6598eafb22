"""emo_async: an asyncio-native SDK for Alibaba DashScope's EMO talking-portrait models.

Validate locally, upload, detect once per portrait, submit under explicit limits, poll every
task through one shared poller, download before the URL expires, and journal every step so a
crashed batch resumes without paying twice.
"""

from ._batch import BatchEvent, BatchPolicy, BatchRun, BatchStats, EventKind, ReconcilePolicy
from ._batch._shared import open_shared_batch
from ._client import Client, ClientStatistics
from ._config import (
    DEFAULT_BASE_URL,
    DEFAULT_DOWNLOAD_TIMEOUTS,
    DEFAULT_LIMITS,
    DEFAULT_POLL_POLICY,
    DEFAULT_RETRY_POLICY,
    DEFAULT_TIMEOUTS,
    Limits,
    PollPolicy,
    RetryPolicy,
    Timeouts,
)
from ._download import DownloadResult, url_deadline
from ._exceptions import (
    AccessDeniedError,
    AmbiguousSubmitError,
    APIError,
    AuthenticationError,
    ClientClosedError,
    DataInspectionFailedError,
    DetectionRejectedError,
    DownloadError,
    EmoError,
    InputError,
    InternalServerError,
    InvalidApiKeyError,
    InvalidFileBodyProportionError,
    InvalidFileContentError,
    InvalidFileError,
    InvalidFilePoseError,
    InvalidFileResolutionError,
    InvalidFileValueError,
    InvalidParameterError,
    InvalidRequestError,
    InvalidURLError,
    JobCancelledError,
    JobError,
    JobFailedError,
    JournalCorruptError,
    JournalError,
    JournalLockedError,
    ModelUnavailableError,
    NotFoundError,
    Problem,
    QuotaExhaustedError,
    RateLimitError,
    RequestTimeoutError,
    ResultExpiredError,
    ServerError,
    TransportError,
    UnknownTaskStatusError,
    UnresolvedSubmitError,
    UnsupportedOperationError,
    WorkspaceAccessDeniedError,
    WorkspaceError,
    WorkspaceNotFoundError,
)
from ._journal import JobPhase, Journal, JournalSummary, open_journal, read_summary
from ._media import Estimate, ValidatedJob, estimate, validate_job
from ._models import (
    Detection,
    ErrorInfo,
    Job,
    Outcome,
    OutcomeState,
    Task,
    TaskListItem,
    TaskStatus,
)
from ._pg import PostgresUnavailable, is_dsn, redact_dsn
from ._pg._account import SharedAccount
from ._samples import make_sample_set
from ._version import __version__

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_DOWNLOAD_TIMEOUTS",
    "DEFAULT_LIMITS",
    "DEFAULT_POLL_POLICY",
    "DEFAULT_RETRY_POLICY",
    "DEFAULT_TIMEOUTS",
    "APIError",
    "AccessDeniedError",
    "AmbiguousSubmitError",
    "AuthenticationError",
    "BatchEvent",
    "BatchPolicy",
    "BatchRun",
    "BatchStats",
    "Client",
    "ClientClosedError",
    "ClientStatistics",
    "DataInspectionFailedError",
    "Detection",
    "DetectionRejectedError",
    "DownloadError",
    "DownloadResult",
    "EmoError",
    "ErrorInfo",
    "Estimate",
    "EventKind",
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
    "Job",
    "JobCancelledError",
    "JobError",
    "JobFailedError",
    "JobPhase",
    "Journal",
    "JournalCorruptError",
    "JournalError",
    "JournalLockedError",
    "JournalSummary",
    "Limits",
    "ModelUnavailableError",
    "NotFoundError",
    "Outcome",
    "OutcomeState",
    "PollPolicy",
    "PostgresUnavailable",
    "Problem",
    "QuotaExhaustedError",
    "RateLimitError",
    "ReconcilePolicy",
    "RequestTimeoutError",
    "ResultExpiredError",
    "RetryPolicy",
    "ServerError",
    "SharedAccount",
    "Task",
    "TaskListItem",
    "TaskStatus",
    "Timeouts",
    "TransportError",
    "UnknownTaskStatusError",
    "UnresolvedSubmitError",
    "UnsupportedOperationError",
    "ValidatedJob",
    "WorkspaceAccessDeniedError",
    "WorkspaceError",
    "WorkspaceNotFoundError",
    "__version__",
    "estimate",
    "is_dsn",
    "make_sample_set",
    "open_journal",
    "open_shared_batch",
    "read_summary",
    "redact_dsn",
    "url_deadline",
    "validate_job",
]


def _fix_module_names() -> None:
    # Public objects report ``emo_async`` as their module (as anyio and httpx do).
    g = globals()
    for name in __all__:
        obj = g.get(name)
        if isinstance(obj, type) and obj.__module__.startswith("emo_async._"):
            obj.__module__ = "emo_async"


_fix_module_names()
