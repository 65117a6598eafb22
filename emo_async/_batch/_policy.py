"""A batch's options, in one frozen record."""

from __future__ import annotations

import enum
from typing import Any

import attrs

__all__ = ["BatchPolicy", "ReconcilePolicy"]


class ReconcilePolicy(enum.StrEnum):
    """What to do with a submit whose answer was lost.

    ``reconcile``: settle it through the task list — adopt a task only on proof it is this
    job's, send again only on proof that nothing was created, else end the job ``unresolved``
    (never resent). ``resubmit``: send again at once (may bill twice: an explicit opt-in).
    ``fail``: end the job ``unresolved`` at once, without reading the task list.
    """

    RECONCILE = "reconcile"
    RESUBMIT = "resubmit"
    FAIL = "fail"


def _positive_or_none(_inst: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"{attribute.name} must be > 0 or None, got {value!r}")


@attrs.frozen(kw_only=True)
class BatchPolicy:
    """How a batch runs.

    Attributes:
        max_tasks: Tasks open on the server at once (submitted, not finished).
        submit_rate: Submits per second for this batch (default: the client's limit). A rate
            above the client's ``Limits.submit_qps`` raises: raise the client's limit instead.
        submit_concurrency: Billed POSTs in flight at once. ``None`` (the default) adapts it
            to the answers' latency: just enough in flight that latency does not set the pace
            (``ceil(rate x latency x 1.5)``, at least 1, at most ``max(2, ceil(rate))``); on a
            fast network that is 1. Fewer in flight means fewer open intents for a later run
            to settle if the process dies. A lost answer pauses only its own job either way.
        download_concurrency: Downloads at once (default: the client's limit). Above the
            client's ``Limits.max_downloads`` raises: raise the client's limit instead.
        prepare_concurrency: Jobs validated, uploaded and detected at once.
        reconcile: What to do with a lost submit answer (:class:`ReconcilePolicy`).
        cancel_pending_on_exit: On leaving early, cancel tasks still PENDING on the server.
        rebill_expired: Submit again (and pay again) a job whose paid video's URL expired
            before it was saved. Off by default: such a job is reported ``expired`` again.
        reconcile_patience: Seconds a lost answer waits for a later submit of ours to bound
            its window in the task list (default: from the client's poll policy).
        lease: Seconds a worker of a shared batch (a ``postgresql://`` journal) holds its
            claims without renewing them; they are renewed every third of it, and a dead
            worker's jobs go to the others once it runs out.
    """

    max_tasks: int = attrs.field(default=10, validator=attrs.validators.ge(1))
    submit_rate: float | None = attrs.field(default=None, validator=_positive_or_none)
    submit_concurrency: int | None = attrs.field(default=None, validator=_positive_or_none)
    download_concurrency: int | None = attrs.field(default=None, validator=_positive_or_none)
    prepare_concurrency: int = attrs.field(default=4, validator=attrs.validators.ge(1))
    reconcile: ReconcilePolicy = attrs.field(
        default=ReconcilePolicy.RECONCILE, converter=ReconcilePolicy
    )
    cancel_pending_on_exit: bool = False
    rebill_expired: bool = False
    reconcile_patience: float | None = attrs.field(default=None, validator=_positive_or_none)
    lease: float = attrs.field(default=30.0, validator=attrs.validators.gt(0))
