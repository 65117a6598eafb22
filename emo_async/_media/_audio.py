"""Audio headers, read with mutagen (imported on first use; sync, called from worker threads)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from ._records import AudioInfo, MediaProbeError
from ._sniff import _describe, _open_checked, _sniff


def probe_audio(path: str | os.PathLike[str]) -> AudioInfo:
    """Read an audio file's format, duration, sample rate and channels from its headers.

    Args:
        path: A local file.

    Returns:
        Its :class:`AudioInfo`; the format comes from the bytes, not the name.

    Raises:
        MediaProbeError: Missing, unreadable, a directory, empty, not WAV/MP3 audio, or a
            corrupt or truncated header.
    """
    p = Path(path)
    size, head = _open_checked(p)
    kind = _sniff(head)
    if kind not in ("wav", "mp3", "mp2", "mp1"):
        what = f"is {_describe(kind)}" if kind else "holds no audio format we know"
        raise MediaProbeError(f"{str(p)!r} {what}, not WAV or MP3 audio")

    import mutagen

    try:
        if kind == "wav":
            from mutagen.wave import WAVE

            winfo: Any = WAVE(p).info  # type: ignore[no-untyped-call]
            fmt = "wav"
        else:
            from mutagen.mp3 import MP3

            winfo = MP3(p).info  # type: ignore[no-untyped-call]
            layer = int(getattr(winfo, "layer", 3) or 3)
            fmt = "mp3" if layer == 3 else f"mp{layer}"
    except (mutagen.MutagenError, OSError, ValueError, EOFError) as exc:
        raise MediaProbeError(
            f"{str(p)!r} has a truncated or corrupt {kind.upper()} header ({exc})"
        ) from None
    duration = float(getattr(winfo, "length", 0.0) or 0.0)
    sample_rate = int(getattr(winfo, "sample_rate", 0) or 0)
    channels = int(getattr(winfo, "channels", 0) or 0)
    if not math.isfinite(duration) or sample_rate <= 0:
        raise MediaProbeError(f"{str(p)!r} has a corrupt {kind.upper()} header (no sample rate)")
    return AudioInfo(
        format=fmt, duration=duration, size=size, sample_rate=sample_rate, channels=channels
    )
