"""Configuration records of the simulator: the service model and the fault knobs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

import attrs

__all__ = ["ENDPOINTS", "FaultConfig", "SimulatorConfig"]

#: Endpoint names, used by the fault knobs and by the ledger.
ENDPOINTS: Final = (
    "detect",
    "submit",
    "task_get",
    "task_list",
    "task_cancel",
    "get_policy",
    "upload",
    "media",
)


def _rate_map(value: Mapping[str, float] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, rate in (value or {}).items():
        if name not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {name!r}; expected one of {ENDPOINTS}")
        rate = float(rate)
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate for {name!r} must be within [0, 1], got {rate}")
        out[name] = rate
    return out


def _probability(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be within [0, 1], got {value}")


def _optional_rate(_inst: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{attribute.name} must be a positive rate or None, got {value}")


@attrs.frozen(kw_only=True)
class FaultConfig:
    """Seeded fault injection; everything is off by default.

    Probabilities are per request. Endpoint names: ``detect``, ``submit``, ``task_get``,
    ``task_list``, ``task_cancel``, ``get_policy``, ``upload``, ``media``.

    Attributes:
        seed: Seed of the fault dice (the same seed and request order give the same faults).
        latency: Extra delay, in real seconds, before every request is handled.
        latency_jitter: Up to this many more real seconds, drawn uniformly.
        error_rate: Endpoint → probability of a 500 ``InternalError`` or 503 ``ModelUnavailable``.
        reset_rate: Endpoint → probability that the connection is closed without an answer (for
            ``media``: before the headers).
        ambiguous_submit_rate: Probability that a submit creates its task and then drops the
            connection without answering.
        lost_before_submit_rate: Probability that a submit is read whole and then its
            connection dropped WITHOUT creating a task (no answer, nothing billed).
        submit_code_rate: Probability that a successful submit answer (200, ``output.task_id``,
            a real task) also carries a top-level ``code`` (``submit_code``) and ``message``
            (``"Success"``), as some gateways send.
        submit_code: That ``code``: ``"Success"`` (default) or an int such as ``0``.
        throttle_rate: Endpoint → probability of an extra 429 ``Throttling.RateQuota``.
        retry_after: If set, every 429 carries ``Retry-After: <seconds>``.
        truncate_rate: Media: send the headers, then cut the body at a random offset and close.
        etag_change_rate: Media: the object is rewritten (new ETag, new bytes) before a request.
        slow_rate: Probability that a request is delayed by ``slow_delay`` real seconds.
        slow_delay: The delay of a slow request.
        ignore_range_rate: Media: answer a Range request with 200 and the full body.
        list_time_shift: Seconds by which the task list reads its ``start_time``/``end_time``
            filter wrongly (e.g. 28800 for a UTC+8 vs UTC mix-up): a list that silently misses
            the tasks it is asked for. Only the filter shifts: ``gmt_create`` and the other
            epochs in the items stay true.
        list_ignores_page_no: The task list serves page 1 whatever ``page_no`` asks (and echoes
            ``page_no``), and sends no ``total_page``: a pager that waits for a short page
            loops forever.
        other_program_interval: REAL seconds between submits of "another program" using the
            same account and key: while set, a task (seeded audio of 2-8 s, so another billed
            ``video_duration``) appears every interval, runs and succeeds like any other, and
            shows in ``GET /tasks`` with the same ``api_key_id``. ``ledger.foreign_tasks``
            names them. Made lazily when a request arrives; counted from when the knob is set.
    """

    seed: int = 0
    latency: float = attrs.field(default=0.0, validator=attrs.validators.ge(0.0))
    latency_jitter: float = attrs.field(default=0.0, validator=attrs.validators.ge(0.0))
    error_rate: Mapping[str, float] = attrs.field(factory=dict, converter=_rate_map)
    reset_rate: Mapping[str, float] = attrs.field(factory=dict, converter=_rate_map)
    ambiguous_submit_rate: float = attrs.field(default=0.0, validator=_probability)
    lost_before_submit_rate: float = attrs.field(default=0.0, validator=_probability)
    submit_code_rate: float = attrs.field(default=0.0, validator=_probability)
    submit_code: str | int = attrs.field(default="Success")
    throttle_rate: Mapping[str, float] = attrs.field(factory=dict, converter=_rate_map)
    retry_after: float | None = attrs.field(default=None)
    truncate_rate: float = attrs.field(default=0.0, validator=_probability)
    etag_change_rate: float = attrs.field(default=0.0, validator=_probability)
    slow_rate: float = attrs.field(default=0.0, validator=_probability)
    slow_delay: float = attrs.field(default=1.0, validator=attrs.validators.ge(0.0))
    ignore_range_rate: float = attrs.field(default=0.0, validator=_probability)
    list_time_shift: float = 0.0
    list_ignores_page_no: bool = False
    other_program_interval: float | None = attrs.field(default=None, validator=_optional_rate)

    @retry_after.validator
    def _check_retry_after(
        self, _attribute: attrs.Attribute[float | None], value: float | None
    ) -> None:
        if value is not None and not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"retry_after must be >= 0 or None, got {value}")

    @submit_code.validator
    def _check_submit_code(self, _attribute: attrs.Attribute[str | int], value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise TypeError(f"submit_code must be a str or an int, got {value!r}")


def _api_keys(value: object) -> frozenset[str]:
    if isinstance(value, str):
        return frozenset({value})
    if not isinstance(value, (set, frozenset, list, tuple)):
        raise TypeError("api_keys must be a set of strings")
    keys = frozenset(str(k) for k in value)
    if not keys:
        raise ValueError("api_keys must not be empty")
    return keys


def _content_rules(value: Mapping[str, str] | None) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in (value or {}).items()}


@attrs.frozen(kw_only=True)
class SimulatorConfig:
    """The simulated service.

    Times are SIMULATED seconds unless said otherwise; ``time_scale`` real seconds pass per
    simulated second, so ``time_scale=0.01`` runs the task lifecycle and every validity window
    100 times faster. Rate limits are never scaled: they are real requests per real second.

    Attributes:
        api_keys: Bearer keys the API accepts; any other gets 401 ``InvalidApiKey``.
        time_scale: Real seconds per simulated second.
        task_qps: Token-bucket rate of ``GET /tasks/{id}`` (None = unlimited).
        list_qps: Rate of ``GET /tasks``.
        detect_qps: Rate of emo-detect-v1 calls.
        policy_qps: Rate of ``GET /uploads?action=getPolicy``.
        submit_qps: Rate of emo-v1 submits.
        cancel_qps: Rate of cancels.
        max_running: Account concurrency; further tasks wait PENDING in FIFO order.
        processing_base: Simulated processing seconds of every task.
        processing_per_audio_second: Extra processing seconds per second of audio.
        processing_jitter: Sigma of the seeded lognormal noise on the processing time.
        result_ttl: Validity of the video URL after the task ends.
        task_retention: After this long past its end, a task reads as UNKNOWN.
        upload_ttl: Lifetime of a temporary upload (``oss://`` object).
        policy_ttl: ``expire_in_seconds`` of an upload policy.
        max_file_size_mb: Largest upload the policy allows.
        capacity_limit_mb: Reported by getPolicy (not enforced).
        video_bytes_per_second: Size of the result video per second of audio.
        real_video: Hook for real MP4 results (not implemented yet: pseudo-random bytes).
        seed: Seed of task ids, processing noise and video bytes.
        faults: The fault knobs (swap at runtime with ``Simulator.set_faults``).
        validate_inputs: Download and sniff the inputs (image format, size, audio duration).
        content_rules: sha256 (hex) of image bytes → content error code (see the package doc).
        fetch_timeout: Real seconds allowed to download one input.
        media_bandwidth: Bytes per real second of each result download (None = as fast as the
            machine goes), to play a real link: OSS to a client rarely exceeds 1 Gbit/s.
        workspace: The workspace the keys belong to (None = not checked). When set, every API
            request must carry ``X-DashScope-WorkSpace`` with this id: without the header it
            gets 403 ``Workspace.AccessDenied`` (the request falls in the account's default
            workspace, which a workspace key may not use), with another id 404
            ``WorkSpaceNotFound`` (no workspace of the account has it). The upload and media
            hosts never check it, as OSS does not.
    """

    api_keys: frozenset[str] = attrs.field(
        default=frozenset({"sk-simulator"}), converter=_api_keys, repr=False
    )
    time_scale: float = attrs.field(default=1.0, validator=attrs.validators.gt(0.0))
    task_qps: float | None = attrs.field(default=20.0, validator=_optional_rate)
    list_qps: float | None = attrs.field(default=10.0, validator=_optional_rate)
    detect_qps: float | None = attrs.field(default=5.0, validator=_optional_rate)
    policy_qps: float | None = attrs.field(default=100.0, validator=_optional_rate)
    submit_qps: float | None = attrs.field(default=5.0, validator=_optional_rate)
    cancel_qps: float | None = attrs.field(default=None, validator=_optional_rate)
    max_running: int = attrs.field(default=10, validator=attrs.validators.ge(1))
    processing_base: float = attrs.field(default=15.0, validator=attrs.validators.ge(0.0))
    processing_per_audio_second: float = attrs.field(
        default=2.0, validator=attrs.validators.ge(0.0)
    )
    processing_jitter: float = attrs.field(default=0.1, validator=attrs.validators.ge(0.0))
    result_ttl: float = attrs.field(default=86400.0, validator=attrs.validators.gt(0.0))
    task_retention: float = attrs.field(default=86400.0, validator=attrs.validators.gt(0.0))
    upload_ttl: float = attrs.field(default=172800.0, validator=attrs.validators.gt(0.0))
    policy_ttl: float = attrs.field(default=300.0, validator=attrs.validators.gt(0.0))
    max_file_size_mb: int = attrs.field(default=100, validator=attrs.validators.ge(1))
    capacity_limit_mb: int = attrs.field(default=999999999, validator=attrs.validators.ge(1))
    video_bytes_per_second: int = attrs.field(default=20_000, validator=attrs.validators.ge(1))
    real_video: bool = False
    seed: int = 0
    faults: FaultConfig = attrs.field(factory=FaultConfig)
    validate_inputs: bool = True
    content_rules: Mapping[str, str] = attrs.field(factory=dict, converter=_content_rules)
    fetch_timeout: float = attrs.field(default=30.0, validator=attrs.validators.gt(0.0))
    media_bandwidth: float | None = attrs.field(default=None, validator=_optional_rate)
    workspace: str | None = attrs.field(default=None)

    @workspace.validator
    def _check_workspace(self, _attribute: attrs.Attribute[str | None], value: object) -> None:
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"workspace must be a non-empty string or None, got {value!r}")

    def qps(self, endpoint: str) -> float | None:
        """The configured rate limit of an endpoint (None = unlimited)."""
        return {
            "task_get": self.task_qps,
            "task_list": self.list_qps,
            "detect": self.detect_qps,
            "get_policy": self.policy_qps,
            "submit": self.submit_qps,
            "task_cancel": self.cancel_qps,
        }.get(endpoint)
