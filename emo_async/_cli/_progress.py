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
    """What the display shows: the batch's stats, plus rows rejected before the batch (bad
    manifest rows) and the number of rows expected."""

    def __init__(self, total: int | None) -> None:
        self.total = total
        self.bad_rows = 0
        self.stats: BatchStats | None = None

    @property
    def finished(self) -> int:
        return (self.stats.finished if self.stats else 0) + self.bad_rows

    @property
    def rejected(self) -> int:
        return (self.stats.rejected if self.stats else 0) + self.bad_rows

    def eta(self) -> float | None:
        st = self.stats
        if st is None or self.total is None:
            return None
        # Skipped (done earlier) and rejected jobs finish at once: they say nothing of the pace.
        worked = st.finished - st.skipped - st.rejected
        if worked <= 0 or st.elapsed <= 0:
            return None
        return max(0, self.total - self.finished) * st.elapsed / worked

    def line(self) -> str:
        """The plain one-line form."""
        st = self.stats
        total = "?" if self.total is None else str(self.total)
        parts = [f"{self.finished}/{total} finished"]
        if st is not None:
            parts += [
                f"done {st.done}" + (f" ({st.skipped} earlier)" if st.skipped else ""),
                f"failed {st.failed + st.expired + st.cancelled}",
                f"rejected {self.rejected}",
            ]
            # Rare states are shown only once they happen: the line stays short otherwise.
            if st.unresolved:
                parts.append(f"unresolved {st.unresolved}")
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
                f"billed {st.billed_seconds:.1f}s",
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

    def _renderable(self) -> Any:
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
            ("done ", "green"),
            str(st.done) + (f" ({st.skipped} earlier)" if st.skipped else ""),
            ("  failed ", "red"),
            str(st.failed + st.expired + st.cancelled),
            ("  rejected ", "yellow"),
            str(c.rejected),
            *((("  unresolved ", "magenta"), str(st.unresolved)) if st.unresolved else ()),
            ("  429s ", "dim"),
            str(st.throttled),
            ("  billed ", "dim"),
            f"{st.billed_seconds:.1f} s",
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
            self._live.update(self._renderable(), refresh=True)
            self._live.stop()
            self._live = None
        elif self.mode == "plain":
            print(self.counts.line(), file=self._stream, flush=True)
