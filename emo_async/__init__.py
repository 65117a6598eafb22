"""emo_async: an asyncio-native SDK for Alibaba DashScope's EMO talking-portrait models."""

from ._config import (
    DEFAULT_BASE_URL,
    DEFAULT_LIMITS,
    DEFAULT_POLL_POLICY,
    DEFAULT_RETRY_POLICY,
    DEFAULT_TIMEOUTS,
    Limits,
    PollPolicy,
    RetryPolicy,
    Timeouts,
)
from ._exceptions import *  # noqa: F403
from ._exceptions import __all__ as _exc_all
from ._models import (
    Detection,
    ErrorInfo,
    Job,
    Outcome,
    OutcomeState,
    Task,
    TaskStatus,
)
from ._version import __version__

__all__ = sorted(
    [
        "DEFAULT_BASE_URL",
        "DEFAULT_LIMITS",
        "DEFAULT_POLL_POLICY",
        "DEFAULT_RETRY_POLICY",
        "DEFAULT_TIMEOUTS",
        "Detection",
        "ErrorInfo",
        "Job",
        "Limits",
        "Outcome",
        "OutcomeState",
        "PollPolicy",
        "RetryPolicy",
        "Task",
        "TaskStatus",
        "Timeouts",
        "__version__",
        *[n for n in _exc_all if n not in ("error_from_response", "parse_retry_after")],
    ]
)


def _fix_module_names() -> None:
    # Public objects report ``emo_async`` as their module (as anyio and httpx do).
    for name in __all__:
        obj = globals().get(name)
        if isinstance(obj, type) and obj.__module__.startswith("emo_async._"):
            obj.__module__ = "emo_async"


_fix_module_names()
