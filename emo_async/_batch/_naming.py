"""Destinations of a batch's jobs: the journal's recorded files first, then the input's rows in
input order (see :class:`~emo_async._names.OutputNames`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from .._names import OutputNames
from ._job import InFlight

if TYPE_CHECKING:
    from .._journal import Journal
    from .._models import Job

__all__ = ["FeedNames"]

logger = logging.getLogger("emo_async.batch")


class FeedNames:
    """Names a batch's jobs; a job never gets a name because its validation ended first."""

    def __init__(self, out_dir: Path) -> None:
        self.names = OutputNames(out_dir)
        #: Input position of each job not yet named.
        self._positions: dict[InFlight, int] = {}
        #: Set once the job that booked a plain name (the first row with it) has been named
        #: or refused: later rows with that name wait for it, not for every row before them.
        self._settled: dict[int, anyio.Event] = {}

    async def reserve_recorded(self, journal: Journal) -> None:
        """Paths earlier runs saved videos at stay with their jobs (see OutputNames.reserve).

        Only while the file is there: a name whose video was deleted is free again (so a job
        whose inputs changed keeps the name when its old video was removed). When two records
        name one path, the latest wrote the file there.
        """
        recorded = [rec async for rec in journal.records() if rec.path]
        recorded.sort(key=lambda rec: rec.updated_at, reverse=True)
        for rec in recorded:
            assert rec.path is not None
            path = anyio.Path(rec.path)
            if await path.is_symlink() or await path.is_file():
                self.names.reserve(Path(rec.path), rec.job.display_name, rec.key)

    def fed(self, job: Job, position: int) -> InFlight:
        """A job read from the input: it books its plain name in input order, so the first row
        with a name keeps it whichever row's validation ends first."""
        item = InFlight(job)
        self._positions[item] = position
        self.names.book(job.display_name, position)
        if self.names.booked_by(job.display_name) == position:
            self._settled[position] = anyio.Event()
        return item

    def position_of(self, item: InFlight) -> int | None:
        return self._positions.get(item)

    async def await_booker(self, item: InFlight, position: int | None) -> None:
        """Wait until the row that booked this job's plain name has been named or refused:
        whether it is the same job (then this one is a duplicate) decides this job's name."""
        booker = self.names.booked_by(item.job.display_name)
        if booker is None or booker == position:
            return
        settled = self._settled.get(booker)
        if settled is not None:
            await settled.wait()

    def settle(self, item: InFlight) -> None:
        """The job is named or refused (idempotent)."""
        position = self._positions.pop(item, None)
        if position is not None:
            settled = self._settled.pop(position, None)
            if settled is not None:
                settled.set()

    def dest_for(self, item: InFlight) -> Path:
        """The destination of a job the journal hands back (its name was checked when it was
        first admitted; a file at it since then is most likely its own finished download)."""
        return self.names.assign(item.job.display_name, item.key)

    def new_dest_for(self, item: InFlight, position: int | None) -> tuple[Path, str | None]:
        """The destination of a job from the input, and why it must not be sent there (or None).

        A job that does not get the plain name it asked for is logged: the user may look for
        ``intro.mp4`` and find ``intro-1a2b3c4d.mp4``.
        """
        names = self.names
        name = item.job.display_name
        path = names.assign(name, item.key, position=position)
        plain = names.plain(name, item.key)
        if path != plain:
            if names.is_recorded(plain):
                why = (
                    f"{plain.name} holds the video an earlier run made for another job of that"
                    " name (were its inputs changed?); that file is kept"
                )
            elif names.holder(plain) is not None:
                why = f"another job of this batch is saved as {plain.name}"
            else:
                why = f"an earlier job in the input is named {name!r}"
            logger.warning("%s: saving as %s: %s", item.name, path.name, why)
        return path, names.obstacle(path)
