"""Telling a file's format from its first bytes, never from its name (sync; worker threads)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ._records import MediaProbeError

_SNIFF = 64


def _sniff(head: bytes) -> str | None:
    """Name the format of a file from its first bytes, or None when unknown."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head.startswith(b"BM"):
        return "bmp"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    if head.startswith(b"ID3"):
        return "mp3"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        version = (head[1] >> 3) & 0x3
        layer = (head[1] >> 1) & 0x3
        # Version 01 and layer 00 are reserved; ADTS AAC (0xFFF1/0xFFF9) has layer 00.
        if version != 1 and layer != 0:
            return {1: "mp3", 2: "mp2", 3: "mp1"}[layer]
        if layer == 0:
            return "aac"
    if head.startswith(b"OggS"):
        return "ogg"
    if head.startswith(b"fLaC"):
        return "flac"
    if head[4:8] == b"ftyp":
        return "mp4"
    if head.startswith(b"FORM") and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head.startswith(b"#!AMR"):
        return "amr"
    if head.startswith(b"%PDF"):
        return "pdf"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if _looks_like_text(head):
        return "text"
    return None


def _looks_like_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # The sniff window may cut a multi-byte character in half.
        try:
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text)
    return printable >= 0.95 * len(text)


_IMAGE_KINDS = frozenset({"png", "jpeg", "webp", "gif", "bmp", "tiff"})
_AUDIO_KINDS = frozenset({"wav", "mp3", "mp2", "mp1", "aac", "ogg", "flac", "mp4", "aiff", "amr"})


def _describe(kind: str) -> str:
    if kind == "text":
        return "a text file"
    if kind in _AUDIO_KINDS:
        return f"{kind.upper()} audio"
    if kind in _IMAGE_KINDS:
        return f"a {kind.upper()} image"
    return f"a {kind.upper()} file"


def _open_checked(path: Path) -> tuple[int, bytes]:
    """Stat and read the first bytes of ``path``, turning OS errors into probe errors."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MediaProbeError(f"{str(path)!r} does not exist") from None
    except PermissionError:
        raise MediaProbeError(f"{str(path)!r} cannot be read: permission denied") from None
    except OSError as exc:
        raise MediaProbeError(f"{str(path)!r} cannot be read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise MediaProbeError(f"{str(path)!r} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise MediaProbeError(f"{str(path)!r} is not a regular file")
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF)
    except PermissionError:
        raise MediaProbeError(f"{str(path)!r} cannot be read: permission denied") from None
    except IsADirectoryError:
        raise MediaProbeError(f"{str(path)!r} is a directory, not a file") from None
    except OSError as exc:
        raise MediaProbeError(f"{str(path)!r} cannot be read: {exc.strerror or exc}") from None
    if st.st_size == 0 or not head:
        raise MediaProbeError(f"{str(path)!r} is empty (0 bytes)")
    return st.st_size, head
