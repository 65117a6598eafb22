"""Image headers, read with Pillow (imported on first use; sync, called from worker threads)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from ._records import ImageInfo, MediaProbeError
from ._sniff import _IMAGE_KINDS, _describe, _open_checked, _sniff


def probe_image(path: str | os.PathLike[str]) -> ImageInfo:
    """Read an image's format and dimensions from its header.

    Args:
        path: A local file.

    Returns:
        Its :class:`ImageInfo`; the format comes from the bytes, not the name.

    Raises:
        MediaProbeError: Missing, unreadable, a directory, empty, not an image, or a corrupt
            or truncated header.
    """
    p = Path(path)
    size, head = _open_checked(p)
    kind = _sniff(head)
    if kind is not None and kind not in _IMAGE_KINDS:
        raise MediaProbeError(f"{str(p)!r} is {_describe(kind)}, not an image")

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Only the header is read; a huge size is reported as a size problem instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                with Image.open(p) as im:
                    fmt, (width, height) = im.format, im.size
            except Image.DecompressionBombError:
                fmt, (width, height) = _open_without_bomb_check(p, head)
    except UnidentifiedImageError:
        if kind is not None:
            # The magic bytes say what it is; Pillow could not read the rest of the header.
            raise MediaProbeError(
                f"{str(p)!r} has a truncated or corrupt {kind.upper()} header"
            ) from None
        raise MediaProbeError(f"{str(p)!r} is not an image in a format we know") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError) as exc:
        what = (kind or "image").upper()
        raise MediaProbeError(
            f"{str(p)!r} has a truncated or corrupt {what} header ({exc})"
        ) from None
    name = (fmt or kind or "unknown").lower()
    if name == "mpo":
        # Phone cameras write MPO: a JPEG stream with extra pictures appended.
        name = "jpeg"
    if width <= 0 or height <= 0:
        raise MediaProbeError(f"{str(p)!r} has an invalid size {width}x{height}")
    return ImageInfo(format=name, width=int(width), height=int(height), size=size)


def _open_without_bomb_check(p: Path, head: bytes) -> tuple[str | None, tuple[int, int]]:
    # Image.open refuses sizes beyond 2x MAX_IMAGE_PIXELS before we can read them; the format
    # plugins themselves do not, and we only need the header.
    from PIL import Image

    Image.init()
    with open(p, "rb") as fp:
        for ident in Image.ID:
            factory, accept = Image.OPEN[ident]
            if accept is not None and not accept(head):
                continue
            fp.seek(0)
            im = factory(fp, str(p))
            try:
                return im.format, im.size
            finally:
                im.close()
    raise MediaProbeError(f"{str(p)!r} is not an image in a format we know")
