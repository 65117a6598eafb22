"""Output file names: safe on Linux, macOS and Windows, never outside ``out_dir``.

A job's name comes from the user (or a manifest somebody else wrote), so it is untrusted: it
may hold ``../``, an absolute path, NUL, control characters or a name Windows reserves. The
rules here keep whatever readable part there is and fall back to a stable id otherwise.
"""

from __future__ import annotations

import os
import re
import stat
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Final

from ._exceptions import DownloadError, Problem

if TYPE_CHECKING:
    from ._media import ValidatedJob
    from ._models import Job

__all__ = ["MAX_STEM_BYTES", "NamePlan", "OutputNames", "safe_stem"]

#: Longest stem, in UTF-8 bytes. Most file systems allow 255 bytes per name; this leaves room
#: for a ``-<key>`` suffix, ``.mp4`` and ``.part.json``.
MAX_STEM_BYTES = 120

_SEPARATORS = re.compile(r"[/\\]")
# Characters Windows refuses in a name; ":" also stops NTFS alternate data streams.
_WINDOWS_INVALID = re.compile(r'[<>:"|?*]')
# Bidirectional overrides can make "exe.mp4" display as "mp4.exe"; drop them with the
# control characters.
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")
_DROP_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})
_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {f"{p}{d}" for p in ("COM", "LPT") for d in "123456789\u00b9\u00b2\u00b3"}
)
_DEFAULT_FALLBACK = "video"


def _clean_component(text: str) -> str:
    text = "".join(
        ch for ch in text if unicodedata.category(ch) not in _DROP_CATEGORIES and ch not in _BIDI
    )
    text = _WINDOWS_INVALID.sub("_", unicodedata.normalize("NFC", text))
    text = text.lstrip(". ").rstrip(". ")
    encoded = text.encode("utf-8")
    if len(encoded) > MAX_STEM_BYTES:
        # errors="ignore" drops a multi-byte character cut in half at the end.
        text = encoded[:MAX_STEM_BYTES].decode("utf-8", errors="ignore").rstrip(". ")
    base, dot, rest = text.partition(".")
    if base.rstrip(" ").upper() in _RESERVED:
        text = f"{base}_{dot}{rest}"
    return text


def _readable(name: str) -> str:
    """The cleaned last path component of ``name`` that has something left, else ``""``."""
    normalised = unicodedata.normalize("NFC", name)
    for part in reversed(_SEPARATORS.split(normalised)):
        stem = _clean_component(part)
        if stem:
            return stem
    return ""


def safe_stem(name: str, *, fallback: str) -> str:
    """Turn an untrusted name into a file stem that is safe on Linux, macOS and Windows.

    The name is NFC-normalised; only its last path component that has something left after
    cleaning is kept (``"../x"`` and ``"C:\\\\x"`` become ``"x"``); NUL, control characters,
    bidirectional overrides and leading or trailing dots and spaces are dropped; characters
    Windows refuses (``<>:"|?*``) become ``_``; names Windows reserves (``CON``, ``nul.txt``,
    ``COM1`` …) get a ``_`` after their base; the result is cut to :data:`MAX_STEM_BYTES`
    UTF-8 bytes without splitting a character.

    Args:
        name: The untrusted name.
        fallback: Used when nothing is left of ``name`` (cleaned the same way; ``"video"`` if
            it is empty too).

    Returns:
        A non-empty stem without separators, NUL or control characters.
    """
    stem = _readable(name)
    if stem:
        return stem
    stem = _clean_component(_SEPARATORS.sub("_", unicodedata.normalize("NFC", fallback)))
    return stem or _DEFAULT_FALLBACK


class OutputNames:
    """Assigns ``{stem}.mp4`` paths inside one directory, deterministically.

    The first job to claim a stem gets ``{stem}.mp4``; a job with the same stem but another key
    gets ``{stem}-{key[:8]}.mp4`` (longer key prefixes if even that is taken). Names are
    compared case-insensitively, since macOS and Windows file systems usually are. The same
    ``(name, key)`` always gets the same path.

    "First" is the order of :meth:`book` when it is used (a batch books every job as it reads
    it, so the first row with a name keeps the plain name however long its validation takes),
    else the order of :meth:`assign`. Paths given to :meth:`reserve` (videos an earlier run
    saved) come before both. Only :meth:`obstacle` looks at the disk: a file there that nobody
    reserved is never handed out silently.

    Args:
        out_dir: Where the files go.
        suffix: The file extension, dot included.
    """

    def __init__(self, out_dir: Path | str, *, suffix: str = ".mp4") -> None:
        self._out_dir = Path(out_dir)
        self._suffix = suffix
        self._assigned: dict[tuple[str, str], Path] = {}
        self._claimed: dict[str, tuple[str, str]] = {}
        #: Plain names booked by position (see book()), before the job's key is known.
        self._booked: dict[str, int] = {}
        self._recorded: set[str] = set()

    @property
    def out_dir(self) -> Path:
        """The directory every assigned path lies in."""
        return self._out_dir

    def plain(self, name: str, key: str) -> Path:
        """The path the job asks for by its name (what :meth:`assign` gives when it is free)."""
        safe_key = safe_stem(key, fallback="job")
        return self._out_dir / (safe_stem(name, fallback=safe_key) + self._suffix)

    def book(self, name: str, position: int) -> None:
        """Book the plain name of ``name`` for the job at ``position``, unless booked already.

        Call it in input order, before the job's key is known: :meth:`assign` then keeps the
        plain name for the first job that booked it, whatever order the jobs are assigned in.
        Unnamed jobs (whose stem is their key) need no booking.
        """
        key = self.booking_of(name)
        if key is not None:
            self._booked.setdefault(key, position)

    def booking_of(self, name: str) -> str | None:
        """What :meth:`book` books for ``name`` (None for a name that falls back to the key)."""
        stem = _readable(name)
        return (stem + self._suffix).casefold() if stem else None

    def booked_by(self, name: str) -> int | None:
        """The position that booked the plain name of ``name``, if any."""
        key = self.booking_of(name)
        return None if key is None else self._booked.get(key)

    def holder(self, path: Path) -> tuple[str, str] | None:
        """The ``(name, key)`` a path was reserved or assigned to."""
        return self._claimed.get(path.name.casefold())

    def is_recorded(self, path: Path) -> bool:
        """Whether ``path`` was given to :meth:`reserve` (a video an earlier run saved)."""
        return path.name.casefold() in self._recorded

    def assign(self, name: str, key: str, *, position: int | None = None) -> Path:
        """The output path of the job named ``name`` with the stable id ``key``.

        Args:
            name: The job's name (untrusted; it is sanitised with :func:`safe_stem`).
            key: A stable id of the job (a hash of its inputs, a task id): it is the fallback
                stem and tells apart jobs whose names collide.
            position: Where the job was booked (:meth:`book`); a plain name booked by another
                position is not this job's.

        Returns:
            A path directly inside ``out_dir``.

        Raises:
            DownloadError: The path would resolve outside ``out_dir`` (e.g. an existing
                symlink of that name points elsewhere).
        """
        ident = (name, key)
        known = self._assigned.get(ident)
        if known is not None:
            return known
        safe_key = safe_stem(key, fallback="job")
        stem = safe_stem(name, fallback=safe_key)
        candidates = [stem]
        candidates += [f"{stem}-{safe_key[:n]}" for n in (8, 16)]
        candidates.append(f"{stem}-{safe_key}")
        filename = None
        for candidate in candidates:
            if self._claim(candidate, ident, position):
                filename = candidate + self._suffix
                break
        counter = 2
        while filename is None:
            # Only reachable when two keys share their whole sanitised text.
            candidate = f"{stem}-{safe_key}-{counter}"
            if self._claim(candidate, ident, position):
                filename = candidate + self._suffix
            counter += 1
        path = self._out_dir / filename
        self._check_inside(path)
        self._assigned[ident] = path
        return path

    def reserve(self, path: Path | str, name: str, key: str) -> bool:
        """Give ``(name, key)`` the path an earlier run saved its video at.

        Called before any :meth:`assign`, so that a job resumed or added in a later run can
        never be handed (and overwrite) a file that belongs to another job.

        Returns:
            False when the path is not directly inside ``out_dir`` or is already taken.
        """
        p = Path(path)
        if os.path.realpath(p.parent) != os.path.realpath(self._out_dir):
            return False
        ident = (name, key)
        folded = p.name.casefold()
        owner = self._claimed.get(folded)
        if owner is not None and owner != ident:
            return False
        self._claimed[folded] = ident
        self._recorded.add(folded)
        self._assigned[ident] = self._out_dir / p.name
        return True

    def obstacle(self, path: Path) -> str | None:
        """Why a job must not be sent with ``path`` as its destination, or None when it may.

        Something already at ``path`` that no :meth:`reserve` accounts for (a user's own
        ``intro.mp4``, a folder, a link) would be replaced, or would refuse the video only
        after it was paid for.
        """
        if self.is_recorded(path):
            return None
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"{path} cannot be used: {exc.strerror or exc}"
        if stat.S_ISDIR(st.st_mode):
            what = "a folder"
        elif stat.S_ISLNK(st.st_mode):
            what = "a link"
        elif stat.S_ISREG(st.st_mode):
            what = "a file"
        else:
            what = "something other than a file"
        return (
            f"{path} is already {what} that no journal of this folder records, and it is"
            " never replaced: move it away or give the job another name"
        )

    def _claim(self, candidate: str, ident: tuple[str, str], position: int | None) -> bool:
        folded = (candidate + self._suffix).casefold()
        owner = self._claimed.get(folded)
        if owner is None:
            booked = self._booked.get(folded)
            if booked is not None and position is not None and booked != position:
                return False
            self._claimed[folded] = ident
            return True
        return owner == ident

    def _check_inside(self, path: Path) -> None:
        # The stem has no separator, so only a symlink (or a hostile out_dir entry) can take the
        # path elsewhere; strict=False resolves as far as the path exists.
        where = os.path.realpath(path)
        parent = os.path.dirname(where)
        if parent != os.path.realpath(self._out_dir):
            raise DownloadError(f"refusing output path {path}: it resolves outside {self._out_dir}")


#: Journal phases a batch resumes by itself (it checks no destination for them again).
_RESUMED_PHASES: Final = frozenset({"intent", "unresolved", "submitted", "finished"})


class NamePlan:
    """Names validated jobs in input order exactly as a batch would (for ``validate`` and
    ``run --dry-run``): the same job twice is refused, the first job with a name keeps it, and,
    with an output folder, something already at a destination that no journal records is
    refused.

    Args:
        out_dir: The batch's output folder; None to skip every look at the disk.
    """

    def __init__(self, out_dir: Path | None) -> None:
        self.names = OutputNames(out_dir if out_dir is not None else Path("."))
        self._check_disk = out_dir is not None
        # Digests, not hex strings: a long manifest keeps one entry per row.
        self._first: dict[bytes, int] = {}
        self._resumed: set[str] = set()

    def load_journal(self, journal: Path) -> None:
        """Reserve the paths an earlier run saved videos at, as a batch does (blocking; read
        only and without the journal's lock, so it is safe while a batch runs on it)."""
        import sqlite3

        from ._journal.connection import connect
        from ._journal.schema import check_header

        if not self._check_disk or not check_header(journal):
            return
        conn = connect(journal, read_only=True)
        try:
            rows = conn.execute(
                "SELECT key, name, path, phase FROM jobs ORDER BY updated_at DESC"
            ).fetchall()
        except sqlite3.Error:
            return  # the run itself reports a damaged journal
        finally:
            conn.close()
        for key, name, path, phase in rows:
            if phase in _RESUMED_PHASES:
                self._resumed.add(key)
            # Only a recorded file that is still there keeps its name (see BatchRun).
            if path and (os.path.islink(path) or os.path.isfile(path)):
                self.names.reserve(Path(path), name, key)

    def book(self, job: Job, position: int) -> None:
        """A job read from the input, valid or not (see :meth:`OutputNames.book`)."""
        self.names.book(job.display_name, position)

    def check(self, validated: ValidatedJob, position: int) -> tuple[Problem | None, str | None]:
        """A problem that makes a batch refuse the job, and a note when its video is saved
        under another name than its own."""
        from ._journal import job_key

        job = validated.job
        key = job_key(
            job,
            image_digest=validated.image.digest,
            audio_digest=validated.audio.digest,
            ratio=validated.ratio,
        )
        first = self._first.setdefault(bytes.fromhex(key), position)
        if first != position:
            return Problem("job", f"the same job appears twice in this batch (row {first})"), None
        name = job.display_name
        path = self.names.assign(name, key, position=position)
        plain = self.names.plain(name, key)
        note = None if path == plain else f"saved as {path.name}: {plain.name} is another job's"
        if self._check_disk and key not in self._resumed:
            obstacle = self.names.obstacle(path)
            if obstacle is not None:
                return Problem("name", obstacle), note
        return None, note
