"""What a batch would bill, from local files only."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import anyio
import attrs

from .._exceptions import InputError
from .._models import Job
from ._prepare import _assemble, _probe_all
from ._records import LIMITS
from ._sources import _local_keys, _sources_of


@attrs.frozen
class Estimate:
    """What a batch would bill, from local files only (no request is made).

    Attributes:
        jobs: Jobs given.
        valid: Jobs that passed validation.
        billed_seconds: Sum of the valid jobs' audio durations (local audio only).
        by_ratio: Valid jobs per ratio, ``{"1:1": n, "3:4": m}``.
        billed_seconds_by_ratio: ``billed_seconds`` split the same way.
        unknown_duration: Valid jobs whose audio is a URL: counted, but their seconds are not
            in ``billed_seconds``.
        errors: One :class:`InputError` per invalid job.
    """

    jobs: int
    valid: int
    billed_seconds: float
    by_ratio: Mapping[str, int]
    billed_seconds_by_ratio: Mapping[str, float]
    unknown_duration: int
    errors: tuple[InputError, ...]


async def estimate(jobs: Iterable[Job]) -> Estimate:
    """Validate jobs locally and sum what they would bill, without any network request.

    Each distinct local file is probed and hashed once, however many jobs share it.
    """
    job_list = list(jobs)
    sources = [_sources_of(job) for job in job_list]
    keys = [key for srcs in sources for key in _local_keys(srcs)]
    probed = await _probe_all(keys, anyio.CapacityLimiter(8))
    by_ratio = {r: 0 for r in LIMITS.ratios}
    seconds_by_ratio = {r: 0.0 for r in LIMITS.ratios}
    errors: list[InputError] = []
    valid = unknown = 0
    for job, srcs in zip(job_list, sources, strict=True):
        validated, problems = _assemble(job, srcs, probed)
        if validated is None:
            errors.append(InputError(problems, job_name=job.display_name))
            continue
        valid += 1
        by_ratio[validated.ratio] = by_ratio.get(validated.ratio, 0) + 1
        seconds = validated.billed_seconds_estimate
        if seconds is None:
            unknown += 1
        else:
            seconds_by_ratio[validated.ratio] = seconds_by_ratio.get(validated.ratio, 0.0) + seconds
    return Estimate(
        jobs=len(job_list),
        valid=valid,
        billed_seconds=sum(seconds_by_ratio.values()),
        by_ratio=by_ratio,
        billed_seconds_by_ratio=seconds_by_ratio,
        unknown_duration=unknown,
        errors=tuple(errors),
    )
