"""The batch runner: validate → upload → detect → journal the intent → submit → poll →
download, each stage with its own limit, connected with backpressure.

Rooms: ``_job`` (a job in flight, events, outcomes), ``_policy`` (options), ``_ports`` (what
the batch needs from a client), ``_stager`` (validate, upload, detect), ``_submitter`` (the
billed POST), ``_attribution`` (who owns a task: a pure rule) and ``_reconciler`` (applying it
to the task list), ``_finisher`` (wait, download, keep), ``_resumer`` (what earlier runs left),
``_run`` (the wiring) and ``_one`` (one job, for ``Client.generate``).
"""

from ._job import BatchEvent, BatchStats, EventKind
from ._one import run_one
from ._policy import BatchPolicy, ReconcilePolicy
from ._run import JOURNAL_NAME, BatchRun

__all__ = [
    "JOURNAL_NAME",
    "BatchEvent",
    "BatchPolicy",
    "BatchRun",
    "BatchStats",
    "EventKind",
    "ReconcilePolicy",
    "run_one",
]
