"""The validation entry points: one job, before anything is uploaded, detected or billed."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import anyio.to_thread

from .._exceptions import InputError
from .._models import Job
from ._prepare import _assemble, _prepare_locals, _Probed
from ._records import ValidatedJob
from ._sources import _check_urls, _local_keys, _Source, _sources_of

if TYPE_CHECKING:
    import aiohttp


async def validate_job(
    job: Job,
    *,
    check_urls: bool = False,
    session: aiohttp.ClientSession | None = None,
) -> ValidatedJob:
    """Check a job's inputs against the documented limits, before anything is spent.

    Local files are probed (from their bytes) and hashed in worker threads. ``http(s)://`` and
    ``oss://`` inputs are checked for their form only, unless ``check_urls`` is true and a
    ``session`` is given: then each http(s) URL gets a HEAD (or, if HEAD is refused, a
    ``Range: bytes=0-0`` GET) and must answer 2xx; audio must announce a size under the limit.
    The session should carry no API key: these requests go to third-party hosts.

    Args:
        job: The job.
        check_urls: Probe http(s) URLs over the network (off by default).
        session: The session for those probes.

    Returns:
        The :class:`ValidatedJob`, with content digests and the effective ratio.

    Raises:
        InputError: Listing every problem of the job at once.
    """
    validated, _ = await _validate(job, check_urls=check_urls, session=session, keep=0)
    return validated


async def validate_keeping(job: Job, keep: int) -> tuple[ValidatedJob, Mapping[str, bytes]]:
    """:func:`validate_job`, also returning the bytes of each local input of at most ``keep``
    bytes that was read (hashed) now: ``{"image": ..., "audio": ...}``, either may be missing.

    The batch uploads these very bytes instead of reading the files again.
    """
    return await _validate(job, check_urls=False, session=None, keep=keep)


async def _validate(
    job: Job, *, check_urls: bool, session: aiohttp.ClientSession | None, keep: int
) -> tuple[ValidatedJob, Mapping[str, bytes]]:
    sources = _sources_of(job)
    keys = _local_keys(sources)
    # One thread hop for the job's files, one after the other: the batch validates several
    # jobs at once, so a hop per file would only add overhead.
    probed: Mapping[tuple[str, Path], _Probed] = {}
    contents: Mapping[str, bytes] = {}
    if keys:
        probed, contents = await anyio.to_thread.run_sync(_prepare_locals, keys, keep)
    validated, problems = _assemble(job, sources, probed)
    if check_urls and session is not None:
        problems += await _check_urls(
            [s for s in sources if isinstance(s, _Source) and s.kind == "url"], session
        )
    if problems or validated is None:
        raise InputError(problems, job_name=job.display_name)
    return validated, contents
