"""Configuration records: timeouts, retries, rate limits and polling.

Every record is frozen; derive a variant with ``attrs.evolve(DEFAULT_TIMEOUTS, read=120)``.
``None`` means "off" wherever a field accepts it.
"""

from __future__ import annotations

import datetime as _dt
import random
from typing import Any, Final

import attrs
from attrs import validators as v

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_DOWNLOAD_TIMEOUTS",
    "DEFAULT_LIMITS",
    "DEFAULT_POLL_POLICY",
    "DEFAULT_RETRY_POLICY",
    "DEFAULT_TIMEOUTS",
    "DETECT_MODEL",
    "EMO_MODEL",
    "Limits",
    "PollPolicy",
    "RetryPolicy",
    "Timeouts",
]

#: The video model, and the detection model; a temporary upload is bound to one of them.
EMO_MODEL = "emo-v1"
DETECT_MODEL = "emo-detect-v1"
#: Most pages one read of the task list asks for (a list that pages forever is cut there).
DEFAULT_MAX_LIST_PAGES = 50

DEFAULT_BASE_URL = "https://dashscope.aliyuncs.com/api/v1"

# The protocol's lifetimes and names, in one place (internal: not exported).
#: A temporary upload (``oss://``) stays readable this long after it was made.
UPLOAD_VALIDITY: Final = _dt.timedelta(hours=48)
#: An upload is handed out again only while it stays valid at least this long: the job that
#: reuses it may still wait for detection and a submit slot before the model reads it.
UPLOAD_REUSE_MARGIN: Final = _dt.timedelta(hours=1)
#: A result video's URL works this long after its task ended (when the URL carries no expiry).
RESULT_URL_VALIDITY: Final = _dt.timedelta(hours=24)
#: The batch journal's file name inside the output directory.
JOURNAL_FILE_NAME: Final = ".emo-journal.sqlite3"
#: The header that selects a workspace (Model Studio 百炼 "业务空间") on API requests.
WORKSPACE_HEADER: Final = "X-DashScope-WorkSpace"

_pos: Any = v.gt(0)
_nonneg: Any = v.ge(0)
_opt_pos: Any = v.optional(v.gt(0))
_ge1: Any = v.ge(1)
_unit: Any = [v.gt(0), v.le(1)]
_page: Any = [v.ge(1), v.le(1000)]


@attrs.frozen(kw_only=True)
class Timeouts:
    """Per-phase timeouts, in seconds.

    Attributes:
        connect: Establishing a connection (including waiting for a pooled one).
        read: The gap allowed between two reads of a response.
        total: A whole API request, body included; ``None`` disables it. Downloads never use a
            total: a big video on a slow link is not an error.
    """

    connect: float = attrs.field(default=10.0, validator=_pos)
    read: float = attrs.field(default=60.0, validator=_pos)
    total: float | None = attrs.field(default=120.0, validator=_opt_pos)


DEFAULT_TIMEOUTS = Timeouts()
DEFAULT_DOWNLOAD_TIMEOUTS = Timeouts(connect=15.0, read=60.0, total=None)


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """How failed requests are retried (knob names follow stamina).

    The wait before retry ``n`` (0-based) is drawn uniformly from
    ``[0, min(wait_max, wait_initial * wait_exp_base**n)]`` ("full jitter") unless the server
    asks for a longer one through ``Retry-After`` (see :meth:`backoff`). An API request does
    not wait for a ``Retry-After`` beyond ``retry_after_max``: the error is raised instead; a
    download waits ``retry_after_max``.

    A retry budget (gRPC's retry throttling) stops retries from amplifying an outage: every
    retry spends one token, every success earns ``budget_refill`` tokens, and retries are
    allowed only while more than half of ``budget_tokens`` remain.

    Attributes:
        attempts: Total tries per request, the first one included; 1 disables retries.
        timeout: Give up retrying once this many seconds have passed since the first try;
            ``None`` for no limit.
        wait_initial: Base of the exponential backoff, seconds.
        wait_max: Ceiling of one backoff wait, seconds.
        wait_jitter: ``True`` for full jitter; ``False`` waits the exponential value exactly.
        wait_exp_base: Growth factor of the backoff.
        retry_after_max: Longest ``Retry-After`` honoured, seconds.
        budget_tokens: Size of the retry budget; ``None`` disables the budget.
        budget_refill: Tokens earned back by each successful request.
    """

    attempts: int = attrs.field(default=8, validator=_ge1)
    timeout: float | None = attrs.field(default=300.0, validator=_opt_pos)
    wait_initial: float = attrs.field(default=0.5, validator=_nonneg)
    wait_max: float = attrs.field(default=20.0, validator=_nonneg)
    wait_jitter: bool = True
    wait_exp_base: float = attrs.field(default=2.0, validator=_ge1)
    retry_after_max: float = attrs.field(default=120.0, validator=_nonneg)
    budget_tokens: float | None = attrs.field(default=20.0, validator=_opt_pos)
    budget_refill: float = attrs.field(default=0.2, validator=_nonneg)

    def backoff(
        self, attempt: int, *, retry_after: float | None = None, floor: float = 0.0
    ) -> float:
        """The wait, in seconds, before retry number ``attempt`` (0 before the first retry).

        Full jitter: uniform in ``[floor * c, c]`` with ``c = min(wait_max, wait_initial *
        wait_exp_base**attempt)`` (``floor`` 0 by default; 0.5 gives "equal jitter", for
        callers that must not retry at once), or ``c`` itself when ``wait_jitter`` is off. A
        ``Retry-After`` (seconds) is a minimum: the wait is at least ``min(retry_after,
        retry_after_max)``. Whether a ``Retry-After`` beyond ``retry_after_max`` is waited for
        (capped) or the error is raised instead is the caller's decision.
        """
        try:
            ceiling = min(self.wait_max, self.wait_initial * self.wait_exp_base ** max(0, attempt))
        except OverflowError:  # a very late attempt: the ceiling is wait_max
            ceiling = self.wait_max
        wait = random.uniform(floor * ceiling, ceiling) if self.wait_jitter else ceiling
        if retry_after is not None:
            wait = max(wait, min(max(0.0, retry_after), self.retry_after_max))
        return wait


DEFAULT_RETRY_POLICY = RetryPolicy()


@attrs.frozen(kw_only=True)
class Limits:
    """Client-side request rates (per second) and pool sizes.

    The rates default to DashScope's documented account limits minus headroom (other tools may
    share the account): task queries 20 QPS, detection 5 QPS, upload policy 100 QPS. The
    emo-v1 submit rate is not documented; 2 QPS is a cautious default. Every coroutine of one
    ``Client`` shares these limiters, and each adapts: a 429 lowers its rate, successes raise
    it back towards the configured value.

    Attributes:
        task_qps: ``GET /tasks/{id}`` and ``GET /tasks`` together.
        detect_qps: emo-detect-v1 calls.
        submit_qps: emo-v1 submits (billed).
        policy_qps: upload-policy requests.
        cancel_qps: task cancels.
        list_qps: ``GET /tasks`` pages (the task list's own limit is not documented).
        list_shares_task_qps: Whether list pages also count against ``task_qps`` (the safe
            default while DashScope does not say). Set it to ``False`` when the account's list
            has a budget of its own: the poller's sweeps then leave every task query to the
            tasks themselves.
        max_connections: Size of the API connection pool.
        max_uploads: Uploads in flight at once.
        max_downloads: Downloads in flight at once.
    """

    task_qps: float = attrs.field(default=15.0, validator=_pos)
    detect_qps: float = attrs.field(default=4.0, validator=_pos)
    submit_qps: float = attrs.field(default=2.0, validator=_pos)
    policy_qps: float = attrs.field(default=50.0, validator=_pos)
    cancel_qps: float = attrs.field(default=5.0, validator=_pos)
    list_qps: float = attrs.field(default=5.0, validator=_pos)
    list_shares_task_qps: bool = True
    max_connections: int = attrs.field(default=64, validator=_ge1)
    max_uploads: int = attrs.field(default=4, validator=_ge1)
    max_downloads: int = attrs.field(default=4, validator=_ge1)


DEFAULT_LIMITS = Limits()


@attrs.frozen(kw_only=True)
class PollPolicy:
    """How the shared status poller spends its task-query budget.

    Attributes:
        target_delay: How long the client should take to notice that a task finished, in
            seconds (the poller queries an open task at least this often once it is due, rate
            permitting; a list sweep not worth its pages may wait up to three times as long, see
            ``sweep_finds``).
        use_list: Learn which tasks finished from ``GET /tasks?status=…`` sweeps (one request
            for many tasks) and query only those. Its limits are undocumented; the poller turns
            it off by itself if the list ever misses a finished task.
        list_page_size: ``page_size`` of those sweeps.
        fallback_interval: With list sweeps on, each open task is still queried directly at
            least this often, so a list that lags never stalls a task.
        prior_base: Prior guess of processing time at zero audio duration, seconds.
        prior_per_audio_second: Prior guess of processing seconds per audio second. Both priors
            are replaced by what the poller observes.
        early_factor: The first query of a task lands at ``early_factor`` x its predicted
            duration (a little early beats a late notice).
        unknown_status_timeout: A task answering a status the documents do not list (such as
            ``succeeded`` or ``WARMING``) is logged once at WARNING and kept polling as not
            finished, for at most this many seconds from the first such answer (a documented
            status in between starts the count again); then its waiter gets
            :class:`~emo_async.UnknownTaskStatusError`. The task may still finish: a batch
            keeps it in its journal, so a later run looks at it again. Bounded by the
            service's 24 h task retention anyway; the default is one hour, many times an EMO
            task's usual duration.
        tail_delay: When the task-query budget has room, the poller looks again this often
            (seconds) at tasks it expects to have finished: the last tasks of a batch are then
            noticed within about this long, not ``target_delay``. Only in effect while it is
            shorter than ``target_delay``, and only at up to half the client's task-query rate.
        tail_queries_per_task: What those extra looks may cost: each watched task earns this
            many queries of credit, and each extra list page, or extra task query that finds
            its task still running, spends one. So a batch pays at most this much per job
            for its fast tail, whatever its size; 0 turns the tail looks off.
        sweep_finds: List sweeps are spent in proportion to finishes: a regular round sends
            one when the durations seen so far say it should find this many finished tasks per
            list page (or half the tasks it looks for, when few are open), and otherwise waits,
            up to ``2.5 x target_delay`` since the last sweep. So where tasks end faster than
            ``sweep_finds`` per ``target_delay`` a sweep costs at most ``1 / sweep_finds``
            list pages per job, and elsewhere a task may be noticed up to three times
            ``target_delay`` after it ended. 0 sweeps every round.
    """

    target_delay: float = attrs.field(default=5.0, validator=_pos)
    use_list: bool = True
    list_page_size: int = attrs.field(default=100, validator=_page)
    fallback_interval: float = attrs.field(default=60.0, validator=_pos)
    prior_base: float = attrs.field(default=20.0, validator=_nonneg)
    prior_per_audio_second: float = attrs.field(default=3.0, validator=_nonneg)
    early_factor: float = attrs.field(default=0.9, validator=_unit)
    unknown_status_timeout: float = attrs.field(default=3600.0, validator=_pos)
    tail_delay: float = attrs.field(default=1.0, validator=_pos)
    tail_queries_per_task: float = attrs.field(default=0.25, validator=_nonneg)
    sweep_finds: float = attrs.field(default=4.0, validator=_nonneg)


DEFAULT_POLL_POLICY = PollPolicy()
