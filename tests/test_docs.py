"""Every code sample in docs/ and README.md runs, and the reference covers the public API.

The samples run unchanged against a simulator: ``DASHSCOPE_API_KEY`` and
``DASHSCOPE_HTTP_BASE_URL`` point ``Client()`` at an in-process simulator served from a thread
(samples call ``anyio.run`` themselves, so it cannot share their event loop). Conventions:

* The ```` ```python ```` blocks of one page run in order, in one namespace (a later block may
  use what an earlier one imported), in a fresh folder holding the files the samples name:
  ``presenter.png``, ``hello.wav``, ``lessons/001.wav`` … ``lessons/008.wav`` and
  ``lessons.csv`` (rows 001 to 004). Top-level ``await`` and ``async with`` are allowed.
* ``<!-- no-run: why -->`` on the line before a fence skips that block (the reason is required).
* ``<!-- expect: text -->`` on the line before a fence (repeatable) requires ``text`` in what the
  block prints.
* Other languages (bash, csv, json, text) are not run.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import io
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

import emo_async
from emo_async import make_sample_set
from emo_async._samples import make_portrait, make_voice_wav
from emo_async.simulator import Simulator, SimulatorConfig

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [*sorted(DOCS.rglob("*.md")), ROOT / "README.md"]

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,})(?P<lang>[\w+-]*)(?P<rest>.*)$")
_NO_RUN = re.compile(r"^\s*<!-- no-run: (?P<why>\S.*?) -->\s*$")
_EXPECT = re.compile(r"^\s*<!-- expect: (?P<text>.+?) -->\s*$")

# README.md is merged by hand; until its 800-job quickstart carries a no-run marker it is
# named here (it needs a real account: 800 submits at 2 per second take ~7 minutes).
_README_NOT_RUN: dict[str, str] = {}


@attrs.frozen
class Sample:
    """One fenced code block."""

    page: Path
    line: int  # 1-based line of its first code line
    lang: str
    code: str
    no_run: str | None
    expect: tuple[str, ...]

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def extract(page: Path) -> list[Sample]:
    """The fenced blocks of a Markdown page, with the markers on the lines before each."""
    lines = page.read_text(encoding="utf-8").splitlines()
    out: list[Sample] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, ticks = m["indent"], m["ticks"]
        start = i + 1
        j = start
        while j < len(lines) and lines[j].strip() != ticks:
            j += 1
        body = [ln[len(indent) :] if ln.startswith(indent) else ln for ln in lines[start:j]]
        no_run: str | None = None
        expect: list[str] = []
        k = i - 1
        while k >= 0 and (_NO_RUN.match(lines[k]) or _EXPECT.match(lines[k])):
            if nr := _NO_RUN.match(lines[k]):
                no_run = nr["why"]
            elif ex := _EXPECT.match(lines[k]):
                expect.insert(0, ex["text"])
            k -= 1
        code = "\n".join(body) + "\n"
        if page.name == "README.md" and no_run is None:
            no_run = next((why for key, why in _README_NOT_RUN.items() if key in code), None)
        out.append(Sample(page, start + 1, m["lang"].lower(), code, no_run, tuple(expect)))
        i = j + 1
    return out


def _python(page: Path) -> list[Sample]:
    return [s for s in extract(page) if s.lang in ("python", "py", "python3")]


class _ThreadedSimulator:
    """A simulator served by its own event loop on a daemon thread."""

    def __init__(self, config: SimulatorConfig) -> None:
        self._config = config
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.sim: Simulator | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="docs-simulator", daemon=True)

    def _serve(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            async with Simulator(self._config) as sim:
                self.sim = sim
                self._ready.set()
                await self._stop.wait()

        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced to the test that waits for it
            self._error = exc
            self._ready.set()

    def __enter__(self) -> Simulator:
        self._thread.start()
        self._ready.wait(30)
        if self.sim is None:
            raise RuntimeError(f"simulator did not start: {self._error!r}")
        return self.sim

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


@pytest.fixture
def served() -> Iterator[Simulator]:
    """A fast simulator of its own for each page (so its ledger speaks of that page only)."""
    with _ThreadedSimulator(SimulatorConfig(time_scale=0.01, seed=19)) as sim:
        yield sim


def _lay_out_inputs(folder: Path) -> None:
    """The files the samples name."""
    make_portrait(folder / "presenter.png", seed=3)
    make_voice_wav(folder / "hello.wav", 1.2, seed=4)
    jobs = make_sample_set(folder / "lessons", 8, seconds=(0.8, 1.6), seed=5)
    for n, job in enumerate(jobs, 1):
        Path(job.audio).rename(folder / "lessons" / f"{n:03d}.wav")
    for extra in (folder / "lessons").glob("portrait-*.png"):
        extra.unlink()
    rows = ["image,audio,name"] + [
        f"presenter.png,lessons/{n:03d}.wav,lesson-{n:03d}" for n in range(1, 5)
    ]
    (folder / "lessons.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")


def _run(sample: Sample, namespace: dict[str, object]) -> str:
    # Padding keeps tracebacks on the page's own line numbers.
    source = "\n" * (sample.line - 1) + sample.code
    code = compile(source, sample.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = eval(code, namespace)
        if asyncio.iscoroutine(result):
            asyncio.run(result)
    return printed.getvalue()


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


class TestSamples:
    """The code samples of the docs and the README."""

    @pytest.mark.parametrize(
        "page", [p for p in PAGES if any(not s.no_run for s in _python(p))], ids=_page_id
    )
    def test_every_python_sample_runs(
        self,
        page: Path,
        served: Simulator,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Each runnable block of the page runs without error and prints what it promises."""
        _lay_out_inputs(tmp_path)
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("DASHSCOPE_API_KEY", served.api_key)
        monkeypatch.setenv("DASHSCOPE_HTTP_BASE_URL", served.base_url)
        namespace: dict[str, object] = {"__name__": "__main__"}
        for sample in _python(page):
            if sample.no_run:
                continue
            printed = _run(sample, namespace)
            for text in sample.expect:
                assert text in printed, f"{sample.where}: {text!r} not printed in:\n{printed}"
        # Whatever the samples billed, they billed once per input.
        assert served.ledger.duplicate_tasks() == {}

    def test_markers_are_well_formed(self) -> None:
        """A marker that does not parse would silently let a block run, or hide it."""
        for page in PAGES:
            for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
                if line.lstrip().startswith(("<!-- no-run", "<!-- expect")):
                    assert _NO_RUN.match(line) or _EXPECT.match(line), f"{page}:{n}: {line}"

    def test_skipped_blocks_are_few_and_say_why(self) -> None:
        """Most samples run; every one that does not gives its reason."""
        python = [s for p in PAGES for s in _python(p)]
        skipped = [s for s in python if s.no_run]
        assert len(python) >= 15
        assert len(skipped) <= len(python) // 3, [s.where for s in skipped]

    def test_extract_reads_markers_and_indented_fences(self, tmp_path: Path) -> None:
        """The extractor itself: markers, indentation, languages."""
        page = tmp_path / "p.md"
        page.write_text(
            "text\n"
            "<!-- no-run: needs a real key -->\n"
            "```python\nA = 1\n```\n"
            "<!-- expect: 2 -->\n"
            "<!-- expect: 3 -->\n"
            "```python\nprint(2, 3)\n```\n"
            '!!! note\n    ```python title="x"\n    B = 2\n    ```\n'
            "```bash\nls\n```\n",
            encoding="utf-8",
        )
        got = extract(page)
        assert [(s.lang, s.code, s.no_run, s.expect) for s in got] == [
            ("python", "A = 1\n", "needs a real key", ()),
            ("python", "print(2, 3)\n", None, ("2", "3")),
            ("python", "B = 2\n", None, ()),
            ("bash", "ls\n", None, ()),
        ]
        assert [s.line for s in got] == [4, 9, 13, 16]


class TestReference:
    """The API reference and the command line reference."""

    def _documented(self) -> set[str]:
        text = "\n".join(p.read_text(encoding="utf-8") for p in (DOCS / "reference").glob("*.md"))
        return set(re.findall(r"^::: ([\w.]+)", text, re.MULTILINE))

    def test_every_public_name_has_a_reference_entry(self) -> None:
        """A name added to ``emo_async.__all__`` must appear in docs/reference/."""
        documented = self._documented()
        missing = {
            f"emo_async.{name}" for name in emo_async.__all__ if name != "__version__"
        } - documented
        assert not missing, f"add to docs/reference/: {sorted(missing)}"

    def test_every_simulator_name_has_a_reference_entry(self) -> None:
        """The same for ``emo_async.simulator.__all__``."""
        import emo_async.simulator as simulator

        missing = {f"emo_async.simulator.{n}" for n in simulator.__all__} - self._documented()
        assert not missing, f"add to docs/reference/simulator.md: {sorted(missing)}"

    def test_every_command_has_a_section(self) -> None:
        """Each command ``emo-async --help`` lists has its help on the CLI page."""
        sys.path.insert(0, str(DOCS / "_hooks"))
        try:
            from generated import help_text  # type: ignore[import-not-found]
        finally:
            sys.path.remove(str(DOCS / "_hooks"))
        top = help_text(None)
        commands = re.findall(r"^    ([a-z][\w-]*)(?:\s|$)", top, re.MULTILINE)
        assert "run" in commands, top
        page = (DOCS / "cli.md").read_text(encoding="utf-8")
        missing = [c for c in commands if f"<!-- emo-async-help {c} -->" not in page]
        assert not missing, f"add `<!-- emo-async-help NAME -->` sections to docs/cli.md: {missing}"
        assert "emo-async run" in help_text("run")

    def test_pages_in_nav_exist_and_every_page_is_in_nav(self) -> None:
        """mkdocs.yml's nav and the files of docs/ agree."""
        nav = re.findall(r":\s+([\w/.-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)
        pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md") if "_hooks" not in p.parts}
        assert set(nav) == pages
