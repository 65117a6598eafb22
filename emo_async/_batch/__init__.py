"""The batch runner: validate → upload → detect → journal the intent → submit → poll →
download, each stage with its own limit, connected with backpressure."""

from ._run import BatchEvent, BatchRun, BatchStats, run_one

__all__ = ["BatchEvent", "BatchRun", "BatchStats", "run_one"]
