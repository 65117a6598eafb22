"""Progress display of the command line: a live rich view on a terminal, plain periodic lines
elsewhere (logs, CI, pipes), or nothing.

Only the CLI imports this module (rich stays out of ``import emo_async``).
"""

from __future__ import annotations

import time
import unicodedata
from collections.abc import Callable
from typing import Any, Literal, TextIO

import anyio
from anyio.abc import TaskStatus

from emo_async import BatchStats

__all__ = ["Counts", "Progress", "ProgressMode", "fmt_duration", "printable"]

ProgressMode = Literal["live", "plain", "off"]

_SAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def printable(text: str, limit: int = 80) -> str:
    """A name from a manifest, safe to print: control and format characters (terminal escape
    sequences, bidirectional overrides) are shown escaped, long names are cut."""
    out = []
    for ch in text:
        if unicodedata.category(ch) in _SAFE_CATEGORIES:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    shown = "".join(out)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def fmt_duration(seconds: float | None) -> str:
    """``42s``, ``3m05s``, ``1h02m``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Counts:
    """What the display shows.

    The outcome counts (done, failed, rejected...) are the ones the command line received and
    reports (``states``, shared with the summary and the report), not the batch's own tallies:
    an outcome the batch made but nobody read (the run stopped first) is not finished for
    anyone. The stages (preparing, running...) come from the batch's stats.
    """

    def __init__(self, total: int | None) -> None:
        self.total = total
        self.states: dict[str, int] = {}
        #: Of the done jobs, how many were done by an earlier run.
        self.skipped = 0
        #: Seconds billed for tasks this run created (not those of earlier runs it finished).
        self.billed = 0.0
        self.stats: BatchStats | None = None

    def _n(self, *states: str) -> int:
        return sum(self.states.get(s, 0) for s in states)

    @property
    def finished(self) -> int:
        return sum(self.states.values())

    @property
    def done(self) -> int:
        return self._n("done")

    @property
    def failed(self) -> int:
        return self._n("failed", "expired", "cancelled")

    @property
    def rejected(self) -> int:
        return self._n("rejected")

    @property
    def unresolved(self) -> int:
        return self._n("unresolved")

    @property
    def pending(self) -> int | None:
        """Rows of the manifest without an outcome (yet)."""
        return None if self.total is None else max(0, self.total - self.finished)

    def eta(self) -> float | None:
        st = self.stats
        if st is None or self.total is None:
            return None
        # Skipped (done earlier) and rejected jobs finish at once: they say nothing of the pace.
        worked = st.finished - st.skipped - st.rejected
        if worked <= 0 or st.elapsed <= 0:
            return None
        return max(0, self.total - self.finished) * st.elapsed / worked

    def line(self, *, final: bool = False) -> str:
        """The plain one-line form (``final``: the run is over, what is left is pending)."""
        st = self.stats
        total = "?" if self.total is None else str(self.total)
        parts = [f"{self.finished}/{total} finished"]
        if final and self.pending:
            parts.append(f"pending {self.pending}")
        if st is not None or self.finished:
            parts += [
                f"done {self.done}" + (f" ({self.skipped} earlier)" if self.skipped else ""),
                f"failed {self.failed}",
                f"rejected {self.rejected}",
            ]
            # Rare states are shown only once they happen: the line stays short otherwise.
            if self.unresolved:
                parts.append(f"unresolved {self.unresolved}")
        if st is not None:
            parts += [
                f"preparing {st.preparing}",
                f"submitting {st.submitting}",
            ]
            if st.reconciling:
                parts.append(f"reconciling {st.reconciling}")
            parts += [
                f"running {st.running}",
                f"downloading {st.downloading}",
                f"429s {st.throttled}",
                f"billed {self.billed:.1f}s",
                f"ETA {fmt_duration(self.eta())}",
            ]
        elapsed = st.elapsed if st is not None else 0.0
        return f"[{fmt_duration(elapsed):>6}] " + " · ".join(parts)


class Progress:
    """Shows a running batch.

    Args:
        mode: ``"live"`` (rich, redrawn in place), ``"plain"`` (a line every ``interval``
            seconds) or ``"off"``.
        counts: What to show; ``counts.stats`` is refreshed from ``stats`` before each draw.
        stream: Where to write.
        interval: Seconds between plain lines.
    """

    def __init__(
        self,
        mode: ProgressMode,
        counts: Counts,
        *,
        stream: TextIO,
        interval: float = 5.0,
    ) -> None:
        self.mode = mode
        self.counts = counts
        self._stream = stream
        self._interval = interval
        self._stats: Callable[[], BatchStats] | None = None
        self._live: Any = None
        self._console: Any = None
        if mode == "live":
            from rich.console import Console

            self._console = Console(file=stream, highlight=False)

    def attach(self, stats: Callable[[], BatchStats]) -> None:
        """Where fresh stats come from (the running batch's ``stats``)."""
        self._stats = stats

    def _refresh_counts(self) -> None:
        if self._stats is not None:
            self.counts.stats = self._stats()

    def note(self, text: str, *, style: str | None = None) -> None:
        """A line about one job (shown above the live view, or as a plain line)."""
        if self.mode == "off":
            return
        if self._console is not None:
            from rich.text import Text

            self._console.print(Text(text, style=style or ""))
        else:
            print(text, file=self._stream, flush=True)

    def _renderable(self, *, final: bool = False) -> Any:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        c = self.counts
        st = c.stats
        total = c.total
        bar = Table.grid(padding=(0, 1))
        bar.add_row(
            ProgressBar(total=float(total or max(1, c.finished)), completed=c.finished, width=40),
            Text(
                f"{c.finished}/{'?' if total is None else total}"
                f"  elapsed {fmt_duration(st.elapsed if st else 0)}"
                f"  ETA {fmt_duration(c.eta())}",
                style="bold",
            ),
        )
        if st is None:
            return bar
        stages = Text.assemble(
            ("preparing ", "dim"),
            str(st.preparing),
            ("  submitting ", "dim"),
            str(st.submitting),
            ("  running ", "dim"),
            str(st.running),
            ("  downloading ", "dim"),
            str(st.downloading),
        )
        if st.reconciling:
            stages.append_text(Text.assemble(("  reconciling ", "dim"), str(st.reconciling)))
        outcomes = Text.assemble(
            *((("pending ", "bold"), f"{c.pending}  ") if final and c.pending else ()),
            ("done ", "green"),
            str(c.done) + (f" ({c.skipped} earlier)" if c.skipped else ""),
            ("  failed ", "red"),
            str(c.failed),
            ("  rejected ", "yellow"),
            str(c.rejected),
            *((("  unresolved ", "magenta"), str(c.unresolved)) if c.unresolved else ()),
            ("  429s ", "dim"),
            str(st.throttled),
            ("  billed ", "dim"),
            f"{c.billed:.1f} s",
        )
        return Group(bar, stages, outcomes)

    def _draw(self) -> None:
        self._refresh_counts()
        if self._live is not None:
            self._live.update(self._renderable(), refresh=True)
        elif self.mode == "plain":
            print(self.counts.line(), file=self._stream, flush=True)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Redraw until cancelled (start it in the batch's task group)."""
        if self.mode == "live":
            from rich.live import Live

            self._live = Live(
                self._renderable(),
                console=self._console,
                auto_refresh=False,
                transient=False,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live.start()
        task_status.started()
        if self.mode == "off":
            return
        period = 0.25 if self.mode == "live" else self._interval
        next_draw = time.monotonic() + (0 if self.mode == "live" else period)
        while True:
            await anyio.sleep(max(0.0, next_draw - time.monotonic()))
            next_draw += period
            self._draw()

    def close(self) -> None:
        """Draw the final state and stop the live view."""
        self._refresh_counts()
        if self._live is not None:
            self._live.update(self._renderable(final=True), refresh=True)
            self._live.stop()
            self._live = None
        elif self.mode == "plain":
            print(self.counts.line(final=True), file=self._stream, flush=True)
