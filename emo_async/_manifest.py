"""Manifests of the command line: one job per row, CSV or JSONL, read lazily.

Columns (CSV header names or JSONL keys): ``image`` and ``audio`` (required), ``name``,
``style_level``, ``ratio``, ``face_bbox``, ``ext_bbox``. Paths are relative to the manifest's
folder; URLs (``http(s)://``, ``oss://``) are kept as they are. A box is ``x1,y1,x2,y2`` or a JSON
list. The file is UTF-8 (a BOM is fine); a CSV may use ``,``, ``;`` or tabs.

Rows are numbered as a spreadsheet shows them: the line where the row starts (a CSV header is
row 1). A row that cannot become a job is a :class:`ManifestRow` with ``problems`` and no job;
the other rows are unaffected. Only a manifest that cannot be read at all raises
:class:`ManifestError`. Names are kept as written (``../x``, control characters and all): the
batch runner turns them into safe file names.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final, Literal

import attrs

from ._exceptions import Problem
from ._models import Job

__all__ = ["COLUMNS", "REQUIRED", "Manifest", "ManifestError", "ManifestRow", "open_manifest"]

COLUMNS: Final = ("image", "audio", "name", "style_level", "ratio", "face_bbox", "ext_bbox")
REQUIRED: Final = ("image", "audio")
_URL_SCHEMES: Final = ("http://", "https://", "oss://")
_DELIMITERS: Final = (",", ";", "\t")
_JSONL_SUFFIXES: Final = (".jsonl", ".ndjson", ".json")
_CSV_SUFFIXES: Final = (".csv", ".tsv", ".txt")


class ManifestError(Exception):
    """The manifest cannot be read at all (missing, not UTF-8, no usable header...)."""


@attrs.frozen
class ManifestRow:
    """One row of a manifest.

    Attributes:
        row: The line where the row starts (1-based; a CSV header is row 1).
        job: The job, when the row could be read.
        problems: What is wrong with the row (empty when ``job`` is set).
        name: The row's ``name`` as written, if any.
        image: The row's ``image`` as written, if any.
        audio: The row's ``audio`` as written, if any.
    """

    row: int
    job: Job | None
    problems: tuple[Problem, ...] = ()
    name: str | None = None
    image: str | None = None
    audio: str | None = None

    @property
    def ok(self) -> bool:
        return self.job is not None

    @property
    def label(self) -> str:
        """A short name for messages: the name, else the audio, else the row number."""
        return self.name or self.audio or f"row {self.row}"


def _normalise_header(name: str) -> str:
    return name.strip().strip("\ufeff").strip().lower().replace(" ", "_").replace("-", "_")


def _bad_bytes(raw: bytes, exc: UnicodeDecodeError) -> str:
    return f"is not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"


def _decode(raw: bytes, first: bool) -> tuple[str, UnicodeDecodeError | None]:
    try:
        return raw.decode("utf-8-sig" if first else "utf-8"), None
    except UnicodeDecodeError as exc:
        return raw.decode("utf-8", errors="replace"), exc


def _check_not_utf16(head: bytes, path: Path) -> None:
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ManifestError(
            f"{path} is UTF-16 (a spreadsheet's 'Unicode text'); save it as 'CSV UTF-8' instead"
        )
    if b"\x00" in head.split(b"\n", 1)[0]:
        raise ManifestError(f"{path} is binary, not a CSV or JSONL text file")


def _resolve(value: str, base: Path) -> str | Path:
    if value.lower().startswith(_URL_SCHEMES) or "://" in value:
        return value  # validation says whether the scheme is accepted
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _parse_bbox(value: object) -> tuple[int, int, int, int] | str:
    """The box, or why it is not one."""
    items: object = value
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                items = json.loads(text)
            except ValueError:
                return f"{text!r} is not a JSON list of 4 integers"
        else:
            items = [p.strip() for p in text.replace(";", ",").split(",")]
    if not isinstance(items, list | tuple) or len(items) != 4:
        return f"{value!r} is not 4 integers x1,y1,x2,y2"
    out: list[int] = []
    for item in items:
        if isinstance(item, bool):
            return f"{value!r} is not 4 integers x1,y1,x2,y2"
        try:
            number = float(item) if isinstance(item, int | float | str) else None
        except ValueError:
            number = None
        if number is None or not number.is_integer():
            return f"{value!r} is not 4 integers x1,y1,x2,y2"
        out.append(int(number))
    return (out[0], out[1], out[2], out[3])


def _text(value: object) -> str | None:
    """A cell as text; None when empty."""
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        stripped = value.strip()
        return stripped or None
    return None


def build_row(row: int, record: Mapping[str, Any], base: Path) -> ManifestRow:
    """Turn one record (column → value) into a :class:`ManifestRow`."""
    problems: list[Problem] = []
    raw = {key: record.get(key) for key in COLUMNS}
    texts: dict[str, str | None] = {}
    for key in ("image", "audio", "name", "style_level", "ratio"):
        value = raw[key]
        text = _text(value)
        if value is not None and text is None and not (isinstance(value, str)):
            problems.append(Problem(key, f"{value!r} is not text"))
        texts[key] = text
    for key in REQUIRED:
        text = texts[key]
        if text is None:
            if raw[key] is None or isinstance(raw[key], str):
                problems.append(Problem(key, "missing (the column is required)"))
        elif "\x00" in text:
            problems.append(Problem(key, "contains a NUL character"))
        elif "\n" in text or "\r" in text:
            problems.append(
                Problem(key, "spans several lines (is a quote unbalanced on this row?)")
            )
    boxes: dict[str, tuple[int, int, int, int] | None] = {}
    for key in ("face_bbox", "ext_bbox"):
        value = raw[key]
        if value is None or (isinstance(value, str) and not value.strip()):
            boxes[key] = None
            continue
        parsed = _parse_bbox(value)
        if isinstance(parsed, str):
            problems.append(Problem(key, parsed, "x1,y1,x2,y2 or [x1, y1, x2, y2]"))
            boxes[key] = None
        else:
            boxes[key] = parsed
    name, image, audio = texts["name"], texts["image"], texts["audio"]
    if problems:
        return ManifestRow(row, None, tuple(problems), name=name, image=image, audio=audio)
    assert image is not None
    assert audio is not None
    style = (texts["style_level"] or "normal").lower()
    try:
        job = Job(
            _resolve(image, base),
            _resolve(audio, base),
            name=name,
            style_level=style,
            ratio=texts["ratio"],
            face_bbox=boxes["face_bbox"],
            ext_bbox=boxes["ext_bbox"],
        )
    except (TypeError, ValueError) as exc:
        problem = Problem("row", str(exc))
        return ManifestRow(row, None, (problem,), name=name, image=image, audio=audio)
    return ManifestRow(row, job, (), name=name, image=image, audio=audio)


@attrs.frozen
class Manifest:
    """An opened manifest; iterate it (again and again) for its rows, read lazily.

    Attributes:
        path: The file.
        format: ``"csv"`` or ``"jsonl"``.
        columns: The CSV header, normalised (JSONL: the known columns).
        unknown_columns: CSV columns that are not used.
        delimiter: The CSV delimiter.
    """

    path: Path
    format: Literal["csv", "jsonl"]
    columns: tuple[str, ...]
    unknown_columns: tuple[str, ...]
    delimiter: str = ","

    @property
    def base(self) -> Path:
        """The folder relative paths are resolved against."""
        return self.path.absolute().parent

    def __iter__(self) -> Iterator[ManifestRow]:
        if self.format == "jsonl":
            return self._jsonl_rows()
        return self._csv_rows()

    def count(self) -> int:
        """Rows in the manifest (one streaming pass)."""
        return sum(1 for _ in self)

    def _jsonl_rows(self) -> Iterator[ManifestRow]:
        with _open(self.path) as f:
            for number, raw in enumerate(f, start=1):
                text, error = _decode(raw, number == 1)
                if not text.strip():
                    continue
                if error is not None:
                    problem = Problem("row", _bad_bytes(raw, error))
                    yield ManifestRow(number, None, (problem,))
                    continue
                try:
                    record = json.loads(text)
                except ValueError as exc:
                    problem = Problem("row", f"not valid JSON ({exc})")
                    yield ManifestRow(number, None, (problem,))
                    continue
                if not isinstance(record, dict):
                    problem = Problem("row", f"a JSON {type(record).__name__}, not an object")
                    yield ManifestRow(number, None, (problem,))
                    continue
                yield build_row(number, {str(k).lower(): v for k, v in record.items()}, self.base)

    def _csv_rows(self) -> Iterator[ManifestRow]:
        bad_lines: dict[int, str] = {}
        counter = [0]
        with _open(self.path) as f:

            def lines() -> Iterator[str]:
                for raw in f:
                    counter[0] += 1
                    text, error = _decode(raw, counter[0] == 1)
                    if error is not None:
                        bad_lines[counter[0]] = _bad_bytes(raw, error)
                    yield text

            reader = csv.reader(lines(), delimiter=self.delimiter, strict=True)
            try:
                next(reader)  # the header, checked by open_manifest
            except (StopIteration, csv.Error):
                return
            width = len(self.columns)
            while True:
                start = reader.line_num + 1
                try:
                    fields = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    for n in [n for n in bad_lines if n <= reader.line_num]:
                        del bad_lines[n]
                    message = str(exc)
                    if "end of data" in message:
                        message = "a quote is never closed (the row runs to the end of the file)"
                    yield ManifestRow(start, None, (Problem("row", f"bad CSV: {message}"),))
                    continue
                end = reader.line_num
                bad = [bad_lines.pop(n) for n in sorted(bad_lines) if n <= end]
                if not fields or not any(cell.strip() for cell in fields):
                    continue  # blank lines, and the empty rows spreadsheets leave at the end
                if bad:
                    yield ManifestRow(start, None, (Problem("row", f"the line {bad[0]}"),))
                    continue
                record = dict(zip(self.columns, fields, strict=False))
                if len(fields) > width and any(cell.strip() for cell in fields[width:]):
                    problem = Problem(
                        "row",
                        f"{len(fields)} fields but the header has {width}"
                        f" (an unquoted {_delimiter_name(self.delimiter)} in a value?)",
                    )
                    yield ManifestRow(
                        start,
                        None,
                        (problem,),
                        name=_text(record.get("name")),
                        image=_text(record.get("image")),
                        audio=_text(record.get("audio")),
                    )
                    continue
                yield build_row(start, record, self.base)


def _delimiter_name(delimiter: str) -> str:
    return {",": "comma", ";": "semicolon", "\t": "tab"}.get(delimiter, repr(delimiter))


def _open(path: Path) -> Any:
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ManifestError(f"{path} is a directory, not a manifest") from None
    except OSError as exc:
        raise ManifestError(f"{path} cannot be read: {exc.strerror or exc}") from None


def _sniff_delimiter(header: str) -> str:
    counts = {d: header.count(d) for d in _DELIMITERS}
    best = max(_DELIMITERS, key=lambda d: counts[d])
    return best if counts[best] else ","


def open_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Open a manifest and check what can be checked up front (the header, the encoding).

    The format comes from the suffix (``.csv``/``.tsv``/``.txt`` → CSV; ``.jsonl``/
    ``.ndjson``/``.json`` → JSONL), else from the first character (``{`` → JSONL).

    Raises:
        ManifestError: The file is missing, unreadable, not UTF-8 text, or its header lacks
            ``image`` or ``audio`` (or names a column twice).
    """
    p = Path(path)
    with _open(p) as f:
        head = f.read(4096)
        f.seek(0)
        _check_not_utf16(head, p)
        first_raw = b""
        number = 0
        for raw in f:
            number += 1
            if raw.strip():
                first_raw = raw
                break
    if not first_raw.strip():
        raise ManifestError(f"{p} is empty")
    first, error = _decode(first_raw, number == 1)
    if error is not None:
        raise ManifestError(f"{p}: line {number} {_bad_bytes(first_raw, error)}; save it as UTF-8")
    suffix = p.suffix.lower()
    if suffix in _JSONL_SUFFIXES or (
        suffix not in _CSV_SUFFIXES and first.lstrip("\ufeff").lstrip().startswith("{")
    ):
        try:
            record = json.loads(first)
        except ValueError as exc:
            raise ManifestError(
                f"{p}: line {number} is not a JSON object ({exc}); a JSONL manifest has one"
                ' object per line, e.g. {"image": "a.png", "audio": "a.wav"}'
            ) from None
        if not isinstance(record, dict):
            raise ManifestError(f"{p}: line {number} is not a JSON object")
        return Manifest(p, "jsonl", COLUMNS, ())
    if number != 1:
        raise ManifestError(f"{p}: the header must be on the first line (line 1 is blank)")
    delimiter = "\t" if suffix == ".tsv" else _sniff_delimiter(first)
    try:
        header = next(csv.reader([first], delimiter=delimiter, strict=True))
    except csv.Error as exc:
        raise ManifestError(f"{p}: the header (row 1) is not valid CSV: {exc}") from None
    columns = tuple(_normalise_header(h) for h in header)
    seen: set[str] = set()
    for column in columns:
        if column in seen and column:
            raise ManifestError(f"{p}: column {column!r} appears twice in the header")
        seen.add(column)
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        found = ", ".join(repr(c) for c in columns if c) or "none"
        raise ManifestError(
            f"{p}: the header (row 1) lacks the required column"
            f"{'s' if len(missing) > 1 else ''} {', '.join(missing)} (found: {found}); "
            f"columns are {', '.join(COLUMNS)}"
        )
    unknown = tuple(c for c in columns if c and c not in COLUMNS)
    return Manifest(p, "csv", columns, unknown, delimiter)
